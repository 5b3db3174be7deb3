//! End-to-end tests of snapshot triggers in `memscope agent` and of `--on-gc`: the real agent
//! and `memscope record` binaries against tests/fixtures/trigger_fixture.c (a leak of 80 KiB/s
//! from `leak_grow`, a cache that fills in 640 ms and then stays flat) and a real Node.js
//! process that forces a V8 garbage collection every 100 ms (tests/fixtures/node_gc.js). Need
//! root (eBPF), `cc` with <sys/sdt.h> (systemtap-sdt-dev) and `node`; they fail, not skip,
//! without them.
mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{agent::*, require_root, Fixture};
use serde_json::Value;

const MEMSCOPE: &str = env!("CARGO_BIN_EXE_memscope");

/// The trigger fixture (tests/fixtures/trigger_fixture.c), compiled once per test process.
fn trigger_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| common::build_fixture("trigger_fixture", &[])).clone()
}

/// One HTTP call to the agent with `token`; returns the status and the JSON answer.
fn http(agent: &Agent, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let url = format!("{}{path}", agent.url);
    let auth = format!("Bearer {token}");
    let result = match (method, body) {
        ("GET", _) => http.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => http.delete(&url).header("Authorization", &auth).call(),
        (_, Some(b)) => http.post(&url).header("Authorization", &auth).header("Content-Type", "application/json").send(b),
        (_, None) => http.post(&url).header("Authorization", &auth).send_empty(),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}")))
}

/// The agent's stored snapshots (`memscope snapshot list --json`), oldest first.
fn snapshot_list(agent: &Agent) -> Vec<Value> {
    let (status, out, err) = client(&agent.url, Some(READ), &["snapshot", "list", "--json"]);
    assert!(status.success(), "snapshot list: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut list = v["snapshots"].as_array().unwrap().clone();
    list.sort_by_key(|s| s["taken_at_ms"].as_u64().unwrap());
    list
}

/// Waits until the agent stores at least `n` snapshots (at most `limit`).
fn wait_for_snapshots(agent: &Agent, n: usize, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let list = snapshot_list(agent);
        if list.len() >= n {
            return list;
        }
        assert!(Instant::now() < deadline, "{} snapshots after {limit:?}, wanted {n}: {list:#?}\n{}", list.len(), agent.log().join("\n"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Gaps in ms between consecutive `taken_at_ms`.
fn gaps(list: &[Value], key: &str) -> Vec<i64> {
    list.windows(2).map(|w| w[1][key].as_i64().unwrap() - w[0][key].as_i64().unwrap()).collect()
}

fn agent_args<'a>(tokens: &'a str, data: &'a str, pid: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--tokens", tokens, "--listen", "127.0.0.1:0", "--data-dir", data, "--sampling", "full", "--pid", pid];
    args.extend_from_slice(extra);
    args
}

/// (a) The agent with `--every 300ms --min-spacing 100ms` on a `--pid` stores interval
/// snapshots about 300 ms apart, lists the trigger, and its leak report then judges the
/// fixture's leak `growing` and its filled cache `stable`.
#[test]
fn agent_interval_snapshots_and_verdicts() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path()).display().to_string();
    let data = data_dir(dir.path());
    let mut fixture = Fixture::start(&trigger_fixture(), "gc");
    let pid = fixture.pid.to_string();
    let agent = start_agent(&agent_args(&tokens, &data, &pid, &["--every", "300ms", "--min-spacing", "100ms"]))
        .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    fixture.go();

    let list = wait_for_snapshots(&agent, 10, Duration::from_secs(30));
    for s in &list {
        assert_eq!(s["reason"], "interval", "{s}");
        assert_eq!(s["pid"].as_u64(), Some(u64::from(fixture.pid)));
    }
    let g = gaps(&list, "taken_at_ms");
    // Each snapshot follows its tick after a latency that varies with the machine's load: the
    // gaps are not exactly 300 ms (a late snapshot followed by a prompt one can be closer), but
    // never under the 100 ms minimum spacing, and 300 ms typically.
    assert!(g.iter().all(|&d| d >= 100), "interval snapshots closer than --min-spacing: {g:?}");
    let mut sorted = g.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    assert!((270..=400).contains(&median), "median gap {median} ms for --every 300ms: {g:?}");

    let (status, v) = http(&agent, "GET", &format!("/v1/targets/{pid}/triggers"), READ, None);
    assert_eq!(status, 200, "{v}");
    let t = &v["triggers"][0];
    assert_eq!((t["spec"].as_str(), t["reason"].as_str(), t["origin"].as_str()), (Some("every=300ms"), Some("interval"), Some("flag")));
    assert!(t["fired"].as_u64().unwrap() >= 10, "{v}");
    assert_eq!(t["min_spacing_s"], 0.1);

    let (status, out, err) = client(&agent.url, Some(READ), &["leaks", &pid, "--min-age", "0s", "--top", "50", "--json"]);
    assert!(status.success(), "{err}");
    let leaks: Value = serde_json::from_str(&out).unwrap();
    assert!(leaks["verdict_snapshots"].as_u64().unwrap() >= 3, "{leaks:#}");
    let verdict_of = |function: &str| -> Vec<(String, f64)> {
        leaks["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["frames"][0]["function"] == function)
            .map(|l| (l["verdict"].as_str().unwrap_or("null").to_string(), l["slope_bytes_per_s"].as_f64().unwrap_or(0.0)))
            .collect()
    };
    let grow = verdict_of("leak_grow");
    assert!(!grow.is_empty(), "no leak_grow in {leaks:#}");
    for (verdict, slope) in &grow {
        assert_eq!(verdict, "growing", "{leaks:#}");
        // 4096 bytes every 50 ms: 80 KiB/s.
        assert!((*slope - 81920.0).abs() < 81920.0 * 0.2, "leak_grow slope {slope}");
    }
    for (verdict, _) in verdict_of("cache_put") {
        assert_eq!(verdict, "stable", "{leaks:#}");
    }
}

/// `--on-exit` in the agent: when the target exits, its final snapshot is stored with reason
/// `exit` and the target stays listed, not alive.
#[test]
fn agent_exit_trigger_keeps_the_target_listed() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path()).display().to_string();
    let data = data_dir(dir.path());
    let mut fixture = Fixture::start(&trigger_fixture(), "exit");
    let pid = fixture.pid.to_string();
    let agent = start_agent(&agent_args(&tokens, &data, &pid, &["--on-exit"])).unwrap();
    fixture.go();
    let list = wait_for_snapshots(&agent, 1, Duration::from_secs(20));
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["reason"], "exit");
    let (_, targets) = http(&agent, "GET", "/v1/targets", READ, None);
    let t = targets["targets"].as_array().unwrap().iter().find(|t| t["id"].as_u64() == Some(u64::from(fixture.pid))).cloned().unwrap();
    assert_eq!(t["alive"], false, "{t}");
    let (_, v) = http(&agent, "GET", &format!("/v1/targets/{pid}/triggers"), READ, None);
    assert_eq!(v["triggers"][0]["finished"], true, "{v}");
    // The stored exit snapshot still has what was allocated at exit: 5 x 1000 bytes.
    let id = list[0]["id"].as_str().unwrap();
    let (status, s) = http(&agent, "GET", &format!("/v1/snapshots/{id}?format=json"), READ, None);
    assert_eq!(status, 200);
    let at_exit: u64 = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["frames"][0]["function"] == "leak_at_exit")
        .map(|st| st["live_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(at_exit, 5000, "{s:#}");
}

/// Milliseconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339_ms(s: &str) -> i64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap_or_else(|_| panic!("bad time {s:?}"));
    assert!(s.len() == 24 && s.ends_with('Z'), "bad time {s:?}");
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000 + n(20, 23)
}

/// (b) `memscope record --on-gc` on a real Node.js process: snapshots with reason `gc` in
/// OUT/snapshots/, at least `--min-spacing` apart, the other collections counted as
/// suppressed.
#[test]
fn record_on_gc_in_node() {
    require_root();
    assert_eq!(rfc3339_ms("2026-11-24T16:05:01.250Z"), 1_795_536_301_250);
    let node = Fixture::node("node_gc.js");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(MEMSCOPE)
        .args(["record", "--pid", &node.pid.to_string(), "--on-gc", "--min-spacing", "500ms", "--duration", "3s", "--out"])
        .arg(out.path())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "record failed: {stderr}");
    let dir = out.path().join("snapshots");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().ends_with("-gc.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{} gc snapshots in 3 s: {stderr}", files.len());
    let snaps: Vec<Value> = files.iter().map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap()).collect();
    let mut taken = Vec::new();
    for s in &snaps {
        assert_eq!(s["reason"], "gc");
        let t = rfc3339_ms(s["taken_at"].as_str().unwrap());
        assert_eq!(t, s["taken_at_ms"].as_i64().unwrap());
        taken.push(t);
    }
    // Firings are at least 500 ms apart; the snapshots follow each within a few ms.
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let fired = gaps(index["snapshots"].as_array().unwrap(), "fired_at_ms");
    assert!(fired.iter().all(|&g| g >= 500), "gc firings closer than --min-spacing: {fired:?}");
    let taken_gaps: Vec<i64> = taken.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(taken_gaps.iter().all(|&g| g >= 350), "gc snapshots closer than --min-spacing: {taken_gaps:?}");
    let t = &index["triggers"][0];
    assert_eq!((t["reason"].as_str(), t["spec"].as_str()), (Some("gc"), Some("gc")));
    assert!(t["probes"].as_u64().unwrap() >= 1);
    assert!(t["suppressed"].as_u64().unwrap() > 0, "a collection every 100 ms, a snapshot every 500 ms: {t}");
    assert!(stderr.contains("gc fired"), "{stderr}");
}

/// (b) The same through the agent: `POST /v1/targets/{id}/triggers {"spec": "gc"}` on an
/// attached Node.js process stores snapshots with reason `gc`, spaced by its min_spacing.
#[test]
fn agent_gc_trigger_in_node() {
    require_root();
    let node = Fixture::node("node_gc.js");
    let pid = node.pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path()).display().to_string();
    let data = data_dir(dir.path());
    let agent = start_agent(&agent_args(&tokens, &data, &pid, &[])).unwrap();
    // A read token may not add triggers.
    let (status, v) = http(&agent, "POST", &format!("/v1/targets/{pid}/triggers"), READ, Some(r#"{"spec": "gc"}"#));
    assert_eq!(status, 403, "{v}");
    let (status, v) =
        http(&agent, "POST", &format!("/v1/targets/{pid}/triggers"), ADMIN, Some(r#"{"spec": "gc", "min_spacing": "500ms"}"#));
    assert_eq!(status, 201, "{v}");
    let tid = v["ids"][0].as_u64().unwrap();
    assert_eq!(v["triggers"][0]["reason"], "gc");
    assert!(v["triggers"][0]["probes"].as_u64().unwrap() >= 1, "{v}");

    let list = wait_for_snapshots(&agent, 4, Duration::from_secs(30));
    assert!(list.iter().all(|s| s["reason"] == "gc"), "{list:#?}");
    let g = gaps(&list, "taken_at_ms");
    assert!(g.iter().all(|&d| d >= 350), "gc snapshots closer than min_spacing 500ms: {g:?}");

    let (_, v) = http(&agent, "GET", &format!("/v1/targets/{pid}/triggers"), READ, None);
    let t = &v["triggers"][0];
    assert!(t["fired"].as_u64().unwrap() >= 4 && t["suppressed"].as_u64().unwrap() > 0, "{v}");
    let (status, _) = http(&agent, "DELETE", &format!("/v1/targets/{pid}/triggers/{tid}"), ADMIN, None);
    assert_eq!(status, 200);
    let (_, v) = http(&agent, "GET", &format!("/v1/targets/{pid}/triggers"), READ, None);
    assert_eq!(v["triggers"].as_array().unwrap().len(), 0, "{v}");
    // The stored snapshots' leak view has the gc reason and, past 3 snapshots, verdicts.
    let last = list.last().unwrap()["id"].as_str().unwrap().to_string();
    let (status, s) = http(&agent, "GET", &format!("/v1/snapshots/{last}?format=leaks"), READ, None);
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["reason"], "gc");
    assert!(s["verdict_snapshots"].as_u64().unwrap() >= 3, "{s:#}");
}

/// (c) `--on-gc` on a process without V8 fails with one clear line, in `record` and in the
/// agent (which then does not start).
#[test]
fn on_gc_without_v8_fails_with_one_line() {
    require_root();
    let fixture = Fixture::start(&trigger_fixture(), "gc");
    let pid = fixture.pid.to_string();
    let expected = format!(
        "memscope: --on-gc: no V8 garbage collector found in process {pid}'s executable or libraries (is it a Node.js process?)"
    );
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(MEMSCOPE)
        .args(["record", "--pid", &pid, "--on-gc", "--duration", "5s", "--out"])
        .arg(out.path())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().last(), Some(expected.as_str()), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path()).display().to_string();
    let data = data_dir(dir.path());
    let early = match start_agent(&agent_args(&tokens, &data, &pid, &["--on-gc"])) {
        Ok(_) => panic!("the agent started with --on-gc on a C process"),
        Err(lines) => lines,
    };
    assert!(early.lines().any(|l| l == expected), "{early}");
}
