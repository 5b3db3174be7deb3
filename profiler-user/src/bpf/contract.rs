//! The USDT heap-sampling contract (issue 21): services that sample their own allocations
//! (Datadog's `libdd-profiling-heap-sampler` and its Rust `GlobalAlloc` wrapper, the
//! OpenTelemetry eBPF profiler's memory-profiling design) carry probes `ddheap:alloc(ptr, size,
//! weight)` and `ddheap:free(ptr)` (or `otel_memory:alloc` / `otel_memory:free`, same
//! arguments) and fire them only for sampled allocations and the frees of sampled pointers,
//! and only while a tracer holds the alloc probe's semaphore.
//!
//! This module finds the contract in the objects a target maps (through the USDT note parser
//! of [`crate::trigger::usdt`], each file opened inside the target's root), compiles each
//! site's argument description (`8@%rdi`, `-4@$5`, `8@-16(%rbp)`) for the probes, and says
//! where to attach: the probe sites, each with the semaphore's file offset as the uprobe's
//! reference counter, so the kernel increments it when the probe goes in and decrements it
//! when the link goes (the service samples exactly while memscope is attached, even when
//! memscope is killed).
//!
//! Objects a target traced through the contract maps later (`dlopen`) are searched as the
//! unwinder sees its mappings change ([`find_new`]), and attached as they appear.
//!
//! Limits: x86-64 argument registers only (a description naming another architecture's
//! register is refused, the target then traced through its allocator); a process traced
//! through its allocator stays so when it later maps an object with the contract (its
//! allocator probes already see every allocation of it).
use profiler_common::{usdt_arg, UsdtArg, UsdtSpec, USDT_SPECS_PER_TARGET};
use tracing::debug;

use crate::{
    procfs::{self, ProcError},
    target_fs::TargetFile,
    trigger::usdt::{self, UsdtProbe},
};

/// The providers of the contract, in the order they are preferred when an object has both.
pub const PROVIDERS: [&str; 2] = ["ddheap", "otel_memory"];

/// One object (executable or library) that carries the contract.
#[derive(Clone, Debug)]
pub struct ContractObject {
    pub path_in_target: String,
    pub host_path: TargetFile,
    /// `alloc` sites, each with its compiled arguments.
    pub alloc: Vec<(UsdtProbe, UsdtSpec)>,
    /// `free` sites; none in an alloc-only build.
    pub free: Vec<(UsdtProbe, UsdtSpec)>,
}

/// The contract as a target carries it.
#[derive(Clone, Debug)]
pub struct Contract {
    /// `ddheap` or `otel_memory`.
    pub provider: String,
    pub objects: Vec<ContractObject>,
    /// Every object looked at when the contract was found (paths in the target), so that
    /// [`find_new`] does not parse them again.
    pub searched: Vec<String>,
}

impl Contract {
    /// `usdt:ddheap`: what every output says the figures come from.
    pub fn source_name(&self) -> String {
        format!("usdt:{}", self.provider)
    }

    /// Whether frees are reported (live-heap builds): without, only allocation profiles.
    pub fn live_tracking(&self) -> bool {
        self.objects.iter().any(|o| !o.free.is_empty())
    }

    /// Probe sites in all, alloc and free.
    pub fn sites(&self) -> usize {
        self.objects.iter().map(|o| o.alloc.len() + o.free.len()).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("process {pid} carries no USDT heap-sampling contract (no ddheap:alloc or otel_memory:alloc probe in {searched}); build it with a sampling allocator (see docs/usdt.md) or use --source auto|allocator")]
    NotFound { pid: u32, searched: String },
    #[error("process {pid} has more than {USDT_SPECS_PER_TARGET} contract probe sites ({sites})")]
    TooManySites { pid: u32, sites: usize },
}

/// The contract in the objects `pid` maps (the executable first, then its libraries), or
/// `None`. Objects that cannot be read are left out (logged); sites whose arguments this
/// x86-64 reader cannot evaluate are left out too.
pub fn find(pid: u32) -> Result<Option<Contract>, ContractError> {
    let mut provider: Option<&'static str> = None;
    let mut objects = Vec::new();
    let mut searched = Vec::new();
    for procfs::MappedObject { path, host_path } in procfs::objects(pid)? {
        searched.push(path.clone());
        if let Some((p, object)) = contract_of(path, host_path, provider) {
            provider = Some(p);
            objects.push(object);
        }
    }
    let Some(provider) = provider else { return Ok(None) };
    let contract = Contract { provider: provider.to_string(), objects, searched };
    if contract.sites() > USDT_SPECS_PER_TARGET as usize {
        return Err(ContractError::TooManySites { pid, sites: contract.sites() });
    }
    Ok(Some(contract))
}

/// The objects `pid` maps executable now that carry `provider`'s contract, among those whose
/// path is not in `seen` (each path looked at is added to it, so a library is parsed once):
/// what a target traced through the contract `dlopen`ed since.
pub fn find_new(pid: u32, provider: &str, seen: &mut std::collections::HashSet<String>) -> Result<Vec<ContractObject>, ProcError> {
    let provider = PROVIDERS.iter().copied().find(|p| *p == provider);
    let mut out = Vec::new();
    for m in procfs::maps(pid)?.iter().filter(|m| m.executable && m.is_file()) {
        let path = m.path.clone().unwrap_or_default();
        if !seen.insert(path.clone()) {
            continue;
        }
        match procfs::mapped_file(pid, m) {
            Ok(host_path) => out.extend(contract_of(path, host_path, provider).map(|(_, o)| o)),
            Err(e) => debug!("contract search skips {path}: {e}"),
        }
    }
    Ok(out)
}

/// The contract's sites in one object, with the provider they belong to (only `provider`'s
/// when given): `None` when the object carries no `alloc` site this reader can evaluate.
fn contract_of(path: String, host_path: TargetFile, provider: Option<&'static str>) -> Option<(&'static str, ContractObject)> {
    let all = usdt::probes(&host_path).map_err(|e| debug!("contract search skips {path}: {e}")).ok()?;
    let p = PROVIDERS
        .iter()
        .copied()
        .find(|p| all.iter().any(|u| u.provider == *p && u.name == "alloc"))
        .filter(|p| provider.is_none_or(|q| q == *p))?;
    let compiled = |name: &str| -> Vec<(UsdtProbe, UsdtSpec)> {
        all.iter()
            .filter(|u| u.provider == p && u.name == name)
            .filter_map(|u| match spec(&u.args) {
                Ok(s) => Some((u.clone(), s)),
                Err(e) => {
                    debug!("{path}: {p}:{name} at {:#x} left out: {e}", u.pc);
                    None
                }
            })
            .collect()
    };
    let (alloc, free) = (compiled("alloc"), compiled("free"));
    (!alloc.is_empty()).then(|| (p, ContractObject { path_in_target: path, host_path, alloc, free }))
}

/// The contract of `pid`, or an error saying where it was looked for.
pub fn require(pid: u32) -> Result<Contract, ContractError> {
    if let Some(c) = find(pid)? {
        return Ok(c);
    }
    let searched: Vec<String> = procfs::objects(pid)?.into_iter().map(|o| o.path).collect();
    Err(ContractError::NotFound { pid, searched: searched.join(", ") })
}

/// A site's arguments (`alloc`: ptr, size, weight; `free`: ptr); missing ones read as 0.
pub fn spec(args: &str) -> Result<UsdtSpec, String> {
    let mut out = UsdtSpec::default();
    for (i, a) in args.split_whitespace().enumerate().take(out.args.len()) {
        out.args[i] = arg(a)?;
    }
    Ok(out)
}

/// One argument: `[-]SIZE@LOCATION`, the location `%reg`, `$const` or `[-]disp(%reg)`.
pub fn arg(text: &str) -> Result<UsdtArg, String> {
    let bad = |why: &str| format!("USDT argument {text:?}: {why}");
    let (size, loc) = match text.split_once('@') {
        Some((s, l)) => (s.parse::<i32>().map_err(|_| bad("bad size"))?, l),
        None => (8, text),
    };
    let (signed, bytes) = (size < 0, size.unsigned_abs());
    if ![1, 2, 4, 8].contains(&bytes) {
        return Err(bad("size is not 1, 2, 4 or 8"));
    }
    let mut a = UsdtArg { size: bytes as u8, signed: signed as u8, ..Default::default() };
    if let Some(c) = loc.strip_prefix('$') {
        a.kind = usdt_arg::CONST;
        a.value = parse_int(c).ok_or_else(|| bad("bad constant"))?;
    } else if let Some(r) = loc.strip_prefix('%') {
        a.kind = usdt_arg::REG;
        a.reg = reg(r).ok_or_else(|| bad("unknown register"))?;
    } else if let Some((disp, rest)) = loc.split_once('(') {
        let r = rest.strip_suffix(')').and_then(|r| r.strip_prefix('%')).ok_or_else(|| bad("bad memory operand"))?;
        if r.contains(',') {
            return Err(bad("indexed memory operands are not supported"));
        }
        a.kind = usdt_arg::REG_DEREF;
        a.reg = reg(r).ok_or_else(|| bad("unknown register"))?;
        a.value = if disp.is_empty() { 0 } else { parse_int(disp).ok_or_else(|| bad("bad displacement"))? };
    } else {
        return Err(bad("unknown location"));
    }
    Ok(a)
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    let v = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// The register's slot in x86-64 `struct pt_regs` (r15, r14, r13, r12, rbp, rbx, r11, r10,
/// r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss), for its 64-, 32-, 16-
/// or low 8-bit name (the size of the argument says how much of it is read).
pub fn reg(name: &str) -> Option<u16> {
    const LEGACY: [(&str, [&str; 4], u16); 8] = [
        ("rax", ["rax", "eax", "ax", "al"], 10),
        ("rbx", ["rbx", "ebx", "bx", "bl"], 5),
        ("rcx", ["rcx", "ecx", "cx", "cl"], 11),
        ("rdx", ["rdx", "edx", "dx", "dl"], 12),
        ("rsi", ["rsi", "esi", "si", "sil"], 13),
        ("rdi", ["rdi", "edi", "di", "dil"], 14),
        ("rbp", ["rbp", "ebp", "bp", "bpl"], 4),
        ("rsp", ["rsp", "esp", "sp", "spl"], 19),
    ];
    if name == "rip" {
        return Some(16);
    }
    if let Some((_, _, slot)) = LEGACY.iter().find(|(_, names, _)| names.contains(&name)) {
        return Some(*slot);
    }
    let n: u16 = name.strip_prefix('r')?.trim_end_matches(['d', 'w', 'b']).parse().ok()?;
    // pt_regs begins r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8.
    match n {
        12..=15 => Some(15 - n),
        8..=11 => Some(17 - n),
        _ => None,
    }
}

/// `libdd-profiling-heap-sampler`'s process-wide interval (0: its default,
/// [`DDHEAP_DEFAULT_INTERVAL`]); a `u64` in the object's data.
const DDHEAP_INTERVAL_SYMBOL: &str = "dd_sampling_interval_override";
pub const DDHEAP_DEFAULT_INTERVAL: u64 = 512 * 1024;

/// Where the producer keeps its mean sampling interval in `pid`'s memory, when it is known:
/// the `ddheap` sampler's `dd_sampling_interval_override` symbol in the first contract object
/// whose symbol table has it (placed by the alloc site's load bias). `None` when not known.
pub fn interval_address(pid: u32, contract: &Contract) -> Option<u64> {
    use object::{Object as _, ObjectSymbol as _};
    if contract.provider != "ddheap" {
        return None;
    }
    let maps = procfs::maps(pid).ok()?;
    contract.objects.iter().find_map(|o| {
        let (site, _) = o.alloc.first()?;
        let bytes = o.host_path.bytes().ok()?;
        let file = object::File::parse(&bytes[..]).ok()?;
        let sym = file.symbols().find(|s| s.name() == Ok(DDHEAP_INTERVAL_SYMBOL))?;
        let site_addr = procfs::address_of(&maps, &o.path_in_target, site.file_offset, 1)?;
        Some(site_addr.wrapping_sub(site.pc).wrapping_add(sym.address()))
    })
}

/// The producer's interval now, read at `addr` (from [`interval_address`]): its default when
/// it reads 0, below 64 KiB clamped as the sampler does. `None` when unreadable.
pub fn read_interval(pid: u32, addr: u64) -> Option<u64> {
    let mem = std::sync::Arc::new(std::fs::File::open(format!("/proc/{pid}/mem")).ok()?);
    let b = crate::target_mem::read_at(&mem, addr, 8).ok()?;
    let v = u64::from_ne_bytes(b.try_into().ok()?);
    Some(if v == 0 { DDHEAP_DEFAULT_INTERVAL } else { v.max(64 * 1024) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptions compilers emit, compiled to where the probe reads them.
    #[test]
    fn compiles_argument_descriptions() {
        let s = spec("8@%rdi 8@%rsi 8@%rdx").unwrap();
        assert_eq!((s.args[0].kind, s.args[0].reg, s.args[0].size), (usdt_arg::REG, 14, 8));
        assert_eq!((s.args[1].reg, s.args[2].reg), (13, 12));
        let a = arg("-4@%r12d").unwrap();
        assert_eq!((a.kind, a.reg, a.size, a.signed), (usdt_arg::REG, 3, 4, 1));
        let a = arg("8@-16(%rbp)").unwrap();
        assert_eq!((a.kind, a.reg, a.value), (usdt_arg::REG_DEREF, 4, -16));
        let a = arg("8@(%rax)").unwrap();
        assert_eq!((a.kind, a.reg, a.value), (usdt_arg::REG_DEREF, 10, 0));
        let a = arg("-4@$-5").unwrap();
        assert_eq!((a.kind, a.value), (usdt_arg::CONST, -5));
        assert_eq!(arg("8@%r8").unwrap().reg, 9);
        assert_eq!(arg("8@%r15").unwrap().reg, 0);
        assert_eq!(arg("8@%r11").unwrap().reg, 6);
        assert_eq!(arg("2@%r13w").unwrap().reg, 2);
        assert_eq!(arg("1@%sil").unwrap().reg, 13);
        // Hostile or foreign descriptions are refused, not guessed.
        for bad in ["3@%rdi", "8@%x0", "8@%ah", "8@4(%rax,%rbx,2)", "8@", "x@%rdi", "8@$zz", "8@%r16"] {
            assert!(arg(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(spec("").unwrap(), UsdtSpec::default());
    }
}
