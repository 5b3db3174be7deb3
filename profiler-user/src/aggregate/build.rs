//! Builds a [`HeapProfile`] from what the probes recorded: sums the counters, scales sampled
//! values up to unbiased estimates, and attaches symbolized frames to each stack.
use std::collections::BTreeMap;

use profiler_common::Counter;

use super::profile::{Frame, FrameInfo, HeapProfile, StackSample, Totals};
use crate::bpf::reader::RawSnapshot;

/// What the builder needs to know besides the raw data.
pub struct BuildContext {
    pub pid: u32,
    pub taken_at_ms: u64,
    pub duration_s: f64,
    pub min_age_s: f64,
    pub sample_bytes: u64,
    pub unseen_before_attach_bytes: u64,
    pub target_exited: bool,
}

/// Every drop reason with its count (zeros included, so consumers see the full list).
pub fn dropped(counters: &[u64]) -> BTreeMap<String, u64> {
    Counter::DROPS
        .iter()
        .map(|c| (c.drop_reason().to_string(), counters.get(*c as usize).copied().unwrap_or(0)))
        .collect()
}

/// Every unwind counter with its count (zeros included).
pub fn unwind(counters: &[u64]) -> BTreeMap<String, u64> {
    Counter::UNWIND
        .iter()
        .map(|c| (c.unwind_reason().to_string(), counters.get(*c as usize).copied().unwrap_or(0)))
        .collect()
}

/// Poisson sampling keeps an allocation of `size` bytes with probability
/// `1 - exp(-size / rate)`; dividing by it gives unbiased estimates. Like pprof, the average
/// allocation size of a stack stands for its sizes.
pub fn sampling_scale(avg_size: f64, sample_bytes: u64) -> f64 {
    if sample_bytes == 0 || avg_size <= 0.0 {
        return 1.0;
    }
    let p = 1.0 - (-avg_size / sample_bytes as f64).exp();
    if p <= 0.0 { 1.0 } else { 1.0 / p }
}

pub fn build(
    raw: &RawSnapshot,
    ctx: &BuildContext,
    mut symbolize: impl FnMut(&[u64]) -> std::collections::HashMap<u64, Frame>,
) -> HeapProfile {
    let addrs: Vec<u64> = {
        let mut v: Vec<u64> = raw.stacks.iter().flat_map(|s| s.return_addresses()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let names = symbolize(&addrs);
    let c = |k: Counter| raw.counters.get(k as usize).copied().unwrap_or(0);
    let mut stacks = Vec::with_capacity(raw.stacks.len());
    for s in &raw.stacks {
        let avg = if s.stats.total_allocs > 0 {
            s.stats.total_bytes as f64 / s.stats.total_allocs as f64
        } else {
            0.0
        };
        let k = sampling_scale(avg, ctx.sample_bytes);
        let scale = |v: u64| (v as f64 * k).round() as u64;
        let frames = s
            .return_addresses()
            .iter()
            .map(|a| names.get(a).cloned().unwrap_or_else(|| FrameInfo { address: *a, ..Default::default() }.into()))
            .collect();
        let oldest_age_s = if s.oldest_ns > 0 {
            raw.now_ns.saturating_sub(s.oldest_ns) as f64 / 1e9
        } else {
            0.0
        };
        stacks.push(StackSample {
            frames,
            live_bytes: scale(s.live_bytes),
            live_allocs: scale(s.live_allocs),
            total_bytes: scale(s.stats.total_bytes),
            total_allocs: scale(s.stats.total_allocs),
            leak_bytes: scale(s.leak_bytes),
            leak_allocs: scale(s.leak_allocs),
            oldest_age_s: (oldest_age_s * 1000.0).round() / 1000.0,
        });
    }
    let totals = Totals {
        live_bytes: stacks.iter().map(|s| s.live_bytes).sum(),
        live_allocs: stacks.iter().map(|s| s.live_allocs).sum(),
        allocated_bytes: c(Counter::AllocBytes),
        allocs: c(Counter::Allocs),
        frees: c(Counter::Frees) + c(Counter::UntrackedFrees),
    };
    HeapProfile {
        pid: ctx.pid,
        taken_at_ms: ctx.taken_at_ms,
        duration_s: (ctx.duration_s * 1000.0).round() / 1000.0,
        min_age_s: ctx.min_age_s,
        sample_bytes: ctx.sample_bytes,
        totals,
        dropped: dropped(&raw.counters),
        unwind: unwind(&raw.counters),
        unwind_tables: None,
        unseen_before_attach_bytes: ctx.unseen_before_attach_bytes,
        untracked_frees: c(Counter::UntrackedFrees),
        target_exited: ctx.target_exited,
        stacks,
        mappings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full recording is not scaled; sampled small allocations are scaled up by ~rate/size and
    /// allocations much larger than the rate are not.
    #[test]
    fn sampling_scale_is_unbiased_weight() {
        assert_eq!(sampling_scale(64.0, 0), 1.0);
        let k = sampling_scale(64.0, 512 * 1024);
        assert!((k - 8192.5).abs() < 1.0, "{k}");
        assert!((sampling_scale(64.0 * 1024.0 * 1024.0, 512 * 1024) - 1.0).abs() < 1e-9);
    }
}
