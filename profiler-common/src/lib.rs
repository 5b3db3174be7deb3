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

/// Identifies an allocation site: the frame-pointer stack plus the immediate caller, which a
/// frame-pointer walk from inside the allocator misses (the allocator has not pushed rbp yet).
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

/// One user stack, as the probes walk it at the allocator's return: `ips[0]` is the caller (the
/// return address), then the callers recovered from `CALLER_FRAMES` and the return addresses
/// found through the frame-pointer chain, outwards; zero-filled.
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
}

pub const COUNTER_COUNT: u32 = 16;
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
}

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
}
