//! Process start and exit events from the kernel: the `discover_exec`, `discover_exit` and
//! `discover_fork` programs of the eBPF object (`profiler-ebpf/src/discover.rs`) on the
//! `sched:sched_process_exec`, `sched:sched_process_exit` and `sched:sched_process_fork`
//! tracepoints, read from their ring buffer by one thread. No polling of `/proc`: a process
//! that starts matching is seen the moment it execs (or is forked by a followed parent).
//!
//! The object is loaded once more for this, apart from the probes' load, with every map
//! shrunk to one entry (the probes' maps are not used here) and only the three tracepoint
//! programs loaded. The fork record's layout differs between kernels: the offset of its
//! `child_pid` is read from the tracepoint's `format` file and given to the program. Needs tracefs (mounted at `/sys/kernel/tracing` if it is not) and a kernel
//! with BPF ring buffers (5.8+).
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use aya::{
    maps::{Array, MapData, RingBuf},
    programs::TracePoint,
    EbpfLoader,
};
use tracing::{info, warn};

/// Bytes of the event ring buffer: ~32k events in flight between two reads.
const RING_BYTES: u32 = 256 * 1024;

/// One kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// The process replaced its image (`execve`): comm, exe and maps are the new ones.
    /// `cgroup` is the cgroup v2 id it exec'd in (0 if unknown): found later in another one,
    /// it moved after this exec, and what it runs is not yet the image it will be known by
    /// (`runc init` joins the container's cgroup, then execs the container's program).
    Exec { pid: u32, cgroup: u64 },
    /// The process (its thread-group leader) exited.
    Exit(u32),
    /// `parent` (a tgid) created the task `child`: a new process, or a thread of `parent`
    /// (then `child` is a tid whose tgid is `parent`; see [`is_process`]).
    Fork { parent: u32, child: u32 },
}

impl ProcEvent {
    /// Decodes `[kind << 32 | tgid, word]` (word: the exec's cgroup id, or the fork's parent).
    pub fn decode([raw, word]: [u64; 2]) -> Option<ProcEvent> {
        let pid = raw as u32;
        match raw >> 32 {
            1 => Some(ProcEvent::Exec { pid, cgroup: word }),
            2 => Some(ProcEvent::Exit(pid)),
            3 => Some(ProcEvent::Fork { parent: word as u32, child: pid }),
            _ => None,
        }
    }
}

/// Whether the task `tid` is a process (a thread-group leader), not a thread: its `Tgid` in
/// `/proc/TID/status` is itself. False when it is gone already.
pub fn is_process(tid: u32) -> bool {
    crate::procfs::status_number(tid, "Tgid") == Some(tid)
}

/// Offset of `child_pid` in the `sched_process_fork` record, from the tracepoint's `format`.
fn fork_child_pid_offset() -> Result<u32, WatchError> {
    let bad = |m: String| WatchError::Load(format!("sched_process_fork format: {m}"));
    let text = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| std::fs::read_to_string(format!("{root}/events/sched/sched_process_fork/format")).ok())
        .ok_or_else(|| bad("unreadable".into()))?;
    format_offset(&text, "child_pid").ok_or_else(|| bad("no child_pid field".into()))
}

/// `offset:N` of the field `name` in a tracepoint `format` text.
fn format_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let mut parts = l.trim().strip_prefix("field:")?.split(';');
        let decl = parts.next()?;
        let field = decl.trim().rsplit([' ', '*']).next()?;
        if field != name {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")).and_then(|o| o.parse().ok())
    })
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("this memscope was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild")]
    NotBuilt,
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {0}")]
    NoTracefs(std::io::Error),
    #[error("loading the discovery programs: {0}")]
    Load(String),
    #[error("attaching the discovery program to tracepoint sched:{tracepoint}: {message}")]
    Attach { tracepoint: &'static str, message: String },
}

/// The running watcher: events go to the callback from its own thread until it is dropped.
pub struct ProcWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    lost: Arc<AtomicU64>,
}

impl ProcWatcher {
    /// Loads and attaches the tracepoint programs and starts the reading thread, which calls
    /// `on_event` for every event (in order) until the watcher is dropped.
    pub fn start(mut on_event: impl FnMut(ProcEvent) + Send + 'static) -> Result<ProcWatcher, WatchError> {
        let object = crate::bpf::load::OBJECT;
        if object.is_empty() {
            return Err(WatchError::NotBuilt);
        }
        ensure_tracefs()?;
        let parsed = aya_obj::Object::parse(object).map_err(|e| WatchError::Load(e.to_string()))?;
        let mut loader = EbpfLoader::new();
        for name in parsed.maps.keys() {
            if !name.starts_with('.') && name != "DISCOVER_EVENTS" {
                loader.map_max_entries(name, 1);
            }
        }
        loader.map_max_entries("DISCOVER_EVENTS", RING_BYTES);
        let child_pid_offset = fork_child_pid_offset()?;
        loader.override_global("FORK_CHILD_PID_OFFSET", &child_pid_offset, true);
        let mut ebpf = loader.load(object).map_err(|e| WatchError::Load(e.to_string()))?;
        for (prog, tracepoint) in [
            ("discover_exec", "sched_process_exec"),
            ("discover_exit", "sched_process_exit"),
            ("discover_fork", "sched_process_fork"),
        ] {
            let attach_err = |e: &dyn std::fmt::Display| WatchError::Attach { tracepoint, message: e.to_string() };
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| attach_err(&"the program is missing from the object"))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| attach_err(&e))?;
            p.load().map_err(|e| attach_err(&e))?;
            p.attach("sched", tracepoint).map_err(|e| attach_err(&e))?;
        }
        let events = ebpf.take_map("DISCOVER_EVENTS").ok_or_else(|| WatchError::Load("no DISCOVER_EVENTS map".into()))?;
        let mut ring = RingBuf::try_from(events).map_err(|e| WatchError::Load(e.to_string()))?;
        let lost_map: Option<Array<MapData, u64>> = ebpf.take_map("DISCOVER_LOST").and_then(|m| Array::try_from(m).ok());
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicU64::new(0));
        let (st, lo) = (stop.clone(), lost.clone());
        let thread = std::thread::Builder::new()
            .name("memscope-discover".into())
            .spawn(move || {
                // Keeps the programs attached for as long as the thread runs.
                let _ebpf = ebpf;
                let fd = ring.as_fd().as_raw_fd();
                let mut reported = 0;
                while !st.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut p, 1, 200) };
                    while let Some(item) = ring.next() {
                        if let Ok(raw) = <[u8; 16]>::try_from(&*item) {
                            let word = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                            if let Some(e) = ProcEvent::decode([word(0), word(1)]) {
                                on_event(e);
                            }
                        }
                    }
                    if let Some(n) = lost_map.as_ref().and_then(|m| m.get(&0, 0).ok()) {
                        lo.store(n, Ordering::Relaxed);
                        if n > reported {
                            warn!(lost = n, "process events lost (the ring buffer was full)");
                            reported = n;
                        }
                    }
                }
            })
            .map_err(|e| WatchError::Load(format!("starting the discovery thread: {e}")))?;
        info!("watching process exec, fork and exit (sched tracepoints)");
        Ok(ProcWatcher { stop, thread: Some(thread), lost })
    }

    /// Events the kernel could not queue (the ring buffer was full).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for ProcWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// aya finds tracepoints through tracefs; some hosts do not mount it.
fn ensure_tracefs() -> Result<(), WatchError> {
    if Path::new("/sys/kernel/tracing/events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(WatchError::NoTracefs(std::io::Error::last_os_error()));
    }
    info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_events() {
        assert_eq!(ProcEvent::decode([(1 << 32) | 42, 77]), Some(ProcEvent::Exec { pid: 42, cgroup: 77 }));
        assert_eq!(ProcEvent::decode([(2 << 32) | 7, 0]), Some(ProcEvent::Exit(7)));
        assert_eq!(ProcEvent::decode([(3 << 32) | 9, 5]), Some(ProcEvent::Fork { parent: 5, child: 9 }));
        assert_eq!(ProcEvent::decode([4 << 32, 0]), None);
    }

    /// Both layouts of `sched_process_fork` (inline comms before 6.x, `__data_loc` after).
    #[test]
    fn fork_format_offsets() {
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(format_offset(old, "child_pid"), Some(44));
        assert_eq!(format_offset(new, "child_pid"), Some(20));
        assert_eq!(format_offset(new, "parent_pid"), Some(12));
        assert_eq!(format_offset(new, "pid"), None);
        assert!(is_process(std::process::id()));
    }
}
