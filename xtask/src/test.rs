//! `cargo xtask test`: full set-up, the eBPF object, then the workspace's tests (all members but
//! `profiler-ebpf`, which only builds for the BPF target).
//!
//! Uses `cargo nextest` when installed (doc tests run separately first, since nextest skips them),
//! else `cargo test`. Extra arguments after `--` go to the test runner; doc tests run only when
//! none are given. Needs root: the end-to-end tests load eBPF programs.
use anyhow::{Context, Result};

use crate::{
    cmd::{self, step},
    deploy, ebpf, setup,
};

const EXCLUDE: [&str; 3] = ["--workspace", "--exclude", "profiler-ebpf"];

pub fn run(extra: &[String]) -> Result<()> {
    cmd::require_root("`cargo xtask test`")?;
    setup::debian_packages()?;
    setup::npm_packages()?; // memlab, for node_v8_exports_e2e
    ebpf::build(false)?; // runs setup's toolchain part first
    deploy::check()?;
    if has_nextest() {
        // Doc tests first: CI reads the test runner's closing lines, which must be nextest's
        // summary of the real suite, not the doc tests' "0 passed".
        doc_tests(extra)?;
        step("cargo nextest run --workspace");
        cmd::run(
            cmd::cargo()
                .args(["nextest", "run", "--no-fail-fast"])
                .args(EXCLUDE)
                .args(extra),
        )
        .context("tests failed")
    } else {
        step("cargo test --workspace (cargo-nextest not installed)");
        cmd::run(
            cmd::cargo()
                .args(["test", "--no-fail-fast"])
                .args(EXCLUDE)
                .args(extra),
        )
        .context("tests failed")
    }
}

fn has_nextest() -> bool {
    cmd::succeeds(cmd::cargo().args(["nextest", "--version"]))
}

fn doc_tests(extra: &[String]) -> Result<()> {
    if !extra.is_empty() {
        step("doc tests skipped (test arguments given)");
        return Ok(());
    }
    step("cargo test --doc --workspace");
    cmd::run(cmd::cargo().args(["test", "--doc"]).args(EXCLUDE)).context("doc tests failed")
}
