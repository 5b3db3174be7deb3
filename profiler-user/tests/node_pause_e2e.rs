//! The pauses memscope imposes on a Node.js service it traces, end to end: a real `node`
//! started with no flags (a busy service, tests/fixtures/node_busy.js), the real agent with its
//! eBPF probes. While V8 walks the heap for memscope the target's allocator probes are out of
//! the process (its links released) and come back after, the gap accounted for in the targets
//! table, leaks.json and /metrics; the pause budget refuses triggered summaries past it and
//! the summaries' own garbage collections never fire the gc trigger. No timing assertion: the
//! speed of a snapshot is measured by `cargo xtask bench --v8-only`. Needs root and node.
mod common;

use std::{
    io::Read as _,
    time::{Duration, Instant},
};

use common::{
    agent::*,
    node::{self, get_json, get_text, host_netns_turn, wait_for},
    require_root, Fixture,
};
use serde_json::Value;

/// The busy service, with no flag; `keep_mb` MB of JavaScript objects kept.
fn node_busy(keep_mb: u32) -> Fixture {
    node::node("node_busy.js", &[&keep_mb.to_string()])
}

/// The target's row of `/v1/targets`.
fn target_row(base: &str, pid: u32) -> Value {
    let v = get_json(&format!("{base}/v1/targets"));
    v["targets"].as_array().unwrap().iter().find(|t| t["pid"] == pid).cloned().unwrap_or_else(|| panic!("no target {pid}: {v}"))
}

/// BPF links the agent holds (`anon_inode:bpf_link` descriptors).
fn bpf_links(agent_pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{agent_pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("bpf_link"))
        .count()
}

/// A heap snapshot through the agent takes the target's allocator probes out of the process
/// for the window and puts them back after: while the snapshot is held (the client does not
/// read, so V8 waits), the agent holds none of the target's links and the target is shown
/// paused; after, the links are back, new allocations are recorded again, and the gap is in
/// the targets table, leaks.json, /metrics and `memscope targets`. A GC through the API opens
/// a second window.
#[test]
fn v8_snapshot_suspends_the_allocator_probes() {
    require_root();
    let _turn = host_netns_turn();
    let mut node = node_busy(40);
    let dir = tempfile::tempdir().unwrap();
    let tf = standard_tokens(dir.path());
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--rate-limit", "1000", "--data-dir", &data_dir(dir.path()), "--pid", &node.pid.to_string()]).unwrap();
    let pid = node.pid;
    let allocs = || target_row(&a.url, pid)["allocs"].as_u64().unwrap();
    let first = allocs();
    wait_for(20, "the probes to record the service's allocations", || allocs() > first);
    let attached = bpf_links(a.pid());
    assert!(attached >= 1, "the agent holds no link");
    let row = target_row(&a.url, pid);
    assert_eq!(row["pauses"]["probe_gaps"]["count"], 0, "{row}");
    assert_eq!(row["pauses"]["paused"], false);

    // Read as it streams (common::node::http reads the whole body).
    let resp = node::http_agent().get(&format!("{}/v1/targets/{pid}/v8/heap-snapshot", a.url)).header("Authorization", &format!("Bearer {ADMIN}")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body().into_reader();
    let mut head = vec![0u8; 4096];
    body.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"{"), "{}", String::from_utf8_lossy(&head[..200]));
    // The snapshot is held: V8 waits for the agent, which waits for this client.
    wait_for(30, "the target's links to be released", || bpf_links(a.pid()) < attached);
    let row = target_row(&a.url, pid);
    assert_eq!(row["pauses"]["paused"], true, "{row}");
    let held = row["allocs"].as_u64().unwrap();
    let mut rest = Vec::new();
    body.read_to_end(&mut rest).unwrap();
    let total = head.len() + rest.len();
    assert!(total > 1 << 20, "a {total}-byte snapshot of a 40 MB heap");
    assert!(rest.ends_with(b"}") || rest.ends_with(b"}\n"), "the snapshot is complete");

    wait_for(30, "the target's links to come back", || bpf_links(a.pid()) == attached);
    wait_for(20, "allocations recorded again after the window", || allocs() > held);
    let row = target_row(&a.url, pid);
    let gaps = &row["pauses"]["probe_gaps"];
    assert_eq!(gaps["count"], 1, "{row}");
    assert!(gaps["total_ms"].as_u64().unwrap() > 0, "{row}");
    assert_eq!(row["pauses"]["paused"], false);

    let leaks = get_json(&format!("{}/v1/targets/{pid}/leaks?min_age=0s", a.url));
    assert_eq!(leaks["probe_gaps"]["count"], 1, "leaks.json says allocations were not seen: {}", leaks["probe_gaps"]);
    assert!(leaks["probe_gaps"]["note"].as_str().unwrap().contains("not seen"));
    let metrics = get_text(&format!("{}/metrics", a.url));
    assert!(metrics.lines().any(|l| l.starts_with("memscope_target_probe_gaps_total{") && l.ends_with(" 1")), "{metrics}");
    assert!(metrics.contains("memscope_target_suppressed_firings_total{"), "{metrics}");

    let (s, b) = node::http_json("POST", &format!("{}/v1/targets/{pid}/actions/gc", a.url), ADMIN, None);
    assert_eq!(s, 200, "{b}");
    wait_for(30, "the links to come back after the GC", || bpf_links(a.pid()) == attached);
    assert_eq!(target_row(&a.url, pid)["pauses"]["probe_gaps"]["count"], 2);
    let (st, out, err) = client(&a.url, Some(READ), &["targets"]);
    assert!(st.success(), "{err}");
    // Not a terminal: JSON (the PAUSED column of the table is checked in the client's tests).
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["targets"][0]["pauses"]["probe_gaps"]["count"], 2, "{out}");
    assert!(node.count("allocs") > 0);
}

/// A gc trigger with --v8-summaries on a busy service: each summary's own garbage
/// collections are counted as self-caused and never fire the trigger; firings past the pause
/// budget are refused and counted; the paused share stays within the budget.
#[test]
fn gc_trigger_keeps_within_the_pause_budget() {
    require_root();
    let _turn = host_netns_turn();
    let node = node_busy(5);
    let pid = node.pid;
    let dir = tempfile::tempdir().unwrap();
    let tf = standard_tokens(dir.path());
    let a = start_agent(&[
        "--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--rate-limit", "1000", "--data-dir", &data_dir(dir.path()), "--pid", &pid.to_string(),
        "--on-gc", "--min-spacing", "500ms", "--v8-summaries", "--pause-budget", "5%/5m",
    ])
    .unwrap();
    let triggers = || get_json(&format!("{}/v1/targets/{pid}/triggers", a.url));
    let gc = |v: &Value| v["triggers"].as_array().and_then(|t| t.iter().find(|t| t["spec"] == "gc").cloned()).unwrap_or_else(|| panic!("no gc trigger: {v}"));
    // Refused by the budget: the share would pass it, or (a summary slower than 12 s on a
    // loaded machine) one alone is more than the 15 s it allows.
    let refused = |t: &Value| t["suppressed_pause_budget"].as_u64().unwrap() + t["suppressed_pause_exceeds_budget"].as_u64().unwrap();
    let started = Instant::now();
    // Until the budget has refused firings and at least 20 s went by (30 s at most).
    wait_for(40, "the pause budget to refuse gc firings", || {
        let t = gc(&triggers());
        started.elapsed() > Duration::from_secs(20) && refused(&t) > 0
    });
    // No window open at the end of the check (a summary may still run).
    wait_for(30, "the last summary to end", || target_row(&a.url, pid)["pauses"]["paused"] == false);
    let t = gc(&triggers());
    let row = target_row(&a.url, pid);
    let p = &row["pauses"];
    let fired = t["fired"].as_u64().unwrap();
    assert!(fired >= 1, "{t}");
    assert!(
        t["suppressed_self_caused"].as_u64().unwrap() >= fired,
        "every summary's own GC is counted as self-caused, none fired: {t}"
    );
    assert_eq!(p["suppressed"]["pause_budget"], t["suppressed_pause_budget"], "{p} {t}");
    assert_eq!(p["suppressed"]["pause_exceeds_budget"], t["suppressed_pause_exceeds_budget"], "{p} {t}");
    assert_eq!(p["suppressed"]["self_caused_gc"], t["suppressed_self_caused"], "{p} {t}");
    assert_eq!(p["probe_gaps"]["count"].as_u64().unwrap(), fired, "one window per summary: {p} {t}");
    assert_eq!(t["pause_budget"], "5%/300s");
    // The paused share of the last 5 minutes: each summary is admitted only when its own
    // predicted pause (the target's anonymous memory times the rate learned from the previous
    // summaries, a conservative default before the first) fits in what is left of the budget.
    // A 5-minute window: one summary of this small heap took 1.7 to 5.6 s on a loaded 2-core
    // machine, past the 3 s of a 60 s window.
    assert!(p["rate_ms_per_mib"].as_f64().is_some_and(|r| r > 0.0), "a summary taught the rate: {p}");
    assert!(t["last_refusal"].as_str().is_some_and(|r| r.starts_with("pause_budget: a summary is predicted") || r.starts_with("pause_exceeds_budget: a summary is predicted")), "{t}");
    let share = p["paused_percent"].as_f64().unwrap();
    assert!(share <= 5.0, "paused {share}% of the time, budget 5%: {p}");
    let metrics = get_text(&format!("{}/metrics", a.url));
    assert!(metrics.contains("memscope_target_paused_ratio{"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("memscope_target_suppressed_firings_total{") && (l.contains("reason=\"pause_budget\"") || l.contains("reason=\"pause_exceeds_budget\"")) && !l.ends_with(" 0")),
        "{metrics}"
    );
    drop(node);
}

/// A budget smaller than what one summary of the target is predicted to take: no summary is
/// ever taken (the target is never paused), and the refusals say why, with the predicted
/// pause: `pause_exceeds_budget` in the trigger, the targets table, /metrics and the log.
#[test]
fn summary_longer_than_the_budget_is_refused_and_said() {
    require_root();
    let _turn = host_netns_turn();
    let node = node_busy(5);
    let pid = node.pid;
    let dir = tempfile::tempdir().unwrap();
    let tf = standard_tokens(dir.path());
    // 1% of 10 s: 100 ms, less than any summary of a node process (tens of MiB of anonymous
    // memory at the default rate until one is measured).
    let a = start_agent(&[
        "--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--rate-limit", "1000", "--data-dir", &data_dir(dir.path()), "--pid", &pid.to_string(),
        "--on-gc", "--min-spacing", "200ms", "--v8-summaries", "--pause-budget", "1%/10s",
    ])
    .unwrap();
    let gc = || {
        let v = get_json(&format!("{}/v1/targets/{pid}/triggers", a.url));
        v["triggers"].as_array().and_then(|t| t.iter().find(|t| t["spec"] == "gc").cloned()).unwrap_or_else(|| panic!("no gc trigger: {v}"))
    };
    wait_for(60, "gc firings refused as exceeding the budget", || gc()["suppressed_pause_exceeds_budget"].as_u64().unwrap() >= 3);
    let t = gc();
    assert_eq!(t["fired"], 0, "no summary fits: {t}");
    assert_eq!(t["suppressed_pause_budget"], 0, "{t}");
    let why = t["last_refusal"].as_str().unwrap_or_default();
    assert!(why.starts_with("pause_exceeds_budget: a summary is predicted to pause the target") && why.contains("1%/10s ever allows"), "{t}");
    let row = target_row(&a.url, pid);
    let p = &row["pauses"];
    assert_eq!(p["exceeds_budget"], true, "{p}");
    assert!(p["predicted_ms"].as_u64().unwrap() > 100, "{p}");
    assert_eq!(p["probe_gaps"]["count"], 0, "never paused: {p}");
    assert_eq!(p["paused_ms"], 0, "{p}");
    assert!(p["suppressed"]["pause_exceeds_budget"].as_u64().unwrap() >= 3, "{p}");
    let metrics = get_text(&format!("{}/metrics", a.url));
    assert!(metrics.lines().any(|l| l.starts_with("memscope_target_pause_exceeds_budget{") && l.ends_with(" 1")), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("memscope_target_suppressed_firings_total{") && l.contains("reason=\"pause_exceeds_budget\"") && !l.ends_with(" 0")), "{metrics}");
    let log = a.log();
    let said: Vec<_> = log.iter().filter(|l| l.contains("pause_exceeds_budget")).collect();
    assert_eq!(said.len(), 1, "said once, not at every firing: {said:?}");
    assert!(said[0].contains("would admit one"), "{}", said[0]);
    drop(node);
}
