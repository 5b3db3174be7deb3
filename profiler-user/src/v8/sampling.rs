//! V8's sampling heap profiler (`HeapProfiler.startSampling` / `getSamplingProfile`): a Poisson
//! sample of JavaScript allocations (one per `interval` bytes on average) with the JavaScript
//! stack that made them, of which the profile keeps those still alive. Turned into a
//! [`HeapProfile`] (function, script URL, line per frame; sampled sizes as live bytes) so that
//! every renderer of the native heap (pprof, folded, flamegraph, JSON) serves it too.
//!
//! Everything in the answer is hostile: it is parsed into typed structs ([`SamplingProfile`]),
//! never a generic JSON tree, from a message of at most
//! [`super::inspector::MAX_PROFILE_MESSAGE_BYTES`], with caps on nodes ([`MAX_NODES`]), depth
//! ([`MAX_TREE_DEPTH`]), samples ([`MAX_SAMPLES`]) and the frames of the stacks it makes
//! ([`MAX_STACK_FRAMES`]); past a cap the profile is refused with a clear error
//! ([`V8Error::TooLarge`]) as soon as the cap is crossed.
use std::{
    cell::Cell,
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::json;

use super::{inspector::MAX_PROFILE_MESSAGE_BYTES, Protocol, V8Error};
use crate::aggregate::{Frame, FrameInfo, HeapProfile, StackSample, Totals};

/// V8's default sampling interval (bytes).
pub const DEFAULT_INTERVAL: u64 = 32 * 1024;
/// Deepest JavaScript stack kept.
const MAX_DEPTH: usize = 128;
/// Most nodes in a profile's call tree (a big service has a few thousand to tens of thousands).
pub const MAX_NODES: usize = 100_000;
/// Deepest call tree accepted (V8 records at most 128 frames per sample, below a root).
pub const MAX_TREE_DEPTH: usize = 160;
/// Most samples (live sampled allocations) in a profile: 16 GiB of live heap at the default
/// interval.
pub const MAX_SAMPLES: u64 = 500_000;
/// Most frames over the stacks of all nodes that hold memory (what the renderers expand).
pub const MAX_STACK_FRAMES: u64 = 2_000_000;
/// Longest function name or URL kept (characters).
const MAX_NAME: usize = 500;

/// `Runtime.CallFrame`, as far as a sampling profile needs it (strings capped at [`MAX_NAME`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallFrame {
    #[serde(default, deserialize_with = "capped_string")]
    pub function_name: String,
    #[serde(default, deserialize_with = "capped_string")]
    pub url: String,
    /// 0-based; -1 when unknown.
    #[serde(default = "unknown_line")]
    pub line_number: i64,
    #[serde(default = "unknown_line")]
    pub column_number: i64,
}

fn unknown_line() -> i64 {
    -1
}

fn capped_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
    Ok(if s.chars().count() > MAX_NAME { s.chars().take(MAX_NAME).collect() } else { s.into_owned() })
}

/// `HeapProfiler.SamplingHeapProfileNode`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SamplingNode {
    pub call_frame: CallFrame,
    /// Bytes of the live samples allocated right here.
    pub self_size: u64,
    pub id: u64,
    pub children: Vec<SamplingNode>,
}

/// `HeapProfiler.SamplingHeapProfile`: the call tree, and the samples counted per node id
/// (the samples themselves are not kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SamplingProfile {
    pub head: SamplingNode,
    /// Live samples per node id.
    pub samples_per_node: HashMap<u64, u64>,
    pub samples: u64,
}

/// Samples the target's JavaScript allocations for `duration`, through an inspector session or
/// the target's snapshot channel (which never disables `HeapProfiler`: that would renumber
/// every object of the next heap snapshot), within the session's budget when it has one (a
/// cancelled request stops the wait at once).
pub fn profile<P: Protocol>(insp: &mut P, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    let t = Duration::from_secs(30);
    insp.call("HeapProfiler.enable", json!({}), t)?;
    insp.call("HeapProfiler.startSampling", json!({ "samplingInterval": interval as f64 }), t)?;
    let end = std::time::Instant::now() + duration;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        insp.budget().check("sampling the JavaScript heap")?;
        std::thread::sleep(left.min(super::inspector::READ_SLICE));
    }
    // stopSampling answers the profile (as getSamplingProfile would) and stops.
    let got = insp.call_raw("HeapProfiler.stopSampling", json!({}), Duration::from_secs(60), MAX_PROFILE_MESSAGE_BYTES, |_, _| Ok(()));
    if insp.may_disable() {
        let _ = insp.call("HeapProfiler.disable", json!({}), t);
    }
    let parsed = parse_reply(got?)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    to_profile(&parsed, insp.pid(), now, duration, interval)
}

/// The profile in an answer (a whole message) to `stopSampling` / `getSamplingProfile`, from
/// any session (the main thread's, a worker's nested one, the snapshot channel).
pub(super) fn parse_reply(reply: super::inspector::RawReply) -> Result<SamplingProfile, V8Error> {
    let result = reply.result()?.ok_or_else(|| V8Error::Protocol("the sampling profile answer has no result".into()))?;
    parse_result(result.get().to_string())
}

/// The profile in the `result` (raw JSON text) of `stopSampling` / `getSamplingProfile`, parsed
/// on a thread of its own (the call tree is parsed recursively, at most [`MAX_TREE_DEPTH`] deep:
/// a stack sized for it whatever thread asked).
fn parse_result(result: String) -> Result<SamplingProfile, V8Error> {
    std::thread::Builder::new()
        .name("v8-profile-parse".into())
        .stack_size(32 << 20)
        .spawn(move || {
            #[derive(Deserialize)]
            struct R<'a> {
                #[serde(borrow)]
                profile: &'a serde_json::value::RawValue,
            }
            let r: R = serde_json::from_str(&result).map_err(|e| V8Error::Protocol(format!("the sampling profile answer: {e}")))?;
            parse_profile(r.profile.get())
        })
        .map_err(|e| V8Error::Protocol(format!("starting the profile parser: {e}")))?
        .join()
        .map_err(|_| V8Error::Malformed("the profile parser panicked".into()))?
}

/// Parses a `SamplingHeapProfile` object (JSON text) under the caps of this module. Recursive
/// to [`MAX_TREE_DEPTH`]: call it on a thread with a few MiB of stack.
pub fn parse_profile(text: &str) -> Result<SamplingProfile, V8Error> {
    let ctx = Ctx::default();
    let mut de = serde_json::Deserializer::from_str(text);
    // The only recursion is the call tree's, bounded by NodeSeed; ignored values are skipped
    // without recursion by serde_json.
    de.disable_recursion_limit();
    let parsed = ProfileSeed { ctx: &ctx }.deserialize(&mut de).and_then(|p| de.end().map(|_| p));
    match parsed {
        Ok(p) => Ok(p),
        Err(e) => Err(match ctx.too_large.take() {
            Some(why) => V8Error::TooLarge(why),
            None => V8Error::Protocol(format!("the sampling profile is malformed: {e}")),
        }),
    }
}

#[derive(Default)]
struct Ctx {
    nodes: Cell<usize>,
    frames: Cell<u64>,
    too_large: Cell<Option<String>>,
}

impl Ctx {
    fn refuse<E: serde::de::Error>(&self, why: String) -> E {
        let e = E::custom(&why);
        self.too_large.set(Some(why));
        e
    }
}

/// A JSON number as a byte count (V8 writes sizes as doubles): negative or not finite is 0.
fn bytes_of(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum NodeField {
    CallFrame,
    SelfSize,
    Id,
    Children,
    #[serde(other)]
    Other,
}

struct NodeSeed<'c> {
    ctx: &'c Ctx,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = SamplingNode;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<SamplingNode, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = SamplingNode;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sampling profile node")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SamplingNode, A::Error> {
        let ctx = self.ctx;
        if self.depth > MAX_TREE_DEPTH {
            return Err(ctx.refuse(format!("the sampling profile's call tree is deeper than {MAX_TREE_DEPTH} frames")));
        }
        let n = ctx.nodes.get() + 1;
        if n > MAX_NODES {
            return Err(ctx.refuse(format!("the sampling profile has more than {MAX_NODES} nodes; sample with a larger interval")));
        }
        ctx.nodes.set(n);
        let mut node = SamplingNode::default();
        while let Some(k) = map.next_key::<NodeField>()? {
            match k {
                NodeField::CallFrame => node.call_frame = map.next_value()?,
                NodeField::SelfSize => node.self_size = bytes_of(map.next_value::<f64>()?),
                NodeField::Id => node.id = map.next_value()?,
                NodeField::Children => node.children = map.next_value_seed(ChildrenSeed { ctx, depth: self.depth + 1 })?,
                NodeField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if node.self_size > 0 {
            let frames = ctx.frames.get() + self.depth as u64;
            if frames > MAX_STACK_FRAMES {
                return Err(ctx.refuse(format!("the sampling profile's stacks have more than {MAX_STACK_FRAMES} frames in all")));
            }
            ctx.frames.set(frames);
        }
        Ok(node)
    }
}

struct ChildrenSeed<'c> {
    ctx: &'c Ctx,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ChildrenSeed<'_> {
    type Value = Vec<SamplingNode>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<SamplingNode>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ChildrenSeed<'_> {
    type Value = Vec<SamplingNode>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of sampling profile nodes")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<SamplingNode>, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = seq.next_element_seed(NodeSeed { ctx: self.ctx, depth: self.depth })? {
            out.push(n);
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum ProfileField {
    Head,
    Samples,
    #[serde(other)]
    Other,
}

struct ProfileSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for ProfileSeed<'_> {
    type Value = SamplingProfile;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<SamplingProfile, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ProfileSeed<'_> {
    type Value = SamplingProfile;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sampling heap profile")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SamplingProfile, A::Error> {
        let mut head = None;
        let mut p = SamplingProfile::default();
        while let Some(k) = map.next_key::<ProfileField>()? {
            match k {
                ProfileField::Head => head = Some(map.next_value_seed(NodeSeed { ctx: self.ctx, depth: 0 })?),
                ProfileField::Samples => map.next_value_seed(SamplesSeed { ctx: self.ctx, p: &mut p })?,
                ProfileField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        p.head = head.ok_or_else(|| serde::de::Error::custom("the sampling profile has no head"))?;
        Ok(p)
    }
}

/// Counts the samples per node id as they stream by (none is kept).
struct SamplesSeed<'c, 'p> {
    ctx: &'c Ctx,
    p: &'p mut SamplingProfile,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sample {
    #[serde(default)]
    node_id: Option<u64>,
}

impl<'de> DeserializeSeed<'de> for SamplesSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SamplesSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of samples")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(s) = seq.next_element::<Sample>()? {
            self.p.samples += 1;
            if self.p.samples > MAX_SAMPLES {
                return Err(self.ctx.refuse(format!("the sampling profile has more than {MAX_SAMPLES} samples; sample with a larger interval")));
            }
            if let Some(id) = s.node_id {
                if !self.p.samples_per_node.contains_key(&id) && self.p.samples_per_node.len() >= MAX_NODES {
                    return Err(self.ctx.refuse(format!("the sampling profile's samples name more than {MAX_NODES} nodes")));
                }
                *self.p.samples_per_node.entry(id).or_insert(0) += 1;
            }
        }
        Ok(())
    }
}

/// A [`SamplingProfile`] as a [`HeapProfile`]: [`tree_profile`] with its per-node sample counts.
pub fn to_profile(p: &SamplingProfile, pid: u32, taken_at_ms: u64, duration: Duration, interval: u64) -> Result<HeapProfile, V8Error> {
    Ok(tree_profile(&p.head, &p.samples_per_node, ProfileMeta { pid, taken_at_ms, duration, interval }))
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

impl SampleNode for SamplingNode {
    fn call_frame(&self) -> JsCallFrame<'_> {
        let cf = &self.call_frame;
        JsCallFrame { function_name: &cf.function_name, url: &cf.url, line_number: cf.line_number, column_number: cf.column_number }
    }
    fn self_size(&self) -> u64 {
        self.self_size
    }
    fn node_id(&self) -> Option<u64> {
        Some(self.id)
    }
    fn children(&self) -> impl Iterator<Item = &Self> {
        self.children.iter()
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
        let p = parse_profile(&p.to_string()).unwrap();
        assert_eq!(p.samples, 2);
        let hp = to_profile(&p, 7, 1, Duration::from_secs(1), 32768).unwrap();
        assert_eq!(hp.stacks.len(), 1);
        let s = &hp.stacks[0];
        assert_eq!((s.live_bytes, s.live_allocs), (65536, 2));
        assert_eq!(s.frames[0].function.as_deref(), Some("makeLeak"));
        assert_eq!((s.frames[0].file.as_deref(), s.frames[0].line), (Some("file:///a.js"), Some(3)));
        assert_eq!(s.frames[1].function.as_deref(), Some("main"));
        assert!(crate::render::render(&hp, crate::render::Format::Pprof, crate::aggregate::Measure::Inuse).is_ok());
    }

    /// A chain of `depth` frames under the root, the innermost holding `size` bytes.
    fn chain(depth: usize, size: u64) -> String {
        let mut s = String::from(r#"{"head":"#);
        for i in 0..=depth {
            let self_size = if i == depth { size } else { 0 };
            s.push_str(&format!(r#"{{"callFrame":{{"functionName":"f{i}","scriptId":"1","url":"file:///a.js","lineNumber":{i},"columnNumber":0}},"selfSize":{self_size},"id":{},"children":["#, i + 1));
        }
        for _ in 0..=depth {
            s.push_str("]}");
        }
        s.push_str(r#","samples":[]}"#);
        s
    }

    fn too_large(r: Result<SamplingProfile, V8Error>) -> String {
        match r {
            Err(V8Error::TooLarge(m)) => m,
            other => panic!("not refused as too large: {other:?}"),
        }
    }

    /// V8's deepest stacks (128 frames: JSON nested ~260 deep, past serde_json's default limit)
    /// parse; deeper trees, too many nodes, samples or stack frames are refused as too large.
    #[test]
    fn caps_are_enforced_while_parsing() {
        let p = parse_profile(&chain(128, 1024)).unwrap();
        let hp = to_profile(&p, 1, 1, Duration::from_secs(1), 1024).unwrap();
        assert_eq!(hp.stacks[0].frames.len(), 128);
        assert!(too_large(parse_profile(&chain(MAX_TREE_DEPTH + 1, 1))).contains("deeper"));
        // A hostile depth of a million is refused before it can exhaust the stack.
        let deep = format!(r#"{{"head":{}"#, r#"{"children":["#.repeat(1_000_000));
        assert!(too_large(parse_profile(&deep)).contains("deeper"));
        let node = r#"{"callFrame":{"functionName":"x","url":"","lineNumber":-1},"selfSize":0,"id":2,"children":[]},"#;
        let wide = format!(r#"{{"head":{{"id":1,"children":[{}{{"id":3}}]}}}}"#, node.repeat(MAX_NODES));
        assert!(too_large(parse_profile(&wide)).contains("nodes"));
        let samples = format!(r#"{{"head":{{"id":1}},"samples":[{}{{"nodeId":1}}]}}"#, r#"{"nodeId":1},"#.repeat(MAX_SAMPLES as usize));
        assert!(too_large(parse_profile(&samples)).contains("samples"));
        let ids: String = (0..=MAX_NODES).map(|i| format!(r#"{{"nodeId":{i}}},"#)).collect();
        let ids = format!(r#"{{"head":{{"id":1}},"samples":[{ids}{{"nodeId":1}}]}}"#);
        assert!(too_large(parse_profile(&ids)).contains("name more than"));
        // 20,000 leaves 128 deep: 2.56 M frames.
        let leaf = r#"{"selfSize":8,"id":9},"#.repeat(20_000);
        let mut frames = chain(127, 0);
        let at = frames.find(r#""id":128,"children":["#).unwrap() + r#""id":128,"children":["#.len();
        frames.insert_str(at, &leaf[..leaf.len() - 1]);
        assert!(too_large(parse_profile(&frames)).contains("frames"));
        assert!(matches!(parse_profile(r#"{"samples":[]}"#), Err(V8Error::Protocol(_))));
        assert!(matches!(parse_profile(r#"{"head":{"selfSize":"big"}}"#), Err(V8Error::Protocol(_))));
    }

    /// Names are cut to 500 characters; unknown fields are skipped.
    #[test]
    fn names_are_capped_and_unknown_fields_skipped() {
        let text = format!(r#"{{"extra":[[[1]]],"head":{{"callFrame":{{"functionName":"{}","url":"u"}},"more":{{"a":[1,2]}},"children":[]}}}}"#, "n".repeat(10_000));
        let p = parse_profile(&text).unwrap();
        assert_eq!(p.head.call_frame.function_name.len(), MAX_NAME);
        assert_eq!(p.head.call_frame.line_number, -1);
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
        let p = parse_profile(&p.to_string()).unwrap();
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
