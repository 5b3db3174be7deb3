//! Discovery events for the node-level agent: every `exec` and every process exit on the
//! machine, as one `u64` each in `DISCOVER_EVENTS` (`kind << 32 | tgid`, kind 1 = exec,
//! 2 = exit). The agent matches them against its selectors in user space; these programs
//! only report. Events that find the ring buffer full are counted in `DISCOVER_LOST`.
//!
//! Attached by the agent's discovery stage only (`profiler-user/src/discover/events.rs`), to
//! the `sched:sched_process_exec` and `sched:sched_process_exit` tracepoints.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::maps::{DISCOVER_EVENTS, DISCOVER_LOST};

const EXEC: u64 = 1;
const EXIT: u64 = 2;

#[inline(always)]
fn emit(kind: u64, tgid: u32) {
    if DISCOVER_EVENTS.output::<u64>((kind << 32) | tgid as u64, 0).is_err() {
        if let Some(lost) = DISCOVER_LOST.get_ptr_mut(0) {
            unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(lost, 1) };
        }
    }
}

/// A process replaced its image (its comm and executable are the new ones already).
#[tracepoint]
pub fn discover_exec(_ctx: TracePointContext) -> u32 {
    emit(EXEC, (bpf_get_current_pid_tgid() >> 32) as u32);
    0
}

/// A task exited; only the exit of a thread-group leader (the process) is reported.
#[tracepoint]
pub fn discover_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if id >> 32 == id & 0xffff_ffff {
        emit(EXIT, (id >> 32) as u32);
    }
    0
}
