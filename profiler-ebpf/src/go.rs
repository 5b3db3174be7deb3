//! The Go runtime's heap, seen through the runtime's own allocation sampling: Go allocates
//! from its own heap (no `malloc`), and samples about one allocation per
//! `runtime.MemProfileRate` bytes (512 KiB by default) for its heap profile. Two probes on that
//! sampled path, nothing on the allocation fast path:
//! - `go_malloc` at `runtime.mProf_Malloc(p, size)` (Go 1.19), called for each sampled
//!   allocation: records `p` in `LIVE` with the weight the runtime's profile gives it
//!   (`size / (1 - exp(-size / rate))`, pprof's scaling), its stack unwound from the caller;
//! - `go_free` at `runtime.freeSpecial(s, p, size)`, called when the GC sweeps an object with
//!   a special: for the profile's special (`s.kind == _KindSpecialProfile`), forgets `p`.
//!
//! Arguments come in the Go register ABI (ABIInternal on amd64: RAX, RBX, RCX, ...), not
//! SysV's. Offsets, kinds and the rate's address come from `GO_TARGETS` (written by the agent
//! for a Go version whose runtime it validated).
use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_probe_read_user, macros::uprobe, programs::ProbeContext, EbpfContext as _,
};
use profiler_common::{sample_count_weight, Counter, StackKey};

use crate::{
    maps::GO_TARGETS,
    probes::{cookie, count, forget_as, remember, target, weight},
    stack,
};

#[uprobe]
pub fn go_malloc(ctx: ProbeContext) -> u32 {
    let _ = try_go_malloc(&ctx);
    0
}

#[inline(always)]
fn try_go_malloc(ctx: &ProbeContext) -> Option<()> {
    let t = target(cookie(ctx.as_ptr() as *mut c_void))?;
    let go = GO_TARGETS.get(t.slot)?;
    if go.rate_addr == 0 {
        return None;
    }
    let (ptr, size) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx) };
    if ptr == 0 || size == 0 {
        return None;
    }
    // The rate in force now (a program may change it; 1 records every allocation).
    let rate = unsafe { bpf_probe_read_user(go.rate_addr as *const i64) }.ok()?;
    let rate = if rate <= 0 { 1 } else { rate as u64 };
    let w = weight(size, rate);
    let stack_id = stack::record_at_go_entry(&t, ctx.regs);
    let caller = unsafe { bpf_probe_read_user((*ctx.regs).rsp as *const u64) }.unwrap_or(0);
    // What the sample stands for is what the heap holds: counted as such.
    count(
        &t,
        Counter::Allocs,
        (sample_count_weight(w, size) + 0xffff) >> 16,
    );
    count(&t, Counter::AllocBytes, w);
    remember(
        &t,
        ptr,
        size,
        w,
        StackKey {
            caller,
            stack_id,
            target: t.id,
        },
    );
    Some(())
}

#[uprobe]
pub fn go_free(ctx: ProbeContext) -> u32 {
    let _ = try_go_free(&ctx);
    0
}

#[inline(always)]
fn try_go_free(ctx: &ProbeContext) -> Option<()> {
    let t = target(cookie(ctx.as_ptr() as *mut c_void))?;
    let go = GO_TARGETS.get(t.slot)?;
    if go.rate_addr == 0 {
        return None;
    }
    let (special, ptr) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx) };
    let kind =
        unsafe { bpf_probe_read_user((special + go.special_kind as u64) as *const u8) }.ok()?;
    if kind as u32 != go.special_profile || ptr == 0 {
        return None;
    }
    forget_as(&t, ptr, true, true);
    Some(())
}
