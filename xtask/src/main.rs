//! `cargo xtask`: the project's set-up, eBPF build, tests and demo, in Rust so that they run the
//! same on every machine. Each subcommand installs what it needs first and is idempotent.
//!
//! Targets Debian 12 with rustup (stable default, nightly present or installable); the apt step
//! and the privileged commands (`test`, `demo`) need root.
mod bench;
mod bench_js_names;
mod bench_agent;
mod bench_node;
mod bench_usdt;
mod bench_v8;
mod cmd;
mod demo;
mod deploy;
mod ebpf;
mod fuzz;
mod image;
mod setup;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "memscope's build and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, the nightly's rust-src, bpf-linker.
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none) and print its path.
    BuildEbpf {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build the eBPF object, run the workspace's tests (root).
    Test {
        /// Passed to the test runner (nextest or cargo test).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and record the demo leaky program for 5 s (root).
    Demo,
    /// Measure memscope's overhead against bpftrace, its agent CPU/RSS and snapshot time (root).
    Bench(bench::BenchArgs),
    /// Validate deploy/*.yaml (kubernetes-validate --strict, Kubernetes 1.29) and check the
    /// DaemonSet's agent flags against `memscope agent --help`.
    DeployCheck,
    /// Fuzz the parsers of everything a target or a client controls (N seconds per target).
    Fuzz(fuzz::FuzzArgs),
    /// Build the agent's container image from deploy/Containerfile (podman, buildah or docker).
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    cmd::ensure_cargo_bin_on_path();
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("[xtask] error: {err:#}");
            exit_code(&err)
        }
    }
}

fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Setup => setup::all()?,
        Task::BuildEbpf { debug } => {
            ebpf::build(debug)?;
        }
        Task::Test { args } => test::run(&args)?,
        Task::Demo => demo::run()?,
        Task::Bench(args) => bench::run(args)?,
        Task::DeployCheck => deploy::check()?,
        Task::Fuzz(args) => fuzz::run(args)?,
        Task::Image(args) => image::run(args)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A failed child's own exit code (so CI sees the tests' status), else 1.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    let code = err
        .chain()
        .find_map(|e| e.downcast_ref::<cmd::ChildFailed>())
        .and_then(|failed| failed.code)
        .and_then(|code| u8::try_from(code).ok())
        .filter(|&code| code != 0);
    ExitCode::from(code.unwrap_or(1))
}
