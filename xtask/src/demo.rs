//! `cargo xtask demo`: builds everything, starts `demo/leaky.c` (two leaking functions and one
//! that only churns) and records it for a few seconds with `memscope record`, then shows where
//! the report, leaks, flame graph and pprof files are. Needs root (eBPF).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{self, step},
    ebpf, setup,
};

const OUTPUTS: &[&str] = &[
    "report.txt",
    "leaks.json",
    "flamegraph.svg",
    "heap.folded",
    "heap.pb.gz",
];

pub fn run() -> Result<()> {
    cmd::require_root("`cargo xtask demo`")?;
    setup::debian_packages()?;
    ebpf::build(false)?; // runs setup's toolchain part first
    step("cargo build --release -p profiler-user");
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "profiler-user"]))
        .context("building memscope failed")?;
    let demo_dir = cmd::target_dir().join("demo");
    let program = compile_leaky(&demo_dir)?;
    let out = demo_dir.join("out");
    fresh_dir(&out)?;
    let target = Running::start(&program)?;
    thread::sleep(Duration::from_millis(500));
    record(target.pid(), &out)?;
    drop(target);
    show_outputs(&out);
    Ok(())
}

fn compile_leaky(demo_dir: &Path) -> Result<PathBuf> {
    let source = cmd::workspace_root().join("demo/leaky.c");
    let program = demo_dir.join("leaky");
    fs::create_dir_all(demo_dir)
        .with_context(|| format!("cannot create {}", demo_dir.display()))?;
    step(format!("cc demo/leaky.c -> {}", program.display()));
    cmd::run(
        Command::new("cc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(&program)
            .arg(&source),
    )
    .context("compiling the demo program failed (is a C compiler installed?)")?;
    Ok(program)
}

/// Empties the output directory so only this run's files are shown.
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn record(pid: u32, out: &Path) -> Result<()> {
    let memscope = cmd::target_dir().join("release/memscope");
    step(format!("memscope record --pid {pid} for 5 s"));
    cmd::run(
        Command::new(&memscope)
            .args(["record", "--pid", &pid.to_string()])
            .args([
                "--duration",
                "5s",
                "--min-age",
                "1s",
                "--sampling",
                "full",
                // A snapshot a second, so the report ends with growth verdicts.
                "--every",
                "1s",
                "--min-spacing",
                "500ms",
                "--out",
            ])
            .arg(out),
    )
    .context("memscope record failed")
}

fn show_outputs(out: &Path) {
    step(format!("output in {}:", out.display()));
    for name in OUTPUTS {
        let path = out.join(name);
        let mark = if path.is_file() { "" } else { "  (missing)" };
        println!("  {}{mark}", path.display());
    }
}

/// The demo program; killed when dropped, also on errors.
struct Running(Child);

impl Running {
    fn start(program: &Path) -> Result<Self> {
        step(format!("start {}", program.display()));
        let mut child = Command::new(program)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        thread::sleep(Duration::from_millis(50));
        if let Some(status) = child.try_wait()? {
            bail!("{} exited at once ({status})", program.display());
        }
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        step(format!("stop the demo program (pid {})", self.0.id()));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
