//! The Go runtime as an allocator family: recognizes a Go program by its build information
//! (`.go.buildinfo`, the version the toolchain wrote) and finds, in its symbol table, the
//! points of the runtime's own heap sampling that `profiler-ebpf`'s `go.rs` probes
//! (`runtime.mProf_Malloc`, `runtime.freeSpecial`), the sampling rate
//! (`runtime.MemProfileRate`) and the cgo stack switch (`runtime.asmcgocall.abi0`).
//!
//! Go allocates from its own heap, never through `malloc`: memscope sees it only through the
//! runtime's sampling (one allocation per `MemProfileRate` bytes on average, 512 KiB by
//! default), each sample weighed as the runtime's own heap profile weighs it. A cgo program
//! is traced at libc's `malloc` too (its C allocations).
//!
//! Only the runtime layouts memscope validated are traced (the probed functions' register
//! arguments, `special.kind`, `g`'s fields, asmcgocall's frame): Go 1.19. Any other version is
//! refused with its name, never traced with a layout that may be wrong. A program that never
//! links `runtime.MemProfile` has the runtime's sampling switched off by the linker
//! (`MemProfileRate` 0): its Go heap cannot be seen, and memscope says so.
use std::{fs::File, sync::Arc};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use profiler_common::GoTarget;

use super::elf_symbols::{self, ElfError, FunctionSymbol};
use crate::{
    procfs::{self, ProcError},
    target_fs::TargetFile,
};

/// Go versions whose runtime layout memscope validated, as prefixes of the version the
/// toolchain writes (`go1.19.8`).
pub const SUPPORTED: &[&str] = &["go1.19"];

/// Go 1.19's layout (runtime/runtime2.go, mheap.go, asm_amd64.s).
const GO_1_19: GoTarget = GoTarget {
    rate_addr: 0,
    cgocall_start: 0,
    cgocall_end: 0,
    // g.stack = {lo, hi} first; g.sched (a gobuf: sp, pc, g, ctxt, ret, lr, bp) at 56.
    g_stack_hi: 8,
    g_sched_sp: 56,
    g_sched_bp: 56 + 48,
    // special: next *special, offset uint16, kind byte.
    special_kind: 10,
    special_profile: 2,
    _pad: 0,
};

const MALLOC: &str = "runtime.mProf_Malloc";
const FREE: &str = "runtime.freeSpecial";
const CGO_SWITCH: &str = "runtime.asmcgocall.abi0";
const RATE: &str = "runtime.MemProfileRate";
/// Defined by runtime/cgo in every cgo program.
const CGO_MARK: &str = "x_cgo_init";

/// A Go program's runtime, ready to be probed.
#[derive(Clone, Debug)]
pub struct GoRuntime {
    /// As the toolchain wrote it (`go1.19.8`).
    pub version: String,
    /// The executable, as the target sees it, and opened in its root.
    pub path_in_target: String,
    pub host_path: TargetFile,
    /// `runtime.mProf_Malloc` and `runtime.freeSpecial`.
    pub malloc: FunctionSymbol,
    pub free: FunctionSymbol,
    /// The probes' settings, addresses in the target's address space.
    pub config: GoTarget,
    /// `runtime.MemProfileRate` when memscope attached.
    pub rate: i64,
    /// Built with cgo: its C code allocates through libc.
    pub cgo: bool,
}

impl GoRuntime {
    /// The line reports carry: how the Go heap is seen.
    pub fn statement(&self) -> String {
        statement(&self.version, self.rate)
    }
}

/// How the Go heap of a program of `version` sampling at `rate` is seen, in words.
pub fn statement(version: &str, rate: i64) -> String {
    if rate <= 0 {
        format!(
            "Go runtime heap ({version}): not seen: the runtime's allocation sampling is off (MemProfileRate 0: the program never links runtime.MemProfile, so the linker disabled it)"
        )
    } else {
        format!("Go runtime heap ({version}): traced through the runtime's sampling (MemProfileRate {rate})")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error(
        "process {pid} is a Go program built with {version}; memscope traces the Go heap only on runtimes whose layout it validated ({}), and refuses others rather than give a wrong profile",
        SUPPORTED.join(", ")
    )]
    UnsupportedVersion { pid: u32, version: String },
    #[error("process {pid} is a Go program ({version}) but {path} lacks {missing} in its symbol table (built with -ldflags=-s?): memscope cannot find the runtime's sampling points")]
    MissingSymbols {
        pid: u32,
        version: String,
        path: String,
        missing: String,
    },
    #[error("process {pid}: {path} is not mapped where its symbols say (Go program {version})")]
    NotMapped {
        pid: u32,
        version: String,
        path: String,
    },
    #[error("process {pid} (Go program {version}): reading runtime.MemProfileRate: {source}")]
    ReadRate {
        pid: u32,
        version: String,
        source: std::io::Error,
    },
    #[error("process {pid} is a Go program ({version}) whose runtime samples no allocation (runtime.MemProfileRate is 0: it never links runtime.MemProfile, so the linker switched the sampling off); memscope sees the Go heap only through that sampling and has nothing else to trace")]
    ProfilingOff { pid: u32, version: String },
}

/// The Go version in an executable's `.go.buildinfo`: `Some(None)` for a Go program whose
/// build information does not hold it inline (before Go 1.18), `None` for no Go program.
/// Reads the section headers and at most [`BUILDINFO_READ`] bytes of the section: a hostile
/// file cannot make it read more.
pub fn version_in<'d, R: object::ReadRef<'d>>(data: R) -> Option<Option<String>> {
    let file = object::File::parse(data).ok()?;
    let section = file.section_by_name(".go.buildinfo")?;
    let (offset, size) = section.file_range()?;
    let info = data.read_bytes_at(offset, size.min(BUILDINFO_READ)).ok()?;
    // 14 bytes of magic, the pointer size, the flags (2: version and module info inline).
    if info.len() < 32 || &info[..14] != b"\xff Go buildinf:" {
        return None;
    }
    if info[15] & 2 == 0 {
        return Some(None);
    }
    let mut at = 32;
    let mut len: u64 = 0;
    for shift in (0..63).step_by(7) {
        let b = *info.get(at)?;
        at += 1;
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let bytes = info.get(at..at.checked_add(usize::try_from(len).ok()?)?)?;
    Some(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// The most of `.go.buildinfo` read: its header and the version string (a few dozen bytes).
const BUILDINFO_READ: u64 = 4096;

/// Whether memscope traces the heap of a Go program of `version`.
pub fn supported(version: &str) -> bool {
    SUPPORTED.iter().any(|p| {
        version == *p
            || version
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The Go runtime of process `pid`, if its executable is a Go program: `Ok(None)` when it is
/// not, an error naming the version when memscope does not trace that runtime or cannot find
/// its points.
pub fn detect(pid: u32) -> Result<Option<GoRuntime>, GoError> {
    let objects = procfs::objects(pid)?;
    let Some(exe) = objects.first() else {
        return Ok(None);
    };
    // Read on demand (headers, one section, the symbol table), not the whole file: every
    // process memscope attaches to is asked this first.
    let data = object::ReadCache::new(exe.host_path.file());
    let version = match version_in(&data) {
        None => return Ok(None),
        Some(None) => "a Go release before go1.18".to_string(),
        Some(Some(v)) => v,
    };
    if !supported(&version) {
        return Err(GoError::UnsupportedVersion { pid, version });
    }
    let mut rate_vaddr = None;
    let mut cgo = false;
    if let Ok(file) = object::File::parse(&data) {
        for s in file.symbols() {
            match s.name() {
                Ok(RATE) => rate_vaddr = Some(s.address()),
                Ok(CGO_MARK) => cgo = true,
                _ => {}
            }
        }
    }
    drop(data);
    let found = elf_symbols::resolve(&exe.host_path, &[MALLOC, FREE, CGO_SWITCH])?;
    let [malloc, free, switch]: [Option<FunctionSymbol>; 3] =
        found.try_into().expect("three names");
    let missing: Vec<&str> = [
        (MALLOC, malloc.is_some()),
        (FREE, free.is_some()),
        (RATE, rate_vaddr.is_some()),
    ]
    .into_iter()
    .filter(|(_, found)| !found)
    .map(|(n, _)| n)
    .collect();
    let (Some(malloc), Some(free), Some(rate_vaddr)) = (malloc, free, rate_vaddr) else {
        return Err(GoError::MissingSymbols {
            pid,
            version,
            path: exe.path.clone(),
            missing: missing.join(", "),
        });
    };
    // The load bias (0 for the default non-PIE build): where the probed code is mapped.
    let maps = procfs::maps(pid)?;
    let not_mapped = || GoError::NotMapped {
        pid,
        version: version.clone(),
        path: exe.path.clone(),
    };
    let at = procfs::address_of(&maps, &exe.path, malloc.file_offset, 1).ok_or_else(not_mapped)?;
    let bias = at.wrapping_sub(malloc.vaddr);
    let mut config = GO_1_19;
    config.rate_addr = rate_vaddr.wrapping_add(bias);
    if let Some(s) = switch.filter(|s| s.size > 0) {
        config.cgocall_start = s.vaddr.wrapping_add(bias);
        config.cgocall_end = config.cgocall_start + s.size;
    }
    let rate = read_rate(pid, config.rate_addr).map_err(|source| GoError::ReadRate {
        pid,
        version: version.clone(),
        source,
    })?;
    Ok(Some(GoRuntime {
        version,
        path_in_target: exe.path.clone(),
        host_path: exe.host_path.clone(),
        malloc,
        free,
        config,
        rate,
        cgo,
    }))
}

/// `runtime.MemProfileRate` (an `int`) at `addr` of the target.
fn read_rate(pid: u32, addr: u64) -> std::io::Result<i64> {
    let mem = Arc::new(File::open(format!("/proc/{pid}/mem"))?);
    let b = crate::target_mem::read_at(&mem, addr, 8)?;
    Ok(i64::from_le_bytes(b.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_versions_are_prefixes_at_a_dot() {
        assert!(supported("go1.19"));
        assert!(supported("go1.19.8"));
        assert!(!supported("go1.190"));
        assert!(!supported("go1.22.1"));
        assert!(!supported("devel go1.23-abcdef"));
    }

    #[test]
    fn statement_says_how_the_heap_is_seen() {
        assert_eq!(
            statement("go1.19.8", 524288),
            "Go runtime heap (go1.19.8): traced through the runtime's sampling (MemProfileRate 524288)"
        );
        assert!(statement("go1.19.8", 0).contains("not seen"));
    }

    /// Not a Go program: no build information, no version.
    #[test]
    fn this_test_binary_is_not_go() {
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(version_in(&data[..]), None);
    }
}
