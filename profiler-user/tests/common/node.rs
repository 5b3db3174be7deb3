//! Helpers of the Node.js end-to-end tests (node_v8_*_e2e.rs, node_inspector_guard_e2e.rs,
//! node_pause_e2e.rs), kept here once: the turn on the host's inspector port, the node
//! fixtures started with no flag or in a network namespace of their own, the process handles
//! the V8 functions take and a summary through them, plain HTTP to the agent with a token, the
//! `.heapsnapshot` check, and polling with a deadline.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{agent::*, Fixture};

/// The token of the `eval` role in [`eval_tokens`].
pub const EVAL: &str = "e2e-eval-token-0123456789";

/// Node's inspector listens on 9229 in the host's network namespace: tests (threads of one
/// file, or processes of other files and other sessions) that open one there take turns
/// through this lock file (an `flock`, released when the file is dropped).
pub fn host_netns_turn() -> std::fs::File {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(std::env::temp_dir().join("memscope-v8-e2e.lock")).unwrap();
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) }, 0);
    f
}

/// tests/fixtures/`name`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// tests/fixtures/`name` under node with no flag at all (as a service is started), with
/// `args`; its "ready" line read.
pub fn node(name: &str, args: &[&str]) -> Fixture {
    let mut cmd = Command::new("node");
    cmd.arg(script(name)).args(args);
    Fixture::spawn(cmd)
}

/// tests/fixtures/node_js_heap.js under node with no flag.
pub fn node_js_heap() -> Fixture {
    node("node_js_heap.js", &[])
}

/// The process running as `pid`, held by pidfd and start time (as the agent and the CLI hold
/// their targets, and the V8 functions take them).
pub fn held(pid: u32) -> Arc<profiler_user::process::Process> {
    Arc::new(profiler_user::process::Process::open(pid).unwrap())
}

/// A V8 heap summary of `pid` through [`profiler_user::v8::summary_of`] (a full GC first when
/// `gc`), within 120 s.
pub fn summary_of_pid(
    pid: u32,
    gc: bool,
    reason: &str,
) -> Result<profiler_user::v8::summary::HeapSummary, profiler_user::v8::V8Error> {
    profiler_user::v8::summary_of(held(pid), gc, reason, profiler_user::v8::Budget::new(Duration::from_secs(120)))
}

/// `sh -c "ip link set lo up; SHELL"` in a network namespace of its own (`unshare --net`),
/// started as a fixture (its "ready" line read).
pub fn in_own_netns(shell: &str) -> Fixture {
    let mut c = Command::new("unshare");
    c.args(["--net", "sh", "-c", &format!("ip link set lo up; {shell}")]);
    Fixture::spawn(c)
}

/// Whether a process `pid` exists.
pub fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Tokens of the roles read, admin and eval ([`READ`], [`ADMIN`], [`EVAL`]).
pub fn eval_tokens(dir: &Path) -> PathBuf {
    token_file(dir, &format!("viewer read {READ}\nops admin {ADMIN}\nrepl eval {EVAL}\n"), 0o600)
}

/// An HTTP client whose every request ends within 120 s, statuses returned (not errors).
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// `GET` (or, for any other `method`, `POST` of `body` as JSON, `{}` when none) of `url` with
/// `token`: the status and the whole body (up to 1 GiB: heap snapshots), within 120 s.
pub fn http(method: &str, url: &str, token: &str, body: Option<&str>) -> (u16, Vec<u8>) {
    let agent = http_agent();
    let auth = format!("Bearer {token}");
    let resp = match method {
        "GET" => agent.get(url).header("Authorization", &auth).call(),
        _ => agent.post(url).header("Authorization", &auth).content_type("application/json").send(body.unwrap_or("{}")),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.into_body().with_config().limit(1 << 30).read_to_vec().unwrap();
    (status, body)
}

/// [`http`], the body read as JSON (`null` when it is not).
pub fn http_json(method: &str, url: &str, token: &str, body: Option<&str>) -> (u16, Value) {
    let (status, body) = http(method, url, token, body);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `GET url` with the admin token, which must answer 200 with JSON.
pub fn get_json(url: &str) -> Value {
    let (status, v) = http_json("GET", url, ADMIN, None);
    assert_eq!(status, 200, "{url}: {v}");
    v
}

/// `GET url` with the admin token: the body as text, whatever the status.
pub fn get_text(url: &str) -> String {
    String::from_utf8_lossy(&http("GET", url, ADMIN, None).1).into_owned()
}

/// Checks the `.heapsnapshot` format (the node fields memscope reads, the node count) and
/// counts the objects of type `object` named `class`.
pub fn count_in_snapshot(bytes: &[u8], class: &str) -> u64 {
    let v: Value = serde_json::from_slice(bytes).expect("the heap snapshot is JSON");
    let meta = &v["snapshot"]["meta"];
    let fields: Vec<&str> = meta["node_fields"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    for f in ["type", "name", "id", "self_size", "edge_count"] {
        assert!(fields.contains(&f), "node_fields {fields:?} lacks {f}");
    }
    let types: Vec<&str> = meta["node_types"][0].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len() % fields.len(), 0);
    assert_eq!(nodes.len() / fields.len(), v["snapshot"]["node_count"].as_u64().unwrap() as usize);
    let strings = v["strings"].as_array().unwrap();
    let (ti, ni) = (fields.iter().position(|f| *f == "type").unwrap(), fields.iter().position(|f| *f == "name").unwrap());
    nodes
        .chunks(fields.len())
        .filter(|n| types[n[ti].as_u64().unwrap() as usize] == "object" && strings[n[ni].as_u64().unwrap() as usize] == class)
        .count() as u64
}

/// Waits (at most `secs`) for `cond`, polling every 100 ms; past the deadline the test fails
/// saying what it waited for.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
