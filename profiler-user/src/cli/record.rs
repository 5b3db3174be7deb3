//! `memscope record`: attach to a running process, show progress, stop at the duration, on
//! Ctrl-C or when the target exits, then print the leak report and write every output file.
//!
//! With trigger flags (`--every`, `--on-growth`, `--on-rss`, `--on-return`, `--on-usdt`,
//! `--on-exit`, `--on-gc`; [`super::trigger_args`], see [`crate::trigger`]) it also takes snapshots during the recording, writes
//! each to `OUT/snapshots/<seq>-<reason>.json` (the `leaks.json` schema plus `reason` and
//! `taken_at`) with an `index.json` beside them, and judges every leak's growth across the last
//! `--verdict-window` snapshots (the final one included): `leaks.json` and the report then
//! carry verdicts. With `--on-exit`, the target's exit is expected: the final snapshot is taken
//! on exit and memscope exits 0.
use std::{
    collections::HashMap,
    fs,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;

use super::trigger_args::TriggerArgs;
use crate::{
    units::{parse_duration, parse_sampling},
    aggregate::{
        growth::{self, Verdict},
        HeapProfile, Measure,
    },
    bpf::load::{ProbeMode, ProbeSettings, SourceMode},
    render,
    session::Session,
    target::TracedTarget as _,
    trigger::{self, TriggerEngine, TriggerSpec},
};

/// Exit code when the target exited before the recording ended (the files are still written).
pub const EXIT_TARGET_EXITED: u8 = 3;

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Process to trace (it keeps running; nothing is injected into it).
    #[arg(long)]
    pub pid: u32,
    /// How long to record (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Live allocations younger than this are not reported as leaks.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_age: Duration,
    /// Directory for report.txt, leaks.json, flamegraph.svg, heap.folded, heap.pb.gz.
    #[arg(long, default_value = "memscope-out")]
    pub out: PathBuf,
    /// `full` records every allocation; a size (e.g. 512KiB) samples one allocation per that
    /// many bytes on average (Poisson) and scales estimates up.
    #[arg(long, default_value = "512KiB", value_parser = parse_sampling)]
    pub sampling: u64,
    /// Capacity for live allocations tracked at once.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_allocs: u32,
    /// Capacity for distinct allocation stacks.
    #[arg(long, default_value_t = 1 << 15)]
    pub max_stacks: u32,
    /// Unwind rows (8 bytes each) per target at most: the tables of the files it maps, sized to
    /// what it maps at attach plus room for later libraries. Files past it use frame pointers.
    #[arg(long, default_value_t = ProbeSettings::default().max_unwind_rows, value_name = "N")]
    pub max_unwind_rows: u32,
    /// How the allocator probes are attached: `session` (Linux 6.13+) lets unsampled calls
    /// skip the return trap; `auto` uses it where the kernel has it.
    #[arg(long, value_enum, default_value_t = ProbeMode::Auto)]
    pub probe_mode: ProbeMode,
    /// Where allocations are seen: `auto` traces a process that carries the USDT
    /// heap-sampling contract (`ddheap:alloc`/`free`, `otel_memory:alloc`/`free`) through it,
    /// one trap per sample, and any other process through its allocator; `allocator` and
    /// `usdt` force either (`usdt` refuses a process without the contract).
    #[arg(long, value_enum, default_value_t = SourceMode::Auto)]
    pub source: SourceMode,
    /// Leaks shown in the report.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Leaks listed in leaks.json (the largest; `leak_stacks` says how many there are).
    #[arg(long, default_value_t = 1000)]
    pub json_top: usize,
    /// Snapshot triggers (shared with `memscope agent`).
    #[command(flatten)]
    pub triggers: TriggerArgs,
    /// Leak verdicts use the last this many snapshots (at least 3).
    #[arg(long, default_value_t = growth::DEFAULT_WINDOW, value_parser = parse_window, help_heading = "Triggers")]
    pub verdict_window: usize,
    /// The allocator's entry points by address, for a stripped executable without a debug file:
    /// `malloc=0x401a20,free=0x4021f0` (link-time addresses, as nm prints them in an unstripped
    /// build; C allocator names: malloc, calloc, realloc, free, ...). See docs/coverage.md.
    #[arg(long, value_name = "NAME=ADDR,...", value_parser = parse_alloc_symbols)]
    pub alloc_symbol: Option<crate::bpf::stripped::NamedEntries>,
}

fn parse_alloc_symbols(s: &str) -> Result<crate::bpf::stripped::NamedEntries, String> {
    crate::bpf::stripped::NamedEntries::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_window(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= growth::MIN_SNAPSHOTS => Ok(n),
        _ => Err(format!("invalid window {s:?}: a number of snapshots, at least {}", growth::MIN_SNAPSHOTS)),
    }
}

pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let settings = ProbeSettings {
        max_allocs: args.max_allocs,
        max_stacks: args.max_stacks,
        sample_bytes: args.sampling,
        probe_mode: args.probe_mode,
        max_unwind_rows: args.max_unwind_rows,
        source: args.source,
        target_slots: 1,
    };
    install_stop_handler();
    let session = Session::attach_named(args.pid, settings, &args.alloc_symbol.clone().unwrap_or_default())?;
    let rate = if args.sampling == 0 { "every allocation".to_string() } else { format!("sampling 1 per {} bytes", args.sampling) };
    if let Some(source) = session.source() {
        let live = if session.live_tracking() { "" } else { "; live tracking unavailable (alloc-only build)" };
        eprintln!(
            "memscope: attached to {} ({}), source {source} in {} (the service samples its own allocations{live}); recording for {:?} (Ctrl-C to stop)",
            args.pid,
            render::escape::term(&crate::procfs::comm(args.pid).unwrap_or_default()),
            render::escape::term(session.allocator()),
            args.duration,
        );
    } else {
        eprintln!(
            "memscope: attached to {} ({}), allocator {}, {rate}, {} probes; recording for {:?} (Ctrl-C to stop)",
            args.pid,
            render::escape::term(&crate::procfs::comm(args.pid).unwrap_or_default()),
            render::escape::term(session.allocator()),
            session.probe_mode().name(),
            args.duration,
        );
    }
    if let Some(line) = session.runtime_heap() {
        eprintln!("memscope: {}", render::escape::term(line));
    }
    let specs = args.triggers.specs()?;
    let mut triggered = if specs.is_empty() {
        None
    } else {
        let engine = TriggerEngine::attach(&session, &specs, args.triggers.min_spacing)?;
        let reasons: Vec<String> = specs.iter().map(|s| s.describe()).collect();
        eprintln!(
            "memscope: triggers {} (each at most once per {:?}); snapshots go to {}",
            reasons.join(", "),
            args.triggers.min_spacing,
            args.out.join("snapshots").display()
        );
        Some(Triggered::new(engine, &args)?)
    };
    let stop = wait_for_end(&session, args.duration, triggered.as_mut(), args.min_age)?;
    let snapshot_started = Instant::now();
    // With --on-exit the snapshot taken at the exit is the final one.
    let exit_profile = triggered.as_mut().and_then(|t| t.exit_profile.take());
    let on_exit = exit_profile.is_some();
    let profile = match exit_profile {
        Some(p) => p,
        None => session.snapshot(args.min_age).context("taking the final snapshot")?,
    };
    let snapshot_ms = snapshot_started.elapsed().as_millis() as u64;
    let verdicts = triggered.as_mut().map(|t| {
        if !on_exit {
            t.series.push(&profile);
        }
        (t.series.verdicts(), t.series.len())
    });
    let flamegraph_ms =
        write_outputs(&profile, &args.out, args.top, args.json_top, verdicts.as_ref().map(|(v, n)| (v, *n)))?;
    let render_ms = snapshot_started.elapsed().as_millis() as u64 - snapshot_ms;
    tracing::info!(
        stacks = profile.stacks.len(),
        live_allocs = profile.totals.live_allocs,
        snapshot_ms,
        flamegraph_ms,
        render_ms,
        "final snapshot"
    );
    print!("{}", render::text::leak_report(&profile, args.top));
    if let Some((v, n)) = &verdicts {
        print!("\n{}", growth::verdict_report(&profile, v, *n, args.top));
    }
    std::io::stdout().flush().ok();
    eprintln!("memscope: wrote report.txt, leaks.json, flamegraph.svg, heap.folded, heap.pb.gz to {}", args.out.display());
    if let Some(t) = &triggered {
        eprintln!("memscope: {}", t.summary());
    }
    if stop == Stop::TargetExited {
        if on_exit {
            eprintln!("memscope: process {} exited; the final snapshot and report were taken at its exit", args.pid);
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("memscope: process {} exited during the recording; the report covers what was recorded until it exited", args.pid);
        return Ok(ExitCode::from(EXIT_TARGET_EXITED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The triggered snapshots of a recording: the engine, the files, the series for verdicts.
struct Triggered {
    engine: TriggerEngine,
    dir: PathBuf,
    pid: u32,
    seq: u64,
    series: growth::Series,
    index: Vec<serde_json::Value>,
    /// The snapshot taken when the target exited (`--on-exit`): the final one.
    exit_profile: Option<HeapProfile>,
}

impl Triggered {
    fn new(engine: TriggerEngine, args: &RecordArgs) -> anyhow::Result<Triggered> {
        let dir = args.out.join("snapshots");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Triggered {
            engine,
            dir,
            pid: args.pid,
            seq: 0,
            series: growth::Series::new(args.verdict_window),
            index: Vec::new(),
            exit_profile: None,
        })
    }

    /// Polls the engine; takes, writes and keeps a snapshot for each firing.
    fn poll(&mut self, session: &Session, min_age: Duration, tty: bool) -> anyhow::Result<()> {
        for fired in self.engine.poll(session) {
            let profile = match session.snapshot(min_age) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("memscope: snapshot for {} failed: {}", fired.reason, super::one_line(&e));
                    continue;
                }
            };
            self.seq += 1;
            self.series.push(&profile);
            let json = trigger::snapshot_json(&profile, &fired.reason, &self.series.verdicts());
            let file = trigger::snapshot_file_name(self.seq, &fired.reason);
            let path = self.dir.join(&file);
            fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", path.display()))?;
            self.index.push(serde_json::json!({
                "seq": self.seq,
                "reason": fired.reason,
                "file": file,
                "taken_at": json["taken_at"],
                "taken_at_ms": profile.taken_at_ms,
                "fired_at_ms": fired.at_ms,
                "live_bytes": profile.totals.live_bytes,
                "leaked_bytes": profile.leaked_bytes(),
            }));
            self.write_index()?;
            eprintln!(
                "{}memscope: snapshot {} ({}) at {:.1}s: {} live -> snapshots/{file}",
                if tty { "\r\x1b[2K" } else { "" },
                self.seq,
                fired.reason,
                profile.duration_s,
                render::human_bytes(profile.totals.live_bytes),
            );
            if fired.reason == crate::trigger::spec::HEAP_LIMIT_REASON {
                self.write_heap_limit_summary(session, &file);
            }
            if fired.reason == TriggerSpec::Exit.reason() {
                self.exit_profile = Some(profile);
            }
        }
        Ok(())
    }

    /// A `heap_limit` firing: V8's used heap and limit and a V8 heap summary, read in one
    /// inspector session, beside the snapshot `file` as `<file stem>.v8.json`. Failures are
    /// reported, not fatal.
    fn write_heap_limit_summary(&self, session: &Session, file: &str) {
        // The traced process by identity, never whatever has its pid now; one deadline for the
        // whole session (the heap figures, then a snapshot streamed into the summary).
        let budget = crate::v8::Budget::new(crate::v8::inspector::DEFAULT_CALL_TIMEOUT + crate::v8::heap_limit::SESSION_TIMEOUT);
        let taken = crate::v8::Inspector::open(session.process().clone(), "record: heap_limit summary", budget).and_then(|mut insp| {
            let heap = crate::v8::heap_limit::read(&mut insp)?;
            let summary = crate::v8::summary_with(&mut insp, false, crate::trigger::spec::HEAP_LIMIT_REASON)?;
            insp.close()?;
            Ok((heap, summary))
        });
        let path = self.dir.join(format!("{}.v8.json", file.trim_end_matches(".json")));
        let written = taken.map_err(anyhow::Error::new).and_then(|(heap, summary)| {
            let mut v = serde_json::to_value(&summary)?;
            v["heap"] = serde_json::json!({ "used": heap.used, "limit": heap.limit, "total": heap.total, "percent": heap.percent() });
            fs::write(&path, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", path.display()))?;
            Ok(heap)
        });
        match written {
            Ok(h) => eprintln!("memscope: V8 heap at {:.0}% of its limit ({} of {}) -> snapshots/{}", h.percent(),
                render::human_bytes(h.used), render::human_bytes(h.limit), path.file_name().unwrap_or_default().to_string_lossy()),
            Err(e) => eprintln!("memscope: V8 heap summary for heap_limit failed: {}", super::one_line(&e)),
        }
    }

    fn write_index(&self) -> anyhow::Result<()> {
        let index = serde_json::json!({
            "pid": self.pid,
            "min_spacing_s": self.engine.min_spacing().as_secs_f64(),
            "triggers": self.engine.status(),
            "snapshots": self.index,
        });
        let path = self.dir.join("index.json");
        fs::write(&path, serde_json::to_string_pretty(&index)?).with_context(|| format!("writing {}", path.display()))
    }

    fn summary(&self) -> String {
        let _ = self.write_index();
        let per: Vec<String> = self
            .engine
            .status()
            .iter()
            .map(|t| format!("{} fired {}, suppressed {}", t.reason, t.fired, t.suppressed))
            .collect();
        format!(
            "{} triggered snapshots in {} ({}); {} firings suppressed by --min-spacing",
            self.seq,
            self.dir.display(),
            per.join("; "),
            self.engine.suppressed()
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Duration,
    Interrupted,
    TargetExited,
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM end the recording (and still write the files) instead of killing
/// memscope. Installed before attaching, so no early signal is lost.
fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, request_stop as *const () as libc::sighandler_t) };
    }
}

fn wait_for_end(
    session: &Session,
    duration: Duration,
    mut triggered: Option<&mut Triggered>,
    min_age: Duration,
) -> anyhow::Result<Stop> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_events = 0u64;
    let mut last_print = Instant::now();
    let tick = if triggered.is_some() { trigger::POLL_INTERVAL } else { Duration::from_millis(50) };
    let stop = loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            break Stop::Interrupted;
        }
        if started.elapsed() >= duration {
            break Stop::Duration;
        }
        // With triggers the engine notices the exit (and takes the --on-exit snapshot).
        if let Some(t) = triggered.as_deref_mut() {
            t.poll(session, min_age, tty)?;
            if t.engine.finished() {
                break Stop::TargetExited;
            }
        } else if !session.alive() {
            break Stop::TargetExited;
        }
        if tty && last_print.elapsed() >= Duration::from_secs(1) {
            let stats = session.stats();
            let events = stats.allocs + stats.frees;
            let rate = events.saturating_sub(last_events) as f64 / last_print.elapsed().as_secs_f64();
            let drops: u64 = stats.dropped.values().sum();
            eprint!(
                "\r  {:>5.0}s elapsed  {:>10.0} events/s  {:>10} live  {} dropped   ",
                session.elapsed().as_secs_f64(),
                rate,
                render::human_bytes(stats.live_bytes),
                drops
            );
            last_events = events;
            last_print = Instant::now();
        }
        std::thread::sleep(tick);
    };
    if tty {
        eprintln!();
    }
    Ok(stop)
}

/// Writes every output file of a recording into `dir`: the report shows `top` leaks,
/// leaks.json at most `json_top`; verdicts, when given, annotate both. Returns how long the
/// flamegraph took to render, in milliseconds.
pub fn write_outputs(
    profile: &HeapProfile,
    dir: &Path,
    top: usize,
    json_top: usize,
    verdicts: Option<(&HashMap<String, Verdict>, usize)>,
) -> anyhow::Result<u64> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let create = |name: &str| {
        let path = dir.join(name);
        fs::File::create(&path).map(std::io::BufWriter::new).with_context(|| format!("writing {}", path.display()))
    };
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let started = Instant::now();
        create(name)?.write_all(bytes).with_context(|| format!("writing {name}"))?;
        tracing::debug!(file = name, ms = started.elapsed().as_millis() as u64, "written");
        Ok(())
    };
    let mut report = render::text::leak_report(profile, top);
    if let Some((v, n)) = verdicts {
        report.push('\n');
        report.push_str(&growth::verdict_report(profile, v, n, top));
    }
    let refused = crate::target_fs::refusals();
    if !refused.is_empty() {
        let each: Vec<String> = refused.iter().map(|(kind, reason, n)| format!("{kind} {reason}: {n}")).collect();
        report.push_str(&format!("\nFiles of the target refused (not opened or not read to the end): {}\n", each.join(", ")));
    }
    let budget = crate::budget::refusals();
    if !budget.is_empty() {
        let each: Vec<String> = budget.iter().map(|(what, limit, n)| format!("{what} ({limit} cap): {n}")).collect();
        report.push_str(&format!(
            "\nTarget data not loaded, its memory budget spent (some names may be missing): {}\n",
            each.join(", ")
        ));
    }
    if let Some(js) = &profile.js_names {
        report.push_str(&format!("\nJavaScript frames named from V8's heap: {}; {} JS frames unnamed", js.named, js.unnamed_total()));
        let why: Vec<String> = js.unnamed.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        if !why.is_empty() {
            report.push_str(&format!(" ({})", why.join(", ")));
        }
        if let Some(e) = &js.layout_error {
            report.push_str(&format!("; V8 not readable: {e}"));
        }
        report.push('\n');
    }
    write("report.txt", report.as_bytes())?;
    let started = Instant::now();
    let mut json = render::json::leaks_json(profile, Some(json_top));
    if let Some((v, _)) = verdicts {
        growth::annotate_leaks_json(&mut json, v);
    }
    json["target_files"] = crate::target_fs::report();
    json["memory_budget"] = crate::budget::report_json();
    let mut out = create("leaks.json")?;
    serde_json::to_writer_pretty(&mut out, &json).context("writing leaks.json")?;
    out.flush().context("writing leaks.json")?;
    tracing::debug!(file = "leaks.json", ms = started.elapsed().as_millis() as u64, "written");
    let title = format!("memscope: live heap of pid {}", profile.pid);
    let started = Instant::now();
    let svg = render::flamegraph::flamegraph_svg(profile, Measure::Inuse, &title)?;
    let flamegraph_ms = started.elapsed().as_millis() as u64;
    write("flamegraph.svg", &svg)?;
    write("heap.folded", render::folded::folded(profile, Measure::Inuse).as_bytes())?;
    let started = Instant::now();
    let pprof = render::pprof::pprof_gz(profile)?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "pprof rendered");
    write("heap.pb.gz", &pprof)?;
    Ok(flamegraph_ms)
}
