//! Which of an allocator's C++ operators (and non-standard wrappers: `tc_*`, `mi_*`, `*allocx`,
//! Rust's shims) only forward to another of its probed entry points.
//!
//! jemalloc's `operator delete(void*)` is `jmp free@plt` and its `operator new[]` is
//! `jmp operator new`; its aligned `operator new` calls `aligned_alloc@plt`. Probing both the
//! forwarder and its target would see the same allocation or free twice (and the sampled
//! fast path, which keeps no per-thread state, cannot tell). So a forwarder is not probed: its
//! target's probe sees the call, with the same arguments.
//!
//! A function forwards when its first control transfer is an unconditional direct `call` or
//! `jmp` to a probed entry point, at its address or through the PLT stub of an import of that
//! name (`endbr64`, then `jmp [rip + slot]`): every call goes there. One that branches first
//! (a fast path of its own, the slow one calling `malloc`) is probed: its slow path may then
//! be seen twice while sampling, which costs less than missing its fast path.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use profiler_common::AllocKind;
use tracing::debug;

use super::elf_symbols::{CodeImage, FunctionSymbol};

/// `functions` (of the allocator at `path`) without the C++ operators that only forward to
/// another of them: the target's probe sees their calls once.
pub fn without_forwarders(path: &Path, functions: Vec<(AllocKind, FunctionSymbol)>) -> Vec<(AllocKind, FunctionSymbol)> {
    let is_operator = |k: AllocKind| matches!(k, AllocKind::OperatorNew | AllocKind::OperatorDelete);
    // The C API of glibc and musl forwards nowhere; the other families' wrappers may
    // (tcmalloc's `tc_newarray`, mimalloc's aliases).
    let checked = |k: AllocKind, name: &str| is_operator(k) || !AllocKind::ALL.iter().any(|a| a.symbols().contains(&name));
    if !functions.iter().any(|(k, f)| checked(*k, &f.name)) {
        return functions;
    }
    let image = match CodeImage::open(path) {
        Ok(image) => image,
        Err(e) => {
            debug!("not checking {}'s C++ operators for forwarders: {e}", path.display());
            return functions;
        }
    };
    let probed: HashMap<u64, String> = functions.iter().map(|(_, f)| (f.vaddr, f.name.clone())).collect();
    let names: HashSet<String> = probed.values().cloned().collect();
    functions
        .into_iter()
        .filter(|(kind, f)| {
            let target = checked(*kind, &f.name).then(|| forwards_to(&image, f, &probed, &names)).flatten();
            if let Some(target) = &target {
                debug!("{}: not probed, it forwards to {target}", f.name);
            }
            target.is_none()
        })
        .collect()
}

/// How much of a function is decoded to find its first control transfer.
const MAX_PREFIX: u64 = 256;

/// The probed entry point `function` forwards to, if any. `probed`: address -> name of every
/// entry point probed in this file; `probed_names`: their names (an import of the same name
/// resolves to them, the allocator being first in load order).
fn forwards_to(
    image: &CodeImage,
    function: &FunctionSymbol,
    probed: &HashMap<u64, String>,
    probed_names: &HashSet<String>,
) -> Option<String> {
    let len = if function.size == 0 { MAX_PREFIX } else { function.size.min(MAX_PREFIX) };
    let code = image.code(function.vaddr, len)?;
    let mut decoder = Decoder::with_ip(64, code, function.vaddr, DecoderOptions::NONE);
    let first = decoder.iter().find(|insn| insn.flow_control() != FlowControl::Next)?;
    let unconditional = matches!(first.flow_control(), FlowControl::Call | FlowControl::UnconditionalBranch);
    if !unconditional || first.op0_kind() != OpKind::NearBranch64 {
        return None;
    }
    let target = first.near_branch_target();
    if let Some(name) = probed.get(&target) {
        return Some(name.clone());
    }
    plt_import(image, target).filter(|n| probed_names.contains(*n)).map(str::to_owned)
}

/// Whether `function` (of the file `image` was opened from) calls or jumps to one of the imports
/// named in `names` anywhere in its first [`MAX_FUNCTION_SCAN`] bytes: through a PLT stub or
/// through its GOT slot (`call/jmp [rip + slot]`, as `-fno-plt` and Rust emit). Used to tell a
/// Rust `#[global_allocator]` that wraps the system allocator (its `__rust_alloc` reaches
/// `malloc`) from one that does not.
pub fn reaches_import(image: &CodeImage, function: &FunctionSymbol, names: &[&str]) -> bool {
    let len = if function.size == 0 { MAX_PREFIX } else { function.size.min(MAX_FUNCTION_SCAN) };
    let Some(code) = image.code(function.vaddr, len) else { return false };
    let mut decoder = Decoder::with_ip(64, code, function.vaddr, DecoderOptions::NONE);
    decoder.iter().any(|insn| {
        if !matches!(insn.flow_control(), FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch | FlowControl::IndirectCall) {
            return false;
        }
        let import = if insn.op0_kind() == OpKind::NearBranch64 {
            plt_import(image, insn.near_branch_target())
        } else if insn.is_ip_rel_memory_operand() {
            image.import_at_slot(insn.ip_rel_memory_address())
        } else {
            None
        };
        import.is_some_and(|name| names.contains(&name.split('@').next().unwrap_or(name)))
    })
}

/// How much of a function [`reaches_import`] decodes.
const MAX_FUNCTION_SCAN: u64 = 4096;

/// The import a PLT stub at `stub` jumps to: its first instruction after an optional
/// `endbr64` is `jmp [rip + slot]` (`bnd jmp` in IBT stubs).
pub fn plt_import(image: &CodeImage, stub: u64) -> Option<&str> {
    let code = image.code(stub, 16)?;
    let mut decoder = Decoder::with_ip(64, code, stub, DecoderOptions::NONE);
    for insn in decoder.iter().take(2) {
        match insn.mnemonic() {
            Mnemonic::Endbr64 => continue,
            Mnemonic::Jmp if insn.is_ip_rel_memory_operand() => {
                return image.import_at_slot(insn.ip_rel_memory_address());
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::elf_symbols;

    /// Debian 12's jemalloc (libjemalloc2, installed by `cargo xtask setup`): `operator new[]`
    /// jumps to `operator new`, `operator delete` to `free@plt`, the aligned `operator new`
    /// calls `aligned_alloc@plt` first thing; `operator new` and the sized `operator delete`
    /// allocate and free themselves.
    #[test]
    fn jemalloc_forwarders_are_left_out() {
        let lib = Path::new("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
        assert!(lib.exists(), "{} missing: `cargo xtask setup` installs libjemalloc2", lib.display());
        let wanted = [
            (AllocKind::Malloc, "malloc"),
            (AllocKind::Free, "free"),
            (AllocKind::AlignedAlloc, "aligned_alloc"),
            (AllocKind::OperatorNew, "_Znwm"),
            (AllocKind::OperatorNew, "_Znam"),
            (AllocKind::OperatorNew, "_ZnwmSt11align_val_t"),
            (AllocKind::OperatorDelete, "_ZdlPv"),
            (AllocKind::OperatorDelete, "_ZdlPvm"),
        ];
        let names: Vec<&str> = wanted.iter().map(|(_, n)| *n).collect();
        let symbols = elf_symbols::resolve(lib, &names).unwrap();
        let functions = wanted.iter().zip(symbols).map(|((k, n), s)| (*k, s.unwrap_or_else(|| panic!("{n}")))).collect();
        let kept: Vec<String> = without_forwarders(lib, functions).into_iter().map(|(_, f)| f.name).collect();
        assert_eq!(kept, ["malloc", "free", "aligned_alloc", "_Znwm", "_ZdlPvm"]);
    }
}
