//! The allocator probes. Two ways to attach them, same logic underneath:
//! - `malloc_session`, `alloc_session` (the other allocation functions, told apart by the
//!   attach cookie) and `free_session` (uprobe.session, Linux 6.13+): one program sees both the
//!   entry and the return of an allocator call, and its entry tells the kernel whether to stop
//!   at the return at all: unsampled calls skip that second trap.
//! - `alloc_entry` + `alloc_return` (uprobe + uretprobe) and `free_entry` on older kernels:
//!   every call pays for its return probe.
//!
//! One loaded object serves every target: each link fires in its target process only, and
//! its attach cookie names the target (slot and generation, see `profiler_common::target_id`),
//! which selects the target's settings, counters and unwind mappings and keys what it records
//! in the shared maps. Reading the cookie costs one helper call per event.
//!
//! Every helper call costs ~20 ns on the hot path (measured with `kernel.bpf_stats_enabled`:
//! an empty program runs in ~46 ns, one with `bpf_get_current_pid_tgid`, `bpf_get_func_ip` and
//! `bpf_get_attach_cookie` in ~90 ns), more than the rest of an unsampled call's work: the
//! fast paths below avoid them, and `malloc`, the most frequent, has a program of its own
//! (reading the cookie and dispatching on it cost ~22 ns).
use core::{
    ffi::c_void,
    ptr::null_mut,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_func_ip, bpf_get_prandom_u32,
        bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{uprobe, uretprobe},
    bindings::pt_regs,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext as _,
};
use profiler_common::{
    cookie_target, decode_cookie, sample_count_weight, target_slot, AllocInfo, AllocKind, Counter, InFlight,
    LiveKey, StackKey, StackStats, COUNTER_COUNT, EXP_TABLE_LEN, EXP_TABLE_SHIFT, WEIGHT_TABLE_SHIFT, WEIGHT_X_MAX,
};

use crate::maps::{
    ACTIVE_CALLS, COUNTERS, EXP_TABLE, INFLIGHT, LIVE, LIVE_FILTER, LIVE_FILTER_BITS, SAMPLE_COUNTDOWN,
    STACK_STATS, TARGETS, TARGET_LIVE, WEIGHT_TABLE,
};
use crate::stack;

/// The target an event belongs to, from its probe's attach cookie.
#[derive(Clone, Copy)]
pub struct Target {
    /// `profiler_common::target_id`: keys this target's entries in the shared maps.
    pub id: u64,
    pub slot: u32,
    /// Mean bytes between samples in force now; 0 records every allocation.
    pub sample_bytes: u64,
    pub live_quota: u64,
}

#[inline(always)]
pub fn target(cookie: u64) -> Option<Target> {
    let id = cookie_target(cookie);
    let slot = target_slot(id);
    let cfg = TARGETS.get(slot)?;
    Some(Target { id, slot, sample_bytes: cfg.sample_bytes, live_quota: cfg.live_quota })
}

#[inline(always)]
pub fn cookie(ctx: *mut c_void) -> u64 {
    unsafe { bpf_get_attach_cookie(ctx) }
}

#[inline(always)]
pub fn count(t: &Target, counter: Counter, value: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(t.slot * COUNTER_COUNT + counter as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += value };
    }
}

/// Atomic add shared by all CPUs (BPF_ATOMIC_ADD).
#[inline(always)]
unsafe fn add(dst: *mut u64, value: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, value) };
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// `known` if it is already read (non-zero: no thread has pid 0), else a helper call.
#[inline(always)]
fn thread_key(known: u64) -> u64 {
    if known != 0 { known } else { bpf_get_current_pid_tgid() }
}

/// This thread's `INFLIGHT` slot, or null.
#[inline(always)]
fn inflight_slot(pid_tgid: u64) -> *mut InFlight {
    INFLIGHT.get_ptr_mut(&pid_tgid).unwrap_or(null_mut())
}

#[inline(always)]
fn active_calls(t: &Target) -> u64 {
    ACTIVE_CALLS.get(t.slot).copied().unwrap_or(1)
}

#[inline(always)]
fn add_active_calls(t: &Target, delta: u64) {
    if let Some(n) = ACTIVE_CALLS.get_ptr_mut(t.slot) {
        unsafe { add(n, delta) };
    }
}

/// Poisson byte sampling: an allocation of `size` bytes is sampled with probability
/// `1 - exp(-size / sample_bytes)`; each sample carries the weight that undoes it ([`weight`]).
#[inline(always)]
fn sample(t: &Target, size: u64) -> bool {
    let mean = t.sample_bytes;
    if mean == 0 {
        return true;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(t.slot) else {
        return true;
    };
    unsafe {
        // Sizes past i64::MAX (malloc(SIZE_MAX)) fail anyway; they must not add to the budget.
        *left -= size.min(i64::MAX as u64) as i64;
        if *left > 0 {
            return false;
        }
        let idx = bpf_get_prandom_u32() & (EXP_TABLE_LEN as u32 - 1);
        let neg_ln_u = EXP_TABLE.get(idx).copied().unwrap_or(1 << EXP_TABLE_SHIFT);
        *left = ((mean * neg_ln_u as u64) >> EXP_TABLE_SHIFT) as i64;
    }
    true
}

/// The bytes a sample of `size` taken at interval `mean` stands for: the same computation
/// as `profiler_common::sample_weight`, with the table in `WEIGHT_TABLE`.
#[inline(always)]
pub(crate) fn weight(size: u64, mean: u64) -> u64 {
    if mean == 0 || size >= mean.saturating_mul(WEIGHT_X_MAX) {
        return size;
    }
    let pos = (size << 16) / mean;
    let i = (pos >> 10) as u32;
    let frac = pos & 1023;
    let (Some(&a), Some(&b)) = (WEIGHT_TABLE.get(i), WEIGHT_TABLE.get(i + 1)) else { return size };
    let f = (a as u64 * (1024 - frac) + b as u64 * frac) >> 10;
    let w = (mean * f) >> WEIGHT_TABLE_SHIFT;
    if w > size { w } else { size }
}

/// Returned by a session program's entry: 0 = run me again at this call's return, 1 = don't.
const WANT_RETURN: u32 = 0;
const SKIP_RETURN: u32 = 1;

/// Not `#[uprobe]`: that macro returns 0 whatever the function returns, and the return value
/// is what a session program says to the kernel.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut c_void) -> u32 {
    on_alloc_session(ProbeContext::new(ctx), None)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn malloc_session(ctx: *mut c_void) -> u32 {
    on_alloc_session(ProbeContext::new(ctx), Some(AllocKind::Malloc))
}

/// `kind`: known for the program's every probe, or None to read it from the attach cookie.
#[inline(always)]
fn on_alloc_session(ctx: ProbeContext, kind: Option<AllocKind>) -> u32 {
    let cookie = cookie(ctx.as_ptr());
    let Some(t) = target(cookie) else { return SKIP_RETURN };
    // A return is pending only for a call whose entry asked for it. While sampling, those are
    // counted in ACTIVE_CALLS: when no call of the target's threads is in flight, this is an
    // entry. Otherwise: at the return the kernel has restored the instruction pointer to the
    // caller's return address; at the entry it is the probed address, which bpf_get_func_ip
    // reports in both.
    let surely_entry = t.sample_bytes != 0 && active_calls(&t) == 0;
    if !surely_entry && unsafe { (*ctx.regs).rip != bpf_get_func_ip(ctx.as_ptr()) } {
        let _ = on_alloc_return(&t, ctx.regs, bpf_get_current_pid_tgid());
        return SKIP_RETURN;
    }
    let kind = kind.or_else(|| AllocKind::from_u8(decode_cookie(cookie)));
    match kind {
        Some(AllocKind::Free | AllocKind::OperatorDelete) | None => SKIP_RETURN,
        Some(kind) => match on_alloc_entry(&t, &ctx, 0, kind) {
            Ok(true) => WANT_RETURN,
            Ok(false) | Err(()) => SKIP_RETURN,
        },
    }
}

/// `free` never needs its return: its own link, no kind, no return check.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn free_session(ctx: *mut c_void) -> u32 {
    let ctx = ProbeContext::new(ctx);
    if let Some(t) = target(cookie(ctx.as_ptr())) {
        on_free(&t, arg(&ctx, 0));
    }
    SKIP_RETURN
}

#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(ctx.as_ptr());
    if let (Some(t), Some(kind)) = (target(cookie), AllocKind::from_u8(decode_cookie(cookie))) {
        let _ = on_alloc_entry(&t, &ctx, 0, kind);
    }
    0
}

/// Decides whether the call is sampled and parks what its return needs in `INFLIGHT`.
/// Ok(true) when the return must be seen. `pid_tgid` is 0 when not read yet.
#[inline(always)]
fn on_alloc_entry(t: &Target, ctx: &ProbeContext, pid_tgid: u64, kind_enum: AllocKind) -> Result<bool, ()> {
    let kind = kind_enum as u8;
    let (size, ptr_arg) = match kind_enum {
        // A throwing `operator new` unwinds instead of returning: its slot stays active and the
        // thread's next call is taken for a nested one, once (the kernel drops the return).
        AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc | AllocKind::OperatorNew => (arg(ctx, 0), 0),
        AllocKind::Calloc => (arg(ctx, 0).wrapping_mul(arg(ctx, 1)), 0),
        AllocKind::Realloc => (arg(ctx, 1), arg(ctx, 0)),
        AllocKind::RustRealloc => (arg(ctx, 3), arg(ctx, 0)),
        AllocKind::Reallocarray => (arg(ctx, 1).wrapping_mul(arg(ctx, 2)), arg(ctx, 0)),
        AllocKind::PosixMemalign => (arg(ctx, 2), arg(ctx, 0)),
        AllocKind::AlignedAlloc | AllocKind::Memalign => (arg(ctx, 1), 0),
        AllocKind::Free | AllocKind::OperatorDelete => return Err(()),
    };
    let sampling = t.sample_bytes != 0;
    // Is this call nested in one being recorded? While sampling, most calls take the cheap
    // path below, and no call of the target's threads is being recorded most of the time:
    // then the answer is no without a lookup.
    // A null pointer, not `Option<*mut _>`: a `None` leaves the pointer undefined, which LLVM
    // may read on a path the verifier then rejects.
    let looked_up = !sampling || active_calls(t) != 0;
    let pid_tgid = if looked_up { thread_key(pid_tgid) } else { pid_tgid };
    let slot = if looked_up { inflight_slot(pid_tgid) } else { null_mut() };
    if !slot.is_null() && unsafe { (*slot).active } != 0 {
        // An allocator function called from inside another one: the outer call records.
        unsafe { (*slot).depth += 1 };
        return Ok(true);
    }
    let sampled = sample(t, size);
    let frees_old = matches!(kind_enum, AllocKind::Realloc | AllocKind::Reallocarray | AllocKind::RustRealloc);
    if !sampled && !frees_old && kind_enum != AllocKind::PosixMemalign {
        // Cheap path: nothing to remember and no need to see the return. The call is counted
        // here (a NULL result of an unsampled call still counts as an allocation).
        count(t, Counter::Allocs, 1);
        count(t, Counter::AllocBytes, size);
        return Ok(false);
    }
    // The stack is walked at the return (see `on_alloc_return`).
    let stack = StackKey { caller: 0, stack_id: 0, target: t.id };
    let call = InFlight {
        size,
        ptr_arg,
        stack,
        kind: kind as u32,
        depth: 0,
        sampled: sampled as u32,
        active: 1,
        sample_bytes: t.sample_bytes,
    };
    // A thread's slot is reused in place from call to call: an insert and a delete per call
    // cost more than the rest of the probe's map work.
    let pid_tgid = thread_key(pid_tgid);
    let slot = if looked_up { slot } else { inflight_slot(pid_tgid) };
    if !slot.is_null() {
        unsafe { *slot = call };
    } else if INFLIGHT.insert(&pid_tgid, &call, 0).is_err() {
        count(t, Counter::DropInflightFull, 1);
        return Ok(false);
    }
    // Counted at full recording too: when the governor starts sampling, returns still
    // pending from before must not be taken for entries.
    add_active_calls(t, 1);
    Ok(true)
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if let Some(t) = target(cookie(ctx.as_ptr())) {
        let _ = on_alloc_return(&t, ctx.regs, bpf_get_current_pid_tgid());
    }
    0
}

/// Reads the result of a call parked by `on_alloc_entry` and records the allocation.
#[inline(always)]
fn on_alloc_return(t: &Target, regs: *const pt_regs, pid_tgid: u64) -> Result<(), ()> {
    let slot = match INFLIGHT.get_ptr_mut(&pid_tgid) {
        Some(slot) if unsafe { (*slot).active } != 0 => slot,
        _ => {
            if t.sample_bytes == 0 {
                count(t, Counter::DropNoInflight, 1);
            }
            // Otherwise an unsampled call, counted at entry (uretprobes see every call).
            return Ok(());
        }
    };
    let mut call = unsafe {
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return Ok(());
        }
        (*slot).active = 0;
        *slot
    };
    add_active_calls(t, 1u64.wrapping_neg());
    // The frame-pointer walk misses the allocator's caller (whose frame rbp points to); a
    // return probe has replaced [rsp] at entry with its trampoline. At the return the kernel
    // has restored the instruction pointer to the real return address: the caller.
    let (ret, caller) = unsafe { ((*regs).rax, (*regs).rip) };
    call.stack.caller = caller;
    let kind = AllocKind::from_u8(call.kind as u8).ok_or(())?;
    let ptr = match kind {
        AllocKind::PosixMemalign => {
            if ret as u32 != 0 {
                count(t, Counter::FailedAllocs, 1);
                return Ok(());
            }
            unsafe { bpf_probe_read_user(call.ptr_arg as *const u64) }.unwrap_or(0)
        }
        AllocKind::Realloc | AllocKind::Reallocarray | AllocKind::RustRealloc => {
            if ret == 0 {
                if call.size == 0 && call.ptr_arg != 0 {
                    // realloc(p, 0) frees p and returns NULL (glibc through free, which the
                    // free probe already saw).
                    forget(t, call.ptr_arg, false);
                } else {
                    count(t, Counter::FailedAllocs, 1);
                }
                return Ok(());
            }
            if call.ptr_arg != 0 {
                forget(t, call.ptr_arg, false);
            }
            ret
        }
        _ => ret,
    };
    if ptr == 0 {
        count(t, Counter::FailedAllocs, 1);
        return Ok(());
    }
    count(t, Counter::Allocs, 1);
    count(t, Counter::AllocBytes, call.size);
    if call.sampled != 0 {
        // Walked here, not at the entry: the caller's frame is the same, and its return
        // address is in rip instead of a user-memory read away (see `stack::record`).
        call.stack.stack_id = stack::record(t, regs);
        remember(t, ptr, call.size, weight(call.size, call.sample_bytes), call.stack);
    }
    Ok(())
}

#[inline(always)]
pub fn remember(t: &Target, ptr: u64, size: u64, weight: u64, stack: StackKey) {
    // The target's share of the shared map: past it, its allocations are dropped (counted),
    // not other targets'.
    let live = TARGET_LIVE.get_ptr_mut(t.slot).unwrap_or(null_mut());
    if live.is_null() || unsafe { *live } >= t.live_quota {
        count(t, Counter::DropLiveFull, 1);
        return;
    }
    let info = AllocInfo { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, stack, weight };
    if LIVE.insert(&LiveKey { ptr, target: t.id }, &info, 0).is_err() {
        count(t, Counter::DropLiveFull, 1);
        return;
    }
    unsafe { add(live, 1) };
    let filter = live_filter_slot(t, ptr);
    if !filter.is_null() {
        unsafe { add(filter, 1) };
    }
    let weight_allocs = sample_count_weight(weight, size);
    count(t, Counter::SampledAllocs, 1);
    count(t, Counter::SampledBytes, size);
    count(t, Counter::WeightBytes, weight);
    count(t, Counter::WeightAllocs, weight_allocs);
    let stats = match STACK_STATS.get_ptr_mut(&stack) {
        Some(s) => s,
        None => {
            // BPF_NOEXIST: another CPU may have created the entry meanwhile.
            let _ = STACK_STATS.insert(&stack, &StackStats::default(), 1);
            match STACK_STATS.get_ptr_mut(&stack) {
                Some(s) => s,
                None => {
                    count(t, Counter::DropStatsFull, 1);
                    return;
                }
            }
        }
    };
    // This CPU's copy: no other CPU writes it.
    unsafe {
        (*stats).sampled_bytes += size;
        (*stats).sampled_allocs += 1;
        (*stats).weight_bytes += weight;
        (*stats).weight_allocs += weight_allocs;
    }
}

/// `ptr`'s counter in `LIVE_FILTER` (kept at full recording too, so that it is right when the
/// governor starts sampling), or null.
#[inline(always)]
fn live_filter_slot(t: &Target, ptr: u64) -> *mut u64 {
    // Fibonacci hashing: the top bits of the product mix every bit of the address.
    let idx = ((ptr ^ t.id).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LIVE_FILTER_BITS)) as u32;
    LIVE_FILTER.get_ptr_mut(idx).unwrap_or(null_mut())
}

/// Drops a tracked allocation; counts frees of addresses that were never tracked (not for
/// realloc's old pointer, whose free the allocator may already have reported through `free`).
#[inline(always)]
pub fn forget(t: &Target, ptr: u64, count_untracked: bool) {
    forget_as(t, ptr, count_untracked, false);
}

/// [`forget`]; `estimated`: the free is counted as what its sample stands for (the Go
/// runtime's samples, whose allocations are counted so too), not as one call.
#[inline(always)]
pub(crate) fn forget_as(t: &Target, ptr: u64, count_untracked: bool, estimated: bool) {
    // While sampling, most frees are of unsampled memory: a zero counter says so without a
    // `LIVE` lookup (a hash-map lookup is a function call, an array lookup is inlined).
    let filter = live_filter_slot(t, ptr);
    let tracked = t.sample_bytes == 0 || filter.is_null() || unsafe { *filter } != 0;
    let key = LiveKey { ptr, target: t.id };
    let info = if tracked { (unsafe { LIVE.get(&key) }).map(|info| (info.size, info.weight)) } else { None };
    let Some((size, weight)) = info else {
        if count_untracked {
            count(t, Counter::UntrackedFrees, 1);
        }
        return;
    };
    if LIVE.remove(&key).is_err() {
        // Another thread freed it first (a double free in the target).
        return;
    }
    if let Some(live) = TARGET_LIVE.get_ptr_mut(t.slot) {
        unsafe { add(live, 1u64.wrapping_neg()) };
    }
    if !filter.is_null() {
        unsafe { add(filter, 1u64.wrapping_neg()) };
    }
    let weight_frees = sample_count_weight(weight, size);
    if estimated {
        count(t, Counter::Frees, (weight_frees + 0xffff) >> 16);
        count(t, Counter::FreeBytes, weight);
    } else {
        count(t, Counter::Frees, 1);
        count(t, Counter::FreeBytes, size);
    }
    count(t, Counter::WeightFreeBytes, weight);
    count(t, Counter::WeightFrees, weight_frees);
}

#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    if let Some(t) = target(cookie(ctx.as_ptr())) {
        on_free(&t, arg(&ctx, 0));
    }
    0
}

#[inline(always)]
fn on_free(t: &Target, ptr: u64) {
    if ptr != 0 {
        forget(t, ptr, true);
    }
}
