//! The user stack of an allocation: a frame-pointer walk done here rather than by
//! `bpf_get_stackid`. The kernel's walk only stops after reading through the chain's last
//! frame pointer (0, by the ABI's convention, or garbage where a function without frame
//! pointers used rbp): that read faults, and a fault costs as much as all the rest of a probe.
//! This walk checks each frame pointer before reading through it. Before it, the callers of
//! allocating wrappers without frame pointers (libstdc++'s operator new, libc's strdup) are
//! recovered from `CALLER_FRAMES`, which the agent fills from the libraries' CFI.
use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_user};
use profiler_common::{Counter, MAX_FRAMES};

use crate::{
    maps::{CALLER_FRAMES, CALLER_RANGE, STACKS, STACK_SCRATCH},
    probes::count,
};

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
/// Frames further apart than this are not one thread's stack.
const MAX_FRAME_SIZE: u64 = 16 << 20;

/// Walks the stack at an allocator's return (rip is the caller's return address, just popped
/// from `[rsp - 8]`; rbp and the caller's frame are as they were at the entry), stores it in
/// `STACKS` and returns its key (0 when it could not be stored, then counted).
#[inline(always)]
pub fn record(regs: *const pt_regs) -> u64 {
    let Some(frames) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let frames = unsafe { &mut *frames };
    let (ip, sp, mut fp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    frames.ips[0] = ip;
    let mut hash = mix(FNV_OFFSET, ip);
    let mut low = sp;
    let mut n = 1;
    // Callers without frame pointers (libstdc++'s operator new, libc's strdup) leave rbp to
    // their own caller, whose frame the walk below would skip: CALLER_FRAMES says where their
    // return address is (and their saved rbp, if they reuse the register), at most 3 deep.
    let (lowest, highest) = (CALLER_RANGE.get(0).copied().unwrap_or(0), CALLER_RANGE.get(1).copied().unwrap_or(0));
    let (mut at, mut ret) = (sp - 8, ip);
    for _ in 0..3 {
        // Outside the range (most calls), or the range not filled: nothing to look up.
        if ret < lowest || ret > highest {
            break;
        }
        let Some(&frame) = (unsafe { CALLER_FRAMES.get(&ret) }) else { break };
        let rbp_slot = frame >> 32;
        if rbp_slot != 0 {
            if let Ok(saved) = unsafe { bpf_probe_read_user((at + rbp_slot - 1) as *const u64) } {
                fp = saved;
            }
        }
        at += frame & 0xffff_ffff;
        let Ok(up) = (unsafe { bpf_probe_read_user(at as *const u64) }) else { break };
        frames.ips[n] = up;
        hash = mix(hash, up);
        n += 1;
        ret = up;
    }
    while n < MAX_FRAMES {
        // A frame pointer lies above the previous one, inside the stack, 8-byte aligned.
        if fp < low || fp - low > MAX_FRAME_SIZE || fp & 7 != 0 {
            break;
        }
        let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
            break;
        };
        let ret = frame[1];
        if ret == 0 {
            break;
        }
        frames.ips[n] = ret;
        hash = mix(hash, ret);
        n += 1;
        low = fp + 16;
        fp = frame[0];
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
    match STACKS.insert(&id, frames, BPF_NOEXIST) {
        Ok(()) => id,
        Err(e) if e == -EEXIST => id,
        Err(_) => {
            count(Counter::DropStackMapFull, 1);
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
