//! `cargo xtask fuzz [--seconds N] [--seed S] [TARGET...]`: runs each fuzz target of
//! `profiler_user::fuzzing` for N seconds (default 60); a crashing input is saved under
//! `profiler-user/fuzz/regressions/<target>/` (replayed by `tests/fuzz_smoke.rs`) and the run
//! exits 1.
use std::{process::ExitCode, time::Duration};

use profiler_user::fuzzing::{self, TARGETS};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut seed, mut only) = (60u64, 0x5eed_u64, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(seconds),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            name => only.push(name.to_string()),
        }
    }
    if let Some(bad) = only.iter().find(|n| !TARGETS.iter().any(|t| t.name == n.as_str())) {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!("fuzz: unknown target {bad:?} (targets: {})", names.join(", "));
        return ExitCode::from(2);
    }
    // Panics are the findings: keep their messages out of the way.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    for t in TARGETS.iter().filter(|t| only.is_empty() || only.iter().any(|n| n == t.name)) {
        let out = fuzzing::fuzz(t, Duration::from_secs(seconds), seed);
        match out.crashes.first() {
            None => println!("fuzz {}: {} inputs, no crash", t.name, out.iterations),
            Some((input, msg)) => {
                failed = true;
                let dir = fuzzing::regressions_dir().join(t.name);
                std::fs::create_dir_all(&dir).unwrap();
                let hash = input.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3));
                let path = dir.join(format!("crash-{hash:016x}"));
                std::fs::write(&path, input).unwrap();
                println!("fuzz {}: CRASH after {} inputs: {msg}\n  input saved as {}", t.name, out.iterations, path.display());
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
