//! The target's mapped object files, kept open: an address becomes (module, file offset), and
//! the module stays readable through `/proc/self/fd/N` after the target exits, is upgraded on
//! disk, or lives in another mount namespace.
//!
//! Memory budget: blazesym parses a module's symbol tables and DWARF into caches of its own
//! that cannot be measured from outside, so each module is charged an estimate when it is
//! first opened ([`estimate_symbol_bytes`]: from its section sizes) to the target's account
//! ([`crate::budget::Use::Symbols`]). A refused module stays open (its frames keep module and
//! file offset) but is not given to blazesym: its frames are not named, said in the target's
//! `memory_budget` status.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object as _, ObjectSection as _};

use crate::{
    budget::{Account, Reservation, Use},
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
    /// Whether its symbols may be parsed: false when the memory budget refused them.
    pub symbols: bool,
    /// The estimate of its parsed symbols on the target's account.
    _charge: Option<Reservation>,
}

impl Drop for Module {
    /// What blazesym parsed of it is dropped too (by each thread, at its next use).
    fn drop(&mut self) {
        super::forget(&self.open_path);
    }
}

/// Bytes per ELF symbol blazesym keeps once it parsed a table (its address-sorted index, and
/// the name-sorted one built for lookups by name): an estimate.
const SYMBOL_INDEX_BYTES: u64 = 32;
/// The DWARF sections blazesym parses to name inlined functions and source lines.
const DWARF_SECTIONS: [&str; 5] = [".debug_info", ".debug_line", ".debug_abbrev", ".debug_ranges", ".debug_rnglists"];

/// What parsing the symbols of the ELF file at `path` may cost blazesym, estimated from its
/// sections (each size bounded by the file's length: the section headers are the target's
/// word): [`SYMBOL_INDEX_BYTES`] per `.symtab`/`.dynsym` entry, plus the DWARF sections' sizes
/// (parsed units and line sequences are of the order of their encoded size). 0 when the file
/// is not ELF (blazesym then finds nothing either).
pub fn estimate_symbol_bytes(path: &Path) -> u64 {
    let Ok(file) = std::fs::File::open(path) else { return 0 };
    // SAFETY: read-only; a file truncated meanwhile faults only this estimate's reads of the
    // section headers, as it would blazesym's own.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else { return 0 };
    let Ok(elf) = object::File::parse(&*map) else { return 0 };
    let len = map.len() as u64;
    let size = |name: &str| elf.section_by_name(name).map_or(0, |s| s.size().min(len));
    let symbols = (size(".symtab") + size(".dynsym")) / 24 * SYMBOL_INDEX_BYTES;
    symbols + DWARF_SECTIONS.iter().map(|s| size(s)).sum::<u64>()
}

#[derive(Default)]
pub struct Modules {
    pid: u32,
    /// When known: maps and files are only taken while the pid still names it.
    process: Option<Arc<Process>>,
    maps: Vec<Mapping>,
    open: HashMap<String, Module>,
    /// The target's share of the memory budget, when charged.
    account: Option<Arc<Account>>,
    /// Modules whose symbols the budget refused.
    refused: usize,
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

    /// What blazesym keeps of each module's symbols is charged to `account` (an estimate).
    pub fn for_process(process: Arc<Process>, account: Arc<Account>) -> Modules {
        Modules { pid: process.pid(), process: Some(process), account: Some(account), ..Default::default() }
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
                let (symbols, charge) = match &self.account {
                    None => (true, None),
                    Some(account) => match charge(account, &open_path) {
                        Ok(charge) => (true, Some(charge)),
                        Err(e) => {
                            self.refused += 1;
                            tracing::debug!(pid = self.pid, "symbols of {path} refused: {e}");
                            account.note_not_loaded(
                                Use::Symbols,
                                format!("the symbols of {} module(s) (the last: {path}): their frames keep module and offset, unnamed", self.refused),
                            );
                            (false, None)
                        }
                    },
                };
                opened.push(Module { path, _file: file, open_path, symbols, _charge: charge });
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

/// Charges the estimate of the symbols of the module read through `open_path` to `account`.
pub(crate) fn charge(account: &Arc<Account>, open_path: &Path) -> Result<Reservation, crate::budget::BudgetExceeded> {
    account.reserve(Use::Symbols, estimate_symbol_bytes(open_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Pool;

    /// libc's symbols pass a small per-target cap: refused (counted, reported); under a cap they
    /// fit, they are charged while kept and the bytes come back on drop.
    #[test]
    fn symbols_are_charged_to_the_target_budget() {
        static POOL: Pool = Pool::new(1 << 30);
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let bytes = estimate_symbol_bytes(libc);
        eprintln!("libc's symbols: {bytes} bytes charged (estimate)");
        assert!(bytes > 16 << 10, "libc's .dynsym alone has thousands of entries: {bytes}");
        assert_eq!(estimate_symbol_bytes(Path::new("/etc/hostname")), 0, "not ELF");
        let small = Account::in_pool(21, 4 << 10, &POOL);
        let e = charge(&small, libc).unwrap_err();
        assert_eq!((e.what, e.wanted), (Use::Symbols, bytes));
        assert_eq!(small.report().refused["symbols"].times, 1);
        let big = Account::in_pool(22, 64 << 20, &POOL);
        let held = charge(&big, libc).unwrap();
        assert_eq!(big.report().by_use["symbols"], bytes);
        drop(held);
        assert_eq!((big.report().used_bytes, POOL.usage().0), (0, 0));
    }
}
