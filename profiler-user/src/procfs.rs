//! What memscope reads from `/proc` about a target: that it exists, its name, its memory
//! mappings (to find the allocator it really uses and to map addresses back to files), and its
//! memory counters. Paths of mapped files are returned as the target sees them and as the host
//! can open them (through `/proc/PID/root`, so targets in containers work).
use std::{
    fs,
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Read { pid: u32, what: &'static str, source: io::Error },
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub executable: bool,
    /// File offset of `start`.
    pub offset: u64,
    pub inode: u64,
    /// Path as the target sees it; `None` for anonymous memory. Pseudo paths like `[heap]`
    /// are kept as they are.
    pub path: Option<String>,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// A regular file (not `[heap]`, `[vdso]`, anonymous or deleted).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }
}

pub fn exists(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn read(pid: u32, what: &'static str) -> Result<String, ProcError> {
    fs::read_to_string(format!("/proc/{pid}/{what}")).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            ProcError::NoSuchProcess(pid)
        } else {
            ProcError::Read { pid, what, source }
        }
    })
}

/// `/proc/PID/comm` without the newline.
pub fn comm(pid: u32) -> Result<String, ProcError> {
    Ok(read(pid, "comm")?.trim_end().to_string())
}

pub fn maps(pid: u32) -> Result<Vec<Mapping>, ProcError> {
    Ok(read(pid, "maps")?.lines().filter_map(parse_maps_line).collect())
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, offset, _dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let path = it.next().map(str::trim).filter(|p| !p.is_empty()).map(str::to_string);
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        readable: perms.starts_with('r'),
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
    })
}

/// How the host opens a file that the target maps at `path_in_target`.
pub fn host_path(pid: u32, path_in_target: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path_in_target}"))
}

/// Path of the target's executable as the target sees it.
pub fn exe(pid: u32) -> Result<String, ProcError> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProcError::NoSuchProcess(pid),
            _ => ProcError::Read { pid, what: "exe", source },
        })
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`, `RssAnon`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    Ok(parse_status_kb(&status, field).unwrap_or(0) * 1024)
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The cgroup v2 `memory.current` of the target, when it has one.
pub fn cgroup_memory_current(pid: u32) -> Option<u64> {
    let cgroup = read(pid, "cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    fs::read_to_string(format!("/sys/fs/cgroup{rel}/memory.current")).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses file-backed, anonymous and pseudo mappings, and paths with spaces.
    #[test]
    fn parses_maps_lines() {
        let m = parse_maps_line(
            "7f1c2a428000-7f1c2a57d000 r-xp 00028000 fe:01 1183 /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!((m.start, m.end, m.offset, m.inode), (0x7f1c2a428000, 0x7f1c2a57d000, 0x28000, 1183));
        assert!(m.executable && m.readable && m.is_file());
        assert_eq!(m.path.as_deref(), Some("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        let anon = parse_maps_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, None);
        assert!(!anon.executable && !anon.is_file());
        let heap = parse_maps_line("55d0-55e0 rw-p 00000000 00:00 0                          [heap]").unwrap();
        assert_eq!(heap.path.as_deref(), Some("[heap]"));
        assert!(!heap.is_file());
        let spaced = parse_maps_line("1000-2000 r-xp 00000000 fe:01 77 /opt/my app/bin").unwrap();
        assert_eq!(spaced.path.as_deref(), Some("/opt/my app/bin"));
    }

    /// Reads kB fields of /proc/PID/status as bytes, and this process's own entries.
    #[test]
    fn reads_status_and_self() {
        assert_eq!(parse_status_kb("Name:\tx\nRssAnon:\t    1234 kB\n", "RssAnon"), Some(1234));
        assert_eq!(parse_status_kb("RssAnonX:\t1 kB\n", "RssAnon"), None);
        let me = std::process::id();
        assert!(exists(me));
        assert!(status_bytes(me, "VmRSS").unwrap() > 0);
        assert!(maps(me).unwrap().iter().any(|m| m.executable && m.is_file()));
        assert!(matches!(comm(u32::MAX - 1), Err(ProcError::NoSuchProcess(_))));
    }
}
