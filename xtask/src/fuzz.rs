//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the parser fuzz targets of
//! `profiler_user::fuzzing` (stable toolchain, nothing to install), N seconds each; a crash
//! saves its input under `profiler-user/fuzz/regressions/` and fails the task.
use anyhow::{Context as _, Result};

use crate::cmd;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the mutation generator (runs are reproducible per seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Targets to run (default: all): elf, perf_map, proc_files, token_file, trigger_spec, request.
    targets: Vec<String>,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let mut c = cmd::cargo();
    c.args(["run", "--release", "-p", "profiler-user", "--example", "fuzz", "--", "--seconds"]).arg(args.seconds.to_string());
    if let Some(seed) = args.seed {
        c.arg("--seed").arg(seed.to_string());
    }
    cmd::run(c.args(&args.targets)).context("fuzzing failed (a crash saves its input under profiler-user/fuzz/regressions/)")
}
