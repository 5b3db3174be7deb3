//! memscope's kernel side: uprobes on the target's allocator that keep a table of live
//! allocations with their user stacks.
//!
//! Data flow: `alloc_entry` (uprobe on malloc, calloc, realloc, ...) decides whether the call is
//! sampled, captures the stack and parks the call's arguments in `INFLIGHT`; `alloc_return`
//! (uretprobe on the same functions) reads the result and records the allocation in `LIVE` and
//! its stack's totals in `STACK_STATS`; `free_entry` forgets it again. Every event that cannot be
//! recorded is counted in `COUNTERS` by reason. The attach cookie says which function a probe is
//! on and where the return address sits (see `profiler_common::encode_cookie`).
//!
//! Needs a kernel with uprobes, BPF attach cookies (5.15+) and atomics (5.12+).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod maps;
mod probes;
mod stack;
mod triggers;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
