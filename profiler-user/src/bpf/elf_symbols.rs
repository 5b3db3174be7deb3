//! Resolve allocator functions in an ELF file (executable or shared library) to what a uprobe
//! needs: the symbol's virtual address, its size, the file offset the kernel attaches to, and the
//! first bytes of its code so that [`super::probe_site`] can pick the probe site.
//!
//! Both `.dynsym` and `.symtab` are searched. Symbol versions are understood both ways: in
//! `.dynsym` the version comes from `.gnu.version` (what `nm -D` prints as `malloc@@GLIBC_2.2.5`),
//! in `.symtab` it may be part of the name itself. A query may be a bare name (`malloc`, which
//! prefers the default version) or a versioned one (`malloc@@GLIBC_2.2.5`, `realpath@GLIBC_2.2.5`).
//!
//! Only defined `STT_FUNC` symbols with a non-zero value are candidates: imports (undefined),
//! data, and `STT_GNU_IFUNC` symbols (whose value is the resolver, not the function) are not.
//! Among candidates, global/weak beat local, the default version beats a non-default one,
//! `.dynsym` beats `.symtab`, and a known size beats an unknown one.
//!
//! Memory: [`resolve`] keeps one candidate per name asked for. [`find_functions_charged`] keeps
//! one per matching address, and each copies up to [`MAX_FUNCTION_BYTES`] of code: a hostile
//! file with many matching symbols (even on the same code) could make that gigabytes, so what
//! it keeps is charged to the target's memory budget ([`crate::budget::Use::Symbols`]) and the
//! search stops at a refusal ([`ElfError::Budget`]).
use std::path::{Path, PathBuf};

use crate::target_fs::FileBytes;
use object::{
    elf,
    read::elf::{
        FileHeader, ProgramHeader, SectionHeader, SectionTable, Sym, SymbolTable, VersionTable,
    },
    Endianness, SymbolIndex,
};

/// How many bytes of each function [`FunctionSymbol::bytes`] holds at most: the whole of any
/// allocator entry point, so that [`super::probe_site`] sees every branch into its prologue.
pub const MAX_FUNCTION_BYTES: usize = 4096;

/// How many bytes [`FunctionSymbol::bytes`] holds for a symbol that does not say its size.
const UNSIZED_FUNCTION_BYTES: u64 = 64;

type Elf64 = elf::FileHeader64<Endianness>;

/// A function found in an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSymbol {
    /// The symbol name without its version (`malloc`).
    pub name: String,
    /// The version as `nm` prints it after the name: `Some("@@GLIBC_2.2.5")` for the default
    /// version, `Some("@GLIBC_2.2.5")` for an older one, `None` for an unversioned symbol.
    pub version: Option<String>,
    /// `st_value`: the link-time virtual address.
    pub vaddr: u64,
    /// `st_size`; 0 when the symbol does not say.
    pub size: u64,
    /// Where the function's first byte is in the file; what a uprobe attaches to
    /// (`vaddr - sh_addr + sh_offset` of the containing section).
    pub file_offset: u64,
    /// The first `min(size, 4096)` bytes of the function (64 when the size is unknown), never past
    /// the end of the containing section.
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read ELF file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a readable ELF file: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: object::Error,
    },
    #[error("{}: unsupported ELF file: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: &'static str },
    #[error("{} has no symbol table (neither .dynsym nor .symtab): cannot find functions in it", path.display())]
    NoSymbols { path: PathBuf },
    #[error("searching the functions of {}: {source}", path.display())]
    Budget { path: PathBuf, source: crate::budget::BudgetExceeded },
}

/// Opens `path` once and resolves every name in `names`; the result has one entry per name, in
/// order, `None` for a name the file does not define as a function.
pub fn resolve(
    path: impl AsRef<Path>,
    names: &[&str],
) -> Result<Vec<Option<FunctionSymbol>>, ElfError> {
    let path = path.as_ref();
    resolve_in(path, &map_file(path)?, names)
}

fn map_file(path: &Path) -> Result<FileBytes, ElfError> {
    let io = |source| ElfError::Io {
        path: path.to_owned(),
        source,
    };
    // Regular files within the ELF cap only: a path may still come from a target. Read into
    // memory when small enough (a target truncating the file cannot fault us), else mapped.
    let file = crate::target_fs::open_checked(path, crate::target_fs::Kind::Elf).map_err(|e| io(e.into()))?;
    file.bytes().map_err(io)
}

/// A parsed query: the base name and, if given, the version and whether `@@` was used.
struct Query<'a> {
    base: &'a str,
    version: Option<(&'a str, bool)>,
}

fn split_version(name: &str) -> (&str, Option<(&str, bool)>) {
    match name.find('@') {
        None => (name, None),
        Some(i) => {
            let rest = &name[i + 1..];
            match rest.strip_prefix('@') {
                Some(v) => (&name[..i], Some((v, true))),
                None => (&name[..i], Some((rest, false))),
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Candidate {
    vaddr: u64,
    size: u64,
    file_offset: u64,
    /// End of the containing section (or segment) in the file.
    region_end: u64,
    version: Option<(String, bool)>,
    rank: (u8, u8, u8, u8),
}

fn resolve_in(
    path: &Path,
    data: &[u8],
    names: &[&str],
) -> Result<Vec<Option<FunctionSymbol>>, ElfError> {
    let queries: Vec<Query> = names
        .iter()
        .map(|n| {
            let (base, version) = split_version(n);
            Query { base, version }
        })
        .collect();
    let mut best: Vec<Option<Candidate>> = vec![None; names.len()];
    for_each_function(
        path,
        data,
        &mut |base| queries.iter().any(|q| q.base == base),
        &mut |base, candidate| {
            for (q, slot) in queries.iter().zip(best.iter_mut()) {
                if q.base != base || !version_matches(q, &candidate.version) {
                    continue;
                }
                if slot.as_ref().is_none_or(|b| candidate.rank > b.rank) {
                    *slot = Some(candidate.clone());
                }
            }
        },
    )?;
    Ok(queries
        .iter()
        .zip(best)
        .map(|(q, c)| c.map(|c| function_symbol(data, q.base, c)))
        .collect())
}

/// Parses the ELF header and visits every defined function symbol (`.dynsym` then `.symtab`)
/// whose unversioned name passes `wants`, with its placement in the file.
fn for_each_function(
    path: &Path,
    data: &[u8],
    wants: &mut dyn FnMut(&str) -> bool,
    visit: &mut dyn FnMut(&str, Candidate),
) -> Result<(), ElfError> {
    let parse_err = |source| ElfError::Parse {
        path: path.to_owned(),
        source,
    };
    let unsupported = |reason| ElfError::Unsupported {
        path: path.to_owned(),
        reason,
    };
    // e_ident: 4 magic bytes, then EI_CLASS.
    let ident = data
        .get(..16)
        .ok_or_else(|| unsupported("file is shorter than an ELF header"))?;
    if ident[..4] != elf::ELFMAG {
        return Err(unsupported("no ELF magic"));
    }
    if ident[4] != elf::ELFCLASS64 {
        return Err(unsupported("only 64-bit ELF files are supported"));
    }
    let header = Elf64::parse(data).map_err(parse_err)?;
    let endian = header.endian().map_err(parse_err)?;
    if header.e_type(endian) == elf::ET_REL {
        return Err(unsupported(
            "relocatable object (.o): symbol values are not addresses",
        ));
    }
    let sections = header.sections(endian, data).map_err(parse_err)?;
    let dynsym = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(parse_err)?;
    let symtab = sections
        .symbols(endian, data, elf::SHT_SYMTAB)
        .map_err(parse_err)?;
    if dynsym.is_empty() && symtab.is_empty() {
        return Err(ElfError::NoSymbols {
            path: path.to_owned(),
        });
    }
    // A broken version table only costs us the version names, not the symbols.
    let versions = sections.versions(endian, data).ok().flatten();
    let segments = header.program_headers(endian, data).map_err(parse_err)?;

    let tables = [(&dynsym, versions.as_ref(), 1u8), (&symtab, None, 0u8)];
    for (table, versions, table_rank) in tables {
        for (index, sym) in table.enumerate() {
            if sym.st_type() != elf::STT_FUNC
                || sym.st_value(endian) == 0
                || sym.is_undefined(endian)
            {
                continue;
            }
            let Ok(raw_name) = table.symbol_name(endian, sym) else {
                continue;
            };
            let Ok(raw_name) = std::str::from_utf8(raw_name) else {
                continue;
            };
            let (base, inline_version) = split_version(raw_name);
            if !wants(base) {
                continue;
            }
            let version = match inline_version {
                Some((v, default)) => Some((v.to_owned(), default)),
                None => versions.and_then(|vt| dynsym_version(vt, endian, index)),
            };
            if let Some(c) = candidate(
                endian, data, &sections, table, segments, index, sym, version, table_rank,
            ) {
                visit(base, c);
            }
        }
    }
    Ok(())
}

fn function_symbol(data: &[u8], name: &str, c: Candidate) -> FunctionSymbol {
    let want = if c.size == 0 {
        UNSIZED_FUNCTION_BYTES
    } else {
        c.size.min(MAX_FUNCTION_BYTES as u64)
    };
    let end = c
        .file_offset
        .saturating_add(want)
        .min(c.region_end)
        .min(data.len() as u64);
    let bytes = data
        .get(c.file_offset as usize..end as usize)
        .unwrap_or_default()
        .to_vec();
    FunctionSymbol {
        name: name.to_owned(),
        version: c
            .version
            .map(|(v, default)| format!("{}{v}", if default { "@@" } else { "@" })),
        vaddr: c.vaddr,
        size: c.size,
        file_offset: c.file_offset,
        bytes,
    }
}

/// Every function of `path` whose symbol name (without its version, still mangled, e.g.
/// `_ZN2ns5Cache8gc_cycleEv`) satisfies `matches`: for lookups that are not exact names, such
/// as demangled names (see `crate::trigger::resolve`). Same candidates as [`resolve`] (defined
/// `STT_FUNC` symbols with a non-zero value); a function named in several tables or under
/// several matching aliases is returned once, by the best-ranked name, ordered by address.
pub fn find_functions(
    path: impl AsRef<Path>,
    matches: impl FnMut(&str) -> bool,
) -> Result<Vec<FunctionSymbol>, ElfError> {
    find_in(path.as_ref(), matches, &mut |_| Ok(()))
}

/// [`find_functions`], charging what it keeps (candidates, then the functions and their code)
/// to `charge` (the target's account, [`crate::budget::Use::Symbols`]); the caller drops it once
/// it has kept what it needs.
pub fn find_functions_charged(
    path: impl AsRef<Path>,
    matches: impl FnMut(&str) -> bool,
    charge: &mut crate::budget::Reservation,
) -> Result<Vec<FunctionSymbol>, ElfError> {
    find_in(path.as_ref(), matches, &mut |bytes| charge.try_grow(bytes))
}

/// Estimated bytes of one kept candidate (its map entry) besides its name.
const CANDIDATE_BYTES: u64 = (size_of::<Candidate>() + size_of::<String>() + 64) as u64;

fn find_in(
    path: &Path,
    mut matches: impl FnMut(&str) -> bool,
    charge: &mut dyn FnMut(u64) -> Result<(), crate::budget::BudgetExceeded>,
) -> Result<Vec<FunctionSymbol>, ElfError> {
    let data = map_file(path)?;
    let refused = |source| ElfError::Budget {
        path: path.to_owned(),
        source,
    };
    // vaddr -> (name, best candidate)
    let mut found: std::collections::BTreeMap<u64, (String, Candidate)> = Default::default();
    let mut refusal = None;
    for_each_function(path, &data, &mut matches, &mut |base, c| {
        if refusal.is_some() {
            return;
        }
        match found.get(&c.vaddr) {
            Some((_, have)) if have.rank >= c.rank => {}
            Some(_) => {
                found.insert(c.vaddr, (base.to_owned(), c));
            }
            None => match charge(CANDIDATE_BYTES + base.len() as u64) {
                Ok(()) => {
                    found.insert(c.vaddr, (base.to_owned(), c));
                }
                Err(e) => refusal = Some(e),
            },
        }
    })?;
    if let Some(e) = refusal {
        return Err(refused(e));
    }
    let mut out = Vec::with_capacity(found.len());
    for (name, c) in found.into_values() {
        let f = function_symbol(&data, &name, c);
        charge((size_of::<FunctionSymbol>() + f.bytes.len()) as u64).map_err(refused)?;
        out.push(f);
    }
    Ok(out)
}

/// The version of `.dynsym` entry `index`, with whether it is the default (`@@`) one.
fn dynsym_version(
    vt: &VersionTable<'_, Elf64>,
    endian: Endianness,
    index: SymbolIndex,
) -> Option<(String, bool)> {
    let vi = vt.version_index(endian, index);
    let v = vt.version(vi).ok()??;
    Some((
        String::from_utf8_lossy(v.name()).into_owned(),
        !vi.is_hidden(),
    ))
}

fn version_matches(q: &Query, have: &Option<(String, bool)>) -> bool {
    match (q.version, have) {
        (None, _) => true,
        (Some((want, want_default)), Some((v, default))) => {
            want == v && (!want_default || *default)
        }
        (Some(_), None) => false,
    }
}

#[allow(clippy::too_many_arguments)]
fn candidate(
    endian: Endianness,
    data: &[u8],
    sections: &SectionTable<'_, Elf64>,
    table: &SymbolTable<'_, Elf64>,
    segments: &[elf::ProgramHeader64<Endianness>],
    index: SymbolIndex,
    sym: &elf::Sym64<Endianness>,
    version: Option<(String, bool)>,
    table_rank: u8,
) -> Option<Candidate> {
    let vaddr = sym.st_value(endian);
    let size = sym.st_size(endian);
    // The containing section gives the file offset; if the symbol has no usable section
    // (SHN_ABS, a NOBITS section, a value outside it), the PT_LOAD segment does.
    let from_section = table
        .symbol_section(endian, sym, index)
        .ok()
        .flatten()
        .and_then(|si| {
            let s = sections.section(si).ok()?;
            let (addr, size, offset) = (s.sh_addr(endian), s.sh_size(endian), s.sh_offset(endian));
            let inside = s.sh_type(endian) != elf::SHT_NOBITS
                && vaddr >= addr
                && vaddr < addr.checked_add(size)?;
            inside.then(|| (vaddr - addr + offset, offset + size))
        });
    let (file_offset, region_end) = from_section.or_else(|| {
        segments.iter().find_map(|p| {
            let (addr, filesz, offset) =
                (p.p_vaddr(endian), p.p_filesz(endian), p.p_offset(endian));
            let inside = p.p_type(endian) == elf::PT_LOAD
                && vaddr >= addr
                && vaddr < addr.checked_add(filesz)?;
            inside.then(|| (vaddr - addr + offset, offset + filesz))
        })
    })?;
    if file_offset >= data.len() as u64 {
        return None;
    }
    let bind_rank = match sym.st_bind() {
        elf::STB_GLOBAL | elf::STB_WEAK => 1,
        _ => 0,
    };
    let version_rank = match &version {
        Some((_, false)) => 0,
        _ => 1,
    };
    Some(Candidate {
        vaddr,
        size,
        file_offset,
        region_end,
        version,
        rank: (bind_rank, version_rank, table_rank, u8::from(size > 0)),
    })
}

/// A section's address and bytes.
pub type SectionBytes<'a> = (u64, &'a [u8]);

/// A file's code by virtual address, and its PLT imports: for following a function's direct
/// branches to the functions they reach (see [`super::forwarding`]).
pub struct CodeImage {
    data: FileBytes,
    /// `(sh_addr, sh_size, sh_offset)` of each executable section.
    code_sections: Vec<(u64, u64, u64)>,
    /// `(sh_addr, sh_size, sh_offset)` of `.eh_frame` and `.eh_frame_hdr`.
    eh_frame: Option<(u64, u64, u64)>,
    eh_frame_hdr: Option<(u64, u64, u64)>,
    /// GOT slot address -> imported name, from the `R_X86_64_JUMP_SLOT` and `R_X86_64_GLOB_DAT`
    /// relocations (each PLT stub jumps through one slot).
    plt_slots: std::collections::HashMap<u64, String>,
}

impl CodeImage {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ElfError> {
        let path = path.as_ref();
        let data = map_file(path)?;
        let parse_err = |source| ElfError::Parse { path: path.to_owned(), source };
        let header = Elf64::parse(&*data).map_err(parse_err)?;
        let endian = header.endian().map_err(parse_err)?;
        let sections = header.sections(endian, &*data).map_err(parse_err)?;
        let mut code_sections = Vec::new();
        let (mut eh_frame, mut eh_frame_hdr) = (None, None);
        let mut plt_slots = std::collections::HashMap::new();
        for section in sections.iter() {
            let place = (section.sh_addr(endian), section.sh_size(endian), section.sh_offset(endian));
            match sections.section_name(endian, section) {
                Ok(b".eh_frame") => eh_frame = Some(place),
                Ok(b".eh_frame_hdr") => eh_frame_hdr = Some(place),
                _ => {}
            }
            let flags = section.sh_flags(endian);
            if section.sh_type(endian) == elf::SHT_PROGBITS && flags & u64::from(elf::SHF_EXECINSTR) != 0 {
                code_sections.push(place);
            }
            let Ok(Some((relas, link))) = section.rela(endian, &*data) else { continue };
            // A stripped static executable keeps `.rela.plt` (IRELATIVE) linked to the symbol
            // table strip removed: no imports to learn from it.
            let Ok(linked) = sections.section(link) else { continue };
            // A crafted file may link relocations to a section that is no symbol table
            // (object's parser asserts on that; found by fuzzing).
            if !matches!(linked.sh_type(endian), elf::SHT_DYNSYM | elf::SHT_SYMTAB) {
                continue;
            }
            let Ok(symbols) = SymbolTable::parse(endian, &*data, &sections, link, linked) else {
                continue;
            };
            for rela in relas {
                // `.plt` stubs jump through JUMP_SLOT entries, `.plt.got` ones through GLOB_DAT.
                if !matches!(rela.r_type(endian, false), elf::R_X86_64_JUMP_SLOT | elf::R_X86_64_GLOB_DAT) {
                    continue;
                }
                let index = SymbolIndex(rela.r_sym(endian, false) as usize);
                let name = symbols.symbol(index).ok().and_then(|sym| symbols.symbol_name(endian, sym).ok());
                if let Some(name) = name.and_then(|n| std::str::from_utf8(n).ok()) {
                    plt_slots.insert(rela.r_offset.get(endian), split_version(name).0.to_owned());
                }
            }
        }
        Ok(CodeImage { data, code_sections, eh_frame, eh_frame_hdr, plt_slots })
    }

    /// The bytes of the section at `(sh_addr, sh_size, sh_offset)`.
    fn section_bytes(&self, (addr, size, offset): (u64, u64, u64)) -> Option<SectionBytes<'_>> {
        Some((addr, self.data.get(offset as usize..offset.checked_add(size)? as usize)?))
    }

    /// The executable section holding `vaddr`.
    fn code_section_at(&self, vaddr: u64) -> Option<(u64, u64, u64)> {
        self.code_sections.iter().copied().find(|&(addr, size, _)| vaddr >= addr && vaddr - addr < size)
    }

    /// Every executable section.
    pub fn code_sections(&self) -> impl Iterator<Item = SectionBytes<'_>> {
        self.code_sections.iter().filter_map(|&place| self.section_bytes(place))
    }

    /// Where code at `vaddr` is in the file.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        let (addr, _, offset) = self.code_section_at(vaddr)?;
        Some(offset + (vaddr - addr))
    }

    /// `.eh_frame` and `.eh_frame_hdr`.
    pub fn eh_frame(&self) -> Option<(SectionBytes<'_>, SectionBytes<'_>)> {
        Some((self.section_bytes(self.eh_frame?)?, self.section_bytes(self.eh_frame_hdr?)?))
    }

    /// Up to `len` bytes of code from `vaddr`, never past the end of its section.
    pub fn code(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let (addr, size, offset) = self.code_section_at(vaddr)?;
        let start = offset + (vaddr - addr);
        let end = start + len.min(size - (vaddr - addr));
        self.data.get(start as usize..end as usize)
    }

    /// The function a PLT stub jumping through GOT slot `slot` imports.
    pub fn import_at_slot(&self, slot: u64) -> Option<&str> {
        self.plt_slots.get(&slot).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

    /// The allocator entry points memscope probes, in the order the tests use.
    const NAMES: [&str; 10] = [
        "malloc",
        "free",
        "calloc",
        "realloc",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
        "reallocarray",
    ];

    /// `(vaddr, size)` of [`NAMES`] in the libc these tests were written on (Debian GLIBC
    /// 2.36-9+deb12u14, sha256 6b4a4535…1421), read by hand with `nm -D -S` and `readelf -sW`.
    /// `.text` there has `sh_addr == sh_offset == 0x26380`, so file offsets equal addresses.
    const DEBIAN12_LIBC: [(u64, u64); 10] = [
        (0x98930, 0x317),
        (0x98ef0, 0x101),
        (0x996e0, 0x3b0),
        (0x99130, 0x4df),
        (0x9a280, 0x77),
        (0x99610, 0x34),
        (0x99610, 0x34),
        (0x99650, 0x2f),
        (0x99680, 0x51),
        (0x9a7e0, 0x21),
    ];

    /// First 16 bytes of `free` in that libc: identifies the build before exact numbers are
    /// asserted.
    const DEBIAN12_FREE_HEAD: [u8; 16] = [
        0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0, 0x53,
        0x48,
    ];

    /// On this machine's libc every allocator function resolves; on any libc the file offset is
    /// consistent with `bytes` (re-read from the file at `file_offset`), the bytes are capped at
    /// 64 and at the size, and `malloc`/`free` carry their default GLIBC version. On the Debian 12
    /// build the tests were written on, the addresses and sizes are the hand-checked ones.
    #[test]
    fn resolves_libc_allocator_functions() {
        if !Path::new(LIBC).exists() {
            eprintln!("skipping: {LIBC} does not exist here");
            return;
        }
        let syms = resolve(LIBC, &NAMES).expect("libc parses");
        assert_eq!(syms.len(), NAMES.len());
        let file = std::fs::read(LIBC).unwrap();
        for (name, sym) in NAMES.iter().zip(&syms) {
            let sym = sym
                .as_ref()
                .unwrap_or_else(|| panic!("{name} not found in {LIBC}"));
            assert_eq!(sym.name, *name);
            assert!(sym.vaddr != 0 && sym.size > 0, "{sym:?}");
            let len = sym.size.min(MAX_FUNCTION_BYTES as u64) as usize;
            assert_eq!(sym.bytes.len(), len, "{name}");
            let off = sym.file_offset as usize;
            assert_eq!(
                sym.bytes,
                file[off..off + len],
                "{name}: bytes are not at file_offset"
            );
            assert!(
                sym.version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("@@GLIBC_")),
                "{name}: {:?}",
                sym.version
            );
        }
        let same_build = syms[1]
            .as_ref()
            .unwrap()
            .bytes
            .starts_with(&DEBIAN12_FREE_HEAD);
        if !same_build {
            eprintln!("{LIBC} is not the Debian 12 build the exact addresses were taken from; checked structure only");
            return;
        }
        for ((name, sym), (vaddr, size)) in NAMES.iter().zip(&syms).zip(DEBIAN12_LIBC) {
            let sym = sym.as_ref().unwrap();
            assert_eq!(
                (sym.vaddr, sym.size, sym.file_offset),
                (vaddr, size, vaddr),
                "{name}"
            );
        }
        assert_eq!(
            syms[0].as_ref().unwrap().version.as_deref(),
            Some("@@GLIBC_2.2.5")
        );
        assert_eq!(
            syms[5].as_ref().unwrap().version.as_deref(),
            Some("@@GLIBC_2.16")
        );
        assert_eq!(
            syms[9].as_ref().unwrap().version.as_deref(),
            Some("@@GLIBC_2.26")
        );
    }

    /// Versioned queries: `name@@VER` only matches the default version, `name@VER` matches that
    /// version; a wrong version or a non-function (`environ` is data) or an unknown name gives
    /// `None` without failing the other names.
    #[test]
    fn versioned_queries_and_misses() {
        if !Path::new(LIBC).exists() {
            eprintln!("skipping: {LIBC} does not exist here");
            return;
        }
        let got = resolve(
            LIBC,
            &[
                "malloc@@GLIBC_2.2.5",
                "malloc@GLIBC_2.2.5",
                "malloc@@GLIBC_9.9",
                "environ",
                "no_such_function",
                "free",
            ],
        )
        .unwrap();
        let malloc = got[0].as_ref().expect("malloc@@GLIBC_2.2.5");
        assert_eq!(got[1].as_ref(), Some(malloc));
        assert!(got[2].is_none());
        assert!(got[3].is_none(), "environ is an object, not a function");
        assert!(got[4].is_none());
        assert!(got[5].is_some());
    }

    /// `.symtab` is searched too: the test binary itself (not stripped) defines `main` there,
    /// and its undefined import of `malloc` is not taken for a definition.
    #[test]
    fn searches_symtab_and_skips_imports() {
        let exe = std::env::current_exe().unwrap();
        let got = resolve(&exe, &["main", "malloc"]).unwrap();
        let main = got[0]
            .as_ref()
            .expect("the test binary defines main in .symtab");
        assert!(main.vaddr != 0 && !main.bytes.is_empty());
        let file = std::fs::read(&exe).unwrap();
        let off = main.file_offset as usize;
        assert_eq!(main.bytes, file[off..off + main.bytes.len()]);
        assert!(
            got[1].is_none(),
            "malloc is imported from libc, not defined: {:?}",
            got[1]
        );
    }

    /// Errors name the file: a missing file, a non-ELF file, and a 32-bit ELF header.
    #[test]
    fn errors_carry_the_path() {
        let err = resolve("/nonexistent/libfoo.so", &["malloc"]).unwrap_err();
        assert!(matches!(err, ElfError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/libfoo.so"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("not-elf.txt");
        std::fs::write(&text, b"hello, this is not an ELF file at all").unwrap();
        let err = resolve(&text, &["malloc"]).unwrap_err();
        assert!(matches!(err, ElfError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("not-elf.txt"), "{err}");

        let elf32 = dir.path().join("elf32");
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(&elf::ELFMAG);
        header[4] = elf::ELFCLASS32;
        std::fs::write(&elf32, &header).unwrap();
        let err = resolve(&elf32, &["malloc"]).unwrap_err();
        assert!(err.to_string().contains("64-bit"), "{err}");
    }

    /// `find_functions` sees every defined function name and returns each matching function
    /// once: `main` of the test binary by predicate, with the same offset `resolve` gives, and
    /// a Rust function by the prefix of its mangled name.
    #[test]
    fn finds_functions_by_predicate() {
        let exe = std::env::current_exe().unwrap();
        let by_name = resolve(&exe, &["main"]).unwrap()[0].clone().unwrap();
        let found = find_functions(&exe, |n| n == "main").unwrap();
        assert_eq!(found, vec![by_name]);
        let mut seen = 0;
        let found = find_functions(&exe, |n| {
            seen += 1;
            n.starts_with("_ZN") && n.contains("11elf_symbols")
        })
        .unwrap();
        assert!(seen > 100, "the predicate saw only {seen} names");
        assert!(!found.is_empty());
        let mut addrs: Vec<u64> = found.iter().map(|f| f.vaddr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), found.len(), "each function once");
        assert!(find_functions(&exe, |_| false).unwrap().is_empty());
    }

    /// A search matching every function of libc keeps thousands of them, with their code: past a
    /// small per-target cap it stops with `Budget` (counted, reported); under a large one the
    /// same functions as uncharged are returned, their bytes on the account until dropped.
    #[test]
    fn a_search_is_charged_to_the_target_budget() {
        use crate::budget::{Account, Pool, Use};
        static POOL: Pool = Pool::new(1 << 30);
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let small = Account::in_pool(31, 64 << 10, &POOL);
        let mut charge = small.reservation(Use::Symbols);
        let e = find_functions_charged(libc, |_| true, &mut charge).unwrap_err();
        assert!(matches!(e, ElfError::Budget { .. }) && e.to_string().contains("budget"), "{e}");
        drop(charge);
        assert_eq!(small.report().refused["symbols"].times, 1);
        assert_eq!(small.report().used_bytes, 0);
        let big = Account::in_pool(32, 256 << 20, &POOL);
        let mut charge = big.reservation(Use::Symbols);
        let found = find_functions_charged(libc, |_| true, &mut charge).unwrap();
        assert_eq!(found, find_functions(libc, |_| true).unwrap());
        let code: usize = found.iter().map(|f| f.bytes.len()).sum();
        eprintln!("all of libc's functions: {} kept, {code} bytes of code, {} bytes charged", found.len(), charge.bytes());
        assert!(charge.bytes() > code as u64 && found.len() > 1000);
        drop(charge);
        assert_eq!(POOL.usage().0, 0);
    }

    /// Query parsing: bare, `@@` (default) and `@` (any) versions.
    #[test]
    fn splits_versions() {
        assert_eq!(split_version("malloc"), ("malloc", None));
        assert_eq!(
            split_version("malloc@@GLIBC_2.2.5"),
            ("malloc", Some(("GLIBC_2.2.5", true)))
        );
        assert_eq!(
            split_version("realpath@GLIBC_2.2.5"),
            ("realpath", Some(("GLIBC_2.2.5", false)))
        );
    }
}
