//! Fuzz targets for every parser that reads what a target or a client controls, and a small
//! mutation fuzzer that runs on the stable toolchain (no coverage guidance: seeds from real
//! files, then bit flips, interesting integers at random offsets, truncation, splicing).
//! `cargo xtask fuzz [--seconds N] [TARGET...]` runs them (`examples/fuzz.rs`); a crash
//! (a panic) saves its input under `fuzz/regressions/<target>/`, replayed by
//! `tests/fuzz_smoke.rs` with a short run of each target in `cargo xtask test`.
//!
//! Limits: panics are found, not hangs or memory blow-ups (those are bounded by the caps in
//! [`crate::target_fs`] and the API's limits, tested elsewhere).
#![doc(hidden)]
use std::{
    io::Write as _,
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    time::{Duration, Instant},
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

/// A tiny xorshift generator: reproducible runs from a seed, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }
}

const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX, 1 << 40];

/// One mutated copy of `input` (a few mutations, biased to the start and end of the file,
/// where ELF headers and section tables are).
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        let at = match rng.below(3) {
            0 if len > 0 => rng.below(len.min(4096)),
            1 if len > 0 => len - 1 - rng.below(len.min(4096)),
            _ => rng.below(len.max(1)),
        };
        match rng.below(7) {
            0 if len > 0 => out[at] ^= 1 << rng.below(8),
            1 if len > 0 => out[at] = rng.next_u64() as u8,
            2 if len >= 8 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = at.min(len - width);
                out[at..at + width].copy_from_slice(&v[..width]);
            }
            3 if len > 0 => out.truncate(at),
            4 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(at.min(len)..at.min(len), bytes);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = (1 + rng.below(64)).min(other.len() - from);
                out.splice(at.min(len)..at.min(len), other[from..from + n].iter().copied());
            }
            _ if len > 1 => {
                let n = 1 + rng.below((len - at).min(64));
                out.drain(at..(at + n).min(len));
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub iterations: u64,
    /// Inputs that panicked, with the panic message.
    pub crashes: Vec<(Vec<u8>, String)>,
}

/// Runs `target` on its seeds, then on mutations, for `budget`. Stops at the first crash.
pub fn fuzz(target: &Target, budget: Duration, seed: u64) -> Outcome {
    let mut corpus = (target.seeds)();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let started = Instant::now();
    let mut inputs = corpus.clone().into_iter();
    while started.elapsed() < budget {
        let input = inputs.next().unwrap_or_else(|| {
            let a = &corpus[rng.below(corpus.len())];
            let b = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, a, b)
        });
        out.iterations += 1;
        if let Err(msg) = run_one(target, &input) {
            out.crashes.push((input, msg));
            break;
        }
        // Keep some mutants as new seeds (cheap diversity without coverage).
        if out.iterations % 64 == 0 && corpus.len() < 256 && input.len() < 4 << 20 {
            corpus.push(input);
        }
    }
    out
}

/// Runs one input; a panic becomes `Err(message)`.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    let run = target.run;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(input))).map_err(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
    })
}

/// Where regression inputs live: `profiler-user/fuzz/regressions/<target>/`.
pub fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}
