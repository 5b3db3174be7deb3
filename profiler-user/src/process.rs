//! A traced process by identity, not by number: pids are reused, and a target that exits may
//! have its pid taken by an unrelated process a moment later. [`Process`] holds a pidfd
//! (`pidfd_open`, Linux 5.3+) and the process's start time (field 22 of `/proc/PID/stat`,
//! the fallback on older kernels, and a second check).
//!
//! Reading anything through `/proc/PID/...` is a race with reuse; the rule used everywhere is
//! *read, then check*: a process cannot be replaced while it is alive, so a read that is
//! followed by [`Process::alive`] returning true came from this process ([`Process::verified`]).
//! Signals go through the pidfd (`pidfd_send_signal`): they never reach a newcomer.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::procfs::ProcError;

#[derive(Debug)]
pub struct Process {
    pid: u32,
    /// Start time in clock ticks after boot.
    start_ticks: u64,
    pidfd: Option<OwnedFd>,
}

impl Process {
    /// The process now running as `pid`.
    pub fn open(pid: u32) -> Result<Process, ProcError> {
        let before = start_ticks(pid)?;
        // SAFETY: plain syscall; a new descriptor we own on success.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // The pidfd may be of a newcomer if the process was replaced between the two calls.
        if start_ticks(pid)? != before {
            return Err(ProcError::NoSuchProcess(pid));
        }
        Ok(Process { pid, start_ticks: before, pidfd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the process started (clock ticks after boot): with the pid, its identity.
    pub fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// Still running (a zombie counts as exited), and `pid` still names it.
    pub fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd. POLLIN on a pidfd means the process exited.
                let running = unsafe { libc::poll(&mut p, 1, 0) } == 0;
                running && start_ticks(self.pid).is_ok_and(|t| t == self.start_ticks)
            }
            None => start_ticks(self.pid).is_ok_and(|t| t == self.start_ticks) && !is_zombie(self.pid),
        }
    }

    /// `value`, read from `/proc/PID/...` before this call, if it came from this process.
    pub fn verified<T>(&self, value: T) -> Option<T> {
        self.alive().then_some(value)
    }

    /// Sends `signal` to this process only (never to a process that took its pid).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let Some(fd) = &self.pidfd else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no pidfd on this kernel: refusing to signal by pid"));
        };
        // SAFETY: valid pidfd, no siginfo.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Field 22 of `/proc/PID/stat` (after the `)` that ends comm, which may hold spaces).
pub fn start_ticks(pid: u32) -> Result<u64, ProcError> {
    parse_start_ticks(&stat(pid).ok_or(ProcError::NoSuchProcess(pid))?).ok_or(ProcError::NoSuchProcess(pid))
}

/// `/proc/PID/stat`; comm may hold any bytes (`prctl(PR_SET_NAME)`), so read lossily.
fn stat(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/stat")).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub(crate) fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state): field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat(pid)
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with(['Z', 'X'])))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start time is field 22 also when comm has spaces and parentheses; this process is alive.
    #[test]
    fn start_time_and_self() {
        let stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        let me = Process::open(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(me.verified(7) == Some(7));
        assert!(Process::open(u32::MAX - 1).is_err());
    }

    /// A process whose name is not UTF-8 is held like any other.
    #[test]
    fn any_comm_bytes() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join(std::ffi::OsStr::from_bytes(b"sl\xffp"));
        std::fs::copy("/usr/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(std::fs::read(format!("/proc/{}/stat", child.id())).unwrap().windows(4).any(|w| w == b"sl\xffp"));
        let p = Process::open(child.id()).unwrap();
        assert!(p.alive());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A child that exited (and was reaped) is not alive, and cannot be signalled.
    #[test]
    fn exited_child_is_gone() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let p = Process::open(child.id()).unwrap();
        assert!(p.alive());
        p.signal(libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(!p.alive());
        assert!(p.verified(()).is_none());
        assert!(p.signal(0).is_err(), "a signal after exit must not go anywhere");
    }
}
