//! The three programs: allocation entry, allocation return, free.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_probe_read_user,
    },
    macros::{uprobe, uretprobe},
    programs::{tracing::StackIdContext as _, ProbeContext, RetProbeContext},
    EbpfContext as _,
};
use profiler_common::{
    decode_cookie, AllocInfo, AllocKind, Counter, InFlight, StackKey, StackStats, EXP_TABLE_LEN,
    EXP_TABLE_SHIFT,
};

use crate::maps::{
    COUNTERS, EXP_TABLE, INFLIGHT, LIVE, SAMPLE_BYTES, SAMPLE_COUNTDOWN, STACKS, STACK_STATS,
    TARGET_TGID,
};

const BPF_F_USER_STACK: u64 = 1 << 8;
const EEXIST: i32 = 17;

#[inline(always)]
fn count(counter: Counter, value: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += value };
    }
}

/// Atomic add shared by all CPUs (BPF_ATOMIC_ADD); subtraction adds the two's complement.
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
        *left -= size as i64;
        if *left > 0 {
            return false;
        }
        let idx = bpf_get_prandom_u32() & (EXP_TABLE_LEN as u32 - 1);
        let neg_ln_u = EXP_TABLE.get(idx).copied().unwrap_or(1 << EXP_TABLE_SHIFT);
        *left = ((mean * neg_ln_u as u64) >> EXP_TABLE_SHIFT) as i64;
    }
    true
}

#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    match try_alloc_entry(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_alloc_entry(ctx: &ProbeContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target(pid_tgid) {
        return Ok(());
    }
    if let Some(outer) = INFLIGHT.get_ptr_mut(&pid_tgid) {
        // An allocator function called from inside another one: the outer call records.
        unsafe { (*outer).depth += 1 };
        return Ok(());
    }
    let kind = decode_cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let kind_enum = AllocKind::from_u8(kind).ok_or(())?;
    let (size, ptr_arg) = match kind_enum {
        AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc => (arg(ctx, 0), 0),
        AllocKind::Calloc => (arg(ctx, 0).wrapping_mul(arg(ctx, 1)), 0),
        AllocKind::Realloc => (arg(ctx, 1), arg(ctx, 0)),
        AllocKind::Reallocarray => (arg(ctx, 1).wrapping_mul(arg(ctx, 2)), arg(ctx, 0)),
        AllocKind::PosixMemalign => (arg(ctx, 2), arg(ctx, 0)),
        AllocKind::AlignedAlloc | AllocKind::Memalign => (arg(ctx, 1), 0),
        AllocKind::Free => return Err(()),
    };
    let sampled = sample(size);
    let frees_old = matches!(kind_enum, AllocKind::Realloc | AllocKind::Reallocarray);
    if !sampled && !frees_old && kind_enum != AllocKind::PosixMemalign {
        // Cheap path: nothing to remember. The return probe sees no in-flight entry and only
        // counts the call.
        count(Counter::AllocBytes, size);
        return Ok(());
    }
    let mut stack = StackKey { caller: 0, stack_id: -1, _pad: 0 };
    if sampled {
        stack.stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK) {
            Ok(id) => id as i32,
            Err(e) => {
                count(
                    if -e == EEXIST { Counter::DropStackCollision } else { Counter::DropStackError },
                    1,
                );
                -1
            }
        };
    }
    let call = InFlight {
        size,
        ptr_arg,
        stack,
        kind: kind as u32,
        depth: 0,
        sampled: sampled as u32,
        _pad: 0,
    };
    if INFLIGHT.insert(&pid_tgid, &call, 0).is_err() {
        count(Counter::DropInflightFull, 1);
    }
    Ok(())
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    match try_alloc_return(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_alloc_return(ctx: &RetProbeContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target(pid_tgid) {
        return Ok(());
    }
    let Some(slot) = INFLIGHT.get_ptr_mut(&pid_tgid) else {
        if SAMPLE_BYTES.load() == 0 {
            count(Counter::DropNoInflight, 1);
        } else {
            // An unsampled call (its bytes were counted at entry).
            let ret: u64 = ctx.ret();
            count(if ret != 0 { Counter::Allocs } else { Counter::FailedAllocs }, 1);
        }
        return Ok(());
    };
    let call = unsafe {
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return Ok(());
        }
        *slot
    };
    let _ = INFLIGHT.remove(&pid_tgid);
    let mut call = call;
    // The kernel's frame-pointer walk at entry misses the allocator's caller when the
    // allocator does not start with `push %rbp`; [rsp] at entry would hold it, but a uretprobe
    // has already replaced it with its trampoline. In the return probe the kernel has restored
    // the instruction pointer to the real return address: the caller.
    call.stack.caller = unsafe { (*ctx.regs).rip };
    let ret: u64 = ctx.ret();
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
    count(Counter::SampledAllocs, 1);
    count(Counter::SampledBytes, size);
    let stats = match STACK_STATS.get_ptr_mut(&stack) {
        Some(s) => s,
        None => {
            // BPF_NOEXIST: two CPUs may race to create the entry; the loser just re-reads it.
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
    unsafe {
        add(&raw mut (*stats).live_bytes, size);
        add(&raw mut (*stats).live_allocs, 1);
        add(&raw mut (*stats).total_bytes, size);
        add(&raw mut (*stats).total_allocs, 1);
    }
}

/// Drops a tracked allocation; counts frees of addresses that were never tracked (not for
/// realloc's old pointer, whose free the allocator may already have reported through `free`).
#[inline(always)]
fn forget(ptr: u64, count_untracked: bool) {
    let Some(info) = (unsafe { LIVE.get(&ptr) }).copied() else {
        if count_untracked {
            count(Counter::UntrackedFrees, 1);
        }
        return;
    };
    if LIVE.remove(&ptr).is_err() {
        // Another thread freed it first (a double free in the target).
        return;
    }
    count(Counter::Frees, 1);
    count(Counter::FreeBytes, info.size);
    if let Some(stats) = STACK_STATS.get_ptr_mut(&info.stack) {
        unsafe {
            add(&raw mut (*stats).live_bytes, (info.size as u64).wrapping_neg());
            add(&raw mut (*stats).live_allocs, (1 as u64).wrapping_neg());
        }
    }
}

#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_target(pid_tgid) {
        let ptr = arg(&ctx, 0);
        if ptr != 0 {
            forget(ptr, true);
        }
    }
    0
}
