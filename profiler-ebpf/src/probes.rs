//! The allocator probes. Two ways to attach them, same logic underneath:
//! - `malloc_session`, `alloc_session` (the other allocation functions, told apart by the
//!   attach cookie) and `free_session` (uprobe.session, Linux 6.13+): one program sees both the
//!   entry and the return of an allocator call, and its entry tells the kernel whether to stop
//!   at the return at all: unsampled calls skip that second trap. Their links fire in the
//!   target process only, so they do not check the pid.
//! - `alloc_entry` + `alloc_return` (uprobe + uretprobe) and `free_entry` on older kernels:
//!   every call pays for its return probe.
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
    decode_cookie, AllocInfo, AllocKind, Counter, InFlight, StackKey, StackStats, EXP_TABLE_LEN,
    EXP_TABLE_SHIFT,
};

use crate::maps::{
    ACTIVE_CALLS, COUNTERS, EXP_TABLE, INFLIGHT, LIVE, LIVE_FILTER, LIVE_FILTER_BITS, SAMPLE_BYTES,
    SAMPLE_COUNTDOWN, STACK_STATS, TARGET_TGID,
};
use crate::stack;

#[inline(always)]
pub fn count(counter: Counter, value: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
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
fn is_target(pid_tgid: u64) -> bool {
    let target = TARGET_TGID.load();
    target == 0 || (pid_tgid >> 32) as u32 == target
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
fn sampling() -> bool {
    SAMPLE_BYTES.load() != 0
}

#[inline(always)]
fn active_calls() -> u64 {
    ACTIVE_CALLS.get(0).copied().unwrap_or(1)
}

#[inline(always)]
fn add_active_calls(delta: u64) {
    if let Some(n) = ACTIVE_CALLS.get_ptr_mut(0) {
        unsafe { add(n, delta) };
    }
}

/// Poisson byte sampling: an allocation of `size` bytes is sampled with probability
/// `1 - exp(-size / SAMPLE_BYTES)`; the user side scales sampled values back up.
#[inline(always)]
fn sample(size: u64) -> bool {
    let mean = SAMPLE_BYTES.load();
    if mean == 0 {
        return true;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(0) else {
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
    // A return is pending only for a call whose entry asked for it. While sampling, those are
    // counted in ACTIVE_CALLS: when no call of any thread is in flight, this is an entry.
    // Otherwise: at the return the kernel has restored the instruction pointer to the caller's
    // return address; at the entry it is the probed address, which bpf_get_func_ip reports in
    // both.
    let surely_entry = sampling() && active_calls() == 0;
    if !surely_entry && unsafe { (*ctx.regs).rip != bpf_get_func_ip(ctx.as_ptr()) } {
        let _ = on_alloc_return(ctx.regs, bpf_get_current_pid_tgid());
        return SKIP_RETURN;
    }
    let kind = kind.or_else(|| AllocKind::from_u8(decode_cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) })));
    match kind {
        Some(AllocKind::Free | AllocKind::OperatorDelete) | None => SKIP_RETURN,
        Some(kind) => match on_alloc_entry(&ctx, 0, kind) {
            Ok(true) => WANT_RETURN,
            Ok(false) | Err(()) => SKIP_RETURN,
        },
    }
}

/// `free` never needs its return: its own link, no cookie, no pid, no return check.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn free_session(ctx: *mut c_void) -> u32 {
    on_free(arg(&ProbeContext::new(ctx), 0));
    SKIP_RETURN
}

#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_target(pid_tgid) {
        let kind = decode_cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
        if let Some(kind) = AllocKind::from_u8(kind) {
            let _ = on_alloc_entry(&ctx, pid_tgid, kind);
        }
    }
    0
}

/// Decides whether the call is sampled and parks what its return needs in `INFLIGHT`.
/// Ok(true) when the return must be seen. `pid_tgid` is 0 when not read yet.
#[inline(always)]
fn on_alloc_entry(ctx: &ProbeContext, pid_tgid: u64, kind_enum: AllocKind) -> Result<bool, ()> {
    let kind = kind_enum as u8;
    let (size, ptr_arg) = match kind_enum {
        // A throwing `operator new` unwinds instead of returning: its slot stays active and the
        // thread's next call is taken for a nested one, once (the kernel drops the return).
        AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc | AllocKind::OperatorNew => (arg(ctx, 0), 0),
        AllocKind::Calloc => (arg(ctx, 0).wrapping_mul(arg(ctx, 1)), 0),
        AllocKind::Realloc => (arg(ctx, 1), arg(ctx, 0)),
        AllocKind::Reallocarray => (arg(ctx, 1).wrapping_mul(arg(ctx, 2)), arg(ctx, 0)),
        AllocKind::PosixMemalign => (arg(ctx, 2), arg(ctx, 0)),
        AllocKind::AlignedAlloc | AllocKind::Memalign => (arg(ctx, 1), 0),
        AllocKind::Free | AllocKind::OperatorDelete => return Err(()),
    };
    // Is this call nested in one being recorded? While sampling, most calls take the cheap
    // path below, and no call of any thread is being recorded most of the time: then the
    // answer is no without a lookup.
    // A null pointer, not `Option<*mut _>`: a `None` leaves the pointer undefined, which LLVM
    // may read on a path the verifier then rejects.
    let looked_up = !sampling() || active_calls() != 0;
    let pid_tgid = if looked_up { thread_key(pid_tgid) } else { pid_tgid };
    let slot = if looked_up { inflight_slot(pid_tgid) } else { null_mut() };
    if !slot.is_null() && unsafe { (*slot).active } != 0 {
        // An allocator function called from inside another one: the outer call records.
        unsafe { (*slot).depth += 1 };
        return Ok(true);
    }
    let sampled = sample(size);
    let frees_old = matches!(kind_enum, AllocKind::Realloc | AllocKind::Reallocarray);
    if !sampled && !frees_old && kind_enum != AllocKind::PosixMemalign {
        // Cheap path: nothing to remember and no need to see the return. The call is counted
        // here (a NULL result of an unsampled call still counts as an allocation).
        count(Counter::Allocs, 1);
        count(Counter::AllocBytes, size);
        return Ok(false);
    }
    // The stack is walked at the return (see `on_alloc_return`).
    let stack = StackKey { caller: 0, stack_id: 0 };
    let call = InFlight {
        size,
        ptr_arg,
        stack,
        kind: kind as u32,
        depth: 0,
        sampled: sampled as u32,
        active: 1,
    };
    // A thread's slot is reused in place from call to call: an insert and a delete per call
    // cost more than the rest of the probe's map work.
    let pid_tgid = thread_key(pid_tgid);
    let slot = if looked_up { slot } else { inflight_slot(pid_tgid) };
    if !slot.is_null() {
        unsafe { *slot = call };
    } else if INFLIGHT.insert(&pid_tgid, &call, 0).is_err() {
        count(Counter::DropInflightFull, 1);
        return Ok(false);
    }
    if sampling() {
        add_active_calls(1);
    }
    Ok(true)
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_target(pid_tgid) {
        let _ = on_alloc_return(ctx.regs, pid_tgid);
    }
    0
}

/// Reads the result of a call parked by `on_alloc_entry` and records the allocation.
#[inline(always)]
fn on_alloc_return(regs: *const pt_regs, pid_tgid: u64) -> Result<(), ()> {
    let slot = match INFLIGHT.get_ptr_mut(&pid_tgid) {
        Some(slot) if unsafe { (*slot).active } != 0 => slot,
        _ => {
            if !sampling() {
                count(Counter::DropNoInflight, 1);
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
    if sampling() {
        add_active_calls(1u64.wrapping_neg());
    }
    // The frame-pointer walk misses the allocator's caller (whose frame rbp points to); a
    // return probe has replaced [rsp] at entry with its trampoline. At the return the kernel
    // has restored the instruction pointer to the real return address: the caller.
    let (ret, caller) = unsafe { ((*regs).rax, (*regs).rip) };
    call.stack.caller = caller;
    let kind = AllocKind::from_u8(call.kind as u8).ok_or(())?;
    let ptr = match kind {
        AllocKind::PosixMemalign => {
            if ret as u32 != 0 {
                count(Counter::FailedAllocs, 1);
                return Ok(());
            }
            unsafe { bpf_probe_read_user(call.ptr_arg as *const u64) }.unwrap_or(0)
        }
        AllocKind::Realloc | AllocKind::Reallocarray => {
            if ret == 0 {
                if call.size == 0 && call.ptr_arg != 0 {
                    // realloc(p, 0) frees p and returns NULL (glibc through free, which the
                    // free probe already saw).
                    forget(call.ptr_arg, false);
                } else {
                    count(Counter::FailedAllocs, 1);
                }
                return Ok(());
            }
            if call.ptr_arg != 0 {
                forget(call.ptr_arg, false);
            }
            ret
        }
        _ => ret,
    };
    if ptr == 0 {
        count(Counter::FailedAllocs, 1);
        return Ok(());
    }
    count(Counter::Allocs, 1);
    count(Counter::AllocBytes, call.size);
    if call.sampled != 0 {
        // Walked here, not at the entry: the caller's frame is the same, and its return
        // address is in rip instead of a user-memory read away (see `stack::record`).
        call.stack.stack_id = stack::record(regs);
        remember(ptr, call.size, call.stack);
    }
    Ok(())
}

#[inline(always)]
fn remember(ptr: u64, size: u64, stack: StackKey) {
    let info = AllocInfo { size, timestamp_ns: unsafe { bpf_ktime_get_ns() }, stack };
    if LIVE.insert(&ptr, &info, 0).is_err() {
        count(Counter::DropLiveFull, 1);
        return;
    }
    let filter = live_filter_slot(ptr);
    if !filter.is_null() {
        unsafe { add(filter, 1) };
    }
    count(Counter::SampledAllocs, 1);
    count(Counter::SampledBytes, size);
    let stats = match STACK_STATS.get_ptr_mut(&stack) {
        Some(s) => s,
        None => {
            // BPF_NOEXIST: another CPU may have created the entry meanwhile.
            let _ = STACK_STATS.insert(&stack, &StackStats::default(), 1);
            match STACK_STATS.get_ptr_mut(&stack) {
                Some(s) => s,
                None => {
                    count(Counter::DropStatsFull, 1);
                    return;
                }
            }
        }
    };
    // This CPU's copy: no other CPU writes it.
    unsafe {
        (*stats).total_bytes += size;
        (*stats).total_allocs += 1;
    }
}

/// While sampling, `ptr`'s counter in `LIVE_FILTER` (null otherwise: then most addresses are
/// tracked and the filter would only add work).
#[inline(always)]
fn live_filter_slot(ptr: u64) -> *mut u64 {
    if !sampling() {
        return null_mut();
    }
    // Fibonacci hashing: the top bits of the product mix every bit of the address.
    let idx = (ptr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LIVE_FILTER_BITS)) as u32;
    LIVE_FILTER.get_ptr_mut(idx).unwrap_or(null_mut())
}

/// Drops a tracked allocation; counts frees of addresses that were never tracked (not for
/// realloc's old pointer, whose free the allocator may already have reported through `free`).
#[inline(always)]
fn forget(ptr: u64, count_untracked: bool) {
    // Most frees are of unsampled memory: a zero counter says so without a `LIVE` lookup
    // (a hash-map lookup is a function call, an array lookup is inlined).
    let filter = live_filter_slot(ptr);
    let tracked = filter.is_null() || unsafe { *filter } != 0;
    let size = if tracked { (unsafe { LIVE.get(&ptr) }).map(|info| info.size) } else { None };
    let Some(size) = size else {
        if count_untracked {
            count(Counter::UntrackedFrees, 1);
        }
        return;
    };
    if LIVE.remove(&ptr).is_err() {
        // Another thread freed it first (a double free in the target).
        return;
    }
    if !filter.is_null() {
        unsafe { add(filter, 1u64.wrapping_neg()) };
    }
    count(Counter::Frees, 1);
    count(Counter::FreeBytes, size);
}

#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    if is_target(bpf_get_current_pid_tgid()) {
        on_free(arg(&ctx, 0));
    }
    0
}

#[inline(always)]
fn on_free(ptr: u64) {
    if ptr != 0 {
        forget(ptr, true);
    }
}
