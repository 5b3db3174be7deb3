//! Types shared by the eBPF probes (`profiler-ebpf`) and the user-space agent (`profiler-user`).
//!
//! Everything here crosses the kernel/user boundary through BPF maps, globals or attach cookies,
//! so every struct is `#[repr(C)]`, has explicit padding and a size assertion, and uses integer
//! flags instead of `bool`. With the `user` feature the structs implement `aya::Pod`.
#![no_std]
#[cfg(feature = "user")]
extern crate std;

/// Which allocator entry point a probe is attached to. Sent to the probes in the attach cookie.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    Free = 9,
    /// Every C++ `operator new` (size in the first argument), where the allocator defines its
    /// own (jemalloc, tcmalloc) instead of libstdc++'s, which calls `malloc`.
    OperatorNew = 10,
    /// Every C++ `operator delete` (pointer in the first argument), likewise.
    OperatorDelete = 11,
    /// Rust's allocator shim `__rust_realloc(ptr, old_size, align, new_size)`: the old pointer
    /// in the first argument, the new size in the fourth (see `profiler-user`'s `bpf::families`).
    RustRealloc = 12,
}

impl AllocKind {
    pub const ALL: [AllocKind; 13] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::Free,
        AllocKind::OperatorNew,
        AllocKind::OperatorDelete,
        AllocKind::RustRealloc,
    ];

    pub const fn from_u8(v: u8) -> Option<AllocKind> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The name of this entry point, as logs and reports show it.
    pub const fn name(self) -> &'static str {
        match self {
            AllocKind::OperatorNew => "operator new",
            AllocKind::OperatorDelete => "operator delete",
            _ => self.symbols()[0],
        }
    }

    /// Whether the entry point releases memory (its first argument) instead of allocating.
    pub const fn frees(self) -> bool {
        matches!(self, AllocKind::Free | AllocKind::OperatorDelete)
    }

    /// The symbols of this entry point: a C function, or every Itanium-mangled variant of the
    /// C++ operator (array, nothrow, aligned, sized).
    pub const fn symbols(self) -> &'static [&'static str] {
        match self {
            AllocKind::Malloc => &["malloc"],
            AllocKind::Calloc => &["calloc"],
            AllocKind::Realloc => &["realloc"],
            AllocKind::Reallocarray => &["reallocarray"],
            AllocKind::PosixMemalign => &["posix_memalign"],
            AllocKind::AlignedAlloc => &["aligned_alloc"],
            AllocKind::Memalign => &["memalign"],
            AllocKind::Valloc => &["valloc"],
            AllocKind::Pvalloc => &["pvalloc"],
            AllocKind::Free => &["free"],
            AllocKind::RustRealloc => &["__rust_realloc"],
            AllocKind::OperatorNew => &[
                "_Znwm",
                "_Znam",
                "_ZnwmRKSt9nothrow_t",
                "_ZnamRKSt9nothrow_t",
                "_ZnwmSt11align_val_t",
                "_ZnamSt11align_val_t",
                "_ZnwmSt11align_val_tRKSt9nothrow_t",
                "_ZnamSt11align_val_tRKSt9nothrow_t",
            ],
            AllocKind::OperatorDelete => &[
                "_ZdlPv",
                "_ZdaPv",
                "_ZdlPvm",
                "_ZdaPvm",
                "_ZdlPvRKSt9nothrow_t",
                "_ZdaPvRKSt9nothrow_t",
                "_ZdlPvSt11align_val_t",
                "_ZdaPvSt11align_val_t",
                "_ZdlPvmSt11align_val_t",
                "_ZdaPvmSt11align_val_t",
                "_ZdlPvSt11align_val_tRKSt9nothrow_t",
                "_ZdaPvSt11align_val_tRKSt9nothrow_t",
            ],
        }
    }
}

/// Target slots of the object as built: the per-target maps' declared size. The agent resizes
/// them at load time to the slots it needs (`memscope agent --max-targets`, plus room for
/// targets being released), at most [`MAX_TARGET_SLOTS`].
pub const MAX_TARGETS: u32 = 256;

/// Bits of a target id that name its slot.
pub const TARGET_SLOT_BITS: u32 = 16;
/// The most slots a target id can name.
pub const MAX_TARGET_SLOTS: u32 = 1 << TARGET_SLOT_BITS;

/// A traced process as the probes know it: its slot (bits 0..16) and the slot's generation
/// (bits 16..48), which the agent changes each time the slot is given to another process, so
/// entries a departed target left in the shared maps never match its successor.
pub const fn target_id(slot: u32, generation: u32) -> u64 {
    (slot as u64 & (MAX_TARGET_SLOTS as u64 - 1)) | ((generation as u64) << TARGET_SLOT_BITS)
}

pub const fn target_slot(target: u64) -> u32 {
    (target & (MAX_TARGET_SLOTS as u64 - 1)) as u32
}

/// Attach cookie layout: bits 0..8 = [`AllocKind`], bits 8..56 = the target ([`target_id`]).
pub const fn encode_cookie(kind: AllocKind, target: u64) -> u64 {
    kind as u64 | (target << 8)
}

pub const fn decode_cookie(cookie: u64) -> u8 {
    (cookie & 0xff) as u8
}

pub const fn cookie_target(cookie: u64) -> u64 {
    cookie >> 8
}

/// Per-target settings the probes read (`TARGETS[slot]`), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetConfig {
    /// Mean bytes between samples; 0 records every allocation. The governor changes it.
    pub sample_bytes: u64,
    /// Live allocations this target may hold in the shared `LIVE` map (its fair share).
    pub live_quota: u64,
}
const _: () = assert!(core::mem::size_of::<TargetConfig>() == 16);

/// Per-target settings of the Go runtime probes (`GO_TARGETS[slot]`), written by the agent when
/// the target is a Go program whose runtime layout memscope validated (see `profiler-user`'s
/// `bpf::go_runtime`); all zero otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoTarget {
    /// Address of `runtime.MemProfileRate` in the target (the sampling rate the runtime uses:
    /// read at each sample, so a program changing it is followed); 0: not a Go target.
    pub rate_addr: u64,
    /// `[start, end)` of `runtime.asmcgocall.abi0` in the target, where a cgo call switches
    /// to the system stack; 0 when the program has none.
    pub cgocall_start: u64,
    pub cgocall_end: u64,
    /// Offsets in the runtime's `g`: `stack.hi`, `sched.sp`, `sched.bp`.
    pub g_stack_hi: u16,
    pub g_sched_sp: u16,
    pub g_sched_bp: u16,
    /// Offset of `special.kind` in the runtime's `special`.
    pub special_kind: u16,
    /// `_KindSpecialProfile`: the special `freeSpecial` gets for a sampled object.
    pub special_profile: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<GoTarget>() == 40);

/// Key of the shared `LIVE` map: an address in one target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub ptr: u64,
    pub target: u64,
}
const _: () = assert!(core::mem::size_of::<LiveKey>() == 16);

/// The bytes one sample stands for: `size / p` with `p = 1 - exp(-size / sample_bytes)` its
/// probability to be sampled (`size` at full recording), computed the same way in the probes
/// (from `WEIGHT_TABLE`) and here, so that every view adds the same figures.
/// `table` is [`weight_table`]'s.
pub fn sample_weight(size: u64, sample_bytes: u64, table: &[u32]) -> u64 {
    if sample_bytes == 0 || size >= sample_bytes.saturating_mul(WEIGHT_X_MAX) {
        return size;
    }
    // x = size / sample_bytes in 16.16 fixed point, then linear interpolation between the
    // table's points (64 per unit of x).
    let pos = (size << 16) / sample_bytes;
    let i = (pos >> 10) as usize;
    let frac = pos & 1023;
    let (Some(&a), Some(&b)) = (table.get(i), table.get(i + 1)) else { return size };
    let f = (a as u64 * (1024 - frac) + b as u64 * frac) >> 10;
    ((sample_bytes * f) >> WEIGHT_TABLE_SHIFT).max(size)
}

/// How many allocations one sample stands for, in 16.16 fixed point: `weight / size`.
pub const fn sample_count_weight(weight: u64, size: u64) -> u64 {
    if size == 0 || weight <= size {
        1 << 16
    } else {
        (weight << 16) / size
    }
}

/// `WEIGHT_TABLE_LEN` points of `f(x) = x / (1 - exp(-x))` at `x = i / 64`, in fixed point
/// (`f(0) = 1`): a sample of `size` at interval `T` weighs `T * f(size / T)`.
#[cfg(feature = "user")]
pub fn weight_table() -> [u32; WEIGHT_TABLE_LEN] {
    let mut t = [0u32; WEIGHT_TABLE_LEN];
    for (i, v) in t.iter_mut().enumerate() {
        let x = i as f64 / 64.0;
        let f = if i == 0 { 1.0 } else { x / (1.0 - (-x).exp()) };
        *v = (f * (1u64 << WEIGHT_TABLE_SHIFT) as f64).round() as u32;
    }
    t
}

/// Points of the weight table: x from 0 to `WEIGHT_X_MAX` in steps of 1/64, both ends in.
pub const WEIGHT_TABLE_LEN: usize = 16 * 64 + 1;
/// Past `x = 16` a sample's probability is 1 within 1e-7: it weighs its size.
pub const WEIGHT_X_MAX: u64 = 16;
pub const WEIGHT_TABLE_SHIFT: u32 = 16;

/// A live allocation, keyed by its address in the `LIVE` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    /// Requested size in bytes.
    pub size: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the allocation returned.
    pub timestamp_ns: u64,
    /// Which stack allocated it (also the key of its `STACK_STATS` entry).
    pub stack: StackKey,
    /// The bytes this sample stands for ([`sample_weight`] at the interval in force when it
    /// was taken).
    pub weight: u64,
}
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 48);

/// Identifies an allocation site: the unwound stack plus the immediate caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    /// Return address into the allocator's caller (the instruction pointer in the return probe).
    pub caller: u64,
    /// Key in the `STACKS` map (a hash of the frames), or 0 when the stack was not recorded.
    pub stack_id: u64,
    /// The target ([`target_id`]): one process's sites are not another's.
    pub target: u64,
}
const _: () = assert!(core::mem::size_of::<StackKey>() == 24);

/// Frames kept per stack: deeper stacks lose their outermost frames.
pub const MAX_FRAMES: usize = 64;

/// One user stack, as the probes unwind it at the allocator's return: `ips[0]` is the caller
/// (the return address), then the return addresses of the frames further out; zero-filled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackFrames {
    pub ips: [u64; MAX_FRAMES],
}
const _: () = assert!(core::mem::size_of::<StackFrames>() == 8 * MAX_FRAMES);

impl Default for StackFrames {
    fn default() -> Self {
        StackFrames { ips: [0; MAX_FRAMES] }
    }
}

/// Per-stack totals of everything allocated since attach, kept in the kernel per CPU.
/// (What is still live per stack comes from walking `LIVE` at snapshot time.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Samples and their requested bytes.
    pub sampled_bytes: u64,
    pub sampled_allocs: u64,
    /// What they stand for: summed [`sample_weight`]s, and [`sample_count_weight`]s (16.16).
    pub weight_bytes: u64,
    pub weight_allocs: u64,
}
const _: () = assert!(core::mem::size_of::<StackStats>() == 32);

/// State of an allocator call between its entry and its return, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlight {
    pub size: u64,
    /// `realloc`'s old pointer or `posix_memalign`'s `memptr`.
    pub ptr_arg: u64,
    pub stack: StackKey,
    /// [`AllocKind`] as u8.
    pub kind: u32,
    /// Allocator calls nested inside this one (glibc's realloc(NULL, n) calls malloc); the inner
    /// calls are not recorded, the outer one is.
    pub depth: u32,
    /// 1 when this call was chosen by sampling and must be recorded.
    pub sampled: u32,
    /// 1 between a recorded call's entry and its return; a thread's slot stays in the map
    /// (inactive) between calls.
    pub active: u32,
    /// The sampling interval in force at the entry (the weight is computed from it).
    pub sample_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<InFlight>() == 64);

/// Indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Successful allocations seen (sampled or not).
    Allocs = 0,
    AllocBytes = 1,
    /// Frees of allocations that were being tracked.
    Frees = 2,
    FreeBytes = 3,
    /// Frees of addresses not tracked: allocated before attach, or not sampled.
    UntrackedFrees = 4,
    /// Allocator calls that returned NULL (not recorded as allocations).
    FailedAllocs = 5,
    /// Allocations recorded with sampling (equal to Allocs at `--sampling full`).
    SampledAllocs = 6,
    SampledBytes = 7,
    // Everything from here on is a drop: an event that could not be recorded.
    DropLiveFull = 8,
    DropStackMapFull = 9,
    DropStatsFull = 10,
    DropInflightFull = 11,
    DropNoInflight = 12,
    // Stack walks (one per recorded allocation) that stopped before the outermost frame, by
    // reason, and frames found by frame pointers where no CFI was known (see `unwind`).
    /// The next frame's code has no unwind information (a gap in `.eh_frame`).
    TruncatedNoCfi = 13,
    /// A step could not be verified: the CFA did not move up the stack, a register rule that
    /// cannot be evaluated, a frame pointer outside the stack, a read that faulted.
    TruncatedBadFrame = 14,
    /// `MAX_FRAMES` frames and still not at the outermost one.
    TruncatedDepth = 15,
    /// A return address outside every executable mapping known for the target.
    TruncatedUnmapped = 16,
    /// Frames unwound by frame pointers, in code with no CFI (JIT code, stripped files).
    FramePointerFrames = 17,
    /// What the samples stand for (see [`sample_weight`]): bytes and allocations (16.16
    /// fixed point) recorded, and the same of those freed since. Live = recorded - freed, the
    /// same sum a snapshot adds entry by entry.
    WeightBytes = 18,
    WeightAllocs = 19,
    WeightFreeBytes = 20,
    WeightFrees = 21,
}

pub const COUNTER_COUNT: u32 = 24;
pub const FIRST_DROP_COUNTER: u32 = Counter::DropLiveFull as u32;

impl Counter {
    pub const DROPS: [Counter; 5] = [
        Counter::DropLiveFull,
        Counter::DropStackMapFull,
        Counter::DropStatsFull,
        Counter::DropInflightFull,
        Counter::DropNoInflight,
    ];

    /// Stable name of a drop reason, used in `leaks.json`'s `dropped` object and in metrics.
    pub const fn drop_reason(self) -> &'static str {
        match self {
            Counter::DropLiveFull => "live_map_full",
            Counter::DropStackMapFull => "stack_map_full",
            Counter::DropStatsFull => "stack_stats_full",
            Counter::DropInflightFull => "inflight_map_full",
            Counter::DropNoInflight => "return_without_entry",
            _ => "not_a_drop",
        }
    }

    /// The counters of how stack walks ended early, and the frame-pointer fallback.
    pub const UNWIND: [Counter; 5] = [
        Counter::TruncatedNoCfi,
        Counter::TruncatedBadFrame,
        Counter::TruncatedDepth,
        Counter::TruncatedUnmapped,
        Counter::FramePointerFrames,
    ];

    /// Stable name of an unwind counter, used in `leaks.json`'s `unwind` object and in metrics.
    pub const fn unwind_reason(self) -> &'static str {
        match self {
            Counter::TruncatedNoCfi => "truncated_no_cfi",
            Counter::TruncatedBadFrame => "truncated_bad_frame",
            Counter::TruncatedDepth => "truncated_depth",
            Counter::TruncatedUnmapped => "truncated_unmapped",
            Counter::FramePointerFrames => "frame_pointer_frames",
            _ => "not_an_unwind_counter",
        }
    }
}

/// How the probes find the caller's frame at each step: one row of a file's unwind table,
/// compiled by the agent from its CFI (`.eh_frame` or `.debug_frame`). A row holds from its `pc`
/// to the next row's. 8 bytes: a table of a few million rows stays in tens of MiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    /// Start of the row: the file's virtual address (`st_value` space), lower 32 bits.
    pub pc: u32,
    /// The CFA's offset from the register `kind` names (for [`row::PLT`]: the threshold of
    /// the PLT expression; for [`row::DEREF_RBP`]: an `i16`).
    pub cfa_offset: u16,
    /// One of [`row`].
    pub kind: u8,
    /// Where the caller's rbp is: [`rbp::SAME`] (untouched), saved at `CFA + 8 * rbp`,
    /// [`rbp::AT_RBP`] or [`rbp::UNKNOWN`].
    pub rbp: i8,
}
const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);

/// [`UnwindRow::kind`]s.
pub mod row {
    /// No unwind information here (between functions, or code the CFI does not cover).
    pub const NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// A PLT stub: CFA = rsp + 8, + 8 more when `(rip & 15) >= offset` (the expression every
    /// linker emits for `.plt`).
    pub const PLT: u8 = 3;
    /// The outermost frame (the return address is undefined: `_start`, `clone3`'s child).
    pub const END: u8 = 4;
    /// A signal trampoline (`__restore_rt`): the interrupted registers are in the `ucontext`
    /// at rsp.
    pub const SIGNAL: u8 = 5;
    /// CFA = *(rbp + (offset as i16)) (functions that realign the stack: gcc's `main`).
    pub const DEREF_RBP: u8 = 6;
    /// Unwind information this unwinder cannot evaluate: the stack ends here.
    pub const UNSUPPORTED: u8 = 7;
}

/// [`UnwindRow::rbp`]'s special values.
pub mod rbp {
    pub const SAME: i8 = 0;
    /// rbp is restored from `*(rbp)` (with [`super::row::DEREF_RBP`]).
    pub const AT_RBP: i8 = i8::MIN;
    /// A rule the unwinder cannot evaluate: the caller's rbp is unknown.
    pub const UNKNOWN: i8 = i8::MAX;
}

/// One executable mapping of the target, as the unwinder sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Address minus file virtual address (`pc - bias` is what the file's rows are keyed by).
    pub bias: u64,
    /// The file's rows in `UNWIND_ROWS`: `[rows_start, rows_start + rows_len)`.
    pub rows_start: u32,
    pub rows_len: u32,
    /// One of [`mapping`].
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UnwindMapping>() == 40);

/// [`UnwindMapping::kind`]s.
pub mod mapping {
    /// Unwound by its rows.
    pub const CFI: u32 = 0;
    /// No unwind information (JIT code, a file without CFI): frame pointers.
    pub const FRAME_POINTERS: u32 = 1;
}

/// Mappings per half of a target's range of `UNWIND_MAPPINGS` (the agent fills one half while
/// the probes read the other, then flips the target's `UNWIND_STATE`): 80 KiB per target slot
/// (2 x 1024 x 40 bytes), 20 MiB for 256 slots. Node.js maps ~100 executable ranges, a large C++ service a few hundred.
pub const MAX_UNWIND_MAPPINGS: u32 = 1024;
// A slot's range is whole pages (the agent maps only its own).
const _: () = assert!((2 * MAX_UNWIND_MAPPINGS as usize * core::mem::size_of::<UnwindMapping>()).is_multiple_of(4096));
/// Binary-search steps over a half of `UNWIND_MAPPINGS` (2^10 = 1024).
pub const MAPPING_SEARCH_STEPS: u32 = 10;
/// `UNWIND_STATE` entries per target: `[active half, mappings in half 0, in half 1, unused]`.
pub const UNWIND_STATE_STRIDE: u32 = 4;
/// Binary-search steps over one file's rows: files have at most 2^22 rows (4 Mi; a 100 MiB
/// executable has ~1.5 Mi).
pub const ROW_SEARCH_STEPS: u32 = 22;
pub const MAX_ROWS_PER_FILE: u32 = 1 << ROW_SEARCH_STEPS;

/// How the probes find the JavaScript function of a V8 frame (per target slot, `JS_FRAME_CONFIG`;
/// the agent fills it from the target executable's `v8dbg_*` symbols, see `profiler-user`'s
/// `symbolize::v8`). For each frame walked by frame pointers (JIT code, V8's builtins) of a
/// target with `enabled != 0`, the probe reads the two words at `fp + function_offset`: the
/// frame's function slot and, 8 bytes above it, its context slot. A frame whose two slots
/// both carry the heap-object tag is a JavaScript frame (other V8 frames keep a Smi frame
/// marker in the context slot); the probe then reads the function's `SharedFunctionInfo`
/// (`*(function + shared_offset)`), keeps it for that frame in `JS_FRAMES` and mixes it into
/// the stack's identity: two interpreted functions, whose frames return into the same
/// interpreter code, do not share a stack; closures of one function literal do.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsFrameConfig {
    pub enabled: u32,
    /// The function slot's offset from the frame pointer (V8: -16; the context slot is at
    /// `function_offset + 8`).
    pub function_offset: i32,
    /// `JSFunction::shared`'s offset minus the heap-object tag.
    pub shared_offset: u64,
    /// Heap-object tag and its mask (V8: 1 and 3).
    pub tag_mask: u64,
    pub tag: u64,
}
const _: () = assert!(core::mem::size_of::<JsFrameConfig>() == 32);

/// Snapshot trigger slots (`--on-return`, `--on-usdt`) of one loaded object, all targets together.
pub const MAX_TRIGGERS: u32 = 4096;

/// The USDT heap-sampling contract (`ddheap:alloc(ptr, size, weight)` / `ddheap:free(ptr)`, or
/// `otel_memory:*` with the same arguments): the service samples its own allocations and the
/// probes only see samples. Where one probe site finds its arguments, as its `.note.stapsdt`
/// describes them (`8@%rdi`, `-4@$5`, `8@-16(%rbp)`), compiled by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    /// One of [`usdt_arg`].
    pub kind: u32,
    /// For registers: the register's index in `struct pt_regs` (in u64 slots).
    pub reg: u16,
    /// The argument's size in bytes (1, 2, 4 or 8).
    pub size: u8,
    /// 1 when the value is sign-extended from `size` bytes.
    pub signed: u8,
    /// The constant ([`usdt_arg::CONST`]) or the displacement ([`usdt_arg::REG_DEREF`]).
    pub value: i64,
}
const _: () = assert!(core::mem::size_of::<UsdtArg>() == 16);

/// [`UsdtArg::kind`]s.
pub mod usdt_arg {
    /// The argument is missing: reads as 0.
    pub const NONE: u32 = 0;
    pub const CONST: u32 = 1;
    /// The register's value.
    pub const REG: u32 = 2;
    /// The value at `register + value` in the target's memory.
    pub const REG_DEREF: u32 = 3;
}

/// The arguments of one contract probe site (`alloc` has three, `free` one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArg; 3],
}
const _: () = assert!(core::mem::size_of::<UsdtSpec>() == 48);

/// Contract probe sites one target may have (its alloc and free sites in every object that
/// carries the contract): the target's specs are `USDT_SPECS[slot * USDT_SPECS_PER_TARGET ..]`,
/// and a site's attach cookie is [`usdt_cookie`].
pub const USDT_SPECS_PER_TARGET: u32 = 16;

/// Attach cookie of a contract probe site: bits 0..8 = the site's index among its target's
/// specs, bits 8..48 = the target (as [`encode_cookie`]).
pub const fn usdt_cookie(site: u32, target: u64) -> u64 {
    (site as u64 & 0xff) | (target << 8)
}

/// Entries in the exponential table used for Poisson byte sampling.
pub const EXP_TABLE_LEN: usize = 1024;
/// Fixed-point scale of the exponential table's values.
pub const EXP_TABLE_SHIFT: u32 = 16;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all fields are plain integers with explicit padding.
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::StackFrames {}
    unsafe impl aya::Pod for super::StackStats {}
    unsafe impl aya::Pod for super::InFlight {}
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::TargetConfig {}
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::UsdtSpec {}
    unsafe impl aya::Pod for super::GoTarget {}
    unsafe impl aya::Pod for super::JsFrameConfig {}
}
