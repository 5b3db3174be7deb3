//! Files a target controls can be truncated under the agent while they are mapped: an ELF file
//! over 64 MiB (`target_fs::FileBytes::Mapped`), the files blazesym maps to symbolize, the
//! build-id reads. A read past the new end of file raises SIGBUS (`BUS_ADRERR`), whose default
//! action kills the agent, which a hostile target could then do at will.
//!
//! The handler installed here answers such a fault by mapping a page of zeros over the faulting
//! page (`MAP_FIXED`, read-only) and returning: the read goes on and finds zeros, the parser
//! sees a damaged file and fails or names garbage (the target's own data), and the fault is
//! counted ([`recovered`], `memscope_agent_truncated_reads_total` in `/metrics`). Only
//! `BUS_ADRERR` faults (no page behind a mapped address: what a file's moved end gives) are
//! answered; every other SIGBUS (a hardware memory error, a misaligned access) keeps its default
//! action. The handler makes raw system calls only (`mmap`), as a signal handler must.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Once,
};

static RECOVERED: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Reads of truncated mappings answered with zeros since the process started.
pub fn recovered() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!("cannot install the SIGBUS handler: a truncated mapped file can stop memscope");
            }
        }
    });
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && addr != 0 {
        let page = addr & !4095;
        // SAFETY: replaces one page of a file mapping that faulted past the file's end; raw
        // syscall, async-signal-safe.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                page,
                4096usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1i32,
                0usize,
            )
        };
        if ret as usize == page {
            RECOVERED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not ours: the default action, as if no handler were installed.
    // SAFETY: restoring the default disposition and re-raising are async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    /// A mapped file truncated to nothing: reading where its contents were finds zeros instead
    /// of killing the process, and the fault is counted.
    #[test]
    fn reads_past_a_truncated_end_find_zeros() {
        super::install();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0xabu8; 1 << 20]).unwrap();
        // SAFETY: a private read-only mapping of a file this test owns; its truncation below is
        // the point of the test.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(map[4096 * 10], 0xab);
        let before = super::recovered();
        file.set_len(0).unwrap();
        let tail: Vec<u8> = (0..8).map(|i| map[4096 * 100 + i * 4096]).collect();
        assert_eq!(tail, vec![0; 8]);
        assert!(super::recovered() >= before + 8, "{} faults counted", super::recovered() - before);
    }
}
