//! The fuzz smoke run of `cargo xtask test`: every saved regression input
//! (`fuzz/regressions/<target>/*`) runs without a panic, and each fuzz target survives a
//! short run (`MEMSCOPE_FUZZ_SECONDS`, default 3 s each) from a seed that changes per run.
use std::time::Duration;

use profiler_user::fuzzing::{self, TARGETS};

/// Regression inputs of past crashes no longer crash.
#[test]
fn regression_inputs_do_not_crash() {
    let mut replayed = 0;
    for t in TARGETS {
        let Ok(dir) = std::fs::read_dir(fuzzing::regressions_dir().join(t.name)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            if let Err(msg) = fuzzing::run_one(t, &input) {
                panic!("{} crashes again on {}: {msg}", t.name, path.display());
            }
            replayed += 1;
        }
    }
    eprintln!("{replayed} regression inputs replayed");
}

/// A few seconds of each target find no crash.
#[test]
fn fuzz_targets_survive_a_short_run() {
    let secs: f64 = std::env::var("MEMSCOPE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for t in TARGETS {
        let out = fuzzing::fuzz(t, Duration::from_secs_f64(secs), seed);
        eprintln!("fuzz {}: {} inputs (seed {seed})", t.name, out.iterations);
        if let Some((input, msg)) = out.crashes.first() {
            let dir = fuzzing::regressions_dir().join(t.name);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("crash-seed-{seed}"));
            std::fs::write(&path, input).unwrap();
            panic!("fuzz target {} crashed ({msg}); input saved as {}", t.name, path.display());
        }
    }
}
