//! End-to-end tests of the tracing path: real eBPF probes attached to real fixture processes
//! of known ground truth (see tests/fixtures/alloc_fixture.c), through the `memscope record`
//! binary and through the library. Need root; CI runs them as root.
mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Command,
    time::Duration,
};

use common::{alloc_fixture, require_root, spawn_record, Fixture};
use profiler_user::{
    aggregate::HeapProfile,
    bpf::load::{ProbeMode, ProbeSettings},
    session::Session,
    target::TracedTarget,
};
use serde_json::Value;

const MEMSCOPE: &str = env!("CARGO_BIN_EXE_memscope");

/// Runs `memscope record` on a fixture: waits for "attached", lets the workload run, then
/// stops the recording with SIGINT. Returns (exit code, stderr).
fn record(fixture: &mut Fixture, out: &Path, extra: &[&str], stop: bool) -> (i32, String) {
    let mut child = spawn_record(fixture.pid, out, extra);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    while !first.contains("attached") {
        let before = first.len();
        stderr.read_line(&mut first).unwrap();
        assert!(first.len() > before, "memscope ended before attaching: {first}");
    }
    fixture.go();
    if stop {
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    } else {
        fixture.finish();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), first + &rest)
}

fn leak<'a>(leaks: &'a Value, function: &str) -> Option<&'a Value> {
    leaks_in(leaks, function).into_iter().next()
}

/// Leaks whose innermost frame (the allocator's caller) is `function`: one per call site.
fn leaks_in<'a>(leaks: &'a Value, function: &str) -> Vec<&'a Value> {
    leaks["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["frames"][0]["function"].as_str() == Some(function))
        .collect()
}

/// Bytes and allocations leaked from all call sites in `function` are exactly as expected.
fn assert_site(leaks: &Value, function: &str, bytes: u64, allocs: u64) {
    let sites = leaks_in(leaks, function);
    assert!(!sites.is_empty(), "no leak reported for {function}: {leaks:#}");
    let sum = |k: &str| sites.iter().map(|l| l[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("bytes"), sum("allocs")), (bytes, allocs), "{function}");
}

/// `memscope record` reports every leaking site of the fixture with exact bytes and counts,
/// never a churn site, exact totals, no drops, the pre-attach heap as unseen, and writes all
/// five files with the fixture's function names in them.
#[test]
fn record_reports_exact_leaks_per_site() {
    require_root();
    let mut fixture = Fixture::start(&alloc_fixture(), "basic");
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = record(&mut fixture, out.path(), &["--min-age", "0s", "--sampling", "full"], true);
    assert_eq!(code, 0, "{stderr}");
    let leaks: Value = serde_json::from_slice(&std::fs::read(out.path().join("leaks.json")).unwrap()).unwrap();
    assert_site(&leaks, "leak_fixed", 7000, 7);
    assert_site(&leaks, "leak_calloc", 1500, 3);
    assert_site(&leaks, "leak_realloc", 5000, 1);
    assert_site(&leaks, "leak_aligned", 1136, 6);
    assert_site(&leaks, "leak_big", 2 << 20, 2);
    for f in ["churn_strings", "realloc_to_zero", "failed_and_null", "pre_attach_leak"] {
        assert!(leak(&leaks, f).is_none(), "{f} reported as a leak: {leaks:#}");
    }
    let t = &leaks["totals"];
    assert_eq!(t["allocs"], 1022, "{t}");
    assert_eq!(t["frees"], 1003, "{t}");
    assert_eq!(t["live_allocs"], 19, "{t}");
    assert_eq!(t["live_bytes"], 2111788, "{t}");
    assert!(leaks["dropped"].as_object().unwrap().values().all(|v| v == 0), "{}", leaks["dropped"]);
    assert!(leaks["unseen_before_attach_bytes"].as_u64().unwrap() >= 3 << 20);
    // The caller frame carries file:line from the fixture's debug info.
    let fixed = leak(&leaks, "leak_fixed").unwrap();
    assert!(fixed["frames"][0]["file"].as_str().unwrap().ends_with("alloc_fixture.c"));
    assert!(fixed["frames"][0]["line"].as_u64().unwrap() > 0);
    assert!(fixed["frames"].as_array().unwrap().iter().any(|f| f["function"] == "main"), "{fixed}");

    let report = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    assert!(report.contains("leak_big") && report.contains("leak_fixed"), "{report}");
    let svg = std::fs::read_to_string(out.path().join("flamegraph.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("leak_calloc"));
    let folded = std::fs::read_to_string(out.path().join("heap.folded")).unwrap();
    assert!(folded.lines().any(|l| l.contains("main;leak_fixed") && l.ends_with(" 7000")), "{folded}");
    assert!(std::fs::metadata(out.path().join("heap.pb.gz")).unwrap().len() > 100);
}

/// Allocations younger than --min-age are live but not leaks.
#[test]
fn min_age_filters_young_allocations() {
    require_root();
    let mut fixture = Fixture::start(&alloc_fixture(), "basic");
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = record(&mut fixture, out.path(), &["--min-age", "1h", "--sampling", "full"], true);
    assert_eq!(code, 0, "{stderr}");
    let leaks: Value = serde_json::from_slice(&std::fs::read(out.path().join("leaks.json")).unwrap()).unwrap();
    assert_eq!(leaks["leaks"].as_array().unwrap().len(), 0, "{leaks:#}");
    assert_eq!(leaks["totals"]["live_bytes"], 2111788);
}

/// When the target exits during the recording, the files are still written (an end-of-run
/// report) and memscope says so with exit code 3.
#[test]
fn target_exit_keeps_the_recording() {
    require_root();
    let mut fixture = Fixture::start(&alloc_fixture(), "exit");
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = record(&mut fixture, out.path(), &["--min-age", "0s", "--sampling", "full"], false);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("exited during the recording"), "{stderr}");
    let leaks: Value = serde_json::from_slice(&std::fs::read(out.path().join("leaks.json")).unwrap()).unwrap();
    assert_eq!(leaks["target_exited"], true);
    assert_site(&leaks, "leak_fixed", 7000, 7);
}

/// Bad targets give one clear line and a non-zero exit.
#[test]
fn bad_targets_fail_with_one_line() {
    require_root();
    let out = Command::new(MEMSCOPE).args(["record", "--pid", "999999999", "--duration", "1s"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "memscope: no process with pid 999999999", "{err}");

    // A static program without malloc: nothing to probe.
    let exe = common::build_fixture("no_allocator", &["-nostdlib", "-static"]);
    let mut child = Command::new(&exe).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let out = Command::new(MEMSCOPE).args(["record", "--pid", &child.id().to_string(), "--duration", "1s"]).output().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no recognizable allocator") && err.lines().count() == 1, "{err}");

    // Without root or CAP_SYS_ADMIN + CAP_SYS_PTRACE (as user nobody, with no capabilities).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", MEMSCOPE, "record", "--pid"])
        .arg(std::process::id().to_string())
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root, or the capabilities CAP_SYS_ADMIN"), "{err}");

    let out = Command::new(MEMSCOPE).args(["record", "--pid", "1", "--duration", "ten"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
}

/// Poisson byte sampling at the default rate (512 KiB) gives estimates within 15% of the
/// truth (400 MiB leaked in 64 KiB blocks, among 100k small churned allocations: ~750 samples;
/// over 12 runs the estimate's spread was 4%, so 15% is almost 4 of them), counts every call
/// exactly, and states its rate; `full` is exact.
#[test]
fn sampling_estimates_are_unbiased() {
    require_root();
    let truth = 6400u64 * 65536;
    let sampled = snapshot_of("sample", ProbeSettings { sample_bytes: 512 * 1024, ..Default::default() });
    let (bytes, allocs) = site(&sampled, "leak_sampled");
    let err = (bytes as f64 - truth as f64).abs() / truth as f64;
    assert!(err < 0.15, "estimate {bytes} vs {truth} ({:.1}% off)", err * 100.0);
    assert!((allocs as f64 - 6400.0).abs() / 6400.0 < 0.15, "allocs estimate {allocs}");
    assert_eq!(sampled.sample_bytes, 512 * 1024);
    assert_eq!(sampled.totals.allocs, 6400 + 100_000);
    assert_eq!(sampled.totals.allocated_bytes, truth + 100_000 * 64);
    assert_eq!(site(&sampled, "churn_strings"), (0, 0));
    let full = snapshot_of("sample", ProbeSettings::default());
    assert_eq!(site(&full, "leak_sampled"), (truth, 6400));
}

fn snapshot_of(mode: &str, settings: ProbeSettings) -> HeapProfile {
    let (mut fixture, session) = traced(&alloc_fixture(), mode, None, settings);
    fixture.go();
    session.snapshot(Duration::ZERO).unwrap()
}

/// Fixture `exe` in `mode` (with `preload`, a library of /usr/lib/x86_64-linux-gnu, as
/// LD_PRELOAD), attached with `settings` and waiting for `go`.
fn traced(exe: &Path, mode: &str, preload: Option<&str>, settings: ProbeSettings) -> (Fixture, Session) {
    let mut cmd = Command::new(exe);
    cmd.arg(mode);
    if let Some(lib) = preload {
        cmd.env("LD_PRELOAD", Path::new("/usr/lib/x86_64-linux-gnu").join(lib));
    }
    let fixture = Fixture::spawn(cmd);
    let session = Session::attach(fixture.pid, settings).unwrap();
    (fixture, session)
}

/// (live bytes, live allocations) of all stacks whose innermost frame is `function`.
fn site(p: &HeapProfile, function: &str) -> (u64, u64) {
    p.stacks
        .iter()
        .filter(|s| s.frames.first().and_then(|f| f.function.as_deref()) == Some(function))
        .fold((0, 0), |(b, n), s| (b + s.live_bytes, n + s.live_allocs))
}

/// Allocations from several threads are all seen, with their thread function as caller.
#[test]
fn threads_are_traced() {
    require_root();
    let p = snapshot_of("threads", ProbeSettings::default());
    assert_eq!(site(&p, "thread_leak"), (2664, 8), "{:#?}", p.stacks);
}

/// Maps made too small count what they lose instead of losing it silently.
#[test]
fn full_maps_are_counted_as_drops() {
    require_root();
    let p = snapshot_of("basic", ProbeSettings { max_allocs: 4, ..Default::default() });
    assert!(p.dropped["live_map_full"] > 0, "{:?}", p.dropped);
    assert_eq!(p.totals.allocs, 1022);
    let p = snapshot_of("basic", ProbeSettings { max_stacks: 2, ..Default::default() });
    let stack_drops = p.dropped["stack_map_full"] + p.dropped["stack_stats_full"];
    assert!(stack_drops > 0, "{:?}", p.dropped);
}

/// The probes sit at the cheap sites chosen by decoding each function (free on its NULL
/// check's branch, the memalign family on theirs) and still count exactly: the fixture's
/// 1022 allocations and 1003 non-NULL frees; its free(NULL) calls hit the probe and are ignored.
#[test]
fn chosen_probe_sites_count_exactly() {
    require_root();
    let (mut fixture, session) = traced(&alloc_fixture(), "basic", None, ProbeSettings::default());
    // This kernel (6.18) has uprobe.session: `auto` must not have fallen back.
    assert_eq!(session.probe_mode(), ProbeMode::Session);
    let sites = session.probe_sites();
    let free = sites.iter().find(|s| s.function == "free").unwrap();
    assert!(free.offset > 0 && free.emulated, "free probe at +{} ({})", free.offset, free.reason);
    fixture.go();
    let c = session.counters().unwrap();
    use profiler_common::Counter;
    assert_eq!(c[Counter::Allocs as usize], 1022);
    assert_eq!(c[Counter::Frees as usize] + c[Counter::UntrackedFrees as usize], 1003);
    assert_eq!(c[Counter::FailedAllocs as usize], 1, "malloc(SIZE_MAX)");
}

/// Classic probes attached while every thread of the target is allocating record each thread
/// from then on. An entry seen before its return probe existed used to leave the thread's
/// in-flight slot active, and every later call of that thread was taken for a nested one,
/// never recorded: the threads busy at the attach were lost.
#[test]
fn classic_probes_attached_to_busy_threads_record_every_thread() {
    require_root();
    let exe = common::build_fixture("busy_fixture", &["-pthread"]);
    let fixture = Fixture::start(&exe, "run");
    let settings = ProbeSettings { probe_mode: ProbeMode::Classic, ..Default::default() };
    let session = Session::attach(fixture.pid, settings).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let p = session.snapshot(Duration::ZERO).unwrap();
    for function in ["busy_a", "busy_b"] {
        let calls: u64 = common::stacks_through(&p, function).map(|s| s.total_allocs).sum();
        assert!(calls > 100, "{function}: {calls} allocations recorded in 0.5 s of a thread allocating without pause");
    }
}

/// The two ways of attaching, uprobe.session (one probe per function; unsampled calls skip
/// the return) and uprobe + uretprobe (kernels before 6.13), record the same thing, every
/// allocation, sampled, or sampled at one byte (exact again, through the sampled paths).
#[test]
fn session_and_classic_probes_agree() {
    require_root();
    for probe_mode in [ProbeMode::Session, ProbeMode::Classic] {
        let p = snapshot_of("basic", ProbeSettings { probe_mode, ..Default::default() });
        let t = &p.totals;
        assert_eq!((t.allocs, t.frees, t.live_allocs, t.live_bytes), (1022, 1003, 19, 2111788), "{probe_mode:?}");
        assert_eq!(site(&p, "leak_fixed"), (7000, 7), "{probe_mode:?}");
        assert_eq!(p.dropped.values().sum::<u64>(), 0, "{probe_mode:?}: {:?}", p.dropped);
        let p = snapshot_of("sample", ProbeSettings { probe_mode, sample_bytes: 512 * 1024, ..Default::default() });
        assert_eq!(p.totals.allocs, 6400 + 100_000, "{probe_mode:?} sampled");
        assert_eq!(site(&p, "churn_strings"), (0, 0), "{probe_mode:?} sampled");
        // One sample per byte: every allocation goes through the sampled path, and every free
        // through the filter in front of the live map (see probes::forget).
        let p = snapshot_of("basic", ProbeSettings { probe_mode, sample_bytes: 1, ..Default::default() });
        let t = &p.totals;
        assert_eq!((t.allocs, t.frees, t.live_allocs, t.live_bytes), (1022, 1003, 19, 2111788), "{probe_mode:?} 1 B");
        assert_eq!(site(&p, "leak_fixed"), (7000, 7), "{probe_mode:?} 1 B");
    }
}

/// A service whose libc was deleted or replaced on disk since it started (a package upgrade):
/// its maps say `libc.so.6 (deleted)`, and the probes still go into the libc it runs.
#[test]
fn allocator_deleted_on_disk_is_traced() {
    require_root();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .expect("this test process maps libc.so.6");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libc.so.6");
    std::fs::copy(libc, &copy).unwrap();
    let mut cmd = Command::new(alloc_fixture());
    cmd.arg("basic").env("LD_LIBRARY_PATH", dir.path());
    let mut fixture = Fixture::spawn(cmd);
    std::fs::remove_file(&copy).unwrap();
    let session = Session::attach(fixture.pid, ProbeSettings::default()).unwrap();
    assert!(session.allocator().ends_with("/libc.so.6 (deleted)"), "{}", session.allocator());
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert_eq!((p.totals.allocs, p.totals.live_bytes), (1022, 2111788));
    assert_eq!(site(&p, "leak_fixed"), (7000, 7));
}

/// (live bytes, live allocations) of all stacks with `function` in any frame.
fn site_anywhere(p: &HeapProfile, function: &str) -> (u64, u64) {
    common::stacks_through(p, function).fold((0, 0), |(b, n), s| (b + s.live_bytes, n + s.live_allocs))
}

/// C++ `new` and `delete`: through libstdc++'s operators (which call malloc and free) with
/// glibc, and through the operators jemalloc and tcmalloc define themselves (which do not:
/// without probes on them a C++ service on those allocators showed nothing). Every allocation
/// exactly, and sampled. The function that called `new` (or libc's `strdup`) is in the stack
/// although libstdc++, libc and jemalloc have no frame pointers (unwound from their CFI, `unwind`).
#[test]
fn cxx_new_and_delete_are_traced() {
    require_root();
    let exe = common::build_fixture("cxx_fixture", &[]);
    for preload in [None, Some("libjemalloc.so.2"), Some("libtcmalloc_minimal.so.4")] {
        let start = |mode: &str, sample_bytes: u64, probe_mode: ProbeMode| {
            traced(&exe, mode, preload, ProbeSettings { sample_bytes, probe_mode, ..Default::default() })
        };
        if preload.is_none() {
            // Classic uprobes + uretprobes recover the same frames (the walk runs at the return).
            let (mut fixture, session) = start("basic", 0, ProbeMode::Classic);
            fixture.go();
            let p = session.snapshot(Duration::ZERO).unwrap();
            assert_eq!(site_anywhere(&p, "leak_nothrow()"), (300, 1), "classic: {:#?}", p.stacks);
        }
        let (mut fixture, session) = start("basic", 0, ProbeMode::Auto);
        fixture.go();
        let p = session.snapshot(Duration::ZERO).unwrap();
        let t = &p.totals;
        assert_eq!((t.allocs, t.frees, t.live_allocs, t.live_bytes), (1514, 1500, 14, 9097), "{preload:?}");
        assert_eq!(p.dropped.values().sum::<u64>(), 0, "{preload:?}: {:?}", p.dropped);
        for (function, expected) in [
            ("leak_objects()", (7000, 7)),
            ("leak_arrays()", (1500, 3)),
            ("leak_aligned()", (256, 2)),
            ("leak_nothrow()", (300, 1)),
            ("leak_strdup()", (41, 1)),
        ] {
            assert_eq!(site_anywhere(&p, function), expected, "{function} {preload:?}: {:#?}", p.stacks);
        }
        if preload.is_some() {
            // The probes are on the allocator's own operators: the caller of `new` is the
            // innermost frame (jemalloc's aligned ones forward to aligned_alloc: not those).
            for function in ["leak_objects()", "leak_arrays()", "leak_nothrow()"] {
                assert_eq!(site(&p, function), site_anywhere(&p, function), "{function} {preload:?}");
            }
        }

        let (mut fixture, session) = start("sample", 512 * 1024, ProbeMode::Auto);
        fixture.go();
        let p = session.snapshot(Duration::ZERO).unwrap();
        assert_eq!((p.totals.allocs, p.totals.frees), (156_400, 150_000), "{preload:?}");
        assert!(site_anywhere(&p, "leak_sampled()").0 > 0, "{preload:?}");
        let (live, truth) = (p.totals.live_bytes as f64, (6400 * 65536) as f64);
        assert!((live - truth).abs() / truth < 0.10, "{preload:?}: estimate {live} vs {truth}");
    }
}

/// Services running jemalloc or tcmalloc (LD_PRELOAD, as deployments usually do) are traced in
/// that allocator, not in libc: the first object in load order defining malloc and free. Every
/// allocation exactly, and sampled. Neither defines `reallocarray`: glibc's calls the
/// allocator's `realloc`, which is traced.
#[test]
fn preloaded_allocators_are_traced() {
    require_root();
    for lib in ["libjemalloc.so.2", "libtcmalloc_minimal.so.4"] {
        let path = Path::new("/usr/lib/x86_64-linux-gnu").join(lib);
        assert!(path.exists(), "{} missing: `cargo xtask setup` installs it", path.display());
        let real = std::fs::canonicalize(&path).unwrap();
        let start = |mode: &str, sample_bytes: u64| {
            let (fixture, session) =
                traced(&alloc_fixture(), mode, Some(lib), ProbeSettings { sample_bytes, ..Default::default() });
            assert_eq!(Path::new(session.allocator()), real);
            (fixture, session)
        };
        let (mut fixture, session) = start("basic", 0);
        // Every probe is emulated: jemalloc's free reaches its first branch at +0x30 (a
        // single-stepped free cost ~10 us per malloc+free pair, the emulated one ~1.25 us).
        let slow: Vec<_> = session.probe_sites().iter().filter(|s| !s.emulated).collect();
        assert!(slow.is_empty(), "{lib:?}: single-stepped probes {slow:#?}");
        fixture.go();
        let p = session.snapshot(Duration::ZERO).unwrap();
        let t = &p.totals;
        assert_eq!((t.allocs, t.frees, t.live_allocs, t.live_bytes), (1022, 1003, 19, 2111788), "{lib:?}");
        assert_eq!(site(&p, "leak_fixed"), (7000, 7), "{lib:?}");
        assert_eq!(p.dropped.values().sum::<u64>(), 0, "{lib:?}: {:?}", p.dropped);

        let (mut fixture, session) = start("sample", 512 * 1024);
        fixture.go();
        let p = session.snapshot(Duration::ZERO).unwrap();
        assert_eq!(p.totals.allocs, 6400 + 100_000, "{lib:?}");
        assert_eq!(site(&p, "churn_strings"), (0, 0), "{lib:?}");
        let (bytes, truth) = (site(&p, "leak_sampled").0 as f64, (6400 * 65536) as f64);
        assert!((bytes - truth).abs() / truth < 0.10, "{lib:?}: estimate {bytes} vs {truth}");
    }
}

/// Two targets traced at once (as the agent does) each see exactly their own allocations,
/// though their probes sit on the same libc instructions.
#[test]
fn two_targets_at_once() {
    require_root();
    let mut a = Fixture::start(&alloc_fixture(), "basic");
    let mut b = Fixture::start(&alloc_fixture(), "basic");
    let sa = Session::attach(a.pid, ProbeSettings::default()).unwrap();
    let sb = Session::attach(b.pid, ProbeSettings::default()).unwrap();
    a.go();
    b.go();
    for s in [&sa, &sb] {
        let p = s.snapshot(Duration::ZERO).unwrap();
        assert_eq!((p.totals.allocs, p.totals.live_bytes), (1022, 2111788), "pid {}", p.pid);
    }
    // Detaching one target leaves the other's probes working.
    let mut c = Fixture::start(&alloc_fixture(), "basic");
    let sc = Session::attach(c.pid, ProbeSettings::default()).unwrap();
    drop(sa);
    c.go();
    let p = sc.snapshot(Duration::ZERO).unwrap();
    assert_eq!((p.totals.allocs, p.totals.live_bytes), (1022, 2111788), "after another detached");
}
