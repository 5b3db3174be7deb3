//! JavaScript names without flags: the frames of a Node.js (V8) target named from V8's own heap,
//! for a service started with no `--perf-basic-prof`.
//!
//! The probes keep, for each frame they walk by frame pointers in a V8 target, the
//! `SharedFunctionInfo` of the frame's JavaScript function (see `profiler_common::JsFrameConfig`
//! and `profiler-ebpf/src/stack.rs`). This module owns the rest:
//! - [`V8Layout`]: the object layout of the target's V8, read from the `v8dbg_*` symbols its
//!   executable exports (V8's postmortem metadata, what debuggers such as mdb_v8 and llnode
//!   read): class field offsets, instance types, string tags, frame slots. Nothing is
//!   hard-coded for one V8 version; a missing symbol refuses naming with that symbol's name.
//!   V8 builds with pointer compression (4-byte tagged slots) are refused (Node.js ships
//!   without it).
//! - [`JsNamer`]: reads a `SharedFunctionInfo` in the target's memory (`/proc/PID/mem`) to the
//!   function's name, script and line. Every byte is the target's and may be hostile: each
//!   object's type is checked through its map's instance type before it is read as that type,
//!   strings are capped ([`MAX_NAME`], [`MAX_PATH`]) and their nesting bounded, every read is
//!   bounded in size, and a batch of reads runs on one worker with a deadline
//!   ([`crate::target_mem::with_deadline`]).
//!
//! Objects move when V8 compacts its heap, and their memory is then reused: a pointer is
//! named soon after its stack was recorded (with the JIT frames, see
//! [`super::Symbolizer::pin_jit`]) and that name is kept for that stack; a pointer that no
//! longer points at a `SharedFunctionInfo` is left unnamed and counted ([`JsNameStats`]).
//!
//! Function names come from the `SharedFunctionInfo`'s `name_or_scope_info`: a string, or (for
//! compiled functions) a `ScopeInfo`, whose layout V8 does not describe in its metadata; the
//! name is the first string after the context locals, and the start position the first pair
//! of increasing Smis after it (the same reading the OpenTelemetry eBPF profiler makes of V8
//! up to 12.x). Lines come from the script's `line_ends` when V8 computed them.
//!
//! Limits: functions V8 inlined into an optimized caller have no frame of their own (their
//! allocations show under the caller); frames of code that keeps no frame pointer are not seen.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::Path,
    sync::Arc,
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use profiler_common::JsFrameConfig;
use serde::Serialize;

/// Longest function name kept (characters); longer names are cut.
pub const MAX_NAME: usize = 512;
/// Longest script name kept.
pub const MAX_PATH: usize = 4096;
/// Cons and sliced strings followed at most this deep.
const MAX_STRING_DEPTH: u32 = 8;
/// `ScopeInfo` slots looked at, at most.
const MAX_SCOPE_SLOTS: usize = 256;
/// `line_ends` entries read at most (a 2 MiB read).
const MAX_LINE_ENDS: usize = 256 * 1024;

/// Why a target's V8 frames cannot be named.
#[derive(Debug, thiserror::Error)]
pub enum V8Error {
    #[error("{path}: cannot read the file: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: not a readable ELF file: {source}")]
    Parse { path: String, source: object::Error },
    #[error("{path} exports no V8 metadata (v8dbg_* symbols): not a V8 executable")]
    NotV8 { path: String },
    #[error("{path}: V8 metadata symbol {symbol} missing: JavaScript frames stay unnamed")]
    MissingSymbol { path: String, symbol: String },
    #[error("{path}: unsupported V8 build: {reason}")]
    Unsupported { path: String, reason: String },
}

impl V8Error {
    /// A stable reason, for counters and status.
    pub fn reason(&self) -> &'static str {
        match self {
            V8Error::Io { .. } | V8Error::Parse { .. } => "unreadable_executable",
            V8Error::NotV8 { .. } => "not_v8",
            V8Error::MissingSymbol { .. } => "v8_metadata_missing",
            V8Error::Unsupported { .. } => "v8_build_unsupported",
        }
    }
}

/// The parts of V8's object layout memscope reads, from the target's `v8dbg_*` symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V8Layout {
    pub heap_object_tag: u64,
    pub heap_object_tag_mask: u64,
    pub smi_tag_mask: u64,
    pub smi_tag: u64,
    /// Right shift from a tagged Smi to its value (`SmiShiftSize + 1`).
    pub smi_shift: u32,
    pub fp_function: i64,
    pub fp_context: i64,
    pub map: u64,
    pub map_instance_type: u64,
    pub js_function_shared: u64,
    pub sfi_name_or_scope_info: u64,
    pub sfi_script_or_debug_info: u64,
    pub script_name: u64,
    pub script_line_ends: Option<u64>,
    pub string_length: u64,
    pub seq_one_byte_chars: u64,
    pub seq_two_byte_chars: u64,
    pub cons_first: u64,
    pub cons_second: u64,
    pub thin_actual: u64,
    pub sliced_parent: u64,
    pub sliced_offset: u64,
    pub fixed_array_length: u64,
    pub fixed_array_data: u64,
    pub first_nonstring_type: u16,
    pub string_representation_mask: u16,
    pub string_encoding_mask: u16,
    pub seq_string_tag: u16,
    pub cons_string_tag: u16,
    pub sliced_string_tag: u16,
    pub thin_string_tag: u16,
    pub one_byte_string_tag: u16,
    pub type_shared_function_info: u16,
    pub type_scope_info: u16,
    pub type_script: u16,
    pub type_fixed_array: u16,
    /// Where a `ScopeInfo`'s slots start (after the map, or after a FixedArray's header in
    /// V8 before 9.1), its context-local count slot and its first variable slot.
    pub scope_info_data: u64,
    pub scope_info_ncontextlocals: u64,
    pub scope_info_first_vars: u64,
}

impl V8Layout {
    /// The layout of the V8 in the ELF file `path` (the target's executable or libnode).
    pub fn from_file(file: &crate::target_fs::TargetFile) -> Result<V8Layout, V8Error> {
        let path = file.shown().to_string();
        let data = file.bytes().map_err(|source| V8Error::Io {
            path: path.clone(),
            source,
        })?;
        V8Layout::from_elf(&data, &path)
    }

    /// The layout from the bytes of an ELF file (`path` only names it in errors).
    pub fn from_elf(data: &[u8], path: &str) -> Result<V8Layout, V8Error> {
        let symbols = v8dbg_symbols(data, path)?;
        V8Layout::from_symbols(&symbols, path)
    }

    /// The layout from `v8dbg_*` symbol values (names without the prefix).
    pub fn from_symbols(s: &HashMap<String, i64>, path: &str) -> Result<V8Layout, V8Error> {
        if s.is_empty() {
            return Err(V8Error::NotV8 { path: path.into() });
        }
        let missing = |symbol: &str| V8Error::MissingSymbol {
            path: path.into(),
            symbol: format!("v8dbg_{symbol}"),
        };
        let get = |name: &str| s.get(name).copied().ok_or_else(|| missing(name));
        // A class field, whatever type suffix this V8 version gives it
        // (`name_or_scope_info__Object`, `..._Tagged_Object_`, ...).
        let field = |class_field: &str| -> Result<i64, V8Error> {
            let prefix = format!("class_{class_field}__");
            let mut found: Vec<(&String, i64)> = s
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k, *v))
                .collect();
            found.sort();
            found
                .first()
                .map(|(_, v)| *v)
                .ok_or_else(|| missing(&format!("class_{class_field}__*")))
        };
        let ty = |class_type: &str| -> Result<u16, V8Error> {
            let v = get(&format!("type_{class_type}"))?;
            u16::try_from(v).map_err(|_| V8Error::Unsupported {
                path: path.into(),
                reason: format!("instance type {class_type} = {v}"),
            })
        };
        let small = |name: &str| -> Result<u16, V8Error> {
            let v = get(name)?;
            Ok(v as u16)
        };
        let off = |v: i64| -> Result<u64, V8Error> {
            u64::try_from(v)
                .ok()
                .filter(|&v| v < 4096)
                .ok_or_else(|| V8Error::Unsupported {
                    path: path.into(),
                    reason: format!("field offset {v}"),
                })
        };
        let tagged = get("TaggedSize")?;
        if tagged != 8 || get("SystemPointerSize")? != 8 {
            return Err(V8Error::Unsupported {
                path: path.into(),
                reason: format!("tagged slots of {tagged} bytes (pointer compression): only 8-byte slots are read"),
            });
        }
        let fp_function = get("off_fp_function")?;
        let fp_context = get("off_fp_context")?;
        if fp_context != fp_function + 8 || !(-4096..=4096).contains(&fp_function) {
            return Err(V8Error::Unsupported {
                path: path.into(),
                reason: format!("frame slots function {fp_function}, context {fp_context}: the probes read the context right above the function"),
            });
        }
        let smi_shift = get("SmiShiftSize")? + get("SmiValueShift").unwrap_or(1).max(1);
        let scope_on_heap_object = s.contains_key("parent_ScopeInfo__HeapObject");
        let map = off(field("HeapObject__map")?)?;
        Ok(V8Layout {
            heap_object_tag: get("HeapObjectTag")? as u64,
            heap_object_tag_mask: get("HeapObjectTagMask")? as u64,
            smi_tag_mask: get("SmiTagMask")? as u64,
            smi_tag: get("SmiTag")? as u64,
            smi_shift: smi_shift.clamp(1, 63) as u32,
            fp_function,
            fp_context,
            map,
            map_instance_type: off(field("Map__instance_type")?)?,
            js_function_shared: off(field("JSFunction__shared")?)?,
            sfi_name_or_scope_info: off(field("SharedFunctionInfo__name_or_scope_info")?)?,
            sfi_script_or_debug_info: off(field("SharedFunctionInfo__script_or_debug_info")?)?,
            script_name: off(field("Script__name")?)?,
            script_line_ends: field("Script__line_ends").ok().and_then(|v| off(v).ok()),
            string_length: off(field("String__length")?)?,
            seq_one_byte_chars: off(field("SeqOneByteString__chars")?)?,
            seq_two_byte_chars: off(field("SeqTwoByteString__chars")?)?,
            cons_first: off(field("ConsString__first")?)?,
            cons_second: off(field("ConsString__second")?)?,
            thin_actual: off(field("ThinString__actual")?)?,
            sliced_parent: off(field("SlicedString__parent")?)?,
            sliced_offset: off(field("SlicedString__offset")?)?,
            fixed_array_length: off(field("FixedArrayBase__length")?)?,
            fixed_array_data: off(field("FixedArray__data")?)?,
            first_nonstring_type: small("FirstNonstringType")?,
            string_representation_mask: small("StringRepresentationMask")?,
            string_encoding_mask: small("StringEncodingMask")?,
            seq_string_tag: small("SeqStringTag")?,
            cons_string_tag: small("ConsStringTag")?,
            sliced_string_tag: small("SlicedStringTag")?,
            thin_string_tag: small("ThinStringTag")?,
            one_byte_string_tag: small("OneByteStringTag")?,
            type_shared_function_info: ty("SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE")?,
            type_scope_info: ty("ScopeInfo__SCOPE_INFO_TYPE")?,
            type_script: ty("Script__SCRIPT_TYPE")?,
            type_fixed_array: ty("FixedArray__FIXED_ARRAY_TYPE")?,
            scope_info_data: if scope_on_heap_object {
                map + 8
            } else {
                off(field("FixedArray__data")?)?
            },
            scope_info_ncontextlocals: off(get("scopeinfo_idx_ncontextlocals")?)?,
            scope_info_first_vars: off(get("scopeinfo_idx_first_vars")?)?,
        })
    }

    /// What the probes need to find a frame's function (see `profiler_common::JsFrameConfig`).
    pub fn frame_config(&self) -> JsFrameConfig {
        JsFrameConfig {
            enabled: 1,
            function_offset: self.fp_function as i32,
            shared_offset: self.js_function_shared.wrapping_sub(self.heap_object_tag),
            tag_mask: self.heap_object_tag_mask,
            tag: self.heap_object_tag,
        }
    }
}

/// Every `v8dbg_*` data symbol of an ELF file and its 4-byte value (0 in `.bss`).
fn v8dbg_symbols(data: &[u8], path: &str) -> Result<HashMap<String, i64>, V8Error> {
    let file = object::File::parse(data).map_err(|source| V8Error::Parse {
        path: path.into(),
        source,
    })?;
    let mut out = HashMap::new();
    // V8 exports its metadata (debuggers read it from running processes): `.dynsym` only, so
    // a large binary's full symbol table is not scanned at every attach.
    for sym in file.dynamic_symbols() {
        let Ok(name) = sym.name() else { continue };
        let Some(name) = name.strip_prefix("v8dbg_") else {
            continue;
        };
        if out.contains_key(name) || out.len() >= 8192 {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let Ok(section) = file.section_by_index(index) else {
            continue;
        };
        let Some(at) = sym.address().checked_sub(section.address()) else {
            continue;
        };
        // `.bss` (no bytes in the file) holds the zeros.
        let value = match section.data() {
            Ok([]) => 0,
            Ok(bytes) => match bytes.get(at as usize..at as usize + 4) {
                Some(b) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                None => continue,
            },
            Err(_) => continue,
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

/// The target's V8, if it has one: the layout from its executable, else from a mapped
/// `libnode`. `Ok(None)`: no V8 (no `v8dbg_*` symbol anywhere), nothing to name.
pub fn find_layout(pid: u32) -> Result<Option<V8Layout>, V8Error> {
    let objects = crate::procfs::objects(pid).unwrap_or_default();
    let mut refusal = None;
    for (i, o) in objects.iter().enumerate() {
        // The executable, and libraries that can hold V8 (libnode.so, libv8.so).
        let base = o.path.rsplit('/').next().unwrap_or(&o.path);
        if i > 0 && !(base.starts_with("libnode") || base.starts_with("libv8")) {
            continue;
        }
        match V8Layout::from_file(&o.host_path) {
            Ok(layout) => return Ok(Some(layout)),
            Err(V8Error::NotV8 { .. }) => {}
            Err(e) => refusal = Some(e),
        }
    }
    refusal.map_or(Ok(None), Err)
}

/// A named JavaScript function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsName {
    /// The function's name, `(anonymous)` when it has none.
    pub function: Arc<str>,
    pub script: Option<Arc<str>>,
    /// 1-based.
    pub line: Option<u32>,
}

/// Why a JavaScript frame stayed unnamed (stable names, for counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unnamed {
    /// The pointer no longer leads to a `SharedFunctionInfo` (the object moved, or the frame
    /// slot held something else).
    NotAFunction,
    /// The target's memory could not be read there.
    Unreadable,
    /// The name is a string kind memscope does not read (external strings).
    UnreadableName,
    /// The target's V8 could not be read at all (see the target's V8 status).
    NoLayout,
    /// The target did not answer in time (its memory blocked the read).
    TimedOut,
}

impl Unnamed {
    pub fn name(self) -> &'static str {
        match self {
            Unnamed::NotAFunction => "not_a_function",
            Unnamed::Unreadable => "unreadable",
            Unnamed::UnreadableName => "unreadable_name",
            Unnamed::NoLayout => "no_v8_layout",
            Unnamed::TimedOut => "timed_out",
        }
    }
}

/// JavaScript frames named and left unnamed, by reason, since attach (per stack frame pinned).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JsNameStats {
    pub named: u64,
    pub unnamed: BTreeMap<String, u64>,
    /// Why the target's V8 cannot be read, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_error: Option<String>,
}

impl JsNameStats {
    pub fn unnamed_total(&self) -> u64 {
        self.unnamed.values().sum()
    }
}

/// The memory reads [`JsNamer`] needs: the target's (`/proc/PID/mem`), or a test's.
pub trait Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl Memory for File {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, addr)
    }
}

/// Reads V8 objects of one target: `SharedFunctionInfo` -> name, script, line.
pub struct JsNamer<M> {
    layout: V8Layout,
    mem: M,
    /// Per script (by address, valid for one batch): name and line ends.
    scripts: HashMap<u64, (Option<Arc<str>>, Option<Vec<u32>>)>,
}

type Read<T> = Result<T, Unnamed>;

impl<M: Memory> JsNamer<M> {
    pub fn new(layout: V8Layout, mem: M) -> JsNamer<M> {
        JsNamer {
            layout,
            mem,
            scripts: HashMap::new(),
        }
    }

    /// Forgets what was read about scripts (objects move: a new batch reads them again).
    pub fn new_batch(&mut self) {
        self.scripts.clear();
    }

    fn word(&self, addr: u64) -> Read<u64> {
        let mut b = [0u8; 8];
        self.mem
            .read(addr, &mut b)
            .map_err(|_| Unnamed::Unreadable)?;
        Ok(u64::from_le_bytes(b))
    }

    fn is_heap_object(&self, tagged: u64) -> bool {
        tagged & self.layout.heap_object_tag_mask == self.layout.heap_object_tag && tagged > 4096
    }

    fn is_smi(&self, tagged: u64) -> bool {
        tagged & self.layout.smi_tag_mask == self.layout.smi_tag
    }

    fn smi(&self, tagged: u64) -> i64 {
        (tagged as i64) >> self.layout.smi_shift
    }

    /// The untagged address and instance type of a heap object.
    fn object(&self, tagged: u64) -> Read<(u64, u16)> {
        if !self.is_heap_object(tagged) {
            return Err(Unnamed::NotAFunction);
        }
        let addr = tagged - self.layout.heap_object_tag;
        let map = self.word(addr + self.layout.map)?;
        if !self.is_heap_object(map) {
            return Err(Unnamed::NotAFunction);
        }
        let mut t = [0u8; 2];
        self.mem
            .read(
                map - self.layout.heap_object_tag + self.layout.map_instance_type,
                &mut t,
            )
            .map_err(|_| Unnamed::Unreadable)?;
        Ok((addr, u16::from_le_bytes(t)))
    }

    /// Names the function whose `SharedFunctionInfo` is `sfi` (tagged, as the probes kept it).
    pub fn name(&mut self, sfi: u64) -> Read<JsName> {
        let l = self.layout.clone();
        let (addr, ty) = self.object(sfi)?;
        if ty != l.type_shared_function_info {
            return Err(Unnamed::NotAFunction);
        }
        let nos = self.word(addr + l.sfi_name_or_scope_info)?;
        let (mut function, mut start_pos) = (None, None);
        if self.is_heap_object(nos) {
            let (nos_addr, nos_ty) = self.object(nos)?;
            if nos_ty < l.first_nonstring_type {
                function = Some(self.string(nos, MAX_NAME)?);
            } else if nos_ty == l.type_scope_info {
                (function, start_pos) = self.scope_info(nos_addr);
            }
        }
        let function: Arc<str> = match function {
            Some(f) if !f.is_empty() => f.into(),
            _ => "(anonymous)".into(),
        };
        let (script, line) = match self.word(addr + l.sfi_script_or_debug_info) {
            Ok(s) if self.is_heap_object(s) => self.script(s, start_pos),
            _ => (None, None),
        };
        Ok(JsName {
            function,
            script,
            line,
        })
    }

    /// The function name and start position in a `ScopeInfo` (see the module doc).
    fn scope_info(&self, addr: u64) -> (Option<String>, Option<u32>) {
        let l = &self.layout;
        let data = addr + l.scope_info_data;
        let Ok(locals) = self.word(data + 8 * l.scope_info_ncontextlocals) else {
            return (None, None);
        };
        if !self.is_smi(locals) {
            return (None, None);
        }
        let locals = self.smi(locals);
        if !(0..=MAX_SCOPE_SLOTS as i64).contains(&locals) {
            return (None, None);
        }
        let first = l.scope_info_first_vars as usize + 2 * locals as usize;
        let end = (first + 16).min(MAX_SCOPE_SLOTS);
        if first >= end {
            return (None, None);
        }
        let mut raw = vec![0u8; (end - first) * 8];
        if self.mem.read(data + 8 * first as u64, &mut raw).is_err() {
            return (None, None);
        }
        let slots: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut name = None;
        let mut prev: Option<i64> = None;
        for &slot in &slots {
            if name.is_none() && self.is_heap_object(slot) {
                if let Ok((_, ty)) = self.object(slot) {
                    if ty < l.first_nonstring_type {
                        name = self.string(slot, MAX_NAME).ok().filter(|s| !s.is_empty());
                    }
                }
            }
            if self.is_smi(slot) {
                let v = self.smi(slot);
                if let Some(p) = prev {
                    if name.is_some() && 0 <= p && p < v {
                        return (name, u32::try_from(p).ok());
                    }
                }
                prev = Some(v);
            } else {
                prev = None;
            }
        }
        (name, None)
    }

    /// A script's name and the line of `start_pos` in it.
    fn script(&mut self, tagged: u64, start_pos: Option<u32>) -> (Option<Arc<str>>, Option<u32>) {
        let Ok((addr, ty)) = self.object(tagged) else {
            return (None, None);
        };
        if ty != self.layout.type_script {
            return (None, None);
        }
        if !self.scripts.contains_key(&addr) {
            let name = self
                .word(addr + self.layout.script_name)
                .ok()
                .filter(|&n| self.is_heap_object(n))
                .and_then(|n| self.string(n, MAX_PATH).ok())
                .filter(|n| !n.is_empty())
                .map(Arc::from);
            let ends = self.line_ends(addr);
            self.scripts.insert(addr, (name, ends));
        }
        let (name, ends) = &self.scripts[&addr];
        let line = match (start_pos, ends) {
            (Some(pos), Some(ends)) => Some(ends.partition_point(|&e| e < pos) as u32 + 1),
            _ => None,
        };
        (name.clone(), line)
    }

    /// The script's `line_ends` (a FixedArray of Smis), when V8 computed them.
    fn line_ends(&self, script: u64) -> Option<Vec<u32>> {
        let l = &self.layout;
        let tagged = self.word(script + l.script_line_ends?).ok()?;
        let (addr, ty) = self.object(tagged).ok()?;
        if ty != l.type_fixed_array {
            return None;
        }
        let len = self.word(addr + l.fixed_array_length).ok()?;
        if !self.is_smi(len) {
            return None;
        }
        let len = usize::try_from(self.smi(len))
            .ok()
            .filter(|&n| n <= MAX_LINE_ENDS)?;
        let mut raw = vec![0u8; len * 8];
        self.mem.read(addr + l.fixed_array_data, &mut raw).ok()?;
        let ends: Vec<u32> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .map(|v| {
                if self.is_smi(v) {
                    self.smi(v).clamp(0, u32::MAX as i64) as u32
                } else {
                    u32::MAX
                }
            })
            .collect();
        // Line ends only grow; anything else is not a line table.
        ends.windows(2).all(|w| w[0] <= w[1]).then_some(ends)
    }

    /// A V8 string, at most `cap` characters (cut there).
    pub fn string(&self, tagged: u64, cap: usize) -> Read<String> {
        let mut out = String::new();
        self.append_string(tagged, 0, usize::MAX, cap, &mut out, 0)?;
        Ok(out)
    }

    /// Appends characters `[from, from + len)` of string `tagged` to `out`, up to `cap` in all.
    fn append_string(
        &self,
        tagged: u64,
        from: usize,
        len: usize,
        cap: usize,
        out: &mut String,
        depth: u32,
    ) -> Read<()> {
        let l = &self.layout;
        if depth > MAX_STRING_DEPTH {
            return Err(Unnamed::UnreadableName);
        }
        let (addr, ty) = self.object(tagged)?;
        if ty >= l.first_nonstring_type {
            return Err(Unnamed::UnreadableName);
        }
        let mut b = [0u8; 4];
        self.mem
            .read(addr + l.string_length, &mut b)
            .map_err(|_| Unnamed::Unreadable)?;
        let length = i32::from_le_bytes(b);
        let length = usize::try_from(length).map_err(|_| Unnamed::UnreadableName)?;
        let from = from.min(length);
        let len = len.min(length - from);
        let room = cap.saturating_sub(out.chars().count());
        if room == 0 || len == 0 {
            return Ok(());
        }
        let representation = ty & l.string_representation_mask;
        if representation == l.seq_string_tag {
            let n = len.min(room);
            if ty & l.string_encoding_mask == l.one_byte_string_tag {
                let mut chars = vec![0u8; n];
                self.mem
                    .read(addr + l.seq_one_byte_chars + from as u64, &mut chars)
                    .map_err(|_| Unnamed::Unreadable)?;
                // Latin-1.
                out.extend(chars.iter().map(|&c| c as char));
            } else {
                let mut raw = vec![0u8; n * 2];
                self.mem
                    .read(addr + l.seq_two_byte_chars + 2 * from as u64, &mut raw)
                    .map_err(|_| Unnamed::Unreadable)?;
                let units: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                out.extend(
                    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)),
                );
            }
            Ok(())
        } else if representation == l.thin_string_tag {
            let actual = self.word(addr + l.thin_actual)?;
            self.append_string(actual, from, len, cap, out, depth + 1)
        } else if representation == l.cons_string_tag {
            let first = self.word(addr + l.cons_first)?;
            let second = self.word(addr + l.cons_second)?;
            let first_len = self.string_length(first)?;
            if from < first_len {
                self.append_string(first, from, len.min(first_len - from), cap, out, depth + 1)?;
            }
            let end = from + len;
            if end > first_len {
                let start = from.saturating_sub(first_len);
                self.append_string(second, start, end - first_len - start, cap, out, depth + 1)?;
            }
            Ok(())
        } else if representation == l.sliced_string_tag {
            let parent = self.word(addr + l.sliced_parent)?;
            let offset = self.word(addr + l.sliced_offset)?;
            if !self.is_smi(offset) {
                return Err(Unnamed::UnreadableName);
            }
            let offset = usize::try_from(self.smi(offset)).map_err(|_| Unnamed::UnreadableName)?;
            self.append_string(
                parent,
                offset.saturating_add(from),
                len,
                cap,
                out,
                depth + 1,
            )
        } else {
            // External strings: their characters are behind a C++ resource object.
            Err(Unnamed::UnreadableName)
        }
    }

    fn string_length(&self, tagged: u64) -> Read<usize> {
        let (addr, ty) = self.object(tagged)?;
        if ty >= self.layout.first_nonstring_type {
            return Err(Unnamed::UnreadableName);
        }
        let mut b = [0u8; 4];
        self.mem
            .read(addr + self.layout.string_length, &mut b)
            .map_err(|_| Unnamed::Unreadable)?;
        usize::try_from(i32::from_le_bytes(b)).map_err(|_| Unnamed::UnreadableName)
    }
}

/// Sets up `symbolizer` to name the JavaScript frames of `process` from the result of
/// [`find_layout`] (nothing for a target without V8; a refusal is kept and shown in its
/// profiles).
pub fn enable(
    symbolizer: &mut super::Symbolizer,
    process: &crate::process::Process,
    layout: Result<Option<V8Layout>, V8Error>,
) {
    match layout.map(|l| l.map(|l| open_namer(process, l))) {
        Ok(None) => {}
        Ok(Some(Ok(namer))) => symbolizer.enable_js(namer),
        Ok(Some(Err(e))) => symbolizer.js_unavailable(format!(
            "cannot read the memory of process {}: {e}",
            process.pid()
        )),
        Err(e) => {
            tracing::info!(
                pid = process.pid(),
                reason = e.reason(),
                "JavaScript frames stay unnamed: {e}"
            );
            symbolizer.js_unavailable(e.to_string());
        }
    }
}

/// A target's namer over its `/proc/PID/mem`, opened now: the file stays bound to this process's
/// memory (a reused pid cannot redirect it); checked against `process` after opening.
pub fn open_namer(
    process: &crate::process::Process,
    layout: V8Layout,
) -> io::Result<JsNamer<Arc<File>>> {
    let mem = File::open(
        Path::new("/proc")
            .join(process.pid().to_string())
            .join("mem"),
    )?;
    if !process.alive() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the process exited",
        ));
    }
    Ok(JsNamer::new(layout, Arc::new(mem)))
}

impl Memory for Arc<File> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A made-up V8 heap: addresses -> bytes.
    #[derive(Default)]
    struct Heap(RefCell<BTreeMap<u64, u8>>);

    impl Heap {
        fn put(&self, addr: u64, bytes: &[u8]) {
            let mut m = self.0.borrow_mut();
            for (i, b) in bytes.iter().enumerate() {
                m.insert(addr + i as u64, *b);
            }
        }
        fn word(&self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }
    }

    impl Memory for Heap {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let m = self.0.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *m
                    .get(&(addr + i as u64))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            }
            Ok(())
        }
    }

    /// The symbols of Node 20's V8 (11.3) that the layout reads.
    fn node20() -> HashMap<String, i64> {
        [
            ("HeapObjectTag", 1),
            ("HeapObjectTagMask", 3),
            ("SmiTagMask", 1),
            ("SmiTag", 0),
            ("SmiShiftSize", 31),
            ("SmiValueShift", 1),
            ("TaggedSize", 8),
            ("SystemPointerSize", 8),
            ("off_fp_function", -16),
            ("off_fp_context", -8),
            ("class_HeapObject__map__Map", 0),
            ("class_Map__instance_type__uint16_t", 12),
            ("class_JSFunction__shared__SharedFunctionInfo", 24),
            ("class_SharedFunctionInfo__name_or_scope_info__Object", 16),
            (
                "class_SharedFunctionInfo__script_or_debug_info__HeapObject",
                32,
            ),
            ("class_Script__name__Object", 16),
            ("class_Script__line_ends__Object", 56),
            ("class_String__length__int32_t", 12),
            ("class_SeqOneByteString__chars__char", 16),
            ("class_SeqTwoByteString__chars__char", 16),
            ("class_ConsString__first__String", 16),
            ("class_ConsString__second__String", 24),
            ("class_ThinString__actual__String", 16),
            ("class_SlicedString__parent__String", 16),
            ("class_SlicedString__offset__SMI", 24),
            ("class_FixedArrayBase__length__SMI", 8),
            ("class_FixedArray__data__uintptr_t", 16),
            ("FirstNonstringType", 128),
            ("StringRepresentationMask", 7),
            ("StringEncodingMask", 8),
            ("SeqStringTag", 0),
            ("ConsStringTag", 1),
            ("SlicedStringTag", 3),
            ("ThinStringTag", 5),
            ("OneByteStringTag", 8),
            ("type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE", 262),
            ("type_ScopeInfo__SCOPE_INFO_TYPE", 261),
            ("type_Script__SCRIPT_TYPE", 167),
            ("type_FixedArray__FIXED_ARRAY_TYPE", 175),
            ("parent_ScopeInfo__HeapObject", 0),
            ("scopeinfo_idx_ncontextlocals", 2),
            ("scopeinfo_idx_first_vars", 3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    const SMI: u32 = 32;

    /// Objects of the made-up heap: each map is a 16-byte object whose instance type is at 12.
    struct Builder {
        heap: Heap,
        next: u64,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                heap: Heap::default(),
                next: 0x10_0000,
            }
        }
        fn alloc(&mut self, size: u64) -> u64 {
            let a = self.next;
            self.next += (size + 15) & !15;
            a
        }
        /// A new object of `ty` and `size` bytes; returns its tagged pointer.
        fn object(&mut self, ty: u16, size: u64) -> u64 {
            let map = self.alloc(16);
            self.heap.put(map + 12, &ty.to_le_bytes());
            let addr = self.alloc(size.max(16));
            self.heap.word(addr, map + 1);
            addr + 1
        }
        fn set(&mut self, tagged: u64, offset: u64, v: u64) {
            self.heap.word(tagged - 1 + offset, v);
        }
        fn one_byte(&mut self, s: &str) -> u64 {
            let o = self.object(8, 16 + s.len() as u64);
            self.heap.put(o - 1 + 12, &(s.len() as i32).to_le_bytes());
            self.heap.put(o - 1 + 16, s.as_bytes());
            o
        }
        fn smi(v: i64) -> u64 {
            (v as u64) << SMI
        }
    }

    /// A SharedFunctionInfo with a ScopeInfo (two context locals) names the function, its
    /// script and its line (from the script's line ends); one with a plain string name too.
    #[test]
    fn names_functions_through_scope_info_and_strings() {
        let layout = V8Layout::from_symbols(&node20(), "node").unwrap();
        let cfg = layout.frame_config();
        assert_eq!(
            (
                cfg.function_offset,
                cfg.shared_offset,
                cfg.tag_mask,
                cfg.tag
            ),
            (-16, 23, 3, 1)
        );
        let mut b = Builder::new();
        let name = b.one_byte("leftLeak");
        let file = b.one_byte("/srv/app.js");
        let ends = b.object(175, 16 + 3 * 8);
        b.set(ends, 8, Builder::smi(3));
        for (i, e) in [10i64, 50, 90].iter().enumerate() {
            b.set(ends, 16 + 8 * i as u64, Builder::smi(*e));
        }
        let script = b.object(167, 64);
        b.set(script, 16, file);
        b.set(script, 56, ends);
        // ScopeInfo: flags, params, 2 context locals, 2 names, 2 infos, then the name and positions.
        // 24 slots: the rest Smi 0 (the namer reads 16 slots past the context locals).
        let scope = b.object(261, 8 + 24 * 8);
        for i in 0..24u64 {
            b.set(scope, 8 + 8 * i, Builder::smi(0));
        }
        let slots = [
            Builder::smi(0),
            Builder::smi(1),
            Builder::smi(2),
            file,
            file,
            Builder::smi(0),
            Builder::smi(0),
            name,
            Builder::smi(60),
            Builder::smi(80),
        ];
        for (i, s) in slots.iter().enumerate() {
            b.set(scope, 8 + 8 * i as u64, *s);
        }
        let sfi = b.object(262, 56);
        b.set(sfi, 16, scope);
        b.set(sfi, 32, script);
        let mut namer = JsNamer::new(layout.clone(), b.heap);
        let n = namer.name(sfi).unwrap();
        assert_eq!(
            (&*n.function, n.script.as_deref(), n.line),
            ("leftLeak", Some("/srv/app.js"), Some(3))
        );

        let mut b = Builder::new();
        let name = b.one_byte("rightLeak");
        let sfi = b.object(262, 56);
        b.set(sfi, 16, name);
        let mut namer = JsNamer::new(layout, b.heap);
        let n = namer.name(sfi).unwrap();
        assert_eq!((&*n.function, n.script, n.line), ("rightLeak", None, None));
    }

    /// Hostile heaps: a pointer to something else, a cons string that points at itself, a
    /// huge length, an unreadable address; each ends in an error or a capped name, quickly.
    #[test]
    fn hostile_objects_are_refused() {
        let layout = V8Layout::from_symbols(&node20(), "node").unwrap();
        let mut b = Builder::new();
        let not_sfi = b.object(175, 32);
        let cons = b.object(1, 32);
        b.heap.put(cons - 1 + 12, &(1_000_000_000i32).to_le_bytes());
        b.set(cons, 16, cons);
        b.set(cons, 24, cons);
        let sfi = b.object(262, 56);
        b.set(sfi, 16, cons);
        let huge = b.object(8, 32);
        b.heap.put(huge - 1 + 12, &i32::MAX.to_le_bytes());
        let mut namer = JsNamer::new(layout, b.heap);
        assert_eq!(namer.name(not_sfi).unwrap_err(), Unnamed::NotAFunction);
        assert_eq!(namer.name(0x4241).unwrap_err(), Unnamed::Unreadable);
        assert_eq!(namer.name(8).unwrap_err(), Unnamed::NotAFunction);
        assert_eq!(namer.name(sfi).unwrap_err(), Unnamed::UnreadableName);
        // Past the heap's bytes: unreadable, not a huge allocation.
        assert_eq!(
            namer.string(huge, MAX_NAME).unwrap_err(),
            Unnamed::Unreadable
        );
    }

    /// Missing metadata and pointer compression are refused with the symbol or the reason.
    #[test]
    fn layouts_refuse_cleanly() {
        let mut s = node20();
        s.remove("class_JSFunction__shared__SharedFunctionInfo");
        let e = V8Layout::from_symbols(&s, "node").unwrap_err();
        assert!(
            e.to_string().contains("v8dbg_class_JSFunction__shared__*"),
            "{e}"
        );
        let mut s = node20();
        s.insert("TaggedSize".into(), 4);
        assert_eq!(
            V8Layout::from_symbols(&s, "node").unwrap_err().reason(),
            "v8_build_unsupported"
        );
        assert_eq!(
            V8Layout::from_symbols(&HashMap::new(), "x")
                .unwrap_err()
                .reason(),
            "not_v8"
        );
    }

    /// The node on this machine: its layout is read from its own symbols.
    #[test]
    fn reads_the_installed_node() {
        let Ok(data) = std::fs::read("/usr/bin/node") else {
            return;
        };
        let layout = V8Layout::from_elf(&data, "/usr/bin/node").unwrap();
        assert_eq!(layout.frame_config().tag, 1);
        assert_eq!(layout.js_function_shared, 24);
    }
}
