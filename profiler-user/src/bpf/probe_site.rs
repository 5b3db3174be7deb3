//! Where inside an allocator function to put its entry uprobe (x86-64).
//!
//! # Why the site matters
//! A uprobe replaces one instruction with `int3`. When it hits, the kernel runs the eBPF program
//! and then has to execute the displaced instruction. A few instructions it *emulates* (cheap,
//! ~0.5 us here); all others it *single-steps* out of line (a second trap, ~10 us here). On
//! kernel 6.18 the emulated ones are ([`emulation`] mirrors `arch/x86/kernel/uprobes.c`):
//! `push reg` (one byte, or `41` + one byte for r8-r15), `jmp rel8/rel32`, `call rel32`, `jcc`
//! short and near (none of them with a `66` prefix), and the standard NOPs of 1 to 8 bytes; the
//! 5-byte `nopl 0x0(%rax,%rax,1)` additionally gets the optimized (trampoline) path. glibc's
//! `free` starts with `test %rdi,%rdi`, so a probe at free+0 single-steps on every call: moving it
//! to the `je` of its NULL check, an emulated branch, makes it ~10x cheaper. (A branch also beats
//! the `push` after it: emulating a push stores to the user's stack, ~50 ns more per call here;
//! the price is that `free(NULL)` hits the probe too, which ignores it.)
//!
//! # When a later site is equivalent to offset 0
//! A probe at `F+k` fires when a thread is about to execute the instruction at `F+k`. The
//! instructions of the prefix `[F, F+k)` are not skipped by the program: they have run, once,
//! exactly as without a probe. What changes is only the state the probe observes. So a site is
//! valid when
//!
//! 1. **every call reaches `F+k` exactly once** (except calls we deliberately do not observe):
//!    - the prefix is straight-line: no branch, call, return, syscall, interrupt or any other
//!      control flow (iced's `FlowControl::Next` only). A branch out of the prefix would make
//!      some calls miss the probe;
//!    - nothing jumps *into* `(F, F+k]`, or one call could hit the probe twice. This is checked
//!      over the bytes given to [`choose`] (a whole function for a [`super::elf_symbols::FunctionSymbol`]);
//!      jumps from further away (another function, a `.cold` part) cannot be seen from here;
//!    - a fault inside the prefix (a bad memory read) ends the call in a signal: no allocation
//!      happened either.
//! 2. **what the probe reads at `F+k` equals what it would read at `F+0`**:
//!    - registers: no prefix instruction may write an argument register the probe reads (rdi,
//!      rsi, rdx, ... per [`ProbeRole`]), including partial (`edi`, `dil`) and implicit writes
//!      (`mul` writes rdx, string instructions rsi/rdi, `cpuid`...). This comes from iced's
//!      used-register info, not from a hand-written list. Reading them, or writing other
//!      registers and the flags, is fine: the probe reads neither, and an emulated `jcc` at the
//!      site consumes the flags the prefix produced, exactly as without a probe;
//!    - the return address, at `[rsp + rsp_delta]` at the site: the uretprobe that swaps it is
//!      moved to the same site only when `rsp_delta` is 0 (`bpf::attach`). Only `push` (+8)
//!      and `sub rsp, imm` (+imm) are understood; any other write to rsp (pop, add, lea, mov,
//!      and, leave, enter, ...) is refused. `rsp_delta` must fit in a `u8`;
//!    - memory: a store in the prefix is a side effect the probe neither undoes nor repeats, so
//!      it does not matter *as a side effect*. It matters only if it could overwrite the one
//!      memory word the probe reads, the return-address slot (`mov %rax,(%rsp)` before any push
//!      would). Proving that a store cannot alias that slot needs alias analysis, so every
//!      explicit store in the prefix is refused (a `push` stores below the slot and is allowed).
//!      Real prologues lose nothing by this: glibc's skipped prefixes are `test`, `cmp`,
//!      `endbr64`.
//!
//! # Branches are probed, not skipped
//! The walk stops at the *first* emulated instruction, and `jcc`/`jmp`/`call` are emulated: a
//! branch is never walked past; the probe goes *on* it, which observes every path (free's
//! `test %rdi,%rdi; je` gets it on the `je` at +3). So `test %rsi,%rsi; jne ...` puts the
//! probe on the `jne` (+3), not past it, and glibc 2.36's `memalign` (`cmpb $0x0,x(%rip); je
//! init_path`) gets it on the `je` at +7: the `cmpb` writes only the flags. Whether the
//! hook/initialisation path would still allocate does not matter, because the probe fires
//! before the branch decides. If the branch after such a
//! `cmpb` were not emulatable (a `66` prefix, an indirect jump), the site stays at 0.
//!
//! # When in doubt, offset 0
//! Undecodable bytes, an instruction that breaks a rule above, no emulated instruction within
//! the first [`MAX_WALK_BYTES`] bytes, or too few bytes: the site is offset 0, `emulated` says
//! whether the instruction there is emulated anyway, and `reason` says why, for a warning.
//!
//! # Not for return probes
//! A uretprobe replaces the return address at `[rsp]` when it hits. It must stay at offset 0, or
//! at a site with `rsp_delta == 0`; this module only chooses entry-probe sites.
use iced_x86::{
    Code, Decoder, DecoderOptions, FastFormatter, FlowControl, Instruction, InstructionInfoFactory,
    Mnemonic, OpAccess, OpKind, Register,
};

/// How far the walk goes: the site must start within the first 64 bytes of the function
/// (jemalloc's `free` reaches its first branch at +0x30).
pub const MAX_WALK_BYTES: u64 = 64;

/// Integer argument registers of the System V x86-64 calling convention, in order.
const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// What the probe at the site reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeRole {
    /// An allocation function's entry: the first `arg_regs` integer arguments (rdi, rsi, rdx, ...
    /// at most 6) and the return address at `[rsp + rsp_delta]`.
    AllocEntry { arg_regs: u8 },
    /// `free`'s entry: rdi only (the probe ignores `free(NULL)`).
    FreeEntry,
}

/// The chosen site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Bytes from the function's start (add to its file offset to attach).
    pub offset: u64,
    /// How far rsp moved in the prefix: the return address is at `[rsp + rsp_delta]` at the site.
    pub rsp_delta: u8,
    /// Whether the kernel emulates the instruction at the site (else it single-steps it, slow).
    pub emulated: bool,
    /// Why this site; for logs (a warning when `emulated` is false).
    pub reason: String,
}

/// How the kernel handles a probed instruction it does not single-step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulation {
    /// `push reg`.
    Push,
    /// `jmp rel8/rel32`, `call rel32`, `jcc rel8/rel32`.
    Branch,
    /// A standard NOP of 1 to 8 bytes (emulated as a jump to the next instruction).
    Nop,
    /// The 5-byte NOP `0f 1f 44 00 00`: emulated, and since 6.18 optimized into a call to the
    /// uprobe trampoline (unless it crosses a page boundary).
    Nop5,
}

impl Emulation {
    fn describe(self) -> &'static str {
        match self {
            Emulation::Push => "an emulated push",
            Emulation::Branch => "an emulated branch",
            Emulation::Nop => "an emulated nop",
            Emulation::Nop5 => "a 5-byte nop (optimized uprobe path)",
        }
    }
}

/// The kernel's `x86_nops` table for 64-bit code, lengths 1 to 8 (`arch/x86/include/asm/nops.h`).
const NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// Whether the kernel emulates the instruction at the start of `insn_bytes` (trailing bytes are
/// ignored). False for undecodable bytes.
pub fn is_emulated(insn_bytes: &[u8]) -> bool {
    emulation(insn_bytes).is_some()
}

/// How the kernel handles the instruction at the start of `insn_bytes`; `None` when it
/// single-steps it (or cannot probe it at all, or the bytes do not decode).
///
/// Conservative: a false "no" only costs speed (a site further down is not used), a false "yes"
/// would not exist here. Newer kernels emulate more (6.19 recognizes `mov %reg,%reg` and other
/// NOP forms); those are reported as not emulated.
pub fn emulation(insn_bytes: &[u8]) -> Option<Emulation> {
    let mut decoder = Decoder::with_ip(64, insn_bytes, 0, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return None;
    }
    classify(&insn, &insn_bytes[..insn.len()])
}

/// [`emulation`] for a decoded instruction and its exact bytes.
fn classify(insn: &Instruction, raw: &[u8]) -> Option<Emulation> {
    let prefixes = raw.iter().take_while(|b| {
        matches!(
            b,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40
                ..=0x4f
        )
    });
    let mut has_66 = false;
    for p in prefixes {
        match p {
            // is_prefix_bad(): the kernel refuses to probe these instructions at all.
            0x26 | 0x2e | 0x36 | 0x3e | 0xf0 => return None,
            0x66 => has_66 = true,
            _ => {}
        }
    }
    // branch_setup_xol_ops() checks the NOP table first, byte for byte.
    if let Some(nop) = NOPS.get(raw.len().wrapping_sub(1)) {
        if raw == *nop {
            return Some(if raw.len() == 5 {
                Emulation::Nop5
            } else {
                Emulation::Nop
            });
        }
    }
    let near = insn.op_kinds().next() == Some(OpKind::NearBranch64);
    let branch = matches!(
        insn.code(),
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 | Code::Call_rel32_64
    ) || insn.is_jcc_short_or_near();
    if branch && near {
        // "16-bit overrides such as CALLW (66 e8 nn nn) are not supported."
        return (!has_66).then_some(Emulation::Branch);
    }
    // push_setup_xol_ops(): opcode 50-57, one byte, or two with exactly the REX prefix 41.
    if insn.code() == Code::Push_r64 && (raw.len() == 1 || (raw.len() == 2 && raw[0] == 0x41)) {
        return Some(Emulation::Push);
    }
    None
}

struct Decoded<'a> {
    offset: u64,
    insn: Instruction,
    raw: &'a [u8],
}

/// Decodes `bytes` from the start until the end or the first undecodable instruction.
fn decode_all(bytes: &[u8], func_vaddr: u64) -> Vec<Decoded<'_>> {
    let mut decoder = Decoder::with_ip(64, bytes, func_vaddr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let offset = decoder.position();
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        out.push(Decoded {
            offset: offset as u64,
            insn,
            raw: &bytes[offset..offset + insn.len()],
        });
    }
    out
}

fn text(insn: &Instruction) -> String {
    let mut out = String::new();
    FastFormatter::new().format(insn, &mut out);
    out
}

fn is_writing(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Checks one prefix instruction against the rules in the module doc; on success returns how
/// much it moves rsp down.
fn check_skippable(
    insn: &Instruction,
    watched: &[Register],
    factory: &mut InstructionInfoFactory,
) -> Result<u64, String> {
    let name = text(insn);
    if insn.flow_control() != FlowControl::Next {
        return Err(format!("`{name}` is control flow ({:?}) and is not emulated: calls could leave before the site", insn.flow_control()));
    }
    let info = factory.info(insn);
    if let Some(r) = info
        .used_registers()
        .iter()
        .find(|u| is_writing(u.access()) && watched.contains(&u.register().full_register()))
    {
        return Err(format!(
            "`{name}` writes {:?}, which the probe reads",
            r.register()
        ));
    }
    let is_push = insn.mnemonic() == Mnemonic::Push;
    if let Some(m) = info.used_memory().iter().find(|m| is_writing(m.access())) {
        if !is_push {
            return Err(format!(
                "`{name}` stores to memory ({:?} base); it could overwrite the return address the probe reads",
                m.base()
            ));
        }
    }
    let writes_rsp = info
        .used_registers()
        .iter()
        .any(|u| is_writing(u.access()) && u.register().full_register() == Register::RSP);
    match insn.stack_pointer_increment() {
        0 if !writes_rsp => Ok(0),
        -8 if is_push => Ok(8),
        0 if matches!(insn.code(), Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32)
            && insn.op0_kind() == OpKind::Register
            && insn.op0_register() == Register::RSP =>
        {
            match insn.immediate(1) as i64 {
                imm @ 1.. => Ok(imm as u64),
                imm => Err(format!("`{name}` moves rsp up by {}", imm.unsigned_abs())),
            }
        }
        _ => Err(format!(
            "`{name}` changes rsp in a way the return-address offset cannot follow"
        )),
    }
}

/// Chooses the entry-probe site for a function whose first bytes are `bytes`, linked at
/// `func_vaddr`. See the module doc for the rules.
pub fn choose(bytes: &[u8], func_vaddr: u64, role: ProbeRole) -> ProbeSite {
    let decoded = decode_all(bytes, func_vaddr);
    let first = decoded.first();
    let stay = |why: String| {
        let (what, emulated) = match first {
            Some(d) => {
                let emulated = classify(&d.insn, d.raw).is_some();
                (
                    format!(
                        "`{}`, {}",
                        text(&d.insn),
                        if emulated {
                            "emulated"
                        } else {
                            "single-stepped"
                        }
                    ),
                    emulated,
                )
            }
            None => ("undecodable".to_owned(), false),
        };
        ProbeSite {
            offset: 0,
            rsp_delta: 0,
            emulated,
            reason: format!("probe stays at +0 ({what}): {why}"),
        }
    };
    let Some(first) = first else {
        return stay(if bytes.is_empty() {
            "no function bytes".to_owned()
        } else {
            "the first instruction does not decode".to_owned()
        });
    };
    if let Some(kind) = classify(&first.insn, first.raw) {
        return ProbeSite {
            offset: 0,
            rsp_delta: 0,
            emulated: true,
            reason: format!("+0 `{}` is {}", text(&first.insn), kind.describe()),
        };
    }
    let watched: &[Register] = match role {
        ProbeRole::AllocEntry { arg_regs } if usize::from(arg_regs) <= ARG_REGS.len() => {
            &ARG_REGS[..usize::from(arg_regs)]
        }
        ProbeRole::AllocEntry { arg_regs } => {
            return stay(format!(
                "{arg_regs} argument registers requested, at most {} are understood",
                ARG_REGS.len()
            ))
        }
        ProbeRole::FreeEntry => &ARG_REGS[..1],
    };

    let mut factory = InstructionInfoFactory::new();
    let mut rsp_delta: u64 = 0;
    let mut skipped: Vec<String> = Vec::new();
    let mut i = 0;
    loop {
        let Some(d) = decoded.get(i) else {
            let end = decoded.last().map_or(0, |d| d.offset + d.insn.len() as u64);
            return stay(if end < bytes.len() as u64 {
                format!("bytes at +{end:#x} do not decode")
            } else {
                format!("ran out of bytes at +{end:#x} before an emulated instruction")
            });
        };
        if d.offset >= MAX_WALK_BYTES {
            return stay(format!(
                "no emulated instruction within the first {MAX_WALK_BYTES} bytes"
            ));
        }
        if i > 0 {
            if let Some(kind) = classify(&d.insn, d.raw) {
                return site_at(&decoded, func_vaddr, d, kind, rsp_delta, &skipped, stay);
            }
        }
        match check_skippable(&d.insn, watched, &mut factory) {
            Ok(down) => {
                rsp_delta += down;
                if rsp_delta > u64::from(u8::MAX) {
                    return stay(format!(
                        "rsp moves by {rsp_delta:#x} before a site, more than a u8 offset holds"
                    ));
                }
                skipped.push(format!("`{}`", text(&d.insn)));
            }
            Err(why) => return stay(format!("{why} (at +{:#x})", d.offset)),
        }
        i += 1;
    }
}

/// Finishes [`choose`] at site `d`, after checking that nothing in `decoded` jumps into the prefix.
fn site_at(
    decoded: &[Decoded<'_>],
    func_vaddr: u64,
    d: &Decoded<'_>,
    kind: Emulation,
    rsp_delta: u64,
    skipped: &[String],
    stay: impl Fn(String) -> ProbeSite,
) -> ProbeSite {
    for j in decoded {
        let direct = matches!(
            j.insn.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        ) && j.insn.op_kinds().next() == Some(OpKind::NearBranch64);
        let rel = j.insn.near_branch_target().wrapping_sub(func_vaddr);
        if direct && rel > 0 && rel <= d.offset {
            return stay(format!(
                "`{}` at +{:#x} jumps to +{rel:#x}, between the start and the candidate site +{:#x}: one call could hit the probe twice",
                text(&j.insn),
                j.offset,
                d.offset
            ));
        }
    }
    let mut reason = format!(
        "+{:#x} `{}` is {}",
        d.offset,
        text(&d.insn),
        kind.describe()
    );
    if kind == Emulation::Nop5 && (func_vaddr.wrapping_add(d.offset) & 0xfff) > 0x1000 - 5 {
        reason.push_str(" (it crosses a page boundary: emulated, not optimized)");
    }
    reason.push_str(&format!(
        "; before it, without touching what the probe reads: {}",
        skipped.join(", ")
    ));
    ProbeSite {
        offset: d.offset,
        rsp_delta: rsp_delta as u8,
        emulated: true,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::elf_symbols;

    const ALLOC3: ProbeRole = ProbeRole::AllocEntry { arg_regs: 3 };

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Shorthand: the site for `bytes` at address 0x1000.
    fn site(bytes: &str, role: ProbeRole) -> ProbeSite {
        choose(&hex(bytes), 0x1000, role)
    }

    /// `(name, role, vaddr, first 32 bytes, expected offset, expected rsp_delta, expected
    /// emulated)` for this machine's libc (Debian GLIBC 2.36-9+deb12u14, sha256 6b4a4535…1421),
    /// bytes dumped with `xxd -p -s VADDR -l 32` and disassembled with `objdump -d`:
    /// - malloc `41 54` push r12; calloc `41 55` push r13; realloc `41 57` push r15 -> +0.
    /// - free: `test rdi,rdi; je; push rbp` -> +3, on the NULL check's `je`.
    /// - posix_memalign: `cmpb $0,x(%rip); push r12` -> +7; valloc, pvalloc: `cmpb; push rbx` -> +7.
    /// - memalign (= aligned_alloc): `cmpb; je` -> +7, on the `je` (not past it).
    /// - reallocarray: `mov rax,rsi; mul rdx` -> +0: `mul` writes rdx, its third argument.
    #[allow(clippy::type_complexity)]
    const DEBIAN12: [(&str, ProbeRole, u64, &str, u64, u8, bool); 10] = [
        (
            "malloc",
            ALLOC3,
            0x98930,
            "415455534889fb4883ec10803d461b1400000f84f80100004885db0f88fd0100",
            0,
            0,
            true,
        ),
        (
            "free",
            ProbeRole::FreeEntry,
            0x98ef0,
            "4885ff0f84bf00000055488d77f0534883ec18488b1dd69e1300488b47f8648b",
            3,
            0,
            true,
        ),
        (
            "calloc",
            ALLOC3,
            0x996e0,
            "41554889f8415455534883ec1848f7e64889c30f90c04885db0f88d90200000f",
            0,
            0,
            true,
        ),
        (
            "realloc",
            ALLOC3,
            0x99130,
            "4157415641554154554889f5534889fb4883ec28803d3d131400000f84570100",
            0,
            0,
            true,
        ),
        (
            "posix_memalign",
            ALLOC3,
            0x9a280,
            "803d010214000041544989d4554889fd534889f3745a4889da48c1ea03488d42",
            7,
            0,
            true,
        ),
        (
            "aligned_alloc",
            ALLOC3,
            0x99610,
            "803d710e1400007407e932f6ffff66904883ec18488974240848893c24e8bebc",
            7,
            0,
            true,
        ),
        (
            "memalign",
            ALLOC3,
            0x99610,
            "803d710e1400007407e932f6ffff66904883ec18488974240848893c24e8bebc",
            7,
            0,
            true,
        ),
        (
            "valloc",
            ALLOC3,
            0x99650,
            "803d310e140000534889fb741b488b05349813004889de5b488b7818e9dff5ff",
            7,
            0,
            true,
        ),
        (
            "pvalloc",
            ALLOC3,
            0x99680,
            "803d010e140000534889fb742b488b0504981300488b7818488d47ff4801d872",
            7,
            0,
            true,
        ),
        (
            "reallocarray",
            ALLOC3,
            0x9a7e0,
            "4889f048f7e24889c67005e940b8f8ff488b05e985130064c7000c00000031c0",
            0,
            0,
            false,
        ),
    ];

    /// The sites for the embedded Debian 12 glibc bytes (meaningful on any machine): free moves
    /// to its NULL check's `je` at +3, the memalign family past the flags-only
    /// `cmpb` to the next emulated instruction, and the rest stay at 0 with the right
    /// `emulated` flag; every moved site has rsp_delta 0 and a reason.
    #[test]
    fn embedded_debian12_glibc_sites() {
        for (name, role, vaddr, bytes, offset, delta, emulated) in DEBIAN12 {
            let s = choose(&hex(bytes), vaddr, role);
            assert_eq!(
                (s.offset, s.rsp_delta, s.emulated),
                (offset, delta, emulated),
                "{name}: {}",
                s.reason
            );
            assert!(!s.reason.is_empty());
        }
        let free = choose(&hex(DEBIAN12[1].3), 0x98ef0, ProbeRole::FreeEntry);
        assert!(free.reason.contains("emulated branch"), "{}", free.reason);
        let reallocarray = choose(&hex(DEBIAN12[9].3), 0x9a7e0, ALLOC3);
        assert!(
            reallocarray.reason.contains("RDX"),
            "{}",
            reallocarray.reason
        );
    }

    /// The same functions read from this machine's libc through `elf_symbols::resolve`: on the
    /// Debian 12 build the bytes equal the embedded ones and the sites are the same; on another
    /// glibc, free still lands on an emulated instruction (its NULL check's branch) and malloc stays at 0
    /// if it starts with an emulated instruction.
    #[test]
    fn this_machines_libc_sites() {
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        if !std::path::Path::new(libc).exists() {
            eprintln!("skipping: no {libc}");
            return;
        }
        let names: Vec<&str> = DEBIAN12.iter().map(|e| e.0).collect();
        let syms = elf_symbols::resolve(libc, &names).unwrap();
        let same_build = DEBIAN12
            .iter()
            .zip(&syms)
            .all(|(e, s)| s.as_ref().is_some_and(|s| s.bytes.starts_with(&hex(e.3))));
        for ((name, role, vaddr, _, offset, delta, emulated), sym) in DEBIAN12.iter().zip(&syms) {
            let sym = sym.as_ref().unwrap();
            let s = choose(&sym.bytes, sym.vaddr, *role);
            eprintln!(
                "{name}: vaddr {:#x} file_offset {:#x} -> +{:#x} rsp_delta {} emulated {}: {}",
                sym.vaddr, sym.file_offset, s.offset, s.rsp_delta, s.emulated, s.reason
            );
            if same_build {
                assert_eq!(sym.vaddr, *vaddr, "{name}");
                assert_eq!(
                    (s.offset, s.rsp_delta, s.emulated),
                    (*offset, *delta, *emulated),
                    "{name}"
                );
            }
        }
        let free_sym = syms[1].as_ref().unwrap();
        let free = choose(&free_sym.bytes, free_sym.vaddr, ProbeRole::FreeEntry);
        if !same_build {
            eprintln!("{libc} is not the Debian 12 build: structural checks only");
            assert!(free.emulated, "{}", free.reason);
        }
        if free.offset > 0 {
            let at = &free_sym.bytes[free.offset as usize..];
            assert!(emulation(at).is_some(), "{}", free.reason);
            assert_eq!(free.rsp_delta, 0);
        }
    }

    /// `is_emulated` follows the kernel: one-byte push and `41`-prefixed push of r8-r15 yes,
    /// other REX or `66` pushes no; rel jmp/call/jcc yes unless `66`-prefixed; `2e`/`3e`-prefixed
    /// (branch hints) no, the kernel refuses to probe them at all; the standard NOPs yes, the
    /// 5-byte one on the optimized path; `xchg r8d,eax` (`41 90`) and `pause` are not NOPs; and
    /// the instructions glibc starts with (`test`, `cmpb` rip-relative, `mov`, `sub rsp`,
    /// `endbr64`), indirect jumps, `ret`, and garbage are not emulated.
    #[test]
    fn emulation_matches_the_kernel() {
        let yes = [
            ("55", Emulation::Push),
            ("41 54", Emulation::Push),
            ("41 57", Emulation::Push),
            ("eb 05", Emulation::Branch),
            ("e9 00 01 00 00", Emulation::Branch),
            ("e8 00 01 00 00", Emulation::Branch),
            ("74 05", Emulation::Branch),
            ("0f 84 bf 00 00 00", Emulation::Branch),
            ("f2 e9 00 01 00 00", Emulation::Branch),
            ("90", Emulation::Nop),
            ("66 90", Emulation::Nop),
            ("0f 1f 00", Emulation::Nop),
            ("0f 1f 40 00", Emulation::Nop),
            ("0f 1f 44 00 00", Emulation::Nop5),
            ("66 0f 1f 44 00 00", Emulation::Nop),
            ("0f 1f 80 00 00 00 00", Emulation::Nop),
            ("0f 1f 84 00 00 00 00 00", Emulation::Nop),
        ];
        for (bytes, kind) in yes {
            assert_eq!(emulation(&hex(bytes)), Some(kind), "{bytes}");
            assert!(is_emulated(&hex(bytes)));
        }
        let no = [
            "48 50",                         // push rax with REX.W
            "66 55",                         // pushw bp
            "66 e8 00 01",                   // callw
            "66 0f 84 00 01 00 00",          // jcc with 66
            "2e 74 05",                      // jcc with a branch-not-taken hint
            "3e 74 05",                      // jcc with a branch-taken hint
            "41 90",                         // xchg r8d, eax
            "f3 90",                         // pause
            "66 2e 0f 1f 84 00 00 00 00 00", // cs nopw: not in the table
            "48 85 ff",                      // test rdi, rdi
            "80 3d 01 02 14 00 00",          // cmpb $0, x(%rip)
            "48 89 f0",                      // mov rax, rsi
            "48 83 ec 18",                   // sub rsp, 0x18
            "f3 0f 1e fa",                   // endbr64
            "ff e0",                         // jmp rax
            "ff 25 00 01 00 00",             // jmp [rip+x]
            "c3",                            // ret
            "e3 05",                         // jrcxz
            "e2 05",                         // loop
            "06",                            // invalid in 64-bit mode
            "",
        ];
        for bytes in no {
            assert!(!is_emulated(&hex(bytes)), "{bytes}");
        }
    }

    /// An instruction at 0 that is emulated already keeps the probe at 0.
    #[test]
    fn emulated_at_zero_stays() {
        for bytes in [
            "55 48 89 e5",
            "41 54 55",
            "e9 00 00 00 00",
            "0f 1f 44 00 00 55",
        ] {
            let s = site(bytes, ProbeRole::FreeEntry);
            assert_eq!((s.offset, s.emulated), (0, true), "{bytes}: {}", s.reason);
        }
    }

    /// A non-emulated branch, return, or call before the first emulated instruction keeps the
    /// probe at 0: calls that take it would not reach a later site.
    #[test]
    fn control_flow_before_the_site_stays_at_zero() {
        for bytes in [
            "48 85 f6 ff e0 53",                            // test rsi,rsi; jmp rax; push rbx
            "48 85 f6 ff 25 00 01 00 00 53",                // test rsi,rsi; jmp [rip+x]; push rbx
            "48 85 f6 c3 53",                               // test rsi,rsi; ret; push rbx
            "48 85 f6 e3 01 53",                            // test rsi,rsi; jrcxz; push rbx
            "48 85 f6 ff d0 53",                            // test rsi,rsi; call rax; push rbx
            "80 3d 01 02 14 00 00 66 0f 84 00 01 00 00 53", // cmpb; 66-prefixed je; push rbx
            "48 85 f6 0f 05 53",                            // test rsi,rsi; syscall; push rbx
        ] {
            let s = site(bytes, ALLOC3);
            assert_eq!((s.offset, s.emulated), (0, false), "{bytes}: {}", s.reason);
            assert!(s.reason.contains("control flow"), "{bytes}: {}", s.reason);
        }
    }

    /// An emulated branch is probed, never walked past: `test rsi,rsi; jne; push` puts the probe
    /// on the `jne` at +3, and the memalign pattern `cmpb $0,x(%rip); je` on the `je` at +7.
    #[test]
    fn emulated_branch_is_the_site_not_skipped() {
        let s = site("48 85 f6 75 01 53", ALLOC3);
        assert_eq!(
            (s.offset, s.rsp_delta, s.emulated),
            (3, 0, true),
            "{}",
            s.reason
        );
        let s = site(
            "80 3d 71 0e 14 00 00 74 07 e9 32 f6 ff ff",
            ProbeRole::AllocEntry { arg_regs: 2 },
        );
        assert_eq!((s.offset, s.emulated), (7, true), "{}", s.reason);
        assert!(s.reason.contains("branch"), "{}", s.reason);
    }

    /// No branch is walked past, free's NULL check included: `test rdi,rdi; je` (short or
    /// near) then `push rbp` -> the `je` at +3, as for the inverted `jne`, a check on another
    /// register, the 32-bit `test edi,edi` and the pattern in an allocation probe.
    #[test]
    fn branches_are_sites_never_walked_past() {
        let s = site("48 85 ff 74 05 55", ProbeRole::FreeEntry);
        assert_eq!(
            (s.offset, s.rsp_delta, s.emulated),
            (3, 0, true),
            "{}",
            s.reason
        );
        let s = site("48 85 ff 0f 84 bf 00 00 00 55", ProbeRole::FreeEntry);
        assert_eq!((s.offset, s.emulated), (3, true), "{}", s.reason);

        for (bytes, role) in [
            ("48 85 ff 75 05 55", ProbeRole::FreeEntry), // jne: inverted
            ("48 85 f6 74 05 55", ProbeRole::FreeEntry), // rsi, not rdi
            ("85 ff 74 05 55", ProbeRole::FreeEntry),    // test edi,edi: 32-bit
            ("48 85 ff 74 05 55", ALLOC3),               // not a free probe
        ] {
            let s = site(bytes, role);
            let branch_at = if bytes.starts_with("85") { 2 } else { 3 };
            assert_eq!(
                (s.offset, s.emulated),
                (branch_at, true),
                "{bytes}: {}",
                s.reason
            );
        }
    }

    /// A write to an argument register the probe reads keeps the probe at 0 (`mov rdi, rax`;
    /// `xor edi, edi`, a 32-bit write; `mov rdi,[rip+x]`; `mul rdx`, an implicit write; `lodsb`,
    /// which moves rsi); reading them, or writing registers the probe does not read, is fine.
    #[test]
    fn argument_register_writes_stay_at_zero() {
        for (bytes, role) in [
            ("48 89 c7 53", ProbeRole::FreeEntry), // mov rdi, rax
            ("31 ff 53", ProbeRole::FreeEntry),    // xor edi, edi
            ("48 8b 3d 34 12 00 00 53", ALLOC3),   // mov rdi, [rip+0x1234]
            ("48 89 f0 48 f7 e2 53", ALLOC3),      // mov rax, rsi; mul rdx
            ("ac 53", ProbeRole::AllocEntry { arg_regs: 2 }), // lodsb
            ("48 89 f9 53", ProbeRole::AllocEntry { arg_regs: 4 }), // mov rcx, rdi: rcx is arg 4
        ] {
            let s = site(bytes, role);
            assert_eq!((s.offset, s.emulated), (0, false), "{bytes}: {}", s.reason);
            assert!(
                s.reason.contains("which the probe reads"),
                "{bytes}: {}",
                s.reason
            );
        }
        // mul rdx is fine when only two arguments are read.
        let s = site(
            "48 89 f0 48 f7 e2 53",
            ProbeRole::AllocEntry { arg_regs: 2 },
        );
        assert_eq!(s.offset, 6, "{}", s.reason);
        // mov rcx, rdi reads rdi and writes rcx: fine for three arguments.
        let s = site("48 89 f9 53", ALLOC3);
        assert_eq!(s.offset, 3, "{}", s.reason);
    }

    /// A RIP-relative load into a register the probe does not read (`mov rax,[rip+x]`) is walked
    /// past to the push: the probe never executes it, the program does, unchanged, before the
    /// probe fires; so is the RIP-relative `cmpb` glibc starts posix_memalign with.
    #[test]
    fn rip_relative_load_is_skipped() {
        let s = site("48 8b 05 34 12 00 00 53", ALLOC3);
        assert_eq!(
            (s.offset, s.rsp_delta, s.emulated),
            (7, 0, true),
            "{}",
            s.reason
        );
        let s = site("80 3d 01 02 14 00 00 41 54", ALLOC3);
        assert_eq!((s.offset, s.emulated), (7, true), "{}", s.reason);
    }

    /// rsp bookkeeping: `sub rsp, 0x18; push rbx` -> the push with rsp_delta 0x18; a
    /// non-emulated push (`push 0`, REX.W push) adds 8; `endbr64` changes nothing; other writes
    /// to rsp (`add rsp`, `lea rsp`, `pop`, `sub rsp` by a negative amount, `mov rsp, rbp`), or a
    /// total over 255, keep the probe at 0.
    #[test]
    fn rsp_delta_tracking() {
        let s = site("48 83 ec 18 53", ALLOC3);
        assert_eq!(
            (s.offset, s.rsp_delta, s.emulated),
            (4, 0x18, true),
            "{}",
            s.reason
        );
        let s = site("48 83 ec 10 6a 00 53", ALLOC3);
        assert_eq!((s.offset, s.rsp_delta), (6, 0x18), "{}", s.reason);
        let s = site("48 83 ec 08 48 50 41 54", ALLOC3);
        assert_eq!((s.offset, s.rsp_delta), (6, 0x10), "{}", s.reason);
        let s = site("f3 0f 1e fa 41 54", ALLOC3);
        assert_eq!((s.offset, s.rsp_delta), (4, 0), "{}", s.reason);
        let s = site("48 81 ec f8 00 00 00 48 83 ec 10 53", ALLOC3);
        assert_eq!(s.offset, 0, "{}", s.reason);
        assert!(s.reason.contains("u8"), "{}", s.reason);
        for bytes in [
            "48 83 c4 e8 53",    // add rsp, -0x18
            "48 8d 64 24 f8 53", // lea rsp, [rsp-8]
            "5b 53",             // pop rbx
            "48 83 ec f8 53",    // sub rsp, -8
            "48 89 ec 53",       // mov rsp, rbp
        ] {
            let s = site(bytes, ALLOC3);
            assert_eq!(s.offset, 0, "{bytes}: {}", s.reason);
            assert!(s.reason.contains("rsp"), "{bytes}: {}", s.reason);
        }
    }

    /// A store in the prefix keeps the probe at 0: it might overwrite the return address.
    #[test]
    fn memory_stores_stay_at_zero() {
        for bytes in [
            "48 89 04 24 53",
            "89 05 00 01 00 00 53",
            "48 89 7c 24 08 53",
        ] {
            let s = site(bytes, ALLOC3);
            assert_eq!((s.offset, s.emulated), (0, false), "{bytes}: {}", s.reason);
            assert!(s.reason.contains("stores"), "{bytes}: {}", s.reason);
        }
    }

    /// With endbr64 (CET builds such as Ubuntu's glibc) free becomes `endbr64; test rdi,rdi; je;
    /// push` -> the `je` at +7; a 5-byte nop after endbr64 is a site of its own (optimized path).
    #[test]
    fn endbr64_prologues() {
        let s = site("f3 0f 1e fa 48 85 ff 74 05 55", ProbeRole::FreeEntry);
        assert_eq!((s.offset, s.emulated), (7, true), "{}", s.reason);
        let s = site("f3 0f 1e fa 0f 1f 44 00 00 55", ALLOC3);
        assert_eq!((s.offset, s.emulated), (4, true), "{}", s.reason);
        assert!(s.reason.contains("optimized"), "{}", s.reason);
    }

    /// A direct jump back into the walked-past prefix (to the site itself here) keeps the probe
    /// at 0: one call could hit it twice.
    #[test]
    fn jump_into_the_prefix_stays_at_zero() {
        // cmpb $0,x(%rip); push rbx (+7); jmp +7
        let s = site("80 3d 01 02 14 00 00 53 eb fd", ALLOC3);
        assert_eq!(s.offset, 0, "{}", s.reason);
        assert!(s.reason.contains("twice"), "{}", s.reason);
        // jumping to +0 or past the site is fine
        let s = site("80 3d 01 02 14 00 00 53 eb f6", ALLOC3);
        assert_eq!(s.offset, 7, "{}", s.reason);
    }

    /// Doubt stays at 0 with a reason: garbage bytes, empty input, bytes that end before any
    /// emulated instruction, no emulated instruction within 64 bytes, more than 6 argument
    /// registers.
    #[test]
    fn doubt_stays_at_zero() {
        let s = site("06 06 06 06", ALLOC3);
        assert_eq!((s.offset, s.rsp_delta, s.emulated), (0, 0, false));
        assert!(s.reason.contains("decode"), "{}", s.reason);
        let s = site("48 85 f6 06 06 53", ALLOC3);
        assert_eq!((s.offset, s.emulated), (0, false));
        assert!(s.reason.contains("decode"), "{}", s.reason);
        let s = site("", ALLOC3);
        assert_eq!((s.offset, s.emulated), (0, false));
        assert!(!s.reason.is_empty());
        let s = site("48 85 ff", ProbeRole::FreeEntry);
        assert_eq!(s.offset, 0);
        assert!(s.reason.contains("ran out"), "{}", s.reason);
        let s = site(&format!("{}53", "48 85 f6 ".repeat(22)), ALLOC3);
        assert_eq!(s.offset, 0);
        assert!(s.reason.contains("64 bytes"), "{}", s.reason);
        let s = site(&format!("{}53", "48 85 f6 ".repeat(21)), ALLOC3);
        assert_eq!(s.offset, 63, "{}", s.reason);
        let s = site("48 85 f6 53", ProbeRole::AllocEntry { arg_regs: 7 });
        assert_eq!(s.offset, 0);
        assert!(s.reason.contains("at most 6"), "{}", s.reason);
    }
}
