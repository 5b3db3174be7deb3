//! One target's unwind maps: which rows of the shared `UNWIND_ROWS` hold which file's table,
//! and the sorted list of its executable mappings in its slot's range of `UNWIND_MAPPINGS`,
//! rewritten whenever `/proc/PID/maps` changes (a `dlopen`, JIT code, an `munmap`).
//!
//! Both maps are memory-mapped (`BPF_F_MMAPABLE`): placing libc's ~50k rows is a copy. The
//! mapping list has two halves: the probes search the one the slot's `UNWIND_STATE` names while
//! this writes the other, then flips; a probe never sees a half-written list. Rows of a file
//! stay where they are placed while a target maps it (a file unmapped and mapped again reuses
//! its rows); when `UNWIND_ROWS` is full, new files fall back to frame pointers, counted in
//! [`UnwindStats::files_refused`].
//!
//! Memory budget: the compiled table of every file placed for a target is charged to that
//! target's account ([`crate::budget::Use::Unwind`], [`Table::memory_bytes`]) before its rows are
//! placed; a refusal leaves the file to frame pointers (as when `UNWIND_ROWS` is full), counted
//! in [`UnwindStats::files_over_budget`] and said in the target's `memory_budget` status. A table
//! shared with other targets (the [`cache`] keeps one per file) is charged in full to each
//! target that uses it: a target's count does not depend on which other targets run, and the
//! agent-wide sum may overstate what is held (never understate it).
use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::{Arc, Mutex, Weak},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use memmap2::{MmapMut, MmapOptions};
use profiler_common::{
    mapping, Counter, UnwindMapping, UnwindRow, COUNTER_COUNT, MAX_UNWIND_MAPPINGS, UNWIND_STATE_STRIDE,
};
use tracing::{debug, warn};

use super::{
    cache::{self, FileKey},
    shared::SharedRows,
    table::Table,
};
use crate::{
    budget::{Account, BudgetExceeded, Reservation, Use},
    process::Process,
    procfs::{self, Mapping},
    target_fs::{self, Kind, TargetFile},
};

#[derive(Debug, thiserror::Error)]
pub enum UnwindMapError {
    #[error("cannot memory-map the eBPF map {name}: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
    #[error("eBPF map UNWIND_STATE: {0}")]
    State(#[from] aya::maps::MapError),
}

/// What the unwind tables of one target hold, for the agent's JSON, `/metrics` and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnwindStats {
    /// Files with rows in the map.
    pub files: usize,
    /// Mapped files without any CFI (their frames use frame pointers).
    pub files_without_cfi: usize,
    /// Files that did not fit in `UNWIND_ROWS` (frame pointers instead).
    pub files_refused: usize,
    /// Files whose table the target's memory budget refused (frame pointers instead).
    #[serde(default)]
    pub files_over_budget: usize,
    /// Rows in use, and what the map can hold (`--max-unwind-rows` bounds it).
    pub rows: usize,
    pub capacity_rows: usize,
    /// Bytes this target's rows take, and the row map's size in kernel memory.
    pub table_bytes: usize,
    pub map_bytes: usize,
    /// The row map is shared by all targets (`map_bytes` counted once for all of them).
    pub shared_map: bool,
    /// Executable mappings the probes know, and how many of them use frame pointers.
    pub mappings: usize,
    pub frame_pointer_mappings: usize,
    /// Times the mapping list was rewritten, and the time spent compiling tables (those not
    /// already compiled for another target).
    pub refreshes: u64,
    pub compile_ms: u64,
    /// Wall time of the target's attach: tables compiled, probes loaded (verified) and attached.
    pub attach_ms: u64,
}

struct Placed {
    _table: Arc<Table>,
    start: u32,
    /// The table's bytes on the target's account, given back when the target stops using it.
    _charge: Reservation,
}

/// One target's part of the unwind maps.
pub struct TargetUnwinder {
    /// The target by identity: maps read after its pid was reused are not used.
    process: Arc<Process>,
    pid: u32,
    slot: u32,
    rows: Arc<Mutex<SharedRows>>,
    mappings: MmapMut,
    state: Array<MapData, u32>,
    _mappings_map: MapData,
    placed: HashMap<FileKey, Placed>,
    /// Files known to have no usable table, so they are not compiled again.
    no_table: HashSet<FileKey>,
    active_half: u32,
    last_maps: Vec<(u64, u64, u64, u64)>,
    stats: UnwindStats,
    /// The target's share of the memory budget.
    budget: Arc<Account>,
    /// Told when the executable mappings change ([`UnwindHandle::on_maps_change`]).
    observer: Option<MapsObserver>,
}

/// Maps the BPF array behind `fd` (created with BPF_F_MMAPABLE) for writing, `bytes` of its
/// values from `offset` (a multiple of the page size). The kernel maps every page at once, and
/// each counts in this process's RSS: a target maps its own slot's range only.
pub(super) fn mmap_array(fd: RawFd, offset: u64, bytes: usize) -> std::io::Result<MmapMut> {
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: an mmap-able BPF array with at least this many bytes from `offset`; the probes
    // only read it.
    unsafe { MmapOptions::new().offset(offset).len(bytes.next_multiple_of(page)).map_mut(fd) }
}

/// Rows needed for the files `pid` maps now, compiling (and caching) their tables: what the
/// probes' `UNWIND_ROWS` must hold at load time. The tables are returned so the cache keeps
/// them until the target's maps are filled.
pub fn plan(pid: u32) -> Plan {
    let started = Instant::now();
    let Ok(maps) = procfs::maps(pid) else { return Plan::default() };
    let mut seen = HashMap::new();
    for m in maps.iter().filter(|m| m.executable && m.is_file()) {
        if let std::collections::hash_map::Entry::Vacant(e) = seen.entry((m.dev, m.inode)) {
            if let Some(t) = table_of(pid, m) {
                e.insert(t);
            }
        }
    }
    let tables: Vec<Arc<Table>> = seen.into_values().collect();
    Plan { rows: tables.iter().map(|t| t.rows.len()).sum(), compile_ms: started.elapsed().as_millis() as u64, _tables: tables }
}

/// What [`plan`] found.
#[derive(Default)]
pub struct Plan {
    pub rows: usize,
    pub compile_ms: u64,
    _tables: Vec<Arc<Table>>,
}

fn table_of(pid: u32, m: &Mapping) -> Option<Arc<Table>> {
    let debug_file = |build_id: &str| -> Option<TargetFile> {
        let (dir, rest) = (build_id.get(..2)?, build_id.get(2..)?);
        target_fs::open_in_root(pid, &format!("/usr/lib/debug/.build-id/{dir}/{rest}.debug"), Kind::DebugFile).ok()
    };
    // Another target (or the attach's plan) may have compiled it: no need to open the file.
    if let Some(t) = cache::cached((m.dev, m.inode)) {
        return Some(t);
    }
    let file = match procfs::mapped_file(pid, m) {
        Ok(file) => file,
        Err(e) => {
            debug!("no unwind table for {}: {e}", m.path.as_deref().unwrap_or("?"));
            return None;
        }
    };
    match cache::get((m.dev, m.inode), &file, &debug_file) {
        Ok(t) => Some(t),
        Err(e) => {
            debug!("no unwind table for {}: {e}", m.path.as_deref().unwrap_or("?"));
            None
        }
    }
}

impl TargetUnwinder {
    /// Takes target slot `slot`'s part of the unwind maps.
    pub fn new(
        process: Arc<Process>,
        rows: Arc<Mutex<SharedRows>>,
        mappings: MapData,
        state: MapData,
        slot: u32,
        plan: &Plan,
    ) -> Result<Self, UnwindMapError> {
        let pid = process.pid();
        // 2 x 1024 x 40 bytes: 20 pages, so every slot's range starts on a page.
        let per_slot = 2 * MAX_UNWIND_MAPPINGS as usize * size_of::<UnwindMapping>();
        let fd = mappings.fd().as_fd().as_raw_fd();
        let mappings_mem = mmap_array(fd, (slot as usize * per_slot) as u64, per_slot)
            .map_err(|source| UnwindMapError::Mmap { name: "UNWIND_MAPPINGS", source })?;
        let (_, capacity, map_bytes) = rows.lock().unwrap().usage();
        let stats = UnwindStats {
            capacity_rows: capacity,
            map_bytes,
            shared_map: true,
            compile_ms: plan.compile_ms,
            ..Default::default()
        };
        Ok(TargetUnwinder {
            process,
            pid,
            slot,
            rows,
            mappings: mappings_mem,
            state: Array::try_from(Map::Array(state))?,
            _mappings_map: mappings,
            placed: HashMap::new(),
            no_table: HashSet::new(),
            active_half: 0,
            last_maps: Vec::new(),
            stats,
            budget: Account::for_pid(pid),
            observer: None,
        })
    }

    pub fn stats(&self) -> UnwindStats {
        self.stats.clone()
    }

    /// Brings the probes' mapping list in step with the target's executable mappings; false
    /// when nothing changed (or the target is gone).
    pub fn refresh(&mut self) -> bool {
        let Ok(maps) = procfs::maps(self.pid) else { return false };
        if !self.process.alive() {
            return false;
        }
        let exec: Vec<&Mapping> = maps.iter().filter(|m| m.executable).collect();
        let signature: Vec<_> = exec.iter().map(|m| (m.start, m.end, m.offset, m.inode)).collect();
        if signature == self.last_maps {
            return false;
        }
        self.last_maps = signature;
        let mut list = Vec::with_capacity(exec.len());
        let mut frame_pointers = 0;
        for m in exec {
            // The uprobe trampoline and the legacy vsyscall page have no frames of the target.
            if matches!(m.path.as_deref(), Some("[uprobes]" | "[vsyscall]")) {
                continue;
            }
            let placed = if m.is_file() { self.place(m) } else { None };
            let entry = match placed {
                Some((start, len, bias)) => UnwindMapping {
                    start: m.start,
                    end: m.end,
                    bias,
                    rows_start: start,
                    rows_len: len,
                    kind: mapping::CFI,
                    _pad: 0,
                },
                None => {
                    frame_pointers += 1;
                    UnwindMapping { start: m.start, end: m.end, kind: mapping::FRAME_POINTERS, ..Default::default() }
                }
            };
            list.push(entry);
        }
        list.sort_by_key(|m| m.start);
        if list.len() > MAX_UNWIND_MAPPINGS as usize {
            warn!(pid = self.pid, "{} executable mappings; the unwinder knows the first {MAX_UNWIND_MAPPINGS}", list.len());
            list.truncate(MAX_UNWIND_MAPPINGS as usize);
        }
        let half = 1 - self.active_half;
        let base = half as usize * MAX_UNWIND_MAPPINGS as usize * size_of::<UnwindMapping>();
        let bytes = as_bytes(&list);
        self.mappings[base..base + bytes.len()].copy_from_slice(bytes);
        let state = self.slot * UNWIND_STATE_STRIDE;
        let written =
            self.state.set(state + 1 + half, list.len() as u32, 0).and_then(|()| self.state.set(state, half, 0));
        if let Err(e) = written {
            warn!(pid = self.pid, "cannot update the unwinder's mappings: {e}");
            return false;
        }
        self.active_half = half;
        debug!(pid = self.pid, mappings = list.len(), frame_pointers, rows = self.stats.rows, "unwind mappings updated");
        self.stats.mappings = list.len();
        self.stats.frame_pointer_mappings = frame_pointers;
        self.stats.refreshes += 1;
        true
    }

    /// `(rows_start, rows_len, bias)` of mapping `m`'s file, placing its rows on first use.
    fn place(&mut self, m: &Mapping) -> Option<(u32, u32, u64)> {
        let key = (m.dev, m.inode);
        if self.no_table.contains(&key) {
            return None;
        }
        if !self.placed.contains_key(&key) {
            let started = Instant::now();
            let table = table_of(self.pid, m);
            self.stats.compile_ms += started.elapsed().as_millis() as u64;
            let Some(table) = table.filter(|t| !t.rows.is_empty()) else {
                self.stats.files_without_cfi += 1;
                self.no_table.insert(key);
                return None;
            };
            let len = table.rows.len();
            let charge = match charge(&self.budget, &table) {
                Ok(charge) => charge,
                Err(e) => {
                    self.stats.files_over_budget += 1;
                    let path = m.path.as_deref().unwrap_or("?");
                    debug!(pid = self.pid, "unwind table of {path} refused: {e}");
                    self.budget.note_not_loaded(
                        Use::Unwind,
                        format!(
                            "the unwind tables of {} file(s) (the last: {path}, {len} rows): their frames are unwound by frame pointers",
                            self.stats.files_over_budget
                        ),
                    );
                    self.no_table.insert(key);
                    return None;
                }
            };
            let Some(start) = self.rows.lock().unwrap().acquire(key, &table.rows) else {
                self.stats.files_refused += 1;
                warn!(pid = self.pid, "unwind table of {} does not fit ({len} rows): frame pointers there", m.path.as_deref().unwrap_or("?"));
                self.no_table.insert(key);
                return None;
            };
            self.stats.files += 1;
            self.stats.rows += len;
            self.stats.table_bytes += len * size_of::<UnwindRow>();
            self.placed.insert(key, Placed { _table: table, start, _charge: charge });
        }
        let placed = &self.placed[&key];
        let table = &placed._table;
        Some((placed.start, table.rows.len() as u32, table.bias(m.start, m.offset)?))
    }
}

impl Drop for TargetUnwinder {
    fn drop(&mut self) {
        // No mapping any more for the slot: a probe still running for it stops at once.
        let state = self.slot * UNWIND_STATE_STRIDE;
        let _ = self.state.set(state + 1, 0, 0).and_then(|()| self.state.set(state + 2, 0, 0));
        let mut shared = self.rows.lock().unwrap();
        for key in self.placed.keys() {
            shared.release(*key);
        }
    }
}

/// Charges `table` to `account` before a target keeps it.
pub(crate) fn charge(account: &Arc<Account>, table: &Table) -> Result<Reservation, BudgetExceeded> {
    account.reserve(Use::Unwind, table.memory_bytes())
}

pub(super) fn as_bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: Pod types are plain integers with explicit padding.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast(), std::mem::size_of_val(items)) }
}

/// How often the refresher reads the probes' `truncated_unmapped` counter: a stack that met an
/// unknown mapping (a library just `dlopen`ed, new JIT code) makes it re-read the maps at once.
const COUNTER_POLL: Duration = Duration::from_millis(5);
/// How often it re-reads `/proc/PID/maps` regardless (an unmapped library, moved JIT code).
const MAPS_POLL: Duration = Duration::from_millis(100);

/// A target's unwinder, kept in step with the target's mappings by a thread of its own that
/// ends with the handle or the target.
pub struct UnwindHandle {
    inner: Arc<Mutex<TargetUnwinder>>,
}

impl UnwindHandle {
    /// Fills the maps for the target's mappings now, then starts the refresher. `counters` is
    /// the probes' `COUNTERS` map.
    pub fn start(mut unwinder: TargetUnwinder, counters: PerCpuArray<MapData, u64>) -> UnwindHandle {
        unwinder.refresh();
        let unmapped = unwinder.slot * COUNTER_COUNT + Counter::TruncatedUnmapped as u32;
        let inner = Arc::new(Mutex::new(unwinder));
        let weak = Arc::downgrade(&inner);
        let spawned =
            thread::Builder::new().name("unwind-refresh".into()).spawn(move || refresher(weak, counters, unmapped));
        if let Err(e) = spawned {
            warn!("no unwind refresher ({e}): libraries loaded later are unwound by frame pointers");
        }
        UnwindHandle { inner }
    }

    pub fn stats(&self) -> UnwindStats {
        self.inner.lock().unwrap().stats()
    }

    /// Records how long the whole attach took (see [`UnwindStats::attach_ms`]).
    pub fn set_attach_ms(&self, ms: u64) {
        self.inner.lock().unwrap().stats.attach_ms = ms;
    }

    /// Calls `observer` now, then each time the target's executable mappings change (a
    /// `dlopen`, an `munmap`), from the refresher's thread with no lock of the unwinder held.
    pub fn on_maps_change(&self, observer: MapsObserver) {
        self.inner.lock().unwrap().observer = Some(Arc::clone(&observer));
        observer();
    }
}

/// What [`UnwindHandle::on_maps_change`] calls.
pub type MapsObserver = Arc<dyn Fn() + Send + Sync>;

fn refresher(unwinder: Weak<Mutex<TargetUnwinder>>, counters: PerCpuArray<MapData, u64>, index: u32) {
    let unmapped = || {
        let values = counters.get(&index, 0).ok()?;
        Some(values.iter().sum::<u64>())
    };
    let (mut seen, mut last_refresh) = (unmapped(), Instant::now());
    loop {
        thread::sleep(COUNTER_POLL);
        let now = unmapped();
        if now == seen && last_refresh.elapsed() < MAPS_POLL {
            continue;
        }
        seen = now;
        last_refresh = Instant::now();
        let Some(unwinder) = unwinder.upgrade() else { return };
        let mut u = unwinder.lock().unwrap();
        let observer = if u.refresh() { u.observer.clone() } else { None };
        let alive = u.process.alive();
        drop(u);
        if let Some(observer) = observer {
            observer();
        }
        if !alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Pool;

    /// libc's table (tens of thousands of rows) passes a small per-target cap: refused (counted,
    /// reported); under a cap it fits, it is charged while kept and its bytes come back on drop.
    #[test]
    fn tables_are_charged_to_the_target_budget() {
        static POOL: Pool = Pool::new(1 << 30);
        let table = super::super::table::compile(std::path::Path::new("/lib/x86_64-linux-gnu/libc.so.6"), None).unwrap();
        let bytes = table.memory_bytes();
        eprintln!("libc's unwind table: {} rows, {bytes} bytes charged", table.rows.len());
        assert!(bytes >= (table.rows.len() * size_of::<UnwindRow>()) as u64 && bytes > 64 << 10, "{bytes}");
        let small = Account::in_pool(11, 64 << 10, &POOL);
        let e = charge(&small, &table).unwrap_err();
        assert_eq!((e.what, e.limit, e.wanted), (Use::Unwind, crate::budget::Limit::Target, bytes));
        assert_eq!(small.report().refused["unwind"].times, 1);
        assert_eq!(small.report().used_bytes, 0);
        let big = Account::in_pool(12, 64 << 20, &POOL);
        let held = charge(&big, &table).unwrap();
        assert_eq!(big.report().by_use["unwind"], bytes);
        drop(held);
        assert_eq!((big.report().used_bytes, POOL.usage().0), (0, 0));
    }
}
