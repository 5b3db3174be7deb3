//! A traced process as the rest of the program sees it: something that can produce a heap
//! profile on demand and cheap live statistics. The eBPF implementation lives in
//! [`crate::session`]; the HTTP API and the CLI only know this trait.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{aggregate::HeapProfile, trigger::TriggerHost};

/// Cheap statistics of a traced target, read without walking its live allocations.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TargetStats {
    pub pid: u32,
    /// Executable name (`/proc/PID/comm`).
    pub comm: String,
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub allocs: u64,
    pub frees: u64,
    pub dropped: BTreeMap<String, u64>,
    /// Stack walks that ended early, by reason, and frame-pointer frames (see
    /// [`crate::aggregate::HeapProfile::unwind`]).
    pub unwind: BTreeMap<String, u64>,
    /// The target's unwind tables: files, rows, kernel memory.
    pub unwind_tables: Option<crate::unwind::UnwindStats>,
    /// What the agent keeps of this target's data (perf map names, ...) against its memory
    /// budget, and what the budget refused ([`crate::budget`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<crate::budget::BudgetReport>,
    /// Mean bytes between samples in force, 0 for every allocation (the governor may have
    /// widened it: see `probe_cost`).
    pub sample_bytes: u64,
    /// What the probes cost the target, measured by the governor (`--cpu-budget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_cost: Option<crate::governor::ProbeCost>,
    /// How the allocator probes are attached: `session` or `classic`.
    pub probe_mode: String,
    /// Where its allocations are seen: `allocator` (probes on its allocator's functions) or
    /// `usdt:ddheap` / `usdt:otel_memory` (the service's own samples, see
    /// [`crate::bpf::contract`]).
    #[serde(default)]
    pub source: String,
    pub alive: bool,
    /// The workload's labels (workload, node, namespace, pod, container, executable) when the
    /// target is a workload's process; filled by the agent.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The pauses memscope's V8 operations imposed on it, the gaps they left in the native
    /// figures and its pause budget (see [`crate::pause`]); absent for targets that keep none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pauses: Option<crate::pause::PauseStatus>,
    /// What share of the target's anonymous memory memscope accounts for, and why it is low
    /// when it is ([`crate::coverage`]: the cheap statement, without the RSS breakdown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<crate::coverage::Coverage>,
    /// How a Go program's heap is seen (see [`HeapProfile::runtime_heap`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_heap: Option<String>,
}

/// A process being traced. Dropping the last handle detaches the probes.
pub trait TracedTarget: Send + Sync {
    fn pid(&self) -> u32;
    /// A full heap profile, symbolized. Expensive: seconds at a million live allocations.
    fn snapshot(&self, min_age: Duration) -> anyhow::Result<HeapProfile>;
    fn stats(&self) -> TargetStats;
    /// What snapshot triggers need of the target (probe hit counters, liveness), when it can
    /// host them; `None` (the default) when it cannot.
    fn trigger_host(&self) -> Option<&dyn TriggerHost> {
        None
    }
    /// The process attached (pidfd and start time), when the target is a real process: what
    /// acts on it beside the probes (the V8 inspector) must act on this process, never on
    /// whatever process now has its pid. `None` (the default): no such action is allowed.
    fn process(&self) -> Option<Arc<crate::process::Process>> {
        None
    }
    /// Its pause accounting (see [`crate::pause`]), when it keeps one.
    fn pauses(&self) -> Option<&crate::pause::PauseLedger> {
        None
    }
    /// Takes its allocator probes out of the process for a while (its slot, maps and live
    /// entries stay).
    fn suspend_probes(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Puts them back after [`TracedTarget::suspend_probes`].
    fn resume_probes(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Starts tracing processes. Errors carry one clear line for the operator.
pub trait Attacher: Send + Sync {
    fn attach(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>>;
    /// [`Attacher::attach`] for a process known to fork short-lived children (a `forks=true`
    /// workload), which may be traced differently (see `session::classic_for_forks`).
    fn attach_forking(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        self.attach(pid)
    }
    /// Does now what the first attach would otherwise do first (load the probes), so that the
    /// first process found does not wait for it.
    fn warm_up(&self) {}
}
