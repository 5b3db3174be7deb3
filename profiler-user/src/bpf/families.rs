//! The allocator families memscope recognizes by the functions an ELF file defines, and the
//! argument layout ([`AllocKind`]) of each of their entry points.
//!
//! A family counts in a file only when that file defines at least one of its allocation
//! functions and one of its frees (for the C API: `malloc` and `free` themselves, so that
//! libstdc++'s `operator new` does not make it an allocator): a library importing `mi_free`
//! does not make it mimalloc.
//!
//! - the C standard API (`malloc`, `free`, ... and the C++ operators) as glibc, musl, an
//!   unprefixed jemalloc or tcmalloc export it;
//! - jemalloc's non-standard API (`mallocx`, `rallocx`, `sdallocx`, `dallocx`), unprefixed or
//!   with the `je_` or `_rjem_` prefix (the latter is what `tikv-jemallocator` links statically
//!   into a Rust program, with its whole API prefixed); Rust frees through `sdallocx`;
//! - mimalloc's `mi_` API (the `mimalloc` crate calls `mi_malloc_aligned`, `mi_zalloc_aligned`,
//!   `mi_realloc_aligned` and `mi_free`), its aligned, zeroed, counted and realloc variants;
//! - gperftools' tcmalloc `tc_` API, sized and aligned deletes included;
//! - Rust's allocator shims (`__rust_alloc`, `__rust_dealloc`, `__rust_realloc`,
//!   `__rust_alloc_zeroed`, v0-mangled as `_RNv..._7___rustc12___rust_alloc` since Rust 1.8x):
//!   the fallback for a `#[global_allocator]` none of the above recognizes. Used only when the
//!   executable defines them, has no `__rdl_alloc` (which is there when Rust's allocator is the
//!   system one, i.e. `malloc`), no family above, and the shims do not call libc's allocator
//!   (a global allocator wrapping `System` is inlined by rustc into the crate's own code, which
//!   then calls `malloc` directly: `malloc` sees it all). Calls rustc inlined past the shims
//!   (the allocator's crate's own allocations) are not seen then.
//!
//! Left out on purpose: jemalloc's `xallocx` and mimalloc's `mi_expand` (they resize in place
//! and keep the pointer: the size change is not tracked, the allocation stays tracked at its
//! old size), `nallocx`/`mi_good_size` (they allocate nothing), `mi_strdup`/`mi_strndup`
//! (size known only at the return) and the `mi_heap_*` API (a heap argument first).
use profiler_common::AllocKind;

use super::elf_symbols::{self, ElfError, FunctionSymbol};

/// A family of entry points, as reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// `malloc`, `free` and the rest of the C API, C++ operators included.
    Standard,
    /// jemalloc's `*allocx` API with the given prefix (`""`, `"je_"`, `"_rjem_"`), and the
    /// C API under a non-empty prefix.
    Jemalloc(&'static str),
    Mimalloc,
    Tcmalloc,
    /// Rust's `__rust_*` allocator shims.
    RustShims,
}

impl Family {
    pub fn name(self) -> String {
        match self {
            Family::Standard => "C malloc API".into(),
            Family::Jemalloc("") => "jemalloc".into(),
            Family::Jemalloc(prefix) => format!("jemalloc ({prefix} prefix)"),
            Family::Mimalloc => "mimalloc".into(),
            Family::Tcmalloc => "tcmalloc".into(),
            Family::RustShims => "Rust allocator shims (#[global_allocator])".into(),
        }
    }
}

/// One entry point to look for: its family, its argument layout, its exact symbol name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub family: Family,
    pub kind: AllocKind,
    pub symbol: String,
}

const JEMALLOC_PREFIXES: [&str; 3] = ["", "je_", "_rjem_"];

/// jemalloc's C API under a prefix (unprefixed, it is [`Family::Standard`]).
const JEMALLOC_C_API: &[(AllocKind, &str)] = &[
    (AllocKind::Malloc, "malloc"),
    (AllocKind::Calloc, "calloc"),
    (AllocKind::Realloc, "realloc"),
    (AllocKind::Free, "free"),
    (AllocKind::PosixMemalign, "posix_memalign"),
    (AllocKind::AlignedAlloc, "aligned_alloc"),
    (AllocKind::Memalign, "memalign"),
    (AllocKind::Valloc, "valloc"),
];

/// jemalloc's non-standard API: `mallocx(size, flags)`, `rallocx(ptr, size, flags)`,
/// `sdallocx(ptr, size, flags)`, `dallocx(ptr, flags)`.
const JEMALLOC_X_API: &[(AllocKind, &str)] = &[
    (AllocKind::Malloc, "mallocx"),
    (AllocKind::Realloc, "rallocx"),
    (AllocKind::Free, "sdallocx"),
    (AllocKind::Free, "dallocx"),
];

const MIMALLOC: &[(AllocKind, &str)] = &[
    (AllocKind::Malloc, "mi_malloc"),
    (AllocKind::Malloc, "mi_zalloc"),
    (AllocKind::Malloc, "mi_malloc_small"),
    (AllocKind::Malloc, "mi_zalloc_small"),
    // (size, alignment[, offset])
    (AllocKind::Malloc, "mi_malloc_aligned"),
    (AllocKind::Malloc, "mi_zalloc_aligned"),
    (AllocKind::Malloc, "mi_malloc_aligned_at"),
    (AllocKind::Malloc, "mi_zalloc_aligned_at"),
    (AllocKind::Malloc, "mi_valloc"),
    (AllocKind::Malloc, "mi_pvalloc"),
    (AllocKind::Malloc, "mi_new"),
    (AllocKind::Malloc, "mi_new_aligned"),
    (AllocKind::Malloc, "mi_new_nothrow"),
    (AllocKind::Malloc, "mi_new_aligned_nothrow"),
    // (count, size[, alignment[, offset]])
    (AllocKind::Calloc, "mi_calloc"),
    (AllocKind::Calloc, "mi_mallocn"),
    (AllocKind::Calloc, "mi_calloc_aligned"),
    (AllocKind::Calloc, "mi_calloc_aligned_at"),
    (AllocKind::Calloc, "mi_new_n"),
    // (ptr, size[, alignment[, offset]])
    (AllocKind::Realloc, "mi_realloc"),
    (AllocKind::Realloc, "mi_reallocf"),
    (AllocKind::Realloc, "mi_rezalloc"),
    (AllocKind::Realloc, "mi_realloc_aligned"),
    (AllocKind::Realloc, "mi_realloc_aligned_at"),
    (AllocKind::Realloc, "mi_rezalloc_aligned"),
    (AllocKind::Realloc, "mi_rezalloc_aligned_at"),
    (AllocKind::Realloc, "mi_new_realloc"),
    // (ptr, count, size[, alignment[, offset]])
    (AllocKind::Reallocarray, "mi_reallocn"),
    (AllocKind::Reallocarray, "mi_recalloc"),
    (AllocKind::Reallocarray, "mi_recalloc_aligned"),
    (AllocKind::Reallocarray, "mi_recalloc_aligned_at"),
    (AllocKind::Reallocarray, "mi_reallocarray"),
    (AllocKind::Reallocarray, "mi_new_reallocn"),
    (AllocKind::PosixMemalign, "mi_posix_memalign"),
    (AllocKind::AlignedAlloc, "mi_aligned_alloc"),
    (AllocKind::Memalign, "mi_memalign"),
    (AllocKind::Free, "mi_free"),
    (AllocKind::Free, "mi_cfree"),
    (AllocKind::Free, "mi_free_size"),
    (AllocKind::Free, "mi_free_aligned"),
    (AllocKind::Free, "mi_free_size_aligned"),
];

const TCMALLOC: &[(AllocKind, &str)] = &[
    (AllocKind::Malloc, "tc_malloc"),
    (AllocKind::Malloc, "tc_malloc_skip_new_handler"),
    (AllocKind::Calloc, "tc_calloc"),
    (AllocKind::Realloc, "tc_realloc"),
    (AllocKind::Memalign, "tc_memalign"),
    (AllocKind::PosixMemalign, "tc_posix_memalign"),
    (AllocKind::Valloc, "tc_valloc"),
    (AllocKind::Pvalloc, "tc_pvalloc"),
    (AllocKind::OperatorNew, "tc_new"),
    (AllocKind::OperatorNew, "tc_newarray"),
    (AllocKind::OperatorNew, "tc_new_nothrow"),
    (AllocKind::OperatorNew, "tc_newarray_nothrow"),
    (AllocKind::OperatorNew, "tc_new_aligned"),
    (AllocKind::OperatorNew, "tc_newarray_aligned"),
    (AllocKind::OperatorNew, "tc_new_aligned_nothrow"),
    (AllocKind::OperatorNew, "tc_newarray_aligned_nothrow"),
    (AllocKind::Free, "tc_free"),
    (AllocKind::Free, "tc_cfree"),
    (AllocKind::Free, "tc_free_sized"),
    (AllocKind::OperatorDelete, "tc_delete"),
    (AllocKind::OperatorDelete, "tc_deletearray"),
    (AllocKind::OperatorDelete, "tc_delete_sized"),
    (AllocKind::OperatorDelete, "tc_deletearray_sized"),
    (AllocKind::OperatorDelete, "tc_delete_nothrow"),
    (AllocKind::OperatorDelete, "tc_deletearray_nothrow"),
    (AllocKind::OperatorDelete, "tc_delete_aligned"),
    (AllocKind::OperatorDelete, "tc_deletearray_aligned"),
    (AllocKind::OperatorDelete, "tc_delete_sized_aligned"),
    (AllocKind::OperatorDelete, "tc_deletearray_sized_aligned"),
    (AllocKind::OperatorDelete, "tc_delete_aligned_nothrow"),
    (AllocKind::OperatorDelete, "tc_deletearray_aligned_nothrow"),
];

/// Rust's shims: `__rust_alloc(size, align)`, `__rust_alloc_zeroed(size, align)`,
/// `__rust_dealloc(ptr, size, align)`, `__rust_realloc(ptr, old_size, align, new_size)`.
const RUST_SHIMS: &[(AllocKind, &str)] = &[
    (AllocKind::Malloc, "__rust_alloc"),
    (AllocKind::Malloc, "__rust_alloc_zeroed"),
    (AllocKind::Free, "__rust_dealloc"),
    (AllocKind::RustRealloc, "__rust_realloc"),
];

/// Defined when Rust's allocator is the system one (the shims call it, and it calls `malloc`).
const RUST_SYSTEM_ALLOCATOR: &str = "__rdl_alloc";

/// Every entry point looked up by exact name (all but the Rust shims, whose names are mangled).
pub fn exact_entries() -> Vec<Entry> {
    let mut out = Vec::new();
    let mut push = |family, kind, symbol: String| out.push(Entry { family, kind, symbol });
    for kind in AllocKind::ALL.into_iter().filter(|k| *k != AllocKind::RustRealloc) {
        for s in kind.symbols() {
            push(Family::Standard, kind, (*s).to_string());
        }
    }
    for prefix in JEMALLOC_PREFIXES {
        if !prefix.is_empty() {
            for (kind, s) in JEMALLOC_C_API {
                push(Family::Jemalloc(prefix), *kind, format!("{prefix}{s}"));
            }
        }
        for (kind, s) in JEMALLOC_X_API {
            push(Family::Jemalloc(prefix), *kind, format!("{prefix}{s}"));
        }
    }
    for (kind, s) in MIMALLOC {
        push(Family::Mimalloc, *kind, (*s).to_string());
    }
    for (kind, s) in TCMALLOC {
        push(Family::Tcmalloc, *kind, (*s).to_string());
    }
    out
}

/// The Rust shim (or `__rdl_alloc`) a symbol is, plain or v0-mangled
/// (`_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc`: the identifier's length, `_` because it
/// starts with one, the identifier).
pub fn rust_shim_name(symbol: &str) -> Option<&'static str> {
    let names = RUST_SHIMS.iter().map(|(_, n)| *n).chain([RUST_SYSTEM_ALLOCATOR]);
    for name in names {
        if symbol == name {
            return Some(name);
        }
        if let Some(head) = symbol.strip_prefix("_RNv").and_then(|s| s.strip_suffix(name)) {
            if head.strip_suffix('_').is_some_and(|h| h.ends_with(&format!("{}", name.len()))) {
                return Some(name);
            }
        }
    }
    None
}

/// The families `present` (entries the file defines) makes complete: at least one allocation
/// and one free of the family. Returns the entries of those families only.
pub fn complete(present: Vec<(Entry, FunctionSymbol)>) -> Vec<(Entry, FunctionSymbol)> {
    let complete_family = |f: Family| {
        if f == Family::Standard {
            // `malloc` and `free` themselves: libstdc++ defines `operator new` and `delete`,
            // which call libc's `malloc` (the allocator is the one defining `malloc`).
            let has = |k: AllocKind| present.iter().any(|(e, _)| e.family == f && e.kind == k);
            return has(AllocKind::Malloc) && has(AllocKind::Free);
        }
        let of = |frees: bool| present.iter().any(|(e, _)| e.family == f && e.kind.frees() == frees);
        of(true) && of(false)
    };
    let keep: Vec<Family> = present.iter().map(|(e, _)| e.family).filter(|f| complete_family(*f)).collect();
    present.into_iter().filter(|(e, _)| keep.contains(&e.family)).collect()
}

/// Every entry point of a recognized family that the file at `path` defines.
pub fn defined_in(path: &std::path::Path) -> Result<Vec<(Entry, FunctionSymbol)>, ElfError> {
    let entries = exact_entries();
    let names: Vec<&str> = entries.iter().map(|e| e.symbol.as_str()).collect();
    let symbols = elf_symbols::resolve(path, &names)?;
    Ok(complete(entries.into_iter().zip(symbols).filter_map(|(e, s)| s.map(|s| (e, s))).collect()))
}

/// Rust's allocator shims in the executable at `path`, when they are the way to see its
/// `#[global_allocator]`: `__rust_alloc` and `__rust_dealloc` defined and no `__rdl_alloc` (the system allocator, seen
/// through `malloc`). Names are given unmangled.
pub fn rust_shims_in(path: &std::path::Path) -> Result<Vec<(Entry, FunctionSymbol)>, ElfError> {
    let found = elf_symbols::find_functions(path, |n| rust_shim_name(n).is_some())?;
    let mut out = Vec::new();
    for mut f in found {
        let Some(name) = rust_shim_name(&f.name) else { continue };
        if name == RUST_SYSTEM_ALLOCATOR {
            return Ok(Vec::new());
        }
        let kind = RUST_SHIMS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k).expect("a shim name");
        if out.iter().any(|(e, _): &(Entry, FunctionSymbol)| e.symbol == name) {
            continue;
        }
        f.name = name.to_string();
        out.push((Entry { family: Family::RustShims, kind, symbol: name.to_string() }, f));
    }
    // The linker drops the shims a program never calls (`__rust_alloc_zeroed`, often): an
    // allocation and a free are enough.
    let has = |name: &str| out.iter().any(|(e, _)| e.symbol == name);
    if !has("__rust_alloc") || !has("__rust_dealloc") {
        return Ok(Vec::new());
    }
    // A global allocator over the system one (its `__rust_alloc` calls libc's `malloc`): rustc
    // inlines such an allocator into the crate's own code, which then calls `malloc` without
    // the shims, so `malloc` is what sees every allocation.
    let image = super::elf_symbols::CodeImage::open(path)?;
    let system = ["malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"];
    if out.iter().any(|(_, f)| super::forwarding::reaches_import(&image, f, &system)) {
        return Ok(Vec::new());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_shim_names_plain_and_v0_mangled() {
        assert_eq!(rust_shim_name("__rust_alloc"), Some("__rust_alloc"));
        assert_eq!(rust_shim_name("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc"), Some("__rust_alloc"));
        assert_eq!(rust_shim_name("_RNvCsfLfy6EI15iL_7___rustc19___rust_alloc_zeroed"), Some("__rust_alloc_zeroed"));
        assert_eq!(rust_shim_name("_RNvCsfLfy6EI15iL_7___rustc14___rust_realloc"), Some("__rust_realloc"));
        assert_eq!(rust_shim_name("_RNvCsfLfy6EI15iL_7___rustc11___rdl_alloc"), Some("__rdl_alloc"));
        assert_eq!(rust_shim_name("_RNvCsfLfy6EI15iL_7___rustc26___rust_alloc_error_handler"), None);
        assert_eq!(rust_shim_name("my__rust_alloc"), None);
    }

    #[test]
    fn every_exact_name_is_listed_once() {
        let entries = exact_entries();
        let mut names: Vec<&str> = entries.iter().map(|e| e.symbol.as_str()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        for s in ["_rjem_sdallocx", "je_mallocx", "sdallocx", "mi_malloc_aligned", "tc_delete_sized", "malloc"] {
            assert!(names.contains(&s), "{s}");
        }
    }

    /// This test binary links glibc dynamically: the C family is complete in libc, not here.
    #[test]
    fn a_family_needs_an_allocation_and_a_free() {
        let f = |name: &str| FunctionSymbol {
            name: name.into(),
            version: None,
            vaddr: 0x1000,
            size: 1,
            file_offset: 0,
            bytes: vec![],
        };
        let e = |family, kind, s: &str| (Entry { family, kind, symbol: s.into() }, f(s));
        let kept = complete(vec![
            e(Family::Standard, AllocKind::OperatorNew, "_Znwm"),
            e(Family::Standard, AllocKind::OperatorDelete, "_ZdlPv"),
            e(Family::Mimalloc, AllocKind::Malloc, "mi_malloc"),
            e(Family::Jemalloc("_rjem_"), AllocKind::Malloc, "_rjem_mallocx"),
            e(Family::Jemalloc("_rjem_"), AllocKind::Free, "_rjem_sdallocx"),
        ]);
        let names: Vec<&str> = kept.iter().map(|(e, _)| e.symbol.as_str()).collect();
        assert_eq!(names, ["_rjem_mallocx", "_rjem_sdallocx"]);
    }
}
