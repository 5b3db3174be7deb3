//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the parser fuzz targets of
//! `profiler_user::fuzzing`, coverage-guided: `cargo bolero test` with libFuzzer on the harness
//! `profiler-user/tests/fuzz_smoke.rs`, N seconds each, AddressSanitizer on the nightly
//! toolchain. Installs cargo-bolero when it is missing. The corpus grows in
//! `profiler-user/fuzz/corpus/<target>/` (seeds written first); a crash, timeout or
//! out-of-memory input lands in `profiler-user/fuzz/regressions/<target>/` (which libFuzzer also
//! reads back as inputs) and fails the task. The first run builds every dependency instrumented
//! into `target/fuzz/` (minutes); later runs reuse it.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, step};

/// The cargo-bolero release matching the `bolero` dev-dependency of profiler-user.
const CARGO_BOLERO_VERSION: &str = "0.13.4";

/// The targets of `profiler_user::fuzzing::TARGETS` (xtask does not link profiler-user).
pub const TARGETS: [&str; 6] = [
    "elf",
    "perf_map",
    "proc_files",
    "token_file",
    "trigger_spec",
    "request",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// libFuzzer's seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Sanitizer: `address` (nightly) or `NONE` (runs on the stable toolchain).
    #[arg(long, default_value = "address")]
    sanitizer: String,
    /// Targets to run (default: all): elf, perf_map, proc_files, token_file, trigger_spec, request.
    targets: Vec<String>,
}

/// What libFuzzer said at the end of one run.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub execs: Option<u64>,
    pub seconds: Option<u64>,
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    pub corpus: Option<u64>,
    pub execs_per_s: Option<u64>,
}

impl Summary {
    /// Reads libFuzzer's status lines (`#N DONE cov: C ft: F corp: K/.. exec/s: E ...`, the
    /// last one wins) and its closing `Done N runs in S second(s)`.
    pub fn feed(&mut self, line: &str) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Done ") {
            let mut w = rest.split_whitespace();
            self.execs = w.next().and_then(|n| n.parse().ok()).or(self.execs);
            self.seconds = w.nth(2).and_then(|s| s.parse().ok()).or(self.seconds);
            return;
        }
        if !line.starts_with('#') || !line.contains("cov: ") {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.split('/').next()?.parse().ok()
        };
        self.cov = after("cov:").or(self.cov);
        self.ft = after("ft:").or(self.ft);
        self.corpus = after("corp:").or(self.corpus);
        self.execs_per_s = after("exec/s:").or(self.execs_per_s);
        self.execs = words[0][1..].parse().ok().or(self.execs);
    }
}

pub fn run(args: FuzzArgs) -> Result<()> {
    if let Some(bad) = args.targets.iter().find(|n| !TARGETS.contains(&n.as_str())) {
        bail!(
            "unknown fuzz target {bad:?} (targets: {})",
            TARGETS.join(", ")
        );
    }
    ensure_cargo_bolero()?;
    let user = cmd::workspace_root().join("profiler-user");
    let selected: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| args.targets.is_empty() || args.targets.iter().any(|n| n == t))
        .collect();
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    for target in selected {
        let corpus = user.join("fuzz/corpus").join(target);
        let crashes = user.join("fuzz/regressions").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let before = files(&crashes);
        step(format!(
            "cargo bolero test {target}: libFuzzer, {} s",
            args.seconds
        ));
        let mut c = cmd::rustup_proxy("cargo");
        c.args([
            "bolero",
            "test",
            "--package",
            "profiler-user",
            "--engine",
            "libfuzzer",
        ])
        .args(["--sanitizer", &args.sanitizer])
        .args(["-T", &format!("{}s", args.seconds)])
        .arg("--corpus-dir")
        .arg(&corpus)
        .arg("--crashes-dir")
        .arg(&crashes)
        .env("MEMSCOPE_FUZZ_CORPUS", &corpus);
        if args.sanitizer != "NONE" {
            c.args(["--toolchain", "nightly"]);
        }
        if let Some(seed) = args.seed {
            c.args(["-S", &seed.to_string()]);
        }
        c.arg(format!("fuzz_{target}"));
        let (ok, summary) = run_streaming(&mut c)?;
        let new: Vec<PathBuf> = files(&crashes).difference(&before).cloned().collect();
        let corpus_files = files(&corpus).len();
        summaries.push((target, summary, corpus_files, new.len()));
        if !ok || !new.is_empty() {
            failed.push(target);
            for path in &new {
                step(format!(
                    "{target}: crashing input saved as {}",
                    path.display()
                ));
            }
            if new.is_empty() {
                step(format!(
                    "{target}: the run failed without writing an input (see above)"
                ));
            }
        }
    }
    for (target, s, corpus_files, crashes) in &summaries {
        let n = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        step(format!(
            "fuzz {target}: {} execs in {} s ({} exec/s), cov {}, ft {}, corpus {} inputs ({corpus_files} files), {crashes} crash(es)",
            n(s.execs),
            n(s.seconds),
            n(s.execs_per_s),
            n(s.cov),
            n(s.ft),
            n(s.corpus),
        ));
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes in {} (inputs under profiler-user/fuzz/regressions/<target>/, replayed by tests/fuzz_smoke.rs)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo install cargo-bolero` when `cargo bolero` is missing (libFuzzer engine only: the AFL
/// and honggfuzz engines need more system libraries).
fn ensure_cargo_bolero() -> Result<()> {
    let installed = cmd::output(cmd::rustup_proxy("cargo").args(["bolero", "--version"]))
        .is_ok_and(|v| v.contains(CARGO_BOLERO_VERSION));
    if installed {
        return Ok(());
    }
    step(format!(
        "cargo install cargo-bolero {CARGO_BOLERO_VERSION} (libFuzzer engine, ~2 min)"
    ));
    cmd::run(cmd::rustup_proxy("cargo").args([
        "install",
        "cargo-bolero",
        "--version",
        CARGO_BOLERO_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        "libfuzzer",
    ]))
}

/// Runs `c`, passing its output through, and reads libFuzzer's figures from it.
fn run_streaming(c: &mut std::process::Command) -> Result<(bool, Summary)> {
    let what = cmd::describe(c);
    let mut child = c
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let mut summary = Summary::default();
    let stderr = child.stderr.take().expect("piped stderr");
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        summary.feed(&line);
        // libFuzzer prints a line per new corpus input: keep its pulses, summaries and findings.
        let noisy = line.starts_with("\tNEW_FUNC")
            || (line.starts_with('#') && (line.contains("\tNEW ") || line.contains("\tREDUCE ")));
        if !noisy {
            eprintln!("{line}");
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("`{what}` did not finish"))?;
    Ok((status.success(), summary))
}

fn files(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Summary, TARGETS};

    /// TARGETS names what profiler-user's fuzzing module and harness have.
    #[test]
    fn targets_match_profiler_user() {
        let root = crate::cmd::workspace_root().join("profiler-user");
        let module = std::fs::read_to_string(root.join("src/fuzzing.rs")).unwrap();
        let harness = std::fs::read_to_string(root.join("tests/fuzz_smoke.rs")).unwrap();
        let listed = module.matches("Target { name: \"").count();
        assert_eq!(
            listed,
            TARGETS.len(),
            "fuzzing::TARGETS and xtask's TARGETS differ"
        );
        for t in TARGETS {
            assert!(
                module.contains(&format!("Target {{ name: \"{t}\"")),
                "{t} not in fuzzing::TARGETS"
            );
            assert!(
                harness.contains(&format!("fuzz_{t} => \"{t}\"")),
                "{t} has no harness test"
            );
        }
    }

    #[test]
    fn reads_libfuzzer_figures() {
        let mut s = Summary::default();
        for line in [
            "#2\tINITED cov: 120 ft: 130 corp: 3/1024b exec/s: 0 rss: 40Mb",
            "#524288\tpulse  cov: 900 ft: 2100 corp: 310/20Kb lim: 4096 exec/s: 87381 rss: 300Mb",
            "#1000000\tDONE   cov: 912 ft: 2222 corp: 321/22Kb lim: 4096 exec/s: 16393 rss: 310Mb",
            "Done 1000000 runs in 61 second(s)",
        ] {
            s.feed(line);
        }
        assert_eq!(
            s,
            Summary {
                execs: Some(1_000_000),
                seconds: Some(61),
                cov: Some(912),
                ft: Some(2222),
                corpus: Some(321),
                execs_per_s: Some(16393)
            }
        );
    }
}
