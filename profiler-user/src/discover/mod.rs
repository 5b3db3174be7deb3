//! Discovery: which processes to trace, before anything is attached. [`selector`] parses and
//! matches selectors (`comm=`, `exe=`, `cgroup=`, `container=`, `pod=`), [`identity`] tells
//! who a process is (its container and pod, from the cgroup path, the runtime's bundle and
//! kubelet's pod directory), [`events`] reports every exec, fork and exit from the kernel's
//! sched tracepoints, and [`scan`] lists the processes running now. What is attached, and how
//! workloads outlive their pids, is [`crate::workload`]'s business.
pub mod events;
pub mod identity;
pub mod selector;

pub use events::{ProcEvent, ProcWatcher};
pub use identity::{ContainerIdentity, NodePaths, ProcessInfo};
pub use selector::Selector;

/// Pids of every process running now (one pass over `/proc`, at agent start and when a
/// selector is added).
pub fn scan() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    pids.sort_unstable();
    pids
}
