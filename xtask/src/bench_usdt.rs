//! The `usdt` section of `cargo xtask bench` (alone: `--usdt-only`): what a service that
//! samples its own allocations (the USDT heap-sampling contract, issue 21) pays per
//! `malloc(64)`+`free` pair, in one run, on one service
//! (profiler-user/tests/fixtures/rust_usdt: `libdd-profiling-heap-allocator` with live-heap
//! around the system allocator, at the producer's default 512 KiB interval):
//!
//! - bare: nobody attached (the sampler's semaphore check only);
//! - usdt: `memscope record --source usdt` attached (the sampler runs; one trap per sample);
//! - uprobes: uprobes on libc's `malloc` and `free` of the same service (bpftrace counting
//!   them: two traps per pair, the floor the contract goes below; memscope's own allocator
//!   probes land on Rust's shims here, which the inlined wrapper bypasses).
//!
//! The cost is `traced - bare` per pair; target <= [`MAX_USDT_NS`] and at least
//! [`MIN_RATIO`] x below the uprobes. Accuracy: with the contract attached the service keeps
//! [`HOLD_MIB`] MiB more in 64 KiB blocks; memscope's live bytes at the end must be within
//! [`MAX_LIVE_ERROR`] of what the service holds.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::{self, step};

pub const MAX_USDT_NS: f64 = 30.0;
pub const MIN_RATIO: f64 = 40.0;
pub const MAX_LIVE_ERROR: f64 = 0.10;
const HOLD_MIB: u64 = 300;
const PAIRS_FAST: u64 = 20_000_000;
const PAIRS_UPROBES: u64 = 200_000;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds the fixture (crates from crates.io the first time) under /tmp, as the e2e test does.
fn build_fixture() -> Result<PathBuf> {
    let src = cmd::workspace_root().join("profiler-user/tests/fixtures/rust_usdt");
    let root = std::env::temp_dir().join("memscope-fixtures/rust_usdt");
    fs::create_dir_all(root.join("src"))?;
    for file in ["Cargo.toml", "src/main.rs", "src/plugin.rs"] {
        let text = fs::read(src.join(file)).with_context(|| format!("reading {}", src.join(file).display()))?;
        if fs::read(root.join(file)).ok().as_deref() != Some(&text[..]) {
            fs::write(root.join(file), &text)?;
        }
    }
    let target = root.join("target-system");
    step("building the rust_usdt fixture (libdd-profiling-heap-allocator, live-heap)");
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["build", "--release", "--quiet"])
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )?;
    Ok(target.join("release/rust_usdt_fixture"))
}

/// The fixture, driven over its stdin/stdout protocol; every answer has a deadline.
struct Service {
    child: Child,
    stdin: ChildStdin,
    rx: std::sync::mpsc::Receiver<String>,
}

impl Service {
    fn start(exe: &Path) -> Result<Service> {
        let mut child = Command::new(exe)
            .env("USDT_FIXTURE_SAMPLE_BYTES", "524288")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().context("fixture stdin")?;
        let stdout: ChildStdout = child.stdout.take().context("fixture stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut s = Service { child, stdin, rx };
        let ready = s.line()?;
        if !ready.starts_with("ready ") {
            bail!("the fixture said {ready:?}");
        }
        Ok(s)
    }

    fn line(&mut self) -> Result<String> {
        self.rx.recv_timeout(ANSWER_TIMEOUT).context("the fixture did not answer in time")
    }

    fn ask(&mut self, q: &str) -> Result<String> {
        writeln!(self.stdin, "{q}")?;
        self.stdin.flush()?;
        self.line()
    }

    /// ns per pair over `pairs` pairs, median of three.
    fn pair_ns(&mut self, pairs: u64) -> Result<f64> {
        let mut v = Vec::new();
        for _ in 0..3 {
            let a = self.ask(&format!("bench {pairs}"))?;
            v.push(a.strip_prefix("ns ").and_then(|n| n.parse::<f64>().ok()).with_context(|| format!("fixture said {a:?}"))?);
        }
        v.sort_by(f64::total_cmp);
        Ok(v[1])
    }

    fn attached(&mut self) -> Result<bool> {
        Ok(self.ask("attached?")? == "attached 1")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `memscope record --pid PID --source SOURCE`, waited for until attached.
struct Record {
    child: Child,
    out: PathBuf,
    log: PathBuf,
}

impl Record {
    fn start(memscope: &Path, pid: u32, source: &str, dir: &Path) -> Result<Record> {
        let out = dir.join(format!("record-{source}"));
        let _ = fs::remove_dir_all(&out);
        let log = dir.join(format!("record-{source}.log"));
        let child = Command::new(memscope)
            .args(["record", "--pid", &pid.to_string(), "--duration", "1h", "--source", source, "--out"])
            .arg(&out)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting memscope record")?;
        let r = Record { child, out, log };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let text = fs::read_to_string(&r.log).unwrap_or_default();
            if text.contains("attached to") {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("memscope record --source {source} did not attach within {ATTACH_TIMEOUT:?}: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it (SIGINT: it writes its outputs) and returns leaks.json.
    fn stop(mut self) -> Result<Value> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("memscope record did not stop within {ANSWER_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let path = self.out.join("leaks.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("{} ({})", path.display(), fs::read_to_string(&self.log).unwrap_or_default()))?;
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// bpftrace counting libc's malloc and free in `pid`.
struct Bpftrace(Child);

impl Bpftrace {
    fn start(pid: u32) -> Result<Bpftrace> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let libc_path = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
            .context("the service maps no libc")?
            .to_string();
        let program = format!("uprobe:{libc_path}:malloc {{ @m = count(); }} uprobe:{libc_path}:free {{ @f = count(); }}");
        let child = Command::new("bpftrace")
            .args(["-p", &pid.to_string(), "-e", &program])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        let mut b = Bpftrace(child);
        let stdout = b.0.stdout.take().context("bpftrace stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        loop {
            let line = rx.recv_timeout(ATTACH_TIMEOUT).context("bpftrace did not attach in time")?;
            if line.starts_with("Attaching") || line.contains("probes") {
                std::thread::sleep(Duration::from_secs(1));
                return Ok(b);
            }
        }
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

pub struct UsdtRun {
    pub bare_ns: f64,
    pub usdt_ns: f64,
    pub uprobes_ns: f64,
    pub held_bytes: u64,
    pub live_bytes: u64,
    pub source: String,
    pub sampled_while_attached: bool,
    pub sampling_after_detach: bool,
}

impl UsdtRun {
    pub fn usdt_cost(&self) -> f64 {
        (self.usdt_ns - self.bare_ns).max(0.0)
    }
    pub fn uprobes_cost(&self) -> f64 {
        (self.uprobes_ns - self.bare_ns).max(0.0)
    }
    pub fn ratio(&self) -> f64 {
        self.uprobes_cost() / self.usdt_cost().max(0.1)
    }
    pub fn live_error(&self) -> f64 {
        (self.live_bytes as f64 - self.held_bytes as f64).abs() / self.held_bytes.max(1) as f64
    }

    pub fn render(&self) -> String {
        format!(
            "\nusdt: a service with the heap-sampling contract (libdd-profiling-heap-allocator, 512 KiB), malloc(64)+free\n\
             \x20 bare (nobody attached)          {:>10.1} ns/pair\n\
             \x20 memscope --source usdt           {:>10.1} ns/pair  (+{:.1} ns)\n\
             \x20 uprobes on libc malloc + free    {:>10.1} ns/pair  (+{:.1} ns, {:.0}x the contract)\n\
             \x20 live bytes: {} MiB held, memscope says {:.1} MiB (error {:.1}%), source {}\n",
            self.bare_ns,
            self.usdt_ns,
            self.usdt_cost(),
            self.uprobes_ns,
            self.uprobes_cost(),
            self.ratio(),
            self.held_bytes >> 20,
            self.live_bytes as f64 / (1 << 20) as f64,
            self.live_error() * 100.0,
            self.source,
        )
    }

    pub fn targets(&self) -> Vec<(String, String, String, bool)> {
        vec![
            (
                "usdt: cost per malloc+free pair through the contract".into(),
                format!("<= {MAX_USDT_NS} ns"),
                format!("{:.1} ns", self.usdt_cost()),
                self.usdt_cost() <= MAX_USDT_NS,
            ),
            (
                "usdt: below the uprobe floor (uprobes / contract)".into(),
                format!(">= {MIN_RATIO}x"),
                format!("{:.0}x", self.ratio()),
                self.ratio() >= MIN_RATIO,
            ),
            (
                format!("usdt: live bytes of {HOLD_MIB} MiB kept"),
                format!("within {:.0}%", MAX_LIVE_ERROR * 100.0),
                format!("{:.1}%", self.live_error() * 100.0),
                self.live_error() <= MAX_LIVE_ERROR,
            ),
            (
                "usdt: the service samples only while memscope is attached".into(),
                "yes".into(),
                format!("{}", self.sampled_while_attached && !self.sampling_after_detach),
                self.sampled_while_attached && !self.sampling_after_detach,
            ),
        ]
    }

    pub fn to_json(&self) -> Value {
        json!({
            "bare_ns_per_pair": self.bare_ns,
            "sampled_while_attached": self.sampled_while_attached,
            "sampling_after_detach": self.sampling_after_detach,
            "usdt_ns_per_pair": self.usdt_ns,
            "uprobes_ns_per_pair": self.uprobes_ns,
            "usdt_cost_ns": self.usdt_cost(),
            "uprobes_cost_ns": self.uprobes_cost(),
            "ratio": self.ratio(),
            "held_bytes": self.held_bytes,
            "live_bytes": self.live_bytes,
            "live_error": self.live_error(),
            "source": self.source,
        })
    }
}

pub fn run(memscope: &Path, scratch: &Path) -> Result<UsdtRun> {
    let exe = build_fixture()?;
    let dir = scratch.join("usdt");
    fs::create_dir_all(&dir)?;
    let mut svc = Service::start(&exe)?;
    let pid = svc.child.id();
    step("usdt: bare");
    let bare_ns = svc.pair_ns(PAIRS_FAST)?;

    step("usdt: memscope record --source usdt");
    let rec = Record::start(memscope, pid, "usdt", &dir)?;
    let sampled_while_attached = svc.attached()?;
    let usdt_ns = svc.pair_ns(PAIRS_FAST)?;
    let hold = svc.ask(&format!("hold {HOLD_MIB}"))?;
    if hold != "done" {
        bail!("the fixture said {hold:?} to hold");
    }
    let leaks = rec.stop()?;
    let live_bytes = leaks["totals"]["live_bytes"].as_u64().unwrap_or(0);
    let source = leaks["source"].as_str().unwrap_or("allocator").to_string();
    // The kernel drops the semaphore with the links (asynchronously, after the exit).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sampling_after_detach = svc.attached()?;
    while sampling_after_detach && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        sampling_after_detach = svc.attached()?;
    }

    // memscope's allocator probes on this service land on Rust's shims, which the inlined
    // `#[global_allocator]` bypasses (it calls libc's malloc directly): they would measure
    // nothing. The floor is two uprobe traps per pair on what the service really calls: libc's
    // malloc and free, counted by bpftrace in this process only.
    step("usdt: uprobes on libc malloc + free of the same service (bpftrace -p, count only)");
    let floor = Bpftrace::start(pid)?;
    let uprobes_ns = svc.pair_ns(PAIRS_UPROBES)?;
    drop(floor);
    Ok(UsdtRun {
        bare_ns,
        usdt_ns,
        uprobes_ns,
        held_bytes: HOLD_MIB << 20,
        live_bytes,
        source,
        sampled_while_attached,
        sampling_after_detach,
    })
}
