//! Finds the function of `--on-return SYMBOL` in a running target: in its executable first,
//! then in every mapped executable file (shared libraries) in address order; the first object
//! that defines a match wins (the executable's definition shadows a library's, as symbol
//! interposition does).
//!
//! A symbol matches when the query is
//! - the raw (mangled) name, e.g. `_ZN2ns5Cache8gc_cycleEv` or `gc_cycle` for C;
//! - the demangled name, e.g. `ns::Cache::gc_cycle()`, or Rust's `app::gc::collect` (Rust
//!   legacy names also match with their `::h<hash>` suffix);
//! - the demangled name without its parameter list (and return type), e.g.
//!   `ns::Cache::gc_cycle`, which matches every overload: each gets a probe.
//!
//! Spaces in the query are not normalized: write them as the demangler prints them
//! (`foo(int, char const*)`). Libraries loaded after the trigger was attached are not searched.
//!
//! What a search keeps of a file's symbols is charged to the target's memory budget while it
//! runs (see [`elf_symbols::find_functions_charged`]); a refusal ends it ([`ResolveError::Budget`]).
use tracing::debug;

use crate::{
    bpf::elf_symbols::{self, FunctionSymbol},
    procfs::{self, ProcError},
};

/// More matching functions than this is an error: the query is too vague.
pub const MAX_MATCHES: usize = 16;

/// A function found in the target.
#[derive(Clone, Debug)]
pub struct ResolvedFunction {
    /// The file as the target sees it.
    pub path_in_target: String,
    pub symbol: FunctionSymbol,
    /// The demangled name, when the symbol is mangled.
    pub demangled: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("no function {query:?} in process {pid} (searched {searched}); give the name as `nm` or `nm -C` prints it")]
    NotFound { pid: u32, query: String, searched: String },
    #[error("{0}")]
    Budget(elf_symbols::ElfError),
    #[error("{count} functions match {query:?} in {path} (e.g. {examples}); give the full signature or the mangled name")]
    Ambiguous { query: String, path: String, count: usize, examples: String },
}

/// Every function matching `query` in the first object of the target that defines one.
pub fn find_function(pid: u32, query: &str) -> Result<Vec<ResolvedFunction>, ResolveError> {
    let mut searched = Vec::new();
    let account = crate::budget::Account::for_pid(pid);
    for procfs::MappedObject { path, host_path } in procfs::objects(pid)? {
        let mut charge = account.reservation(crate::budget::Use::Symbols);
        let found = match elf_symbols::find_functions_charged(&host_path, |raw| symbol_matches(query, raw), &mut charge) {
            Ok(f) => f,
            Err(e @ elf_symbols::ElfError::Budget { .. }) => {
                account.note_not_loaded(crate::budget::Use::Symbols, format!("the function search for {query:?} in {path}"));
                return Err(ResolveError::Budget(e));
            }
            Err(e) => {
                debug!("symbol search skips {path}: {e}");
                searched.push(path);
                continue;
            }
        };
        if found.is_empty() {
            searched.push(path);
            continue;
        }
        if found.len() > MAX_MATCHES {
            let examples: Vec<String> =
                found.iter().take(3).map(|f| demangle(&f.name).unwrap_or_else(|| f.name.clone())).collect();
            return Err(ResolveError::Ambiguous {
                query: query.into(),
                path,
                count: found.len(),
                examples: examples.join(", "),
            });
        }
        return Ok(found
            .into_iter()
            .map(|symbol| ResolvedFunction { path_in_target: path.clone(), demangled: demangle(&symbol.name), symbol })
            .collect());
    }
    Err(ResolveError::NotFound { pid, query: query.into(), searched: searched.join(", ") })
}

/// The demangled name of a mangled C++ (`_Z...`) or Rust (`_ZN...h<hash>E`, `_R...`) symbol,
/// in full (Rust legacy names without their hash); `None` for names that are not mangled.
pub fn demangle(raw: &str) -> Option<String> {
    if let Ok(d) = rustc_demangle::try_demangle(raw) {
        if raw.starts_with("_R") || is_rust_legacy(raw) {
            return Some(format!("{d:#}"));
        }
    }
    if raw.starts_with("_Z") {
        if let Ok(sym) = cpp_demangle::Symbol::new(raw.as_bytes()) {
            return sym.demangle().ok();
        }
    }
    None
}

/// Rust's legacy mangling: a C++-like nested name ending in a `17h<16 hex digits>E` element.
fn is_rust_legacy(raw: &str) -> bool {
    let core = raw.split('.').next().unwrap_or(raw);
    core.starts_with("_ZN")
        && core.len() > 20
        && core.ends_with('E')
        && core[core.len() - 20..].starts_with("17h")
        && core[core.len() - 17..core.len() - 1].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every name the query may use for `raw`: the raw name, and for mangled names the demangled
/// forms (full; without hash for Rust; without parameters and return type for C++).
pub fn names_of(raw: &str) -> Vec<String> {
    let mut names = vec![raw.to_string()];
    if raw.starts_with("_R") || is_rust_legacy(raw) {
        if let Ok(d) = rustc_demangle::try_demangle(raw) {
            names.push(format!("{d:#}"));
            names.push(format!("{d}"));
            return names;
        }
    }
    if raw.starts_with("_Z") {
        if let Ok(sym) = cpp_demangle::Symbol::new(raw.as_bytes()) {
            if let Ok(full) = sym.demangle() {
                names.push(full);
            }
            let short = cpp_demangle::DemangleOptions::new().no_params().no_return_type();
            if let Ok(s) = sym.demangle_with_options(&short) {
                names.push(s);
            }
        }
    }
    names
}

/// Whether `query` names the symbol `raw` (see the module doc).
pub fn symbol_matches(query: &str, raw: &str) -> bool {
    if query == raw {
        return true;
    }
    if !(raw.starts_with("_Z") || raw.starts_with("_R")) {
        return false;
    }
    // Cheap filter before demangling: the last path element of the query (without parameters
    // or template arguments) must appear in the mangled name.
    let stem = query.split(['(', '<']).next().unwrap_or(query);
    let last = stem.rsplit("::").next().unwrap_or(stem).trim();
    if !last.is_empty() && !raw.contains(last) {
        return false;
    }
    names_of(raw).iter().any(|n| n == query)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C names match only exactly; C++ names by mangled, demangled, and parameterless forms;
    /// Rust legacy names with and without their hash; near misses do not match.
    #[test]
    fn matches_mangled_and_demangled_names() {
        assert!(symbol_matches("gc_cycle", "gc_cycle"));
        assert!(!symbol_matches("gc_cycle", "gc_cycle2"));
        assert!(!symbol_matches("gc", "gc_cycle"));

        let cxx = "_ZN2ns5Cache8gc_cycleEi";
        assert!(symbol_matches(cxx, cxx));
        assert!(symbol_matches("ns::Cache::gc_cycle(int)", cxx));
        assert!(symbol_matches("ns::Cache::gc_cycle", cxx));
        assert!(!symbol_matches("ns::Cache::gc_cycle(long)", cxx));
        assert!(!symbol_matches("Cache::gc_cycle", cxx));
        assert_eq!(demangle(cxx).as_deref(), Some("ns::Cache::gc_cycle(int)"));
        // A const method and a template: parameterless form drops the parameters only.
        assert!(symbol_matches("ns::Cache::size", "_ZNK2ns5Cache4sizeEv"));
        assert!(symbol_matches("ns::Cache::size() const", "_ZNK2ns5Cache4sizeEv"));
        assert!(symbol_matches("ns::run<int>", "_ZN2ns3runIiEEvT_"));

        let rust = "_ZN4core3ptr13drop_in_place17h0123456789abcdefE";
        assert!(is_rust_legacy(rust) && !is_rust_legacy(cxx));
        assert!(symbol_matches("core::ptr::drop_in_place", rust));
        assert!(symbol_matches("core::ptr::drop_in_place::h0123456789abcdef", rust));
        assert!(!symbol_matches("core::ptr::drop_in", rust));
        assert_eq!(demangle(rust).as_deref(), Some("core::ptr::drop_in_place"));
        assert_eq!(demangle("malloc"), None);
    }

    #[inline(never)]
    fn a_function_to_find(x: u64) -> u64 {
        std::hint::black_box(x.wrapping_mul(3))
    }

    /// The test binary (a running process) is searched through /proc: a Rust function of it
    /// is found by its demangled path, a libc function in a mapped library, and an unknown
    /// name gives an error that lists what was searched.
    #[test]
    fn finds_functions_in_a_running_process() {
        assert_eq!(a_function_to_find(2), 6);
        let me = std::process::id();
        let found =
            find_function(me, "profiler_user::trigger::resolve::tests::a_function_to_find").unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path_in_target, procfs::exe(me).unwrap());
        assert_eq!(found[0].demangled.as_deref(), Some("profiler_user::trigger::resolve::tests::a_function_to_find"));

        let libc = find_function(me, "nanosleep").unwrap();
        assert!(libc[0].path_in_target.contains("libc"), "{libc:?}");

        let err = find_function(me, "no_such_function_anywhere").unwrap_err();
        assert!(matches!(err, ResolveError::NotFound { .. }));
        assert!(err.to_string().contains("libc"), "{err}");
    }
}
