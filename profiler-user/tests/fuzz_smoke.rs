//! The bolero harness of the fuzz targets of `profiler_user::fuzzing`: one test per target,
//! the same code under both engines.
//!
//! - Plain `cargo test` (stable, what `cargo xtask test` runs): the target's seeds (built-in
//!   and `fuzz/seeds/<target>/*`), its regression inputs (`fuzz/regressions/<target>/*`) and
//!   the local corpus (`fuzz/corpus/<target>/*`, if a coverage-guided run left one; as much of
//!   it as fits in the smoke time) run without a panic, then bolero's random inputs for
//!   `MEMSCOPE_FUZZ_SECONDS` (default 2 s; bolero prints the inputs per second). A panic saves
//!   its input under `fuzz/regressions/<target>/`.
//! - `cargo xtask fuzz` runs these tests under `cargo bolero test` (libFuzzer, coverage-guided);
//!   it sets `MEMSCOPE_FUZZ_CORPUS` to the corpus directory, where the seeds are written first.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use profiler_user::fuzzing::{self, Target};

/// Before the engine starts: the seeds for libFuzzer, or the replay of known inputs.
fn prepare(name: &str) -> &'static Target {
    let t = fuzzing::target(name).expect("a target of profiler_user::fuzzing");
    if cfg!(fuzzing) {
        if let Some(dir) = std::env::var_os("MEMSCOPE_FUZZ_CORPUS") {
            fuzzing::write_seeds(t, dir.as_ref()).expect("seeds written to the corpus directory");
        }
        return t;
    }
    let check = |what: &str, input: &[u8]| {
        if let Err(msg) = fuzzing::run_one(t, input) {
            panic!("fuzz target {} crashes on {what}: {msg}", t.name);
        }
    };
    let seeds = fuzzing::seeds(t);
    for (i, seed) in seeds.iter().enumerate() {
        check(&format!("seed {i}"), seed);
    }
    let regressions = fuzzing::inputs_in(&fuzzing::regressions_dir().join(t.name));
    for path in &regressions {
        check(&path.display().to_string(), &std::fs::read(path).unwrap());
    }
    // A local corpus can hold thousands of inputs: replay what fits in the smoke time.
    let (started, mut replayed) = (Instant::now(), 0);
    let corpus = fuzzing::inputs_in(&fuzzing::corpus_dir().join(t.name));
    for path in corpus.iter().take_while(|_| started.elapsed() < smoke_time()) {
        check(&path.display().to_string(), &std::fs::read(path).unwrap());
        replayed += 1;
    }
    eprintln!(
        "fuzz {}: {} seeds, {} regression inputs, {replayed} of {} corpus inputs replayed",
        t.name,
        seeds.len(),
        regressions.len(),
        corpus.len()
    );
    t
}

fn smoke_time() -> Duration {
    let secs: f64 = std::env::var("MEMSCOPE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// One input. Under libFuzzer a panic is the finding (bolero aborts, libFuzzer writes the
/// input); on stable the first crashing input is saved as a regression before the test fails.
fn one(t: &Target, input: &[u8], saved: &AtomicBool) {
    if cfg!(fuzzing) {
        (t.run)(input);
        return;
    }
    if let Err(msg) = fuzzing::run_one(t, input) {
        // bolero shrinks after a failure, running smaller inputs again: keep the first only.
        if !saved.swap(true, Ordering::Relaxed) {
            match fuzzing::save_regression(t, input) {
                Ok(path) => eprintln!("fuzz {}: crash ({msg}); input saved as {}", t.name, path.display()),
                Err(e) => eprintln!("fuzz {}: crash ({msg}); input not saved: {e}", t.name),
            }
        }
        panic!("fuzz target {} crashed: {msg}", t.name);
    }
}

/// `fuzz_<target>`: a name no other test of profiler-user has, since `cargo bolero test`
/// selects its test by name across all of the package's test binaries.
macro_rules! targets {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let t = prepare($name);
            let saved = AtomicBool::new(false);
            bolero::check!().with_test_time(smoke_time()).for_each(|input: &[u8]| one(t, input, &saved));
        }
    )*};
}

targets!(
    fuzz_elf => "elf",
    fuzz_perf_map => "perf_map",
    fuzz_proc_files => "proc_files",
    fuzz_token_file => "token_file",
    fuzz_trigger_spec => "trigger_spec",
    fuzz_request => "request",
);

/// Every target of `profiler_user::fuzzing` has a test above.
#[test]
fn every_target_has_a_harness() {
    let harnessed = ["elf", "perf_map", "proc_files", "token_file", "trigger_spec", "request"];
    for t in fuzzing::TARGETS {
        assert!(harnessed.contains(&t.name), "add fuzz_{0} => \"{0}\" to targets! in tests/fuzz_smoke.rs", t.name);
    }
}
