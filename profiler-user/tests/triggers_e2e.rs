//! End-to-end tests of snapshot triggers and leak verdicts: `memscope record` with trigger
//! flags on tests/fixtures/trigger_fixture.c, whose workloads have known timing (a gc cycle
//! every 500 ms, a leak of 80 KiB/s, a cache that fills in 640 ms and then stays flat, RSS
//! growing 8 MiB per 100 ms, a USDT probe with a semaphore). Most need root (CI runs them as
//! root); the fixture needs <sys/sdt.h> (Debian: systemtap-sdt-dev) and the tests fail, not
//! skip, without it.
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, OnceLock},
    thread,
    time::{Duration, Instant},
};

use common::{require_root, spawn_record, Fixture};
use profiler_user::trigger::{resolve, usdt};
use serde_json::Value;

const MEMSCOPE: &str = env!("CARGO_BIN_EXE_memscope");

/// Compiles tests/fixtures/trigger_fixture.c once per test process. nextest runs each test in
/// its own process, several at once: each compiles to a private file and renames it into
/// place, so no test ever runs a half-written binary.
fn trigger_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let mut cc = Command::new("cc")
            .args(["-E", "-x", "c", "-", "-o", "/dev/null"])
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("running cc (install gcc)");
        cc.stdin.take().unwrap().write_all(b"#include <sys/sdt.h>\n").unwrap();
        assert!(
            cc.wait().unwrap().success(),
            "<sys/sdt.h> is missing: install the Debian package systemtap-sdt-dev (the USDT fixture needs it)"
        );
        common::build_fixture("trigger_fixture", &[])
    })
    .clone()
}

/// A running trigger fixture in `mode` (see its protocol): `go` starts the workload, `ask`
/// queries it.
fn target(mode: &str) -> Fixture {
    Fixture::start(&trigger_fixture(), mode)
}

/// A running `memscope record`, its stderr collected line by line.
struct Recording {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: String,
}

impl Recording {
    /// Starts recording `pid` into `out`, and returns once the triggers are attached.
    fn start(pid: u32, out: &Path, extra: &[&str]) -> Recording {
        let args = [&["--sampling", "full", "--min-age", "0s"], extra].concat();
        let mut child = spawn_record(pid, out, &args);
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut r = Recording { child, lines, stderr: String::new() };
        r.wait_for("memscope: triggers ", Duration::from_secs(20));
        r
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.stderr.push_str(&l);
                    self.stderr.push('\n');
                }
                Err(_) => panic!("memscope never said {needle:?}; it said:\n{}", self.stderr),
            }
        }
    }

    /// Waits for memscope to end by itself; returns (exit code, stderr).
    fn wait(mut self) -> (i32, String) {
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push_str(&l);
            self.stderr.push('\n');
        }
        (status.code().unwrap_or(-1), self.stderr)
    }

    /// Ctrl-C: memscope writes its files and ends.
    fn stop(self) -> (i32, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `snapshots/index.json` and every snapshot file it lists.
fn snapshots(out: &Path) -> (Value, Vec<Value>) {
    let index = read_json(&out.join("snapshots/index.json"));
    let files = index["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| read_json(&out.join("snapshots").join(s["file"].as_str().unwrap())))
        .collect();
    (index, files)
}

/// Waits until `snapshots/index.json` lists at least `n` snapshots, at most `deadline` (then
/// returns: the assertions say what is missing). A loaded machine takes seconds per snapshot.
fn wait_for_snapshots(out: &Path, n: usize, deadline: Duration) {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        let listed = std::fs::read_to_string(out.join("snapshots/index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["snapshots"].as_array().map(Vec::len))
            .unwrap_or(0);
        if listed >= n {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Differences between consecutive `fired_at_ms` of the index, in ms.
fn gaps(index: &Value) -> Vec<u64> {
    gaps_of(index, None)
}

/// [`gaps`] of the snapshots with `reason` only (all when `None`).
fn gaps_of(index: &Value, reason: Option<&str>) -> Vec<u64> {
    let t: Vec<u64> = index["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| reason.is_none_or(|r| s["reason"] == r))
        .map(|s| s["fired_at_ms"].as_u64().unwrap())
        .collect();
    t.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Live bytes of the stacks whose innermost frame is `function`, in a leaks.json-schema value
/// (with --min-age 0s every live allocation is listed).
fn site_bytes(snapshot: &Value, function: &str) -> u64 {
    snapshot["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["frames"][0]["function"].as_str() == Some(function))
        .map(|l| l["bytes"].as_u64().unwrap())
        .sum()
}

fn leak_of<'a>(leaks: &'a Value, function: &str) -> &'a Value {
    leaks["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["frames"][0]["function"].as_str() == Some(function))
        .unwrap_or_else(|| panic!("no leak in {function}: {leaks:#}"))
}

/// `--every 300ms`: snapshots about every 300 ms, each written as `<seq>-interval.json` with
/// the leaks.json schema plus reason and taken_at, listed in index.json.
#[test]
fn interval_snapshots_fire_on_schedule() {
    require_root();
    let mut target = target("gc");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--every", "300ms", "--min-spacing", "100ms"]);
    let started = Instant::now();
    target.go();
    thread::sleep(Duration::from_millis(2000));
    // ~6 in 2 s on an idle machine; under load (load average 10 on 2 cores) one snapshot took
    // 1.4 s, so wait (bounded) for four.
    wait_for_snapshots(out.path(), 4, Duration::from_secs(30));
    let elapsed_ms = started.elapsed().as_millis() as usize;
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    let (index, snaps) = snapshots(out.path());
    let n = snaps.len();
    // Never more than the schedule allows.
    assert!(n >= 4 && n <= elapsed_ms / 300 + 2, "{n} interval snapshots in {elapsed_ms} ms: {index:#}");
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(s["reason"], "interval");
        let entry = &index["snapshots"][i];
        assert_eq!(entry["file"], format!("{:04}-interval.json", i + 1));
        assert_eq!(s["taken_at_ms"], entry["taken_at_ms"]);
        let at = s["taken_at"].as_str().unwrap();
        assert!(at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
        for key in ["pid", "totals", "dropped", "leaks", "target_exited", "verdict_snapshots"] {
            assert!(s.get(key).is_some(), "{key} missing in snapshot {}", i + 1);
        }
    }
    // Hard rules: never closer than --min-spacing, never a long stall. How close to the period
    // the gaps are is timing, not asserted (idle machine: 280-320 ms; loaded: [419, 194, 288,
    // 316, 290], and [1364, 153] with a load average of 10: a late one is followed by an early
    // one, the schedule is kept).
    let g = gaps(&index);
    assert!(g.iter().all(|&g| (100..=5000).contains(&g)), "interval gaps {g:?}");
    assert_eq!(index["triggers"][0]["reason"], "interval");
    assert_eq!(index["triggers"][0]["fired"], n as u64);
    assert!(stderr.contains(&format!("{n} triggered snapshots")), "{stderr}");
    // Later snapshots have the leak growing.
    assert!(site_bytes(&snaps[n - 1], "leak_grow") > site_bytes(&snaps[1], "leak_grow"));
}

/// `--on-return gc_cycle`: one snapshot right after each gc cycle (every 500 ms), so each sees
/// the garbage just freed (a few KiB, against ~50 KiB just before a cycle). An interval
/// trigger running at the same time, in phase with the gc cycles, does not hold them back.
#[test]
fn on_return_fires_after_each_gc_cycle() {
    require_root();
    let mut target = target("gc");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(
        target.pid,
        out.path(),
        &["--on-return", "gc_cycle", "--every", "250ms", "--min-spacing", "100ms"],
    );
    target.go();
    thread::sleep(Duration::from_millis(2300));
    let cycles = target.count("gc");
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    let (index, snaps) = snapshots(out.path());
    let gc: Vec<&Value> = snaps.iter().filter(|s| s["reason"] == "return:gc_cycle").collect();
    assert!(cycles >= 4, "only {cycles} gc cycles");
    // Every cycle's return is seen: it fires a snapshot, or is counted as suppressed when a
    // snapshot is still being taken (on a loaded 2-core machine one took 2 s: fired 1,
    // suppressed 3 for 4 cycles). On an idle machine every one fires.
    let gc_trigger = index["triggers"].as_array().unwrap().iter().find(|t| t["reason"] == "return:gc_cycle").unwrap();
    let (fired, suppressed) = (gc_trigger["fired"].as_u64().unwrap(), gc_trigger["suppressed"].as_u64().unwrap());
    assert!(
        fired + suppressed == cycles || fired + suppressed == cycles + 1,
        "{fired} gc snapshots and {suppressed} suppressed for {cycles} gc cycles: {index:#}"
    );
    assert!(!gc.is_empty() && gc.len() as u64 == fired, "{index:#}");
    // Right after a cycle the garbage is ~0, right before one ~50 KiB (1 KiB per 10 ms). What
    // grew between the firing and the moment the snapshot read the maps (`taken_at_ms`; on a
    // loaded machine that took 210 ms once with the whole suite on 2 cores, ~480 ms with the
    // hostile suite beside it) is the snapshot's latency, not the trigger's, and is taken off.
    // Each snapshot belongs to its own cycle (under a whole cycle's garbage), and on average
    // the trigger fired in the first half of the cycle. One late poll on a loaded machine
    // (29 KiB once, 30 ms after its firing) is allowed for by the average, not by each.
    let mut sum = 0.0;
    for s in &gc {
        let garbage = site_bytes(s, "garbage_alloc");
        let fired = index["snapshots"].as_array().unwrap().iter().find(|e| e["taken_at_ms"] == s["taken_at_ms"]).unwrap()["fired_at_ms"].as_u64().unwrap();
        let latency_ms = s["taken_at_ms"].as_u64().unwrap().saturating_sub(fired);
        let grown_since_firing = latency_ms * 1024 / 10;
        assert!(
            garbage < 50 * 1024 + grown_since_firing,
            "{garbage} bytes of garbage after a gc cycle, the snapshot {latency_ms} ms after the firing: {index:#}"
        );
        sum += garbage.saturating_sub(grown_since_firing) as f64;
    }
    let mean = sum / gc.len() as f64;
    assert!(mean < 25.0 * 1024.0, "{mean} bytes of garbage on average right after a gc cycle: {index:#}");
    assert!(!gc[0]["leaks"].as_array().unwrap().is_empty());
    let g = gaps_of(&index, Some("return:gc_cycle"));
    // Cycles are 500 ms apart; each firing is seen within a poll (20 ms) or later on a loaded
    // machine, so a gap can shrink or stretch by that lateness (a suppressed cycle makes one
    // gap a multiple of 500 ms).
    if suppressed == 0 {
        assert!(g.iter().all(|g| (250..=1000).contains(g)), "gc gaps {g:?}");
    }
    assert!(snaps.iter().any(|s| s["reason"] == "interval"), "the interval trigger was held back: {index:#}");
    assert_eq!(gc_trigger["probes"], 1);
    assert!(index["snapshots"].as_array().unwrap().iter().any(|s| s["file"].as_str().unwrap().ends_with("-return_gc_cycle.json")));
}

/// A function called every 10 ms with `--min-spacing 400ms`: snapshots at least 400 ms
/// apart, and every other return counted as suppressed.
#[test]
fn min_spacing_limits_a_hot_function() {
    require_root();
    let mut target = target("gc");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--on-return", "tick_fast", "--min-spacing", "400ms"]);
    let started = Instant::now();
    target.go();
    thread::sleep(Duration::from_millis(2000));
    // A loaded machine takes seconds per snapshot: wait (bounded) for a second one.
    wait_for_snapshots(out.path(), 2, Duration::from_secs(30));
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    let (index, snaps) = snapshots(out.path());
    // One snapshot per 400 ms at most.
    assert!(snaps.len() >= 2 && snaps.len() as u64 <= elapsed_ms / 400 + 2, "{} snapshots in {elapsed_ms} ms: {index:#}", snaps.len());
    for g in gaps(&index) {
        assert!(g >= 400, "gaps {:?} below the min spacing", gaps(&index));
    }
    let t = &index["triggers"][0];
    let (fired, suppressed) = (t["fired"].as_u64().unwrap(), t["suppressed"].as_u64().unwrap());
    assert_eq!(fired, snaps.len() as u64);
    // ~200 returns in 2 s (fewer when the fixture is starved of CPU); all but the fired ones
    // are suppressed.
    assert!(suppressed >= 60 && fired + suppressed <= elapsed_ms / 10 + 60, "fired {fired}, suppressed {suppressed}");
    assert!(stderr.contains(&format!("{suppressed} firings suppressed")), "{stderr}");
}

/// `--on-rss 40MiB`: exactly one snapshot, when RSS crossed 40 MiB (5 chunks of 8 MiB), not
/// at the start nor at the end (128 MiB).
#[test]
fn rss_threshold_fires_once_at_the_crossing() {
    require_root();
    let mut target = target("rss");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--on-rss", "40MiB", "--min-spacing", "50ms"]);
    target.go();
    thread::sleep(Duration::from_millis(2200));
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    let (index, snaps) = snapshots(out.path());
    assert_eq!(snaps.len(), 1, "{index:#}");
    assert_eq!(snaps[0]["reason"], "rss");
    let live = site_bytes(&snaps[0], "grow_rss");
    assert!((32 << 20..=48 << 20).contains(&live), "snapshot at the crossing saw {} MiB", live >> 20);
    let final_leaks = read_json(&out.path().join("leaks.json"));
    assert_eq!(site_bytes(&final_leaks, "grow_rss"), 128 << 20);
}

/// A fresh memory cgroup holding one process, under the process's current memory cgroup
/// (the v1 memory hierarchy on hybrid hosts, else cgroup v2); removed on drop.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    fn enter(pid: u32) -> TestCgroup {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let v1 = cgroup.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, controllers, path) = (it.next()?, it.next()?, it.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
        });
        let parent = match v1 {
            Some(path) => PathBuf::from(format!("/sys/fs/cgroup/memory{path}")),
            None => {
                let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line");
                PathBuf::from(format!("/sys/fs/cgroup{path}"))
            }
        };
        let dir = parent.join(format!("memscope-test-{pid}"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        let cg = TestCgroup { dir };
        std::fs::write(cg.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        cg
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Move anything still inside back to the parent, then remove the cgroup.
        if let (Ok(procs), Some(parent)) = (std::fs::read_to_string(self.dir.join("cgroup.procs")), self.dir.parent()) {
            for pid in procs.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}

/// `--on-rss cgroup:40MiB`: the memory charged to the target's cgroup (a fresh one, so only the
/// 8 MiB steps count) crosses 40 MiB at the 5th step: exactly one snapshot, then.
#[test]
fn cgroup_memory_threshold_fires_once() {
    require_root();
    let mut target = target("rss");
    let _cgroup = TestCgroup::enter(target.pid);
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--on-rss", "cgroup:40MiB", "--min-spacing", "50ms"]);
    target.go();
    thread::sleep(Duration::from_millis(2200));
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("rss=cgroup:41943040"), "{stderr}");
    let (index, snaps) = snapshots(out.path());
    assert_eq!(snaps.len(), 1, "{index:#}");
    assert_eq!(snaps[0]["reason"], "rss");
    let live = site_bytes(&snaps[0], "grow_rss");
    assert!((32 << 20..=48 << 20).contains(&live), "snapshot at the crossing saw {} MiB", live >> 20);
}

/// `--on-growth 20MiB`: a snapshot each time the live heap grew 20 MiB since the last one
/// (the first at 24 MiB with 8 MiB steps); `--on-growth 100%`: each time it doubled (the first
/// at 8 MiB: it needs only the 256 KiB floor). A step may be passed while a snapshot is being
/// taken (the first one is slow: a cold symbolizer, 300-400 ms in a debug build under load,
/// more on a busy 2-core machine: `[24, 112]` was seen), so later firings are checked to be at
/// least one threshold apart (the rule) and within the workload's 128 MiB; how late a firing
/// may be is a timing claim, not asserted here.
#[test]
fn growth_triggers_fire_per_step() {
    require_root();
    type Rule = fn(u64, u64) -> bool;
    let cases: [(&str, u64, Rule); 2] = [
        ("20MiB", 24, |prev, cur| cur >= prev + 20 && cur <= 128),
        ("100%", 8, |prev, cur| cur >= 2 * prev && cur <= 128),
    ];
    for (arg, first, rule) in cases {
        let mut target = target("rss");
        let out = tempfile::tempdir().unwrap();
        let rec = Recording::start(target.pid, out.path(), &["--on-growth", arg, "--min-spacing", "20ms"]);
        target.go();
        thread::sleep(Duration::from_millis(2000));
        // The workload is done growing by now; a slow first snapshot delays the next firing.
        wait_for_snapshots(out.path(), 2, Duration::from_secs(30));
        let (code, stderr) = rec.stop();
        assert_eq!(code, 0, "{stderr}");
        let (index, snaps) = snapshots(out.path());
        let mib: Vec<u64> = snaps.iter().map(|s| site_bytes(s, "grow_rss") >> 20).collect();
        assert!(snaps.iter().all(|s| s["reason"] == "growth"), "{index:#}");
        assert!(mib.len() >= 2, "--on-growth {arg}: snapshots at {mib:?} MiB");
        // The first crossing, or a step or two later when the snapshot was slow to start.
        assert!((first..=first + 16).contains(&mib[0]), "--on-growth {arg}: snapshots at {mib:?} MiB");
        assert!(mib.windows(2).all(|w| rule(w[0], w[1])), "--on-growth {arg}: snapshots at {mib:?} MiB");
    }
}

/// `--on-exit`: when the fixture exits, memscope takes the final snapshot at the exit, writes
/// it as `<seq>-exit.json` and the normal files, and exits 0.
#[test]
fn on_exit_writes_the_final_report() {
    require_root();
    let mut target = target("exit");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--on-exit"]);
    target.go();
    let (code, stderr) = rec.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("taken at its exit"), "{stderr}");
    let (index, snaps) = snapshots(out.path());
    assert_eq!(snaps.len(), 1, "{index:#}");
    assert_eq!(index["snapshots"][0]["file"], "0001-exit.json");
    assert_eq!(snaps[0]["reason"], "exit");
    assert_eq!(snaps[0]["target_exited"], true);
    assert_eq!(site_bytes(&snaps[0], "leak_at_exit"), 5000);
    let leaks = read_json(&out.path().join("leaks.json"));
    assert_eq!(leaks["target_exited"], true);
    assert_eq!(leak_of(&leaks, "leak_at_exit")["allocs"], 5);
    assert_eq!(leaks["taken_at_ms"], snaps[0]["taken_at_ms"], "the final report is the exit snapshot");
    let report = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    assert!(report.contains("leak_at_exit") && report.contains("the target exited"), "{report}");
}

/// Across ~13 interval snapshots, the 80 KiB/s leak is `growing` with a slope near 80 KiB/s,
/// and the cache that filled in the first 640 ms and then stayed flat is `stable`; leaks.json
/// and the report carry the verdicts.
#[test]
fn verdicts_tell_a_leak_from_a_cache() {
    require_root();
    let mut target = target("gc");
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(
        target.pid,
        out.path(),
        &["--every", "200ms", "--min-spacing", "50ms", "--verdict-window", "20"],
    );
    target.go();
    thread::sleep(Duration::from_millis(3000));
    // A loaded machine takes seconds per snapshot: wait (bounded) for enough for a trend.
    wait_for_snapshots(out.path(), 6, Duration::from_secs(30));
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    let leaks = read_json(&out.path().join("leaks.json"));
    let n = leaks["verdict_snapshots"].as_u64().unwrap();
    // Fewer when the machine is loaded (CI runs tests in parallel); 6 is plenty for a trend.
    assert!(n >= 6, "{n} snapshots");
    let grow = leak_of(&leaks, "leak_grow");
    assert_eq!(grow["verdict"], "growing", "{grow:#}");
    let slope = grow["slope_bytes_per_s"].as_f64().unwrap();
    // The fixture leaks on a usleep timer: a loaded machine slows it, never speeds it up.
    assert!((40.0 * 1024.0..=100.0 * 1024.0).contains(&slope), "leak slope {slope} B/s, expected ~80 KiB/s");
    assert!(grow["confidence"].as_f64().unwrap() >= 0.8, "{grow:#}");
    let cache = leak_of(&leaks, "cache_put");
    assert_eq!(cache["verdict"], "stable", "{cache:#}");
    assert!(cache["confidence"].as_f64().unwrap() >= 0.5, "{cache:#}");
    // 32 entries, or 31 when the snapshot fell between freeing the entry replaced and its
    // replacement's malloc. The live map is read while the target runs: on a loaded machine
    // the read is slow and a few replacements can happen during it (30 seen with the hostile
    // suite running beside it).
    let cache_bytes = site_bytes(&leaks, "cache_put");
    assert!((29 * 4096..=33 * 4096).contains(&cache_bytes), "cache holds {cache_bytes} bytes");
    let report = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    assert!(report.contains(&format!("Leak verdicts from growth across {n} snapshots")), "{report}");
    assert!(report.lines().any(|l| l.contains("growing") && l.contains("leak_grow")), "{report}");
    assert!(report.lines().any(|l| l.contains("stable") && l.contains("cache_put")), "{report}");
}

/// `--on-usdt memscope_fixture:tick`: the probe's semaphore is 0 before, set while memscope
/// watches (else the site is never reached) and 0 again after; a snapshot per tick (50 ms).
#[test]
fn usdt_probe_with_semaphore() {
    require_root();
    let mut target = target("usdt");
    target.go();
    assert_eq!(target.count("sem"), 0);
    let out = tempfile::tempdir().unwrap();
    let rec = Recording::start(target.pid, out.path(), &["--on-usdt", "memscope_fixture:tick", "--min-spacing", "10ms"]);
    assert_eq!(target.count("sem"), 1, "memscope enabled the semaphore");
    let started = Instant::now();
    thread::sleep(Duration::from_millis(1000));
    // ~20 in 1 s on an idle machine; a loaded one takes longer per snapshot: wait (bounded).
    wait_for_snapshots(out.path(), 12, Duration::from_secs(30));
    let elapsed_ms = started.elapsed().as_millis() as usize;
    let (code, stderr) = rec.stop();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(target.count("sem"), 0, "memscope restored the semaphore");
    let (index, snaps) = snapshots(out.path());
    let n = snaps.len();
    assert!(n >= 12 && n <= elapsed_ms / 50 + 4, "{n} snapshots for ~{} ticks: {index:#}", elapsed_ms / 50);
    assert!(snaps.iter().all(|s| s["reason"] == "usdt:memscope_fixture:tick"));
    assert!(out.path().join("snapshots/0001-usdt_memscope_fixture_tick.json").exists());
}

/// Bad trigger flags and unknown symbols or probes fail with one clear line.
#[test]
fn bad_triggers_fail_clearly() {
    require_root();
    let out = Command::new(MEMSCOPE).args(["record", "--pid", "1", "--on-growth", "lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("percentage"));
    let out = Command::new(MEMSCOPE).args(["record", "--pid", "1", "--on-usdt", "nocolon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    let mut target = target("gc");
    target.go();
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        ("--on-return", "no_such_function", "no function \"no_such_function\""),
        ("--on-usdt", "nope:never", "no USDT probe nope:never"),
    ] {
        let out = Command::new(MEMSCOPE)
            .args(["record", "--pid", &target.pid.to_string(), "--duration", "1s", flag, value, "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("memscope: ") && !l.contains("attached")).count(), 1, "{err}");
    }
}

/// Without root: the fixture's `.note.stapsdt` parses to what `readelf -n` shows, the probe
/// site is a `nop`, and the semaphore is the `memscope_fixture_tick_semaphore` symbol.
#[test]
fn usdt_notes_of_the_fixture() {
    let exe = trigger_fixture();
    let probes = usdt::probes(&exe).unwrap();
    assert_eq!(probes.len(), 1, "{probes:?}");
    let p = &probes[0];
    assert_eq!((p.provider.as_str(), p.name.as_str()), ("memscope_fixture", "tick"));
    assert!(p.args.contains('@'), "{}", p.args);
    let readelf = String::from_utf8(Command::new("readelf").arg("-n").arg(&exe).output().unwrap().stdout).unwrap();
    let line = readelf.lines().find(|l| l.contains("Location:")).expect("readelf shows the probe");
    let field = |name: &str| {
        let v = line.split(name).nth(1).unwrap().trim_start_matches([':', ' ']);
        u64::from_str_radix(v.split(',').next().unwrap().trim().trim_start_matches("0x"), 16).unwrap()
    };
    assert_eq!((p.pc, p.base, p.semaphore), (field("Location"), field("Base"), field("Semaphore")));
    let bytes = std::fs::read(&exe).unwrap();
    assert_eq!(bytes[p.file_offset as usize], 0x90, "the probe site is a nop");
    let nm = String::from_utf8(Command::new("nm").arg(&exe).output().unwrap().stdout).unwrap();
    let sem_addr = nm
        .lines()
        .find(|l| l.ends_with(" memscope_fixture_tick_semaphore"))
        .map(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap())
        .unwrap();
    assert_eq!(p.semaphore, sem_addr);
    assert!(p.semaphore_file_offset.is_some());
}

/// Without root: `--on-return` names resolve in a running fixture: its own function in the
/// executable (same offset as the exact-name resolver), a libc function in libc.
#[test]
fn return_symbols_resolve_in_the_fixture() {
    let mut target = target("gc");
    target.go();
    let found = resolve::find_function(target.pid, "gc_cycle").unwrap();
    assert_eq!(found.len(), 1);
    let exe = trigger_fixture();
    assert_eq!(Path::new(&found[0].path_in_target).file_name(), exe.file_name());
    let exact = profiler_user::bpf::elf_symbols::resolve(&exe, &["gc_cycle"]).unwrap()[0].clone().unwrap();
    assert_eq!(found[0].symbol.file_offset, exact.file_offset);
    let poll = resolve::find_function(target.pid, "poll").unwrap();
    assert!(poll[0].path_in_target.contains("libc"), "{poll:?}");
}
