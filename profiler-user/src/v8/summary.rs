//! A per-constructor summary of a V8 heap snapshot, computed while the snapshot streams by
//! (memory O(distinct constructors + their names), not O(snapshot)): for each constructor (the
//! node name of `object` and `native` nodes; other node types are grouped as `(string)`,
//! `(closure)`, `(array)`, ...) the number of objects and their self size, like the Summary view
//! of DevTools.
//!
//! Retained sizes are not computed. An object's retained size is the self size of everything
//! it dominates, so it needs the dominator tree of the whole graph: every node and every edge
//! in memory at once (in a snapshot the edges come after all the nodes, and any edge can make
//! any node reachable another way). A 500 MiB heap of small objects has ~14 M nodes and ~3
//! edges per node (node 20: 1.2 M nodes, 3.7 M edges for 51 MiB): the graph, its reverse edges
//! and the dominator algorithm's arrays take several hundred MB, against the few MiB this
//! summary needs.
//!
//! Everything in the snapshot is hostile (the target writes it): `snapshot.meta` is parsed into
//! bounded typed fields (the rest of `snapshot` is skipped, never held), and no single JSON
//! string may exceed [`MAX_STRING_BYTES`] (V8 cuts the strings of a snapshot to 1024
//! characters: `--heap-snapshot-string-limit`), so the parser's memory stays bounded whatever
//! the stream holds.
//!
//! [`grew`] compares two summaries; [`super::growth`] judges a series of them.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    io::Read,
};

use serde::{
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};

use super::V8Error;

/// One constructor's objects in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstructorStat {
    pub name: String,
    pub count: u64,
    pub self_size: u64,
}

/// What one heap snapshot holds, per constructor, largest self size first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeapSummary {
    pub pid: u32,
    pub taken_at_ms: u64,
    /// Why it was taken (`api`, a trigger's reason, ...).
    pub reason: String,
    pub node_count: u64,
    pub self_size: u64,
    /// Retained sizes are not computed (they need the whole graph in memory).
    pub retained_size_computed: bool,
    pub constructors: Vec<ConstructorStat>,
}

impl HeapSummary {
    pub fn get(&self, name: &str) -> Option<&ConstructorStat> {
        self.constructors.iter().find(|c| c.name == name)
    }
}

/// Node types whose name is their constructor.
const BY_NAME: &[&str] = &["object", "native"];
/// Most constructors kept; the rest are summed as `(other)`.
const MAX_CONSTRUCTORS: usize = 100_000;
/// Longest JSON string (or key) accepted in a snapshot, in bytes as sent (escapes included).
pub const MAX_STRING_BYTES: usize = 1 << 20;
/// Most node fields and node types accepted in `snapshot.meta` (V8 has 7 and 14).
const MAX_META_ITEMS: usize = 256;

#[derive(Default)]
struct Meta {
    fields: usize,
    type_at: usize,
    name_at: usize,
    size_at: usize,
    types: Vec<String>,
}

/// `snapshot` as far as the summary needs it: `meta.node_fields` and `meta.node_types[0]`,
/// each at most [`MAX_META_ITEMS`] strings; everything else is skipped.
#[derive(Deserialize)]
struct SnapshotHead {
    meta: Option<MetaHead>,
}

#[derive(Deserialize)]
struct MetaHead {
    node_fields: Option<Bounded>,
    node_types: Option<FirstOf>,
}

/// At most [`MAX_META_ITEMS`] strings (other values as `?`).
struct Bounded(Vec<String>);

impl<'de> Deserialize<'de> for Bounded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bounded, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bounded;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bounded, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<serde_json::Value>()? {
                    if out.len() == MAX_META_ITEMS {
                        return Err(serde::de::Error::custom(format!("more than {MAX_META_ITEMS} names in snapshot.meta")));
                    }
                    out.push(v.as_str().unwrap_or("?").chars().take(200).collect());
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The first element of an array, bounded; the others skipped.
struct FirstOf(Option<Bounded>);

impl<'de> Deserialize<'de> for FirstOf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FirstOf, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstOf;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("meta.node_types")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstOf, A::Error> {
                let first = seq.next_element::<Bounded>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstOf(first))
            }
        }
        d.deserialize_seq(V)
    }
}

fn parse_meta(v: SnapshotHead) -> Result<Meta, String> {
    let meta = v.meta.ok_or("no snapshot.meta")?;
    let fields = meta.node_fields.ok_or("no meta.node_fields")?.0;
    let at = |n: &str| fields.iter().position(|f| *f == n).ok_or(format!("node_fields has no {n:?}"));
    let types = meta.node_types.and_then(|t| t.0).ok_or("no meta.node_types[0]")?.0;
    Ok(Meta { fields: fields.len(), type_at: at("type")?, name_at: at("name")?, size_at: at("self_size")?, types })
}

/// A reader that refuses a JSON string (or key) longer than [`MAX_STRING_BYTES`]: the JSON
/// parser holds a whole string before handing it over.
struct StringCap<R> {
    inner: R,
    in_string: bool,
    escaped: bool,
    run: usize,
}

impl<R: Read> Read for StringCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if self.in_string {
                self.run += 1;
                if self.run > MAX_STRING_BYTES {
                    return Err(std::io::Error::other(format!("a string longer than {MAX_STRING_BYTES} bytes")));
                }
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else if b == b'"' {
                self.in_string = true;
                self.run = 0;
            }
        }
        Ok(n)
    }
}

/// (type index, name string index or u64::MAX) -> (count, self size)
type Agg = HashMap<(u64, u64), (u64, u64)>;

struct Nodes<'a> {
    meta: &'a Meta,
    agg: &'a mut Agg,
    count: &'a mut u64,
}

impl<'de> DeserializeSeed<'de> for Nodes<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Nodes<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the nodes array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let m = self.meta;
        if m.fields == 0 {
            return Err(serde::de::Error::custom("nodes before snapshot.meta"));
        }
        let mut row = vec![0u64; m.fields];
        let mut i = 0;
        while let Some(v) = seq.next_element::<u64>()? {
            row[i] = v;
            i += 1;
            if i == m.fields {
                i = 0;
                *self.count += 1;
                let ty = row[m.type_at];
                let by_name = m.types.get(ty as usize).is_some_and(|t| BY_NAME.contains(&t.as_str()));
                let mut key = (ty, if by_name { row[m.name_at] } else { u64::MAX });
                if !self.agg.contains_key(&key) && self.agg.len() >= MAX_CONSTRUCTORS {
                    key = (u64::MAX, u64::MAX);
                }
                let e = self.agg.entry(key).or_default();
                e.0 += 1;
                e.1 += row[m.size_at];
            }
        }
        if i != 0 {
            return Err(serde::de::Error::custom("the nodes array is not a whole number of nodes"));
        }
        Ok(())
    }
}

struct Strings<'a> {
    needed: &'a HashSet<u64>,
    names: &'a mut HashMap<u64, String>,
}

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the strings array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0u64;
        loop {
            if self.needed.contains(&i) {
                let Some(s) = seq.next_element::<String>()? else { break };
                self.names.insert(i, s.chars().take(200).collect());
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(())
    }
}

struct Top<'a> {
    meta: &'a mut Meta,
    agg: &'a mut Agg,
    count: &'a mut u64,
    names: &'a mut HashMap<u64, String>,
    saw_meta: &'a mut bool,
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a V8 heap snapshot object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "snapshot" => {
                    let v: SnapshotHead = map.next_value()?;
                    *self.meta = parse_meta(v).map_err(serde::de::Error::custom)?;
                    *self.saw_meta = true;
                }
                "nodes" => map.next_value_seed(Nodes { meta: self.meta, agg: self.agg, count: self.count })?,
                "strings" => {
                    let needed: HashSet<u64> = self.agg.keys().map(|k| k.1).filter(|&n| n != u64::MAX).collect();
                    map.next_value_seed(Strings { needed: &needed, names: self.names })?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a whole heap snapshot from `r` (streaming) into its summary.
pub fn summarize(r: impl Read, pid: u32, taken_at_ms: u64, reason: &str) -> Result<HeapSummary, V8Error> {
    let (mut meta, mut agg, mut count, mut names, mut saw_meta) = (Meta::default(), Agg::new(), 0u64, HashMap::new(), false);
    let capped = StringCap { inner: r, in_string: false, escaped: false, run: 0 };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(64 * 1024, capped));
    de.deserialize_map(Top { meta: &mut meta, agg: &mut agg, count: &mut count, names: &mut names, saw_meta: &mut saw_meta })
        .map_err(|e| V8Error::Malformed(e.to_string()))?;
    de.end().map_err(|e| V8Error::Malformed(e.to_string()))?;
    if !saw_meta {
        return Err(V8Error::Malformed("no snapshot.meta".into()));
    }
    let mut constructors: Vec<ConstructorStat> = agg
        .into_iter()
        .map(|((ty, name), (count, self_size))| {
            let name = if ty == u64::MAX {
                "(other)".to_string()
            } else if name != u64::MAX {
                names.get(&name).cloned().unwrap_or_else(|| format!("(string #{name})"))
            } else {
                format!("({})", meta.types.get(ty as usize).map_or("?", String::as_str))
            };
            ConstructorStat { name, count, self_size }
        })
        .collect();
    // Several name indices can carry the same text: merge them.
    constructors.sort_by(|a, b| a.name.cmp(&b.name));
    constructors.dedup_by(|b, a| {
        if a.name == b.name {
            a.count += b.count;
            a.self_size += b.self_size;
            true
        } else {
            false
        }
    });
    constructors.sort_by(|a, b| b.self_size.cmp(&a.self_size).then_with(|| a.name.cmp(&b.name)));
    Ok(HeapSummary {
        pid,
        taken_at_ms,
        reason: reason.to_string(),
        node_count: count,
        self_size: constructors.iter().map(|c| c.self_size).sum(),
        retained_size_computed: false,
        constructors,
    })
}

/// A `Read` over chunks sent from another thread (the inspector's): the summary is computed
/// while the snapshot streams. Dropping the sender ends the input.
pub struct ChunkReader {
    rx: std::sync::mpsc::Receiver<String>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    /// A reader and the sender that feeds it (bounded: the producer waits for the parser).
    pub fn new() -> (std::sync::mpsc::SyncSender<String>, ChunkReader) {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        (tx, ChunkReader { rx, cur: Vec::new(), pos: 0 })
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.recv() {
                Ok(s) => {
                    self.cur = s.into_bytes();
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One constructor's change between two summaries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstructorGrowth {
    pub name: String,
    pub count_before: u64,
    pub count_after: u64,
    pub self_size_before: u64,
    pub self_size_after: u64,
    pub count_delta: i64,
    pub self_size_delta: i64,
}

/// Constructors whose object count grew from `a` to `b`, most grown (by self size) first.
pub fn grew(a: &HeapSummary, b: &HeapSummary) -> Vec<ConstructorGrowth> {
    let before: HashMap<&str, &ConstructorStat> = a.constructors.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut out: Vec<ConstructorGrowth> = b
        .constructors
        .iter()
        .filter_map(|c| {
            let (cb, sb) = before.get(c.name.as_str()).map_or((0, 0), |p| (p.count, p.self_size));
            (c.count > cb).then(|| ConstructorGrowth {
                name: c.name.clone(),
                count_before: cb,
                count_after: c.count,
                self_size_before: sb,
                self_size_after: c.self_size,
                count_delta: c.count as i64 - cb as i64,
                self_size_delta: c.self_size as i64 - sb as i64,
            })
        })
        .collect();
    out.sort_by(|x, y| y.self_size_delta.cmp(&x.self_size_delta).then_with(|| x.name.cmp(&y.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAP: &str = r#"{"snapshot":{"meta":{"node_fields":["type","name","id","self_size","edge_count"],
        "node_types":[["hidden","array","string","object","code","closure"],"string","number","number","number"],
        "edge_fields":["type","name_or_index","to_node"],"edge_types":[["element"],"string","node"]},
        "node_count":5,"edge_count":0},
        "nodes":[3,1,1,40,0, 3,1,3,40,0, 3,2,5,24,0, 2,3,7,16,0, 5,4,9,32,0],
        "edges":[],"locations":[],
        "strings":["","Leaky","Churn","some text","fn"]}"#;

    /// Objects are grouped by constructor name, other node types by type; sizes summed.
    #[test]
    fn summarizes_a_snapshot() {
        let s = summarize(SNAP.as_bytes(), 1, 2, "api").unwrap();
        assert_eq!(s.node_count, 5);
        assert_eq!(s.get("Leaky"), Some(&ConstructorStat { name: "Leaky".into(), count: 2, self_size: 80 }));
        assert_eq!(s.get("Churn").unwrap().count, 1);
        assert_eq!(s.get("(string)").unwrap().self_size, 16);
        assert_eq!(s.get("(closure)").unwrap().count, 1);
        assert_eq!(s.constructors[0].name, "Leaky");
        assert!(summarize(&b"{\"nodes\":[1,2]}"[..], 1, 2, "x").is_err());
        assert!(summarize(&SNAP.as_bytes()[..100], 1, 2, "x").is_err());
    }

    /// A string past the cap, or a huge `snapshot` section, is refused or skipped without
    /// being held.
    #[test]
    fn hostile_snapshots_are_bounded() {
        let long = format!("{{\"snapshot\":{{\"x\":\"{}\"}}}}", "a".repeat(MAX_STRING_BYTES + 1));
        let e = summarize(long.as_bytes(), 1, 2, "x").unwrap_err().to_string();
        assert!(e.contains("longer than"), "{e}");
        let escaped = format!("{{\"strings\":[\"{}\"]}}", "\\\"".repeat(MAX_STRING_BYTES));
        assert!(summarize(escaped.as_bytes(), 1, 2, "x").unwrap_err().to_string().contains("longer than"));
        // Many small values beside meta are skipped, not kept.
        let wide = SNAP.replacen("\"node_count\":5", &format!("\"pad\":[{}0],\"node_count\":5", "0,".repeat(1 << 20)), 1);
        assert_eq!(summarize(wide.as_bytes(), 1, 2, "x").unwrap().node_count, 5);
        let many = SNAP.replacen("[\"type\",", &format!("[{}\"type\",", "\"f\",".repeat(MAX_META_ITEMS)), 1);
        assert!(summarize(many.as_bytes(), 1, 2, "x").is_err());
    }

    /// Growth lists constructors whose count grew, largest self-size growth first.
    #[test]
    fn growth_names_what_grew() {
        let a = summarize(SNAP.as_bytes(), 1, 2, "a").unwrap();
        let mut b = a.clone();
        b.constructors.iter_mut().find(|c| c.name == "Leaky").unwrap().count = 10;
        b.constructors.iter_mut().find(|c| c.name == "Leaky").unwrap().self_size = 400;
        b.constructors.iter_mut().find(|c| c.name == "Churn").unwrap().count = 0;
        let g = grew(&a, &b);
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].name.as_str(), g[0].count_delta, g[0].self_size_delta), ("Leaky", 8, 320));
    }
}
