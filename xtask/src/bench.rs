//! `cargo xtask bench`: what watching a heap from outside costs, memscope against the classic
//! bpftrace memleak probes, measured in one invocation on the same machine.
//!
//! The target workloads are `bench/alloc_bench.c` (built into `target/bench/`):
//! - `pairs`: `malloc(64)`/`free` pairs on one thread;
//! - `mixed`: several threads, sizes 16 B..1 MiB from a fixed-seed distribution, ~1% leaked;
//! - `paced`: 100k allocations per second for 10 s (the agent's own CPU time);
//! - `stacks`: 1M live allocations from 50k distinct call stacks (snapshot and render time).
//!
//! The same source is also built without frame pointers (`alloc_bench_nofp`: `-O2
//! -fomit-frame-pointer`, every workload and thread 12 distinct noinline frames below main,
//! linked with libstdc++ so the process maps it, as C++ services do): `pairs-nofp` and
//! `mixed-nofp` against bpftrace, `paced` at default and full sampling, and `alloc_bench_big`,
//! the same plus 100 MiB of code with CFI (400k functions), for the attach time and the size of
//! the unwind tables of a process mapping libc, libstdc++ and a 100 MiB executable. Those two
//! figures come from memscope itself (`unwind.table_bytes`, `unwind.rows`, `attach_ms` in
//! leaks.json or as `key=value` fields of its log); "n/a" when this memscope reports none.
//!
//! `pairs` and `mixed` run bare, under `memscope record` at default settings, under
//! `memscope record --sampling full` and under bpftrace (uprobe malloc, uretprobe malloc,
//! uprobe free, each attached to the target's pid only). Each workload prints `ready PID`, waits
//! for a line on stdin so the tracer attaches first, times its own loop (CLOCK_MONOTONIC), prints
//! the result, and waits again so the tracer is measured and stopped while the target still
//! runs. Every measurement is repeated (`--repeat`, default 3, the runs interleaved across
//! tracers) and the median reported. Overhead is `traced ns - bare ns` per pair.
//!
//! Nothing is asserted: the targets of the issue are printed as met or not met, with the
//! numbers. `--json FILE` also writes every run. Needs root (eBPF); installs bpftrace when it is
//! missing and builds the eBPF object, `memscope` (release) and the workloads first.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::{
    cmd::{self, step},
    ebpf, setup,
};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Also write every number (each run, medians, targets) to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// Run only the `node` section (one agent, 50 targets).
    #[arg(long)]
    node_only: bool,
    /// Run only the `v8` section (a Node.js service's pause for a heap snapshot through the
    /// agent vs in-process; the paused share with a gc trigger).
    #[arg(long, conflicts_with = "node_only")]
    v8_only: bool,
    /// Run only the `usdt` section (a service with the USDT heap-sampling contract: cost per
    /// pair through the contract vs through uprobes, live bytes of 300 MiB kept).
    #[arg(long, conflicts_with_all = ["node_only", "v8_only"])]
    usdt_only: bool,
    /// Run only the `js names` section (JavaScript names without flags: 10 runs of a plain
    /// `node`, the share of each function's bytes that carry its name).
    #[arg(long, conflicts_with_all = ["node_only", "v8_only"])]
    js_names_only: bool,
    /// Run only the paused-share part of the `v8` section (the gc trigger under the pause
    /// budget, a few minutes), not the snapshot pauses.
    #[arg(long, conflicts_with_all = ["node_only", "v8_only"])]
    v8_share_only: bool,
    /// Run only the `soak` section (the agent's RSS over time with targets pushing profiles).
    #[arg(long, conflicts_with_all = ["node_only", "v8_only"])]
    soak_only: bool,
    /// `soak`: how long, in minutes (the target is an hour).
    #[arg(long, default_value_t = 5.0)]
    soak_minutes: f64,
    /// `soak`: how many targets.
    #[arg(long, default_value_t = 50)]
    soak_targets: usize,
    /// `soak`: each workload's push interval, in seconds.
    #[arg(long, default_value_t = 10)]
    soak_push_interval: u64,
    /// Run only the `pg` section (PostgreSQL under pgbench -C with forks=true).
    #[arg(long, conflicts_with_all = ["node_only", "v8_only", "soak_only"])]
    pg_only: bool,
}

// Iteration counts: the whole bench stays within ~5 minutes on 2 cores (bpftrace costs ~12 us
// per pair, the bare loop ~5 ns).
const PAIRS_BARE: u64 = 20_000_000;
const PAIRS_TRACED: u64 = 200_000;
const MIXED_THREADS: u64 = 2;
// Per thread, the same for every tracer, bare included: a mixed run starts by faulting in its
// heap (~10 MiB per thread) and creating an arena, which cost the same under any tracer and
// cancel out of `traced - bare` only over equal work (with 100k traced against 1M bare they
// added ~45 ns to every traced pair).
const MIXED_OPS: u64 = 400_000;
const PACED_RATE: u64 = 100_000;
const PACED_SECONDS: u64 = 10;
const STACKS_ALLOCS: u64 = 1_000_000;
const STACKS_DISTINCT: u64 = 50_000;
/// Frames between main (or a thread's start) and the workload in the no-frame-pointer variant.
const NOFP_DEPTH: u32 = 12;
/// Functions (with CFI) of the 100 MiB executable: 240 bytes each.
const BIG_FUNCTIONS: u64 = 409_600;

// The targets.
const FULL_MAX_FRACTION: f64 = 1.0 / 4.0;
/// Every allocation recorded and its stack unwound from CFI (no frame pointers): issue 10.
const FULL_UNWIND_MAX_FRACTION: f64 = 1.0 / 3.0;
const DEFAULT_MAX_FRACTION: f64 = 1.0 / 8.0;
const AGENT_MAX_CORE: f64 = 0.05;
const SNAPSHOT_MAX_S: f64 = 1.0;
const AGENT_MAX_RSS_MIB: f64 = 256.0;

const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: BenchArgs) -> Result<()> {
    cmd::require_root("`cargo xtask bench`")?;
    let started = Instant::now();
    if args.usdt_only {
        // Only memscope and bpftrace are needed: not the C workloads (the 100 MiB one takes
        // minutes).
        bpftrace()?;
        ebpf::build(false)?;
        step("cargo build --release -p profiler-user");
        cmd::run(cmd::cargo().args(["build", "--release", "-p", "profiler-user"])).context("building memscope failed")?;
        let scratch = cmd::target_dir().join("bench");
        fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
        let usdt = crate::bench_usdt::run(&cmd::target_dir().join("release/memscope"), &scratch)?;
        print!("{}", usdt.render());
        print_targets(&usdt.targets());
        if let Some(path) = &args.json {
            fs::write(path, serde_json::to_string_pretty(&json!({ "usdt": usdt.to_json() }))? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    let tools = prepare()?;
    if args.node_only {
        let node = crate::bench_node::run(&tools.memscope, &tools.scratch)?;
        print!("{}", node.render());
        for (name, limit, value, met) in node.targets() {
            let mark = if met { "met    " } else { "NOT MET" };
            println!("  [{mark}] {name}: {value} (target {limit})");
        }
        return Ok(());
    }
    if args.js_names_only {
        let js = crate::bench_js_names::run(&tools.memscope, &tools.scratch)?;
        print!("{}", js.render());
        for (name, limit, value, met) in js.targets() {
            let mark = if met { "met    " } else { "NOT MET" };
            println!("  [{mark}] {name}: {value} (target {limit})");
        }
        if let Some(path) = &args.json {
            fs::write(path, serde_json::to_string_pretty(&json!({ "js_names": js.to_json() }))? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    if args.soak_only {
        let soak = crate::bench_agent::soak(&tools.memscope, &tools.scratch, args.soak_targets, args.soak_minutes, args.soak_push_interval)?;
        print!("{}", soak.render());
        print_targets(&soak.targets_table());
        if let Some(path) = &args.json {
            fs::write(path, serde_json::to_string_pretty(&json!({ "soak": soak.to_json() }))? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    if args.pg_only {
        let pg = crate::bench_agent::pg(&tools.memscope, &tools.scratch)?;
        print!("{}", pg.render());
        print_targets(&pg.targets_table());
        if let Some(path) = &args.json {
            fs::write(path, serde_json::to_string_pretty(&json!({ "pg": pg.to_json() }))? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    if args.v8_only || args.v8_share_only {
        let v8 = crate::bench_v8::run(&tools.memscope, &tools.scratch, !args.v8_share_only)?;
        print!("{}", v8.render());
        for (name, limit, value, met) in v8.targets() {
            let mark = if met { "met    " } else { "NOT MET" };
            println!("  [{mark}] {name}: {value} (target {limit})");
        }
        if let Some(path) = &args.json {
            fs::write(path, serde_json::to_string_pretty(&json!({ "v8": v8.to_json() }))? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    let load_before = loadavg();
    let measured = Instant::now();
    let pairs = compare(&tools, &PAIRS, args.repeat)?;
    let mixed = compare(&tools, &MIXED, args.repeat)?;
    let pairs_nofp = compare(&tools, &PAIRS_NOFP, args.repeat)?;
    let mixed_nofp = compare(&tools, &MIXED_NOFP, args.repeat)?;
    let agent = agent_cpu(&tools, args.repeat, Program::Fp, &[])?;
    let agent_nofp = agent_cpu(&tools, args.repeat, Program::NoFp, &[])?;
    let agent_nofp_full = agent_cpu(&tools, args.repeat, Program::NoFp, &["--sampling", "full"])?;
    let big = big_attach(&tools, args.repeat)?;
    let snapshot = snapshot_cost(&tools, args.repeat)?;
    let node = crate::bench_node::run(&tools.memscope, &tools.scratch)?;
    let v8 = crate::bench_v8::run(&tools.memscope, &tools.scratch, true)?;
    let usdt = crate::bench_usdt::run(&tools.memscope, &tools.scratch)?;
    let js_names = crate::bench_js_names::run(&tools.memscope, &tools.scratch)?;
    let soak = crate::bench_agent::soak(&tools.memscope, &tools.scratch, args.soak_targets, args.soak_minutes, args.soak_push_interval)?;
    let pg = crate::bench_agent::pg(&tools.memscope, &tools.scratch)?;
    let report = Report {
        machine: machine(load_before),
        repeat: args.repeat,
        workloads: vec![pairs, mixed, pairs_nofp, mixed_nofp],
        agent,
        agent_nofp,
        agent_nofp_full,
        big,
        snapshot,
        node,
        measure_s: measured.elapsed().as_secs_f64(),
        total_s: started.elapsed().as_secs_f64(),
    };
    print!("{}", report.render());
    print!("{}", v8.render());
    for (name, limit, value, met) in v8.targets() {
        let mark = if met { "met    " } else { "NOT MET" };
        println!("  [{mark}] {name}: {value} (target {limit})");
    }
    print!("{}", usdt.render());
    print_targets(&usdt.targets());
    print!("{}", js_names.render());
    print_targets(&js_names.targets());
    print!("{}", soak.render());
    print_targets(&soak.targets_table());
    print!("{}", pg.render());
    print_targets(&pg.targets_table());
    if let Some(path) = &args.json {
        let mut all = report.to_json();
        all["v8"] = v8.to_json();
        all["usdt"] = usdt.to_json();
        all["js_names"] = js_names.to_json();
        all["soak"] = soak.to_json();
        all["pg"] = pg.to_json();
        let text = serde_json::to_string_pretty(&all)?;
        fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        step(format!("wrote {}", path.display()));
    }
    Ok(())
}

fn print_targets(rows: &[(String, String, String, bool)]) {
    for (name, limit, value, met) in rows {
        let mark = if *met { "met    " } else { "NOT MET" };
        println!("  [{mark}] {name}: {value} (target {limit})");
    }
}

// ---- preparation ------------------------------------------------------------------------------

/// What the runs start: the workload binary, memscope, bpftrace, and a scratch directory.
struct Tools {
    workload: PathBuf,
    /// The same workloads without frame pointers, NOFP_DEPTH frames deep.
    workload_nofp: PathBuf,
    /// alloc_bench_nofp plus 100 MiB of code with CFI.
    workload_big: PathBuf,
    memscope: PathBuf,
    bpftrace: PathBuf,
    scratch: PathBuf,
}

/// bpftrace, installed with the other Debian packages when missing.
fn bpftrace() -> Result<PathBuf> {
    if cmd::find_in_path("bpftrace").is_none() {
        setup::debian_packages().context("installing bpftrace failed")?;
    }
    cmd::find_in_path("bpftrace").context("bpftrace is still missing after installing Debian packages")
}

fn prepare() -> Result<Tools> {
    let bpftrace = bpftrace()?;
    ebpf::build(false)?;
    step("cargo build --release -p profiler-user");
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "profiler-user"]))
        .context("building memscope failed")?;
    let dir = cmd::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let workload = compile_workload(&dir)?;
    let (workload_nofp, workload_big) = compile_nofp_workloads(&dir)?;
    Ok(Tools {
        workload,
        workload_nofp,
        workload_big,
        memscope: cmd::target_dir().join("release/memscope"),
        bpftrace,
        scratch: dir.join("out"),
    })
}

fn compile_workload(dir: &Path) -> Result<PathBuf> {
    let source = cmd::workspace_root().join("bench/alloc_bench.c");
    let program = dir.join("alloc_bench");
    step(format!("cc bench/alloc_bench.c -> {}", program.display()));
    cmd::run(
        Command::new("cc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(&program)
            .arg(&source),
    )
    .context("compiling the workloads failed (is a C compiler installed?)")?;
    Ok(program)
}

/// `alloc_bench_nofp` (no frame pointers, NOFP_DEPTH frames deep, libstdc++ mapped) and
/// `alloc_bench_big` (the same with 100 MiB more code, every function with CFI).
fn compile_nofp_workloads(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let source = cmd::workspace_root().join("bench/alloc_bench.c");
    let nofp = dir.join("alloc_bench_nofp");
    let big = dir.join("alloc_bench_big");
    let depth = format!("-DALLOC_BENCH_DEPTH={NOFP_DEPTH}");
    let flags = [
        "-O2",
        "-g",
        "-fomit-frame-pointer",
        depth.as_str(),
        "-pthread",
    ];
    // Linked, not only mapped on demand: a C++ service maps libstdc++ and its CFI.
    let libs = ["-Wl,--no-as-needed", "-lstdc++", "-Wl,--as-needed"];
    step(format!(
        "cc -fomit-frame-pointer bench/alloc_bench.c -> {}",
        nofp.display()
    ));
    cmd::run(
        Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&nofp)
            .arg(&source)
            .args(libs),
    )
    .context("compiling the workloads without frame pointers failed")?;
    let big_obj = dir.join("big_text.o");
    if !big_obj.exists() {
        let asm = dir.join("big_text.S");
        fs::write(&asm, big_text_asm())
            .with_context(|| format!("cannot write {}", asm.display()))?;
        step(format!(
            "as {} ({BIG_FUNCTIONS} functions, ~100 MiB of code)",
            asm.display()
        ));
        let tmp = dir.join("big_text.o.tmp");
        cmd::run(Command::new("cc").arg("-c").arg("-o").arg(&tmp).arg(&asm))
            .context("assembling the 100 MiB of code failed")?;
        fs::rename(&tmp, &big_obj)?;
    }
    step(format!("cc ... big_text.o -> {}", big.display()));
    cmd::run(
        Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&big)
            .arg(&source)
            .arg(&big_obj)
            .args(libs),
    )
    .context("linking the 100 MiB workload failed")?;
    Ok((nofp, big))
}

/// BIG_FUNCTIONS functions of 240 bytes, each with its CFI (push, pop: three rows), never
/// called: what matters is what the unwinder loads for them at attach.
fn big_text_asm() -> String {
    format!(
        "    .text\n    .macro bigfn\n    .p2align 4\n    .cfi_startproc\n    push %rbp\n\
         \x20   .cfi_adjust_cfa_offset 8\n    .cfi_offset %rbp, -16\n    .fill 232, 1, 0x90\n\
         \x20   pop %rbp\n    .cfi_adjust_cfa_offset -8\n    ret\n    .cfi_endproc\n    .endm\n\
         \x20   .rept {BIG_FUNCTIONS}\n    bigfn\n    .endr\n    .section .note.GNU-stack,\"\",@progbits\n"
    )
}

// ---- tracers and workloads --------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    Bare,
    MemscopeDefault,
    MemscopeFull,
    Bpftrace,
}

impl Tracer {
    const ALL: [Tracer; 4] = [
        Tracer::Bare,
        Tracer::MemscopeDefault,
        Tracer::MemscopeFull,
        Tracer::Bpftrace,
    ];

    fn key(self) -> &'static str {
        match self {
            Tracer::Bare => "bare",
            Tracer::MemscopeDefault => "memscope_default",
            Tracer::MemscopeFull => "memscope_full",
            Tracer::Bpftrace => "bpftrace",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Tracer::Bare => "bare",
            Tracer::MemscopeDefault => "memscope default (512KiB)",
            Tracer::MemscopeFull => "memscope --sampling full",
            Tracer::Bpftrace => "bpftrace",
        }
    }
}

/// Which build of bench/alloc_bench.c a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    /// `-fno-omit-frame-pointer`, the workload right below main.
    Fp,
    /// `-fomit-frame-pointer`, NOFP_DEPTH frames below main.
    NoFp,
}

impl Tools {
    fn program(&self, p: Program) -> &Path {
        match p {
            Program::Fp => &self.workload,
            Program::NoFp => &self.workload_nofp,
        }
    }
}

/// One workload compared across the four tracers.
struct Spec {
    name: &'static str,
    title: &'static str,
    mode: &'static str,
    program: Program,
    /// The target for `--sampling full` (overhead / bpftrace's overhead).
    full_max: f64,
    /// Arguments after the mode: bare, then traced (fewer iterations under a tracer).
    bare: &'static [u64],
    traced: &'static [u64],
}

static PAIRS: Spec = Spec {
    name: "pairs",
    title: "malloc(64)+free, 1 thread",
    mode: "pairs",
    program: Program::Fp,
    full_max: FULL_MAX_FRACTION,
    bare: &[PAIRS_BARE],
    traced: &[PAIRS_TRACED],
};

static MIXED: Spec = Spec {
    name: "mixed",
    title: "mixed 16 B..1 MiB, 2 threads, ~1% leaked",
    mode: "mixed",
    program: Program::Fp,
    full_max: FULL_MAX_FRACTION,
    bare: &[MIXED_OPS, MIXED_THREADS],
    traced: &[MIXED_OPS, MIXED_THREADS],
};

static PAIRS_NOFP: Spec = Spec {
    name: "pairs-nofp",
    title: "malloc(64)+free, 1 thread, no frame pointers, 12 frames deep",
    mode: "pairs",
    program: Program::NoFp,
    full_max: FULL_UNWIND_MAX_FRACTION,
    bare: &[PAIRS_BARE],
    traced: &[PAIRS_TRACED],
};

static MIXED_NOFP: Spec = Spec {
    name: "mixed-nofp",
    title: "mixed, 2 threads, no frame pointers, 12 frames deep",
    mode: "mixed",
    program: Program::NoFp,
    full_max: FULL_UNWIND_MAX_FRACTION,
    bare: &[MIXED_OPS, MIXED_THREADS],
    traced: &[MIXED_OPS, MIXED_THREADS],
};

impl Spec {
    fn args(&self, tracer: Tracer) -> Vec<String> {
        let counts = if tracer == Tracer::Bare {
            self.bare
        } else {
            self.traced
        };
        std::iter::once(self.mode.to_string())
            .chain(counts.iter().map(u64::to_string))
            .collect()
    }
}

/// Reads a child's output line by line on a thread, so pipes never fill up.
fn forward_lines(reader: impl Read + Send + 'static, tx: Sender<String>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Waits for a line matching `wanted`, keeping every line seen in `seen`. Fails when the
/// output ends first (the process exited) or at the deadline.
fn wait_for_line(
    lines: &Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if wanted(&line) {
                    return Ok(line);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "no {what} within {timeout:?}; output so far:\n{}",
                    tail(seen)
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("exited before {what}; output:\n{}", tail(seen))
            }
        }
    }
}

fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(15);
    lines[start..].join("\n")
}

/// A running `alloc_bench`; killed when dropped before it finished.
struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    pid: u32,
}

impl Workload {
    fn start(program: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let (tx, lines) = mpsc::channel();
        forward_lines(child.stdout.take().context("no stdout pipe")?, tx);
        let stdin = child.stdin.take();
        let mut w = Workload {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            pid: 0,
        };
        let what = format!("`ready` line from alloc_bench {}", args.join(" "));
        let line = wait_for_line(&w.lines, &mut w.seen, &what, ATTACH_TIMEOUT, |l| {
            l.starts_with("ready ")
        })?;
        w.pid = line[6..]
            .trim()
            .parse()
            .with_context(|| format!("bad line {line:?}"))?;
        Ok(w)
    }

    /// Sends a line: the first starts the timed loop, the second lets the process exit.
    fn send_line(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .context("cannot write to the workload")
    }

    /// The timed result: `ns_per_pair` or `elapsed_ns`, `cpu_ns_per_op`, `ops`.
    fn result(&mut self) -> Result<Outcome> {
        let is_value = |l: &str| l.starts_with("ns_per_pair ") || l.starts_with("elapsed_ns ");
        let line = wait_for_line(&self.lines, &mut self.seen, "result", RUN_TIMEOUT, is_value)?;
        let value = parse_field(&line)?;
        let cpu = wait_for_line(&self.lines, &mut self.seen, "cpu", RUN_TIMEOUT, |l| {
            l.starts_with("cpu_ns_per_op ")
        })?;
        let ops = wait_for_line(&self.lines, &mut self.seen, "ops", RUN_TIMEOUT, |l| {
            l.starts_with("ops ")
        })?;
        Ok(Outcome {
            value,
            cpu_ns_per_op: parse_field(&cpu)?,
            ops: parse_field(&ops)? as u64,
        })
    }

    fn finish(mut self) -> Result<()> {
        self.send_line()?;
        self.stdin = None;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("alloc_bench exited with {status}");
                }
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        bail!("alloc_bench did not exit within {STOP_TIMEOUT:?}")
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a workload prints at the end of its timed loop.
struct Outcome {
    /// `ns_per_pair` (wall clock per thread, CLOCK_MONOTONIC) or `elapsed_ns`.
    value: f64,
    /// Process CPU time (all threads, user + system) per op: immune to preemption by other
    /// processes, and it includes the probes' trap time, which the kernel charges to the target.
    cpu_ns_per_op: f64,
    ops: u64,
}

fn parse_field(line: &str) -> Result<f64> {
    let value = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("no value in {line:?}"))?;
    value
        .parse()
        .with_context(|| format!("bad number in {line:?}"))
}

/// CPU time and peak RSS of a live process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct ProcUsage {
    cpu_s: f64,
    hwm_kib: u64,
}

fn proc_usage(pid: u32) -> Result<ProcUsage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        let v: u64 = fields.get(i).context("short /proc/PID/stat")?.parse()?;
        Ok(v as f64)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_s = (ticks(11)? + ticks(12)?) / hz;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcUsage { cpu_s, hwm_kib })
}

/// How a tracer ended: reaped with `wait4`, so its rusage covers the whole process.
struct Exit {
    /// From SIGINT to the process being reaped.
    stop_s: f64,
    cpu_s: f64,
    max_rss_kib: u64,
    code: Option<i32>,
    lines: Vec<String>,
}

/// A running tracer (memscope or bpftrace); SIGKILLed when dropped before it was stopped.
struct TracerProc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    reaped: bool,
    /// From spawn to "attached".
    attach_s: f64,
}

impl TracerProc {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::describe(cmd)))?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, tx);
        }
        Ok(TracerProc {
            child,
            lines,
            seen: Vec::new(),
            reaped: false,
            attach_s: 0.0,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn usage(&self) -> Result<ProcUsage> {
        proc_usage(self.pid())
    }

    /// SIGINT (both tracers then write their output and exit), reaped with its rusage.
    fn stop(mut self) -> Result<Exit> {
        let pid = self.pid() as libc::pid_t;
        let sent = Instant::now();
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            bail!(
                "cannot send SIGINT to {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
        let (status, usage) = reap(pid, STOP_TIMEOUT)?;
        let stop_s = sent.elapsed().as_secs_f64();
        self.reaped = true;
        // The output pipes close with the process; collect what is left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        Ok(Exit {
            stop_s,
            cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
            max_rss_kib: usage.ru_maxrss as u64,
            code,
            lines: std::mem::take(&mut self.seen),
        })
    }
}

impl Drop for TracerProc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `wait4` with a deadline (polling WNOHANG): the exit status and the child's rusage.
fn reap(pid: libc::pid_t, timeout: Duration) -> Result<(i32, libc::rusage)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            return Ok((status, usage));
        }
        if r < 0 {
            bail!("wait4({pid}) failed: {}", std::io::Error::last_os_error());
        }
        if Instant::now() >= deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("tracer {pid} did not exit within {timeout:?} of SIGINT (killed)");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `memscope record` on `pid`, started and attached.
fn start_memscope(tools: &Tools, pid: u32, out: &Path, extra: &[&str]) -> Result<TracerProc> {
    let started = Instant::now();
    let mut cmd = Command::new(&tools.memscope);
    cmd.args([
        "record",
        "--pid",
        &pid.to_string(),
        "--duration",
        "1h",
        "--out",
    ])
    .arg(out)
    .args(extra)
    .env("MEMSCOPE_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut t = TracerProc::spawn(&mut cmd)?;
    wait_for_line(
        &t.lines,
        &mut t.seen,
        "`attached` from memscope",
        ATTACH_TIMEOUT,
        |l| l.contains("attached"),
    )?;
    t.attach_s = started.elapsed().as_secs_f64();
    Ok(t)
}

/// bpftrace with the classic memleak probes on the libc that `pid` really maps, started and
/// with every probe attached.
fn start_bpftrace(tools: &Tools, pid: u32) -> Result<TracerProc> {
    let started = Instant::now();
    let libc_path = mapped_libc(pid)?;
    let program = format!(
        "uprobe:{libc_path}:malloc /pid == {pid}/ {{ @size[tid] = arg0; }} \
         uretprobe:{libc_path}:malloc /pid == {pid}/ {{ @live[retval] = @size[tid]; delete(@size[tid]); }} \
         uprobe:{libc_path}:free /pid == {pid}/ {{ delete(@live[arg0]); }}"
    );
    let mut cmd = Command::new(&tools.bpftrace);
    // -p: the probes go into this process only, as memscope's do (without it bpftrace traps
    // every process on the machine that maps libc, the predicate filters only afterwards).
    cmd.args(["-p", &pid.to_string(), "-e", &program])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut t = TracerProc::spawn(&mut cmd)?;
    let line = wait_for_line(
        &t.lines,
        &mut t.seen,
        "`Attaching` from bpftrace",
        ATTACH_TIMEOUT,
        |l| l.starts_with("Attaching "),
    )?;
    let probes: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    wait_attached(t.pid(), probes)?;
    t.attach_s = started.elapsed().as_secs_f64();
    Ok(t)
}

/// bpftrace prints "Attaching N probes..." before it attaches them: wait until it holds at least
/// N perf-event descriptors (one per uprobe, plus its per-CPU output buffers) and their number
/// has not changed for 300 ms.
fn wait_attached(pid: u32, probes: usize) -> Result<()> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    let (mut last, mut since) = (usize::MAX, Instant::now());
    while Instant::now() < deadline {
        let n = perf_event_fds(pid);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if n >= probes && since.elapsed() >= Duration::from_millis(300) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("bpftrace ({pid}) did not finish attaching {probes} probes within {ATTACH_TIMEOUT:?}")
}

fn perf_event_fds(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:[perf_event]")
        .count()
}

/// The libc file that `pid` maps (as its maps show it, e.g. /usr/lib/x86_64-linux-gnu/libc.so.6).
fn mapped_libc(pid: u32) -> Result<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            let base = p.rsplit('/').next().unwrap_or(p);
            base.starts_with("libc.so") || base.starts_with("libc-")
        })
        .map(str::to_string)
        .with_context(|| format!("process {pid} maps no libc"))
}

fn start_tracer(tools: &Tools, tracer: Tracer, pid: u32, out: &Path) -> Result<Option<TracerProc>> {
    Ok(match tracer {
        Tracer::Bare => None,
        Tracer::MemscopeDefault => Some(start_memscope(tools, pid, out, &[])?),
        Tracer::MemscopeFull => Some(start_memscope(tools, pid, out, &["--sampling", "full"])?),
        Tracer::Bpftrace => Some(start_bpftrace(tools, pid)?),
    })
}

// ---- the comparison of tracers ----------------------------------------------------------------

/// One run of one workload under one tracer.
#[derive(Clone, Debug)]
struct Run {
    ns_per_pair: f64,
    cpu_ns_per_op: f64,
    ops: u64,
    tracer: Option<TracerRun>,
}

#[derive(Clone, Debug)]
struct TracerRun {
    attach_s: f64,
    /// Tracer CPU from spawn until just before SIGINT (the final report excluded).
    cpu_s: f64,
    /// Tracer CPU during the timed loop only.
    loop_cpu_s: f64,
    /// VmHWM just before SIGINT.
    peak_rss_kib: u64,
    /// Whole process (rusage at exit): CPU and peak RSS including the final report.
    exit_cpu_s: f64,
    exit_max_rss_kib: u64,
    stop_s: f64,
    /// memscope's own figures about its unwinder (none from bpftrace).
    unwind: UnwindInfo,
}

/// What memscope reports about its unwinder (issue 10), when it does: leaks.json's `unwind`
/// object (`table_bytes`, `rows`, the `truncated_*` and `fp_fallback_frames` counters) and
/// `attach_ms` (top level or in `unwind`), else `key=value` fields of its log lines
/// (`table_bytes=`, `unwind.table_bytes=`, `rows=`, `attach_ms=`).
#[derive(Clone, Debug, Default)]
struct UnwindInfo {
    table_bytes: Option<f64>,
    rows: Option<f64>,
    attach_ms: Option<f64>,
    counters: BTreeMap<String, u64>,
    /// Frames of the largest leak's stack and whether one of them is `main` (or `start_thread`,
    /// on the threads of `mixed`): the stacks the
    /// run really unwound (a frame-pointer walk stops after one or two frames in this code).
    largest_leak_frames: Option<(usize, bool)>,
}

fn read_unwind(leaks_json: &Path, lines: &[String]) -> UnwindInfo {
    let mut info = UnwindInfo::default();
    let parsed = fs::read_to_string(leaks_json)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let unwind = &parsed["unwind"];
    let tables = &parsed["unwind_tables"];
    info.table_bytes = tables["map_bytes"].as_f64().or(unwind["table_bytes"].as_f64());
    info.rows = tables["rows"].as_f64().or(unwind["rows"].as_f64());
    info.attach_ms = tables["attach_ms"]
        .as_f64()
        .or(parsed["attach_ms"].as_f64())
        .or(unwind["attach_ms"].as_f64());
    info.largest_leak_frames = parsed["leaks"][0]["frames"].as_array().map(|frames| {
        let main = frames
            .iter()
            .any(|f| matches!(f["function"].as_str(), Some("main" | "start_thread")));
        (frames.len(), main)
    });
    if let Some(m) = unwind.as_object() {
        for (k, v) in m {
            if k.starts_with("truncated_") || k == "frame_pointer_frames" {
                if let Some(v) = v.as_u64() {
                    info.counters.insert(k.clone(), v);
                }
            }
        }
    }
    for line in lines {
        for (k, v) in log_fields(line) {
            let v: Option<f64> = v.parse().ok();
            match k.strip_prefix("unwind.").unwrap_or(&k) {
                "table_bytes" => info.table_bytes = info.table_bytes.or(v),
                "rows" | "unwind_rows" => info.rows = info.rows.or(v),
                "attach_ms" => info.attach_ms = info.attach_ms.or(v),
                _ => {}
            }
        }
    }
    info
}

/// A figure memscope may not report: "n/a" then.
fn or_na(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "n/a".to_string(), f)
}

fn median_opt(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| median(v.into_iter()))
}

/// Which number of a run: the workload's wall clock per pair (per thread), the metric,
/// or the process CPU time per op, which other load on the machine does not inflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Wall,
    Cpu,
}

impl Metric {
    fn of(self, run: &Run) -> f64 {
        match self {
            Metric::Wall => run.ns_per_pair,
            Metric::Cpu => run.cpu_ns_per_op,
        }
    }
}

struct Comparison {
    spec: &'static Spec,
    runs: BTreeMap<&'static str, Vec<Run>>,
}

fn compare(tools: &Tools, spec: &'static Spec, repeat: u32) -> Result<Comparison> {
    let mut runs: BTreeMap<&'static str, Vec<Run>> = BTreeMap::new();
    for rep in 1..=repeat {
        for tracer in Tracer::ALL {
            step(format!(
                "{} under {} ({rep}/{repeat})",
                spec.name,
                tracer.label()
            ));
            let run = measure(tools, spec, tracer)
                .with_context(|| format!("{} under {}", spec.name, tracer.label()))?;
            step(format!(
                "  {:.1} ns per pair ({:.1} ns CPU)",
                run.ns_per_pair, run.cpu_ns_per_op
            ));
            runs.entry(tracer.key()).or_default().push(run);
        }
    }
    Ok(Comparison { spec, runs })
}

fn measure(tools: &Tools, spec: &Spec, tracer: Tracer) -> Result<Run> {
    let mut workload = Workload::start(tools.program(spec.program), &spec.args(tracer))?;
    let out = tools
        .scratch
        .join(format!("{}-{}", spec.name, tracer.key()));
    let traced = start_tracer(tools, tracer, workload.pid, &out)?;
    let before = traced.as_ref().map(TracerProc::usage).transpose()?;
    workload.send_line()?;
    let outcome = workload.result()?;
    let tracer_run = match traced {
        None => None,
        Some(t) => {
            let after = t.usage()?;
            let attach_s = t.attach_s;
            let exit = t.stop()?;
            check_exit(tracer, &exit)?;
            let unwind = match tracer {
                Tracer::Bpftrace => UnwindInfo::default(),
                _ => read_unwind(&out.join("leaks.json"), &exit.lines),
            };
            Some(TracerRun {
                unwind,
                attach_s,
                cpu_s: after.cpu_s,
                loop_cpu_s: after.cpu_s - before.unwrap_or_default().cpu_s,
                peak_rss_kib: after.hwm_kib,
                exit_cpu_s: exit.cpu_s,
                exit_max_rss_kib: exit.max_rss_kib,
                stop_s: exit.stop_s,
            })
        }
    };
    workload.finish()?;
    Ok(Run {
        ns_per_pair: outcome.value,
        cpu_ns_per_op: outcome.cpu_ns_per_op,
        ops: outcome.ops,
        tracer: tracer_run,
    })
}

fn check_exit(tracer: Tracer, exit: &Exit) -> Result<()> {
    // bpftrace exits 0 on SIGINT; memscope 0 (3 would mean the target exited first).
    if exit.code != Some(0) {
        bail!(
            "{} ended with {:?}; its output:\n{}",
            tracer.label(),
            exit.code,
            tail(&exit.lines)
        );
    }
    Ok(())
}

impl Comparison {
    fn median_ns(&self, metric: Metric, tracer: Tracer) -> f64 {
        median(self.runs[tracer.key()].iter().map(|r| metric.of(r)))
    }

    fn overhead(&self, metric: Metric, tracer: Tracer) -> f64 {
        self.median_ns(metric, tracer) - self.median_ns(metric, Tracer::Bare)
    }

    fn x_bare(&self, metric: Metric, tracer: Tracer) -> f64 {
        self.median_ns(metric, tracer) / self.median_ns(metric, Tracer::Bare)
    }

    /// The tracer's overhead as a fraction of bpftrace's overhead.
    fn vs_bpftrace(&self, metric: Metric, tracer: Tracer) -> f64 {
        self.overhead(metric, tracer) / self.overhead(metric, Tracer::Bpftrace)
    }

    fn tracer_median(&self, tracer: Tracer, f: impl Fn(&TracerRun) -> f64) -> f64 {
        median(
            self.runs[tracer.key()]
                .iter()
                .filter_map(|r| r.tracer.as_ref())
                .map(f),
        )
    }

    fn to_json(&self) -> Value {
        let mut tracers = serde_json::Map::new();
        for tracer in Tracer::ALL {
            let mut entry = json!({
                "ns_per_pair": self.median_ns(Metric::Wall, tracer),
                "cpu_ns_per_op": self.median_ns(Metric::Cpu, tracer),
                "args": self.spec.args(tracer),
                "runs": self.runs[tracer.key()].iter().map(run_json).collect::<Vec<_>>(),
            });
            if tracer != Tracer::Bare {
                entry["overhead_ns"] = json!(self.overhead(Metric::Wall, tracer));
                entry["x_bare"] = json!(self.x_bare(Metric::Wall, tracer));
                entry["overhead_vs_bpftrace"] = json!(self.vs_bpftrace(Metric::Wall, tracer));
                entry["cpu_overhead_ns"] = json!(self.overhead(Metric::Cpu, tracer));
                entry["cpu_overhead_vs_bpftrace"] = json!(self.vs_bpftrace(Metric::Cpu, tracer));
                entry["tracer_cpu_s"] = json!(self.tracer_median(tracer, |t| t.cpu_s));
                entry["tracer_peak_rss_kib"] =
                    json!(self.tracer_median(tracer, |t| t.peak_rss_kib as f64));
                entry["tracer_attach_s"] = json!(self.tracer_median(tracer, |t| t.attach_s));
            }
            tracers.insert(tracer.key().to_string(), entry);
        }
        json!({ "title": self.spec.title, "tracers": tracers })
    }
}

fn unwind_json(u: &UnwindInfo) -> Value {
    json!({
        "table_bytes": u.table_bytes, "rows": u.rows, "attach_ms": u.attach_ms, "counters": u.counters,
        "largest_leak_frames": u.largest_leak_frames.map(|(n, _)| n),
        "largest_leak_reaches_main": u.largest_leak_frames.map(|(_, m)| m),
    })
}

fn run_json(run: &Run) -> Value {
    let mut v = json!({
        "ns_per_pair": run.ns_per_pair,
        "cpu_ns_per_op": run.cpu_ns_per_op,
        "ops": run.ops,
    });
    if let Some(t) = &run.tracer {
        v["tracer"] = json!({
            "attach_s": t.attach_s,
            "cpu_s_before_stop": t.cpu_s,
            "cpu_s_timed_loop": t.loop_cpu_s,
            "peak_rss_kib_before_stop": t.peak_rss_kib,
            "cpu_s_at_exit": t.exit_cpu_s,
            "max_rss_kib_at_exit": t.exit_max_rss_kib,
            "sigint_to_exit_s": t.stop_s,
            "unwind": unwind_json(&t.unwind),
        });
    }
    v
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

// ---- the agent's own CPU at a steady rate -----------------------------------------------------

struct AgentRun {
    wall_s: f64,
    allocs: u64,
    agent_cpu_s: f64,
    target_cpu_s: f64,
    peak_rss_kib: u64,
}

fn agent_cpu(
    tools: &Tools,
    repeat: u32,
    program: Program,
    extra: &[&str],
) -> Result<Vec<AgentRun>> {
    let mut runs = Vec::new();
    let settings = if extra.is_empty() {
        "default".to_string()
    } else {
        extra.join(" ")
    };
    for rep in 1..=repeat {
        step(format!(
            "paced {PACED_RATE} allocs/s for {PACED_SECONDS} s ({program:?}) under memscope {settings} ({rep}/{repeat})"
        ));
        let run = paced_run(tools, program, extra).context("paced workload under memscope")?;
        step(format!(
            "  agent {:.2}% of a core, target {:.1}%",
            100.0 * run.agent_cpu_s / run.wall_s,
            100.0 * run.target_cpu_s / run.wall_s
        ));
        runs.push(run);
    }
    Ok(runs)
}

fn paced_run(tools: &Tools, program: Program, extra: &[&str]) -> Result<AgentRun> {
    let args = [
        "paced".to_string(),
        PACED_RATE.to_string(),
        PACED_SECONDS.to_string(),
    ];
    let mut workload = Workload::start(tools.program(program), &args)?;
    let tracer = start_memscope(tools, workload.pid, &tools.scratch.join("paced"), extra)?;
    let agent_before = tracer.usage()?;
    let target_before = proc_usage(workload.pid)?;
    let started = Instant::now();
    workload.send_line()?;
    let allocs = workload.result()?.ops;
    let wall_s = started.elapsed().as_secs_f64();
    let agent_after = tracer.usage()?;
    let target_after = proc_usage(workload.pid)?;
    let exit = tracer.stop()?;
    check_exit(Tracer::MemscopeDefault, &exit)?;
    workload.finish()?;
    Ok(AgentRun {
        wall_s,
        allocs,
        agent_cpu_s: agent_after.cpu_s - agent_before.cpu_s,
        target_cpu_s: target_after.cpu_s - target_before.cpu_s,
        peak_rss_kib: agent_after.hwm_kib,
    })
}

// ---- attach to a process mapping libc, libstdc++ and a 100 MiB executable ---------------------

struct BigRun {
    /// From spawning memscope to its "attached" line (BPF load and verification included).
    attach_s: f64,
    tracer_cpu_s: f64,
    tracer_peak_rss_kib: u64,
    unwind: UnwindInfo,
}

fn big_attach(tools: &Tools, repeat: u32) -> Result<Vec<BigRun>> {
    let mut runs = Vec::new();
    for rep in 1..=repeat {
        step(format!(
            "attach to alloc_bench_big (libc, libstdc++, 100 MiB of code) under memscope default ({rep}/{repeat})"
        ));
        let args = ["pairs".to_string(), PAIRS_TRACED.to_string()];
        let mut workload = Workload::start(&tools.workload_big, &args)?;
        let out = tools.scratch.join("big");
        let tracer = start_memscope(tools, workload.pid, &out, &[])?;
        workload.send_line()?;
        workload.result()?;
        let usage = tracer.usage()?;
        let attach_s = tracer.attach_s;
        let exit = tracer.stop()?;
        check_exit(Tracer::MemscopeDefault, &exit)?;
        workload.finish()?;
        let run = BigRun {
            attach_s,
            tracer_cpu_s: usage.cpu_s,
            tracer_peak_rss_kib: usage.hwm_kib,
            unwind: read_unwind(&out.join("leaks.json"), &exit.lines),
        };
        step(format!(
            "  attached in {attach_s:.2} s, unwind tables {}",
            or_na(run.unwind.table_bytes, |b| format!(
                "{:.1} MiB",
                b / 1048576.0
            ))
        ));
        runs.push(run);
    }
    Ok(runs)
}

// ---- snapshot and render at 1M live allocations -----------------------------------------------

struct SnapshotRun {
    /// Per traced allocation while the workload ran (stack walk of ~37 frames included).
    alloc_ns: f64,
    /// From SIGINT to memscope's exit: read maps, symbolize, build, five renders, report.
    sigint_to_exit_s: f64,
    snapshot_ms: Option<f64>,
    flamegraph_ms: Option<f64>,
    render_ms: Option<f64>,
    stacks: Option<f64>,
    live_allocs: Option<f64>,
    rss_before_stop_kib: u64,
    max_rss_kib: u64,
    dropped: Value,
}

fn snapshot_cost(tools: &Tools, repeat: u32) -> Result<Vec<SnapshotRun>> {
    let mut runs = Vec::new();
    for rep in 1..=repeat {
        step(format!(
            "stacks: {STACKS_ALLOCS} live allocations from {STACKS_DISTINCT} stacks under memscope --sampling full ({rep}/{repeat})"
        ));
        let run = snapshot_run(tools).context("stacks workload under memscope")?;
        step(format!(
            "  SIGINT to exit {:.2} s, peak RSS {:.0} MiB",
            run.sigint_to_exit_s,
            mib(run.max_rss_kib)
        ));
        runs.push(run);
    }
    Ok(runs)
}

fn snapshot_run(tools: &Tools) -> Result<SnapshotRun> {
    let args = [
        "stacks".to_string(),
        STACKS_ALLOCS.to_string(),
        STACKS_DISTINCT.to_string(),
    ];
    let mut workload = Workload::start(&tools.workload, &args)?;
    let out = tools.scratch.join("stacks");
    let extra = [
        "--sampling",
        "full",
        "--min-age",
        "0s",
        "--max-allocs",
        "2000000",
        "--max-stacks",
        "131072",
    ];
    let tracer = start_memscope(tools, workload.pid, &out, &extra)?;
    workload.send_line()?;
    let outcome = workload.result()?;
    let before = tracer.usage()?;
    let exit = tracer.stop()?;
    check_exit(Tracer::MemscopeFull, &exit)?;
    workload.finish()?;
    let fields = exit
        .lines
        .iter()
        .find(|l| l.contains("final snapshot"))
        .map(|l| log_fields(l))
        .unwrap_or_default();
    let field = |k: &str| fields.get(k).and_then(|v| v.parse::<f64>().ok());
    Ok(SnapshotRun {
        alloc_ns: outcome.value / outcome.ops.max(1) as f64,
        sigint_to_exit_s: exit.stop_s,
        snapshot_ms: field("snapshot_ms"),
        flamegraph_ms: field("flamegraph_ms"),
        render_ms: field("render_ms"),
        stacks: field("stacks"),
        live_allocs: field("live_allocs"),
        rss_before_stop_kib: before.hwm_kib,
        max_rss_kib: exit.max_rss_kib,
        dropped: read_dropped(&out.join("leaks.json")),
    })
}

/// `key=value` fields of a tracing log line (ANSI colours stripped).
fn log_fields(line: &str) -> BTreeMap<String, String> {
    strip_ansi(line)
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `dropped` counters of memscope's leaks.json (stack-map collisions and the like).
fn read_dropped(path: &Path) -> Value {
    let parsed = fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    parsed.map(|v| v["dropped"].clone()).unwrap_or(Value::Null)
}

fn dropped_total(v: &Value) -> u64 {
    v.as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

// ---- the report -------------------------------------------------------------------------------

struct Machine {
    cpus: usize,
    kernel: String,
    load_before: String,
    load_after: String,
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine(load_before: String) -> Machine {
    Machine {
        cpus: thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        load_before,
        load_after: loadavg(),
    }
}

struct Report {
    machine: Machine,
    repeat: u32,
    workloads: Vec<Comparison>,
    agent: Vec<AgentRun>,
    /// The same paced workload without frame pointers, default and full sampling.
    agent_nofp: Vec<AgentRun>,
    agent_nofp_full: Vec<AgentRun>,
    big: Vec<BigRun>,
    snapshot: Vec<SnapshotRun>,
    /// One agent with 50 targets.
    node: crate::bench_node::NodeRun,
    measure_s: f64,
    total_s: f64,
}

struct Target {
    name: String,
    limit: String,
    value: String,
    met: bool,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn agent_core(runs: &[AgentRun]) -> f64 {
    median(runs.iter().map(|r| r.agent_cpu_s / r.wall_s))
}

fn target_core(runs: &[AgentRun]) -> f64 {
    median(runs.iter().map(|r| r.target_cpu_s / r.wall_s))
}

impl Report {
    fn agent_core(&self) -> f64 {
        agent_core(&self.agent)
    }

    fn target_core(&self) -> f64 {
        target_core(&self.agent)
    }

    fn snap<F: Fn(&SnapshotRun) -> f64>(&self, f: F) -> f64 {
        median(self.snapshot.iter().map(f))
    }

    fn snap_opt<F: Fn(&SnapshotRun) -> Option<f64>>(&self, f: F) -> Option<f64> {
        let v: Vec<f64> = self.snapshot.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v.into_iter()))
    }

    fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for c in &self.workloads {
            let full = match c.spec.program {
                Program::Fp => "full tracing",
                Program::NoFp => "full tracing with unwinding",
            };
            for (tracer, limit, what) in [
                (Tracer::MemscopeFull, c.spec.full_max, full),
                (
                    Tracer::MemscopeDefault,
                    DEFAULT_MAX_FRACTION,
                    "default settings",
                ),
            ] {
                // Judged on the wall clock (the metric); the CPU-time ratio is shown too.
                let frac = c.vs_bpftrace(Metric::Wall, tracer);
                out.push(Target {
                    name: format!("{what}: overhead per pair vs bpftrace's ({})", c.spec.name),
                    limit: format!("<= {limit:.3}"),
                    value: format!(
                        "{frac:.3} ({:.0} ns vs {:.0} ns; by CPU time {:.3})",
                        c.overhead(Metric::Wall, tracer),
                        c.overhead(Metric::Wall, Tracer::Bpftrace),
                        c.vs_bpftrace(Metric::Cpu, tracer),
                    ),
                    met: frac <= limit,
                });
            }
        }
        let core = self.agent_core();
        out.push(Target {
            name: format!(
                "agent CPU at {}k allocs/s (default settings)",
                PACED_RATE / 1000
            ),
            limit: format!("<= {:.0}% of one core", AGENT_MAX_CORE * 100.0),
            value: format!("{:.2}%", core * 100.0),
            met: core <= AGENT_MAX_CORE,
        });
        let core = agent_core(&self.agent_nofp);
        out.push(Target {
            name: format!(
                "agent CPU at {}k allocs/s (default settings, no frame pointers, {NOFP_DEPTH} frames deep)",
                PACED_RATE / 1000
            ),
            limit: format!("<= {:.0}% of one core", AGENT_MAX_CORE * 100.0),
            value: format!(
                "{:.2}% (every allocation: {:.2}%)",
                core * 100.0,
                agent_core(&self.agent_nofp_full) * 100.0
            ),
            met: core <= AGENT_MAX_CORE,
        });
        // The target: read the maps, symbolize, render the flamegraph (memscope's own timings).
        let snap_s = self.snap(|r| {
            (r.snapshot_ms.unwrap_or(f64::NAN) + r.flamegraph_ms.unwrap_or(f64::NAN)) / 1000.0
        });
        let exit_s = self.snap(|r| r.sigint_to_exit_s);
        out.push(Target {
            name: format!(
                "snapshot + flamegraph at {}M live allocations ({}k stacks)",
                STACKS_ALLOCS / 1_000_000,
                STACKS_DISTINCT / 1000
            ),
            limit: format!("<= {SNAPSHOT_MAX_S:.1} s"),
            value: format!(
                "{snap_s:.2} s (maps + symbols + flamegraph; SIGINT to exit with all five outputs and detach: {exit_s:.2} s)"
            ),
            met: snap_s <= SNAPSHOT_MAX_S,
        });
        let rss = self.snap(|r| mib(r.max_rss_kib));
        out.push(Target {
            name: format!(
                "agent RSS at {}M tracked allocations",
                STACKS_ALLOCS / 1_000_000
            ),
            limit: format!("<= {AGENT_MAX_RSS_MIB:.0} MiB"),
            value: format!("{rss:.0} MiB (peak, snapshot included)"),
            met: rss <= AGENT_MAX_RSS_MIB,
        });
        for (name, limit, value, met) in self.node.targets() {
            out.push(Target { name, limit, value, met });
        }
        out
    }

    fn render(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        s += &format!(
            "\nmemscope bench: {} CPUs, kernel {}, load {} -> {}, median of {} runs\n\n",
            m.cpus, m.kernel, m.load_before, m.load_after, self.repeat
        );
        s += "ns per malloc+free pair, wall clock of each thread's loop \
              (x = slowdown vs bare; frac = overhead / bpftrace's overhead)\n\n";
        s += &self.ns_table(Metric::Wall);
        s += "\nthe same as process CPU time (user + system, all threads) per pair: \
              not inflated when other processes take the CPU\n\n";
        s += &self.ns_table(Metric::Cpu);
        s += "\ntracer process: CPU seconds until stopped (attach included) / peak RSS\n\n";
        s += "| workload | memscope default | memscope full | bpftrace |\n|---|---:|---:|---:|\n";
        for c in &self.workloads {
            let cell = |t: Tracer| {
                format!(
                    "{:.2} s / {:.0} MiB",
                    c.tracer_median(t, |r| r.cpu_s),
                    mib(c.tracer_median(t, |r| r.peak_rss_kib as f64) as u64)
                )
            };
            s += &format!(
                "| {} | {} | {} | {} |\n",
                c.spec.name,
                cell(Tracer::MemscopeDefault),
                cell(Tracer::MemscopeFull),
                cell(Tracer::Bpftrace)
            );
        }
        s += &self.render_agent();
        s += &self.render_unwind();
        s += &self.render_snapshot();
        s += &self.node.render();
        s += "\ntargets\n\n";
        for t in self.targets() {
            let mark = if t.met { "met    " } else { "NOT MET" };
            s += &format!("  [{mark}] {}: {} (target {})\n", t.name, t.value, t.limit);
        }
        s += &format!(
            "\nmeasurements took {:.0} s ({:.0} s with the builds)\n",
            self.measure_s, self.total_s
        );
        s
    }

    fn ns_table(&self, metric: Metric) -> String {
        let mut s = String::new();
        s += "| workload | bare | memscope default | memscope full | bpftrace |\n";
        s += "|---|---:|---:|---:|---:|\n";
        for c in &self.workloads {
            let cell = |t: Tracer| {
                format!(
                    "{:.0} (x{:.0}, frac {:.3})",
                    c.median_ns(metric, t),
                    c.x_bare(metric, t),
                    c.vs_bpftrace(metric, t)
                )
            };
            s += &format!(
                "| {} | {:.1} | {} | {} | {:.0} (x{:.0}) |\n",
                c.spec.title,
                c.median_ns(metric, Tracer::Bare),
                cell(Tracer::MemscopeDefault),
                cell(Tracer::MemscopeFull),
                c.median_ns(metric, Tracer::Bpftrace),
                c.x_bare(metric, Tracer::Bpftrace),
            );
        }
        s
    }

    fn render_agent(&self) -> String {
        let rate = median(self.agent.iter().map(|r| r.allocs as f64 / r.wall_s));
        let rss = median(self.agent.iter().map(|r| mib(r.peak_rss_kib)));
        let wall = median(self.agent.iter().map(|r| r.wall_s));
        // /proc counts CPU time in clock ticks: one tick over the run is the resolution.
        let tick_s = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        format!(
            "\nagent at {:.0} allocs/s for {PACED_SECONDS} s (memscope default): {:.2}% of one core \
             (resolution {:.2}%), peak RSS {rss:.0} MiB; the target spent {:.1}% of a core meanwhile \
             (the probes run in its context)\n",
            rate,
            100.0 * self.agent_core(),
            100.0 * tick_s / wall,
            100.0 * self.target_core()
        )
    }

    /// The no-frame-pointer runs: attach time, memscope's unwind tables and counters.
    fn render_unwind(&self) -> String {
        let mut s = format!(
            "\nunwinding (no frame pointers, {NOFP_DEPTH} frames deep; figures from memscope, n/a when it reports none)\n\n\
             | workload | tracer | attach (spawn to attached) | memscope attach_ms | unwind tables | rows | truncated / fp fallback | largest leak's stack |\n\
             |---|---|---:|---:|---:|---:|---|---|\n"
        );
        let row = |name: &str, label: &str, attach_s: f64, runs: Vec<&UnwindInfo>| {
            let counters = runs
                .last()
                .map(|u| {
                    if u.counters.is_empty() {
                        "n/a".to_string()
                    } else {
                        u.counters
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                })
                .unwrap_or_else(|| "n/a".to_string());
            let depth = match runs.last().and_then(|u| u.largest_leak_frames) {
                Some((n, true)) => format!("{n} frames, to main/start_thread"),
                Some((n, false)) => format!("{n} frames, not to main/start_thread"),
                None => "no leak".to_string(),
            };
            format!(
                "| {name} | {label} | {attach_s:.2} s | {} | {} | {} | {counters} | {depth} |\n",
                or_na(median_opt(runs.iter().map(|u| u.attach_ms)), |v| format!(
                    "{v:.0} ms"
                )),
                or_na(median_opt(runs.iter().map(|u| u.table_bytes)), |v| format!(
                    "{:.1} MiB",
                    v / 1048576.0
                )),
                or_na(median_opt(runs.iter().map(|u| u.rows)), |v| format!(
                    "{v:.0}"
                )),
            )
        };
        for c in self
            .workloads
            .iter()
            .filter(|c| c.spec.program == Program::NoFp)
        {
            for t in [Tracer::MemscopeDefault, Tracer::MemscopeFull] {
                let infos: Vec<&UnwindInfo> = c.runs[t.key()]
                    .iter()
                    .filter_map(|r| r.tracer.as_ref())
                    .map(|r| &r.unwind)
                    .collect();
                s += &row(
                    c.spec.name,
                    t.label(),
                    c.tracer_median(t, |r| r.attach_s),
                    infos,
                );
            }
        }
        let big: Vec<&UnwindInfo> = self.big.iter().map(|r| &r.unwind).collect();
        s += &row(
            "libc + libstdc++ + 100 MiB executable",
            Tracer::MemscopeDefault.label(),
            median(self.big.iter().map(|r| r.attach_s)),
            big,
        );
        s += &format!(
            "\nmemscope on the 100 MiB executable: {:.2} s of CPU until stopped, peak RSS {:.0} MiB\n",
            median(self.big.iter().map(|r| r.tracer_cpu_s)),
            median(self.big.iter().map(|r| mib(r.tracer_peak_rss_kib)))
        );
        for (what, runs) in [
            ("default", &self.agent_nofp),
            ("--sampling full", &self.agent_nofp_full),
        ] {
            s += &format!(
                "agent at {}k allocs/s, no frame pointers (memscope {what}): {:.2}% of one core; the target {:.1}%\n",
                PACED_RATE / 1000,
                100.0 * agent_core(runs),
                100.0 * target_core(runs)
            );
        }
        s
    }

    fn render_snapshot(&self) -> String {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("?".to_string(), |v| format!("{v:.0}{unit}"));
        format!(
            "\nsnapshot at {}M live allocations from {}k stacks (memscope --sampling full): SIGINT to exit {:.2} s \
             (snapshot {} + render {} + {:.2} s to stop polling, print and detach), {} stacks and {} live allocations in the profile, {} events dropped; \
             memscope RSS {:.0} MiB before the snapshot, {:.0} MiB peak; {:.0} ns per traced allocation meanwhile\n",
            STACKS_ALLOCS / 1_000_000,
            STACKS_DISTINCT / 1000,
            self.snap(|r| r.sigint_to_exit_s),
            opt(self.snap_opt(|r| r.snapshot_ms), " ms"),
            opt(self.snap_opt(|r| r.render_ms), " ms"),
            self.snap(|r| r.sigint_to_exit_s
                - (r.snapshot_ms.unwrap_or(0.0) + r.render_ms.unwrap_or(0.0)) / 1000.0),
            opt(self.snap_opt(|r| r.stacks), ""),
            opt(self.snap_opt(|r| r.live_allocs), ""),
            median(self.snapshot.iter().map(|r| dropped_total(&r.dropped) as f64)),
            self.snap(|r| mib(r.rss_before_stop_kib)),
            self.snap(|r| mib(r.max_rss_kib)),
            self.snap(|r| r.alloc_ns),
        )
    }

    fn to_json(&self) -> Value {
        let m = &self.machine;
        let workloads: serde_json::Map<String, Value> = self
            .workloads
            .iter()
            .map(|c| (c.spec.name.to_string(), c.to_json()))
            .collect();
        let agent_runs = |runs: &[AgentRun]| -> Vec<Value> {
            runs.iter()
                .map(|r| {
                    json!({
                        "wall_s": r.wall_s, "allocs": r.allocs, "agent_cpu_s": r.agent_cpu_s,
                        "target_cpu_s": r.target_cpu_s, "agent_peak_rss_kib": r.peak_rss_kib,
                    })
                })
                .collect()
        };
        let agent = agent_runs(&self.agent);
        let paced_nofp = |runs: &[AgentRun]| {
            json!({
                "rate": PACED_RATE, "seconds": PACED_SECONDS, "depth": NOFP_DEPTH,
                "agent_core_fraction": agent_core(runs), "target_core_fraction": target_core(runs),
                "runs": agent_runs(runs),
            })
        };
        let big: Vec<Value> = self
            .big
            .iter()
            .map(|r| {
                json!({
                    "attach_s": r.attach_s, "tracer_cpu_s": r.tracer_cpu_s,
                    "tracer_peak_rss_kib": r.tracer_peak_rss_kib, "unwind": unwind_json(&r.unwind),
                })
            })
            .collect();
        let snapshot: Vec<Value> = self
            .snapshot
            .iter()
            .map(|r| {
                json!({
                    "alloc_ns": r.alloc_ns, "sigint_to_exit_s": r.sigint_to_exit_s,
                    "snapshot_ms": r.snapshot_ms, "flamegraph_ms": r.flamegraph_ms, "render_ms": r.render_ms, "stacks": r.stacks,
                    "live_allocs": r.live_allocs, "rss_before_stop_kib": r.rss_before_stop_kib,
                    "max_rss_kib": r.max_rss_kib, "dropped": r.dropped,
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|t| json!({ "name": t.name, "limit": t.limit, "value": t.value, "met": t.met }))
            .collect();
        json!({
            "machine": { "cpus": m.cpus, "kernel": m.kernel, "loadavg_before": m.load_before, "loadavg_after": m.load_after },
            "repeat": self.repeat,
            "workloads": workloads,
            "agent_paced": {
                "rate": PACED_RATE, "seconds": PACED_SECONDS,
                "agent_core_fraction": self.agent_core(), "target_core_fraction": self.target_core(),
                "runs": agent,
            },
            "agent_paced_nofp": paced_nofp(&self.agent_nofp),
            "agent_paced_nofp_full": paced_nofp(&self.agent_nofp_full),
            "attach_big_executable": {
                "functions": BIG_FUNCTIONS,
                "attach_s": median(self.big.iter().map(|r| r.attach_s)),
                "table_bytes": median_opt(self.big.iter().map(|r| r.unwind.table_bytes)),
                "runs": big,
            },
            "snapshot": {
                "allocs": STACKS_ALLOCS, "stacks": STACKS_DISTINCT,
                "sigint_to_exit_s": self.snap(|r| r.sigint_to_exit_s),
                "max_rss_kib": self.snap(|r| r.max_rss_kib as f64),
                "runs": snapshot,
            },
            "node": self.node.to_json(),
            "targets": targets,
            "measure_s": self.measure_s,
            "total_s": self.total_s,
        })
    }
}
