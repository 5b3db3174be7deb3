//! Reads one target's part of the probes' maps into a [`RawSnapshot`]: its counters, its
//! per-stack totals, the stacks themselves, and (walking the live allocations once) each
//! stack's live and leaked bytes and oldest allocation, every figure the sum of the samples'
//! weights. No symbols here, only addresses.
use std::collections::HashMap as StdHashMap;

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{IterableMap as _, MapError};
use profiler_common::{sample_count_weight, AllocInfo, LiveKey, StackFrames, StackKey, StackStats, COUNTER_COUNT};

use super::{batch, load::ProbeMaps};

/// One allocation site as the kernel recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawStack {
    pub key: StackKey,
    /// The stack from the stack map, innermost first; `ips[0]` is the caller (as `key.caller`).
    /// Empty when the stack could not be recorded.
    pub ips: Vec<u64>,
    /// In a V8 target: the `SharedFunctionInfo` (tagged) of the JavaScript function of frame
    /// `ips[i]` at `js[i]`, 0 for frames that are not JavaScript; empty when none is.
    pub js: Vec<u64>,
    /// Allocated since attach (the kernel's per-stack totals).
    pub stats: StackStats,
    /// Live allocations: weighted bytes, and weighted allocations in 16.16 fixed point (see
    /// `profiler_common::sample_weight`), and the samples themselves.
    pub live_bytes: u64,
    pub live_allocs_fp: u64,
    pub live_samples: u64,
    /// Live allocations at least `min_age` old, likewise.
    pub leak_bytes: u64,
    pub leak_allocs_fp: u64,
    /// Monotonic timestamp of the oldest live allocation, 0 when none is live.
    pub oldest_ns: u64,
}

impl RawStack {
    /// Return addresses of the stack, innermost first: the caller (the return address, seen at
    /// the allocator's return), then the walk (`ips[0]` is the caller again). A walk that starts
    /// with the caller does not repeat it.
    pub fn return_addresses(&self) -> Vec<u64> {
        self.return_frames().into_iter().map(|(addr, _)| addr).collect()
    }

    /// [`RawStack::return_addresses`], each with its frame's JavaScript function (0 if none).
    pub fn return_frames(&self) -> Vec<(u64, u64)> {
        let js = |i: usize| self.js.get(i).copied().unwrap_or(0);
        let mut out = Vec::with_capacity(self.ips.len() + 1);
        if self.key.caller != 0 {
            // The caller is `ips[0]`'s frame when the walk starts there.
            out.push((self.key.caller, if self.ips.first() == Some(&self.key.caller) { js(0) } else { 0 }));
        }
        for (i, &ip) in self.ips.iter().enumerate().skip(1) {
            if i == 1 && ip == self.key.caller {
                continue;
            }
            if ip != 0 {
                out.push((ip, js(i)));
            }
        }
        out
    }
}

#[derive(Clone, Debug, Default)]
pub struct RawSnapshot {
    /// Per-CPU counters summed, indexed by `profiler_common::Counter`.
    pub counters: Vec<u64>,
    pub stacks: Vec<RawStack>,
    /// CLOCK_MONOTONIC when the read started (the probes' clock).
    pub now_ns: u64,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The totals of every stack of `target` (`None`: of every target), summed over CPUs:
/// batched, or entry by entry on kernels without batches.
pub(crate) fn stack_stats(maps: &ProbeMaps, target: Option<u64>) -> Result<Vec<(StackKey, StackStats)>, MapError> {
    let sum = |per_cpu: &[StackStats]| {
        per_cpu.iter().fold(StackStats::default(), |a, s| StackStats {
            sampled_bytes: a.sampled_bytes + s.sampled_bytes,
            sampled_allocs: a.sampled_allocs + s.sampled_allocs,
            weight_bytes: a.weight_bytes + s.weight_bytes,
            weight_allocs: a.weight_allocs + s.weight_allocs,
        })
    };
    let mine = |k: &StackKey| target.is_none_or(|t| k.target == t);
    let fd = maps.stack_stats.map().fd().as_fd().as_raw_fd();
    if let Ok(cpus) = aya::util::nr_cpus() {
        let mut all = Vec::new();
        let batched = batch::for_each_chunk_per_cpu(fd, cpus, |keys: &[StackKey], values: &[StackStats]| {
            all.extend(keys.iter().zip(values.chunks(cpus)).filter(|(k, _)| mine(k)).map(|(k, v)| (*k, sum(v))));
        });
        if batched.is_ok() {
            return Ok(all);
        }
    }
    let mut all = Vec::new();
    for entry in maps.stack_stats.iter() {
        let (k, v) = entry?;
        if mine(&k) {
            all.push((k, sum(&v)));
        }
    }
    Ok(all)
}

/// What is live per stack, from one pass over `LIVE`.
#[derive(Clone, Copy, Debug, Default)]
struct LiveAgg {
    bytes: u64,
    allocs_fp: u64,
    samples: u64,
    leak_bytes: u64,
    leak_allocs_fp: u64,
    oldest_ns: u64,
}

type FastMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

/// `target`'s live allocations aggregated per stack as they are read (a million entries are
/// never held at once); allocations made at or before `cutoff_ns` are leaks. Batched, or
/// entry by entry on kernels without batches.
fn live_by_stack(maps: &ProbeMaps, target: u64, cutoff_ns: u64) -> Result<FastMap<SiteKey, LiveAgg>, MapError> {
    let mut agg: FastMap<SiteKey, LiveAgg> = FastMap::default();
    let fd = maps.live.map().fd().as_fd().as_raw_fd();
    let batched = batch::for_each_chunk(fd, |keys: &[LiveKey], infos: &[AllocInfo]| {
        keys.iter().zip(infos).filter(|(k, _)| k.target == target).for_each(|(_, info)| add_live(&mut agg, info, cutoff_ns))
    });
    if batched.is_ok() {
        return Ok(agg);
    }
    agg.clear();
    for entry in maps.live.iter() {
        match entry {
            Ok((k, info)) if k.target == target => add_live(&mut agg, &info, cutoff_ns),
            Ok(_) => continue,
            // Freed between listing its key and reading it.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(agg)
}

/// `(caller, stack id)`: within one target's entries, the target part of a `StackKey` is the
/// same for all, and a 16-byte key hashes faster over a million entries.
type SiteKey = (u64, u64);

fn add_live(agg: &mut FastMap<SiteKey, LiveAgg>, info: &AllocInfo, cutoff_ns: u64) {
    let s = agg.entry((info.stack.caller, info.stack.stack_id)).or_default();
    // The weight the probes stored, and their count weight computed the same way as theirs:
    // these sums equal the probes' `Weight*` counters.
    let allocs_fp = sample_count_weight(info.weight, info.size);
    s.bytes += info.weight;
    s.allocs_fp += allocs_fp;
    s.samples += 1;
    if s.oldest_ns == 0 || info.timestamp_ns < s.oldest_ns {
        s.oldest_ns = info.timestamp_ns;
    }
    if info.timestamp_ns <= cutoff_ns {
        s.leak_bytes += info.weight;
        s.leak_allocs_fp += allocs_fp;
    }
}

/// Target slot `slot`'s counters, summed over CPUs, indexed by `profiler_common::Counter`.
pub fn read_counters(maps: &ProbeMaps, slot: u32) -> Result<Vec<u64>, MapError> {
    (0..COUNTER_COUNT)
        .map(|i| Ok(maps.counters.get(&(slot * COUNTER_COUNT + i), 0)?.iter().copied().sum()))
        .collect()
}

/// Reads everything of target `target` (in slot `slot`). Allocations younger than
/// `min_age_ns` are live but not leaks.
pub fn read(maps: &ProbeMaps, target: u64, slot: u32, min_age_ns: u64) -> Result<RawSnapshot, MapError> {
    let now_ns = monotonic_ns();
    let counters = read_counters(maps, slot)?;
    let cutoff = now_ns.saturating_sub(min_age_ns);
    // The live allocations (the bulk) and the stacks are read on two threads.
    let (live, stats, (frames_by_id, js_by_id)) = std::thread::scope(|scope| {
        let live = scope.spawn(|| live_by_stack(maps, target, cutoff));
        let stats = stack_stats(maps, Some(target));
        let frames = stats.as_ref().map(|stats| stack_frames(maps, stats)).unwrap_or_default();
        (live.join().expect("live map reader panicked"), stats, frames)
    });
    let mut stacks: FastMap<StackKey, RawStack> = FastMap::default();
    for (key, stats) in stats? {
        stacks.insert(key, RawStack { key, stats, ..Default::default() });
    }
    for ((caller, stack_id), l) in live? {
        let key = StackKey { caller, stack_id, target };
        let s = stacks.entry(key).or_insert_with(|| RawStack { key, ..Default::default() });
        (s.live_bytes, s.live_allocs_fp, s.live_samples, s.leak_bytes, s.leak_allocs_fp, s.oldest_ns) =
            (l.bytes, l.allocs_fp, l.samples, l.leak_bytes, l.leak_allocs_fp, l.oldest_ns);
    }
    for s in stacks.values_mut() {
        if let Some(ips) = frames_by_id.get(&s.key.stack_id) {
            s.ips = ips.clone();
        }
        if let Some(js) = js_by_id.get(&s.key.stack_id) {
            s.js = js.clone();
        }
    }
    let mut stacks: Vec<RawStack> = stacks.into_values().collect();
    stacks.sort_by_key(|s| s.key);
    Ok(RawSnapshot { counters, stacks, now_ns })
}

/// The stacks recorded since `known` was filled (their keys and frames only, no live data):
/// what [`crate::symbolize::Symbolizer::pin_jit`] names while the JIT code they return into is
/// still the code that ran.
pub fn new_stacks(maps: &ProbeMaps, target: u64, known: &std::collections::HashSet<StackKey>) -> Result<Vec<RawStack>, MapError> {
    let fresh: Vec<(StackKey, StackStats)> =
        stack_stats(maps, Some(target))?.into_iter().filter(|(k, _)| !known.contains(k)).collect();
    let (frames, js) = stack_frames(maps, &fresh);
    Ok(fresh
        .into_iter()
        .map(|(key, stats)| RawStack {
            key,
            stats,
            ips: frames.get(&key.stack_id).cloned().unwrap_or_default(),
            js: js.get(&key.stack_id).cloned().unwrap_or_default(),
            ..Default::default()
        })
        .collect())
}

/// The frames of every stack id in `stats` (a stack whose id was evicted reads as empty), and
/// the JavaScript functions of those that have some.
type StackIds = StdHashMap<u64, Vec<u64>>;
fn stack_frames(maps: &ProbeMaps, stats: &[(StackKey, StackStats)]) -> (StackIds, StackIds) {
    let mut frames: StackIds = StdHashMap::new();
    let mut js: StackIds = StdHashMap::new();
    for (key, _) in stats {
        if key.stack_id == 0 || frames.contains_key(&key.stack_id) {
            continue;
        }
        let ips: Vec<u64> = maps
            .stacks
            .get(&key.stack_id, 0)
            .map(|t| t.ips.iter().copied().take_while(|&ip| ip != 0).collect())
            .unwrap_or_default();
        frames.insert(key.stack_id, ips);
    }
    let mut keep = |id: u64, f: &StackFrames| {
        if let Some(ips) = frames.get(&id) {
            js.insert(id, f.ips[..ips.len().min(f.ips.len())].to_vec());
        }
    };
    // A few stacks (the naming thread's new ones): a lookup each. Many (a snapshot): one
    // listing of the map, not a lookup per stack.
    if frames.len() <= 256 {
        for id in frames.keys() {
            if let Ok(f) = maps.js_frames.get(id, 0) {
                keep(*id, &f);
            }
        }
        return (frames, js);
    }
    let fd = maps.js_frames.map().fd().as_fd().as_raw_fd();
    let listed = batch::for_each_chunk(fd, |ids: &[u64], values: &[StackFrames]| {
        ids.iter().zip(values).for_each(|(id, f)| keep(*id, f));
    });
    if listed.is_err() {
        for entry in maps.js_frames.iter().flatten() {
            keep(entry.0, &entry.1);
        }
    }
    (frames, js)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller from [rsp] comes first, the allocator's own frame is dropped, and a caller the
    /// kernel already found is not repeated.
    #[test]
    fn return_addresses_prepend_caller_once() {
        let key = StackKey { caller: 0x20, stack_id: 3, target: 1 };
        let s = RawStack { key, ips: vec![0x10, 0x30, 0x40], ..Default::default() };
        assert_eq!(s.return_addresses(), vec![0x20, 0x30, 0x40]);
        let s = RawStack { key, ips: vec![0x10, 0x20, 0x40], ..Default::default() };
        assert_eq!(s.return_addresses(), vec![0x20, 0x40]);
        let none = StackKey { caller: 0x20, stack_id: 0, target: 1 };
        let s = RawStack { key: none, ..Default::default() };
        assert_eq!(s.return_addresses(), vec![0x20]);
    }
}
