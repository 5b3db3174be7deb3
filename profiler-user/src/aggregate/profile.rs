//! The heap profile: pure data produced by a snapshot and consumed by every renderer, the
//! snapshot store and the HTTP API. Nothing here touches the kernel.
use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

/// One frame of an allocation stack, after symbolization. Shared: the frames of 50k stacks
/// are a few thousand distinct addresses, so a stack holds pointers, not copies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Frame(Arc<FrameInfo>);

impl std::ops::Deref for Frame {
    type Target = FrameInfo;
    fn deref(&self) -> &FrameInfo {
        &self.0
    }
}

/// Changing a shared frame copies it first.
impl std::ops::DerefMut for Frame {
    fn deref_mut(&mut self) -> &mut FrameInfo {
        Arc::make_mut(&mut self.0)
    }
}

impl From<FrameInfo> for Frame {
    fn from(info: FrameInfo) -> Frame {
        Frame(Arc::new(info))
    }
}

/// What is known about one address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameInfo {
    /// Demangled function name, when known. Names are shared (`Arc`): a million frames name a
    /// few thousand functions.
    pub function: Option<Arc<str>>,
    /// Source file, when debug info exists.
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    /// Column (1-based), known for JavaScript frames only: with the function, file and line it
    /// tells apart two functions defined on one line (pprof keeps them as two functions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// Path of the object file (executable or library) holding the address.
    pub module: Option<Arc<str>>,
    /// Virtual address in the target, as `0x...` (JSON numbers lose precision past 2^53).
    #[serde(with = "hex_u64")]
    pub address: u64,
    /// Offset of the address in `module`'s file, for frames that could not be named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_offset: Option<u64>,
    /// This frame is a function inlined at the same address into the frame after it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// The functions inlined at this address, innermost first (each `inlined`), as the
    /// symbolizer found them; [`HeapProfile::expand_inlined`] makes them frames of their own.
    #[serde(skip)]
    pub inlined_frames: Vec<Frame>,
}

impl FrameInfo {
    /// The name shown in flamegraphs and reports: the function, else `module+0xoffset`,
    /// else the raw address.
    pub fn display_name(&self) -> String {
        if let Some(f) = &self.function {
            return f.to_string();
        }
        match (&self.module, self.module_offset) {
            (Some(m), Some(off)) => {
                let base = m.rsplit('/').next().unwrap_or(m);
                format!("{base}+{off:#x}")
            }
            _ => format!("{:#x}", self.address),
        }
    }

    /// `file:line` when known.
    pub fn location(&self) -> Option<String> {
        match (&self.file, self.line) {
            (Some(f), Some(l)) => Some(format!("{f}:{l}")),
            (Some(f), None) => Some(f.to_string()),
            _ => None,
        }
    }
}

/// Everything known about one allocation stack at snapshot time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StackSample {
    /// Innermost (the allocator's caller) first.
    pub frames: Vec<Frame>,
    /// Still allocated at snapshot time.
    pub live_bytes: u64,
    pub live_allocs: u64,
    /// Allocated since attach, freed or not.
    pub total_bytes: u64,
    pub total_allocs: u64,
    /// Live and older than the snapshot's `min_age_s`.
    pub leak_bytes: u64,
    pub leak_allocs: u64,
    /// Age of the oldest live allocation of this stack, in seconds (0 when none is live).
    pub oldest_age_s: f64,
}

/// Counts for the whole process since attach.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub allocated_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
}

/// A heap snapshot of one process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeapProfile {
    pub pid: u32,
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub taken_at_ms: u64,
    /// Seconds between attach and this snapshot.
    pub duration_s: f64,
    /// Live allocations younger than this are not counted as leaks.
    pub min_age_s: f64,
    /// Mean bytes between samples; 0 means every allocation was recorded. Values in `stacks`
    /// and `totals` are already scaled up to estimates when sampling.
    pub sample_bytes: u64,
    pub totals: Totals,
    /// Events that could not be recorded, by reason. Always lists every reason.
    pub dropped: BTreeMap<String, u64>,
    /// How the stack walks of recorded allocations ended early, by reason, and frames found by
    /// frame pointers (see `profiler_common::Counter::UNWIND`). Always lists every reason.
    #[serde(default)]
    pub unwind: BTreeMap<String, u64>,
    /// The target's unwind tables (files, rows, kernel memory) and attach time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwind_tables: Option<crate::unwind::UnwindStats>,
    /// Heap bytes of the process that memscope never saw allocated (allocated before attach).
    pub unseen_before_attach_bytes: u64,
    /// Frees of addresses never seen allocated (allocated before attach, or not sampled).
    pub untracked_frees: u64,
    /// Set when the process exited during the recording.
    #[serde(default)]
    pub target_exited: bool,
    pub stacks: Vec<StackSample>,
    /// The target's executable file mappings when the snapshot was taken (pprof `Mapping`
    /// rows, for backends that symbolize by build id); empty when unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<ModuleMapping>,
    /// Windows during which the allocator probes were out of the process (V8 heap walks, see
    /// [`crate::pause`]): allocations and frees in them were not seen, so an allocation freed
    /// in a gap may still be listed as live. `None` when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_gaps: Option<crate::pause::ProbeGaps>,
    /// Where the figures come from when not from the allocator's functions: `usdt:ddheap` or
    /// `usdt:otel_memory` (the service sampled its own allocations and the figures are its
    /// weights, see [`crate::bpf::contract`]). `None`: the allocator probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// With a USDT source: whether the producer reports the frees of its samples. `false` (an
    /// alloc-only build): live bytes and leaks are unavailable, only allocation figures hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_tracking: Option<bool>,
    /// What share of the process's anonymous memory this profile accounts for, and why it is
    /// low when it is ([`crate::coverage`]); `None` when unknown (a profile built offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<crate::coverage::Coverage>,
    /// How a Go program's own heap is seen (`bpf::go_runtime`): "Go runtime heap (go1.19.8):
    /// traced through the runtime's sampling (MemProfileRate 524288)", or why it is not.
    /// `None` for a program that is not Go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_heap: Option<String>,
    /// In a V8 (Node.js) target: JavaScript frames named from V8's heap and those that could
    /// not be (by reason), since attach. `None` for other targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub js_names: Option<crate::symbolize::v8::JsNameStats>,
}

impl HeapProfile {
    /// What an output says about where its figures come from, when not the allocator probes:
    /// `usdt:ddheap (the service's own samples, mean interval 512 KiB; live tracking
    /// unavailable: alloc-only build)`.
    pub fn source_note(&self) -> Option<String> {
        let source = self.source.as_deref()?;
        let interval = if self.sample_bytes > 0 {
            format!("mean interval {}", crate::render::human_bytes(self.sample_bytes))
        } else {
            "interval unknown".to_string()
        };
        let live = if self.live_tracking == Some(false) {
            "; live tracking unavailable: the producer reports no frees (alloc-only build)"
        } else {
            ""
        };
        Some(format!("{source} (the service's own samples, {interval}{live})"))
    }
}

/// One executable mapping of a file in the target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleMapping {
    pub start: u64,
    /// One past the last address.
    pub limit: u64,
    /// File offset of `start`.
    pub file_offset: u64,
    /// Path as the target sees it.
    pub path: String,
    /// GNU build id (hex), when the file has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

/// Which quantity a flamegraph, folded file or diff shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Live bytes.
    #[default]
    Inuse,
    /// Bytes allocated since attach.
    Alloc,
    /// Live bytes older than `min_age_s`.
    Leaks,
}

impl Measure {
    pub fn of(self, s: &StackSample) -> u64 {
        match self {
            Measure::Inuse => s.live_bytes,
            Measure::Alloc => s.total_bytes,
            Measure::Leaks => s.leak_bytes,
        }
    }

    pub fn parse(s: &str) -> Option<Measure> {
        match s {
            "inuse" => Some(Measure::Inuse),
            "alloc" => Some(Measure::Alloc),
            "leaks" => Some(Measure::Leaks),
            _ => None,
        }
    }
}

impl HeapProfile {
    /// Every frame's inlined functions become frames of their own, innermost first, in front
    /// of the frame they were inlined into (as `gdb bt` and heaptrack show them).
    pub fn expand_inlined(&mut self) {
        for s in &mut self.stacks {
            if s.frames.iter().all(|f| f.inlined_frames.is_empty()) {
                continue;
            }
            let mut frames = Vec::with_capacity(s.frames.len() * 2);
            for f in s.frames.drain(..) {
                frames.extend(f.inlined_frames.iter().cloned());
                if f.inlined_frames.is_empty() {
                    frames.push(f);
                } else {
                    let mut outer = f;
                    outer.inlined_frames = Vec::new();
                    frames.push(outer);
                }
            }
            s.frames = frames;
        }
    }

    /// Stacks with leaked bytes, largest first (ties broken by frames, so output is stable).
    pub fn leaks(&self) -> Vec<&StackSample> {
        let mut v: Vec<&StackSample> = self.stacks.iter().filter(|s| s.leak_bytes > 0).collect();
        v.sort_by_cached_key(|s| (std::cmp::Reverse((s.leak_bytes, s.leak_allocs)), frames_key(s)));
        v
    }

    pub fn leaked_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.leak_bytes).sum()
    }
}

fn frames_key(s: &StackSample) -> Vec<String> {
    s.frames.iter().map(|f| f.display_name()).collect()
}

mod hex_u64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0x").ok_or_else(|| D::Error::custom("expected 0x..."))?;
        u64::from_str_radix(digits, 16).map_err(D::Error::custom)
    }
}
