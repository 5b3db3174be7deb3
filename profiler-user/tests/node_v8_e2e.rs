//! Node.js's JavaScript heap from outside, end to end: a real `node` started with no flags,
//! the real agent and CLI. Heap snapshots (streamed, shared by concurrent requests), the
//! sampling heap profiler, summaries and their growth, GC and eval, and the refusals: a read
//! token, a process that does not handle SIGUSR1, a port taken in the target's network
//! namespace. Afterwards the target is alive and listens on no port. Needs root and node.
mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    agent::*,
    node::{
        alive, count_in_snapshot, eval_tokens as tokens, host_netns_turn, http, in_own_netns, node_js_heap,
        summary_of_pid, EVAL,
    },
    require_root,
};
use profiler_user::v8::{inspector::own_listeners, summary};
use serde_json::Value;

/// A log line without its ANSI colours.
fn plain(l: &str) -> String {
    let mut out = String::new();
    let mut it = l.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn opened_sessions(log: &[String], purpose: &str) -> usize {
    log.iter().map(|l| plain(l)).filter(|l| l.contains("v8 inspector session") && l.contains("result=\"opened\"") && l.contains(purpose)).count()
}

/// Through the agent: a read token is refused for snapshots and actions; two concurrent
/// snapshot requests share one (one inspector session, the same bytes) and hold every
/// LeakyRecord; the sampling profile names the allocating function; GC works; eval is refused
/// without --allow-eval; afterwards the target is alive and listens on no port.
#[test]
fn v8_heap_through_the_agent() {
    require_root();
    let _turn = host_netns_turn();
    const N: u64 = 5000;
    let mut node = node_js_heap();
    assert_eq!(node.ask(&format!("grow {N}")), format!("grown {N}"));
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--pid", &node.pid.to_string()]).unwrap();
    let base = format!("{}/v1/targets/{}", a.url, node.pid);

    let (s, _) = http("GET", &format!("{base}/v8/heap-snapshot"), READ, None);
    assert_eq!(s, 403);
    let (s, _) = http("POST", &format!("{base}/actions/gc"), READ, None);
    assert_eq!(s, 403);
    let (s, b) = http("POST", &format!("{base}/actions/eval"), EVAL, Some(r#"{"expression": "1+1"}"#));
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("--allow-eval"));
    let (s, _) = http("POST", &format!("{base}/actions/eval"), ADMIN, Some(r#"{"expression": "1+1"}"#));
    assert_eq!(s, 403);

    let url = format!("{base}/v8/heap-snapshot?gc=true");
    let (u1, u2) = (url.clone(), url.clone());
    let t1 = std::thread::spawn(move || http("GET", &u1, ADMIN, None));
    let t2 = std::thread::spawn(move || http("GET", &u2, ADMIN, None));
    let ((s1, b1), (s2, b2)) = (t1.join().unwrap(), t2.join().unwrap());
    assert_eq!((s1, s2), (200, 200), "{} {}", String::from_utf8_lossy(&b1[..b1.len().min(300)]), String::from_utf8_lossy(&b2[..b2.len().min(300)]));
    assert!(b1 == b2, "two concurrent requests got different snapshots ({} and {} bytes)", b1.len(), b2.len());
    assert!(count_in_snapshot(&b1, "LeakyRecord") >= N);
    std::thread::sleep(Duration::from_millis(300));
    let log = a.log();
    assert_eq!(opened_sessions(&log, "heap-snapshot"), 1, "{log:#?}");

    assert_eq!(node.ask("leak on"), "leaking");
    let (s, folded) = http("GET", &format!("{base}/v8/heap-profile?seconds=2&format=folded"), READ, None);
    let folded = String::from_utf8_lossy(&folded).into_owned();
    assert_eq!(s, 200, "{folded}");
    assert!(folded.lines().any(|l| l.contains("addLeaky")), "the sampling profile does not name addLeaky:\n{folded}");
    let (s, pprof) = http("GET", &format!("{base}/v8/heap-profile?seconds=1&format=pprof"), READ, None);
    assert_eq!(s, 200);
    assert_eq!(&pprof[..2], &[0x1f, 0x8b], "pprof is gzip");

    let (s, b) = http("POST", &format!("{base}/actions/gc"), ADMIN, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new(), "the target still listens");
    assert!(node.count("count") >= N);
}

/// With --allow-eval, only a token of role eval evaluates, once per 2 s, audited with the
/// expression's hash and length (not the expression).
#[test]
fn v8_eval_needs_the_flag_and_the_role() {
    require_root();
    let _turn = host_netns_turn();
    let mut node = node_js_heap();
    assert_eq!(node.ask("grow 10"), "grown 10");
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--pid", &node.pid.to_string(), "--allow-eval"]).unwrap();
    let url = format!("{}/v1/targets/{}/actions/eval", a.url, node.pid);
    let body = r#"{"expression": "process.pid + 0.5"}"#;
    assert_eq!(http("POST", &url, READ, Some(body)).0, 403);
    assert_eq!(http("POST", &url, ADMIN, Some(body)).0, 403);
    let (s, b) = http("POST", &url, EVAL, Some(body));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["result"].as_f64(), Some(node.pid as f64 + 0.5));
    assert_eq!(http("POST", &url, EVAL, Some(body)).0, 429);
    std::thread::sleep(Duration::from_millis(300));
    let log = a.log();
    let log: Vec<String> = log.iter().map(|l| plain(l)).collect();
    let line = log.iter().find(|l| l.contains("expression_sha256")).unwrap_or_else(|| panic!("no eval audit line: {log:#?}"));
    assert!(line.contains("repl") && line.contains("expression_len=17") && line.contains("result_bytes="), "{line}");
    assert!(!line.contains("process.pid"), "the expression itself is in the log: {line}");
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());
}

/// Two summaries around growth name LeakyRecord as growing and not ChurnRecord; the CLI
/// writes a snapshot file; a process that does not handle SIGUSR1 is refused and alive.
#[test]
fn v8_summaries_cli_and_refusals() {
    require_root();
    let _turn = host_netns_turn();
    let mut node = node_js_heap();
    assert_eq!(node.ask("grow 1000"), "grown 1000");
    let before = summary_of_pid(node.pid, true, "before").unwrap();
    assert_eq!(node.ask("grow 4000"), "grown 5000");
    let after = summary_of_pid(node.pid, true, "after").unwrap();
    assert!(after.get("LeakyRecord").unwrap().count >= 5000, "{:?}", after.get("LeakyRecord"));
    let grew = summary::grew(&before, &after);
    let leaky = grew.iter().find(|g| g.name == "LeakyRecord").expect("LeakyRecord grew");
    assert!(leaky.count_delta >= 4000, "{leaky:?}");
    assert!(!grew.iter().any(|g| g.name == "ChurnRecord" && g.count_delta > 500), "ChurnRecord reported as growing: {grew:?}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("n.heapsnapshot");
    let (st, _, err) = run({
        let mut c = memscope();
        c.args(["v8", "snapshot", &node.pid.to_string(), "-o", out.to_str().unwrap()]);
        c
    });
    assert!(st.success(), "{err}");
    assert!(count_in_snapshot(&std::fs::read(&out).unwrap(), "LeakyRecord") >= 5000);
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());

    let mut sleeper = Command::new("sleep").arg("60").stdout(Stdio::null()).spawn().unwrap();
    let (st, _, err) = run({
        let mut c = memscope();
        c.args(["v8", "snapshot", &sleeper.id().to_string(), "-o", out.to_str().unwrap()]);
        c
    });
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("does not handle SIGUSR1") && err.lines().filter(|l| l.starts_with("memscope:")).count() == 1, "{err}");
    assert!(alive(sleeper.id()), "the process without a SIGUSR1 handler was killed");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// A target in a network namespace of its own is reached inside it; a port 9229 taken there
/// by another process is refused clearly, and the target stays alive.
#[test]
fn v8_in_another_network_namespace() {
    require_root();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node_js_heap.js");
    let spawn = |squat: bool| {
        let squatter = if squat {
            "node -e \"require('net').createServer().listen(9229, '127.0.0.1').unref(); setTimeout(() => {}, 60000)\" & sleep 1; "
        } else {
            ""
        };
        in_own_netns(&format!("{squatter}exec node {}", script.display()))
    };
    let mut node = spawn(false);
    assert_eq!(node.ask("grow 300"), "grown 300");
    let s = summary_of_pid(node.pid, false, "netns").unwrap();
    assert!(s.get("LeakyRecord").unwrap().count >= 300);
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());

    let node2 = spawn(true);
    let err = summary_of_pid(node2.pid, false, "netns").unwrap_err();
    assert!(err.to_string().contains("taken by another process"), "{err}");
    assert!(alive(node2.pid));
    drop(node2);
    drop(node);
}

/// With --v8-summaries, snapshots stored around growth carry V8 heap summaries: the diff (API
/// and `memscope diff`) names LeakyRecord among the constructors that grew, not ChurnRecord;
/// from the third summary on, LeakyRecord has the verdict `growing` with its confidence (as a
/// native stack would with 3 snapshots: at most 0.75) in the diff, the target's leak report
/// and the stored snapshot's, and ChurnRecord (made and dropped all the time) is not growing.
#[test]
fn v8_summaries_with_stored_snapshots_and_diff() {
    require_root();
    let _turn = host_netns_turn();
    let mut node = node_js_heap();
    assert_eq!(node.ask("grow 1000"), "grown 1000");
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--pid", &node.pid.to_string(), "--v8-summaries"]).unwrap();
    let snapshots = format!("{}/v1/targets/{}/snapshots?min_age=0s", a.url, node.pid);
    // Three summaries evenly spaced in time, the leak growing by the same step right after each,
    // so that it is linear in time as a steady leak is: a fit of 3 points has 1 degree of
    // freedom, and the middle summary off by 14% of the spacing fails the slope's
    // test. The third snapshot is started so that its summary comes as long after the second
    // as the second after the first, whatever the second's delays on a loaded machine.
    const SPACING_MS: u64 = 6000;
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let summary_ms = |id: &str| {
        let (s, b) = http("GET", &format!("{}/v1/snapshots/{id}?format=leaks", a.url), READ, None);
        assert_eq!(s, 200);
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["v8"]["taken_at_ms"].as_u64().unwrap_or_else(|| panic!("no V8 summary with {id}: {v}"))
    };
    let take = |at_ms: u64| {
        std::thread::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms())));
        let started = now_ms();
        let (s, b) = http("POST", &snapshots, ADMIN, None);
        assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
        let id = serde_json::from_slice::<Value>(&b).unwrap()["id"].as_str().unwrap().to_string();
        let at = summary_ms(&id);
        (id, started, at)
    };
    let (first, started1, t1) = take(0);
    assert_eq!(node.ask("grow 4000"), "grown 5000");
    let (second, started2, t2) = take(started1 + SPACING_MS);
    let diff = |x: &str, y: &str| {
        let (s, b) = http("GET", &format!("{}/v1/snapshots/{x}/diff/{y}", a.url), READ, None);
        assert_eq!(s, 200);
        serde_json::from_slice::<Value>(&b).unwrap()
    };
    let v = diff(&first, &second);
    let grew = v["v8"]["constructors_grew"].as_array().unwrap_or_else(|| panic!("no v8 part in the diff: {v}"));
    let leaky = grew.iter().find(|g| g["name"] == "LeakyRecord").unwrap_or_else(|| panic!("LeakyRecord not growing: {grew:?}"));
    assert!(leaky["count_delta"].as_i64().unwrap() >= 4000, "{leaky}");
    assert!(!grew.iter().any(|g| g["name"] == "ChurnRecord" && g["count_delta"].as_i64().unwrap() > 500), "{grew:?}");
    assert_eq!(v["v8"]["after"]["reason"], "api");
    // Two summaries: no verdicts yet.
    assert!(v["v8"]["verdict_snapshots"].is_null() && leaky["verdict"].is_null(), "{v}");
    let (st, out, err) = client(&a.url, Some(READ), &["diff", &first, &second]);
    assert!(st.success(), "memscope diff: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["v8"]["constructors_grew"].as_array().unwrap().iter().any(|g| g["name"] == "LeakyRecord"), "{out}");

    assert_eq!(node.ask("grow 4000"), "grown 9000");
    // Its summary due at t2 + (t2 - t1), after the delay the second had from its start.
    let (third, _, t3) = take((2 * t2).saturating_sub(t1).saturating_sub(t2.saturating_sub(started2)));
    let times = format!("summaries at +0, +{} and +{} ms", t2 - t1, t3 - t1);
    let is_growing = |c: &Value| {
        assert_eq!(c["verdict"], "growing", "{c} ({times})");
        let confidence = c["confidence"].as_f64().unwrap();
        assert!(confidence > 0.5 && confidence <= 0.75, "{c} ({times})");
        assert!(c["slope_bytes_per_s"].as_f64().unwrap() > 0.0, "{c}");
    };
    let v = diff(&first, &third);
    assert_eq!(v["v8"]["verdict_snapshots"], 3, "{v}");
    let grew = v["v8"]["constructors_grew"].as_array().unwrap();
    is_growing(grew.iter().find(|g| g["name"] == "LeakyRecord").unwrap_or_else(|| panic!("{grew:?}")));
    assert!(!grew.iter().any(|g| g["name"] == "ChurnRecord" && g["verdict"] == "growing"), "{grew:?}");
    let (st, out, err) = client(&a.url, Some(READ), &["diff", &first, &third]);
    assert!(st.success(), "memscope diff: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    is_growing(v["v8"]["constructors_grew"].as_array().unwrap().iter().find(|g| g["name"] == "LeakyRecord").unwrap());

    // The leak reports: the target's (the series as of now) and the third snapshot's.
    let leak_reports = [format!("{}/v1/targets/{}/leaks?min_age=0s&top=1000", a.url, node.pid), format!("{}/v1/snapshots/{third}?format=leaks&top=1000", a.url)];
    for url in leak_reports {
        let (s, b) = http("GET", &url, READ, None);
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap();
        let js = &v["v8"];
        assert_eq!(js["verdict_snapshots"], 3, "{url}: {js}");
        let constructors = js["constructors"].as_array().unwrap_or_else(|| panic!("{url}: no v8 part: {v}"));
        let leaky = constructors.iter().position(|c| c["name"] == "LeakyRecord").unwrap_or_else(|| panic!("{url}: {js}"));
        is_growing(&constructors[leaky]);
        assert!(constructors[..leaky].iter().all(|c| c["verdict"] == "growing"), "{url}: growing constructors are not listed first: {js}");
        assert!(constructors[leaky]["count"].as_u64().unwrap() >= 9000, "{url}: {js}");
        if let Some(churn) = constructors.iter().find(|c| c["name"] == "ChurnRecord") {
            assert_ne!(churn["verdict"], "growing", "{url}: {churn}");
        }
    }
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());
}
