//! V8's sampling heap profiler (`HeapProfiler.startSampling` / `getSamplingProfile`): a Poisson
//! sample of JavaScript allocations (one per `interval` bytes on average) with the JavaScript
//! stack that made them, of which the profile keeps those still alive. Turned into a
//! [`HeapProfile`] (function, script URL, line per frame; sampled sizes as live bytes) so that
//! every renderer of the native heap (pprof, folded, flamegraph, JSON) serves it too.
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::{Protocol, V8Error};
use crate::aggregate::{FrameInfo, HeapProfile, StackSample, Totals};

/// V8's default sampling interval (bytes).
pub const DEFAULT_INTERVAL: u64 = 32 * 1024;
/// Deepest JavaScript stack kept.
const MAX_DEPTH: usize = 128;

/// Samples the target's JavaScript allocations for `duration`.
pub fn profile(insp: &mut impl Protocol, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    let t = Duration::from_secs(30);
    insp.call("HeapProfiler.enable", json!({}), t)?;
    insp.call("HeapProfiler.startSampling", json!({ "samplingInterval": interval as f64 }), t)?;
    std::thread::sleep(duration);
    let got = insp.call("HeapProfiler.getSamplingProfile", json!({}), Duration::from_secs(60));
    let _ = insp.call("HeapProfiler.stopSampling", json!({}), t);
    let _ = insp.call("HeapProfiler.disable", json!({}), t);
    let got = got?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    to_profile(got.get("profile").unwrap_or(&Value::Null), insp.pid(), now, duration, interval)
}

/// A `SamplingHeapProfile` as a [`HeapProfile`]: one stack per node with a self size.
pub fn to_profile(p: &Value, pid: u32, taken_at_ms: u64, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    let head = p.get("head").ok_or_else(|| V8Error::Protocol("the sampling profile has no head".into()))?;
    let mut counts = std::collections::HashMap::new();
    for s in p.get("samples").and_then(Value::as_array).into_iter().flatten() {
        if let Some(id) = s.get("nodeId").and_then(Value::as_u64) {
            *counts.entry(id).or_insert(0u64) += 1;
        }
    }
    let mut stacks = Vec::new();
    let mut path: Vec<crate::aggregate::Frame> = Vec::new();
    // Depth-first without recursion: (node, depth).
    let mut todo: Vec<(&Value, usize)> = vec![(head, 0)];
    while let Some((node, depth)) = todo.pop() {
        path.truncate(depth);
        if depth > 0 {
            path.push(frame(node).into());
        }
        let size = node.get("selfSize").and_then(Value::as_u64).unwrap_or(0);
        if size > 0 && !path.is_empty() {
            let allocs = node.get("id").and_then(Value::as_u64).and_then(|id| counts.get(&id).copied()).unwrap_or(1);
            let frames = path.iter().rev().cloned().collect();
            stacks.push(StackSample { frames, live_bytes: size, live_allocs: allocs, total_bytes: size, total_allocs: allocs, ..Default::default() });
        }
        if depth < MAX_DEPTH {
            for c in node.get("children").and_then(Value::as_array).into_iter().flatten() {
                todo.push((c, depth + 1));
            }
        }
    }
    stacks.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    let live_bytes = stacks.iter().map(|s| s.live_bytes).sum();
    let live_allocs = stacks.iter().map(|s| s.live_allocs).sum();
    Ok(HeapProfile {
        pid,
        taken_at_ms,
        duration_s: duration.as_secs_f64(),
        min_age_s: 0.0,
        sample_bytes: interval,
        totals: Totals { live_bytes, live_allocs, allocated_bytes: live_bytes, allocs: live_allocs, frees: 0 },
        stacks,
        ..Default::default()
    })
}

fn frame(node: &Value) -> FrameInfo {
    let cf = node.get("callFrame").unwrap_or(&Value::Null);
    let s = |k: &str| cf.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(|s| s.chars().take(500).collect::<String>());
    let function = s("functionName").unwrap_or_else(|| "(anonymous)".into());
    let line = cf.get("lineNumber").and_then(Value::as_i64).filter(|&l| l >= 0).map(|l| l as u32 + 1);
    FrameInfo {
        function: Some(Arc::from(function)),
        file: s("url").map(Arc::from),
        line: line.filter(|_| s("url").is_some()),
        module: Some(Arc::from("[js]")),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes with a self size become stacks (innermost first) named by function, URL and line.
    #[test]
    fn converts_a_sampling_profile() {
        let p = json!({"head": {"callFrame": {"functionName": "(root)", "url": "", "lineNumber": -1}, "selfSize": 0, "id": 1,
            "children": [{"callFrame": {"functionName": "main", "url": "file:///a.js", "lineNumber": 9}, "selfSize": 0, "id": 2,
                "children": [{"callFrame": {"functionName": "makeLeak", "url": "file:///a.js", "lineNumber": 2}, "selfSize": 65536, "id": 3, "children": []}]}]},
            "samples": [{"size": 32768, "nodeId": 3, "ordinal": 1}, {"size": 32768, "nodeId": 3, "ordinal": 2}]});
        let hp = to_profile(&p, 7, 1, Duration::from_secs(1), 32768).unwrap();
        assert_eq!(hp.stacks.len(), 1);
        let s = &hp.stacks[0];
        assert_eq!((s.live_bytes, s.live_allocs), (65536, 2));
        assert_eq!(s.frames[0].function.as_deref(), Some("makeLeak"));
        assert_eq!((s.frames[0].file.as_deref(), s.frames[0].line), (Some("file:///a.js"), Some(3)));
        assert_eq!(s.frames[1].function.as_deref(), Some("main"));
        assert!(crate::render::render(&hp, crate::render::Format::Pprof, crate::aggregate::Measure::Inuse).is_ok());
    }
}
