//! The `memscope` binary: parses the command line and runs it; errors are printed as one line
//! per cause and give a non-zero exit code.
//!
//! The binary allocates with mimalloc, not glibc's malloc: the agent runs for months with
//! threads that come and go (one per attach, per V8 session, per blocking task), and glibc gave
//! each its own arena (up to 8 per core, ~20 MB each after churn, rarely trimmed), which made
//! the agent's RSS creep toward its pod's limit. mimalloc's per-thread heaps are given back to
//! the OS when their pages are free. The library (`profiler_user`) does not choose an
//! allocator: tests and embedders keep theirs.
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    profiler_user::cli::main()
}
