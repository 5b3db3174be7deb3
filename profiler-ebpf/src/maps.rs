//! Every map of the probes. One loaded object serves every target: the maps are either shared
//! (keyed by target where it matters: `LIVE`, `STACK_STATS`) or have one range per target slot
//! (`TARGETS`, `COUNTERS`, the unwinder's mappings), the slot and its generation coming with each
//! probe's attach cookie. Capacities here are defaults: the agent resizes `LIVE`, `STACKS`,
//! `STACK_STATS` and `UNWIND_ROWS` at load time (`--max-allocs`, `--max-stacks`,
//! `--max-unwind-rows`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use profiler_common::{
    AllocInfo, GoTarget, InFlight, JsFrameConfig, LiveKey, StackFrames, StackKey, StackStats, TargetConfig, UnwindMapping,
    UnwindRow, UsdtSpec, COUNTER_COUNT, EXP_TABLE_LEN, MAX_TARGETS, MAX_UNWIND_MAPPINGS, UNWIND_STATE_STRIDE,
    USDT_SPECS_PER_TARGET, WEIGHT_TABLE_LEN,
};

/// Each target slot's settings (sampling interval, live-allocation quota).
#[map]
pub static TARGETS: Array<TargetConfig> = Array::with_max_entries(MAX_TARGETS, 0);

/// Each target slot's Go runtime settings (all zero for a target that is not a Go program):
/// read by the Go probes (`go.rs`) and by the stack walk (the cgo switch of stacks).
#[map]
pub static GO_TARGETS: Array<GoTarget> = Array::with_max_entries(MAX_TARGETS, 0);

/// Live allocations in `LIVE` per target slot, held against its `live_quota`.
#[map]
pub static TARGET_LIVE: Array<u64> = Array::with_max_entries(MAX_TARGETS, 0);

/// `-ln(u)` for u uniform in (0, 1), in fixed point (see `EXP_TABLE_SHIFT`), filled at load time.
#[map]
pub static EXP_TABLE: Array<u32> = Array::with_max_entries(EXP_TABLE_LEN as u32, 0);

/// `x / (1 - exp(-x))` at `x = i / 64` (see `profiler_common::weight_table`), filled at load time.
#[map]
pub static WEIGHT_TABLE: Array<u32> = Array::with_max_entries(WEIGHT_TABLE_LEN as u32, 0);

/// Live allocations of every target: (address, target) -> size, time, stack, weight. The
/// agent's `--max-allocs` in all, shared by quota.
#[map]
pub static LIVE: HashMap<LiveKey, AllocInfo> = HashMap::with_max_entries(1 << 20, 0);

/// The agent writes the unwind tables through a memory mapping of the map: a million rows
/// are a copy, not a million `bpf(2)` calls.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every unwind row of every file the target maps, each file's rows sorted by pc in one range
/// (see `profiler_common::UnwindRow`). Sized by the agent at load time.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 16, BPF_F_MMAPABLE);

/// Each target's executable mappings sorted by start, in two halves of `MAX_UNWIND_MAPPINGS`
/// per slot: the probes search the half the slot's `UNWIND_STATE` names, the agent rewrites the
/// other and flips.
#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> =
    Array::with_max_entries(MAX_TARGETS * 2 * MAX_UNWIND_MAPPINGS, BPF_F_MMAPABLE);

/// Per slot: `[active half, mappings in half 0, mappings in half 1, unused]`.
#[map]
pub static UNWIND_STATE: Array<u32> = Array::with_max_entries(MAX_TARGETS * UNWIND_STATE_STRIDE, 0);

/// log2 of `LIVE_FILTER`'s length.
pub const LIVE_FILTER_BITS: u32 = 17;

/// While sampling: how many `LIVE` addresses hash to each slot (a counting filter, see
/// `probes::forget`). A free whose slot is 0 was not sampled, and skips the `LIVE` lookup.
#[map]
pub static LIVE_FILTER: Array<u64> = Array::with_max_entries(1 << LIVE_FILTER_BITS, 0);

/// Per-stack totals (keyed by target too), one copy per CPU: threads allocating from the same stack on several CPUs
/// would otherwise fight over one cache line.
#[map]
pub static STACK_STATS: PerCpuHashMap<StackKey, StackStats> = PerCpuHashMap::with_max_entries(1 << 16, 0);

/// User stacks by the hash of their frames (see `stack.rs`), shared: two replicas of one
/// binary at the same addresses store a stack once.
#[map]
pub static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(1 << 15, 0);

/// Where a stack is assembled before it is hashed and stored (too big for the BPF stack):
/// entry 0 its return addresses, entry 1 its JavaScript functions (see `JS_FRAMES`).
#[map]
pub static STACK_SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(2, 0);

/// Per target slot: how to find the JavaScript function of a V8 frame (`enabled == 0`: not a
/// V8 target, nothing is read). Written by the agent.
#[map]
pub static JS_FRAME_CONFIG: Array<JsFrameConfig> = Array::with_max_entries(MAX_TARGETS, 0);

/// Not preallocated: only stacks with JavaScript frames take an entry.
const BPF_F_NO_PREALLOC: u32 = 1;

/// The `SharedFunctionInfo` of each JavaScript frame of a stack, by the stack's key in
/// `STACKS` (`ips[i]` is frame i's, 0 where the frame is not JavaScript); only stacks with at
/// least one. Sized like `STACKS` by the agent.
#[map]
pub static JS_FRAMES: HashMap<u64, StackFrames> = HashMap::with_max_entries(1 << 15, BPF_F_NO_PREALLOC);

/// Allocator calls between entry and return, one slot per thread (pid_tgid), reused from call
/// to call. LRU so the slots of threads that ended make room for new ones.
#[map]
pub static INFLIGHT: LruHashMap<u64, InFlight> = LruHashMap::with_max_entries(1 << 16, 0);

/// Per slot: calls of the target's threads between a recorded entry and its return, kept only
/// while sampling: when it is 0, an entry cannot be nested in a recorded call and skips the
/// `INFLIGHT` lookup.
#[map]
pub static ACTIVE_CALLS: Array<u64> = Array::with_max_entries(MAX_TARGETS, 0);

/// Event and drop counters, `COUNTER_COUNT` per slot, see `profiler_common::Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_TARGETS * COUNTER_COUNT, 0);

/// Per slot, bytes left before the next sample on this CPU (Poisson byte sampling).
#[map]
pub static SAMPLE_COUNTDOWN: PerCpuArray<i64> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Where each contract probe site (`usdt.rs`) finds its arguments: `USDT_SPECS_PER_TARGET`
/// per target slot, written by the agent before it attaches the site.
#[map]
pub static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_TARGETS * USDT_SPECS_PER_TARGET, 0);

/// Hits of snapshot triggers (`--on-return`, `--on-usdt`), indexed by the attach cookie (slots
/// the agent gives out across targets); it polls them and takes a snapshot when a count moves.
#[map]
pub static TRIGGER_HITS: Array<u64> = Array::with_max_entries(profiler_common::MAX_TRIGGERS, 0);

/// Discovery events (`discover.rs`): one `[u64; 2]` per exec, fork or exit. One page here:
/// only the agent's discovery load resizes it (`map_max_entries`), the probes' load never uses
/// it.
#[map]
pub static DISCOVER_EVENTS: aya_ebpf::maps::RingBuf = aya_ebpf::maps::RingBuf::with_byte_size(4096, 0);

/// Discovery events lost because `DISCOVER_EVENTS` was full.
#[map]
pub static DISCOVER_LOST: Array<u64> = Array::with_max_entries(1, 0);
