//! The target's mapped object files, kept open: an address becomes (module, file offset), and
//! the module stays readable through `/proc/self/fd/N` after the target exits, is upgraded on
//! disk, or lives in another mount namespace.
use std::{collections::HashMap, path::PathBuf, sync::Arc};

use crate::{
    process::Process,
    procfs::{self, Mapping},
    target_fs::{self, Kind, TargetFile},
};

pub struct Module {
    /// Path as the target sees it.
    pub path: String,
    _file: TargetFile,
    /// Path this process reads it through (`/proc/self/fd/N`).
    pub open_path: PathBuf,
}

#[derive(Default)]
pub struct Modules {
    pid: u32,
    /// When known: maps and files are only taken while the pid still names it.
    process: Option<Arc<Process>>,
    maps: Vec<Mapping>,
    open: HashMap<String, Module>,
}

/// Where an address falls.
pub enum Place<'a> {
    File { module: &'a Module, file_offset: u64 },
    Anonymous,
}

impl Modules {
    pub fn new(pid: u32) -> Modules {
        Modules { pid, ..Default::default() }
    }

    pub fn for_process(process: Arc<Process>) -> Modules {
        Modules { pid: process.pid(), process: Some(process), ..Default::default() }
    }

    /// Re-reads `/proc/PID/maps` and opens new modules. Keeps the old view when the target is
    /// gone. Returns whether anything changed.
    pub fn refresh(&mut self) -> bool {
        let Ok(maps) = procfs::maps(self.pid) else { return false };
        // An exited but not yet reaped target (a zombie) has empty maps: it is gone too.
        if maps.is_empty() || maps == self.maps {
            return false;
        }
        let mut opened = Vec::new();
        for m in maps.iter().filter(|m| m.is_file()) {
            let path = m.path.clone().unwrap_or_default();
            if self.open.contains_key(&path) || opened.iter().any(|o: &Module| o.path == path) {
                continue;
            }
            if let Ok(file) = target_fs::open_mapped(self.pid, m, Kind::Elf) {
                let open_path = file.path().to_owned();
                opened.push(Module { path, _file: file, open_path });
            }
        }
        // Read, then check: what was read came from the traced process only if it still runs.
        if self.process.as_ref().is_some_and(|p| !p.alive()) {
            return false;
        }
        self.open.extend(opened.into_iter().map(|m| (m.path.clone(), m)));
        self.maps = maps;
        true
    }

    pub fn place(&self, addr: u64) -> Place<'_> {
        let Some(m) = self.maps.iter().find(|m| m.contains(addr)) else { return Place::Anonymous };
        match m.path.as_ref().and_then(|p| self.open.get(p)) {
            Some(module) if m.is_file() => {
                Place::File { module, file_offset: addr - m.start + m.offset }
            }
            _ => Place::Anonymous,
        }
    }
}
