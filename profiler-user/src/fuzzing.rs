//! Fuzz targets for every parser that reads what a target or a client controls: the one place
//! that names what each target exercises and its seed inputs (built-in, plus the files of
//! `fuzz/seeds/<target>/`). The engine is [bolero](https://github.com/camshaft/bolero); the
//! harness, one `bolero::check!` per target, is `tests/fuzz_smoke.rs`:
//!
//! - `cargo xtask fuzz [--seconds N] [TARGET...]` runs it under `cargo bolero test` with
//!   libFuzzer (coverage-guided, AddressSanitizer, nightly), N seconds per target (default 60;
//!   installs cargo-bolero when missing). The corpus grows in `fuzz/corpus/<target>/` (not kept
//!   in git); a crash (a panic, an input over 10 s or over 2 GiB of RSS) is written to
//!   `fuzz/regressions/<target>/` and fails the task.
//! - `cargo xtask test` runs the same harness on the stable toolchain (nothing to install, no
//!   instrumented rebuild): each target replays its seeds, its regression inputs and what fits
//!   of a local corpus, then bolero's random inputs for `MEMSCOPE_FUZZ_SECONDS` (default 2 s).
//!
//! What ran (`cargo xtask fuzz --seconds 60`, 2-vCPU machine shared with other builds), as
//! executions, exec/s, libFuzzer's edge coverage and features: elf 326,289, 5,349/s, cov 980,
//! ft 1,216 (then 300 s more: 1,795,101, cov 1,101, ft 1,401); perf_map 787,655, 12,912/s,
//! cov 640, ft 3,364; proc_files 477,869, 7,833/s, cov 578, ft 2,643; token_file 2,044,873,
//! 33,522/s, cov 299, ft 1,206; trigger_spec 594,875, 9,752/s, cov 415, ft 1,100; request
//! 1,084,741, 17,782/s, cov 1,814, ft 5,616. No crash. The two regression inputs kept (an
//! `object` assertion on relocations of a non-symbol-table section, an overflow in `stat`'s
//! RSS) were found by the mutation fuzzer this engine replaced. Figures: docs/security.md.
//!
//! Limits: random bytes on stable rarely get past an ELF header (the seeds and regressions give
//! the smoke its depth); libFuzzer caps inputs at 1 MiB (libc and libstdc++ seeds are truncated
//! there). Memory blow-ups under 2 GiB are bounded by the caps in [`crate::target_fs`] and the
//! API's limits, tested elsewhere.
#![doc(hidden)]
use std::{
    io::Write as _,
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
};

/// One fuzz target: a name, the function under test, and its seed inputs.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: &[Target] = &[
    Target { name: "elf", run: elf, seeds: elf_seeds },
    Target { name: "perf_map", run: perf_map, seeds: perf_map_seeds },
    Target { name: "proc_files", run: proc_files, seeds: proc_seeds },
    Target { name: "token_file", run: token_file, seeds: token_seeds },
    Target { name: "trigger_spec", run: trigger_spec, seeds: trigger_seeds },
    Target { name: "request", run: request, seeds: request_seeds },
];

/// ELF symbols (`.dynsym`/`.symtab`, versions), USDT notes, PLT stubs and CFI (`.eh_frame`,
/// `.debug_frame`: the unwind tables), all on one file given through a memfd (the parsers open paths).
fn elf(data: &[u8]) {
    let Some(file) = memfd(data) else { return };
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let _ = crate::bpf::elf_symbols::resolve(&path, &["malloc", "free", "calloc@GLIBC_2.2.5", "_Znwm"]);
    let _ = crate::bpf::elf_symbols::find_functions(&path, |n| n.contains("alloc"));
    let _ = crate::trigger::usdt::probes(&path);
    // The unwind tables the probes search: every FDE of .eh_frame and .debug_frame.
    let _ = crate::unwind::table::compile(&path, None);
    if let Ok(image) = crate::bpf::elf_symbols::CodeImage::open(&path) {
        for stub in [0u64, 0x1000, 0x1020, 0x4010] {
            let _ = crate::bpf::forwarding::plt_import(&image, stub);
        }
    }
}

fn memfd(data: &[u8]) -> Option<std::fs::File> {
    // SAFETY: a new anonymous file we own.
    let fd = unsafe { libc::memfd_create(c"memscope-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data).ok()?;
    Some(f)
}

/// Real files of the host (libc and libstdc++ are over libFuzzer's 1 MiB input cap: it
/// truncates them, so they only serve the stable smoke run), plus `fuzz/seeds/elf/`: small
/// builds of `tests/fixtures/trigger_fixture.c` (gcc 12, Debian 12): `usdt-pie`
/// (`-O2 -fPIE -pie`: USDT notes and semaphore, PLT, `.eh_frame`, `.symtab`),
/// `debug-frame-exe` and `debug-frame-rel.o` (`-O1 -g -fno-asynchronous-unwind-tables`, linked
/// and `-c`: `.debug_frame`, its relocations in the `.o`).
fn elf_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = ["/usr/bin/true", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    seeds.push(b"\x7fELF\x02\x01\x01".to_vec());
    seeds
}

fn perf_map(data: &[u8]) {
    let mut map = crate::symbolize::perf_map::PerfMap::for_pid(0);
    map.feed(data);
    for addr in [0, 0x1000, 0x1010, u64::MAX, 0x7fff_0000] {
        let _ = map.lookup(addr);
    }
}

fn perf_map_seeds() -> Vec<Vec<u8>> {
    vec![b"1000 20 JS:~leakyHandler /srv/app.js:2:22\n2000 10 Builtin:ArrayPush\n1000 8 JS:*(anonymous) /srv/b.js:9:1\nffffffffffffff00 ff LazyCompile:x :1:1\n".to_vec()]
}

/// `/proc/PID/maps` lines, `status` fields, `stat` (start time, CPU and RSS).
fn proc_files(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = crate::procfs::parse_maps_line(line);
    }
    let _ = crate::procfs::parse_status_kb(&text, "VmRSS");
    let _ = crate::process::parse_start_ticks(&text);
    let _ = crate::api::metrics::parse_stat(&text);
}

fn proc_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = ["/proc/self/maps", "/proc/self/status", "/proc/self/stat"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    seeds.push(b"7f1c2a428000-7f1c2a57d000 r-xp 00028000 fe:01 1183 /usr/lib/libc.so.6 (deleted)\n".to_vec());
    seeds
}

fn token_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(set) = crate::api::auth::TokenSet::parse(text, std::path::Path::new("fuzz")) {
            let _ = set.check(b"e2e-read-token-0123456789");
            let _ = set.check(data);
        }
    }
    let _ = crate::api::auth::bearer(Some(data));
}

fn token_seeds() -> Vec<Vec<u8>> {
    vec![
        b"# comment\nviewer read e2e-read-token-0123456789\nops admin e2e-admin-token-0123456789\n".to_vec(),
        b"Bearer abcdefghijklmnopqrstuvwx".to_vec(),
    ]
}

fn trigger_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    use crate::trigger::spec;
    let _ = text.parse::<crate::trigger::TriggerSpec>().map(|s| s.to_string());
    let _ = spec::parse_every(&text);
    let _ = spec::parse_growth(&text);
    let _ = spec::parse_rss(&text);
    let _ = spec::parse_symbol(&text);
    let _ = spec::parse_usdt(&text);
    let _ = crate::units::parse_duration(&text);
    let _ = crate::units::parse_size(&text);
    let _ = crate::units::parse_sampling(&text);
}

fn trigger_seeds() -> Vec<Vec<u8>> {
    ["every=30s", "growth=20%", "growth=64MiB", "rss=1.5GiB", "rss=80%:cgroup", "gc", "on-return=_ZN2ns5Cache8gc_cycleEv", "usdt=myapp:gc_done", "512KiB", "1e300h"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

/// Query strings as warp decodes them, then the API's parameter parsing; and JSON bodies.
fn request(data: &[u8]) {
    if let Ok(raw) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(data) {
        crate::api::handlers::fuzz_params(raw);
    }
    crate::api::handlers::fuzz_bodies(data);
}

fn request_seeds() -> Vec<Vec<u8>> {
    vec![
        b"min_age=30s&top=20&format=pprof&measure=alloc".to_vec(),
        b"format=svg&min_age=0&top=999999999999999999999".to_vec(),
        br#"{"pid": 1234}"#.to_vec(),
        br#"{"specs": ["gc", "growth=20%"], "min_spacing": "5s"}"#.to_vec(),
    ]
}

/// Runs one input; a panic becomes `Err(message)`.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    let run = target.run;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(input))).map_err(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
    })
}

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Where regression inputs live: `profiler-user/fuzz/regressions/<target>/`.
pub fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

/// Where the coverage-guided runs keep their corpus: `profiler-user/fuzz/corpus/<target>/`.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Where kept seed files live: `profiler-user/fuzz/seeds/<target>/`.
pub fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// `target`'s seeds: those its `seeds` function makes, then the files of
/// `fuzz/seeds/<target>/`.
pub fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let mut seeds = (target.seeds)();
    seeds.extend(inputs_in(&seeds_dir().join(target.name)).iter().filter_map(|p| std::fs::read(p).ok()));
    seeds
}

/// Writes `target`'s seeds into `dir` (`seed-<n>`, replacing older ones), for libFuzzer to
/// start from. Returns how many.
pub fn write_seeds(target: &Target, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let seeds = seeds(target);
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed)?;
    }
    Ok(seeds.len())
}

/// Every file in `dir` (none when it is missing), sorted by name.
pub fn inputs_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    files
}

/// Saves a crashing input under `fuzz/regressions/<target>/crash-<fnv64 of the input>`.
pub fn save_regression(target: &Target, input: &[u8]) -> std::io::Result<PathBuf> {
    let dir = regressions_dir().join(target.name);
    std::fs::create_dir_all(&dir)?;
    let hash = input.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3));
    let path = dir.join(format!("crash-{hash:016x}"));
    std::fs::write(&path, input)?;
    Ok(path)
}
