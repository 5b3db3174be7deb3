//! Builds a [`HeapProfile`] from what the probes recorded: sums the counters, takes each
//! stack's weighted sums (every sample stands for `size / p` bytes, `p` its probability at the
//! interval in force when it was taken: unbiased, whatever the mix of sizes and however the
//! governor moved the interval), and attaches symbolized frames to each stack.
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

/// Weighted allocations in 16.16 fixed point (see `profiler_common::sample_count_weight`),
/// rounded to a count.
pub fn count_of(fp: u64) -> u64 {
    (fp + (1 << 15)) >> 16
}

/// Live bytes and allocations from the probes' weighted counters: the cheap figures of the
/// targets table, `/metrics` and the growth trigger, the same sums a snapshot adds entry by
/// entry.
/// Clamped like [`clamp_estimates`].
pub fn live_from_counters(counters: &[u64]) -> (u64, u64) {
    let c = |k: Counter| counters.get(k as usize).copied().unwrap_or(0);
    let bytes = c(Counter::WeightBytes).saturating_sub(c(Counter::WeightFreeBytes));
    let allocs = count_of(c(Counter::WeightAllocs).saturating_sub(c(Counter::WeightFrees)));
    clamp_estimates(bytes, allocs, c(Counter::AllocBytes), c(Counter::Allocs))
}

/// Estimated live (bytes, allocations) never above what was exactly allocated since attach
/// (`allocated_bytes`, `allocs`, counted at every call): a sampled estimate's error (a few
/// large weights) could otherwise show more live allocations than were ever made, as
/// `live_allocs` 185,157 > `allocs` 183,830 did. A snapshot scales its stacks down with the
/// totals ([`fit_stacks`]), so the stacks, the leak list and the totals state the same thing.
pub fn clamp_estimates(live_bytes: u64, live_allocs: u64, allocated_bytes: u64, allocs: u64) -> (u64, u64) {
    (live_bytes.min(allocated_bytes), live_allocs.min(allocs))
}

/// `v * num / den`, rounded down (`num <= den`).
fn scale(v: u64, num: u64, den: u64) -> u64 {
    if den == 0 {
        return 0;
    }
    (u128::from(v) * u128::from(num) / u128::from(den)) as u64
}

/// Scales the stacks' estimates down, proportionally, where their sums exceed what was
/// exactly counted since attach: live and total bytes to `allocated_bytes`, live and total
/// allocations to `allocs` (leaked figures with their live ones). Exact recordings never
/// exceed and are left as they are. Afterwards the totals are the stacks' sums, so no
/// estimated figure is above its exact counterpart and the live figure is what the stacks
/// (and the leak list, a part of them) add up to.
pub fn fit_stacks(stacks: &mut [StackSample], allocated_bytes: u64, allocs: u64) {
    let sum = |f: fn(&StackSample) -> u64, stacks: &[StackSample]| stacks.iter().map(f).fold(0u64, u64::saturating_add);
    let total_bytes = sum(|s| s.total_bytes, stacks);
    if total_bytes > allocated_bytes {
        for s in stacks.iter_mut() {
            s.total_bytes = scale(s.total_bytes, allocated_bytes, total_bytes);
        }
    }
    let total_allocs = sum(|s| s.total_allocs, stacks);
    if total_allocs > allocs {
        for s in stacks.iter_mut() {
            s.total_allocs = scale(s.total_allocs, allocs, total_allocs);
        }
    }
    // Live is at most what was allocated since attach.
    let live_bytes = sum(|s| s.live_bytes, stacks);
    if live_bytes > allocated_bytes {
        for s in stacks.iter_mut() {
            s.leak_bytes = scale(s.leak_bytes, allocated_bytes, live_bytes);
            s.live_bytes = scale(s.live_bytes, allocated_bytes, live_bytes);
        }
    }
    let live_allocs = sum(|s| s.live_allocs, stacks);
    if live_allocs > allocs {
        for s in stacks.iter_mut() {
            s.leak_allocs = scale(s.leak_allocs, allocs, live_allocs);
            s.live_allocs = scale(s.live_allocs, allocs, live_allocs);
        }
    }
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
            live_bytes: s.live_bytes,
            live_allocs: count_of(s.live_allocs_fp),
            total_bytes: s.stats.weight_bytes,
            total_allocs: count_of(s.stats.weight_allocs),
            leak_bytes: s.leak_bytes,
            leak_allocs: count_of(s.leak_allocs_fp),
            oldest_age_s: (oldest_age_s * 1000.0).round() / 1000.0,
        });
    }
    // Sampled stacks are estimates: fitted to the exact counts. Exact ones (every allocation
    // recorded) are kept as they are: read a moment after the counters, they may hold a few
    // allocations more, so the totals are raised to them instead (never scaled, which would
    // break bytes = allocations x size on an exact stack).
    if ctx.sample_bytes > 0 {
        fit_stacks(&mut stacks, c(Counter::AllocBytes), c(Counter::Allocs));
    }
    let live_bytes = stacks.iter().map(|s| s.live_bytes).sum();
    let live_allocs = stacks.iter().map(|s| s.live_allocs).sum();
    let totals = Totals {
        live_bytes,
        live_allocs,
        allocated_bytes: c(Counter::AllocBytes).max(stacks.iter().map(|s| s.total_bytes).sum()),
        allocs: c(Counter::Allocs).max(stacks.iter().map(|s| s.total_allocs).sum()),
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
        probe_gaps: None,
        source: None,
        live_tracking: None,
        coverage: None,
        runtime_heap: None,
        js_names: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No estimated live figure above its exact counterpart, in a snapshot's totals and in the
    /// cheap counters figure (targets table, `/metrics`); exact ones pass through.
    #[test]
    fn estimates_never_exceed_exact_counts() {
        assert_eq!(clamp_estimates(10, 185_157, 1 << 30, 183_830), (10, 183_830));
        assert_eq!(clamp_estimates(5 << 20, 3, 4 << 20, 10), (4 << 20, 3));
        assert_eq!(clamp_estimates(100, 2, 100, 2), (100, 2));
        let mut counters = vec![0u64; profiler_common::COUNTER_COUNT as usize];
        counters[Counter::Allocs as usize] = 183_830;
        counters[Counter::AllocBytes as usize] = 1 << 20;
        counters[Counter::WeightAllocs as usize] = 185_157 << 16;
        counters[Counter::WeightBytes as usize] = 2 << 20;
        assert_eq!(live_from_counters(&counters), (1 << 20, 183_830));

        let stack = crate::bpf::reader::RawStack {
            live_bytes: 2 << 20,
            live_allocs_fp: 185_157 << 16,
            ..Default::default()
        };
        let raw = RawSnapshot { counters, stacks: vec![stack], ..Default::default() };
        let ctx = BuildContext {
            pid: 1,
            taken_at_ms: 0,
            duration_s: 1.0,
            min_age_s: 0.0,
            sample_bytes: 512 * 1024,
            unseen_before_attach_bytes: 0,
            target_exited: false,
        };
        let p = build(&raw, &ctx, |_| Default::default());
        assert_eq!((p.totals.live_bytes, p.totals.live_allocs), (1 << 20, 183_830));
        assert_eq!((p.totals.allocated_bytes, p.totals.allocs), (1 << 20, 183_830));
        // The stacks say what the totals say.
        assert_eq!(p.stacks[0].live_bytes, p.totals.live_bytes);
        assert_eq!(p.stacks[0].live_allocs, p.totals.live_allocs);
    }

    /// Several stacks over the exact counts are scaled down together, leaks with them, so the
    /// leak list never says more than the live figure; exact stacks are untouched.
    #[test]
    fn stacks_fit_the_exact_counts() {
        let s = |live: u64, leak: u64, total: u64| StackSample {
            live_bytes: live,
            leak_bytes: leak,
            live_allocs: live / 10,
            leak_allocs: leak / 10,
            total_bytes: total,
            total_allocs: total / 10,
            ..Default::default()
        };
        let mut stacks = vec![s(600, 600, 900), s(600, 300, 600)];
        fit_stacks(&mut stacks, 1000, 100);
        let live: u64 = stacks.iter().map(|s| s.live_bytes).sum();
        let leak: u64 = stacks.iter().map(|s| s.leak_bytes).sum();
        let total: u64 = stacks.iter().map(|s| s.total_bytes).sum();
        let allocs: u64 = stacks.iter().map(|s| s.live_allocs).sum();
        assert!(live <= 1000 && total <= 1000 && allocs <= 100 && leak <= live, "{stacks:?}");
        assert_eq!((stacks[0].live_bytes, stacks[0].leak_bytes), (500, 500));
        let mut exact = vec![s(100, 50, 200)];
        fit_stacks(&mut exact, 200, 20);
        assert_eq!(exact, vec![s(100, 50, 200)]);
    }

    /// The probes' fixed-point weight is `size / (1 - exp(-size / T))` within 0.01% for every
    /// size, from a byte to past 16 T; full recording weighs each allocation its size.
    #[test]
    fn sample_weight_is_the_inverse_probability() {
        use profiler_common::{sample_count_weight, sample_weight, weight_table};
        let table = weight_table();
        assert_eq!(sample_weight(64, 0, &table), 64);
        for t in [4096u64, 512 * 1024, 8 << 20] {
            for size in [1u64, 7, 64, 1000, 4096, 65536, t / 3, t, 5 * t, 16 * t - 1, 16 * t, 100 * t] {
                let exact = size as f64 / (1.0 - (-(size as f64) / t as f64).exp());
                let w = sample_weight(size, t, &table) as f64;
                assert!((w - exact).abs() <= exact * 1e-4 + 1.0, "size {size} at {t}: {w} vs {exact}");
            }
        }
        assert_eq!(sample_count_weight(64, 64), 1 << 16);
        assert_eq!(count_of(sample_count_weight(8192 * 64, 64)), 8192);
    }
}
