//! Decides which allocator a target really uses (by the families of [`super::families`] each
//! mapped object defines) and attaches the probes to it: on every allocation function and
//! every free it defines, each at the site chosen by
//! [`super::probe_site`]. With uprobe.session (see [`super::session_link`]) they go into three
//! links (`malloc`, the other allocation functions, `free`); otherwise each allocation function
//! gets a uprobe and a uretprobe, `free` a uprobe. A Go program's own heap gets two more
//! uprobes on its runtime's sampling (see [`super::go_runtime`]), beside libc's `malloc` for
//! its C code when it uses cgo.
use std::num::NonZeroU32;

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        ProgramError, UProbe,
    },
    Ebpf,
};
use profiler_common::{encode_cookie, target_slot, usdt_cookie, AllocKind, USDT_SPECS_PER_TARGET};
use tracing::{debug, info};

use super::{
    contract,
    elf_symbols::{ElfError, FunctionSymbol},
    families, forwarding,
    go_runtime::{self, GoError, GoRuntime},
    stripped::{self, NamedEntries},
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
    /// The recognized families these belong to (see [`families::Family::name`]), and how a
    /// Go program's heap is seen ([`GoRuntime::statement`]).
    pub families: Vec<String>,
    /// A Go program's runtime, probed at its sampling points (`functions` may then be empty:
    /// a program built without cgo has no C allocator).
    pub go: Option<GoRuntime>,
}

impl Allocator {
    /// How the Go heap is seen, when the target is a Go program.
    pub fn runtime_heap(&self) -> Option<&str> {
        self.families.iter().find(|f| f.starts_with("Go runtime heap")).map(String::as_str)
    }
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
    #[error("process {pid}'s executable {exe} is stripped (no symbol table) and memscope found no allocator it uses: install its debug file at {debug_file} inside the process's root (objcopy --only-keep-debug; found by build id), or name the allocator's entry points by address with --alloc-symbol malloc=0xADDR,free=0xADDR (addresses as nm prints them in an unstripped build)")]
    Stripped { pid: u32, exe: String, debug_file: String },
    #[error(transparent)]
    Named(#[from] super::stripped::NamedError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot load eBPF program {name}: {source}")]
    LoadProgram { name: &'static str, source: Box<ProgramError> },
    #[error("cannot attach to {function} in {path}: {source}{hint}")]
    Attach { function: String, path: String, source: Box<ProgramError>, hint: &'static str },
    #[error(transparent)]
    Session(#[from] SessionLinkError),
    #[error("cannot trace the USDT heap-sampling contract of process {pid}: {reason}")]
    Contract { pid: u32, reason: String },
    #[error(transparent)]
    Go(#[from] GoError),
    #[error("eBPF map GO_TARGETS: {0}")]
    GoMap(#[from] aya::maps::MapError),
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
///
/// A Go program (see [`go_runtime`]) is traced through its runtime's sampling, and at the C
/// allocator too when it has one (cgo); a Go version memscope did not validate is refused.
pub fn find_allocator(pid: u32) -> Result<Allocator, AttachError> {
    find_allocator_named(pid, &NamedEntries::default())
}

/// [`find_allocator`], or with `named` entry points (`--alloc-symbol`) the executable at those
/// addresses. A stripped executable's allocator is also looked for through its debug file
/// (see [`super::stripped`]).
pub fn find_allocator_named(pid: u32, named: &NamedEntries) -> Result<Allocator, AttachError> {
    let found = find_any_allocator(pid, named);
    // A process that exited meanwhile (a zombie's maps read empty; its files cannot be opened)
    // has no allocator to find: it is gone, not refused. So is one whose maps read empty
    // before it is a zombie (its memory is released first: a backend closing its connection).
    let exiting = || !procfs::running(pid) || procfs::maps(pid).map_or(true, |m| m.is_empty());
    match found {
        Err(AttachError::NoAllocator { .. }) if exiting() => Err(ProcError::NoSuchProcess(pid).into()),
        other => other,
    }
}

/// The Go runtime's sampling and the C allocator (see [`find_allocator_named`]).
fn find_any_allocator(pid: u32, named: &NamedEntries) -> Result<Allocator, AttachError> {
    let go = go_runtime::detect(pid)?;
    let c = find_c_allocator(pid, named);
    let Some(go) = go else { return c };
    let statement = go.statement();
    info!(pid, version = %go.version, rate = go.rate, cgo = go.cgo, "Go program");
    let traced = go.rate > 0;
    match c {
        Ok(mut alloc) => {
            alloc.families.push(statement);
            alloc.go = traced.then_some(go);
            Ok(alloc)
        }
        Err(AttachError::NoAllocator { .. }) if traced => Ok(Allocator {
            path_in_target: go.path_in_target.clone(),
            host_path: go.host_path.clone(),
            functions: Vec::new(),
            families: vec![statement],
            go: Some(go),
        }),
        Err(AttachError::NoAllocator { .. }) => Err(GoError::ProfilingOff { pid, version: go.version }.into()),
        Err(e) => Err(e),
    }
}

/// The C allocator (see [`find_allocator_named`]).
fn find_c_allocator(pid: u32, named: &NamedEntries) -> Result<Allocator, AttachError> {
    let mut candidates = procfs::objects(pid)?;
    if !named.is_empty() {
        let exe = candidates.first().ok_or(AttachError::NoAllocator { pid, searched: String::new() })?;
        let found = named.resolve(&exe.host_path, &exe.path)?;
        let functions = found.into_iter().map(|(e, s)| (e.kind, s)).collect();
        info!(pid, allocator = %exe.path, "allocator named by address (--alloc-symbol)");
        return Ok(Allocator {
            path_in_target: exe.path.clone(),
            host_path: exe.host_path.clone(),
            functions,
            families: vec!["named by address (--alloc-symbol)".into()],
            go: None,
        });
    }
    let is_libc = |o: &procfs::MappedObject| {
        let base = o.path.rsplit('/').next().unwrap_or(&o.path);
        base.starts_with("libc.so") || base.starts_with("libc-")
    };
    // Stable: the executable stays first.
    candidates.sort_by_key(is_libc);
    for (i, procfs::MappedObject { path, host_path }) in candidates.iter().enumerate() {
        let mut found = match families::defined_in(host_path) {
            Ok(s) => s,
            // A stripped executable: its debug file may name its allocator.
            Err(ElfError::NoSymbols { .. }) if i == 0 => stripped::from_debug_file(pid, host_path),
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
        return Ok(Allocator {
            path_in_target: path.clone(),
            host_path: host_path.clone(),
            functions,
            families: names,
            go: None,
        });
    }
    if let Some(exe) = candidates.iter().find(|o| !is_libc(o)).filter(|o| stripped::is_stripped(&o.host_path)) {
        let id = stripped::build_id(&exe.host_path);
        let debug_file = id.as_deref().and_then(stripped::debug_file_path).unwrap_or_else(|| {
            "/usr/lib/debug/.build-id/xx/yyyy.debug (the executable has no build id: only --alloc-symbol can help)".into()
        });
        return Err(AttachError::Stripped { pid, exe: exe.path.clone(), debug_file });
    }
    let searched: Vec<&str> = candidates.iter().map(|o| o.path.as_str()).collect();
    Err(AttachError::NoAllocator { pid, searched: searched.join(", ") })
}

impl Allocator {
    /// Probed at Rust's allocator shims only (the fallback for an unrecognized
    /// `#[global_allocator]`).
    pub fn shims_only(&self) -> bool {
        self.families == [families::Family::RustShims.name()]
    }
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
pub fn attach(
    probes: &Probes,
    target: u64,
    pid: u32,
    alloc: &Allocator,
    classic: bool,
) -> Result<(Vec<ProbeSiteReport>, Vec<Link>), AttachError> {
    let session = probes.session.as_ref().filter(|_| !classic);
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
        if session.is_some() {
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
            list.push(SessionProbe {
                file_offset: sym.file_offset + site.offset,
                cookie: encode_cookie(kind, target),
                ref_ctr_offset: 0,
            });
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
    if let Some(go) = &alloc.go {
        let (sites, go_links) = attach_go(probes, target, pid, go)?;
        report.extend(sites);
        links.extend(go_links);
    }
    if let Some(programs) = session {
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

/// Attaches the contract's programs at every `alloc` and `free` site of `objects` (of
/// `provider`'s contract) for `pid`, target `target` in `slot`: one uprobe_multi link per
/// program and object, each site's semaphore its reference counter (held while the link
/// lives). Each site's arguments go to `USDT_SPECS` first, from the target's `first_site`th
/// entry on (objects attached later follow those attached before).
pub fn attach_contract(
    probes: &Probes,
    (target, slot, pid): (u64, u32, u32),
    provider: &str,
    objects: &[contract::ContractObject],
    first_site: u32,
) -> Result<(Vec<ProbeSiteReport>, Vec<Link>), AttachError> {
    let [alloc_prog, free_prog] = probes.usdt.as_ref().map_err(|e| AttachError::Contract { pid, reason: e.clone() })?;
    let sites: usize = objects.iter().map(|o| o.alloc.len() + o.free.len()).sum();
    if first_site as usize + sites > USDT_SPECS_PER_TARGET as usize {
        let reason = format!("more than {USDT_SPECS_PER_TARGET} contract probe sites ({})", first_site as usize + sites);
        return Err(AttachError::Contract { pid, reason });
    }
    let mut links = Vec::new();
    let mut report = Vec::new();
    let mut k = first_site;
    let mut specs = probes.usdt_specs.lock().unwrap();
    for object in objects {
        for (program, sites, name) in [(alloc_prog, &object.alloc, "alloc"), (free_prog, &object.free, "free")] {
            let mut list = Vec::new();
            for (probe, spec) in sites {
                specs
                    .set(slot * USDT_SPECS_PER_TARGET + k, *spec, 0)
                    .map_err(|e| AttachError::Contract { pid, reason: format!("USDT_SPECS: {e}") })?;
                list.push(SessionProbe {
                    file_offset: probe.file_offset,
                    cookie: usdt_cookie(k, target),
                    ref_ctr_offset: probe.semaphore_file_offset.unwrap_or(0),
                });
                report.push(ProbeSiteReport {
                    function: format!("{provider}:{name}"),
                    offset: probe.file_offset,
                    emulated: true,
                    reason: format!(
                        "USDT site in {} (arguments {:?}{})",
                        object.path_in_target,
                        probe.args,
                        if probe.semaphore_file_offset.is_some() { ", semaphore held by the link" } else { "" }
                    ),
                });
                k += 1;
            }
            if !list.is_empty() {
                links.push(Link::Session(program.attach(&object.host_path, &list, pid)?));
            }
        }
    }
    let live = objects.iter().any(|o| !o.free.is_empty());
    info!(pid, provider, sites = k - first_site, live, "USDT heap-sampling contract attached");
    Ok((report, links))
}

/// The Go runtime's probes: its settings in the target's `GO_TARGETS` slot first, then a
/// uprobe at the entry of `runtime.mProf_Malloc` (each sampled allocation) and one at
/// `runtime.freeSpecial` (the GC freeing an object with a special). Both run once per sampled
/// object, not per allocation: their probe sites are not worth choosing.
fn attach_go(probes: &Probes, target: u64, pid: u32, go: &GoRuntime) -> Result<(Vec<ProbeSiteReport>, Vec<Link>), AttachError> {
    probes.slots.lock().unwrap().go.set(target_slot(target), go.config, 0)?;
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid 0 is never traced"));
    let mut ebpf = probes.ebpf.lock().unwrap();
    let mut links = Vec::new();
    let mut report = Vec::new();
    for (program, sym) in [("go_malloc", &go.malloc), ("go_free", &go.free)] {
        let at = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(sym.file_offset),
            cookie: Some(encode_cookie(AllocKind::Malloc, target)),
        };
        let err = |source: ProgramError| AttachError::Attach {
            function: sym.name.clone(),
            path: go.path_in_target.clone(),
            source: Box::new(source),
            hint: "",
        };
        let prog = self::program(&mut ebpf, program)?;
        let id = prog.attach(at, &go.host_path, scope).map_err(err)?;
        links.push(Link::Uprobe(prog.take_link(id).map_err(err)?));
        report.push(ProbeSiteReport {
            function: sym.name.clone(),
            offset: 0,
            emulated: false,
            reason: "Go runtime: one hit per sampled object (MemProfileRate), at its entry".into(),
        });
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
    // A uretprobe is an entry probe that swaps the return address at [rsp]: it can sit at the
    // chosen (cheap) site as long as rsp has not moved there.
    let ret_offset = if site.rsp_delta == 0 { site.offset } else { 0 };
    // The return probe first. A call whose entry was seen before its return probe existed
    // would leave its thread's `INFLIGHT` slot active, and every later call of that thread
    // would be taken for a nested one, never recorded (a busy process attached in classic
    // mode lost whole threads); a return whose entry was not seen is only counted.
    let ret = one("alloc_return", ret_offset)?;
    Ok(vec![one("alloc_entry", site.offset)?, ret])
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
