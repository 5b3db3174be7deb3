//! Process helpers shared by the subcommands: where the workspace and its target directory are,
//! how to start `cargo` (host toolchain) and rustup's `+nightly` proxies, and running a child
//! with its exit status kept, so `cargo xtask test` can exit with the tests' own status.
//!
//! Limits: the target directory honours `CARGO_TARGET_DIR` but not a `build.target-dir` set in a
//! cargo config file.
use std::{
    env,
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Prints one short line saying what xtask does next.
pub fn step(msg: impl fmt::Display) {
    eprintln!("[xtask] {msg}");
}

/// The workspace root (the directory holding this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` made absolute, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => absolute(PathBuf::from(dir)),
        None => workspace_root().join("target"),
    }
}

fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    env::current_dir()
        .map(|cwd| cwd.join(&path))
        .unwrap_or(path)
}

/// `$CARGO_HOME/bin` (default `$HOME/.cargo/bin`): where rustup's proxies and `cargo install` live.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// Puts `$CARGO_HOME/bin` on PATH if it is missing, so a freshly installed bpf-linker is found
/// by rustc and by our own checks.
pub fn ensure_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)));
    if let Ok(joined) = joined {
        env::set_var("PATH", joined);
    }
}

/// The first executable called `name` on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `cargo` of the toolchain that runs xtask, in the workspace root, with a relative
/// `CARGO_TARGET_DIR` made absolute (profiler-user's build.rs reads it from another directory).
pub fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    remove_outer_package_vars(&mut cmd);
    if env::var_os("CARGO_TARGET_DIR").is_some() {
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    cmd
}

/// Drops what `cargo run` set about the xtask package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...):
/// cargo compares tracked env vars such as `CARGO_MANIFEST_DIR` with its own environment, so
/// leaving them makes some crates (ring) rebuild every time xtask and a plain cargo alternate.
fn remove_outer_package_vars(cmd: &mut Command) {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
    ];
    for (key, _) in env::vars_os() {
        let key_str = key.to_string_lossy();
        if EXACT.contains(&key_str.as_ref()) || key_str.starts_with("CARGO_PKG_") {
            cmd.env_remove(&key);
        }
    }
}

/// A rustup proxy (`cargo`, `rustc`) with the variables that the outer cargo and rustup set for
/// xtask removed, so that `+toolchain` and the child's own choices decide, not ours.
pub fn rustup_proxy(tool: &str) -> Command {
    let proxy = cargo_bin_dir()
        .map(|bin| bin.join(tool))
        .filter(|p| p.is_file());
    let mut cmd = Command::new(proxy.unwrap_or_else(|| tool.into()));
    cmd.current_dir(workspace_root());
    remove_outer_package_vars(&mut cmd);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A child that ran but did not succeed; `main` exits with its code.
#[derive(Debug)]
pub struct ChildFailed {
    pub command: String,
    pub code: Option<i32>,
}

impl fmt::Display for ChildFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with status {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for ChildFailed {}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    let args = cmd.get_args().map(OsStr::to_string_lossy);
    std::iter::once(program.into())
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdout/stderr; a non-zero exit is a [`ChildFailed`] error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        return Err(ChildFailed {
            command: describe(cmd),
            code: status.code(),
        }
        .into());
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails when it cannot start or exits non-zero (the error
/// then carries what it printed on stderr).
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        let failed = ChildFailed {
            command: describe(cmd),
            code: out.status.code(),
        };
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let err = anyhow::Error::new(failed);
        return Err(if stderr.is_empty() {
            err
        } else {
            err.context(stderr)
        });
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// Whether `cmd` starts and exits 0, its output discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether xtask runs as root (effective uid 0).
pub fn is_root() -> Result<bool> {
    let uid = output(Command::new("id").arg("-u")).context("cannot find out the user id")?;
    Ok(uid.trim() == "0")
}

/// Fails with a clear message unless xtask runs as root; `why` says what needs it.
pub fn require_root(why: &str) -> Result<()> {
    if !is_root()? {
        bail!("{why} needs root (it installs Debian packages and loads eBPF programs): run it as root");
    }
    Ok(())
}
