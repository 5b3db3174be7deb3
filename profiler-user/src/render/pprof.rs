//! pprof output shaped like a Go heap profile: a gzip-compressed protobuf
//! `perftools.profiles.Profile` (github.com/google/pprof/proto/profile.proto), readable by
//! `go tool pprof`, Pyroscope, Parca, speedscope and `protoc --decode`.
//!
//! The messages are written by hand with `prost` derives mirroring profile.proto's field
//! numbers (no protoc at build time). What we put in:
//! - sample types, in Go's order: `alloc_objects/count`, `alloc_space/bytes`,
//!   `inuse_objects/count`, `inuse_space/bytes`; `default_sample_type` is `inuse_space`;
//! - `period_type` `space/bytes` and `period` = mean bytes between samples (0: every
//!   allocation was recorded; values are already scaled to estimates when sampling);
//! - one `Sample` per stack with any non-zero value, location ids innermost first, plus numeric
//!   labels `leak_bytes` and `leak_allocs` on stacks that leak;
//! - one `Location` per distinct address, with one `Line` (function, line number) and the
//!   `Mapping` of its module; one `Function` per distinct (name, file); frames that could not
//!   be named get their `module+0xoffset` as function name;
//! - frames without an address (JavaScript frames of V8's sampling profile) are told apart by
//!   what they are instead: one `Location` and one `Function` per distinct (name, file, line,
//!   column), the function's `start_line` being its line (V8 gives where a function starts);
//! - the target's executable mappings with their start, limit, file offset, file name and GNU
//!   build id (`HeapProfile::mappings`, read at snapshot time), so that a backend can
//!   symbolize; for profiles without them (older stored snapshots), one `Mapping` per module
//!   spanning the addresses seen in it, with `file_offset` when a frame's module offset is known;
//! - comments with the pid, the leak age threshold, dropped events and unseen heap bytes.
//!
//! pprof's own rules hold: `string_table[0]` is `""`, ids start at 1 and every id resolves.
use std::{
    collections::{BTreeMap, HashMap},
    io::{Read as _, Write as _},
};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use prost::Message as _;

use super::RenderError;
use crate::aggregate::{Frame, HeapProfile};

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PprofProfile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    #[prost(int64, tag = "8")]
    pub keep_frames: i64,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`: string-table indices of a type and its unit.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Innermost (the allocator's caller) first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One per sample type, in the same order.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `perftools.profiles.Mapping`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `perftools.profiles.Location`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// 0 when the module is unknown.
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// `perftools.profiles.Line`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// The sample types, in order: (type, unit).
pub const SAMPLE_TYPES: [(&str, &str); 4] =
    [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")];

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What we learn about one module from the frames in it.
struct ModuleSpan {
    id: u64,
    min: u64,
    max: u64,
    /// address - module_offset, from the first frame that has a module offset.
    bias: Option<u64>,
    functions: bool,
    filenames: bool,
    lines: bool,
}

/// Builds the pprof message of `p` (see the module doc for what goes in).
pub fn pprof_profile(p: &HeapProfile) -> PprofProfile {
    let mut strings = Strings::new();
    let sample_type: Vec<ValueType> =
        SAMPLE_TYPES.iter().map(|(t, u)| ValueType { r#type: strings.get(t), unit: strings.get(u) }).collect();
    let stacks: Vec<_> = p
        .stacks
        .iter()
        .filter(|s| s.total_allocs | s.total_bytes | s.live_allocs | s.live_bytes | s.leak_bytes != 0)
        .collect();

    // Pass 1: the modules and the address range seen in each.
    let mut modules: BTreeMap<&str, ModuleSpan> = BTreeMap::new();
    let mut module_order: Vec<&str> = Vec::new();
    for f in stacks.iter().flat_map(|s| &s.frames) {
        let Some(m) = f.module.as_deref() else { continue };
        let span = modules.entry(m).or_insert_with(|| {
            module_order.push(m);
            ModuleSpan {
                id: module_order.len() as u64,
                min: f.address,
                max: f.address,
                bias: None,
                functions: true,
                filenames: true,
                lines: true,
            }
        });
        span.min = span.min.min(f.address);
        span.max = span.max.max(f.address);
        if span.bias.is_none() {
            span.bias = f.module_offset.and_then(|off| f.address.checked_sub(off));
        }
        span.functions &= f.function.is_some();
        span.filenames &= f.file.is_some();
        span.lines &= f.line.is_some();
    }
    // The target's real mappings when the snapshot has them (start, limit, offset, build id),
    // else one per module spanning the addresses seen in it.
    let real: Vec<Mapping> = p
        .mappings
        .iter()
        .enumerate()
        .map(|(i, m)| Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.limit,
            file_offset: m.file_offset,
            filename: strings.get(&m.path),
            build_id: m.build_id.as_deref().map_or(0, |b| strings.get(b)),
            has_functions: modules.get(m.path.as_str()).is_some_and(|s| s.functions),
            has_filenames: modules.get(m.path.as_str()).is_some_and(|s| s.filenames),
            has_line_numbers: modules.get(m.path.as_str()).is_some_and(|s| s.lines),
            has_inline_frames: false,
        })
        .collect();
    let real_id = |addr: u64| -> Option<u64> {
        let i = p.mappings.partition_point(|m| m.start <= addr);
        (i > 0 && addr < p.mappings[i - 1].limit).then_some(i as u64)
    };
    let mapping: Vec<Mapping> = if !real.is_empty() { real } else { module_order
        .iter()
        .map(|m| {
            let s = &modules[m];
            Mapping {
                id: s.id,
                memory_start: s.min,
                memory_limit: s.max.saturating_add(1),
                file_offset: s.bias.and_then(|b| s.min.checked_sub(b)).unwrap_or(0),
                filename: strings.get(m),
                build_id: 0,
                has_functions: s.functions,
                has_filenames: s.filenames,
                has_line_numbers: s.lines,
                has_inline_frames: false,
            }
        })
        .collect() };
    let use_real = !p.mappings.is_empty();

    // Pass 2: functions, locations, samples.
    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<FunctionKey<'_>, u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<LocationKey<'_>, u64> = HashMap::new();
    let mut samples = Vec::with_capacity(stacks.len());
    let leak_bytes_key = strings.get("leak_bytes");
    let leak_allocs_key = strings.get("leak_allocs");
    let bytes_unit = strings.get("bytes");
    for s in &stacks {
        let mut location_id = Vec::with_capacity(s.frames.len());
        for f in &s.frames {
            let id = *location_ids.entry(LocationKey::of(f)).or_insert_with(|| {
                let function_id = function_id(f, &mut functions, &mut function_ids, &mut strings);
                let id = locations.len() as u64 + 1;
                locations.push(Location {
                    id,
                    mapping_id: if use_real {
                        real_id(f.address).unwrap_or(0)
                    } else {
                        f.module.as_deref().map_or(0, |m| modules[m].id)
                    },
                    address: f.address,
                    line: vec![Line { function_id, line: i64::from(f.line.unwrap_or(0)) }],
                    is_folded: false,
                });
                id
            });
            location_id.push(id);
        }
        let mut label = Vec::new();
        if s.leak_bytes > 0 {
            label.push(Label { key: leak_bytes_key, num: sat(s.leak_bytes), num_unit: bytes_unit, str: 0 });
            label.push(Label { key: leak_allocs_key, num: sat(s.leak_allocs), num_unit: 0, str: 0 });
        }
        samples.push(Sample {
            location_id,
            value: vec![sat(s.total_allocs), sat(s.total_bytes), sat(s.live_allocs), sat(s.live_bytes)],
            label,
        });
    }

    let mut comment = vec![
        strings.get(&format!("memscope heap profile of pid {}", p.pid)),
        strings.get(&format!("live allocations older than {:.1}s count as leaks", p.min_age_s)),
        strings.get(&format!("heap bytes allocated before attach (not seen): {}", p.unseen_before_attach_bytes)),
    ];
    let dropped: u64 = p.dropped.values().sum();
    if dropped > 0 {
        let reasons: Vec<String> = p.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        comment.push(strings.get(&format!("WARNING: dropped events: {}", reasons.join(", "))));
    }
    if p.target_exited {
        comment.push(strings.get("the target exited during the recording"));
    }
    if let Some(note) = p.source_note() {
        comment.push(strings.get(&format!("source: {note}")));
    }

    let period_type = ValueType { r#type: strings.get("space"), unit: strings.get("bytes") };
    let default_sample_type = strings.get("inuse_space");
    PprofProfile {
        sample_type,
        sample: samples,
        mapping,
        location: locations,
        function: functions,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos: sat(p.taken_at_ms.saturating_mul(1_000_000)),
        // `as` saturates and maps NaN to 0.
        duration_nanos: (p.duration_s * 1e9).round() as i64,
        period_type: Some(period_type),
        period: sat(p.sample_bytes),
        comment,
        default_sample_type,
        string_table: strings.table,
    }
}

/// What makes a location distinct: its address, or for a frame without one (JavaScript), the
/// function, file, line and column (else every JavaScript frame would be one location).
#[derive(PartialEq, Eq, Hash)]
enum LocationKey<'a> {
    Address(u64),
    Source { function: Option<&'a str>, file: Option<&'a str>, line: Option<u32>, column: Option<u32> },
}

impl<'a> LocationKey<'a> {
    fn of(f: &'a Frame) -> Self {
        if f.address != 0 {
            return LocationKey::Address(f.address);
        }
        LocationKey::Source { function: f.function.as_deref(), file: f.file.as_deref(), line: f.line, column: f.column }
    }
}

/// What makes a function distinct: its name and file, plus for a frame without an address
/// (JavaScript: V8 gives where the function starts) its line and column.
type FunctionKey<'a> = (String, Option<&'a str>, Option<(Option<u32>, Option<u32>)>);

fn function_id<'a>(f: &'a Frame, functions: &mut Vec<Function>, ids: &mut HashMap<FunctionKey<'a>, u64>, strings: &mut Strings) -> u64 {
    let name = f.display_name();
    let file = f.file.as_deref();
    let start = (f.address == 0).then_some((f.line, f.column));
    let key = (name, file, start);
    if let Some(&id) = ids.get(&key) {
        return id;
    }
    let id = functions.len() as u64 + 1;
    let name_ix = strings.get(&key.0);
    functions.push(Function {
        id,
        name: name_ix,
        system_name: name_ix,
        filename: file.map_or(0, |f| strings.get(f)),
        start_line: start.and_then(|(l, _)| l).map_or(0, i64::from),
    });
    ids.insert(key, id);
    id
}

/// The gzip-compressed protobuf of [`pprof_profile`], what `go tool pprof` reads.
pub fn pprof_gz(p: &HeapProfile) -> Result<Vec<u8>, RenderError> {
    let raw = pprof_profile(p).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 2 + 64), Compression::default());
    gz.write_all(&raw).map_err(RenderError::Compress)?;
    gz.finish().map_err(RenderError::Compress)
}

/// Reads back a gzip-compressed pprof profile (ours or anyone's).
pub fn decode_pprof_gz(bytes: &[u8]) -> Result<PprofProfile, RenderError> {
    let mut raw = Vec::new();
    GzDecoder::new(bytes).read_to_end(&mut raw).map_err(RenderError::Decompress)?;
    PprofProfile::decode(raw.as_slice()).map_err(RenderError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FrameInfo;
    use crate::aggregate::StackSample;

    #[test]
    fn round_trips_and_shares_locations() {
        let f = |name: &str, address: u64| -> Frame {
            FrameInfo { function: Some(name.into()), module: Some("/bin/x".into()), address, ..FrameInfo::default() }
                .into()
        };
        let p = HeapProfile {
            sample_bytes: 4096,
            stacks: vec![
                StackSample { frames: vec![f("a", 0x10), f("main", 0x20)], live_bytes: 5, ..StackSample::default() },
                StackSample { frames: vec![f("b", 0x30), f("main", 0x20)], total_bytes: 9, ..StackSample::default() },
                StackSample { frames: vec![f("zero", 0x40)], ..StackSample::default() },
            ],
            ..HeapProfile::default()
        };
        let back = decode_pprof_gz(&pprof_gz(&p).unwrap()).unwrap();
        assert_eq!(back, pprof_profile(&p));
        assert_eq!(back.sample.len(), 2, "the all-zero stack is left out");
        assert_eq!(back.location.len(), 3, "main's address is shared");
        assert_eq!(back.sample[0].location_id[1], back.sample[1].location_id[1]);
        assert_eq!(back.period, 4096);
        assert_eq!(back.mapping.len(), 1);
        assert_eq!((back.mapping[0].memory_start, back.mapping[0].memory_limit), (0x10, 0x31));
    }

    /// With the target's mappings, every row is one of them (start, limit, offset, file, build
    /// id) and each location points at the mapping that holds its address.
    #[test]
    fn real_mappings_with_build_ids() {
        let f = |address: u64| -> Frame { FrameInfo { module: Some("/bin/x".into()), address, ..FrameInfo::default() }.into() };
        let p = HeapProfile {
            stacks: vec![StackSample { frames: vec![f(0x1010), f(0x5020), f(0x9000)], live_bytes: 5, ..StackSample::default() }],
            mappings: vec![
                crate::aggregate::ModuleMapping { start: 0x1000, limit: 0x2000, file_offset: 0x1000, path: "/bin/x".into(), build_id: Some("abcd".into()) },
                crate::aggregate::ModuleMapping { start: 0x5000, limit: 0x6000, file_offset: 0, path: "/lib/libc.so.6".into(), build_id: None },
            ],
            ..HeapProfile::default()
        };
        let back = decode_pprof_gz(&pprof_gz(&p).unwrap()).unwrap();
        let s = |i: i64| back.string_table[i as usize].as_str();
        assert_eq!(back.mapping.len(), 2);
        let m = &back.mapping[0];
        assert_eq!((m.memory_start, m.memory_limit, m.file_offset, s(m.filename), s(m.build_id)), (0x1000, 0x2000, 0x1000, "/bin/x", "abcd"));
        assert_eq!(s(back.mapping[1].build_id), "");
        let ids: Vec<u64> = back.sample[0].location_id.iter().map(|l| back.location[*l as usize - 1].mapping_id).collect();
        assert_eq!(ids, vec![1, 2, 0], "the last address is in no mapping");
    }
}
