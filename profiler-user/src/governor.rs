//! The overhead governor (`--cpu-budget PERCENT`): keeps what the probes cost each target
//! within a share of one CPU by widening that target's sampling interval, and narrows it
//! again (down to the configured one) when the load drops.
//!
//! What a target pays is measured every [`PERIOD`]: its probe events from its counters (calls
//! seen at entry, returns taken) times the trap cost the kernel adds per event, plus its share
//! of the programs' run time (`BPF_ENABLE_STATS`, held while the governor runs, read from the
//! programs' fdinfo), shared between targets by their events. The trap costs are the ones
//! measured on these machines (docs/performance.md): ~0.5 us for an emulated entry probe,
//! ~0.4 us more for a return. The interval changes the sampled part only: the entry trap of
//! every call is the floor, which no interval removes; a budget below it is reported
//! (`floor_percent`), not met.
//!
//! A target traced through the USDT heap-sampling contract (see [`crate::bpf::contract`])
//! traps once per sample the service itself took and once per free of one: no per-call floor.
//! Its interval is the service's, not the governor's: the governor reports its cost (the
//! floor is then those traps) and leaves it alone.
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
    sync::{Arc, Weak},
    thread,
    time::{Duration, Instant},
};

use profiler_common::Counter;
use tracing::{debug, info, warn};

use crate::bpf::{load::Probes, reader};

/// How often costs are measured and intervals adjusted.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Kernel time per entry probe hit and per return probe hit, besides the program's own run.
const ENTRY_TRAP_NS: f64 = 500.0;
const RETURN_TRAP_NS: f64 = 400.0;
/// The narrowest interval the governor sets when it must sample a target recorded in full,
/// and the widest it goes to.
const MIN_INTERVAL: u64 = 4 << 10;
const MAX_INTERVAL: u64 = 1 << 30;

/// What the probes cost one target over the last period, as outputs show it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeCost {
    /// Share of one CPU the probes took in the target (percent).
    pub cpu_percent: f64,
    /// The budget (`--cpu-budget`), when the governor runs.
    pub budget_percent: Option<f64>,
    /// What the entry traps alone cost: no interval goes below it.
    pub floor_percent: f64,
    /// Probe events per second (entries and returns).
    pub events_per_sec: f64,
    /// Mean run time of the probe programs, over all targets.
    pub bpf_ns_per_run: f64,
    /// The interval the target was configured with, and the one in force.
    pub base_sample_bytes: u64,
    pub sample_bytes: u64,
}

/// A target's event counters when last read.
struct Seen {
    at: Instant,
    entries: u64,
    returns: u64,
}

/// One target's events over the last period.
struct Period {
    id: u64,
    slot: u32,
    /// Configured interval, and the one in force.
    base: u64,
    current: u64,
    secs: f64,
    entries: u64,
    returns: u64,
    usdt: bool,
}

/// Starts the governor of `probes` (returns at once; the thread ends with the probes).
pub fn start(probes: &Arc<Probes>, budget_percent: f64) {
    let weak = Arc::downgrade(probes);
    let spawned = thread::Builder::new().name("governor".into()).spawn(move || run(weak, budget_percent));
    if let Err(e) = spawned {
        warn!("no overhead governor ({e}): sampling intervals stay as configured");
    }
}

fn run(probes: Weak<Probes>, budget: f64) {
    // Run-time statistics cost every program run two clock reads: only while governed.
    let _stats: Option<OwnedFd> = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!("cannot enable BPF run-time statistics ({e}): the governor counts trap costs only");
            None
        }
    };
    info!(budget_percent = budget, "overhead governor started");
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let mut last_bpf = (0u64, 0u64);
    loop {
        thread::sleep(PERIOD);
        let Some(probes) = probes.upgrade() else { return };
        let bpf = bpf_run_stats(&probes);
        let (bpf_ns, bpf_runs) = (bpf.0.saturating_sub(last_bpf.0), bpf.1.saturating_sub(last_bpf.1));
        last_bpf = bpf;
        let targets = probes.attached();
        seen.retain(|id, _| targets.iter().any(|t| t.0 == *id));
        // Events of every target this period, to share the programs' run time by.
        let mut periods = Vec::new();
        for (id, slot, owner) in targets {
            let (base, current, usdt) = (owner.base_sample_bytes, owner.sample_bytes, owner.usdt);
            let Ok(c) = reader::read_counters(&probes.maps, slot) else { continue };
            let n = |k: Counter| c.get(k as usize).copied().unwrap_or(0);
            let (entries, returns) = if usdt {
                // One trap per sample and per free of a sample; `Allocs` is an estimate there.
                (n(Counter::SampledAllocs) + n(Counter::FailedAllocs) + n(Counter::Frees) + n(Counter::UntrackedFrees), 0)
            } else {
                let entries = n(Counter::Allocs) + n(Counter::FailedAllocs) + n(Counter::Frees) + n(Counter::UntrackedFrees);
                let session = probes.session.is_some() && !owner.classic;
                (entries, if session { n(Counter::SampledAllocs) } else { n(Counter::Allocs) })
            };
            let now = Instant::now();
            let prev = seen.insert(id, Seen { at: now, entries, returns });
            let Some(prev) = prev else { continue };
            let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
            let (entries, returns) = (entries.saturating_sub(prev.entries), returns.saturating_sub(prev.returns));
            periods.push(Period { id, slot, base, current, secs, entries, returns, usdt });
        }
        let all_events: u64 = periods.iter().map(|p| p.entries + p.returns).sum();
        let ns_per_run = if bpf_runs > 0 { bpf_ns as f64 / bpf_runs as f64 } else { 0.0 };
        for Period { id, slot, base, current, secs, entries, returns, usdt } in periods {
            let share = if all_events > 0 { (entries + returns) as f64 / all_events as f64 } else { 0.0 };
            let floor_ns = entries as f64 * ENTRY_TRAP_NS;
            let cost_ns = floor_ns + returns as f64 * RETURN_TRAP_NS + bpf_ns as f64 * share;
            let cpu_percent = cost_ns / (secs * 1e9) * 100.0;
            let floor_percent = floor_ns / (secs * 1e9) * 100.0;
            // The service's sampler decides a contract target's interval.
            let next = if usdt { current } else { next_interval(current, base, cpu_percent, budget) };
            if next != current {
                debug!(target = id, cpu_percent, budget, from = current, to = next, "sampling interval changed");
                if let Err(e) = probes.set_slot_sample_bytes(slot, next) {
                    warn!("cannot change a target's sampling interval: {e}");
                }
            }
            let cost = ProbeCost {
                cpu_percent: round2(cpu_percent),
                budget_percent: Some(budget),
                floor_percent: round2(floor_percent),
                events_per_sec: ((entries + returns) as f64 / secs).round(),
                bpf_ns_per_run: ns_per_run.round(),
                base_sample_bytes: base,
                sample_bytes: next,
            };
            probes.costs.lock().unwrap().insert(id, cost);
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Over budget: at least twice as wide (more when far over); well under (below 40%): half as
/// wide, never narrower than `base` (0 = record everything).
pub fn next_interval(current: u64, base: u64, cpu_percent: f64, budget: f64) -> u64 {
    if cpu_percent > budget {
        let factor = (cpu_percent / budget).clamp(2.0, 16.0);
        let from = current.max(MIN_INTERVAL / 2);
        return ((from as f64 * factor) as u64).clamp(MIN_INTERVAL, MAX_INTERVAL);
    }
    if cpu_percent < budget * 0.4 && current > base {
        let half = current / 2;
        return if half < base.max(MIN_INTERVAL) { base } else { half };
    }
    current
}

/// Run time (ns) and runs of every probe program, from their fdinfo.
fn bpf_run_stats(probes: &Probes) -> (u64, u64) {
    let mut fds: Vec<RawFd> = Vec::new();
    if let Some(s) = &probes.session {
        fds.extend([s.malloc.raw_fd(), s.alloc.raw_fd(), s.free.raw_fd()]);
    }
    if let Ok([alloc, free]) = &probes.usdt {
        fds.extend([alloc.raw_fd(), free.raw_fd()]);
    }
    {
        let ebpf = probes.ebpf.lock().unwrap();
        for (_, prog) in ebpf.programs() {
            if let Ok(fd) = prog.fd() {
                fds.push(fd.as_fd().as_raw_fd());
            }
        }
    }
    let mut total = (0, 0);
    for fd in fds {
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else { continue };
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        total.0 += field("run_time_ns:");
        total.1 += field("run_cnt:");
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over budget widens (from full recording to the narrowest interval first), far over
    /// widens faster, well under narrows back to the configured interval and never past it.
    #[test]
    fn intervals_widen_over_budget_and_narrow_back() {
        assert_eq!(next_interval(0, 0, 10.0, 5.0), MIN_INTERVAL);
        assert_eq!(next_interval(8192, 0, 6.0, 5.0), 16384);
        assert_eq!(next_interval(8192, 0, 500.0, 5.0), 8192 * 16);
        assert_eq!(next_interval(8192, 0, 4.0, 5.0), 8192, "within budget: kept");
        assert_eq!(next_interval(65536, 4096, 1.0, 5.0), 32768);
        assert_eq!(next_interval(8192, 8192, 1.0, 5.0), 8192, "never narrower than configured");
        assert_eq!(next_interval(4096, 0, 1.0, 5.0), 0, "back to full recording");
        assert_eq!(next_interval(MAX_INTERVAL, 0, 100.0, 5.0), MAX_INTERVAL);
    }
}
