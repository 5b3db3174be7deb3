//! The allocator of a stripped executable (no symbol table: a stripped static binary, most
//! often): found through its separate debug file by build id, or named by the user.
//!
//! - Debug file: `/usr/lib/debug/.build-id/xx/yyyy.debug` opened inside the target's root (as
//!   [`crate::unwind`] does for CFI), its symbols resolved with [`super::families`]; the code
//!   (and the file offset the probe attaches to) comes from the executable itself, since a
//!   debug file made by `objcopy --only-keep-debug` holds no code.
//! - Named entry points (`--alloc-symbol malloc=0x401a20,free=0x4021f0`): each a C allocator
//!   function and its link-time address as `nm` or `objdump -d` print it in an unstripped build
//!   of the same binary (for a PIE, the address relative to its load base, as `nm` prints it).
//!   The address must be inside one of the executable's code sections.
//!
//! Limits: only the executable is looked at this way (a stripped shared library keeps its
//! `.dynsym`); named entry points take the C argument layouts (`malloc(size)`, `free(ptr)`,
//! ...), which is what glibc, musl and unprefixed jemalloc/tcmalloc/mimalloc overrides have.
use std::path::Path;

use profiler_common::AllocKind;

use super::{
    elf_symbols::{CodeImage, ElfError, FunctionSymbol},
    families::{self, Entry, Family},
};
use crate::target_fs::{self, Kind};

/// Bytes of code read at a named entry point (its size is not known).
const NAMED_CODE_BYTES: u64 = 64;

/// `--alloc-symbol`: allocator entry points named by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedEntries(pub Vec<(AllocKind, String, u64)>);

#[derive(Debug, thiserror::Error)]
pub enum NamedError {
    #[error("--alloc-symbol {0:?}: expected NAME=ADDRESS[,NAME=ADDRESS...] (e.g. malloc=0x401a20,free=0x4021f0)")]
    Syntax(String),
    #[error("--alloc-symbol: {0:?} is not a C allocator function (malloc, calloc, realloc, reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc, free)")]
    UnknownName(String),
    #[error("--alloc-symbol: an allocation function and free are both needed (got {0})")]
    Incomplete(String),
    #[error("--alloc-symbol {name}={address:#x}: no code of {path} is at that address (give the link-time address nm prints)")]
    NotCode { name: String, address: u64, path: String },
    #[error(transparent)]
    Elf(#[from] ElfError),
}

impl NamedEntries {
    /// Parses `malloc=0x401a20,free=0x4021f0` (hex with `0x`, or decimal).
    pub fn parse(s: &str) -> Result<NamedEntries, NamedError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, addr) = part.split_once('=').ok_or_else(|| NamedError::Syntax(s.to_string()))?;
            let (name, addr) = (name.trim(), addr.trim());
            let address = match addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => addr.parse(),
            }
            .map_err(|_| NamedError::Syntax(s.to_string()))?;
            let kind = AllocKind::ALL
                .into_iter()
                .filter(|k| !matches!(k, AllocKind::OperatorNew | AllocKind::OperatorDelete | AllocKind::RustRealloc))
                .find(|k| k.symbols().contains(&name))
                .ok_or_else(|| NamedError::UnknownName(name.to_string()))?;
            out.push((kind, name.to_string(), address));
        }
        let named = NamedEntries(out);
        if !named.is_empty() && !named.complete() {
            return Err(NamedError::Incomplete(s.to_string()));
        }
        Ok(named)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn complete(&self) -> bool {
        self.0.iter().any(|(k, _, _)| k.frees()) && self.0.iter().any(|(k, _, _)| !k.frees())
    }

    /// The named functions in the executable at `exe` (a host path), `shown` naming it in
    /// errors.
    pub fn resolve(&self, exe: &Path, shown: &str) -> Result<Vec<(Entry, FunctionSymbol)>, NamedError> {
        let image = CodeImage::open(exe)?;
        self.0
            .iter()
            .map(|(kind, name, address)| {
                let not_code =
                    || NamedError::NotCode { name: name.clone(), address: *address, path: shown.to_string() };
                let file_offset = image.file_offset(*address).ok_or_else(not_code)?;
                let bytes = image.code(*address, NAMED_CODE_BYTES).ok_or_else(not_code)?.to_vec();
                let f =
                    FunctionSymbol { name: name.clone(), version: None, vaddr: *address, size: 0, file_offset, bytes };
                Ok((Entry { family: Family::Standard, kind: *kind, symbol: name.clone() }, f))
            })
            .collect()
    }
}

/// The GNU build id of the ELF file at `path` (hex), when it has one.
pub fn build_id(path: &Path) -> Option<String> {
    use object::Object as _;
    let file = target_fs::open_checked(path, Kind::Elf).ok()?;
    let data = file.bytes().ok()?;
    let parsed = object::File::parse(&*data).ok()?;
    let id = parsed.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the debug file of a file with build id `id` is, inside the target's root.
pub fn debug_file_path(id: &str) -> Option<String> {
    let (dir, rest) = (id.get(..2)?, id.get(2..)?);
    (!rest.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("/usr/lib/debug/.build-id/{dir}/{rest}.debug"))
}

/// The allocator entry points of the executable at `exe` (a host path) found through its debug
/// file inside `pid`'s root: the families the debug file's symbols make complete, placed in
/// the executable's own code. Empty when there is no debug file or it names no allocator.
pub fn from_debug_file(pid: u32, exe: &Path) -> Vec<(Entry, FunctionSymbol)> {
    let Some(path) = build_id(exe).as_deref().and_then(debug_file_path) else { return Vec::new() };
    let debug = match target_fs::open_in_root(pid, &path, Kind::DebugFile) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("no debug file {path} for process {pid}: {e}");
            return Vec::new();
        }
    };
    let functions = match debug_functions(debug.path()) {
        Some(f) => f,
        None => {
            tracing::debug!("debug file {path} of process {pid}: not a readable ELF file");
            return Vec::new();
        }
    };
    let Ok(image) = CodeImage::open(exe) else { return Vec::new() };
    let present = families::exact_entries()
        .into_iter()
        .filter_map(|e| {
            let &(vaddr, size) = functions.get(e.symbol.as_str())?;
            // The debug file's addresses and sizes hold; its code is not there (NOBITS): the
            // executable's is.
            let file_offset = image.file_offset(vaddr)?;
            let len =
                if size == 0 { NAMED_CODE_BYTES } else { size.min(super::elf_symbols::MAX_FUNCTION_BYTES as u64) };
            let bytes = image.code(vaddr, len)?.to_vec();
            let f = FunctionSymbol { name: e.symbol.clone(), version: None, vaddr, size, file_offset, bytes };
            Some((e, f))
        })
        .collect();
    families::complete(present)
}

/// The defined functions of a debug file (name -> address, size), global and weak ones winning
/// over local ones of the same name. Names a family does not use are not kept.
fn debug_functions(path: &Path) -> Option<std::collections::HashMap<String, (u64, u64)>> {
    use object::{Object as _, ObjectSymbol as _};
    let wanted: std::collections::HashSet<String> = families::exact_entries().into_iter().map(|e| e.symbol).collect();
    let file = target_fs::open_checked(path, Kind::DebugFile).ok()?;
    let data = file.bytes().ok()?;
    let parsed = object::File::parse(&*data).ok()?;
    let mut out = std::collections::HashMap::new();
    for sym in parsed.symbols() {
        if sym.kind() != object::SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let name = name.split('@').next().unwrap_or(name);
        if !wanted.contains(name) {
            continue;
        }
        if sym.is_global() || !out.contains_key(name) {
            out.insert(name.to_string(), (sym.address(), sym.size()));
        }
    }
    Some(out)
}

/// Whether the ELF file at `path` has no symbol table at all (stripped).
pub fn is_stripped(path: &Path) -> bool {
    matches!(super::elf_symbols::resolve(path, &["malloc"]), Err(ElfError::NoSymbols { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Named entry points parse in hex or decimal; names, syntax and completeness are checked.
    #[test]
    fn parses_named_entries() {
        let n = NamedEntries::parse("malloc=0x401a20, free=4202992,realloc=0x10").unwrap();
        assert_eq!(
            n.0,
            vec![
                (AllocKind::Malloc, "malloc".to_string(), 0x401a20),
                (AllocKind::Free, "free".to_string(), 4202992),
                (AllocKind::Realloc, "realloc".to_string(), 0x10)
            ]
        );
        assert!(matches!(NamedEntries::parse("malloc"), Err(NamedError::Syntax(_))));
        assert!(matches!(NamedEntries::parse("malloc=zz,free=1"), Err(NamedError::Syntax(_))));
        assert!(matches!(NamedEntries::parse("my_alloc=1,free=2"), Err(NamedError::UnknownName(_))));
        assert!(matches!(NamedEntries::parse("malloc=1"), Err(NamedError::Incomplete(_))));
        assert!(NamedEntries::parse("").unwrap().is_empty());
    }

    /// Debug file paths come from hex build ids only (the id is read from a target's file).
    #[test]
    fn debug_file_paths() {
        assert_eq!(debug_file_path("0eb5d0be").as_deref(), Some("/usr/lib/debug/.build-id/0e/b5d0be.debug"));
        assert_eq!(debug_file_path("0e"), None);
        assert_eq!(debug_file_path("0e/../../x"), None);
    }
}
