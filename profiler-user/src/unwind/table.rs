//! Compiles one file's CFI into the rows the probes search (`profiler_common::UnwindRow`).
//!
//! The sources are the file's `.eh_frame` (almost every binary and library has it, C++ and Rust
//! need it for exceptions and panics) and its `.debug_frame`, or, when the file was stripped of
//! that, the `.debug_frame` of its separate debug file (`/usr/lib/debug/.build-id/xx/yyyy.debug`
//! in the target's root); a compressed `.debug_frame` (zlib, as every Go binary has) is
//! expanded under a size cap, and one that cannot be read is skipped, never hiding the
//! `.eh_frame` rows. gimli
//! evaluates every FDE's instructions into rows; each row becomes 8 bytes: where the CFA is (rsp
//! or rbp plus an offset, the PLT expression, `*(rbp + k)`), where the caller's rbp is, or a
//! marker (outermost frame, signal trampoline, no information, unsupported rule). Gaps between
//! FDEs get a "no information" row, so a lookup never borrows a neighbour's rule.
//! libc (2 MiB of code) gives ~50k rows in ~20 ms (see docs/performance.md).
use std::path::{Path, PathBuf};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Reader as _, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use profiler_common::{rbp, row, UnwindRow, MAX_ROWS_PER_FILE};

use crate::target_fs::{self, FileBytes, Kind, TargetFile, TargetFsError};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Open(#[from] TargetFsError),
    #[error("{path} is not an ELF file memscope can read: {source}")]
    Parse { path: PathBuf, source: object::Error },
    #[error("{path}: bad CFI: {source}")]
    Cfi { path: PathBuf, source: gimli::Error },
}

/// Where a table's rows came from (the last source that added rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CfiSource {
    EhFrame,
    /// The file's `.debug_frame` (with its `.eh_frame`, if any).
    DebugFrame,
    /// The `.debug_frame` of its separate debug file.
    DebugFile,
    /// No CFI anywhere: the file's frames are unwound by frame pointers.
    None,
}

/// A loadable segment: file range -> virtual address, to place a mapping's rows.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub file_offset: u64,
    pub file_size: u64,
    pub vaddr: u64,
    pub executable: bool,
}

/// One file's unwind table.
#[derive(Debug)]
pub struct Table {
    pub rows: Vec<UnwindRow>,
    pub source: CfiSource,
    pub segments: Vec<Segment>,
    /// Rows whose rule the probes cannot evaluate (their frames end the stack).
    pub unsupported_rows: usize,
    /// The file's GNU build id, hex.
    pub build_id: Option<String>,
}

impl Table {
    /// Bytes this table keeps in the agent's memory (its rows, segments and build id, as
    /// allocated): what a target is charged for it ([`crate::budget::Use::Unwind`]).
    pub fn memory_bytes(&self) -> u64 {
        (size_of::<Table>()
            + self.rows.capacity() * size_of::<UnwindRow>()
            + self.segments.capacity() * size_of::<Segment>()
            + self.build_id.as_ref().map_or(0, String::capacity)) as u64
    }

    /// `start - vaddr` for an executable mapping of this file at `start` from file offset
    /// `offset`. The kernel maps from the page holding the segment's first byte, so `offset`
    /// may lie below the segment's own offset (and inside the previous segment's range).
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let page = |x: u64| x & !0xfff;
        let seg = self
            .segments
            .iter()
            .find(|s| s.executable && offset >= page(s.file_offset) && offset < s.file_offset + s.file_size.max(1))?;
        Some(start.wrapping_sub((seg.vaddr.wrapping_sub(seg.file_offset)).wrapping_add(offset)))
    }

    /// Bytes the rows take in the probes' map.
    pub fn bytes(&self) -> usize {
        self.rows.len() * std::mem::size_of::<UnwindRow>()
    }
}

/// Finds a file's separate debug file by its build id (hex), opened inside the target's root.
pub type DebugFileFinder<'a> = &'a dyn Fn(&str) -> Option<TargetFile>;

/// Builds the table of the ELF file at `path` (a host path). `debug_file` finds a separate debug
/// file by build id when the file itself has no `.debug_frame` (None: don't look).
pub fn compile(path: &Path, debug_file: Option<DebugFileFinder<'_>>) -> Result<Table, TableError> {
    let data = read_file(path, Kind::Elf)?;
    let file = object::File::parse(&*data).map_err(|source| TableError::Parse { path: path.into(), source })?;
    let segments = file
        .segments()
        .map(|s| {
            let (file_offset, file_size) = s.file_range();
            let executable = matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
            Segment { file_offset, file_size, vaddr: s.address(), executable }
        })
        .collect();
    let build_id = file.build_id().ok().flatten().map(hex);
    let cfi_err = |source| TableError::Cfi { path: path.into(), source };
    // Both sections when both exist: code built with -fno-asynchronous-unwind-tables -g has
    // its CFI in .debug_frame while the crt objects linked with it keep theirs in .eh_frame.
    let mut entries = Vec::new();
    if let Some(eh) = file.section_by_name(".eh_frame") {
        let mut bases = BaseAddresses::default().set_eh_frame(eh.address());
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        rows_of(&EhFrame::new(eh.data().unwrap_or_default(), LittleEndian), &bases, &mut entries).map_err(cfi_err)?;
    }
    let mut source = if entries.is_empty() { CfiSource::None } else { CfiSource::EhFrame };
    let before = entries.len();
    // A `.debug_frame` that cannot be read (compressed in a format we do not expand, larger
    // than the cap, bad CFI) costs its own rows only, never the `.eh_frame` ones.
    let debug_frame = |section: Option<object::Section<'_, '_>>, what: &Path, entries: &mut Vec<_>| {
        let Some(section) = section else { return };
        let Some(data) = section_data(&section, what) else { return };
        let keep = entries.len();
        if let Err(e) = rows_of(&DebugFrame::new(&data, LittleEndian), &BaseAddresses::default(), entries) {
            tracing::debug!("{}: .debug_frame not used: {e}", what.display());
            entries.truncate(keep);
        }
    };
    match file.section_by_name(".debug_frame") {
        Some(df) => debug_frame(Some(df), path, &mut entries),
        // Stripped of its debug sections: its debug file (found by build id) may have them.
        None => {
            if let Some(debug) = build_id.as_deref().and_then(|id| debug_file.and_then(|find| find(id))) {
                let data = read_file(&debug, Kind::DebugFile)?;
                let dfile =
                    object::File::parse(&*data).map_err(|source| TableError::Parse { path: debug.to_path_buf(), source })?;
                debug_frame(dfile.section_by_name(".debug_frame"), &debug, &mut entries);
                if entries.len() > before {
                    source = CfiSource::DebugFile;
                }
            }
        }
    }
    if entries.len() > before && source != CfiSource::DebugFile {
        source = CfiSource::DebugFrame;
    }
    let rows = flatten(entries);
    let unsupported_rows = rows.iter().filter(|r| r.kind == row::UNSUPPORTED).count();
    Ok(Table { rows, source, segments, unsupported_rows, build_id })
}

/// The most a compressed `.debug_frame` may expand to (libc's is ~200 KiB, a large Go or
/// Rust binary's a few MiB); a bigger one is skipped, the file's `.eh_frame` still used.
pub const MAX_DEBUG_FRAME_BYTES: u64 = 64 << 20;

/// A section's contents, expanded when compressed (`SHF_COMPRESSED` or the older `.zdebug_`
/// form, zlib, as Go and `-Wl,--compress-debug-sections=zlib` write them) within
/// [`MAX_DEBUG_FRAME_BYTES`]; None (logged) when that cannot be done.
fn section_data<'d>(section: &object::Section<'d, '_>, what: &Path) -> Option<std::borrow::Cow<'d, [u8]>> {
    use std::io::Read as _;
    let skip = |why: String| {
        tracing::debug!("{}: {} not used: {why}", what.display(), section.name().unwrap_or("?"));
        None
    };
    let c = match section.compressed_data() {
        Ok(c) => c,
        Err(e) => return skip(e.to_string()),
    };
    match c.format {
        object::CompressionFormat::None => Some(std::borrow::Cow::Borrowed(c.data)),
        object::CompressionFormat::Zlib if c.uncompressed_size <= MAX_DEBUG_FRAME_BYTES => {
            let mut out = Vec::with_capacity(c.uncompressed_size as usize);
            // take(): a lying header cannot make it expand past what it declared.
            match flate2::read::ZlibDecoder::new(c.data).take(c.uncompressed_size).read_to_end(&mut out) {
                Ok(_) if out.len() as u64 == c.uncompressed_size => Some(std::borrow::Cow::Owned(out)),
                Ok(n) => skip(format!("expands to {n} bytes, its header says {}", c.uncompressed_size)),
                Err(e) => skip(format!("zlib: {e}")),
            }
        }
        object::CompressionFormat::Zlib => {
            skip(format!("expands to {} bytes, more than the cap of {MAX_DEBUG_FRAME_BYTES}", c.uncompressed_size))
        }
        other => skip(format!("compressed as {other:?}, which memscope does not expand")),
    }
}

/// A regular file within `kind`'s size cap (see [`crate::target_fs`]), read into memory or,
/// when large, mapped.
fn read_file(path: &Path, kind: Kind) -> Result<FileBytes, TableError> {
    let file = target_fs::open_checked(path, kind)?;
    file.bytes().map_err(|source| TableError::Read { path: path.into(), source })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(start, end, row)` of every row of every FDE in `section`.
fn rows_of<'a, S>(section: &S, bases: &BaseAddresses, out: &mut Vec<(u64, u64, UnwindRow)>) -> gimli::Result<()>
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else { continue };
        // One bad FDE costs its own rows only.
        let Ok(fde) = partial.parse(S::cie_from_offset) else { continue };
        let signal = fde.is_signal_trampoline();
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else { continue };
        while let Ok(Some(r)) = table.next_row() {
            let compiled = if signal { signal_row() } else { compile_row(section, r) };
            out.push((r.start_address(), r.end_address(), compiled));
        }
    }
    Ok(())
}

fn signal_row() -> UnwindRow {
    UnwindRow { pc: 0, cfa_offset: 0, kind: row::SIGNAL, rbp: rbp::SAME }
}

fn compile_row<'a, S>(section: &S, r: &gimli::UnwindTableRow<usize>) -> UnwindRow
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let unsupported = UnwindRow { pc: 0, cfa_offset: 0, kind: row::UNSUPPORTED, rbp: rbp::UNKNOWN };
    match r.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return UnwindRow { kind: row::END, ..unsupported },
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(_) => return unsupported,
    }
    let (kind, cfa_offset) = match r.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = u16::try_from(*offset) else { return unsupported };
            match *register {
                X86_64::RSP => (row::RSP, offset),
                X86_64::RBP => (row::RBP, offset),
                _ => return unsupported,
            }
        }
        CfaRule::Expression(e) => {
            let Ok(expr) = e.get(section) else { return unsupported };
            match cfa_expression(expr.0.slice()) {
                Some(compiled) => compiled,
                None => return unsupported,
            }
        }
    };
    let rbp = match r.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => rbp::SAME,
        Some(RegisterRule::Offset(n)) if n % 8 == 0 && (-127 * 8..=126 * 8).contains(&n) && n != 0 => (n / 8) as i8,
        Some(RegisterRule::Expression(e)) if e.get(section).is_ok_and(|x| x.0.slice() == [0x76, 0x00]) => rbp::AT_RBP,
        Some(_) => rbp::UNKNOWN,
    };
    UnwindRow { pc: 0, cfa_offset, kind, rbp }
}

/// The CFA expressions compilers and linkers emit for x86-64 that the probes evaluate.
fn cfa_expression(bytes: &[u8]) -> Option<(u8, u16)> {
    const DW_OP_BREG6: u8 = 0x76;
    const DW_OP_DEREF: u8 = 0x06;
    const DW_OP_LIT0: u8 = 0x30;
    // PLT stubs: rsp + 8 + (((rip & 15) >= N) << 3).
    if let [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, lit, 0x2a, 0x33, 0x24, 0x22] = *bytes {
        if (DW_OP_LIT0..DW_OP_LIT0 + 16).contains(&lit) {
            return Some((row::PLT, u16::from(lit - DW_OP_LIT0)));
        }
    }
    // Stack realignment (gcc's main with `and $-16, %rsp`): CFA = *(rbp + k).
    if bytes.first() == Some(&DW_OP_BREG6) && bytes.last() == Some(&DW_OP_DEREF) {
        let mut r = EndianSlice::new(&bytes[1..bytes.len() - 1], LittleEndian);
        let k = r.read_sleb128().ok()?;
        if r.is_empty() {
            return Some((row::DEREF_RBP, i16::try_from(k).ok()? as u16));
        }
    }
    None
}

/// Sorted rows with "no information" rows in the gaps, identical neighbours merged. Rows past
/// 4 GiB of virtual address (u32 pc) or past `MAX_ROWS_PER_FILE` are dropped.
fn flatten(mut entries: Vec<(u64, u64, UnwindRow)>) -> Vec<UnwindRow> {
    entries.retain(|(start, end, _)| start < end && *end <= u64::from(u32::MAX));
    entries.sort_by_key(|(start, _, _)| *start);
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(entries.len() + entries.len() / 4);
    let mut covered_to = 0u64;
    let push = |rows: &mut Vec<UnwindRow>, pc: u64, r: UnwindRow| {
        let r = UnwindRow { pc: pc as u32, ..r };
        match rows.last_mut() {
            Some(last) if last.pc == r.pc => *last = r,
            Some(last) if (last.kind, last.cfa_offset, last.rbp) == (r.kind, r.cfa_offset, r.rbp) => {}
            _ => rows.push(r),
        }
    };
    for (start, end, r) in entries {
        if start > covered_to && !rows.is_empty() {
            push(&mut rows, covered_to, UnwindRow::default());
        }
        push(&mut rows, start, r);
        covered_to = covered_to.max(end);
    }
    if !rows.is_empty() {
        push(&mut rows, covered_to, UnwindRow::default());
    }
    rows.truncate(MAX_ROWS_PER_FILE as usize);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc() -> &'static Path {
        Path::new("/lib/x86_64-linux-gnu/libc.so.6")
    }

    fn row_at(table: &Table, vaddr: u64) -> UnwindRow {
        let i = table.rows.partition_point(|r| u64::from(r.pc) <= vaddr);
        table.rows[i - 1]
    }

    /// libc's table: sorted, and its signal trampoline and PLT are rows the probes evaluate.
    #[test]
    fn libc_table_has_signal_and_plt_rows() {
        let t = compile(libc(), None).unwrap();
        assert_eq!(t.source, CfiSource::EhFrame);
        assert!(t.rows.len() > 10_000, "{} rows", t.rows.len());
        assert!(t.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        // __restore_rt (a local symbol, absent from the stripped libc) is the signal trampoline.
        assert!(t.rows.iter().any(|r| r.kind == row::SIGNAL), "no signal row");
        assert!(t.rows.iter().any(|r| r.kind == row::PLT), "no PLT row");
        assert!(t.unsupported_rows * 100 < t.rows.len(), "{} unsupported", t.unsupported_rows);
    }

    /// malloc's first instruction: the CFA is rsp + 8 and nothing is saved yet.
    #[test]
    fn function_entry_is_rsp_plus_8() {
        let t = compile(libc(), None).unwrap();
        let malloc = crate::bpf::elf_symbols::resolve(libc(), &["malloc"]).unwrap()[0].clone().unwrap();
        let r = row_at(&t, malloc.vaddr);
        assert_eq!((r.kind, r.cfa_offset, r.rbp), (row::RSP, 8, rbp::SAME));
    }

    /// The Rust toolchain's layout: the code segment's file offset is 0x1000 below its
    /// address, and its mapping starts at the page below its first byte.
    #[test]
    fn bias_of_a_mapping_from_the_page_below_its_segment() {
        let seg = |file_offset, vaddr, executable| Segment { file_offset, file_size: 0x3ee60, vaddr, executable };
        let t = Table {
            rows: Vec::new(),
            source: CfiSource::None,
            segments: vec![seg(0, 0, false), seg(0x13df0, 0x14df0, true)],
            unsupported_rows: 0,
            build_id: None,
        };
        // Mapped at 0x5555_5556_8000 from offset 0x13000: vaddr 0x14000 is there.
        assert_eq!(t.bias(0x5555_5556_8000, 0x13000), Some(0x5555_5556_8000 - 0x14000));
    }

    #[test]
    fn gaps_get_no_information_rows() {
        let r = |kind, cfa_offset| UnwindRow { pc: 0, cfa_offset, kind, rbp: 0 };
        let rows = flatten(vec![(0x100, 0x110, r(row::RSP, 8)), (0x110, 0x120, r(row::RSP, 16)), (0x200, 0x210, r(row::RSP, 8))]);
        let got: Vec<(u32, u8, u16)> = rows.iter().map(|r| (r.pc, r.kind, r.cfa_offset)).collect();
        assert_eq!(got, [(0x100, 1, 8), (0x110, 1, 16), (0x120, 0, 0), (0x200, 1, 8), (0x210, 0, 0)]);
    }

    #[test]
    fn plt_and_realign_expressions() {
        assert_eq!(cfa_expression(&[0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22]), Some((row::PLT, 11)));
        assert_eq!(cfa_expression(&[0x76, 0x78, 0x06]), Some((row::DEREF_RBP, (-8i16) as u16)));
        assert_eq!(cfa_expression(&[0x77, 0x08]), None);
    }
}
