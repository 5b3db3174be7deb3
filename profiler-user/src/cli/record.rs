//! `memscope record`: attach to a running process, show progress, stop at the duration, on
//! Ctrl-C or when the target exits, then print the leak report and write every output file.
use std::{
    fs,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use profiler_common::Counter;

use super::units::{parse_duration, parse_sampling};
use crate::{
    aggregate::{HeapProfile, Measure},
    bpf::load::ProbeSettings,
    render,
    session::Session,
    target::TracedTarget as _,
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
    /// Leaks shown in the report.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let settings = ProbeSettings {
        max_allocs: args.max_allocs,
        max_stacks: args.max_stacks,
        sample_bytes: args.sampling,
    };
    install_stop_handler();
    let session = Session::attach(args.pid, settings)?;
    let rate = if args.sampling == 0 { "every allocation".to_string() } else { format!("sampling 1 per {} bytes", args.sampling) };
    eprintln!(
        "memscope: attached to {} ({}), allocator {}, {rate}; recording for {:?} (Ctrl-C to stop)",
        args.pid,
        crate::procfs::comm(args.pid).unwrap_or_default(),
        session.allocator(),
        args.duration,
    );
    let stop = wait_for_end(&session, args.duration)?;
    let snapshot_started = Instant::now();
    let profile = session.snapshot(args.min_age).context("taking the final snapshot")?;
    let snapshot_ms = snapshot_started.elapsed().as_millis() as u64;
    write_outputs(&profile, &args.out, args.top)?;
    let render_ms = snapshot_started.elapsed().as_millis() as u64 - snapshot_ms;
    tracing::info!(stacks = profile.stacks.len(), live_allocs = profile.totals.live_allocs, snapshot_ms, render_ms, "final snapshot");
    print!("{}", render::text::leak_report(&profile, args.top));
    std::io::stdout().flush().ok();
    eprintln!("memscope: wrote report.txt, leaks.json, flamegraph.svg, heap.folded, heap.pb.gz to {}", args.out.display());
    if stop == Stop::TargetExited {
        eprintln!("memscope: process {} exited during the recording; the report covers what was recorded until it exited", args.pid);
        return Ok(ExitCode::from(EXIT_TARGET_EXITED));
    }
    Ok(ExitCode::SUCCESS)
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

fn wait_for_end(session: &Session, duration: Duration) -> anyhow::Result<Stop> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_events = 0u64;
    let mut last_print = Instant::now();
    let stop = loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            break Stop::Interrupted;
        }
        if started.elapsed() >= duration {
            break Stop::Duration;
        }
        if !session.alive() {
            break Stop::TargetExited;
        }
        if tty && last_print.elapsed() >= Duration::from_secs(1) {
            let c = session.counters().unwrap_or_default();
            let get = |k: Counter| c.get(k as usize).copied().unwrap_or(0);
            let events = get(Counter::Allocs) + get(Counter::Frees) + get(Counter::UntrackedFrees);
            let rate = events.saturating_sub(last_events) as f64 / last_print.elapsed().as_secs_f64();
            let live = get(Counter::SampledBytes).saturating_sub(get(Counter::FreeBytes));
            let drops: u64 = Counter::DROPS.iter().map(|d| get(*d)).sum();
            eprint!(
                "\r  {:>5.0}s elapsed  {:>10.0} events/s  {:>10} live (sampled)  {} dropped   ",
                session.elapsed().as_secs_f64(),
                rate,
                render::human_bytes(live),
                drops
            );
            last_events = events;
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if tty {
        eprintln!();
    }
    Ok(stop)
}

/// Writes every output file of a recording into `dir`.
pub fn write_outputs(profile: &HeapProfile, dir: &Path, top: usize) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    write("report.txt", render::text::leak_report(profile, top).as_bytes())?;
    let json = render::json::leaks_json(profile, None);
    write("leaks.json", serde_json::to_string_pretty(&json)?.as_bytes())?;
    let title = format!("memscope: live heap of pid {}", profile.pid);
    write("flamegraph.svg", &render::flamegraph::flamegraph_svg(profile, Measure::Inuse, &title)?)?;
    write("heap.folded", render::folded::folded(profile, Measure::Inuse).as_bytes())?;
    write("heap.pb.gz", &render::pprof::pprof_gz(profile)?)?;
    Ok(())
}
