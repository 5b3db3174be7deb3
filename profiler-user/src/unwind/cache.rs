//! Unwind tables by file, compiled once per process of the agent: every target mapping the same
//! libc shares one table. Entries are weak: a table lives while a target uses it, so the cache
//! is bounded by what the traced processes map.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use super::table::{self, Table, TableError};

/// A file as the host knows it: device and inode (from `/proc/PID/maps`).
pub type FileKey = (u64, u64);

fn tables() -> &'static Mutex<HashMap<FileKey, Weak<Table>>> {
    static TABLES: OnceLock<Mutex<HashMap<FileKey, Weak<Table>>>> = OnceLock::new();
    TABLES.get_or_init(Default::default)
}

/// The table of file `key` if a target holds it now.
pub fn cached(key: FileKey) -> Option<Arc<Table>> {
    tables().lock().unwrap().get(&key).and_then(Weak::upgrade)
}

/// The table of file `key`, compiled from `path` (a host path) when no target holds it yet.
/// `debug_file` finds a separate debug file by build id.
pub fn get(
    key: FileKey,
    path: &Path,
    debug_file: super::table::DebugFileFinder<'_>,
) -> Result<Arc<Table>, TableError> {
    if let Some(t) = cached(key) {
        return Ok(t);
    }
    // Compiled outside the lock: another target's attach must not wait for this file.
    let t = Arc::new(table::compile(path, Some(debug_file))?);
    let mut all = tables().lock().unwrap();
    all.retain(|_, w| w.strong_count() > 0);
    if let Some(first) = all.get(&key).and_then(Weak::upgrade) {
        return Ok(first);
    }
    all.insert(key, Arc::downgrade(&t));
    Ok(t)
}
