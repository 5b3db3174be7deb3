//! Opening files a target controls, without leaving its root and without blocking.
//!
//! Every path that comes from a traced process (its mapped libraries, its executable, its
//! perf map, debug files, cgroup files) is hostile: inside a container, `/tmp/perf-PID.map`
//! may be an absolute symlink that the host would resolve on its own side (a host-only file
//! ends up in a report), a FIFO that never delivers (an `open` or `read` that blocks forever),
//! or a 2 GiB sparse file (read whole, the agent's memory follows). So:
//!
//! - paths are resolved relative to an `O_PATH` descriptor of `/proc/PID/root` with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: `/` and `..` stop at the target's
//!   root, absolute symlinks resolve inside it, and `/proc/*/root`-style magic links are
//!   refused (kernel 5.6+);
//! - the path is first opened `O_PATH` (nothing is opened on a FIFO or device, no open request
//!   reaches a FUSE server), and only a regular file, not on FUSE, within the size cap of its
//!   [`Kind`], is reopened for reading (`O_NONBLOCK`, through `/proc/self/fd/N`);
//! - each refusal is counted by kind and reason ([`refusals`], shown in `/metrics`, the
//!   agent's status and `record`'s report) and logged (the first of each kind and reason as a
//!   warning, later ones at debug level, so a hostile target cannot flood the log).
//!
//! The result, [`TargetFile`], keeps the descriptor open and offers [`TargetFile::path`],
//! `/proc/self/fd/N`: code that wants a path (blazesym, aya's uprobe attach, ELF parsers)
//! reopens exactly this file, never the target's path again.
//!
//! Files the target maps are matched by device and inode ([`open_mapped`]): when the path no
//! longer names the mapped file (deleted, upgraded, or swapped for a symlink after mapping),
//! the mapped inode itself is opened through `/proc/PID/map_files/START-END`.
use std::{
    time::Duration,
    ffi::CString,
    fmt,
    fs::File,
    io::{self, Read as _},
    ops::Deref,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crate::procfs::{self, Mapping};

/// What a file is for: each kind has its own size cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An executable or library (mapped by the parsers, not read whole).
    Elf,
    /// A separate debug-info file (`.debug`, build-id tree).
    DebugFile,
    /// `/tmp/perf-PID.map`: read incrementally; the cap is on the bytes read in total.
    PerfMap,
    /// Text from `/proc` or `/sys/fs/cgroup` about the target.
    ProcText,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Elf, Kind::DebugFile, Kind::PerfMap, Kind::ProcText];

    /// The largest file of this kind that is opened (for perf maps: that is read).
    pub const fn cap(self) -> u64 {
        match self {
            Kind::Elf => 1 << 30,
            Kind::DebugFile => 2 << 30,
            Kind::PerfMap => 64 << 20,
            Kind::ProcText => 16 << 20,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kind::Elf => "elf",
            Kind::DebugFile => "debug_file",
            Kind::PerfMap => "perf_map",
            Kind::ProcText => "proc_text",
        }
    }
}

/// Why a file was not opened (or not read to its end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A FIFO, socket, device or directory.
    NotRegular,
    /// Larger than [`Kind::cap`].
    TooLarge,
    /// The path went through a magic link (`/proc/self/root`, `/proc/PID/fd/N`).
    MagicLink,
    /// On a FUSE file system: a read may never return.
    Fuse,
    /// The path names another file than the one the target maps.
    OtherInode,
    /// Opening it did not finish within [`OPEN_DEADLINE`] (a FUSE server that never answers
    /// the path's lookup or attributes).
    Hung,
}

impl Reason {
    pub const ALL: [Reason; 6] =
        [Reason::NotRegular, Reason::TooLarge, Reason::MagicLink, Reason::Fuse, Reason::OtherInode, Reason::Hung];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotRegular => "not_regular",
            Reason::TooLarge => "too_large",
            Reason::MagicLink => "magic_link",
            Reason::Fuse => "fuse",
            Reason::OtherInode => "other_inode",
            Reason::Hung => "hung",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetFsError {
    #[error("cannot open {path} in the root of process {pid}: {source}")]
    Open { pid: u32, path: String, source: io::Error },
    #[error("refused {path} ({kind}): {why}", kind = kind.name(), why = describe(*reason, *kind))]
    Refused { path: String, kind: Kind, reason: Reason },
}

impl TargetFsError {
    /// The process (or the file) does not exist: not worth a log line.
    pub fn is_not_found(&self) -> bool {
        matches!(self, TargetFsError::Open { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)))
    }
}

/// For callers with `io::Error` in their own error types: the OS error of a failed open, or
/// the refusal as text.
impl From<TargetFsError> for io::Error {
    fn from(e: TargetFsError) -> io::Error {
        match e {
            TargetFsError::Open { source, .. } => source,
            refused => io::Error::other(refused.to_string()),
        }
    }
}

fn describe(reason: Reason, kind: Kind) -> String {
    match reason {
        Reason::NotRegular => "not a regular file".into(),
        Reason::TooLarge => format!("larger than the {} MiB cap", kind.cap() >> 20),
        Reason::MagicLink => "the path goes through a /proc magic link".into(),
        Reason::Fuse => "on a FUSE file system (reads may never return)".into(),
        Reason::OtherInode => "the path no longer names the mapped file".into(),
        Reason::Hung => format!("opening it did not finish within {} s", OPEN_DEADLINE.as_secs()),
    }
}

static REFUSED: [[AtomicU64; Reason::ALL.len()]; Kind::ALL.len()] =
    [const { [const { AtomicU64::new(0) }; Reason::ALL.len()] }; Kind::ALL.len()];
static SYMLINKS: AtomicU64 = AtomicU64::new(0);

/// Counts and logs a refusal; also for callers that refuse on their own (a perf map read up
/// to its cap).
pub fn refuse(path: &str, kind: Kind, reason: Reason) -> TargetFsError {
    let before = REFUSED[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    let err = TargetFsError::Refused { path: path.to_string(), kind, reason };
    if before == 0 {
        tracing::warn!("{err} (further refusals of this kind are logged at debug level)");
    } else {
        tracing::debug!("{err}");
    }
    err
}

/// Refusals so far, by kind and reason, non-zero ones only: `(kind, reason, count)`.
pub fn refusals() -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for reason in Reason::ALL {
            let n = REFUSED[kind as usize][reason as usize].load(Ordering::Relaxed);
            if n > 0 {
                out.push((kind.name(), reason.name(), n));
            }
        }
    }
    out
}

/// Refusals and symlinks as JSON: `{"refused": {"perf_map": {"not_regular": 1}}, "symlinks_in_root": 0}`.
pub fn report() -> serde_json::Value {
    let mut refused = serde_json::Map::new();
    for (kind, reason, n) in refusals() {
        let entry = refused.entry(kind).or_insert_with(|| serde_json::json!({}));
        entry[reason] = n.into();
    }
    serde_json::json!({ "refused": refused, "symlinks_in_root": symlinks_in_root() })
}

/// Symlinks met inside targets' roots (resolved there, not on the host). Paths from
/// `/proc/PID/maps` are canonical: a symlink on one is the target's doing.
pub fn symlinks_in_root() -> u64 {
    SYMLINKS.load(Ordering::Relaxed)
}

/// An open regular file of a target, checked against its kind's cap. Cheap to clone (shared).
#[derive(Clone)]
pub struct TargetFile(Arc<Inner>);

struct Inner {
    file: File,
    fd_path: PathBuf,
    len: u64,
    dev: u64,
    ino: u64,
    /// The path as the target sees it, for messages.
    shown: String,
}

impl TargetFile {
    pub fn file(&self) -> &File {
        &self.0.file
    }

    /// `/proc/self/fd/N`: opening it opens this same file, valid while `self` lives.
    pub fn path(&self) -> &Path {
        &self.0.fd_path
    }

    /// Size when opened.
    pub fn len(&self) -> u64 {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// `(st_dev, st_ino)`.
    pub fn identity(&self) -> (u64, u64) {
        (self.0.dev, self.0.ino)
    }

    /// The path as the target sees it.
    pub fn shown(&self) -> &str {
        &self.0.shown
    }

    /// The whole file (already checked to be within the cap of its kind), read with
    /// positional reads: at most `len` bytes even if it grew since.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.0.len as usize);
        (&self.0.file).take(self.0.len).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// Files up to this size are read into memory by [`TargetFile::bytes`]; larger ones mapped.
pub const READ_WHOLE_MAX: u64 = 64 << 20;

/// The contents of a file for a parser: read into memory, or mapped when large.
pub enum FileBytes {
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Read(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

impl TargetFile {
    /// The whole file for parsing. Up to [`READ_WHOLE_MAX`] it is read into memory: a target
    /// that truncates its own file meanwhile cannot make the agent fault (SIGBUS), as it
    /// could with a mapping; larger files (within the cap of their kind) are mapped.
    pub fn bytes(&self) -> io::Result<FileBytes> {
        if self.len() <= READ_WHOLE_MAX {
            return self.read_all().map(FileBytes::Read);
        }
        // SAFETY: a read-only private map; a concurrent truncation's SIGBUS is answered with
        // zeros by `crate::truncation_guard`.
        unsafe { memmap2::Mmap::map(self.file()) }.map(FileBytes::Mapped)
    }
}

impl Deref for TargetFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.path()
    }
}

impl AsRef<Path> for TargetFile {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl fmt::Debug for TargetFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0.shown, self.0.fd_path.display())
    }
}

impl PartialEq for TargetFile {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}
impl Eq for TargetFile {}

fn openat2(dir: RawFd, path: &Path, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: valid C string and open_how, size passed as the kernel expects.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir, c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Checks an `O_PATH` descriptor and reopens it for reading.
fn checked(opath: OwnedFd, shown: &str, kind: Kind, expect: Option<(u64, u64)>) -> Result<TargetFile, TargetFsError> {
    let open_err = |source| TargetFsError::Open { pid: 0, path: shown.to_string(), source };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and stat buffer.
    if unsafe { libc::fstat(opath.as_raw_fd(), &mut st) } != 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(refuse(shown, kind, Reason::NotRegular));
    }
    if let Some(identity) = expect {
        if identity != (st.st_dev, st.st_ino) {
            return Err(refuse(shown, kind, Reason::OtherInode));
        }
    }
    // Perf maps are read up to the cap, not refused for being larger.
    if kind != Kind::PerfMap && st.st_size as u64 > kind.cap() {
        return Err(refuse(shown, kind, Reason::TooLarge));
    }
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(opath.as_raw_fd(), &mut sfs) } == 0 && sfs.f_type as i64 == FUSE_SUPER_MAGIC {
        return Err(refuse(shown, kind, Reason::Fuse));
    }
    let reopen = PathBuf::from(format!("/proc/self/fd/{}", opath.as_raw_fd()));
    let fd = openat2(libc::AT_FDCWD, &reopen, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0).map_err(open_err)?;
    let file = File::from(fd);
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(TargetFile(Arc::new(Inner { file, fd_path, len: st.st_size as u64, dev: st.st_dev, ino: st.st_ino, shown: shown.to_string() })))
}

/// An `O_PATH` descriptor of the root directory of process `pid` (its container's `/`).
pub fn root(pid: u32) -> io::Result<OwnedFd> {
    openat2(libc::AT_FDCWD, Path::new(&format!("/proc/{pid}/root")), libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Longest an open of a target's file may take. The lookup of a path, and the attributes the
/// checks read, go to the file system: one served by a FUSE server that never answers (which
/// a container can mount in its own namespaces) would block the opening thread until the
/// server dies. Opens run on a worker (`target_mem::with_deadline`, which also caps the workers
/// left blocked); past the deadline the file is refused as `hung`.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(2);

fn bounded<T: Send + 'static>(
    shown: &str,
    kind: Kind,
    open: impl FnOnce() -> Result<T, TargetFsError> + Send + 'static,
) -> Result<T, TargetFsError> {
    match crate::target_mem::with_deadline("opening a target's file", OPEN_DEADLINE, move || Ok(open())) {
        Ok(result) => result,
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
            Err(refuse(shown, kind, Reason::Hung))
        }
        Err(source) => Err(TargetFsError::Open { pid: 0, path: shown.to_string(), source }),
    }
}

/// Whether `path_in_target` exists in the root of `pid` (its last component not followed),
/// within [`OPEN_DEADLINE`].
pub fn exists_in_root(pid: u32, path_in_target: &str) -> bool {
    let path = format!("/proc/{pid}/root/{}", path_in_target.trim_start_matches('/'));
    bounded(path_in_target, Kind::ProcText, move || Ok(std::fs::symlink_metadata(&path).is_ok())).unwrap_or(false)
}

/// Opens `path_in_target` (absolute or not, as the target would) inside the root of `pid`.
pub fn open_in_root(pid: u32, path_in_target: &str, kind: Kind) -> Result<TargetFile, TargetFsError> {
    let path = path_in_target.to_string();
    bounded(path_in_target, kind, move || open_in_root_now(pid, &path, kind))
}

fn open_in_root_now(pid: u32, path_in_target: &str, kind: Kind) -> Result<TargetFile, TargetFsError> {
    let open_err = |source| TargetFsError::Open { pid, path: path_in_target.to_string(), source };
    let root = root(pid).map_err(open_err)?;
    open_beneath_now(&root, path_in_target, kind, None).map_err(|e| match e {
        TargetFsError::Open { path, source, .. } => TargetFsError::Open { pid, path, source },
        e => e,
    })
}

/// Opens `path` inside the directory `dir` as if `dir` were `/` (`RESOLVE_IN_ROOT`), checked
/// for `kind`, and when `expect` is given, only if it is that `(dev, inode)`; within
/// [`OPEN_DEADLINE`].
pub fn open_beneath(dir: &OwnedFd, path: &str, kind: Kind, expect: Option<(u64, u64)>) -> Result<TargetFile, TargetFsError> {
    let dir = dir.try_clone().map_err(|source| TargetFsError::Open { pid: 0, path: path.to_string(), source })?;
    let owned = path.to_string();
    bounded(path, kind, move || open_beneath_now(&dir, &owned, kind, expect))
}

fn open_beneath_now(dir: &OwnedFd, path: &str, kind: Kind, expect: Option<(u64, u64)>) -> Result<TargetFile, TargetFsError> {
    let open_err = |source| TargetFsError::Open { pid: 0, path: path.to_string(), source };
    let strict = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let opath = match openat2(dir.as_raw_fd(), Path::new(path), libc::O_PATH, strict | libc::RESOLVE_NO_SYMLINKS) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            // A symlink somewhere on the path: resolved inside the root, magic links refused.
            SYMLINKS.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path, "symlink in a target's path, resolved inside its root");
            match openat2(dir.as_raw_fd(), Path::new(path), libc::O_PATH, strict) {
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(refuse(path, kind, Reason::MagicLink)),
                r => r.map_err(open_err)?,
            }
        }
        r => r.map_err(open_err)?,
    };
    checked(opath, path, kind, expect)
}

/// Opens a host path that is already trusted to be safe to resolve (a `/proc/self/fd/N` of
/// a [`TargetFile`], a file named on the command line), with the same checks: regular file,
/// within the cap, not on FUSE.
pub fn open_checked(path: &Path, kind: Kind) -> Result<TargetFile, TargetFsError> {
    let shown = path.display().to_string();
    let opath = openat2(libc::AT_FDCWD, path, libc::O_PATH, 0)
        .map_err(|source| TargetFsError::Open { pid: 0, path: shown.clone(), source })?;
    checked(opath, &shown, kind, None)
}

/// Opens the file that mapping `m` of process `pid` maps: by its path inside the target's
/// root while that path names the mapped inode, else the inode itself through
/// `/proc/PID/map_files/START-END`. Never a file the target does not map.
pub fn open_mapped(pid: u32, m: &Mapping, kind: Kind) -> Result<TargetFile, TargetFsError> {
    let path = procfs::without_deleted(m.path.as_deref().unwrap_or_default()).to_string();
    let (m, shown) = (m.clone(), path.clone());
    bounded(&shown, kind, move || open_mapped_now(pid, &m, &path, kind))
}

fn open_mapped_now(pid: u32, m: &Mapping, path: &str, kind: Kind) -> Result<TargetFile, TargetFsError> {
    let identity = Some((m.dev, m.inode));
    let by_root = root(pid)
        .map_err(|source| TargetFsError::Open { pid, path: path.to_string(), source })
        .and_then(|root| open_beneath_now(&root, path, kind, identity));
    match by_root {
        Ok(f) => Ok(f),
        // The mapped inode itself is too large or on FUSE: by inode would be refused too.
        Err(TargetFsError::Refused { reason: Reason::TooLarge | Reason::Fuse, .. }) => by_root,
        Err(_) => {
            let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
            let opath = openat2(libc::AT_FDCWD, &by_inode, libc::O_PATH, 0)
                .map_err(|source| TargetFsError::Open { pid, path: path.to_string(), source })?;
            checked(opath, path, kind, identity)
        }
    }
}

/// Reads a text file of the host about a target (under `/proc` or `/sys/fs/cgroup`, the path
/// below `base` coming from the target's `/proc/PID/cgroup`), resolved beneath `base` and
/// capped at [`Kind::ProcText`].
pub fn read_beneath(base: &str, rel: &str, kind: Kind) -> Result<String, TargetFsError> {
    let open_err = |source| TargetFsError::Open { pid: 0, path: format!("{base}/{rel}"), source };
    let dir = openat2(libc::AT_FDCWD, Path::new(base), libc::O_PATH | libc::O_DIRECTORY, 0).map_err(open_err)?;
    let rel = rel.trim_start_matches('/');
    let opath = openat2(dir.as_raw_fd(), Path::new(rel), libc::O_PATH, libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS)
        .map_err(open_err)?;
    let file = checked(opath, rel, kind, None)?;
    read_text(file.file(), kind).map_err(open_err)
}

/// Reads a `/proc` text file (its size shows as 0: read up to the cap of `kind`; reaching
/// the cap is counted as a refusal of the rest, and the incomplete last line dropped). Bytes
/// that are not UTF-8 become U+FFFD.
pub fn read_text(file: &File, kind: Kind) -> io::Result<String> {
    let mut bytes = Vec::new();
    file.take(kind.cap()).read_to_end(&mut bytes)?;
    if bytes.len() as u64 >= kind.cap() {
        refuse("(a /proc file)", kind, Reason::TooLarge);
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(complete);
    }
    // A target can name its files with any bytes: never fail on them (a path that is not
    // UTF-8 is then opened by inode, see `open_mapped`).
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir_fd(p: &Path) -> OwnedFd {
        openat2(libc::AT_FDCWD, p, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap()
    }

    /// Absolute symlinks and `..` stay inside the root; FIFOs, devices and oversize files are
    /// refused (and counted) without blocking; magic links are refused.
    #[test]
    fn paths_stay_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "host only").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        std::fs::write(root.path().join("tmp/ok"), "1000 10 f\n").unwrap();
        symlink(&secret, root.path().join("tmp/abs")).unwrap();
        symlink("../../../../../../../..".to_string() + secret.to_str().unwrap(), root.path().join("tmp/rel")).unwrap();
        symlink("/tmp/ok", root.path().join("tmp/inside")).unwrap();
        symlink("/proc/self/root".to_string() + secret.to_str().unwrap(), root.path().join("tmp/magic")).unwrap();
        let fifo = CString::new(root.path().join("tmp/fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let big = File::create(root.path().join("tmp/big")).unwrap();
        big.set_len(Kind::ProcText.cap() + 1).unwrap();
        let dir = dir_fd(root.path());

        let ok = open_beneath(&dir, "/tmp/ok", Kind::PerfMap, None).unwrap();
        assert_eq!(ok.read_all().unwrap(), b"1000 10 f\n");
        assert_eq!(std::fs::read(ok.path()).unwrap(), b"1000 10 f\n", "the fd path reopens the same file");
        let links = symlinks_in_root();
        assert_eq!(open_beneath(&dir, "/tmp/inside", Kind::PerfMap, None).unwrap().read_all().unwrap(), b"1000 10 f\n");
        assert!(symlinks_in_root() > links);
        for escape in ["/tmp/abs", "/tmp/rel", "/../../tmp/abs"] {
            match open_beneath(&dir, escape, Kind::PerfMap, None) {
                Err(e) => assert!(e.is_not_found(), "{escape}: {e}"),
                Ok(f) => panic!("{escape} escaped to {:?}", f.read_all()),
            }
        }
        // `..` above the root is the root itself: a directory.
        assert!(matches!(open_beneath(&dir, "../../..", Kind::PerfMap, None), Err(TargetFsError::Refused { reason: Reason::NotRegular, .. })));
        let count = |k: Kind, r: Reason| REFUSED[k as usize][r as usize].load(Ordering::Relaxed);
        let before = count(Kind::PerfMap, Reason::NotRegular);
        assert!(matches!(open_beneath(&dir, "/tmp/fifo", Kind::PerfMap, None), Err(TargetFsError::Refused { reason: Reason::NotRegular, .. })));
        assert!(matches!(open_beneath(&dir, "/tmp", Kind::PerfMap, None), Err(TargetFsError::Refused { reason: Reason::NotRegular, .. })));
        assert!(count(Kind::PerfMap, Reason::NotRegular) >= before + 2);
        assert!(matches!(open_beneath(&dir, "/tmp/big", Kind::ProcText, None), Err(TargetFsError::Refused { reason: Reason::TooLarge, .. })));
        assert!(open_beneath(&dir, "/tmp/big", Kind::PerfMap, None).is_ok(), "perf maps are capped when read");
        assert!(open_beneath(&dir, "/tmp/magic", Kind::Elf, None).unwrap_err().is_not_found(), "no /proc in this root");
        let host_root = dir_fd(Path::new("/"));
        let magic = format!("/proc/self/root{}", secret.display());
        assert!(matches!(open_beneath(&host_root, &magic, Kind::Elf, None), Err(TargetFsError::Refused { reason: Reason::MagicLink, .. })));
        assert!(matches!(open_checked(Path::new("/dev/null"), Kind::Elf), Err(TargetFsError::Refused { reason: Reason::NotRegular, .. })));
        assert!(report()["refused"]["perf_map"]["not_regular"].as_u64().unwrap() >= 2);
    }

    /// A mapped file opens by path while the path names it, and by inode once it was swapped
    /// for a symlink to another file.
    #[test]
    fn mapped_files_are_matched_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lib.so");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"not the mapped file").unwrap();
        let file = File::open(&path).unwrap();
        let len = 8192;
        // SAFETY: a fresh read-only mapping, unmapped at the end.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        assert_ne!(addr, libc::MAP_FAILED);
        let me = std::process::id();
        let find = || procfs::maps(me).unwrap().into_iter().find(|m| m.start == addr as u64).unwrap();
        let by_path = open_mapped(me, &find(), Kind::Elf).unwrap();
        assert_eq!(by_path.read_all().unwrap(), vec![7u8; 8192]);
        std::fs::remove_file(&path).unwrap();
        symlink(&other, &path).unwrap();
        let swapped = open_mapped(me, &find(), Kind::Elf).unwrap();
        assert_eq!(swapped.read_all().unwrap(), vec![7u8; 8192]);
        assert_eq!(swapped, by_path);
        unsafe { libc::munmap(addr, len) };
    }
}
