//! `cargo xtask image`: the agent's container image from `deploy/Containerfile`.
//!
//! Builds the eBPF object and `memscope` (release; the object is embedded in the binary), then
//! runs the first container engine found on PATH that answers (`podman`, `buildah`, `docker`,
//! in that order; `--engine` picks one) with `target/release` as the build context (only the
//! binary is copied, the whole target directory is not sent). The image is tagged
//! `memscope:VERSION` (the workspace version; `--tag` overrides), the name `deploy/`'s
//! kustomization sets. Without a working engine it stops with one line saying what was tried;
//! the base image (`debian:bookworm-slim`) must be pullable or already present.
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cmd::{self, step};

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Image name and tag (default: memscope:WORKSPACE_VERSION).
    #[arg(long)]
    tag: Option<String>,
    /// Container engine to use instead of the first of podman, buildah, docker that works.
    #[arg(long, value_parser = ["podman", "buildah", "docker"])]
    engine: Option<String>,
}

const ENGINES: &[&str] = &["podman", "buildah", "docker"];

/// Whether `engine` is installed and can build (docker needs its daemon).
fn usable(engine: &str) -> Result<(), String> {
    if cmd::find_in_path(engine).is_none() {
        return Err(format!("{engine}: not installed"));
    }
    let probe = match engine {
        "docker" => vec!["info", "--format", "{{.ServerVersion}}"],
        _ => vec!["version"],
    };
    let out = Command::new(engine)
        .args(&probe)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let line = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed")
                .trim();
            Err(format!(
                "{engine}: `{engine} {}` failed: {line}",
                probe.join(" ")
            ))
        }
        Err(e) => Err(format!("{engine}: {e}")),
    }
}

pub fn run(args: ImageArgs) -> Result<()> {
    let candidates: Vec<&str> = match &args.engine {
        Some(e) => vec![e.as_str()],
        None => ENGINES.to_vec(),
    };
    let mut tried = Vec::new();
    let engine = candidates.into_iter().find(|e| match usable(e) {
        Ok(()) => true,
        Err(why) => {
            tried.push(why);
            false
        }
    });
    let Some(engine) = engine else {
        bail!(
            "no container engine to build the image with ({}); install podman (apt-get install podman) or start docker, \
             or build by hand: podman build -f deploy/Containerfile -t memscope:TAG target/release",
            tried.join("; ")
        );
    };
    let tag = args
        .tag
        .unwrap_or_else(|| format!("memscope:{}", env!("CARGO_PKG_VERSION")));
    crate::ebpf::build(false)?;
    step("cargo build --release -p profiler-user");
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "profiler-user"]))
        .context("building memscope failed")?;
    let context = cmd::target_dir().join("release");
    let containerfile = cmd::workspace_root().join("deploy/Containerfile");
    let mut build = Command::new(engine);
    match engine {
        "buildah" => build.args(["bud", "--layers"]),
        _ => build.arg("build"),
    };
    build
        .arg("-f")
        .arg(&containerfile)
        .arg("-t")
        .arg(&tag)
        .arg(&context);
    step(format!(
        "{} (context {})",
        cmd::describe(&build),
        context.display()
    ));
    cmd::run(&mut build).with_context(|| format!("{engine} could not build {tag}"))?;
    step(format!(
        "built {tag}; push it to your registry and set it in deploy/kustomization.yaml (images:)"
    ));
    Ok(())
}
