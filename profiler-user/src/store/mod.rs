//! The snapshot store: heap profiles kept on disk under the agent's data directory
//! (`--data-dir`, default [`DEFAULT_DATA_DIR`]), so they survive an agent restart.
//!
//! What it owns:
//! - the directory (created 0700) and an exclusive `flock` on `.lock` in it, so two agents
//!   never share one store; a held lock is waited for up to [`LOCK_WAIT`] (an agent killed
//!   with SIGKILL keeps it until the kernel has finished its exit: closing its BPF links and
//!   maps can take a while), then refused;
//! - one gzip JSON file per snapshot, written crash-safely (temp file, fsync, rename, fsync of
//!   the directory; see [`file`](self::file));
//! - the in-memory index of metadata, rebuilt from the directory by [`SnapshotStore::open`]:
//!   stray temp files left by a crash are reported and removed, unreadable files reported and
//!   skipped (left in place for a human to look at);
//! - ids ([`SnapshotId`]): generated here, and validated before any path is built from an id
//!   that comes from outside;
//! - retention by count and by bytes ([`Retention`]), oldest removed first.
//!
//! Limits: all calls do blocking file I/O (callers in async code use `spawn_blocking`);
//! profiles are read whole into memory; the store trusts its own directory (mode 0700).
use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder, File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::DirBuilderExt, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::aggregate::HeapProfile;

#[cfg(test)]
mod crash_tests;
mod file;
pub mod id;
pub mod retention;

pub use id::SnapshotId;
pub use retention::Retention;

/// Where the agent keeps snapshots unless `--data-dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/memscope";

/// What the store knows about one snapshot without reading its profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    /// Pid of the traced process.
    pub pid: u32,
    /// Its executable name (`/proc/PID/comm`) when the snapshot was taken.
    pub comm: String,
    /// Why it was taken: `api`, later `interval`, `gc`, ...
    pub reason: String,
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub taken_at_ms: u64,
    /// Size of the file on disk (compressed).
    #[serde(default)]
    pub size_bytes: u64,
    /// The workload it belongs to (`/v1/workloads/{id}/snapshots`), when taken of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid snapshot id: expected YYYYMMDDTHHMMSSZ-PID-SEQ")]
    InvalidId,
    #[error("no snapshot {0}")]
    NotFound(String),
    #[error("invalid snapshot reason {0:?}: use 1-32 of a-z, 0-9, '-' and '_'")]
    InvalidReason(String),
    #[error("data directory {0} is in use by another memscope agent")]
    Locked(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding snapshot: {0}")]
    Encode(String),
    #[error("snapshot {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

impl StoreError {
    /// The file system is full (or the quota reached).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge))
    }

    /// The data directory cannot be written: read-only file system or permissions.
    pub fn is_read_only(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if matches!(source.kind(), io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied))
    }
}

/// What [`SnapshotStore::open`] found in the directory.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Snapshots indexed.
    pub loaded: usize,
    /// Temp files left by an interrupted write; ignored and removed.
    pub stray_temp_files: Vec<PathBuf>,
    /// Files that look like snapshots but could not be read; ignored, left in place.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Snapshots removed because the retention limits are smaller than what was on disk.
    pub removed_by_retention: Vec<String>,
}

/// The result of [`SnapshotStore::put`].
#[derive(Debug)]
pub struct Stored {
    pub meta: SnapshotMeta,
    /// Ids of older snapshots removed to stay within the retention limits.
    pub removed: Vec<String>,
}

struct Entry {
    id: SnapshotId,
    meta: SnapshotMeta,
}

#[derive(Default)]
struct Index {
    /// By sequence number: oldest first.
    entries: BTreeMap<u64, Entry>,
    total_bytes: u64,
    next_seq: u64,
}

/// Snapshots on disk. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct SnapshotStore {
    dir: PathBuf,
    retention: Retention,
    index: Mutex<Index>,
    _lock: File,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore").field("dir", &self.dir).field("retention", &self.retention).finish()
    }
}

/// Longest [`SnapshotStore::open`] waits for another process's lock on the directory.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl SnapshotStore {
    /// Opens (creating if needed) the store in `dir` and rebuilds the index from its files;
    /// waits up to [`LOCK_WAIT`] for a previous agent to let go of the directory.
    pub fn open(dir: &Path, retention: Retention) -> Result<(SnapshotStore, OpenReport), StoreError> {
        SnapshotStore::open_waiting(dir, retention, LOCK_WAIT)
    }

    /// [`SnapshotStore::open`], waiting at most `lock_wait` for the directory's lock.
    pub fn open_waiting(
        dir: &Path,
        retention: Retention,
        lock_wait: std::time::Duration,
    ) -> Result<(SnapshotStore, OpenReport), StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Io { what: "creating data directory", path: dir.to_owned(), source })?;
        let lock_path = dir.join(".lock");
        // Created if missing, then held read-only: flock needs no write access, and no file
        // open for writing keeps the file system from going read-only under us.
        let lock = match File::open(&lock_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .and_then(|_| File::open(&lock_path)),
            r => r,
        }
        .map_err(|source| StoreError::Io { what: "opening", path: lock_path.clone(), source })?;
        // Polled, not a blocking flock: every wait has a deadline.
        let deadline = std::time::Instant::now() + lock_wait;
        let mut said = false;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Io { what: "locking", path: lock_path, source: err });
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Locked(dir.to_owned()));
            }
            if !said {
                tracing::warn!(dir = %dir.display(), "data directory locked by another process (a previous agent still exiting?); waiting up to {lock_wait:?}");
                said = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }

        let mut report = OpenReport::default();
        let mut index = Index::default();
        let mut max_seq = 0u64;
        let read_dir = fs::read_dir(dir)
            .map_err(|source| StoreError::Io { what: "reading data directory", path: dir.to_owned(), source })?;
        for entry in read_dir {
            let entry = entry
                .map_err(|source| StoreError::Io { what: "reading data directory", path: dir.to_owned(), source })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with(file::TEMP_PREFIX) {
                warn!(path = %path.display(), "removing a snapshot temp file left by an interrupted write");
                let _ = fs::remove_file(&path);
                report.stray_temp_files.push(path);
                continue;
            }
            let Some(stem) = name.strip_suffix(file::SUFFIX) else { continue };
            let id = match SnapshotId::parse(stem) {
                Ok(id) => id,
                Err(_) => {
                    report.unreadable.push((path, "not a snapshot file name".into()));
                    continue;
                }
            };
            max_seq = max_seq.max(id.seq());
            match file::read_meta(&path) {
                Ok(meta) if meta.id == id.as_str() => {
                    index.total_bytes += meta.size_bytes;
                    index.entries.insert(id.seq(), Entry { id, meta });
                }
                Ok(_) => report.unreadable.push((path, "metadata names another snapshot".into())),
                Err(reason) => report.unreadable.push((path, reason)),
            }
        }
        for (path, reason) in &report.unreadable {
            warn!(path = %path.display(), %reason, "ignoring an unreadable snapshot file");
        }
        index.next_seq = max_seq + 1;
        let store = SnapshotStore { dir: dir.to_owned(), retention, index: Mutex::new(index), _lock: lock };
        {
            let mut index = store.index.lock().unwrap();
            report.removed_by_retention = store.enforce(&mut index);
            report.loaded = index.entries.len();
        }
        Ok((store, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Stores a snapshot and returns its metadata (with the new id), then applies retention.
    pub fn put(&self, profile: &HeapProfile, comm: &str, reason: &str) -> Result<Stored, StoreError> {
        self.put_for(profile, comm, reason, None)
    }

    /// [`SnapshotStore::put`], of the workload `workload`.
    pub fn put_for(
        &self,
        profile: &HeapProfile,
        comm: &str,
        reason: &str,
        workload: Option<&str>,
    ) -> Result<Stored, StoreError> {
        let reason_ok = !reason.is_empty()
            && reason.len() <= 32
            && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !reason_ok {
            return Err(StoreError::InvalidReason(reason.to_owned()));
        }
        let seq = {
            let mut index = self.index.lock().unwrap();
            let seq = index.next_seq;
            index.next_seq += 1;
            seq
        };
        let taken_at_ms = if profile.taken_at_ms > 0 { profile.taken_at_ms } else { now_ms() };
        let id = SnapshotId::generate(taken_at_ms, profile.pid, seq);
        let mut meta = SnapshotMeta {
            id: id.as_str().to_owned(),
            pid: profile.pid,
            comm: comm.to_owned(),
            reason: reason.to_owned(),
            taken_at_ms,
            size_bytes: 0,
            workload: workload.map(str::to_owned),
        };
        meta.size_bytes = file::write_atomic(&self.dir, &id.file_name(), &meta, profile)?;
        let mut index = self.index.lock().unwrap();
        index.total_bytes += meta.size_bytes;
        index.entries.insert(seq, Entry { id, meta: meta.clone() });
        let removed = self.enforce(&mut index);
        Ok(Stored { meta, removed })
    }

    /// Metadata of every snapshot, oldest first.
    pub fn list(&self) -> Vec<SnapshotMeta> {
        self.index.lock().unwrap().entries.values().map(|e| e.meta.clone()).collect()
    }

    pub fn meta(&self, id: &SnapshotId) -> Option<SnapshotMeta> {
        let index = self.index.lock().unwrap();
        index.entries.get(&id.seq()).filter(|e| e.id == *id).map(|e| e.meta.clone())
    }

    /// Number of snapshots and their total size on disk.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.index.lock().unwrap();
        (index.entries.len(), index.total_bytes)
    }

    /// Reads a whole snapshot.
    pub fn get(&self, id: &SnapshotId) -> Result<(SnapshotMeta, HeapProfile), StoreError> {
        let meta = self.meta(id).ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let path = self.dir.join(id.file_name());
        match file::read_profile(&path) {
            Ok(profile) => Ok((meta, profile)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound(id.to_string())),
            Err(e) => Err(StoreError::Corrupt { id: id.to_string(), reason: e.to_string() }),
        }
    }

    /// Removes a snapshot.
    pub fn delete(&self, id: &SnapshotId) -> Result<SnapshotMeta, StoreError> {
        let mut index = self.index.lock().unwrap();
        match index.entries.get(&id.seq()) {
            Some(e) if e.id == *id => {}
            _ => return Err(StoreError::NotFound(id.to_string())),
        }
        let entry = index.entries.remove(&id.seq()).expect("checked above");
        index.total_bytes -= entry.meta.size_bytes;
        let path = self.dir.join(id.file_name());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                // Keep the index truthful: the file is still there.
                index.total_bytes += entry.meta.size_bytes;
                index.entries.insert(id.seq(), entry);
                return Err(StoreError::Io { what: "removing", path, source });
            }
        }
        file::sync_dir(&self.dir)?;
        Ok(entry.meta)
    }

    /// Removes the oldest snapshots until the index is within the retention limits.
    fn enforce(&self, index: &mut Index) -> Vec<String> {
        let sizes: Vec<(u64, u64)> = index.entries.iter().map(|(&seq, e)| (seq, e.meta.size_bytes)).collect();
        let mut removed = Vec::new();
        for seq in retention::victims(self.retention, &sizes) {
            let Some(entry) = index.entries.remove(&seq) else { continue };
            index.total_bytes -= entry.meta.size_bytes;
            let path = self.dir.join(entry.id.file_name());
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "could not remove a snapshot past retention");
                }
            }
            removed.push(entry.meta.id);
        }
        if !removed.is_empty() {
            if let Err(e) = file::sync_dir(&self.dir) {
                warn!(error = %e, "syncing the data directory after retention");
            }
        }
        removed
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{FrameInfo, StackSample};

    fn profile(pid: u32, stacks: usize) -> HeapProfile {
        HeapProfile {
            pid,
            taken_at_ms: 1_795_536_301_000,
            stacks: (0..stacks)
                .map(|i| StackSample {
                    frames: vec![FrameInfo {
                        function: Some(format!("alloc_site_{i}_{}", "x".repeat(i % 50)).into()),
                        address: 0x1000 + i as u64,
                        ..FrameInfo::default()
                    }
                    .into()],
                    live_bytes: 100 * i as u64,
                    live_allocs: 1,
                    ..StackSample::default()
                })
                .collect(),
            ..HeapProfile::default()
        }
    }

    /// A stored profile reads back equal, with generated id, metadata and size.
    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
        assert_eq!(report.loaded, 0);
        let p = profile(42, 3);
        let stored = store.put(&p, "demo", "api").unwrap();
        assert!(stored.meta.id.starts_with("20261124T160501Z-42-"), "{}", stored.meta.id);
        assert!(stored.meta.size_bytes > 0);
        let id = SnapshotId::parse(&stored.meta.id).unwrap();
        let (meta, back) = store.get(&id).unwrap();
        assert_eq!(back, p);
        assert_eq!(meta, stored.meta);
        assert_eq!(store.list(), vec![stored.meta.clone()]);
        assert_eq!(store.usage(), (1, stored.meta.size_bytes));
        store.delete(&id).unwrap();
        assert!(matches!(store.get(&id), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete(&id), Err(StoreError::NotFound(_))));
        assert_eq!(store.usage(), (0, 0));
        assert!(store.put(&p, "demo", "../x").is_err());
    }

    /// The file is plain gzip JSON that `zcat` can read, and the directory holds nothing else.
    #[test]
    fn file_is_gzip_json() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
        let stored = store.put(&profile(1, 2), "demo", "api").unwrap();
        let path = dir.path().join(format!("{}.json.gz", stored.meta.id));
        let mut json = String::new();
        io::Read::read_to_string(&mut flate2::read::GzDecoder::new(File::open(path).unwrap()), &mut json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["meta"]["comm"], "demo");
        assert_eq!(v["profile"]["pid"], 1);
        let mut names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, vec![".lock".to_string(), format!("{}.json.gz", stored.meta.id)]);
    }

    /// Retention by count removes the oldest snapshots first.
    #[test]
    fn retention_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SnapshotStore::open(dir.path(), Retention { max_count: 3, max_bytes: u64::MAX }).unwrap();
        let ids: Vec<String> = (0..5).map(|_| store.put(&profile(7, 2), "demo", "api").unwrap().meta.id).collect();
        let left: Vec<String> = store.list().into_iter().map(|m| m.id).collect();
        assert_eq!(left, ids[2..].to_vec());
        let files = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref().unwrap().file_name().to_str().unwrap().ends_with(".json.gz")
        });
        assert_eq!(files.count(), 3);
    }

    /// Retention by bytes removes the oldest until the total fits, and keeps the newest.
    #[test]
    fn retention_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let probe_dir = tempfile::tempdir().unwrap();
        let (probe, _) = SnapshotStore::open(probe_dir.path(), Retention::default()).unwrap();
        let one = probe.put(&profile(7, 200), "demo", "api").unwrap().meta.size_bytes;
        // Room for two and a half snapshots of about that size.
        let limit = one * 5 / 2;
        let (store, _) = SnapshotStore::open(dir.path(), Retention { max_count: 100, max_bytes: limit }).unwrap();
        let mut last = String::new();
        for _ in 0..6 {
            let stored = store.put(&profile(7, 200), "demo", "api").unwrap();
            last = stored.meta.id;
        }
        let (count, bytes) = store.usage();
        assert!(bytes <= limit, "{bytes} > {limit}");
        assert_eq!(count, 2);
        assert_eq!(store.list().last().unwrap().id, last);
        // A limit below one snapshot still keeps the newest.
        let dir2 = tempfile::tempdir().unwrap();
        let (tiny, _) = SnapshotStore::open(dir2.path(), Retention { max_count: 100, max_bytes: 1 }).unwrap();
        tiny.put(&profile(7, 2), "demo", "api").unwrap();
        let newest = tiny.put(&profile(7, 2), "demo", "api").unwrap();
        assert_eq!(newest.removed.len(), 1);
        assert_eq!(tiny.list().len(), 1);
    }

    /// Snapshots survive closing and reopening the store; new ids keep growing.
    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let (store, _) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
            store.put(&profile(9, 4), "demo", "api").unwrap();
            store.put(&profile(9, 5), "demo", "gc").unwrap();
            store.list()
        };
        let (store, report) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
        assert_eq!(report.loaded, 2);
        assert!(report.stray_temp_files.is_empty() && report.unreadable.is_empty());
        assert_eq!(store.list(), first);
        let (_, p) = store.get(&SnapshotId::parse(&first[1].id).unwrap()).unwrap();
        assert_eq!(p, profile(9, 5));
        let third = store.put(&profile(9, 1), "demo", "api").unwrap();
        let seq = SnapshotId::parse(&third.meta.id).unwrap().seq();
        assert!(seq > SnapshotId::parse(&first[1].id).unwrap().seq());
        // Reopening with smaller limits applies them.
        drop(store);
        let (store, report) = SnapshotStore::open(dir.path(), Retention { max_count: 1, max_bytes: u64::MAX }).unwrap();
        assert_eq!(report.removed_by_retention, vec![first[0].id.clone(), first[1].id.clone()]);
        assert_eq!(store.list().len(), 1);
    }

    /// A temp file left by a crash is reported and removed; garbage files are reported and
    /// skipped; neither is indexed.
    #[test]
    fn stray_temp_and_garbage_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
            store.put(&profile(3, 2), "demo", "api").unwrap();
        }
        let temp = dir.path().join(".tmp-20261124T160501Z-3-99.json.gz");
        fs::write(&temp, b"half a snapsh").unwrap();
        let garbage = dir.path().join("20261124T160501Z-3-100.json.gz");
        fs::write(&garbage, b"not gzip").unwrap();
        fs::write(dir.path().join("notes.txt"), b"left by a human").unwrap();
        let (store, report) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
        assert_eq!(report.loaded, 1);
        assert_eq!(report.stray_temp_files, vec![temp.clone()]);
        assert!(!temp.exists());
        assert_eq!(report.unreadable.len(), 1);
        assert_eq!(report.unreadable[0].0, garbage);
        assert_eq!(store.list().len(), 1);
        // The next id does not collide with the unreadable file's sequence number.
        let next = store.put(&profile(3, 1), "demo", "api").unwrap();
        assert!(SnapshotId::parse(&next.meta.id).unwrap().seq() > 100);
    }

    /// A second store on the same directory is refused while the first is open (after the
    /// bounded wait), and gets the directory when the first lets go during the wait (an agent
    /// restarted while the killed one is still exiting).
    #[test]
    fn one_agent_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SnapshotStore::open(dir.path(), Retention::default()).unwrap();
        let wait = std::time::Duration::from_millis(200);
        assert!(matches!(SnapshotStore::open_waiting(dir.path(), Retention::default(), wait), Err(StoreError::Locked(_))));
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(store);
        });
        let started = std::time::Instant::now();
        let second = SnapshotStore::open_waiting(dir.path(), Retention::default(), std::time::Duration::from_secs(30));
        assert!(second.is_ok(), "{:?}", second.err());
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        release.join().unwrap();
    }
}
