//! Snapshot triggers: a uprobe or uretprobe on any function (or USDT site) of the target that
//! only counts hits; the user side turns a new hit into a snapshot. The links fire in their
//! target only; the cookie is the trigger's slot.
use aya_ebpf::{
    helpers::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext as _,
};

use crate::maps::TRIGGER_HITS;

#[inline(always)]
fn hit(cookie: u64) {
    if let Some(slot) = TRIGGER_HITS.get_ptr_mut(cookie as u32) {
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// Attached as a uretprobe: fires when the chosen function returns.
#[uretprobe]
pub fn trigger_return(ctx: RetProbeContext) -> u32 {
    hit(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    0
}

/// Attached as a uprobe: fires at a function entry or a USDT site.
#[uprobe]
pub fn trigger_entry(ctx: ProbeContext) -> u32 {
    hit(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    0
}
