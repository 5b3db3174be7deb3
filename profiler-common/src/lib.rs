//! Types shared by the eBPF probes (`profiler-ebpf`) and the user-space agent (`profiler-user`).
//!
//! Everything here crosses the kernel/user boundary through BPF maps, globals or attach cookies,
//! so every struct is `#[repr(C)]`, has explicit padding and a size assertion, and uses integer
//! flags instead of `bool`. With the `user` feature the structs implement `aya::Pod`.
#![no_std]

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
}

impl AllocKind {
    pub const ALL: [AllocKind; 12] = [
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

/// Attach cookie layout: bits 0..8 = [`AllocKind`]; the rest is reserved.
pub const fn encode_cookie(kind: AllocKind) -> u64 {
    kind as u64
}

pub const fn decode_cookie(cookie: u64) -> u8 {
    (cookie & 0xff) as u8
}

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
}
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 32);

/// Identifies an allocation site: the unwound stack plus the immediate caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    /// Return address into the allocator's caller (the instruction pointer in the return probe).
    pub caller: u64,
    /// Key in the `STACKS` map (a hash of the frames), or 0 when the stack was not recorded.
    pub stack_id: u64,
}
const _: () = assert!(core::mem::size_of::<StackKey>() == 16);

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

/// Per-stack totals of everything allocated since attach, kept in the kernel per CPU.
/// (What is still live per stack comes from walking `LIVE` at snapshot time.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub total_bytes: u64,
    pub total_allocs: u64,
}
const _: () = assert!(core::mem::size_of::<StackStats>() == 16);

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
}
const _: () = assert!(core::mem::size_of::<InFlight>() == 48);

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

/// Mappings per half of `UNWIND_MAPPINGS` (the agent fills one half while the probes read the
/// other, then flips `UNWIND_STATE[0]`).
pub const MAX_UNWIND_MAPPINGS: u32 = 2048;
/// Binary-search steps over a half of `UNWIND_MAPPINGS` (2^11 = 2048).
pub const MAPPING_SEARCH_STEPS: u32 = 11;
/// Binary-search steps over one file's rows: files have at most 2^22 rows (4 Mi; a 100 MiB
/// executable has ~1.5 Mi).
pub const ROW_SEARCH_STEPS: u32 = 22;
pub const MAX_ROWS_PER_FILE: u32 = 1 << ROW_SEARCH_STEPS;

/// Snapshot triggers (`--on-return`, `--on-usdt`) one target can have.
pub const MAX_TRIGGERS: u32 = 64;

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
}
