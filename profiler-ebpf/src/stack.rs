//! The user stack of an allocation, unwound inside the probe from tables the agent compiled from
//! each mapped file's CFI (`.eh_frame` / `.debug_frame`, see `profiler-user/src/unwind/`), with
//! frame pointers where a mapping has no CFI (JIT code). Table-driven unwinding in the kernel
//! keeps the rest of the data path as it is: stacks are hashed and stored here, every recorded
//! allocation keeps its stack key, exact counts stay exact.
//!
//! In a Go program built with cgo, C code runs on the thread's system stack: its stack ends
//! in `runtime.asmcgocall`, and the walk continues on the goroutine's stack from what
//! asmcgocall saved (see [`cgo_step`]), into the Go function that made the cgo call.
//!
//! Each step is verified before its frame is kept: the return address must lie in an
//! executable mapping of the target, the CFA must move up the stack, every rule must be one
//! this code evaluates. A walk that cannot go on ends there, counted by reason
//! (`Counter::Truncated*`): a short stack, never a garbage frame.
//!
//! In a V8 target (Node.js; `JS_FRAME_CONFIG` of its slot enabled) each frame walked by frame
//! pointers also gives its JavaScript function when it has one: the frame's function slot names
//! a `JSFunction`, whose `SharedFunctionInfo` is kept per frame in `JS_FRAMES` and is part of
//! the stack's identity (see `profiler_common::JsFrameConfig`). Interpreted functions all
//! return into the same interpreter code: without it, two of them would share one stack. That
//! read is branch-free (each branch multiplies what the verifier walks through 64 frames).
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_raw},
};
use profiler_common::{
    mapping, rbp, row, Counter, GoTarget, JsFrameConfig, UnwindMapping, UnwindRow, MAPPING_SEARCH_STEPS, MAX_FRAMES,
    MAX_ROWS_PER_FILE,
    MAX_UNWIND_MAPPINGS, ROW_SEARCH_STEPS, UNWIND_STATE_STRIDE,
};

use crate::{
    maps::{GO_TARGETS, JS_FRAMES, JS_FRAME_CONFIG, STACKS, STACK_SCRATCH, UNWIND_MAPPINGS, UNWIND_ROWS, UNWIND_STATE},
    probes::{count, Target},
};

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
/// Frames further apart than this are not one thread's stack.
const MAX_FRAME_SIZE: u64 = 16 << 20;
/// Where a signal frame's `ucontext` (at rsp when the handler returns into `__restore_rt`)
/// keeps the interrupted registers: `uc_mcontext.gregs` at 40, REG_RBP 10, REG_RSP 15, REG_RIP 16.
const UC_RBP: u64 = 40 + 10 * 8;
const UC_RSP: u64 = 40 + 15 * 8;
const UC_RIP: u64 = 40 + 16 * 8;

/// The target's executable mapping holding `pc`, from the half of its `UNWIND_MAPPINGS` range
/// in force.
#[inline(always)]
fn find_mapping(slot: u32, pc: u64) -> Option<UnwindMapping> {
    let state = slot * UNWIND_STATE_STRIDE;
    let half = UNWIND_STATE.get(state).copied().unwrap_or(0) & 1;
    let count = UNWIND_STATE.get(state + 1 + half).copied().unwrap_or(0);
    // A rejected path, not `min`: a clamped constant bound would let the verifier follow
    // every concrete path of the search instead of one symbolic one.
    if count == 0 || count > MAX_UNWIND_MAPPINGS {
        return None;
    }
    let base = (slot * 2 + half) * MAX_UNWIND_MAPPINGS;
    let at = last_at_or_below(count, MAPPING_SEARCH_STEPS, |i| UNWIND_MAPPINGS.get(base + i).map(|m| m.start <= pc))?;
    let m = *UNWIND_MAPPINGS.get(base + at)?;
    if m.start <= pc && pc < m.end {
        Some(m)
    } else {
        None
    }
}

/// The index of the last of `len` sorted entries for which `at_or_below` holds, or index 0
/// (the caller checks it). Branch-free halving: `lo` and `len` are unknown to the verifier
/// from the first step on, so each step is verified once, not once per concrete outcome.
#[inline(always)]
fn last_at_or_below(len: u32, steps: u32, at_or_below: impl Fn(u32) -> Option<bool>) -> Option<u32> {
    let (mut lo, mut len) = (0u32, len);
    let mut i = 0;
    while i < steps + 1 {
        i += 1;
        if len <= 1 {
            break;
        }
        let half = len / 2;
        if at_or_below(lo + half)? {
            lo += half;
        }
        len -= half;
    }
    Some(lo)
}

/// The row of `m`'s file in force at `pc` (a `row::NONE` row when there is none).
#[inline(always)]
fn find_row(m: &UnwindMapping, pc: u64) -> UnwindRow {
    let none = UnwindRow::default();
    let rel = pc.wrapping_sub(m.bias);
    if rel > u32::MAX as u64 || m.rows_len == 0 || m.rows_len > MAX_ROWS_PER_FILE {
        return none;
    }
    let rel = rel as u32;
    let start = m.rows_start;
    let Some(at) = last_at_or_below(m.rows_len, ROW_SEARCH_STEPS, |i| UNWIND_ROWS.get(start + i).map(|r| r.pc <= rel)) else {
        return none;
    };
    match UNWIND_ROWS.get(start + at) {
        Some(r) if r.pc <= rel => *r,
        _ => none,
    }
}

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Registers of one frame: where execution resumes (`exact`) or returns to (a return
/// address, looked up at `pc - 1`: the call may be a function's last instruction).
#[derive(Clone, Copy)]
#[repr(C)]
struct Frame {
    pc: u64,
    sp: u64,
    fp: u64,
    exact: bool,
    /// Found by the frame-pointer chain from the frame before (which keeps frame pointers:
    /// JIT code, V8's builtins).
    by_fp: bool,
}

/// The `SharedFunctionInfo` of the JavaScript function whose frame pointer is `fp`, or 0 when
/// the frame is no JavaScript frame (its context slot holds a frame-type marker, a Smi) or a
/// read fails (the helper then zeroes its buffer). Only tags are checked here; the agent checks
/// the object's type. No branch: the verifier would walk each one in every frame.
#[inline(always)]
fn js_function(js: &JsFrameConfig, fp: u64) -> u64 {
    let mut pair = [0u64; 2];
    let mut shared = 0u64;
    let at = fp.wrapping_add(js.function_offset as i64 as u64);
    unsafe { probe_read_raw(pair.as_mut_ptr() as *mut _, 16, at as *const _) };
    let (function, context) = (pair[0], pair[1]);
    unsafe { probe_read_raw(&mut shared as *mut u64 as *mut _, 8, function.wrapping_add(js.shared_offset) as *const _) };
    // 0 when all three carry the heap-object tag.
    let bad = ((function ^ js.tag) | (context ^ js.tag) | (shared ^ js.tag)) & js.tag_mask;
    // 1 when `bad` is 0 (it is below 2^63).
    let keep = ((bad | bad.wrapping_neg()) >> 63) ^ 1;
    shared.wrapping_mul(keep)
}

/// The caller's frame by the frame-pointer chain: for code without CFI (JIT code, a file
/// without unwind tables, V8's builtins inside node's own CFI-covered binary), which keeps
/// frame pointers or else fails the checks here. `fail` says why the walk ends if it does.
#[inline(always)]
fn frame_pointer_step(t: &Target, f: &Frame, fail: Counter) -> Result<Option<Frame>, Counter> {
    // A frame pointer lies above the stack pointer, inside the stack, 8-byte aligned.
    if f.fp < f.sp || f.fp - f.sp > MAX_FRAME_SIZE || f.fp & 7 != 0 {
        return Err(fail);
    }
    let frame = unsafe { bpf_probe_read_user(f.fp as *const [u64; 2]) }.map_err(|_| fail)?;
    count(t, Counter::FramePointerFrames, 1);
    if frame[1] == 0 {
        return Ok(None);
    }
    Ok(Some(Frame { pc: frame[1], sp: f.fp + 16, fp: frame[0], exact: false, by_fp: true }))
}

/// The caller's frame of `f`, which lies in mapping `m`; Err(counter) when the walk ends
/// early, Ok(None) at the outermost frame. Per frame, whichever the code supports: its CFI
/// row, else frame pointers.
#[inline(always)]
fn step(t: &Target, f: &Frame, m: &UnwindMapping) -> Result<Option<Frame>, Counter> {
    let bad = Counter::TruncatedBadFrame;
    if m.kind == mapping::FRAME_POINTERS {
        return frame_pointer_step(t, f, bad);
    }
    let lookup = if f.exact { f.pc } else { f.pc - 1 };
    let r = find_row(m, lookup);
    let cfa = match r.kind {
        row::RSP => f.sp + r.cfa_offset as u64,
        row::RBP if f.fp != 0 => f.fp + r.cfa_offset as u64,
        row::PLT => f.sp + if f.pc & 15 >= r.cfa_offset as u64 { 16 } else { 8 },
        row::DEREF_RBP if f.fp != 0 => read(f.fp.wrapping_add(r.cfa_offset as i16 as u64)).ok_or(bad)?,
        row::SIGNAL => {
            let pc = read(f.sp + UC_RIP).ok_or(bad)?;
            let sp = read(f.sp + UC_RSP).ok_or(bad)?;
            let fp = read(f.sp + UC_RBP).ok_or(bad)?;
            return Ok(Some(Frame { pc, sp, fp, exact: true, by_fp: false }));
        }
        row::END => return Ok(None),
        row::NONE => return frame_pointer_step(t, f, Counter::TruncatedNoCfi),
        _ => return Err(bad),
    };
    if cfa <= f.sp || cfa - f.sp > MAX_FRAME_SIZE {
        return Err(bad);
    }
    let ra = read(cfa - 8).ok_or(bad)?;
    let fp = match r.rbp {
        rbp::SAME => f.fp,
        rbp::UNKNOWN => 0,
        rbp::AT_RBP => read(f.fp).ok_or(bad)?,
        n => read(cfa.wrapping_add((n as i64 * 8) as u64)).ok_or(bad)?,
    };
    if ra == 0 {
        return Ok(None);
    }
    Ok(Some(Frame { pc: ra, sp: cfa, fp, exact: false, by_fp: false }))
}

/// Frames the probes unwind at most. The verifier checks each iteration on its own: with the
/// branch-free searches a program loads in ~0.25 s at 32 frames, ~0.5 s at 64 (with
/// branching searches 64 frames exceeded its million-instruction budget, and a `bpf_loop`
/// callback was no cheaper to verify).
const WALK_FRAMES: usize = MAX_FRAMES;
/// Frames the USDT contract's probe unwinds at most: its argument decoding leaves the verifier
/// less room, and with 64 frames (beside the V8 frame read and the cgo switch) it went past
/// the verifier's million instructions.
const SHALLOW_FRAMES: usize = 32;

/// Unwinds the stack at an allocator's return (rip is the caller's return address, rsp and
/// rbp as the caller has them), stores it in `STACKS` and returns its key (0 when it could not
/// be stored, then counted).
#[inline(always)]
pub fn record(t: &Target, regs: *const pt_regs) -> u64 {
    let (ip, sp, fp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    record_from::<WALK_FRAMES>(t, Frame { pc: ip, sp, fp, exact: true, by_fp: false })
}

/// [`record`], at most [`SHALLOW_FRAMES`] deep.
#[inline(always)]
pub fn record_shallow(t: &Target, regs: *const pt_regs) -> u64 {
    let (ip, sp, fp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    record_from::<SHALLOW_FRAMES>(t, Frame { pc: ip, sp, fp, exact: true, by_fp: false })
}

/// Unwinds the stack at the entry of a Go function called with a frame pointer chain (the Go
/// ABI on amd64): `[rsp]` is the return address into the caller, rbp the caller's frame.
#[inline(always)]
pub fn record_at_go_entry(t: &Target, regs: *const pt_regs) -> u64 {
    let (sp, fp) = unsafe { ((*regs).rsp, (*regs).rbp) };
    let Some(ra) = read(sp) else { return 0 };
    record_from::<WALK_FRAMES>(t, Frame { pc: ra, sp: sp + 8, fp, exact: false, by_fp: false })
}

/// The Go goroutine frame a cgo call came from, when `f` returns into
/// `runtime.asmcgocall.abi0` after its `CALL` to C on the system stack: the C code's frames
/// end there, the Go caller's stack is elsewhere. asmcgocall keeps the goroutine's `g` at
/// 48(SP) and the depth of its stack pointer below `g.stack.hi` at 40(SP) (Go 1.19's
/// asm_amd64.s); before switching it saved its stack and frame pointers in `g.sched`. The two
/// must agree, and the frame pointer must lie in the goroutine's stack, or the walk ends here.
///
/// Branch-free but for its two exits: each branch here would be walked by the verifier in
/// every one of the 64 frames (with the V8 frame read beside it, a branching version took the
/// classic probes past the verifier's million instructions). A failed read leaves zeros, which
/// fail the checks.
#[inline(always)]
fn cgo_step(f: &Frame, go: &GoTarget) -> Result<Option<Frame>, Counter> {
    // 1 when x != 0.
    let nz = |x: u64| (x | x.wrapping_neg()) >> 63;
    // 1 when a < b, for a and b below 2^63 (user addresses and masked depths are).
    let lt = |a: u64, b: u64| a.wrapping_sub(b) >> 63;
    let read = |at: u64| {
        let mut v = 0u64;
        unsafe { probe_read_raw(&mut v as *mut u64 as *mut _, 8, at as *const _) };
        v
    };
    const USER: u64 = (1 << 47) - 1;
    let g = read(f.sp + 48) & USER;
    let depth = read(f.sp + 40) & USER;
    let hi = read(g + go.g_stack_hi as u64) & USER;
    let sched_sp = read(g + go.g_sched_sp as u64) & USER;
    let sched_bp = read(g + go.g_sched_bp as u64) & USER;
    let old_sp = hi.wrapping_sub(depth) & USER;
    let ok = nz(g) & (nz(sched_sp ^ old_sp) ^ 1) & nz(depth) & (lt(MAX_FRAME_SIZE, depth) ^ 1) & (lt(sched_bp, old_sp) ^ 1) & lt(sched_bp, hi);
    if ok == 0 {
        return Err(Counter::TruncatedBadFrame);
    }
    let pc = read(old_sp);
    if pc == 0 {
        return Ok(None);
    }
    Ok(Some(Frame { pc, sp: old_sp + 8, fp: sched_bp, exact: false, by_fp: false }))
}

/// Unwinds from `start` (see [`record`]), stores the stack and returns its key.
#[inline(always)]
fn record_from<const FRAMES: usize>(t: &Target, start: Frame) -> u64 {
    let Some(frames) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let frames = unsafe { &mut *frames };
    // A Go program's cgo switch (all zero for other targets: never matches).
    let go = GO_TARGETS.get(t.slot).copied().unwrap_or_default();
    let Some(js_frames) = STACK_SCRATCH.get_ptr_mut(1) else {
        return 0;
    };
    // Frame i's JavaScript function at `js_frames.ips[i]` (V8 targets only).
    let js_frames = unsafe { &mut *js_frames };
    let js = JS_FRAME_CONFIG.get(t.slot).copied().unwrap_or_default();
    let ip = start.pc;
    frames.ips[0] = ip;
    let mut hash = mix(FNV_OFFSET, ip);
    let mut n = 1;
    let mut f = start;
    let mut m = find_mapping(t.slot, if start.exact { ip } else { ip - 1 });
    let mut ended = m.is_none();
    if ended {
        count(t, Counter::TruncatedUnmapped, 1);
    }
    while !ended && n < FRAMES {
        let Some(here) = m else { break };
        let in_cgocall = f.pc > go.cgocall_start && f.pc <= go.cgocall_end;
        let next = match if in_cgocall { cgo_step(&f, &go) } else { step(t, &f, &here) } {
            Ok(Some(next)) => next,
            Ok(None) => {
                ended = true;
                break;
            }
            Err(reason) => {
                count(t, reason, 1);
                ended = true;
                break;
            }
        };
        // Kept only when it lies in an executable mapping: the next step needs that mapping.
        // Callers are mostly in the same file as their callees: the search only when not.
        let lookup = if next.exact { next.pc } else { next.pc - 1 };
        m = if here.start <= lookup && lookup < here.end { Some(here) } else { find_mapping(t.slot, lookup) };
        if m.is_none() {
            count(t, Counter::TruncatedUnmapped, 1);
            ended = true;
            break;
        }
        // `f` keeps frame pointers: in a V8 target, its function.
        let mut js_fn = 0;
        if next.by_fp && js.enabled != 0 {
            js_fn = js_function(&js, f.fp);
        }
        js_frames.ips[n - 1] = js_fn;
        hash = mix(hash, js_fn);
        frames.ips[n] = next.pc;
        hash = mix(hash, next.pc);
        n += 1;
        f = next;
    }
    if !ended {
        count(t, Counter::TruncatedDepth, 1);
    }
    let id = if hash == 0 { 1 } else { hash };
    if unsafe { STACKS.get(&id) }.is_some() {
        return id;
    }
    // A new stack: what is left of the scratch from a deeper one must not be stored with it.
    // Volatile stores over a constant range: LLVM would otherwise call a byte-wise `memset`,
    // whose loop costs the verifier more than all the rest of the program.
    for (i, ip) in frames.ips.iter_mut().enumerate() {
        if i >= n {
            unsafe { core::ptr::write_volatile(ip, 0) };
        }
    }
    if js.enabled != 0 {
        // Only frames stepped from have a function; the last one does not.
        for (i, f) in js_frames.ips.iter_mut().enumerate() {
            if i + 1 >= n {
                unsafe { core::ptr::write_volatile(f, 0) };
            }
        }
        // Before the stack itself: a reader that finds the stack finds its functions. A full
        // map loses the names of this stack's frames, not the stack.
        let _ = JS_FRAMES.insert(&id, js_frames, 0);
    }
    match STACKS.insert(&id, frames, BPF_NOEXIST) {
        Ok(()) => id,
        Err(e) if e == -EEXIST => id,
        Err(_) => {
            count(t, Counter::DropStackMapFull, 1);
            0
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over the address's 8 bytes at once, then a multiply-shift finish: cheap, and
/// different stacks of one process practically never share a 64-bit value.
#[inline(always)]
fn mix(hash: u64, ip: u64) -> u64 {
    let h = (hash ^ ip).wrapping_mul(0x0000_0100_0000_01b3);
    h ^ (h >> 29)
}
