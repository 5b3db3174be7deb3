//! Loads the embedded eBPF object with per-target settings (which process, map capacities,
//! sampling rate) and hands out its maps. Checks privileges and kernel features first, so the
//! operator gets one clear line instead of a verifier dump.
use std::{
    fs,
    os::fd::{AsFd as _, RawFd},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap},
    Ebpf, EbpfLoader,
};
use profiler_common::{AllocInfo, StackFrames, StackKey, StackStats, EXP_TABLE_LEN, EXP_TABLE_SHIFT};
use tracing::{debug, info};

use super::session_link::{SessionLink, SessionLinkError, SessionProgram};

pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf.o"));

/// Capacities and sampling, fixed when the probes are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Live allocations tracked at once (`LIVE` map entries).
    pub max_allocs: u32,
    /// Distinct stacks (`STACKS` and `STACK_STATS` entries).
    pub max_stacks: u32,
    /// Mean bytes between samples; 0 records every allocation.
    pub sample_bytes: u64,
    /// How the allocator probes are attached.
    pub probe_mode: ProbeMode,
    /// At most this many unwind rows (8 bytes each) per target; the map is sized to what the
    /// target maps at attach, plus room for libraries loaded later.
    pub max_unwind_rows: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            max_allocs: 1 << 20,
            max_stacks: 1 << 15,
            sample_bytes: 0,
            probe_mode: ProbeMode::Auto,
            max_unwind_rows: DEFAULT_MAX_UNWIND_ROWS,
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
    /// `session` where the kernel has it (6.13+), `classic` otherwise.
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
}

/// The loaded programs (still to be attached) and the maps the reader needs.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// The programs, when the probes are attached as uprobe.session.
    pub session: Option<SessionPrograms>,
    /// Links that are not aya's (which live inside `ebpf`).
    pub session_links: Vec<SessionLink>,
    pub maps: ProbeMaps,
}

/// uprobe.session programs. `malloc` and `free`, the most frequent calls, have their own:
/// they skip reading and dispatching on the attach cookie (and `free`, which never needs its
/// return, telling entry from return).
pub struct SessionPrograms {
    pub malloc: SessionProgram,
    /// Every other allocation function, told apart by the attach cookie.
    pub alloc: SessionProgram,
    pub free: SessionProgram,
}

pub struct ProbeMaps {
    pub live: HashMap<MapData, u64, AllocInfo>,
    pub stack_stats: PerCpuHashMap<MapData, StackKey, StackStats>,
    pub stacks: HashMap<MapData, u64, StackFrames>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Hits per snapshot trigger slot (see `bpf::attach::attach_trigger`).
    pub trigger_hits: Array<MapData, u64>,
    /// The unwinder's maps, handed to `unwind::TargetUnwinder`.
    pub unwind: Option<UnwindMaps>,
}

/// `UNWIND_ROWS`, `UNWIND_MAPPINGS`, `UNWIND_STATE`, and a second handle on `COUNTERS` (the
/// unwinder's refresher watches `truncated_unmapped`).
pub struct UnwindMaps {
    pub rows: MapData,
    /// The session programs read the shared row map instead of `rows`.
    pub rows_shared: bool,
    pub mappings: MapData,
    pub state: MapData,
    pub counters: PerCpuArray<MapData, u64>,
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

/// Loads the object for one target process, with room for `unwind_rows` unwind rows, or
/// with its uprobe.session programs reading the agent's shared row map `shared_rows` (only
/// when they load: classic programs keep the object's own map).
pub fn load(tgid: u32, settings: ProbeSettings, unwind_rows: u32, shared_rows: Option<RawFd>) -> Result<Loaded, LoadError> {
    check_environment()?;
    let shared_rows = shared_rows.filter(|_| settings.probe_mode != ProbeMode::Classic);
    // The session programs read the shared map: this object's own holds one row.
    let own_rows = if shared_rows.is_some() { 1 } else { unwind_rows };
    let mut ebpf = EbpfLoader::new()
        .override_global("TARGET_TGID", &tgid, true)
        .override_global("SAMPLE_BYTES", &settings.sample_bytes, true)
        .map_max_entries("LIVE", settings.max_allocs.max(1))
        .map_max_entries("STACKS", settings.max_stacks.max(1))
        .map_max_entries("STACK_STATS", settings.max_stacks.max(1))
        .map_max_entries("UNWIND_ROWS", own_rows.max(1))
        .load(OBJECT)
        .map_err(|e| LoadError::Load(Box::new(e)))?;
    fill_exp_table(&mut ebpf)?;
    let session = match settings.probe_mode {
        ProbeMode::Classic => None,
        mode => match SessionProgram::load(OBJECT, &ebpf, ["malloc_session", "alloc_session", "free_session"], shared_rows.map(|fd| ("UNWIND_ROWS", fd))) {
            Ok([malloc, alloc, free]) => Some(SessionPrograms { malloc, alloc, free }),
            // Classic programs would read this object's (one-row) map: load it again with its own.
            Err(e) if mode == ProbeMode::Auto && shared_rows.is_some() => {
                info!("using classic uprobes + uretprobes: {e}");
                return load(tgid, ProbeSettings { probe_mode: ProbeMode::Classic, ..settings }, unwind_rows, None);
            }
            Err(e) if mode == ProbeMode::Auto => {
                info!("using classic uprobes + uretprobes: {e}");
                None
            }
            Err(e) => return Err(LoadError::Session(e)),
        },
    };
    debug!(session = session.is_some(), "probe programs loaded");
    let unwind = UnwindMaps {
        counters: counters_handle(&ebpf)?,
        rows: array(&mut ebpf, "UNWIND_ROWS")?,
        rows_shared: shared_rows.is_some() && session.is_some(),
        mappings: array(&mut ebpf, "UNWIND_MAPPINGS")?,
        state: array(&mut ebpf, "UNWIND_STATE")?,
    };
    let maps = ProbeMaps {
        live: take(&mut ebpf, "LIVE")?,
        stack_stats: take(&mut ebpf, "STACK_STATS")?,
        stacks: take(&mut ebpf, "STACKS")?,
        counters: take(&mut ebpf, "COUNTERS")?,
        trigger_hits: take(&mut ebpf, "TRIGGER_HITS")?,
        unwind: Some(unwind),
    };
    Ok(Loaded { ebpf, session, session_links: Vec::new(), maps })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn counters_handle(ebpf: &Ebpf) -> Result<PerCpuArray<MapData, u64>, LoadError> {
    let name = "COUNTERS";
    let Some(aya::maps::Map::PerCpuArray(data)) = ebpf.map(name) else { return Err(LoadError::MissingMap(name)) };
    let dup = |e: std::io::Error| LoadError::Map { name, source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }) };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(dup)?;
    let data = MapData::from_fd(fd).map_err(|source| LoadError::Map { name, source })?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|source| LoadError::Map { name, source })
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

fn fill_exp_table(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let name = "EXP_TABLE";
    let map = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
    let mut table: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| LoadError::Map { name, source })?;
    for (i, v) in exp_table().into_iter().enumerate() {
        table.set(i as u32, v, 0).map_err(|source| LoadError::Map { name, source })?;
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
