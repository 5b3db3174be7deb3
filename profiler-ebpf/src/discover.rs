//! Discovery events for the node-level agent: every `exec`, every new process (`fork`) and
//! every process exit on the machine, as one `[u64; 2]` each in `DISCOVER_EVENTS`
//! (`[kind << 32 | tgid, word]`, kind 1 = exec, 2 = exit, 3 = fork; `word` is the parent's
//! tgid for a fork, the cgroup v2 id the process exec'd in for an exec, 0 for an exit). The agent matches them against its selectors in user space; these
//! programs only report. Events that find the ring buffer full are counted in
//! `DISCOVER_LOST`.
//!
//! Attached by the agent's discovery stage only (`profiler-user/src/discover/events.rs`), to
//! the `sched:sched_process_exec`, `sched:sched_process_exit` and `sched:sched_process_fork`
//! tracepoints.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::maps::{DISCOVER_EVENTS, DISCOVER_LOST};

const EXEC: u64 = 1;
const EXIT: u64 = 2;
const FORK: u64 = 3;

/// Offset of `child_pid` in the `sched_process_fork` record: it moved between kernels (44
/// with inline comms, 20 with `__data_loc` comms), so the agent reads it from the tracepoint's
/// `format` file and sets it at load time.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 44;

#[inline(always)]
fn emit(kind: u64, tgid: u32, word: u64) {
    if DISCOVER_EVENTS.output::<[u64; 2]>([(kind << 32) | tgid as u64, word], 0).is_err() {
        if let Some(lost) = DISCOVER_LOST.get_ptr_mut(0) {
            unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(lost, 1) };
        }
    }
}

/// A process replaced its image (its comm and executable are the new ones already), with the
/// cgroup it did so in: a process found later in another cgroup moved there after this exec
/// (as `runc init` joins a container's cgroup, then execs), and is not identified by this
/// image (see `profiler-user`'s `discover::events`).
#[tracepoint]
pub fn discover_exec(_ctx: TracePointContext) -> u32 {
    // SAFETY: a helper without arguments, allowed in tracepoint programs.
    let cgroup = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    emit(EXEC, (bpf_get_current_pid_tgid() >> 32) as u32, cgroup);
    0
}

/// A task exited; only the exit of a thread-group leader (the process) is reported.
#[tracepoint]
pub fn discover_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if id >> 32 == id & 0xffff_ffff {
        emit(EXIT, (id >> 32) as u32, 0);
    }
    0
}

/// A task was created, in the context of its parent: a new process or a new thread (the
/// record does not say which; the agent tells them apart, and only for parents it follows).
#[tracepoint]
pub fn discover_fork(ctx: TracePointContext) -> u32 {
    let offset = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    if let Ok(child) = unsafe { ctx.read_at::<i32>(offset & 0xff) } {
        emit(FORK, child as u32, bpf_get_current_pid_tgid() >> 32);
    }
    0
}
