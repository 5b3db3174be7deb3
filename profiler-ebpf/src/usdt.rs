//! The USDT heap-sampling contract: services that sample their own allocations (Datadog's
//! `libdd-profiling-heap-sampler`, the OpenTelemetry profiler's `otel_memory` design) fire
//! `alloc(ptr, size, weight)` for sampled allocations only and `free(ptr)` for the frees of
//! sampled pointers. These two programs are attached at those sites (uprobe_multi links whose
//! reference counter is the probes' semaphore, so the service samples only while they are
//! attached): the target pays one trap per sample instead of two per `malloc`+`free` pair.
//!
//! The arguments are where the site's note says (`USDT_SPECS`, compiled by the agent); the
//! stack is unwound from the probe site with the same unwinder as the allocator probes, and the
//! producer's weight is kept as each sample's weight. Sampling in the kernel does not apply:
//! the service already sampled.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
    EbpfContext as _,
};
use profiler_common::{
    decode_cookie, usdt_arg, Counter, StackKey, UsdtArg, USDT_SPECS_PER_TARGET,
};

use crate::{
    maps::USDT_SPECS,
    probes::{cookie, count, forget, remember, target, Target},
    stack,
};

/// Registers in `struct pt_regs` (x86-64): 21 u64 slots.
const PT_REGS_SLOTS: u16 = 21;

/// One argument's value, as `spec` says where it is.
#[inline(always)]
fn read_arg(regs: *const pt_regs, spec: &UsdtArg) -> u64 {
    let raw = match spec.kind {
        usdt_arg::CONST => spec.value as u64,
        usdt_arg::REG | usdt_arg::REG_DEREF => {
            if spec.reg >= PT_REGS_SLOTS {
                return 0;
            }
            // A variable offset into the context is not allowed to a direct load: read it.
            let at = unsafe { (regs as *const u64).add(spec.reg as usize) };
            let reg = unsafe { bpf_probe_read_kernel(at) }.unwrap_or(0);
            if spec.kind == usdt_arg::REG {
                reg
            } else {
                let addr = reg.wrapping_add(spec.value as u64);
                unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
            }
        }
        _ => return 0,
    };
    let bits = (spec.size as u32).clamp(1, 8) * 8;
    if bits == 64 {
        return raw;
    }
    let shift = 64 - bits;
    if spec.signed != 0 {
        (((raw << shift) as i64) >> shift) as u64
    } else {
        (raw << shift) >> shift
    }
}

#[inline(always)]
fn site(ctx: &ProbeContext) -> Option<(Target, [UsdtArg; 3])> {
    let cookie = cookie(ctx.as_ptr());
    let t = target(cookie)?;
    let k = decode_cookie(cookie) as u32;
    if k >= USDT_SPECS_PER_TARGET {
        return None;
    }
    let spec = USDT_SPECS.get(t.slot * USDT_SPECS_PER_TARGET + k)?;
    Some((t, spec.args))
}

/// `alloc(ptr, size, weight)`: one sampled allocation, standing for `weight` bytes.
#[uprobe]
pub fn usdt_alloc(ctx: ProbeContext) -> u32 {
    let Some((t, args)) = site(&ctx) else { return 0 };
    let regs = ctx.regs as *const pt_regs;
    let ptr = read_arg(regs, &args[0]);
    let size = read_arg(regs, &args[1]);
    // A producer's weight below the size would undo nothing: the sample is at least itself.
    let weight = read_arg(regs, &args[2]).max(size);
    if ptr == 0 {
        count(&t, Counter::FailedAllocs, 1);
        return 0;
    }
    // What the sample stands for, as the allocator probes count every call they see.
    count(&t, Counter::Allocs, profiler_common::sample_count_weight(weight, size) >> 16);
    count(&t, Counter::AllocBytes, weight);
    let stack_id = stack::record_shallow(&t, regs);
    remember(&t, ptr, size, weight, StackKey { caller: 0, stack_id, target: t.id });
    0
}

/// `free(ptr)`: a sampled pointer is freed.
#[uprobe]
pub fn usdt_free(ctx: ProbeContext) -> u32 {
    let Some((t, args)) = site(&ctx) else { return 0 };
    let ptr = read_arg(ctx.regs as *const pt_regs, &args[0]);
    if ptr != 0 {
        forget(&t, ptr, true);
    }
    0
}
