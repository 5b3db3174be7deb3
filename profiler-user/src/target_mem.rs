//! Reads and writes of a target's memory (`/proc/PID/mem`: USDT semaphores), bounded in time.
//!
//! A page of the target may be backed by a file system that never answers (a hung FUSE
//! server: the OpenTelemetry eBPF profiler had this advisory with `process_vm_readv`); the
//! kernel then blocks the reading thread until the target dies. So each access runs on its
//! own worker thread and the caller waits at most [`DEADLINE`]: past it the caller gets
//! `TimedOut` and the worker is abandoned (it ends when the kernel lets go). At most
//! [`MAX_STUCK`] workers may be stuck at once; past that, accesses are refused at once, so a
//! hostile target cannot make the agent pile up threads. Stuck and timed-out accesses are
//! counted ([`stats`]).
use std::{
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

/// Longest a caller waits for one access.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// Most workers left blocked in the kernel at once.
pub const MAX_STUCK: usize = 4;

static STUCK: AtomicUsize = AtomicUsize::new(0);
static TIMED_OUT: AtomicU64 = AtomicU64::new(0);

/// `(workers stuck now, accesses timed out so far)`.
pub fn stats() -> (usize, u64) {
    (STUCK.load(Ordering::Relaxed), TIMED_OUT.load(Ordering::Relaxed))
}

/// Runs `op` on a worker thread; waits at most `deadline` for it.
pub fn with_deadline<T: Send + 'static>(
    what: &'static str,
    deadline: Duration,
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    if STUCK.load(Ordering::Relaxed) >= MAX_STUCK {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{what}: {MAX_STUCK} earlier accesses to a target (its memory or files) are still blocked in the kernel; refusing more"),
        ));
    }
    let (tx, rx) = mpsc::sync_channel(1);
    // Counted as stuck from the start; uncounted by the worker when it ends.
    STUCK.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new().name("memscope-mem".into()).spawn(move || {
        let r = op();
        STUCK.fetch_sub(1, Ordering::Relaxed);
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        STUCK.fetch_sub(1, Ordering::Relaxed);
        return Err(e);
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(_) => {
            TIMED_OUT.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{what}: no answer from the target within {deadline:?}; left behind");
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what}: the target did not answer within {deadline:?}")))
        }
    }
}

/// `len` bytes at `addr` of an open `/proc/PID/mem`.
pub fn read_at(mem: &Arc<File>, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mem = mem.clone();
    with_deadline("reading target memory", DEADLINE, move || {
        let mut b = vec![0u8; len];
        mem.read_exact_at(&mut b, addr)?;
        Ok(b)
    })
}

/// Writes `bytes` at `addr` of an open `/proc/PID/mem`.
pub fn write_at(mem: &Arc<File>, addr: u64, bytes: Vec<u8>) -> io::Result<()> {
    let mem = mem.clone();
    with_deadline("writing target memory", DEADLINE, move || mem.write_all_at(&bytes, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _, time::Instant};

    /// A call that really blocks in the kernel (opening a FIFO nobody writes) returns
    /// TimedOut at the deadline; the stuck worker is counted, and refused calls start once
    /// MAX_STUCK are stuck; unblocking them brings the count back.
    #[test]
    fn blocked_accesses_time_out_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let mut results = Vec::new();
        for _ in 0..MAX_STUCK + 1 {
            let f = fifo.clone();
            results.push(with_deadline("test", Duration::from_millis(200), move || File::open(f).map(|_| ())));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(results[..MAX_STUCK].iter().all(|r| r.as_ref().unwrap_err().kind() == io::ErrorKind::TimedOut));
        assert_eq!(results[MAX_STUCK].as_ref().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(stats().0 >= MAX_STUCK && stats().1 >= MAX_STUCK as u64);
        // One open for reading and writing releases every blocked reader and never blocks
        // itself (Linux: a FIFO opened O_RDWR is its own reader). A blocking O_WRONLY open per
        // reader would hang once the released readers have closed the FIFO.
        let writer = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats().0 > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stats().0, 0, "the released workers did not end within 10 s");
        drop(writer);
        assert_eq!(with_deadline("test", DEADLINE, || Ok(7)).unwrap(), 7);
    }
}
