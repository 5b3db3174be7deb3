//! Which of an allocator's C++ operators only forward to another of its probed entry points.
//!
//! jemalloc's `operator delete(void*)` is `jmp free@plt` and its `operator new[]` is
//! `jmp operator new`; its aligned `operator new` calls `aligned_alloc@plt`. Probing both the
//! forwarder and its target would see the same allocation or free twice (and the sampled
//! fast path, which keeps no per-thread state, cannot tell). So a forwarder is not probed: its
//! target's probe sees the call, with the same arguments.
//!
//! A function forwards when one of its direct branches (`call`, `jmp`, `jcc` with an immediate
//! target) reaches a probed entry point, either at its address or through the PLT stub of an
//! import of that name (`endbr64`, then `jmp [rip + slot]`).
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
    if !functions.iter().any(|(k, _)| is_operator(*k)) {
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
            let target = is_operator(*kind).then(|| forwards_to(&image, f, &probed, &names)).flatten();
            if let Some(target) = &target {
                debug!("{}: not probed, it forwards to {target}", f.name);
            }
            target.is_none()
        })
        .collect()
}

/// How much of a function is decoded (operators are small; a size-less symbol gets this much).
const MAX_BODY: u64 = 4096;

/// The probed entry point `function` forwards to, if any. `probed`: address -> name of every
/// entry point probed in this file; `probed_names`: their names (an import of the same name
/// resolves to them, the allocator being first in load order).
fn forwards_to(
    image: &CodeImage,
    function: &FunctionSymbol,
    probed: &HashMap<u64, String>,
    probed_names: &HashSet<String>,
) -> Option<String> {
    let len = if function.size == 0 { MAX_BODY } else { function.size.min(MAX_BODY) };
    let body = image.code(function.vaddr, len)?;
    let own = function.vaddr..function.vaddr + body.len() as u64;
    let mut decoder = Decoder::with_ip(64, body, function.vaddr, DecoderOptions::NONE);
    for insn in decoder.iter() {
        let direct = matches!(
            insn.flow_control(),
            FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) && insn.op0_kind() == OpKind::NearBranch64;
        if !direct || own.contains(&insn.near_branch_target()) {
            continue;
        }
        let target = insn.near_branch_target();
        if let Some(name) = probed.get(&target) {
            return Some(name.clone());
        }
        if let Some(name) = plt_import(image, target).filter(|n| probed_names.contains(*n)) {
            return Some(name.to_owned());
        }
    }
    None
}

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
