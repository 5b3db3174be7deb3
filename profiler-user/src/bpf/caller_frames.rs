//! The frame the frame-pointer walk cannot see: the caller of a library function without frame
//! pointers that calls the allocator (libstdc++'s `operator new`, libc's `strdup`). Without it
//! a C++ allocation on glibc shows `operator new` called from the caller's caller, because
//! `operator new` leaves rbp to the function that called it.
//!
//! At attach, every call to a probed allocation function or to an `operator new` in such a
//! library is found (a direct `call`, or one through a PLT stub importing it); the CFI
//! (`.eh_frame`) says how far above rsp the calling function's own return address is at that
//! call: for return address R, CFA = rsp + k after the call returns, so at the callee's entry
//! (rsp 8 lower, R at [rsp]) it is at [rsp + k]. If the function saved rbp (and may use it for something
//! else), the CFI also says where. `CALLER_FRAMES` maps R, as the target sees it, to both; the
//! probes follow up to three such frames at a sampled allocation (`nothrow new` -> `new` ->
//! `malloc`) and restore rbp before the frame-pointer walk (`profiler-ebpf/src/stack.rs`).
use std::collections::{HashMap, HashSet};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext, UnwindSection as _,
    X86_64,
};
use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
use profiler_common::AllocKind;
use tracing::debug;

use super::{attach::Allocator, elf_symbols::CodeImage, forwarding::plt_import, load::Loaded};
use crate::procfs;

/// Fills `CALLER_FRAMES` from the target's libc and libstdc++ and from its allocator. Best
/// effort: a library that cannot be read only costs its frames.
pub fn fill(loaded: &mut Loaded, pid: u32, alloc: &Allocator) {
    let allocating = alloc.functions.iter().filter(|(k, _)| !k.frees());
    // Calls to operator new too: libstdc++'s (glibc) is itself such a caller of malloc.
    let operators = AllocKind::OperatorNew.symbols().iter().map(|s| s.to_string());
    let names: HashSet<String> = allocating.clone().map(|(_, f)| f.name.clone()).chain(operators).collect();
    let (Ok(objects), Ok(maps)) = (procfs::objects(pid), procfs::maps(pid)) else { return };
    let (mut added, mut lowest, mut highest) = (0, u64::MAX, 0);
    for object in objects {
        let is_allocator = object.path == alloc.path_in_target;
        if !is_allocator && !is_wrapper_library(&object.path) {
            continue;
        }
        let Ok(image) = CodeImage::open(&object.host_path) else { continue };
        let own: HashSet<u64> =
            if is_allocator { allocating.clone().map(|(_, f)| f.vaddr).collect() } else { HashSet::new() };
        for (ret, k) in call_sites(&image, &own, &names) {
            let Some(at) = image.file_offset(ret).and_then(|off| procfs::address_of(&maps, &object.path, off, 1))
            else {
                continue;
            };
            if loaded.maps.caller_frames.insert(at, k, 0).is_err() {
                debug!("CALLER_FRAMES is full after {added} call sites");
                break;
            }
            (added, lowest, highest) = (added + 1, lowest.min(at), highest.max(at));
        }
    }
    if added > 0 {
        let range = &mut loaded.maps.caller_range;
        if range.set(0, lowest, 0).and_then(|()| range.set(1, highest, 0)).is_err() {
            debug!("cannot set CALLER_RANGE: frames of callers without frame pointers are off");
        }
    }
    debug!("{added} calls to the allocator from functions without frame pointers");
}

/// Libraries whose calls to the allocator are looked for: the usual allocating wrappers built
/// without frame pointers.
fn is_wrapper_library(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so") || base.starts_with("libstdc++.so")
}

/// `(return address, CALLER_FRAMES value)` of every call in `image` to a probed allocation
/// function: one at an address of `probed` (same file), or an import named in `names`. The
/// value is `k | (rbp_slot << 32)`: the caller's return address is at `[rsp + k]` at the
/// callee's entry, and its saved rbp at `[rsp + rbp_slot - 1]` (`rbp_slot` 0: not saved).
/// Calls where the CFA is not rsp-based (the function keeps a frame pointer: the walk sees its
/// caller) are left out.
pub(crate) fn call_sites(image: &CodeImage, probed: &HashSet<u64>, names: &HashSet<String>) -> Vec<(u64, u64)> {
    let mut returns = Vec::new();
    let mut stubs: HashMap<u64, bool> = HashMap::new();
    for (addr, code) in image.code_sections() {
        let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        for insn in decoder.iter() {
            if insn.flow_control() != FlowControl::Call || insn.op0_kind() != OpKind::NearBranch64 {
                continue;
            }
            let target = insn.near_branch_target();
            let allocates = probed.contains(&target)
                || *stubs.entry(target).or_insert_with(|| plt_import(image, target).is_some_and(|n| names.contains(n)));
            if allocates {
                returns.push(insn.next_ip());
            }
        }
    }
    let Some(((eh_addr, eh), (hdr_addr, hdr))) = image.eh_frame() else {
        return Vec::new();
    };
    let bases = BaseAddresses::default().set_eh_frame(eh_addr).set_eh_frame_hdr(hdr_addr);
    let eh_frame = EhFrame::new(eh, LittleEndian);
    let Ok(parsed) = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8) else {
        return Vec::new();
    };
    let Some(table) = parsed.table() else {
        return Vec::new();
    };
    let mut ctx = UnwindContext::new();
    returns
        .into_iter()
        .filter_map(|ret| {
            let row = table
                .unwind_info_for_address(&eh_frame, &bases, &mut ctx, ret, EhFrame::cie_from_offset)
                .ok()?;
            let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else { return None };
            if register != X86_64::RSP || !(8..1 << 20).contains(&offset) {
                return None;
            }
            let rbp_slot = match row.register(X86_64::RBP) {
                // Saved at CFA + n; the CFA is 8 + offset above rsp at the callee's entry.
                Some(RegisterRule::Offset(n)) => u64::try_from(8 + offset + n + 1).ok().filter(|s| *s < 1 << 20)?,
                _ => 0,
            };
            Some((ret, offset as u64 | rbp_slot << 32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::elf_symbols::{self, FunctionSymbol};

    /// libstdc++'s `operator new(unsigned long)` pushes rbx and calls `malloc@plt`: at malloc's
    /// entry its own return address is 16 above rsp, and rbp is untouched. Its nothrow array
    /// variant calls `operator new[]` through a `.plt.got` stub (a GLOB_DAT slot).
    #[test]
    fn libstdcxx_operator_new_frames() {
        let lib = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        let image = CodeImage::open(lib).unwrap();
        let names: HashSet<String> = ["malloc", "_Znwm", "_Znam"].map(String::from).into();
        let sites = call_sites(&image, &HashSet::new(), &names);
        let found = elf_symbols::resolve(lib, &["_Znwm", "_ZnamRKSt9nothrow_t"]).unwrap();
        let in_function = |f: &Option<FunctionSymbol>| {
            let f = f.as_ref().unwrap();
            sites.iter().filter(|(r, _)| *r > f.vaddr && *r <= f.vaddr + f.size).map(|(_, v)| *v).collect::<Vec<_>>()
        };
        assert_eq!(in_function(&found[0]), [16]);
        assert_eq!(in_function(&found[1]), [16]);
        assert!(sites.len() > 20, "{} call sites", sites.len());
    }
}
