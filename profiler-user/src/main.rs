//! The `memscope` binary: parses the command line and runs it; errors are printed as one line
//! per cause and give a non-zero exit code.
//!
//! The binary allocates with mimalloc, not glibc's malloc: the agent runs for months with
//! threads that come and go (attaches, V8 sessions, blocking tasks) and two per target, and
//! glibc gave them up to 8 arenas per core (~20 MB each after churn, rarely trimmed), which made
//! the agent's RSS creep toward its pod's limit. mimalloc is told to give freed pages back at
//! once and to commit arena memory on demand (see [`tune_allocator`]). The library
//! (`profiler_user`) does not choose an allocator: tests and embedders keep theirs.
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option numbers (`mi_option_e` in its mimalloc.h, the same in v2 and v3).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed pages are purged (returned to the OS) at once instead of after 10 ms, and arenas are
/// committed as they are used. With the default delay, a purge is done only when the thread
/// that freed the memory calls the allocator again, and most of the agent's threads sleep
/// (the per-target ones wake a few times a second): with 50 targets pushing profiles its RSS
/// was 160-190 MiB instead of 90 MiB (`cargo xtask bench --soak-only`).
fn tune_allocator() {
    // SAFETY: plain setters of mimalloc's global options, valid at any time; both options are
    // read when memory is purged or an arena is reserved.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
    }
}

/// Runs [`tune_allocator`] from the process's constructors, before `main` and before the
/// first allocation: mimalloc reserves its first arena at that allocation, with the options in
/// force then (an arena committed eagerly keeps purged pages resident; set from `main`, the
/// options came too late for it: 85-92 MiB of RssAnon with 50 pushing targets instead of
/// 15-41 MiB).
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn tune() {
        tune_allocator();
    }
    tune
};

fn main() -> ExitCode {
    profiler_user::cli::main()
}
