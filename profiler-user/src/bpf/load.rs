//! Loads the embedded eBPF object once for every target (map capacities are the agent's
//! totals) and hands out its maps. Checks privileges and kernel features first, so the
//! operator gets one clear line instead of a verifier dump.
//!
//! One load, not one per target: verifying the programs takes 0.3 to 0.5 s of CPU and each
//! object's maps took ~130 MiB of kernel memory (10 idle targets: 1,294 MiB); a target is now a
//! slot in the shared maps and a few links (`bpf::target_view`).
use std::{
    fs,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap},
    Ebpf, EbpfLoader,
};
use profiler_common::{
    target_id, weight_table, AllocInfo, GoTarget, LiveKey, StackFrames, StackKey, StackStats, TargetConfig, COUNTER_COUNT,
    EXP_TABLE_LEN, EXP_TABLE_SHIFT, MAX_TARGETS, MAX_TARGET_SLOTS, MAX_UNWIND_MAPPINGS, UNWIND_STATE_STRIDE,
};
use tracing::{debug, info};

use super::session_link::{SessionLinkError, SessionProgram};
use crate::unwind::SharedRows;

pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf.o"));

/// Capacities and sampling, fixed when the probes are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Live allocations tracked at once (`LIVE` map entries), all targets together: each gets
    /// an equal share.
    pub max_allocs: u32,
    /// Distinct stacks (`STACKS` and `STACK_STATS` entries).
    pub max_stacks: u32,
    /// Mean bytes between samples for a new target; 0 records every allocation.
    pub sample_bytes: u64,
    /// How the allocator probes are attached.
    pub probe_mode: ProbeMode,
    /// At most this many unwind rows (8 bytes each) in all; `record` sizes the map to what its
    /// target maps at attach, plus room for libraries loaded later.
    pub max_unwind_rows: u32,
    /// Where allocations are seen: the USDT heap-sampling contract when a target has it, or
    /// its allocator's functions (see [`super::contract`]).
    pub source: SourceMode,
    /// Target slots of the per-target maps (80 KiB of kernel memory each, mostly the unwind
    /// mappings): the agent's `--max-targets` plus room for targets being released
    /// ([`slots_for`]); `record` needs one.
    pub target_slots: u32,
}

/// Slots for `max_targets` targets: a departed target keeps its slot until its links are
/// released (an RCU grace period each, on a thread of its own), so a busy node needs a few
/// more than it traces at once.
pub fn slots_for(max_targets: usize) -> u32 {
    let extra = (max_targets / 16).max(8);
    u32::try_from(max_targets.saturating_add(extra)).unwrap_or(u32::MAX).clamp(1, MAX_TARGET_SLOTS)
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            max_allocs: 1 << 20,
            max_stacks: 1 << 15,
            sample_bytes: 0,
            probe_mode: ProbeMode::Auto,
            max_unwind_rows: DEFAULT_MAX_UNWIND_ROWS,
            source: SourceMode::Auto,
            target_slots: MAX_TARGETS,
        }
    }
}

/// 16 Mi rows, 128 MiB: libc, libstdc++ and a 100 MiB executable take about a tenth of it.
pub const DEFAULT_MAX_UNWIND_ROWS: u32 = 1 << 24;

/// `UNWIND_ROWS` for a target whose files need `rows` now: room for libraries it loads later
/// (a quarter more, at least 256Ki rows), within `max`.
pub fn unwind_capacity(rows: usize, max: u32) -> u32 {
    let wanted = rows.saturating_add((rows / 4).max(1 << 18));
    u32::try_from(wanted).unwrap_or(u32::MAX).clamp(1, max.max(1))
}

/// How the allocator probes are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// `session` where the kernel has it (6.13+), `classic` otherwise and for processes that
    /// fork children (their breakpoints would trap in every untraced child).
    #[default]
    Auto,
    /// One uprobe.session program per call: unsampled calls skip the return trap.
    Session,
    /// A uprobe and a uretprobe per allocation function (any kernel since 5.15).
    Classic,
}

impl ProbeMode {
    /// The name `--probe-mode` takes and the agent's JSON shows.
    pub fn name(self) -> &'static str {
        match self {
            ProbeMode::Auto => "auto",
            ProbeMode::Session => "session",
            ProbeMode::Classic => "classic",
        }
    }
}

/// Where a target's allocations are seen (`--source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceMode {
    /// The USDT heap-sampling contract (`ddheap`, `otel_memory`) when the target has it: one
    /// trap per sample instead of two per `malloc`+`free` pair; its allocator otherwise.
    #[default]
    Auto,
    /// The allocator's functions, even when the target has the contract.
    Allocator,
    /// The contract only: a target without it is refused.
    Usdt,
}

impl SourceMode {
    pub fn name(self) -> &'static str {
        match self {
            SourceMode::Auto => "auto",
            SourceMode::Allocator => "allocator",
            SourceMode::Usdt => "usdt",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this memscope was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild")]
    NotBuilt,
    #[error("memscope needs root, or the capabilities CAP_SYS_ADMIN (uprobes need it since Linux 6.16) and CAP_SYS_PTRACE (running as uid {uid} without them)")]
    NoPrivilege { uid: u32 },
    #[error("this kernel has no uprobe support (/sys/bus/event_source/devices/uprobe is missing; CONFIG_UPROBE_EVENTS is off)")]
    NoUprobes,
    #[error("the kernel refused memscope's eBPF programs (needs BPF with attach cookies, kernel 5.15+): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{0} (uprobe.session needs Linux 6.13+; --probe-mode classic works on older kernels)")]
    Session(#[source] SessionLinkError),
    #[error("cannot memory-map the eBPF map {name}: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
}

/// The probes of one agent (or one `record`): the object loaded and verified once, its
/// programs attached to each target with that target's cookie (see `bpf::target_view`).
pub struct Probes {
    /// aya's programs (classic uprobes, triggers): attached per target under this lock.
    pub(crate) ebpf: Mutex<Ebpf>,
    /// The programs, when the probes are attached as uprobe.session.
    pub(crate) session: Option<SessionPrograms>,
    /// The USDT contract's programs (`alloc`, `free`), when the kernel has uprobe_multi links
    /// (6.6+) and the source is not forced to the allocator.
    pub(crate) usdt: Result<[SessionProgram; 2], String>,
    pub(crate) maps: ProbeMaps,
    /// Per-slot settings and state, written when a target comes, goes or changes its rate.
    pub(crate) slots: Mutex<SlotMaps>,
    /// The unwinder's maps, shared by every target's `unwind::TargetUnwinder`.
    pub(crate) unwind: UnwindMaps,
    pub(crate) settings: ProbeSettings,
    /// Stack ids no target referenced at the last purge (see `target_view::purge`).
    pub(crate) unreferenced_stacks: Mutex<std::collections::HashSet<u64>>,
    /// `COUNTERS`, for the readers on other threads (`counters_handle`).
    counters_data: MapData,
    /// `USDT_SPECS`: where each contract probe site finds its arguments.
    pub(crate) usdt_specs: Mutex<Array<MapData, profiler_common::UsdtSpec>>,
    /// What the probes cost each target (by target id), measured by the governor.
    pub(crate) costs: Mutex<std::collections::HashMap<u64, crate::governor::ProbeCost>>,
    /// The targets probed on each allocator file (device, inode), and whether that file is
    /// probed with classic uprobes for all of them (see `TargetProbes::join_file`).
    pub(crate) files: Mutex<std::collections::HashMap<(u64, u64), FileTargets>>,
}

/// The targets whose allocator is one file.
#[derive(Default)]
pub(crate) struct FileTargets {
    /// Classic uprobes for every target on it: a process that forks is traced on it.
    pub classic: bool,
    pub targets: Vec<std::sync::Weak<super::target_view::TargetProbes>>,
}

/// uprobe.session programs. `malloc` and `free`, the most frequent calls, have their own:
/// they skip dispatching on the attach cookie (and `free`, which never needs its return,
/// telling entry from return).
pub struct SessionPrograms {
    pub malloc: SessionProgram,
    /// Every other allocation function, told apart by the attach cookie.
    pub alloc: SessionProgram,
    pub free: SessionProgram,
}

/// The maps every target reads through (by key or by its slot's range).
pub struct ProbeMaps {
    pub live: HashMap<MapData, LiveKey, AllocInfo>,
    pub stack_stats: PerCpuHashMap<MapData, StackKey, StackStats>,
    pub stacks: HashMap<MapData, u64, StackFrames>,
    pub counters: PerCpuArray<MapData, u64>,
    /// The JavaScript functions of stacks that have some (see `profiler_common::JsFrameConfig`).
    pub js_frames: HashMap<MapData, u64, StackFrames>,
}

/// The per-slot maps the agent writes.
pub struct SlotMaps {
    pub targets: Array<MapData, TargetConfig>,
    pub target_live: Array<MapData, u64>,
    pub active_calls: Array<MapData, u64>,
    pub countdown: PerCpuArray<MapData, i64>,
    /// A second handle on `COUNTERS`, to zero a slot's range.
    pub counters: PerCpuArray<MapData, u64>,
    /// Which process has each slot (`None`: free), its generation, and its sampling interval.
    pub owners: Vec<SlotOwner>,
    /// Hits per snapshot trigger slot (see `bpf::attach::attach_trigger`).
    pub trigger_hits: Array<MapData, u64>,
    /// Trigger slots (indices into `TRIGGER_HITS`) in use.
    pub triggers_used: std::collections::BTreeSet<u32>,
    /// Each slot's Go runtime settings (zero: not a Go program), see `bpf::go_runtime`.
    pub go: Array<MapData, GoTarget>,
    /// How the probes find a V8 frame's function, per slot (disabled for other targets).
    pub js_config: Array<MapData, profiler_common::JsFrameConfig>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SlotOwner {
    pub pid: Option<u32>,
    pub generation: u32,
    /// The interval the target was attached with, and the one in force (the governor's).
    pub base_sample_bytes: u64,
    pub sample_bytes: u64,
    /// Traced through the USDT contract: the service samples, the governor has no interval
    /// to change and its floor is one trap per sample.
    pub usdt: bool,
    /// Its allocator probed with classic uprobes even though the probes have uprobe.session
    /// (a process that forks, see [`crate::session`]): a return trap per allocation.
    pub classic: bool,
}

/// `UNWIND_ROWS` (as the agent's row store), `UNWIND_MAPPINGS` and `UNWIND_STATE`, each target
/// writing its slot's range.
pub struct UnwindMaps {
    pub rows: Arc<Mutex<SharedRows>>,
    pub mappings: MapData,
    pub state: MapData,
}

/// Verifies what loading needs, with a specific error for each missing piece.
pub fn check_environment() -> Result<(), LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NotBuilt);
    }
    let uid = unsafe { libc::geteuid() };
    if uid != 0 && !has_bpf_capabilities() {
        return Err(LoadError::NoPrivilege { uid });
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Err(LoadError::NoUprobes);
    }
    Ok(())
}

fn has_bpf_capabilities() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return false };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return false;
    };
    // CAP_BPF + CAP_PERFMON used to be enough; uprobe perf events need CAP_SYS_ADMIN again
    // since 6.16 (also backported to 6.6 and 6.12), and reading other processes' /proc
    // entries needs CAP_SYS_PTRACE.
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) && has(CAP_SYS_PTRACE)
}

impl Probes {
    /// Loads the object once, with `unwind_rows` unwind rows for all targets together.
    pub fn load(settings: ProbeSettings, unwind_rows: u32) -> Result<Probes, LoadError> {
        check_environment()?;
        let slots = settings.target_slots.clamp(1, MAX_TARGET_SLOTS);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TARGETS", slots)
            .map_max_entries("TARGET_LIVE", slots)
            .map_max_entries("ACTIVE_CALLS", slots)
            .map_max_entries("SAMPLE_COUNTDOWN", slots)
            .map_max_entries("COUNTERS", slots * COUNTER_COUNT)
            .map_max_entries("UNWIND_STATE", slots * UNWIND_STATE_STRIDE)
            .map_max_entries("UNWIND_MAPPINGS", slots * 2 * MAX_UNWIND_MAPPINGS)
            .map_max_entries("GO_TARGETS", slots)
            .map_max_entries("JS_FRAME_CONFIG", slots)
            .map_max_entries("USDT_SPECS", slots * profiler_common::USDT_SPECS_PER_TARGET)
            .map_max_entries("LIVE", settings.max_allocs.max(1))
            .map_max_entries("STACKS", settings.max_stacks.max(1))
            .map_max_entries("STACK_STATS", settings.max_stacks.max(1))
            .map_max_entries("JS_FRAMES", settings.max_stacks.max(1))
            .map_max_entries("UNWIND_ROWS", unwind_rows.max(1))
            .load(OBJECT)
            .map_err(|e| LoadError::Load(Box::new(e)))?;
        fill_table(&mut ebpf, "EXP_TABLE", &exp_table())?;
        fill_table(&mut ebpf, "WEIGHT_TABLE", &weight_table())?;
        let session = match settings.probe_mode {
            ProbeMode::Classic => None,
            mode => match SessionProgram::load(OBJECT, &ebpf, ["malloc_session", "alloc_session", "free_session"]) {
                Ok([malloc, alloc, free]) => Some(SessionPrograms { malloc, alloc, free }),
                Err(e) if mode == ProbeMode::Auto => {
                    info!("using classic uprobes + uretprobes: {e}");
                    None
                }
                Err(e) => return Err(LoadError::Session(e)),
            },
        };
        let usdt = match settings.source {
            SourceMode::Allocator => Err("--source allocator".to_string()),
            _ => SessionProgram::load_multi(OBJECT, &ebpf, ["usdt_alloc", "usdt_free"]).map_err(|e| {
                info!("the USDT heap-sampling contract cannot be traced here (uprobe_multi links need Linux 6.6+): {e}");
                e.to_string()
            }),
        };
        debug!(session = session.is_some(), usdt = usdt.is_ok(), "probe programs loaded");
        let rows = array(&mut ebpf, "UNWIND_ROWS")?;
        let rows = SharedRows::over(rows, unwind_rows.max(1)).map_err(|e| LoadError::Mmap { name: "UNWIND_ROWS", source: e })?;
        let unwind = UnwindMaps {
            rows: Arc::new(Mutex::new(rows)),
            mappings: array(&mut ebpf, "UNWIND_MAPPINGS")?,
            state: array(&mut ebpf, "UNWIND_STATE")?,
        };
        let counters_data = match ebpf.map("COUNTERS") {
            Some(aya::maps::Map::PerCpuArray(data)) => dup_map("COUNTERS", data)?,
            _ => return Err(LoadError::MissingMap("COUNTERS")),
        };
        let slots = SlotMaps {
            targets: take(&mut ebpf, "TARGETS")?,
            target_live: take(&mut ebpf, "TARGET_LIVE")?,
            active_calls: take(&mut ebpf, "ACTIVE_CALLS")?,
            countdown: take(&mut ebpf, "SAMPLE_COUNTDOWN")?,
            counters: per_cpu_counters(dup_map("COUNTERS", &counters_data)?)?,
            owners: vec![SlotOwner::default(); slots as usize],
            trigger_hits: take(&mut ebpf, "TRIGGER_HITS")?,
            triggers_used: Default::default(),
            go: take(&mut ebpf, "GO_TARGETS")?,
            js_config: take(&mut ebpf, "JS_FRAME_CONFIG")?,
        };
        let maps = ProbeMaps {
            live: take(&mut ebpf, "LIVE")?,
            stack_stats: take(&mut ebpf, "STACK_STATS")?,
            stacks: take(&mut ebpf, "STACKS")?,
            counters: take(&mut ebpf, "COUNTERS")?,
            js_frames: take(&mut ebpf, "JS_FRAMES")?,
        };
        let usdt_specs = take(&mut ebpf, "USDT_SPECS")?;
        Ok(Probes {
            ebpf: Mutex::new(ebpf),
            session,
            usdt,
            usdt_specs: Mutex::new(usdt_specs),
            maps,
            slots: Mutex::new(slots),
            unwind,
            settings,
            unreferenced_stacks: Default::default(),
            counters_data,
            costs: Default::default(),
            files: Default::default(),
        })
    }

    /// `Session` or `Classic`: what `Auto` came to.
    pub fn probe_mode(&self) -> ProbeMode {
        if self.session.is_some() { ProbeMode::Session } else { ProbeMode::Classic }
    }

    pub fn settings(&self) -> ProbeSettings {
        self.settings
    }

    /// `(target id, slot, owner)` of every attached target.
    pub(crate) fn attached(&self) -> Vec<(u64, u32, SlotOwner)> {
        let slots = self.slots.lock().unwrap();
        (0..slots.owners.len() as u32)
            .filter_map(|slot| {
                let o = slots.owners[slot as usize];
                o.pid?;
                Some((target_id(slot, o.generation), slot, o))
            })
            .collect()
    }

    /// Changes slot `slot`'s sampling interval from its next allocation on; samples taken
    /// before keep the weight of their own interval.
    pub fn set_slot_sample_bytes(&self, slot: u32, sample_bytes: u64) -> Result<(), aya::maps::MapError> {
        let mut slots = self.slots.lock().unwrap();
        slots.owners[slot as usize].sample_bytes = sample_bytes;
        super::target_view::write_config(&mut slots, slot, self.settings.max_allocs)
    }

    /// A new handle on `COUNTERS` (for a reader on another thread).
    pub(crate) fn counters_handle(&self) -> Result<PerCpuArray<MapData, u64>, LoadError> {
        per_cpu_counters(dup_map("COUNTERS", &self.counters_data)?)
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// A second handle on map `data` (for a target's unwinder, which mmaps it; for readers on
/// other threads).
pub fn dup_map(name: &'static str, data: &MapData) -> Result<MapData, LoadError> {
    let dup = |e: std::io::Error| LoadError::Map { name, source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }) };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(dup)?;
    MapData::from_fd(fd).map_err(|source| LoadError::Map { name, source })
}

fn per_cpu_counters(data: MapData) -> Result<PerCpuArray<MapData, u64>, LoadError> {
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|source| LoadError::Map { name: "COUNTERS", source })
}

fn array(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, LoadError> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(data),
        _ => Err(LoadError::MissingMap(name)),
    }
}

/// `-ln(u)` for u at the centre of each of `EXP_TABLE_LEN` equal slices of (0, 1): drawing a
/// random slot gives exponentially distributed gaps between samples (mean 1, fixed point).
pub fn exp_table() -> Vec<u32> {
    (0..EXP_TABLE_LEN)
        .map(|i| {
            let u = (i as f64 + 0.5) / EXP_TABLE_LEN as f64;
            (-u.ln() * f64::from(1u32 << EXP_TABLE_SHIFT)).round() as u32
        })
        .collect()
}

fn fill_table(ebpf: &mut Ebpf, name: &'static str, values: &[u32]) -> Result<(), LoadError> {
    let map = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
    let mut table: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| LoadError::Map { name, source })?;
    for (i, v) in values.iter().enumerate() {
        table.set(i as u32, *v, 0).map_err(|source| LoadError::Map { name, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampling table has mean ~1 (in fixed point), so sampling gaps average the rate.
    #[test]
    fn exp_table_has_unit_mean() {
        let t = exp_table();
        let mean = t.iter().map(|&v| v as f64).sum::<f64>() / t.len() as f64;
        let one = f64::from(1u32 << EXP_TABLE_SHIFT);
        assert!((mean / one - 1.0).abs() < 0.01, "mean {}", mean / one);
        assert!(t.windows(2).all(|w| w[0] >= w[1]));
    }
}
