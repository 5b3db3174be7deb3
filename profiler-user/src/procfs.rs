//! What memscope reads from `/proc` about a target: that it exists, its name, its memory
//! mappings (to find the allocator it really uses and to map addresses back to files), and its
//! memory counters. Paths of mapped files are returned as the target sees them and as the host
//! can open them (inside `/proc/PID/root`, so targets in containers work, through
//! [`target_fs`], so they cannot name host files).
use std::{fs, io, path::Path};

use crate::target_fs::{self, Kind, TargetFile, TargetFsError};

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
    /// Device (as `st_dev` encodes it) and inode of the mapped file.
    pub dev: u64,
    pub inode: u64,
    /// Path as the target sees it; `None` for anonymous memory. Pseudo paths like `[heap]`
    /// are kept as they are.
    pub path: Option<String>,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// A file (not `[heap]`, `[vdso]` or anonymous memory), possibly deleted on disk since.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }
}

pub fn exists(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` still runs code: it exists and is neither a zombie (`Z`, exited, not reaped
/// yet: its `maps` reads empty) nor dead (`X`).
pub fn running(pid: u32) -> bool {
    let Ok(stat) = read(pid, "stat") else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

fn read(pid: u32, what: &'static str) -> Result<String, ProcError> {
    let text = fs::File::open(format!("/proc/{pid}/{what}")).and_then(|f| target_fs::read_text(&f, Kind::ProcText));
    text.map_err(|source| {
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

/// The target's mappings, their paths as the target sees them. The kernel writes the paths of
/// `/proc/PID/maps` relative to the READER's root: for a process in a container (another
/// root) the host reads `/run/containerd/.../rootfs/usr/lib/libc.so.6`. That prefix, the
/// target's root as the host sees it (`/proc/PID/root`), is taken off, so profiles (and `read`
/// tokens) show `/usr/lib/libc.so.6` and never the host's layout; paths outside it are kept.
pub fn maps(pid: u32) -> Result<Vec<Mapping>, ProcError> {
    let text = read(pid, "maps")?;
    let root = fs::read_link(format!("/proc/{pid}/root")).ok().and_then(|r| r.to_str().map(str::to_owned));
    Ok(text
        .lines()
        .filter_map(parse_maps_line)
        .map(|mut m| {
            if let (Some(root), Some(path)) = (root.as_deref(), m.path.as_mut()) {
                if let Some(inside) = in_root(root, path) {
                    *path = inside;
                }
            }
            m
        })
        .collect())
}

/// `path` (as the host sees it) relative to a target root at `root` (as the host sees it):
/// `None` when the root is the host's or `path` is not below it.
fn in_root(root: &str, path: &str) -> Option<String> {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return None;
    }
    let rest = path.strip_prefix(root)?;
    rest.starts_with('/').then(|| rest.to_string())
}

pub(crate) fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, offset, dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let (major, minor) = dev.split_once(':')?;
    let path = it.next().map(str::trim).filter(|p| !p.is_empty()).map(str::to_string);
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        readable: perms.starts_with('r'),
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: libc::makedev(u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        inode: inode.parse().ok()?,
        path,
    })
}

/// Opens the file that the target maps at `path_in_target` (a path from its maps, or its
/// executable): see [`target_fs::open_mapped`]. A path the target does not map is opened
/// inside its root.
pub fn host_path(pid: u32, path_in_target: &str) -> Result<TargetFile, TargetFsError> {
    host_path_in(pid, &maps(pid).unwrap_or_default(), path_in_target)
}

fn host_path_in(pid: u32, maps: &[Mapping], path_in_target: &str) -> Result<TargetFile, TargetFsError> {
    let named = |m: &&Mapping| m.path.as_deref().is_some_and(|p| p == path_in_target || without_deleted(p) == path_in_target);
    match maps.iter().find(named) {
        Some(m) => target_fs::open_mapped(pid, m, Kind::Elf),
        None => target_fs::open_in_root(pid, path_in_target, Kind::Elf),
    }
}

/// A file the target runs code from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedObject {
    /// Path as the target sees it.
    pub path: String,
    /// The file, opened safely (see [`target_fs`]); `host_path.path()` (or deref) is a path
    /// that reopens exactly it.
    pub host_path: TargetFile,
}

/// The target's executable, then every file it maps executable code from, in address order,
/// each once. Files that cannot be opened safely are left out (and logged by [`target_fs`]).
pub fn objects(pid: u32) -> Result<Vec<MappedObject>, ProcError> {
    let exe = exe(pid)?;
    let maps = maps(pid)?;
    let mut out: Vec<MappedObject> = Vec::new();
    let mut push = |path: String, file: Result<TargetFile, TargetFsError>| match file {
        Ok(host_path) => out.push(MappedObject { path, host_path }),
        Err(e) if e.is_not_found() => {}
        Err(e) => tracing::debug!("leaving out {path} of process {pid}: {e}"),
    };
    push(exe.clone(), host_path_in(pid, &maps, &exe));
    let mut seen = vec![exe];
    for m in maps.iter().filter(|m| m.executable && m.is_file()) {
        let path = m.path.clone().unwrap_or_default();
        if !seen.contains(&path) {
            seen.push(path.clone());
            push(path, target_fs::open_mapped(pid, m, Kind::Elf));
        }
    }
    Ok(out)
}

/// Opens the file of mapping `m` (see [`target_fs::open_mapped`]).
pub fn mapped_file(pid: u32, m: &Mapping) -> Result<TargetFile, TargetFsError> {
    target_fs::open_mapped(pid, m, Kind::Elf)
}

/// Where the target maps the `len` bytes at `file_offset` of the file it maps as
/// `path_in_target` (a path from its maps), if one mapping holds them all.
pub fn address_of(maps: &[Mapping], path_in_target: &str, file_offset: u64, len: u64) -> Option<u64> {
    maps.iter().find_map(|m| {
        let inside = m.path.as_deref() == Some(path_in_target)
            && file_offset >= m.offset
            && file_offset - m.offset + len <= m.end - m.start;
        inside.then(|| m.start + (file_offset - m.offset))
    })
}

/// The path of a mapped file without the ` (deleted)` the kernel appends once it is unlinked.
pub fn without_deleted(path: &str) -> &str {
    path.strip_suffix(" (deleted)").unwrap_or(path)
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

/// Whether `pid` has a child running its own executable (forked, not exec'd: a prefork
/// server's workers, PostgreSQL's backends). Children as `/proc/PID/task/*/children` lists
/// them; false when that cannot be read.
pub fn forks_workers(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: u32| fs::metadata(format!("/proc/{p}/exe")).ok().map(|m| (m.dev(), m.ino()));
    let Some(own) = id(pid) else { return false };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| {
        let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        children.split_whitespace().filter_map(|c| c.parse().ok()).any(|c| id(c) == Some(own))
    })
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`, `RssAnon`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    Ok(parse_status_kb(&status, field).unwrap_or(0).saturating_mul(1024))
}

/// A number field of `/proc/PID/status` (`Tgid`, `PPid`); `None` when the task is gone.
pub fn status_number(pid: u32, field: &str) -> Option<u32> {
    let status = read(pid, "status").ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok())
}

pub(crate) fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The cgroup v2 `memory.current` of the target, when it has one.
pub fn cgroup_memory_current(pid: u32) -> Option<u64> {
    let cgroup = read(pid, "cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    target_fs::read_beneath("/sys/fs/cgroup", &format!("{rel}/memory.current"), Kind::ProcText).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container's paths, read from the host with its root's prefix, become the paths the
    /// container sees; the host's own root and paths outside the container's root are kept.
    #[test]
    fn container_paths_lose_the_hosts_prefix() {
        let root = "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs";
        assert_eq!(in_root(root, &format!("{root}/usr/lib/libc.so.6")).as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!(in_root(&format!("{root}/"), &format!("{root}/app/a b.so")).as_deref(), Some("/app/a b.so"));
        assert_eq!(in_root(root, &format!("{root}x/lib.so")), None);
        assert_eq!(in_root(root, "/var/lib/kubelet/x.so"), None);
        assert_eq!(in_root("/", "/usr/lib/libc.so.6"), None);
    }

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
        assert_eq!(m.dev, libc::makedev(0xfe, 0x01));
    }

    /// A mapped file is opened by its path while the path names it, else through map_files.
    #[test]
    fn mapped_files_survive_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lib.so");
        fs::write(&path, vec![7u8; 8192]).unwrap();
        let file = fs::File::open(&path).unwrap();
        let len = 8192;
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, std::os::fd::AsRawFd::as_raw_fd(&file), 0)
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let me = std::process::id();
        let find = || maps(me).unwrap().into_iter().find(|m| m.start == addr as u64).unwrap();
        let by_name = mapped_file(me, &find()).unwrap();
        assert_eq!(by_name.shown(), path.to_str().unwrap());
        // Replaced on disk: same name, another inode.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"new").unwrap();
        let m = find();
        assert!(m.path.as_deref().unwrap().ends_with(" (deleted)"), "{m:?}");
        let by_inode = mapped_file(me, &m).unwrap();
        assert_eq!(by_inode, by_name);
        assert_eq!(fs::read(&*by_inode).unwrap(), vec![7u8; 8192]);
        assert_eq!(host_path(me, m.path.as_deref().unwrap()).unwrap(), by_inode);
        unsafe { libc::munmap(addr, len) };
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
