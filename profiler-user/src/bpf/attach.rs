//! Decides which allocator a target really uses (by the families of [`super::families`] each
//! mapped object defines) and attaches the probes to it: on every allocation function and
//! every free it defines, each at the site chosen by
//! [`super::probe_site`]. With uprobe.session (see [`super::session_link`]) they go into three
//! links (`malloc`, the other allocation functions, `free`); otherwise each allocation function
//! gets a uprobe and a uretprobe, `free` a uprobe.
use std::num::NonZeroU32;

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        ProgramError, UProbe,
    },
    Ebpf,
};
use profiler_common::{encode_cookie, AllocKind};
use tracing::{debug, info};

use super::{
    elf_symbols::FunctionSymbol,
    families, forwarding,
    load::Probes,
    probe_site::{self, ProbeRole, ProbeSite},
    session_link::{SessionLink, SessionLinkError, SessionProbe},
};
use crate::{
    procfs::{self, ProcError},
    target_fs::TargetFile,
};

/// The library (or executable) whose `malloc` and `free` the target calls.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// Path as the target sees it (inside its container, if any).
    pub path_in_target: String,
    /// The file, opened inside the target's root (see [`crate::target_fs`]); derefs to a
    /// `/proc/self/fd/N` path that reopens exactly it.
    pub host_path: TargetFile,
    /// The allocation functions it defines: at least one allocation and one free, each with
    /// its argument layout.
    pub functions: Vec<(AllocKind, FunctionSymbol)>,
    /// The recognized families these belong to (see [`families::Family::name`]).
    pub families: Vec<String>,
}

/// Where each probe went, for logs and `--verbose` output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeSiteReport {
    /// The symbol (C++ operators mangled).
    pub function: String,
    pub offset: u64,
    pub emulated: bool,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("process {pid} has no recognizable allocator: none of its mapped objects defines an allocation and a free of a known allocator (C malloc/free, jemalloc with or without a je_/_rjem_ prefix, mimalloc, tcmalloc) and its executable defines no Rust allocator shims (searched {searched})")]
    NoAllocator { pid: u32, searched: String },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot load eBPF program {name}: {source}")]
    LoadProgram { name: &'static str, source: Box<ProgramError> },
    #[error("cannot attach to {function} in {path}: {source}{hint}")]
    Attach { function: String, path: String, source: Box<ProgramError>, hint: &'static str },
    #[error(transparent)]
    Session(#[from] SessionLinkError),
}

const EINVAL_HINT: &str = " (the kernel said EINVAL: another tracer, e.g. bcc's memleak, may hold a uprobe with a reference counter at this place; stop it and retry)";

/// Finds the object defining the allocator the target uses. Symbol interposition resolves
/// `malloc` to the first definition in load order: the executable, then preloaded and linked
/// libraries, libc last; `/proc/PID/maps` is in address order, so libc is tried last explicitly.
///
/// The first object defining a complete family of [`families`] is the allocator, with every
/// complete family it defines: an executable that links its allocator statically (Rust with
/// `tikv-jemallocator` or `mimalloc`, a static glibc or musl) is probed, not libc's unused
/// `malloc`. An executable defining Rust's allocator shims for a `#[global_allocator]` none of
/// the families recognizes is probed at the shims.
pub fn find_allocator(pid: u32) -> Result<Allocator, AttachError> {
    let found = find_allocator_in(pid);
    // A process that exited meanwhile (a zombie's maps read empty; its files cannot be opened)
    // has no allocator to find: it is gone, not refused.
    match found {
        Err(AttachError::NoAllocator { .. }) if !procfs::running(pid) => Err(ProcError::NoSuchProcess(pid).into()),
        other => other,
    }
}

fn find_allocator_in(pid: u32) -> Result<Allocator, AttachError> {
    let mut candidates = procfs::objects(pid)?;
    let is_libc = |o: &procfs::MappedObject| {
        let base = o.path.rsplit('/').next().unwrap_or(&o.path);
        base.starts_with("libc.so") || base.starts_with("libc-")
    };
    // Stable: the executable stays first.
    candidates.sort_by_key(is_libc);
    for (i, procfs::MappedObject { path, host_path }) in candidates.iter().enumerate() {
        let mut found = match families::defined_in(host_path) {
            Ok(s) => s,
            Err(e) => {
                debug!("skipping {path}: {e}");
                continue;
            }
        };
        if found.is_empty() && i == 0 {
            // The executable (objects() lists it first).
            found = families::rust_shims_in(host_path).unwrap_or_else(|e| {
                debug!("no Rust allocator shims in {path}: {e}");
                Vec::new()
            });
        }
        if found.is_empty() {
            continue;
        }
        let mut names: Vec<String> = Vec::new();
        for (e, _) in &found {
            let name = e.family.name();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let functions = found.into_iter().map(|(e, s)| (e.kind, s)).collect();
        let functions = forwarding::without_forwarders(host_path, functions);
        info!(pid, allocator = %path, families = ?names, "allocator found");
        return Ok(Allocator { path_in_target: path.clone(), host_path: host_path.clone(), functions, families: names });
    }
    let searched: Vec<&str> = candidates.iter().map(|o| o.path.as_str()).collect();
    Err(AttachError::NoAllocator { pid, searched: searched.join(", ") })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, AttachError> {
    let prog: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(AttachError::MissingProgram(name))?
        .try_into()
        .map_err(|source| AttachError::LoadProgram { name, source: Box::new(source) })?;
    if prog.fd().is_err() {
        prog.load().map_err(|source| AttachError::LoadProgram { name, source: Box::new(source) })?;
    }
    Ok(prog)
}

/// A probe attachment of one target; dropping it detaches the probe.
pub enum Link {
    /// A uprobe_multi link (uprobe.session): all probes of one program in one file.
    Session(SessionLink),
    /// One classic uprobe or uretprobe.
    Uprobe(UProbeLink),
}

/// Attaches every probe for `pid`, target `target` of `probes` (its cookies carry the id).
pub fn attach(probes: &Probes, target: u64, pid: u32, alloc: &Allocator) -> Result<(Vec<ProbeSiteReport>, Vec<Link>), AttachError> {
    let mut links = Vec::new();
    let mut report = Vec::new();
    let mut sites = Vec::new();
    for (kind, sym) in &alloc.functions {
        // Aliases (glibc's aligned_alloc is memalign) get one set of probes.
        if sites.iter().any(|(_, s): &(AllocKind, &FunctionSymbol)| s.vaddr == sym.vaddr) {
            continue;
        }
        sites.push((*kind, sym));
    }
    let (mut malloc_probes, mut alloc_probes, mut free_probes) = (Vec::new(), Vec::new(), Vec::new());
    for (kind, sym) in sites {
        let role = match kind {
            k if k.frees() => ProbeRole::FreeEntry,
            AllocKind::RustRealloc => ProbeRole::AllocEntry { arg_regs: 4 },
            _ => ProbeRole::AllocEntry { arg_regs: 3 },
        };
        let mut site = probe_site::choose(&sym.bytes, sym.vaddr, role);
        debug!("{}: probe at +{:#x}, rsp delta {}: {}", sym.name, site.offset, site.rsp_delta, site.reason);
        if probes.session.is_some() {
            if !kind.frees() && site.rsp_delta != 0 {
                // The session's return swaps the return address at [rsp]: only before rsp moves.
                // +0 was not chosen, so it is not emulated.
                site = ProbeSite {
                    offset: 0,
                    rsp_delta: 0,
                    emulated: false,
                    reason: format!("probe at +0: the return probe needs rsp unmoved ({})", site.reason),
                };
            }
            let list = match kind {
                AllocKind::Malloc => &mut malloc_probes,
                k if k.frees() => &mut free_probes,
                _ => &mut alloc_probes,
            };
            list.push(SessionProbe { file_offset: sym.file_offset + site.offset, cookie: encode_cookie(kind, target) });
        } else {
            let mut ebpf = probes.ebpf.lock().unwrap();
            links.extend(attach_classic(&mut ebpf, pid, alloc, kind, target, sym, &site)?);
        }
        if !site.emulated {
            info!("{}: probe at +{:#x} is single-stepped (slow): {}", sym.name, site.offset, site.reason);
        }
        report.push(ProbeSiteReport {
            function: sym.name.clone(),
            offset: site.offset,
            emulated: site.emulated,
            reason: site.reason,
        });
    }
    if let Some(programs) = &probes.session {
        let per_program = [(&programs.malloc, &malloc_probes), (&programs.alloc, &alloc_probes), (&programs.free, &free_probes)];
        for (program, list) in per_program {
            if list.is_empty() {
                continue;
            }
            links.push(Link::Session(program.attach(&alloc.host_path, list, pid)?));
        }
    }
    Ok((report, links))
}

/// A uprobe (and for allocation functions a uretprobe) on one function.
fn attach_classic(
    ebpf: &mut Ebpf,
    pid: u32,
    alloc: &Allocator,
    kind: AllocKind,
    target: u64,
    sym: &FunctionSymbol,
    site: &ProbeSite,
) -> Result<Vec<Link>, AttachError> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid 0 is never traced"));
    let at = |offset: u64| UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(sym.file_offset + offset),
        cookie: Some(encode_cookie(kind, target)),
    };
    let attach_err = |source: ProgramError| {
        let text = format!("{source:?}");
        let hint = if text.contains("EINVAL") || text.contains("os error 22") { EINVAL_HINT } else { "" };
        AttachError::Attach { function: sym.name.clone(), path: alloc.path_in_target.clone(), source: Box::new(source), hint }
    };
    let mut one = |name: &'static str, offset: u64| -> Result<Link, AttachError> {
        let prog = program(ebpf, name)?;
        let id = prog.attach(at(offset), &alloc.host_path, scope).map_err(attach_err)?;
        Ok(Link::Uprobe(prog.take_link(id).map_err(attach_err)?))
    };
    if kind.frees() {
        return Ok(vec![one("free_entry", site.offset)?]);
    }
    let entry = one("alloc_entry", site.offset)?;
    // A uretprobe is an entry probe that swaps the return address at [rsp]: it can sit at the
    // chosen (cheap) site as long as rsp has not moved there.
    let ret_offset = if site.rsp_delta == 0 { site.offset } else { 0 };
    Ok(vec![entry, one("alloc_return", ret_offset)?])
}

/// Where a snapshot trigger fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerPoint {
    /// When the function at the offset returns (uretprobe).
    Return,
    /// When execution reaches the offset (uprobe: a function entry or a USDT site).
    Entry,
}

/// Attaches a trigger probe counting into `TRIGGER_HITS[slot]`.
pub fn attach_trigger(
    ebpf: &mut Ebpf,
    pid: u32,
    host_path: &TargetFile,
    file_offset: u64,
    point: TriggerPoint,
    slot: u32,
) -> Result<Link, AttachError> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid 0 is never traced"));
    let name = match point {
        TriggerPoint::Return => "trigger_return",
        TriggerPoint::Entry => "trigger_entry",
    };
    let at = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(file_offset),
        cookie: Some(u64::from(slot)),
    };
    let err = |source| AttachError::Attach {
        function: name.to_string(),
        path: host_path.shown().to_string(),
        source: Box::new(source),
        hint: "",
    };
    let prog = program(ebpf, name)?;
    let id = prog.attach(at, host_path.path(), scope).map_err(err)?;
    Ok(Link::Uprobe(prog.take_link(id).map_err(err)?))
}
