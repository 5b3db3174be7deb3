//! `cargo xtask setup`: installs what the build and the tests need, and only what is missing, so a
//! second run installs nothing.
//!
//! - Debian packages, checked one by one with `dpkg-query`; `apt-get update` runs once, and only
//!   when something is missing. Needs root then; skipped with a note on machines without dpkg.
//! - memlab's CLI from npm (globally, when `memlab` is not on PATH).
//! - The nightly toolchain and its `rust-src` (for `-Z build-std=core`).
//! - bpf-linker 0.13.0 built against the nightly's own libLLVM (Debian 12's LLVM 14/15 does not
//!   match the nightly's), through symlinks in `$HOME/.local/lib/bpf-linker-llvm/lib` (which is
//!   also the binary's rpath). The LLVM major is read from `rustc +nightly -vV`, never hard-coded.
use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, step};

/// Debian packages the tests and the demo use (node comes from apt only when absent).
const PACKAGES: &[&str] = &[
    "gcc",                            // `cc` for the test fixtures, the demo and bench targets
    "libc6-dev",                      // their C headers (not pulled in without recommends)
    "g++",                            // `c++` for the C++ new/delete fixture
    "protobuf-compiler",              // protoc, to decode pprof output in tests
    "golang-github-google-pprof-dev", // pprof's profile.proto
    "bpftrace",                       // eBPF peer for the benchmark
    "heaptrack",                      // ground truth for leak tests
    "openssl",                        // test certificates
    "systemtap-sdt-dev",              // <sys/sdt.h>, for the USDT trigger fixture
    "util-linux",                     // setpriv, for the missing-privilege test
    "libjemalloc2",                   // other allocators, preloaded in a tracing test
    "libtcmalloc-minimal4",
    "musl-tools",                     // musl-gcc, for the static musl fixture (coverage_e2e)
    "libc6-dbg",    // names in libc (start_thread, raise) for the unwinding tests
    "redis-server", // a Debian program without frame pointers, traced under load
    "redis-tools",  // redis-benchmark, its load generator
    "iproute2",                       // `ip`, for the Node.js test in a network namespace of its own
    "slowhttptest",                   // slowloris against the agent (agent_dos_e2e)
    "curl",                           // the second client, bound to 127.0.0.2, during it
    "golang-go",                      // `go tool pprof` (node_v8_exports_e2e); Go fixtures (go_heap_e2e)
    "postgresql",                     // a fork-per-connection server (agent_cost_e2e, `cargo xtask bench --pg-only`)
    "prometheus",                     // `promtool check metrics` on /metrics (node_agent_e2e)
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything: Debian packages, then the toolchain part.
pub fn all() -> Result<()> {
    debian_packages()?;
    npm_packages()?;
    toolchain()
}

/// npm packages the tests use: memlab's CLI (node_v8_exports_e2e gives it three heap snapshots
/// taken through the agent), installed globally once. Puppeteer's browser download is skipped:
/// memlab only reads snapshot files here. Its install scripts are not needed either.
pub fn npm_packages() -> Result<()> {
    if cmd::find_in_path("memlab").is_some() {
        step("memlab: present");
        return Ok(());
    }
    cmd::require_root("installing memlab (npm install -g @memlab/cli)")?;
    step("npm install -g @memlab/cli");
    cmd::run(
        Command::new("npm")
            .args([
                "install",
                "--global",
                "--no-audit",
                "--no-fund",
                "@memlab/cli@2",
            ])
            .env("PUPPETEER_SKIP_DOWNLOAD", "1")
            .env("PUPPETEER_SKIP_CHROMIUM_DOWNLOAD", "1")
            .stdin(Stdio::null()),
    )
    .context("npm install -g @memlab/cli failed")
}

/// The Rust part only (what `build-ebpf` needs): nightly, its rust-src, bpf-linker.
pub fn toolchain() -> Result<()> {
    nightly()?;
    rust_src()?;
    bpf_linker()
}

fn wanted_packages() -> Vec<&'static str> {
    let mut wanted = PACKAGES.to_vec();
    if cmd::find_in_path("node").is_none() {
        wanted.push("nodejs");
    }
    if cmd::find_in_path("npm").is_none() {
        wanted.push("npm"); // for memlab (npm_packages)
    }
    wanted
}

fn is_installed(package: &str) -> bool {
    let status = cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]));
    status.is_ok_and(|s| s.trim() == "install ok installed")
}

/// Debian packages only; the Rust part runs from `ebpf::build`.
pub fn debian_packages() -> Result<()> {
    let wanted = wanted_packages();
    if cmd::find_in_path("dpkg-query").is_none() {
        step(format!(
            "no dpkg here: install these yourself: {}",
            wanted.join(" ")
        ));
        return Ok(());
    }
    let missing: Vec<_> = wanted.into_iter().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    cmd::require_root(&format!("installing {}", missing.join(" ")))?;
    step("apt-get update");
    apt_get(&["update", "-q"])?;
    step(format!("apt-get install {}", missing.join(" ")));
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args)
}

/// apt-get without prompts, waiting for a dpkg lock held by someone else instead of failing.
fn apt_get(args: &[&str]) -> Result<()> {
    cmd::run(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
    .with_context(|| format!("apt-get {} failed", args[0]))
}

fn nightly() -> Result<()> {
    let list = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs)")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain: present");
        return Ok(());
    }
    step("rustup toolchain install nightly");
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn rust_src() -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("rustup component add rust-src --toolchain nightly");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let prefix = link_nightly_llvm()?;
    if bpf_linker_runs() {
        step(format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM {major} of the nightly, ~1 min)"
    ));
    cmd::run(
        cmd::rustup_proxy("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("cannot build bpf-linker")?;
    if !bpf_linker_runs() {
        bail!("bpf-linker was installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}: is $CARGO_HOME/bin on PATH?");
    }
    Ok(())
}

/// `bpf-linker --version` runs (its libLLVM resolves) and reports the pinned version.
fn bpf_linker_runs() -> bool {
    let version = cmd::output(
        Command::new("bpf-linker")
            .arg("--version")
            .stderr(Stdio::null()),
    );
    version.is_ok_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
}

fn nightly_rustc(args: &[&str]) -> Result<String> {
    let mut rustc = cmd::rustup_proxy("rustc");
    rustc.arg("+nightly").args(args);
    cmd::output(&mut rustc)
}

/// The nightly's LLVM major version, from the `LLVM version: 22.1.4` line.
fn nightly_llvm_major() -> Result<u32> {
    let verbose = nightly_rustc(&["-vV"])?;
    let line = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` prints no LLVM version")?;
    let major = line.trim().split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("cannot read the LLVM major from {line:?}"))
}

/// Points `$HOME/.local/lib/bpf-linker-llvm/lib/{libLLVM.so, libLLVM.so.<soname>}` at the
/// nightly's libLLVM (every run: cheap, and it follows nightly updates). Returns the prefix.
fn link_nightly_llvm() -> Result<PathBuf> {
    let sysroot = PathBuf::from(nightly_rustc(&["--print", "sysroot"])?.trim());
    let lib = nightly_libllvm(&sysroot)?;
    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/lib/bpf-linker-llvm");
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    remove_dangling_links(&dir)?;
    let name = lib.file_name().context("libLLVM path has no file name")?;
    force_symlink(&lib, &dir.join("libLLVM.so"))?;
    force_symlink(&lib, &dir.join(name))?;
    Ok(prefix)
}

fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let libdir = sysroot.join("lib");
    let entries =
        fs::read_dir(&libdir).with_context(|| format!("cannot list {}", libdir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))
}

/// Links left from an older nightly point nowhere; drop them so the loader cannot trip on them.
fn remove_dangling_links(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let is_link = path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        if is_link && !path.exists() {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// `ln -sfn target link`, atomically (a bpf-linker running meanwhile never sees the link missing).
fn force_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}
