//! memscope's kernel side: uprobes on the target's allocator that keep a table of live
//! allocations with their user stacks.
//!
//! Data flow: at an allocator's entry (malloc, calloc, realloc, ...) the probe decides whether
//! the call is sampled and parks it in the thread's `INFLIGHT` slot; at its return it reads the
//! result, walks the user stack into `STACKS` (`stack.rs`) and records the allocation in `LIVE`
//! and its stack's totals in `STACK_STATS`; at `free` it forgets it again. Every event
//! that cannot be recorded is counted in `COUNTERS` by reason. `malloc_session`,
//! `alloc_session` and `free_session` do entry and return in uprobe.session programs (Linux
//! 6.13+), so unsampled calls skip the return trap; `alloc_entry` + `alloc_return` (uprobe +
//! uretprobe) and `free_entry` do the same on older kernels. The attach cookie says which
//! function a probe is on (see `profiler_common::encode_cookie`).
//!
//! A Go program's own heap is seen through its runtime's sampling instead (`go.rs`): one
//! probe where the runtime records a sampled allocation, one where the GC frees it.
//!
//! Needs a kernel with uprobes, BPF attach cookies (5.15+) and atomics (5.12+).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod discover;
mod go;
mod maps;
mod probes;
mod stack;
mod triggers;
mod usdt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
