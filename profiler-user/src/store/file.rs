//! One snapshot on disk: `<id>.json.gz`, a plain gzip file holding one JSON document
//! `{"meta": {...}, "profile": {...}}` (so `zcat` shows it). The metadata is also written,
//! as JSON, into the gzip header's comment field, so the index can be rebuilt at start by
//! reading a few hundred bytes per file instead of decompressing every profile.
//!
//! Writes are crash-safe: a temp file `.tmp-<id>.json.gz` (created exclusively, mode 0600) is
//! written, fsync'd, renamed over the final name, and the directory fsync'd. A crash leaves
//! either the whole snapshot or a temp file, which the store reports and removes at start.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, BufWriter, Read},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use flate2::{read::GzDecoder, Compression, GzBuilder};
use serde::{Deserialize, Serialize};

use super::{SnapshotMeta, StoreError};
use crate::aggregate::HeapProfile;

/// Suffix of a committed snapshot file.
pub(crate) const SUFFIX: &str = ".json.gz";
/// Prefix of a temp file still being written (or left by a crash).
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Longest metadata comment read back from a gzip header.
const MAX_META_BYTES: usize = 16 * 1024;

#[derive(Serialize)]
struct DocOut<'a> {
    meta: &'a SnapshotMeta,
    profile: &'a HeapProfile,
}

#[derive(Deserialize)]
struct DocIn {
    profile: HeapProfile,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_owned(), source }
}

/// Writes `meta` and `profile` atomically as `dir/<id>.json.gz`; returns the final size in
/// bytes. `meta.size_bytes` is not stored (it is read from the file system).
pub(crate) fn write_atomic(
    dir: &Path,
    file_name: &str,
    meta: &SnapshotMeta,
    profile: &HeapProfile,
) -> Result<u64, StoreError> {
    let final_path = dir.join(file_name);
    let temp_path = dir.join(format!("{TEMP_PREFIX}{file_name}"));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
            .map_err(io_err("creating", &temp_path))?;
        let comment = serde_json::to_vec(meta).map_err(|e| StoreError::Encode(e.to_string()))?;
        let mut gz = GzBuilder::new().comment(comment).write(BufWriter::new(file), Compression::new(3));
        serde_json::to_writer(&mut gz, &DocOut { meta, profile }).map_err(|e| match e.io_error_kind() {
            // A write error (disk full, read-only) keeps its kind for the caller.
            Some(kind) => StoreError::Io { what: "writing", path: temp_path.clone(), source: io::Error::new(kind, e) },
            None => StoreError::Encode(e.to_string()),
        })?;
        let buf = gz.finish().map_err(io_err("writing", &temp_path))?;
        let file = buf.into_inner().map_err(|e| StoreError::Io {
            what: "writing",
            path: temp_path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err("syncing", &temp_path))?;
        let size = file.metadata().map_err(io_err("reading metadata of", &temp_path))?.len();
        drop(file);
        fs::rename(&temp_path, &final_path).map_err(io_err("renaming", &temp_path))?;
        sync_dir(dir)?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp_path);
    }
    result
}

/// Makes a rename or unlink in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing directory", dir))
}

/// Reads only the metadata of a snapshot file (from the gzip header), with its size on disk.
pub(crate) fn read_meta(path: &Path) -> Result<SnapshotMeta, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let gz = GzDecoder::new(BufReader::with_capacity(4096, file));
    let header = gz.header().ok_or("not a gzip file, or a truncated header")?;
    let comment = header.comment().ok_or("no metadata in the gzip header")?;
    if comment.len() > MAX_META_BYTES {
        return Err("metadata too large".into());
    }
    let mut meta: SnapshotMeta = serde_json::from_slice(comment).map_err(|e| format!("bad metadata: {e}"))?;
    meta.size_bytes = size;
    Ok(meta)
}

/// Reads and decodes a whole snapshot file.
pub(crate) fn read_profile(path: &Path) -> Result<HeapProfile, io::Error> {
    let file = File::open(path)?;
    let mut gz = GzDecoder::new(BufReader::new(file));
    let mut json = Vec::new();
    gz.read_to_end(&mut json)?;
    let doc: DocIn =
        serde_json::from_slice(&json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(doc.profile)
}
