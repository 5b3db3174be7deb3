//! Every map and load-time setting of the probes. Capacities here are defaults: the agent
//! resizes `LIVE`, `STACKS`, `STACK_STATS` and `UNWIND_ROWS` at load time (`--max-allocs`, `--max-stacks`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    Global,
};
use profiler_common::{
    AllocInfo, InFlight, StackFrames, StackKey, StackStats, UnwindMapping, UnwindRow, COUNTER_COUNT,
    EXP_TABLE_LEN, MAX_UNWIND_MAPPINGS,
};

/// Only this process (tgid) is traced; 0 traces whoever hits the probe.
#[unsafe(no_mangle)]
pub static TARGET_TGID: Global<u32> = Global::new(0);

/// Mean bytes between samples; 0 records every allocation.
#[unsafe(no_mangle)]
pub static SAMPLE_BYTES: Global<u64> = Global::new(0);

/// `-ln(u)` for u uniform in (0, 1), in fixed point (see `EXP_TABLE_SHIFT`), filled at load time.
#[map]
pub static EXP_TABLE: Array<u32> = Array::with_max_entries(EXP_TABLE_LEN as u32, 0);

/// Live allocations: address -> size, time, stack.
#[map]
pub static LIVE: HashMap<u64, AllocInfo> = HashMap::with_max_entries(1 << 20, 0);

/// The agent writes the unwind tables through a memory mapping of the map: a million rows
/// are a copy, not a million `bpf(2)` calls.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every unwind row of every file the target maps, each file's rows sorted by pc in one range
/// (see `profiler_common::UnwindRow`). Sized by the agent at load time.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 16, BPF_F_MMAPABLE);

/// The target's executable mappings sorted by start, in two halves of `MAX_UNWIND_MAPPINGS`:
/// the probes search the half `UNWIND_STATE[0]` names, the agent rewrites the other and flips.
#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> = Array::with_max_entries(2 * MAX_UNWIND_MAPPINGS, BPF_F_MMAPABLE);

/// `[active half, mappings in half 0, mappings in half 1]`.
#[map]
pub static UNWIND_STATE: Array<u32> = Array::with_max_entries(3, 0);

/// log2 of `LIVE_FILTER`'s length.
pub const LIVE_FILTER_BITS: u32 = 15;

/// While sampling: how many `LIVE` addresses hash to each slot (a counting filter, see
/// `probes::forget`). A free whose slot is 0 was not sampled, and skips the `LIVE` lookup.
#[map]
pub static LIVE_FILTER: Array<u64> = Array::with_max_entries(1 << LIVE_FILTER_BITS, 0);

/// Per-stack totals, one copy per CPU: threads allocating from the same stack on several CPUs
/// would otherwise fight over one cache line.
#[map]
pub static STACK_STATS: PerCpuHashMap<StackKey, StackStats> = PerCpuHashMap::with_max_entries(1 << 16, 0);

/// User stacks by the hash of their frames (see `stack.rs`).
#[map]
pub static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(1 << 15, 0);

/// Where a stack is assembled before it is hashed and stored (too big for the BPF stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

/// Allocator calls between entry and return, one slot per thread (pid_tgid), reused from call
/// to call. LRU so the slots of threads that ended make room for new ones.
#[map]
pub static INFLIGHT: LruHashMap<u64, InFlight> = LruHashMap::with_max_entries(1 << 14, 0);

/// Calls of all threads between a recorded entry and its return, kept only while sampling:
/// when it is 0, an entry cannot be nested in a recorded call and skips the `INFLIGHT` lookup.
#[map]
pub static ACTIVE_CALLS: Array<u64> = Array::with_max_entries(1, 0);

/// Event and drop counters, see `profiler_common::Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Bytes left before the next sample on this CPU (Poisson byte sampling).
#[map]
pub static SAMPLE_COUNTDOWN: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Hits of snapshot triggers (`--on-return`, `--on-usdt`), indexed by the attach cookie; the
/// agent polls it and takes a snapshot when a count moves.
#[map]
pub static TRIGGER_HITS: Array<u64> = Array::with_max_entries(profiler_common::MAX_TRIGGERS, 0);

/// Discovery events (`discover.rs`): one `u64` per exec or exit. One page here: only the
/// agent's discovery load resizes it (`map_max_entries`), the per-target loads never use it.
#[map]
pub static DISCOVER_EVENTS: aya_ebpf::maps::RingBuf = aya_ebpf::maps::RingBuf::with_byte_size(4096, 0);

/// Discovery events lost because `DISCOVER_EVENTS` was full.
#[map]
pub static DISCOVER_LOST: Array<u64> = Array::with_max_entries(1, 0);
