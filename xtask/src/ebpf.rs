//! `cargo xtask build-ebpf`: builds the `profiler-ebpf` object with the nightly toolchain
//! (`-Z build-std=core`, target `bpfel-unknown-none`, linked by bpf-linker with BTF).
//!
//! The release object lands at `target/bpfel-unknown-none/release/profiler-ebpf`, where
//! profiler-user's build.rs embeds it from (and rebuilds when it changes). A `--debug` object is
//! not embedded unless `MEMSCOPE_EBPF_OBJECT` points at it, and is built without overflow checks
//! (they need 128-bit multiplication, which BPF lacks).
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{
    cmd::{self, step},
    setup,
};

const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "profiler-ebpf";

/// rustc flags for the eBPF object only (cargo does not apply them to build scripts when
/// `--target` is given).
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "bpf_target_arch=\"x86_64\"",
    "-C",
    "debuginfo=2",
    "-C",
    "link-arg=--btf",
];

/// Makes sure the toolchain is there, builds the object and returns its path.
pub fn build(debug: bool) -> Result<PathBuf> {
    setup::toolchain()?;
    let profile = if debug { "debug" } else { "release" };
    step(format!(
        "cargo +nightly build -p {PACKAGE} --target {TARGET} ({profile})"
    ));
    let mut cargo = cmd::rustup_proxy("cargo");
    cargo
        .arg("+nightly")
        .args([
            "build",
            "-p",
            PACKAGE,
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_TARGET_DIR", cmd::target_dir())
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        .env_remove("RUSTFLAGS");
    if debug {
        // Overflow checks on u64 multiplication call `__multi3`, which BPF does not have.
        cargo.env("CARGO_PROFILE_DEV_OVERFLOW_CHECKS", "false");
    } else {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo).context("building the eBPF object failed")?;
    let object = cmd::target_dir().join(TARGET).join(profile).join(PACKAGE);
    anyhow::ensure!(
        object.is_file(),
        "the build left no object at {}",
        object.display()
    );
    step(format!("eBPF object: {}", object.display()));
    Ok(object)
}
