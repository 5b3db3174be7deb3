//! V8's sampling heap profiler (`HeapProfiler.startSampling` / `getSamplingProfile`): a Poisson
//! sample of JavaScript allocations (one per `interval` bytes on average) with the JavaScript
//! stack that made them, of which the profile keeps those still alive. Turned into a
//! [`HeapProfile`] (function, script URL, line per frame; sampled sizes as live bytes) so that
//! every renderer of the native heap (pprof, folded, flamegraph, JSON) serves it too.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::{channel::Protocol, V8Error};
use crate::aggregate::{Frame, FrameInfo, HeapProfile, StackSample, Totals};

/// V8's default sampling interval (bytes).
pub const DEFAULT_INTERVAL: u64 = 32 * 1024;
/// Deepest JavaScript stack kept.
const MAX_DEPTH: usize = 128;

/// Samples the target's JavaScript allocations for `duration`, through an inspector session or
/// the target's snapshot channel (which never disables `HeapProfiler`: that would renumber
/// every object of the next heap snapshot).
pub fn profile<P: Protocol + ?Sized>(insp: &mut P, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    let t = Duration::from_secs(30);
    insp.call("HeapProfiler.enable", json!({}), t)?;
    insp.call("HeapProfiler.startSampling", json!({ "samplingInterval": interval as f64 }), t)?;
    std::thread::sleep(duration);
    let got = insp.call("HeapProfiler.getSamplingProfile", json!({}), Duration::from_secs(60));
    let _ = insp.call("HeapProfiler.stopSampling", json!({}), t);
    if insp.may_disable() {
        let _ = insp.call("HeapProfiler.disable", json!({}), t);
    }
    let got = got?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    to_profile(got.get("profile").unwrap_or(&Value::Null), insp.pid(), now, duration, interval)
}

/// A `SamplingHeapProfile` (the protocol's JSON) as a [`HeapProfile`]: reads the per-node
/// sample counts, then [`tree_profile`].
pub fn to_profile(p: &Value, pid: u32, taken_at_ms: u64, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    let head = p.get("head").ok_or_else(|| V8Error::Protocol("the sampling profile has no head".into()))?;
    let mut counts = HashMap::new();
    for s in p.get("samples").and_then(Value::as_array).into_iter().flatten() {
        if let Some(id) = s.get("nodeId").and_then(Value::as_u64) {
            *counts.entry(id).or_insert(0u64) += 1;
        }
    }
    Ok(tree_profile(head, &counts, ProfileMeta { pid, taken_at_ms, duration, interval }))
}

/// One `Runtime.CallFrame` of the sampling tree, as the protocol gives it (0-based line and
/// column, -1 when unknown).
#[derive(Clone, Copy, Debug)]
pub struct JsCallFrame<'a> {
    pub function_name: &'a str,
    pub url: &'a str,
    pub line_number: i64,
    pub column_number: i64,
}

/// A node of V8's sampling tree, whatever parsed it: the tree-building ([`tree_profile`]) only
/// reads these, so the parsing (and its caps) can change without touching it.
pub trait SampleNode: Sized {
    fn call_frame(&self) -> JsCallFrame<'_>;
    /// Bytes sampled in this node itself (not its children).
    fn self_size(&self) -> u64;
    /// The node id that `samples[].nodeId` refers to.
    fn node_id(&self) -> Option<u64>;
    fn children(&self) -> impl Iterator<Item = &Self>;
}

impl SampleNode for Value {
    fn call_frame(&self) -> JsCallFrame<'_> {
        let cf = self.get("callFrame").unwrap_or(&Value::Null);
        let s = |k: &str| cf.get(k).and_then(Value::as_str).unwrap_or("");
        let n = |k: &str| cf.get(k).and_then(Value::as_i64).unwrap_or(-1);
        JsCallFrame { function_name: s("functionName"), url: s("url"), line_number: n("lineNumber"), column_number: n("columnNumber") }
    }
    fn self_size(&self) -> u64 {
        self.get("selfSize").and_then(Value::as_u64).unwrap_or(0)
    }
    fn node_id(&self) -> Option<u64> {
        self.get("id").and_then(Value::as_u64)
    }
    fn children(&self) -> impl Iterator<Item = &Self> {
        self.get("children").and_then(Value::as_array).into_iter().flatten()
    }
}

/// What a [`HeapProfile`] says about the sampling besides its stacks.
#[derive(Clone, Copy, Debug)]
pub struct ProfileMeta {
    pub pid: u32,
    pub taken_at_ms: u64,
    pub duration: Duration,
    pub interval: u64,
}

/// V8's call tree as a [`HeapProfile`]: one stack (innermost frame first) per node with a self
/// size, whose frames are the node's ancestors below the root. Siblings stay siblings: a node's
/// path is its parent's path plus itself. Equal call frames (function, URL, line, column) share
/// one [`Frame`], so renderers see one function per distinct frame. `counts`: samples per node
/// id (a node without any counts as one allocation).
pub fn tree_profile<N: SampleNode>(head: &N, counts: &HashMap<u64, u64>, meta: ProfileMeta) -> HeapProfile {
    let mut frames: HashMap<(String, String, i64, i64), Frame> = HashMap::new();
    let mut stacks = Vec::new();
    let mut path: Vec<Frame> = Vec::new();
    // Depth-first without recursion: (node, depth); the head (V8's "(root)") is depth 0 and no
    // frame. Children are pushed last first so that they are visited in V8's order.
    let mut todo: Vec<(&N, usize)> = vec![(head, 0)];
    while let Some((node, depth)) = todo.pop() {
        if depth > 0 {
            path.truncate(depth - 1);
            let cf = node.call_frame();
            let key = (cf.function_name.to_string(), cf.url.to_string(), cf.line_number, cf.column_number);
            let f = frames.entry(key).or_insert_with(|| frame(cf).into()).clone();
            path.push(f);
        }
        let size = node.self_size();
        if size > 0 && !path.is_empty() {
            let allocs = node.node_id().and_then(|id| counts.get(&id).copied()).unwrap_or(1);
            let frames = path.iter().rev().cloned().collect();
            stacks.push(StackSample { frames, live_bytes: size, live_allocs: allocs, total_bytes: size, total_allocs: allocs, ..Default::default() });
        }
        if depth < MAX_DEPTH {
            let before = todo.len();
            todo.extend(node.children().map(|c| (c, depth + 1)));
            todo[before..].reverse();
        }
    }
    // Largest first; equal sizes in V8's tree order (the sort is stable).
    stacks.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    let live_bytes = stacks.iter().map(|s| s.live_bytes).sum();
    let live_allocs = stacks.iter().map(|s| s.live_allocs).sum();
    HeapProfile {
        pid: meta.pid,
        taken_at_ms: meta.taken_at_ms,
        duration_s: meta.duration.as_secs_f64(),
        min_age_s: 0.0,
        sample_bytes: meta.interval,
        totals: Totals { live_bytes, live_allocs, allocated_bytes: live_bytes, allocs: live_allocs, frees: 0 },
        stacks,
        ..Default::default()
    }
}

/// A call frame as a frame of the render model: the function (`(anonymous)` when V8 gives no
/// name), the script URL, 1-based line and column (only with a URL), module `[js]`, address 0
/// (renderers tell JavaScript frames apart by name, file, line and column).
fn frame(cf: JsCallFrame<'_>) -> FrameInfo {
    let cut = |s: &str| Some(s).filter(|s| !s.is_empty()).map(|s| s.chars().take(500).collect::<String>());
    let url = cut(cf.url);
    let pos = |n: i64| u32::try_from(n).ok().and_then(|n| n.checked_add(1)).filter(|_| url.is_some());
    FrameInfo {
        function: Some(Arc::from(cut(cf.function_name).unwrap_or_else(|| "(anonymous)".into()))),
        line: pos(cf.line_number),
        column: pos(cf.column_number),
        file: url.map(Arc::from),
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
    /// Siblings stay siblings (the bug was `caller;leftLeak;rightLeak`), equal call frames share
    /// one frame, and pprof has one location and one function per distinct frame.
    #[test]
    fn siblings_are_not_nested() {
        let cf = |name: &str, line: i64, col: i64| json!({"functionName": name, "url": "file:///s.js", "lineNumber": line, "columnNumber": col, "scriptId": "1"});
        let leaf = |name: &str, line: i64, id: u64, size: u64| json!({"callFrame": cf(name, line, 2), "selfSize": size, "id": id, "children": []});
        let p = json!({"head": {"callFrame": {"functionName": "(root)", "url": "", "lineNumber": -1, "columnNumber": -1}, "selfSize": 0, "id": 1,
            "children": [
                {"callFrame": cf("caller", 10, 0), "selfSize": 0, "id": 2, "children": [leaf("leftLeak", 3, 3, 300), leaf("rightLeak", 6, 4, 200)]},
                {"callFrame": cf("other", 20, 0), "selfSize": 0, "id": 5, "children": [leaf("leftLeak", 3, 6, 100)]},
                {"callFrame": cf("(anonymous)", 30, 4), "selfSize": 50, "id": 7, "children": []},
                {"callFrame": cf("(anonymous)", 30, 20), "selfSize": 50, "id": 8, "children": []}]},
            "samples": []});
        let hp = to_profile(&p, 7, 1, Duration::from_secs(1), 32768).unwrap();
        let folded = crate::render::folded::folded(&hp, crate::aggregate::Measure::Inuse);
        assert_eq!(folded, "(anonymous) 100\ncaller;leftLeak 300\ncaller;rightLeak 200\nother;leftLeak 100\n");
        let left: Vec<_> = hp.stacks.iter().filter(|s| s.frames[0].function.as_deref() == Some("leftLeak")).collect();
        assert!(std::ptr::eq(&*left[0].frames[0], &*left[1].frames[0]), "one frame per distinct call frame");
        assert_eq!((left[0].frames[0].line, left[0].frames[0].column), (Some(4), Some(3)));

        let pb = crate::render::pprof::pprof_profile(&hp);
        let name = |loc: u64| {
            let l = &pb.location[loc as usize - 1];
            let f = &pb.function[l.line[0].function_id as usize - 1];
            pb.string_table[f.name as usize].clone()
        };
        let mut traces: Vec<String> = pb.sample.iter().map(|s| s.location_id.iter().rev().map(|&l| name(l)).collect::<Vec<_>>().join(";")).collect();
        traces.sort();
        assert_eq!(traces, ["(anonymous)", "(anonymous)", "caller;leftLeak", "caller;rightLeak", "other;leftLeak"]);
        assert_eq!(pb.location.len(), 6, "caller, leftLeak, rightLeak, other and two anonymous functions on one line");
        assert_eq!(pb.function.len(), 6);
        let start_lines: Vec<i64> = pb.function.iter().map(|f| f.start_line).collect();
        assert!(start_lines.iter().all(|&l| l > 0), "{start_lines:?}");
    }
}
