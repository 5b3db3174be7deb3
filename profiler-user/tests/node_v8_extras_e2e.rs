//! What Node.js users expect of the V8 side, end to end with a real `node` (no flag but those
//! named) and the real agent and CLI: the heaps of `worker_threads` workers (listed per thread,
//! summarized, snapshotted), `memscope v8 ... --agent URL` answering as the local command does,
//! and the `heap_limit=PCT` trigger firing once as the heap nears its limit. Needs root and node.
mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    agent::*,
    node::{self, alive, count_in_snapshot, held, host_netns_turn, http_json, script},
    require_root, spawn_record, Fixture,
};
use profiler_user::v8::{inspector::own_listeners, workers, Budget, Thread};
use serde_json::Value;

/// One deadline for a library call's whole session.
fn budget() -> Budget {
    Budget::new(Duration::from_secs(120))
}

/// tests/fixtures/node_workers.js: one worker holding `n` WorkerHeld, the main thread 100 MainHeld.
fn node_with_worker(n: u64) -> Fixture {
    node::node("node_workers.js", &[&n.to_string()])
}

fn count(s: &Value, name: &str) -> u64 {
    s["constructors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map_or(0, |c| c["count"].as_u64().unwrap())
}

fn cli(args: &[&str]) -> (String, String) {
    let (st, out, err) = run({
        let mut c = memscope();
        c.args(args);
        c
    });
    assert!(st.success(), "memscope {args:?}: {err}");
    (out, err)
}

/// A worker holding 40k objects of a named class: the listing shows the main thread and the
/// worker (its name in the title); the worker's summary has the 40k objects and the main
/// thread's none of them (the library and `memscope v8 summary --thread`); `--thread all`
/// gives both; the worker's heap snapshot (`memscope v8 snapshot --thread ID`) holds them; a
/// sampling profile of every thread runs; an unknown worker is refused; afterwards the target
/// is alive and listens on no port.
#[test]
fn v8_worker_threads() {
    require_root();
    let _turn = host_netns_turn();
    const N: u64 = 40_000;
    let node = node_with_worker(N);
    let pid = node.pid.to_string();

    let threads = workers::threads_of(held(node.pid), "test", budget()).unwrap();
    assert_eq!(threads.len(), 2, "{threads:?}");
    assert_eq!(
        (threads[0].id.as_str(), threads[0].kind.as_str()),
        ("main", "main")
    );
    let worker = &threads[1];
    assert_eq!(worker.kind, "worker");
    assert!(
        worker.title.contains("holder") && worker.url.ends_with("node_workers.js"),
        "{worker:?}"
    );

    let w =
        workers::summaries_of(held(node.pid), &Thread::Worker(worker.id.clone()), false, "test", budget()).unwrap();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].summary.get("WorkerHeld").is_some_and(|c| c.count >= N),
        "{:?}",
        w[0].summary.get("WorkerHeld")
    );
    assert_eq!(w[0].thread.id, worker.id);
    let m = workers::summaries_of(held(node.pid), &Thread::Main, false, "test", budget()).unwrap();
    assert!(
        m[0].summary.get("WorkerHeld").is_none(),
        "the main thread's heap has WorkerHeld: {:?}",
        m[0].summary.get("WorkerHeld")
    );
    assert!(m[0].summary.get("MainHeld").is_some_and(|c| c.count >= 100));
    let missing =
        workers::summaries_of(held(node.pid), &Thread::Worker("999".into()), false, "test", budget()).unwrap_err();
    assert!(
        missing.to_string().contains("no JavaScript thread"),
        "{missing}"
    );

    let (out, _) = cli(&["v8", "threads", &pid, "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{out}");
    let (out, _) = cli(&["v8", "summary", &pid, "--thread", "all", "--json"]);
    let all: Value = serde_json::from_str(&out).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2, "{out}");
    assert_eq!(count(&all[0], "WorkerHeld"), 0);
    assert!(count(&all[1], "WorkerHeld") >= N);
    assert_eq!(all[1]["thread"]["id"], worker.id.as_str());

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.heapsnapshot");
    cli(&[
        "v8",
        "snapshot",
        &pid,
        "--thread",
        &worker.id,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(count_in_snapshot(&std::fs::read(&out).unwrap(), "WorkerHeld") >= N);
    cli(&[
        "v8",
        "profile",
        &pid,
        "--thread",
        "all",
        "--duration",
        "1s",
        "--format",
        "json",
        "-o",
        dir.path().join("p.json").to_str().unwrap(),
    ]);

    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(node.pid));
    assert_eq!(
        own_listeners(node.pid),
        Vec::<u16>::new(),
        "the target still listens"
    );
}

/// `memscope v8 summary --agent URL --token-file F PID` answers with the same classes as the
/// local command (the main thread's MainHeld, the same large constructors); `--thread ID` and
/// `threads` work through the agent too; a read token is refused a summary.
#[test]
fn v8_cli_through_the_agent() {
    require_root();
    let _turn = host_netns_turn();
    let node = node_with_worker(5000);
    let pid = node.pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let admin = token_file(
        &dir.path().join("admin").tap_mkdir(),
        &format!("ops admin {ADMIN}\n"),
        0o600,
    );
    let read = token_file(
        &dir.path().join("read").tap_mkdir(),
        &format!("viewer read {READ}\n"),
        0o600,
    );
    let a = start_agent_in(dir.path(), &["--pid", &pid]);

    let (local, _) = cli(&["v8", "summary", &pid, "--json"]);
    let (remote, _) = cli(&[
        "v8",
        "summary",
        "--agent",
        &a.url,
        "--token-file",
        admin.to_str().unwrap(),
        &pid,
        "--json",
    ]);
    let (local, remote): (Value, Value) = (
        serde_json::from_str(&local).unwrap(),
        serde_json::from_str(&remote).unwrap(),
    );
    assert_eq!(count(&local, "MainHeld"), 100);
    assert_eq!(count(&remote, "MainHeld"), 100, "{remote}");
    let big = |s: &Value| -> std::collections::BTreeSet<String> {
        s["constructors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["count"].as_u64().unwrap() >= 500)
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (lb, rb) = (big(&local), big(&remote));
    assert!(
        lb.is_subset(&rb) || rb.is_subset(&lb),
        "local {lb:?}\nremote {rb:?}"
    );
    assert_eq!(remote["thread"]["id"], "main");

    let (out, _) = cli(&[
        "v8",
        "threads",
        "--agent",
        &a.url,
        "--token-file",
        read.to_str().unwrap(),
        &pid,
        "--json",
    ]);
    let threads: Value = serde_json::from_str(&out).unwrap();
    let worker = threads[1]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let (out, _) = cli(&[
        "v8",
        "summary",
        "--agent",
        &a.url,
        "--token-file",
        admin.to_str().unwrap(),
        "--thread",
        &worker,
        &pid,
        "--json",
    ]);
    assert!(
        count(&serde_json::from_str(&out).unwrap(), "WorkerHeld") >= 5000,
        "{out}"
    );

    let (st, _, err) = run({
        let mut c = memscope();
        c.args([
            "v8",
            "summary",
            "--agent",
            &a.url,
            "--token-file",
            read.to_str().unwrap(),
            &pid,
        ]);
        c
    });
    assert!(!st.success() && err.contains("role"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Inspector sessions the agent opened to read the used heap (its audit log).
fn used_heap_sessions(a: &Agent) -> usize {
    a.log()
        .iter()
        .filter(|l| {
            l.contains("v8 inspector session")
                && l.contains("opened")
                && l.contains("the used heap")
        })
        .count()
}

/// `heap_limit=40%` on a node started with `--max-old-space-size=64` (its limit: ~112 MiB with
/// the young generation; out of memory at ~57% of it): while the heap is small, no firing and
/// no inspector session to read it (the RssAnon bound is below the threshold); as the heap
/// grows past 40% and stays there (45%, well below the ~57% where it runs out), one firing, stored as a snapshot with reason
/// `heap_limit` whose V8 summary has the used heap (>= 40%, < 100% of the limit) and the
/// Ballast objects; the target lives on.
#[test]
fn v8_heap_limit_trigger() {
    require_root();
    let _turn = host_netns_turn();
    let mut cmd = Command::new("node");
    cmd.arg("--max-old-space-size=64")
        .arg(script("node_heap_limit.js"));
    let mut node = Fixture::spawn(cmd);
    let dir = tempfile::tempdir().unwrap();
    let a = start_agent_in(dir.path(), &["--pid", &node.pid.to_string()]);
    let triggers = format!("{}/v1/targets/{}/triggers", a.url, node.pid);
    let (s, v) = http_json(
        "POST",
        &triggers,
        ADMIN,
        Some(r#"{"spec": "heap_limit=40%", "min_spacing": "1s"}"#),
    );
    assert_eq!(s, 201, "{v}");

    std::thread::sleep(Duration::from_secs(3));
    let (_, v) = http_json("GET", &triggers, READ, None);
    assert_eq!(v["triggers"][0]["fired"], 0, "{v}");
    assert_eq!(
        used_heap_sessions(&a),
        0,
        "a session was opened while far below: {:#?}",
        a.log()
    );

    let at = node.ask("grow-to 45");
    let f: Vec<u64> = at
        .strip_prefix("at ")
        .unwrap_or_else(|| panic!("fixture said {at:?}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(f[0] * 100 >= f[1] * 45, "{at}");

    // The summary follows the native snapshot; V8 walks the heap under the agent's probes.
    let deadline = Instant::now() + Duration::from_secs(180);
    let heap = loop {
        // Polled gently: the agent rate-limits each token (429 is retried).
        std::thread::sleep(Duration::from_secs(1));
        let (s, list) = http_json("GET", &format!("{}/v1/snapshots", a.url), READ, None);
        if s == 429 {
            continue;
        }
        let id = list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["reason"] == "heap_limit")
            .and_then(|s| s["id"].as_str())
            .map(str::to_string);
        if let Some(id) = id {
            let (s, v) = http_json(
                "GET",
                &format!("{}/v1/snapshots/{id}?format=leaks&top=1000", a.url),
                READ,
                None,
            );
            assert!(s == 200 || s == 429, "{s} {v}");
            if !v["v8"]["heap"].is_null() {
                let names: Vec<&str> = v["v8"]["constructors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|c| c["name"].as_str())
                    .collect();
                assert!(names.contains(&"Ballast"), "{names:?}");
                break v["v8"]["heap"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no heap_limit summary in 180 s: {:#?}",
            a.log()
        );
    };
    let (used, limit) = (
        heap["used"].as_u64().unwrap(),
        heap["limit"].as_u64().unwrap(),
    );
    assert_eq!(limit, f[1], "{heap}");
    assert!(used * 100 >= limit * 40 && used < limit, "{heap}");

    eprintln!(
        "heap_limit summary: {heap}; sessions that read the used heap: {}",
        used_heap_sessions(&a)
    );
    std::thread::sleep(Duration::from_secs(3));
    let (_, v) = http_json("GET", &triggers, READ, None);
    assert_eq!(
        v["triggers"][0]["fired"], 1,
        "fired more than once per crossing: {v}"
    );
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());
}

/// `memscope record --on-heap-limit 40%` on the same node: one snapshot with reason
/// `heap_limit` and beside it `0001-heap_limit.v8.json`, the V8 summary with the used heap
/// (>= 40% of the limit) and the Ballast objects; no second firing while the heap stays there.
#[test]
fn v8_heap_limit_with_record() {
    require_root();
    let _turn = host_netns_turn();
    let mut cmd = Command::new("node");
    cmd.arg("--max-old-space-size=64").arg(script("node_heap_limit.js"));
    let mut node = Fixture::spawn(cmd);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rec");
    let mut rec = spawn_record(node.pid, &out, &["--on-heap-limit", "40%", "--min-spacing", "1s"]);
    // The recording has started once its snapshots directory exists.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("snapshots").exists() {
        assert!(Instant::now() < deadline, "memscope record did not start");
        assert!(rec.try_wait().unwrap().is_none(), "memscope record exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = node.ask("grow-to 45");
    assert!(at.starts_with("at "), "fixture said {at:?}");
    let summary = out.join("snapshots/0001-heap_limit.v8.json");
    // V8 walks a ~55 MB heap under the recording's allocator probes: slow on a loaded machine.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    let v: Value = loop {
        if let Some(v) = std::fs::read(&summary).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            break v;
        }
        if Instant::now() > deadline {
            let _ = rec.kill();
            let mut err = String::new();
            std::io::Read::read_to_string(&mut rec.stderr.take().unwrap(), &mut err).unwrap();
            let files: Vec<_> = std::fs::read_dir(out.join("snapshots")).unwrap().flatten().map(|e| e.file_name()).collect();
            panic!("no {} in 150 s; files {files:?}; memscope record said:\n{err}", summary.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("heap_limit summary written {:?} after the heap reached 45%: {}", started.elapsed(), v["heap"]);
    let (used, limit) = (v["heap"]["used"].as_u64().unwrap(), v["heap"]["limit"].as_u64().unwrap());
    assert!(used * 100 >= limit * 40 && used < limit, "{}", v["heap"]);
    assert!(count(&v, "Ballast") > 0, "no Ballast in the summary");
    assert!(out.join("snapshots/0001-heap_limit.json").exists());
    std::thread::sleep(Duration::from_secs(3));
    assert!(!out.join("snapshots/0002-heap_limit.json").exists(), "fired twice");
    let _ = rec.kill();
    let _ = rec.wait();
    assert!(alive(node.pid));
}
