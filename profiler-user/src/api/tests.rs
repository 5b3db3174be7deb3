//! Handler tests through `warp::test`, with a fake traced target that returns a fixed heap
//! profile (no eBPF): every route, the auth matrix, limits, errors and the OpenAPI document.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::Value;
use warp::{http::StatusCode, hyper::body::Bytes};

use super::{
    auth::{Auth, TokenSet},
    routes::{self, ROUTES},
    Limits, State,
};
use crate::{
    aggregate::{Frame, FrameInfo, HeapProfile, StackSample, Totals},
    bpf::attach::TriggerPoint,
    store::{Retention, SnapshotStore},
    target::{Attacher, TargetStats, TracedTarget},
    trigger::TriggerHost,
};

const READ: &str = "read-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn frame(name: &str, addr: u64) -> Frame {
    FrameInfo { function: Some(name.into()), file: Some("demo.c".into()), line: Some(7), address: addr, ..FrameInfo::default() }.into()
}

/// A profile with one leaking stack and one live, young stack.
fn sample_profile(pid: u32, scale: u64) -> HeapProfile {
    HeapProfile {
        pid,
        taken_at_ms: 1_795_536_301_000,
        duration_s: 60.0,
        min_age_s: 30.0,
        totals: Totals { live_bytes: 3072 * scale, live_allocs: 3, allocated_bytes: 8192, allocs: 10, frees: 7 },
        dropped: [("stack_map_full".to_string(), 0)].into(),
        stacks: vec![
            StackSample {
                frames: vec![frame("leaky_alloc", 0x1000), frame("main", 0x2000)],
                live_bytes: 2048 * scale,
                live_allocs: 2,
                total_bytes: 4096,
                total_allocs: 4,
                leak_bytes: 2048 * scale,
                leak_allocs: 2,
                oldest_age_s: 55.0,
            },
            StackSample {
                frames: vec![frame("cache_fill", 0x3000), frame("main", 0x2000)],
                live_bytes: 1024,
                live_allocs: 1,
                total_bytes: 4096,
                total_allocs: 6,
                leak_bytes: 0,
                leak_allocs: 0,
                oldest_age_s: 2.0,
            },
        ],
        ..HeapProfile::default()
    }
}

/// The `n`th snapshot (from 0) of the fake target: the leak grows by 2 KiB per snapshot, and
/// snapshots are one second apart.
fn fake_profile(pid: u32, n: u64) -> HeapProfile {
    let mut p = sample_profile(pid, n + 1);
    p.taken_at_ms += n * 1000;
    p
}

/// A traced target that answers a fixed profile, optionally slowly, counting snapshots. It
/// hosts triggers: probe hits and death are set by the test.
struct FakeTarget {
    pid: u32,
    delay: Duration,
    snapshots: AtomicUsize,
    dead: AtomicBool,
    hits: Mutex<Vec<u64>>,
}

impl FakeTarget {
    fn new(pid: u32, delay: Duration) -> FakeTarget {
        FakeTarget { pid, delay, snapshots: AtomicUsize::new(0), dead: AtomicBool::new(false), hits: Mutex::new(Vec::new()) }
    }
}

impl TriggerHost for FakeTarget {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }
    fn live_bytes(&self) -> u64 {
        3072
    }
    fn attach_trigger(&self, _: &str, _: u64, _: TriggerPoint) -> anyhow::Result<u32> {
        let mut h = self.hits.lock().unwrap();
        h.push(0);
        Ok(h.len() as u32 - 1)
    }
    fn trigger_hits(&self) -> anyhow::Result<Vec<u64>> {
        Ok(self.hits.lock().unwrap().clone())
    }
}

impl TracedTarget for FakeTarget {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn snapshot(&self, _min_age: Duration) -> anyhow::Result<HeapProfile> {
        let n = self.snapshots.fetch_add(1, Ordering::SeqCst) as u64;
        std::thread::sleep(self.delay);
        let mut p = fake_profile(self.pid, n);
        p.target_exited = self.dead.load(Ordering::SeqCst);
        Ok(p)
    }

    fn trigger_host(&self) -> Option<&dyn TriggerHost> {
        Some(self)
    }

    fn stats(&self) -> TargetStats {
        TargetStats {
            pid: self.pid,
            comm: "fake".into(),
            live_bytes: 3072,
            live_allocs: 3,
            allocs: 10,
            frees: 7,
            dropped: [("stack_map_full".to_string(), 1)].into(),
            unwind: [("truncated_no_cfi".to_string(), 2)].into(),
            unwind_tables: None,
            memory_budget: None,
            sample_bytes: 0,
            probe_cost: None,
            probe_mode: "session".into(),
            source: "allocator".into(),
            alive: !self.dead.load(Ordering::SeqCst),
            labels: Default::default(),
            pauses: None,
            coverage: None,
            runtime_heap: None,
        }
    }
}

struct FakeAttacher {
    delay: Duration,
}

impl Attacher for FakeAttacher {
    fn attach(&self, pid: u32) -> anyhow::Result<Arc<dyn TracedTarget>> {
        Ok(Arc::new(FakeTarget::new(pid, self.delay)))
    }
}

/// The pid of the fake target attached at start (any number works for the fake).
const PID: u32 = 4242;

struct Fixture {
    state: Arc<State>,
    target: Arc<FakeTarget>,
    _dir: tempfile::TempDir,
}

fn generous() -> Limits {
    Limits {
        unauth_per_sec: 10_000.0,
        unauth_burst: 10_000,
        unauth_per_address_per_sec: 10_000.0,
        unauth_per_address_burst: 10_000,
        token_per_sec: 10_000.0,
        token_burst: 10_000,
        auth_failures_per_min: 10_000.0,
        auth_failures_burst: 10_000,
        max_expensive: 4,
        ..Limits::default()
    }
}

fn fixture_with(limits: Limits, delay: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenSet::parse(&format!("viewer read {READ}\nops admin {ADMIN}\n"), Path::new("t")).unwrap();
    let (store, _) = SnapshotStore::open(&dir.path().join("data"), Retention::default()).unwrap();
    let state = Arc::new(State::new(
        Arc::new(Auth::from_set(tokens)),
        Arc::new(FakeAttacher { delay }),
        Arc::new(store),
        limits,
        vec![],
    ));
    let target = Arc::new(FakeTarget::new(PID, delay));
    state.insert_target(target.clone());
    crate::agent::workloads::adopt_for_test(&state, PID, WORKLOAD, &dir.path().join("data"));
    Fixture { state, target, _dir: dir }
}

fn fixture() -> Fixture {
    fixture_with(generous(), Duration::ZERO)
}

struct Resp {
    status: StatusCode,
    headers: warp::http::HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// An error answer: JSON with `error` and `code`; returns the code.
    fn code(&self) -> String {
        assert_eq!(self.headers["content-type"], "application/json", "{:?}", self.body);
        let v = self.json();
        assert!(v["error"].is_string(), "{v}");
        v["code"].as_str().unwrap().to_string()
    }

    fn content_type(&self) -> &str {
        self.headers.get("content-type").map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

async fn call(state: &Arc<State>, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> Resp {
    let mut req = warp::test::request()
        .method(method)
        .path(path)
        .remote_addr(SocketAddr::from(([192, 0, 2, 1], 40000)));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let filter = routes::routes(state.clone());
    let r = req.reply(&filter).await;
    Resp { status: r.status(), headers: r.headers().clone(), body: r.body().clone() }
}

async fn get(state: &Arc<State>, path: &str, token: Option<&str>) -> Resp {
    call(state, "GET", path, token, None).await
}

async fn take_snapshot(state: &Arc<State>) -> String {
    let r = call(state, "POST", &format!("/v1/targets/{PID}/snapshots"), Some(ADMIN), None).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

/// A concrete path for a route template.
fn concrete(template: &str, sid: &str) -> String {
    template
        .replace("{id}", &PID.to_string())
        .replace("{sid}", sid)
        .replace("{a}", sid)
        .replace("{b}", sid)
        .replace("{tid}", "1")
        .replace("{wid}", WORKLOAD)
}

/// The workload the fixture's target is the process of.
const WORKLOAD: &str = "fake-000000000001";

fn needed_role(method: &str, template: &str) -> Option<&'static str> {
    match (method, template) {
        ("GET", "/healthz" | "/readyz" | "/v1/openapi.json") => None,
        ("GET", t) if t.ends_with("/v8/heap-snapshot") || t.ends_with("/v8/summary") => Some("admin"),
        (_, t) if t.ends_with("/actions/eval") => Some("eval"),
        ("GET", _) => Some("read"),
        _ => Some("admin"),
    }
}

/// Health checks answer without a token and show no data.
#[tokio::test]
async fn health_checks_need_no_token() {
    let f = fixture();
    let r = get(&f.state, "/healthz", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let r = get(&f.state, "/readyz", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert!(!String::from_utf8_lossy(&r.body).contains("fake"), "readyz shows no target data");
}

/// `/readyz` repeats start-up warnings (an insecure remote listener).
#[tokio::test]
async fn readyz_shows_warnings() {
    let f = fixture();
    let mut state = Arc::try_unwrap(f.state).ok().unwrap();
    state.warnings.push("listening on non-loopback address without TLS".into());
    let state = Arc::new(state);
    let r = get(&state, "/readyz", None).await;
    assert!(r.json()["warnings"][0].as_str().unwrap().contains("without TLS"));
}

/// The auth matrix over every protected route: no token, a malformed header, a wrong token,
/// a read token on admin routes, and the right token.
#[tokio::test]
async fn auth_matrix_on_every_route() {
    let f = fixture();
    let sid = take_snapshot(&f.state).await;
    for &(method, template) in ROUTES {
        let Some(role) = needed_role(method, template) else { continue };
        let path = concrete(template, &sid);
        let what = format!("{method} {template}");

        let r = call(&f.state, method, &path, None, None).await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::UNAUTHORIZED, "missing_token"), "{what}");
        assert!(r.headers.contains_key("www-authenticate"), "{what}");

        for malformed in [format!("Basic {ADMIN}"), "Bearer".to_string(), format!("Bearer {ADMIN} x")] {
            let r = warp::test::request()
                .method(method)
                .path(&path)
                .header("authorization", malformed)
                .reply(&routes::routes(f.state.clone()))
                .await;
            assert_eq!(r.status(), 401, "{what}");
            let v: Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(v["code"], "malformed_authorization", "{what}");
        }

        let r = call(&f.state, method, &path, Some("wrong-token-0123456789abcdef"), None).await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::UNAUTHORIZED, "invalid_token"), "{what}");
        assert!(!String::from_utf8_lossy(&r.body).contains("wrong-token"), "{what}: token echoed");

        let body = (method == "POST" && template == "/v1/targets")
            .then(|| format!("{{\"pid\": {}}}", std::process::id()).into_bytes());
        let r = call(&f.state, method, &path, Some(READ), body.as_deref()).await;
        if template.contains("/v8/") || template.contains("/actions/") {
            // Need a Node.js target: tests/node_v8_e2e.rs.
            if role != "read" {
                assert_eq!((r.status, r.code().as_str()), (StatusCode::FORBIDDEN, "forbidden"), "{what}");
            }
        } else if role == "admin" {
            assert_eq!((r.status, r.code().as_str()), (StatusCode::FORBIDDEN, "forbidden"), "{what}");
        } else {
            assert!(r.status.is_success(), "{what}: read token got {} {:?}", r.status, r.body);
        }
    }
    // Admin tokens may do everything, in an order where each route has something to act on.
    let me = std::process::id();
    let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(format!("{{\"pid\": {me}}}").as_bytes())).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    for &(method, template) in ROUTES {
        if method == "GET" && !template.contains("/v8/") {
            let r = get(&f.state, &concrete(template, &sid), Some(ADMIN)).await;
            assert!(r.status.is_success(), "GET {template} with admin: {} {:?}", r.status, r.body);
        }
    }
    let r = call(&f.state, "DELETE", &format!("/v1/snapshots/{sid}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 200);
    let r = call(&f.state, "DELETE", &format!("/v1/targets/{me}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 200);
}

/// Every route of the router is in openapi.json and every path there is a route; the router
/// serves each route (none answers 404 "no such route" or 405); the document is served as is.
#[tokio::test]
async fn openapi_matches_router() {
    let doc: Value = serde_json::from_str(routes::OPENAPI).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for &(method, template) in ROUTES {
        let ops = paths.get(template).unwrap_or_else(|| panic!("{template} missing from openapi.json"));
        assert!(ops.get(method.to_lowercase()).is_some(), "{method} {template} missing from openapi.json");
    }
    for (path, ops) in paths {
        for (m, _) in ops.as_object().unwrap() {
            let m = m.to_uppercase();
            assert!(ROUTES.contains(&(m.as_str(), path.as_str())), "openapi.json documents {m} {path}, not a route");
        }
    }
    let f = fixture();
    let sid = take_snapshot(&f.state).await;
    for &(method, template) in ROUTES {
        let r = call(&f.state, method, &concrete(template, &sid), Some(ADMIN), Some(b"{\"pid\": 1}")).await;
        let unrouted = r.status == 405 || (r.status == 404 && r.json()["code"] == "not_found");
        assert!(!unrouted, "{method} {template} is not served: {} {:?}", r.status, r.body);
    }
    let r = get(&f.state, "/v1/openapi.json", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), doc);
}

/// Unknown routes answer 404 JSON, a wrong method 405 JSON.
#[tokio::test]
async fn unknown_route_and_wrong_method_are_json() {
    let f = fixture();
    let r = get(&f.state, "/nope", Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let r = get(&f.state, "/v1/targets/not-a-pid/heap", Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let r = call(&f.state, "PUT", "/v1/targets", Some(ADMIN), None).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    let r = call(&f.state, "POST", "/healthz", None, None).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    let r = call(&f.state, "DELETE", "/v1/snapshots", Some(ADMIN), None).await;
    assert_eq!(r.status, 405);
}

/// Attach, list, conflict, detach; bad bodies and missing processes.
#[tokio::test]
async fn targets_attach_list_detach() {
    let f = fixture();
    let me = std::process::id();
    let body = format!("{{\"pid\": {me}}}");
    let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(body.as_bytes())).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.json()["id"], me);
    let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(body.as_bytes())).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::CONFLICT, "already_attached"));

    let r = get(&f.state, "/v1/targets", Some(READ)).await;
    let v = r.json();
    let mut ids: Vec<u64> = v["targets"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    ids.sort();
    let mut expected = vec![u64::from(PID), u64::from(me)];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(v["targets"][0]["comm"], "fake");
    assert_eq!(v["targets"][0]["dropped"]["stack_map_full"], 1);

    for bad in [&b"not json"[..], b"{}", b"{\"pid\": -1}", b"{\"pid\": 1, \"x\": 2}", b"{\"pid\": 0}"] {
        let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(bad)).await;
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(bad));
        r.code();
    }
    let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(b"{\"pid\": 4000000000}")).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "no_such_process"));

    let r = call(&f.state, "DELETE", &format!("/v1/targets/{me}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 200);
    let r = call(&f.state, "DELETE", &format!("/v1/targets/{me}"), Some(ADMIN), None).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "target_not_found"));
    let r = get(&f.state, &format!("/v1/targets/{me}/heap"), Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "target_not_found"));
}

/// The live heap in every format, with the right content types; bad queries are 400.
#[tokio::test]
async fn heap_in_every_format() {
    let f = fixture();
    for format in ["json", "pprof", "folded", "svg", "text"] {
        let r = get(&f.state, &format!("/v1/targets/{PID}/heap?format={format}"), Some(READ)).await;
        assert_eq!(r.status, 200, "{format}: {:?}", r.body);
        assert!(!r.body.is_empty(), "{format}");
        let expected = crate::render::Format::parse(format).unwrap().content_type();
        assert_eq!(r.content_type(), expected, "{format}");
        assert_eq!(r.headers["cache-control"], "no-store");
    }
    let r = get(&f.state, &format!("/v1/targets/{PID}/heap"), Some(READ)).await;
    assert_eq!(r.content_type(), "application/json");
    let folded = get(&f.state, &format!("/v1/targets/{PID}/heap?format=folded&measure=leaks"), Some(READ)).await;
    assert!(String::from_utf8_lossy(&folded.body).contains("leaky_alloc"));
    for bad in ["format=gif", "measure=weight", "min_age=forever", "min_age=-1s", "color=red", "format=json&format=svg"] {
        let r = get(&f.state, &format!("/v1/targets/{PID}/heap?{bad}"), Some(READ)).await;
        assert_eq!(r.status, 400, "{bad}");
        r.code();
    }
}

/// The leak report has leaks.json's schema; top and min_age are checked.
#[tokio::test]
async fn leaks_report() {
    let f = fixture();
    let r = get(&f.state, &format!("/v1/targets/{PID}/leaks?min_age=30s&top=5"), Some(READ)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.content_type(), "application/json");
    let mut expected = crate::render::json::leaks_json(&sample_profile(PID, 1), Some(5));
    // No stored snapshots yet: verdict keys are null.
    crate::aggregate::growth::annotate_leaks_json(&mut expected, &Default::default());
    assert_eq!(r.json(), expected);
    assert!(r.json()["leaks"][0]["verdict"].is_null() && r.json()["verdict_snapshots"].is_null());
    for bad in ["top=0", "top=many", "top=100000", "min_age=1y"] {
        let r = get(&f.state, &format!("/v1/targets/{PID}/leaks?{bad}"), Some(READ)).await;
        assert_eq!(r.status, 400, "{bad}");
    }
}

/// Flamegraphs of each kind are SVG with a restrictive CSP.
#[tokio::test]
async fn flamegraph_kinds() {
    let f = fixture();
    for kind in ["inuse", "alloc", "leaks"] {
        let r = get(&f.state, &format!("/v1/targets/{PID}/flamegraph.svg?kind={kind}"), Some(READ)).await;
        assert_eq!(r.status, 200, "{kind}: {:?}", r.body);
        assert_eq!(r.content_type(), "image/svg+xml");
        assert!(String::from_utf8_lossy(&r.body).contains("<svg"));
        assert!(r.headers["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    }
    let r = get(&f.state, &format!("/v1/targets/{PID}/flamegraph.svg?kind=bogus"), Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "bad_measure"));
}

/// Take, list, fetch in each format, diff in each format, delete.
#[tokio::test]
async fn snapshots_lifecycle_and_diff() {
    let f = fixture();
    let a = take_snapshot(&f.state).await;
    let b = take_snapshot(&f.state).await;
    assert!(a.contains(&format!("-{PID}-")), "{a}");
    assert_ne!(a, b);

    let r = get(&f.state, "/v1/snapshots", Some(READ)).await;
    let v = r.json();
    assert_eq!(v["count"], 2);
    assert_eq!(v["snapshots"][0]["id"], b.as_str(), "newest first");
    assert_eq!(v["snapshots"][0]["reason"], "api");
    assert_eq!(v["snapshots"][0]["comm"], "fake");
    assert!(v["snapshots"][0]["size_bytes"].as_u64().unwrap() > 0);

    for format in ["json", "pprof", "folded", "svg", "text"] {
        let r = get(&f.state, &format!("/v1/snapshots/{a}?format={format}"), Some(READ)).await;
        assert_eq!(r.status, 200, "{format}: {:?}", r.body);
    }
    for (format, ct) in [("json", "application/json"), ("svg", "image/svg+xml"), ("folded", "text/plain")] {
        let r = get(&f.state, &format!("/v1/snapshots/{a}/diff/{b}?format={format}"), Some(READ)).await;
        assert_eq!(r.status, 200, "{format}: {:?}", r.body);
        assert!(r.content_type().starts_with(ct), "{format}: {}", r.content_type());
    }
    let r = get(&f.state, &format!("/v1/snapshots/{a}/diff/{b}"), Some(READ)).await;
    let expected = crate::render::json::diff_json(&fake_profile(PID, 0), &fake_profile(PID, 1), Some(20));
    assert_eq!(r.json(), expected);
    let r = get(&f.state, &format!("/v1/snapshots/{a}/diff/{b}?format=pprof"), Some(READ)).await;
    assert_eq!(r.status, 400);

    let r = call(&f.state, "DELETE", &format!("/v1/snapshots/{a}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["deleted"], a.as_str());
    let r = get(&f.state, &format!("/v1/snapshots/{a}"), Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "snapshot_not_found"));
    let r = get(&f.state, &format!("/v1/snapshots/{a}/diff/{b}"), Some(READ)).await;
    assert_eq!(r.status, 404);
    let r = call(&f.state, "DELETE", &format!("/v1/snapshots/{a}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 404);
    let r = call(&f.state, "POST", "/v1/targets/999999/snapshots", Some(ADMIN), None).await;
    assert_eq!(r.status, 404);
}

/// Snapshot ids that try to leave the store are refused (400, or 404 when the path does not
/// even match a route), on every route that takes one.
#[tokio::test]
async fn snapshot_id_traversal_is_refused() {
    let f = fixture();
    let good = take_snapshot(&f.state).await;
    let long = "9".repeat(300);
    let attempts = [
        "..%2F..%2Fetc%2Fpasswd",
        "..%2F..",
        "%2e%2e",
        "..",
        "20261124T160501Z-1-1.json.gz",
        "20261124T160501Z-1-1%00",
        long.as_str(),
    ];
    for bad in attempts {
        for (method, path) in [
            ("GET", format!("/v1/snapshots/{bad}")),
            ("DELETE", format!("/v1/snapshots/{bad}")),
            ("GET", format!("/v1/snapshots/{bad}/diff/{good}")),
            ("GET", format!("/v1/snapshots/{good}/diff/{bad}")),
        ] {
            let r = call(&f.state, method, &path, Some(ADMIN), None).await;
            assert!(r.status == 400 || r.status == 404, "{method} {path}: {}", r.status);
            r.code();
        }
    }
    for path in ["/v1/snapshots/../../etc/passwd", "/v1/snapshots/a/../../b"] {
        let r = get(&f.state, path, Some(ADMIN)).await;
        assert_eq!(r.status, 404, "{path}");
    }
    let r = get(&f.state, "/v1/snapshots/..%2F..%2Fetc%2Fpasswd", Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "invalid_snapshot_id"));
    // The store still holds exactly the one good snapshot.
    assert_eq!(f.state.store.list().len(), 1);
}

/// Bodies over 16 KiB are refused with 413, by Content-Length before anything else, and while
/// streaming when there is no Content-Length.
#[tokio::test]
async fn big_body_is_413() {
    let f = fixture();
    let big = vec![b' '; 17 * 1024];
    let r = call(&f.state, "POST", "/v1/targets", Some(ADMIN), Some(&big)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    let r = call(&f.state, "POST", "/v1/targets", None, Some(&big)).await;
    assert_eq!(r.status, 413, "size is checked before the token");
    let r = call(&f.state, "POST", &format!("/v1/targets/{PID}/snapshots"), Some(ADMIN), Some(&big)).await;
    assert_eq!(r.status, 413);
    // Without Content-Length: the stream is cut at the limit.
    let chunks = futures_util::stream::iter((0..20).map(|_| Ok::<_, warp::Error>(Bytes::from(vec![b'x'; 1024]))));
    let err = super::routes::collect_limited(chunks, 16 * 1024).await.unwrap_err();
    assert_eq!(err.status, 413);
    let small = futures_util::stream::iter((0..3).map(|_| Ok::<_, warp::Error>(Bytes::from(vec![b'x'; 1024]))));
    assert_eq!(super::routes::collect_limited(small, 16 * 1024).await.unwrap().len(), 3072);
}

/// Past the per-token limit: 429 with Retry-After, at once; /healthz still answers; another
/// token is not affected.
#[tokio::test]
async fn per_token_rate_limit() {
    let limits = Limits { token_per_sec: 0.1, token_burst: 3, ..generous() };
    let f = fixture_with(limits, Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(get(&f.state, "/v1/targets", Some(READ)).await.status, 200);
    }
    let r = get(&f.state, "/v1/targets", Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&after), "{after}");
    assert_eq!(get(&f.state, "/healthz", None).await.status, 200);
    assert_eq!(get(&f.state, "/readyz", None).await.status, 200);
    assert_eq!(get(&f.state, "/v1/targets", Some(ADMIN)).await.status, 200);
}

/// Past the agent-wide unauthenticated budget, requests without a valid token get 429 with
/// Retry-After, while valid tokens and the health checks are still served (issue 18: a flood
/// to a path that does not exist made the admin's requests 429).
#[tokio::test]
async fn unauthenticated_budget_spares_tokens_and_health() {
    let limits = Limits { unauth_per_sec: 0.1, unauth_burst: 2, ..generous() };
    let f = fixture_with(limits, Duration::ZERO);
    assert_eq!(get(&f.state, "/nope", None).await.status, 404);
    assert_eq!(get(&f.state, "/v1/targets", Some("wrong-token-0123456789")).await.status, 401);
    let r = get(&f.state, "/nope", None).await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(get(&f.state, "/v1/openapi.json", None).await.status, 429);
    for _ in 0..20 {
        assert_eq!(get(&f.state, "/v1/targets", Some(ADMIN)).await.status, 200);
        assert_eq!(get(&f.state, "/nope", Some(READ)).await.status, 404, "a valid token is not refused");
        assert_eq!(get(&f.state, "/healthz", None).await.status, 200);
        assert_eq!(get(&f.state, "/readyz", None).await.status, 200);
    }
}

/// Failed authentications are limited per remote IP: after the burst that IP's wrong tokens
/// get 429, while a valid token from the same IP is served (on loopback every local user
/// shares the address) and other IPs are unaffected.
#[tokio::test]
async fn auth_failures_limited_per_ip() {
    let limits = Limits { auth_failures_per_min: 1.0, auth_failures_burst: 3, ..generous() };
    let f = fixture_with(limits, Duration::ZERO);
    let filter = routes::routes(f.state.clone());
    let from = |ip: [u8; 4], token: &str| {
        warp::test::request()
            .path("/v1/targets")
            .remote_addr(SocketAddr::from((ip, 5555)))
            .header("authorization", format!("Bearer {token}"))
    };
    for _ in 0..3 {
        assert_eq!(from([198, 51, 100, 7], "guess-0123456789abcdef").reply(&filter).await.status(), 401);
    }
    let r = from([198, 51, 100, 7], "guess-0123456789abcdef").reply(&filter).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    for _ in 0..10 {
        assert_eq!(from([198, 51, 100, 7], READ).reply(&filter).await.status(), 200);
    }
    assert_eq!(from([198, 51, 100, 8], "guess-0123456789abcdef").reply(&filter).await.status(), 401);
}

/// Requests without a valid token from one address use up that address's budget only: other
/// addresses without a token, and valid tokens from the same address, are served.
#[tokio::test]
async fn unauthenticated_budget_per_address() {
    let limits = Limits { unauth_per_address_per_sec: 0.1, unauth_per_address_burst: 2, ..generous() };
    let f = fixture_with(limits, Duration::ZERO);
    let filter = routes::routes(f.state.clone());
    let from = |ip: [u8; 4], token: Option<&str>| {
        let r = warp::test::request().path("/v1/openapi.json").remote_addr(SocketAddr::from((ip, 5555)));
        match token {
            Some(t) => r.header("authorization", format!("Bearer {t}")),
            None => r,
        }
    };
    for _ in 0..2 {
        assert_eq!(from([127, 0, 0, 1], None).reply(&filter).await.status(), 200);
    }
    assert_eq!(from([127, 0, 0, 1], None).reply(&filter).await.status(), 429);
    assert_eq!(from([127, 0, 0, 1], Some(ADMIN)).reply(&filter).await.status(), 200);
    assert_eq!(from([127, 0, 0, 2], None).reply(&filter).await.status(), 200);
}

/// Identical concurrent requests share one snapshot and render.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_share_one_render() {
    let f = fixture_with(generous(), Duration::from_millis(300));
    let path = format!("/v1/targets/{PID}/flamegraph.svg?kind=leaks");
    let (r1, r2, r3) =
        tokio::join!(get(&f.state, &path, Some(READ)), get(&f.state, &path, Some(READ)), get(&f.state, &path, Some(ADMIN)));
    assert_eq!((r1.status, r2.status, r3.status), (StatusCode::OK, StatusCode::OK, StatusCode::OK));
    assert_eq!(r1.body, r2.body);
    assert_eq!(f.target.snapshots.load(Ordering::SeqCst), 1);
    // Afterwards a new request renders again.
    get(&f.state, &path, Some(READ)).await;
    assert_eq!(f.target.snapshots.load(Ordering::SeqCst), 2);
}

/// When the cap on expensive work is full, a different expensive request gets 503 with
/// Retry-After at once, and cheap routes still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expensive_cap_answers_503_at_once() {
    let limits = Limits { max_expensive: 1, ..generous() };
    let f = fixture_with(limits, Duration::from_millis(500));
    let st = f.state.clone();
    let slow = tokio::spawn(async move { get(&st, &format!("/v1/targets/{PID}/heap"), Some(READ)).await });
    while f.state.flights.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = std::time::Instant::now();
    let r = get(&f.state, &format!("/v1/targets/{PID}/leaks"), Some(READ)).await;
    assert!(started.elapsed() < Duration::from_millis(250), "answered at once");
    assert_eq!((r.status, r.code().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "busy"));
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(get(&f.state, "/v1/targets", Some(READ)).await.status, 200);
    assert_eq!(get(&f.state, "/healthz", None).await.status, 200);
    assert_eq!(slow.await.unwrap().status, 200);
}

/// An expensive request past the request timeout answers 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_render_times_out() {
    let limits = Limits { request_timeout: Duration::from_millis(100), ..generous() };
    let f = fixture_with(limits, Duration::from_millis(600));
    let r = get(&f.state, &format!("/v1/targets/{PID}/heap"), Some(READ)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "timeout"));
    assert!(r.headers.contains_key("retry-after"));
}

/// Metrics need a read token and show targets, the agent itself and requests by route.
#[tokio::test]
async fn metrics_exposition() {
    let f = fixture();
    assert_eq!(get(&f.state, "/metrics", None).await.status, 401);
    get(&f.state, &format!("/v1/targets/{PID}/leaks"), Some(READ)).await;
    let r = get(&f.state, "/metrics", Some(READ)).await;
    assert_eq!(r.status, 200);
    assert!(r.content_type().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for needle in [
        // A workload's process: its workload's labels, no pid.
        "memscope_target_live_bytes{node=\"n1\",workload=\"fake-000000000001\"} 3072",
        "memscope_target_events_total{node=\"n1\",workload=\"fake-000000000001\",kind=\"alloc\"} 10",
        "memscope_target_dropped_events_total{node=\"n1\",workload=\"fake-000000000001\",reason=\"stack_map_full\"} 1",
        "memscope_workloads{state=\"attached\"} 1",
        "memscope_workloads{state=\"waiting\"} 0",
        "memscope_agent_targets 1",
        "memscope_agent_max_targets 256",
        "memscope_workload_attach_failures_total 0",
        "memscope_agent_cpu_seconds_total",
        "memscope_agent_resident_bytes",
        "memscope_http_requests_total{method=\"GET\",route=\"/v1/targets/{id}/leaks\",status=\"200\"} 1",
        "memscope_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"401\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

/// The audit log names the token and role for admin actions and denials, never the token.
#[tokio::test]
async fn audit_log_names_never_tokens() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    // A dynamic filter (interest "sometimes"): the callsite interest that tests running on
    // other threads without a subscriber cache cannot switch these events off.
    use tracing_subscriber::{layer::SubscriberExt as _, Layer as _};
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == "audit" && *m.level() <= tracing::Level::INFO)),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture();
    take_snapshot(&f.state).await;
    call(&f.state, "POST", &format!("/v1/targets/{PID}/snapshots"), Some(READ), None).await;
    get(&f.state, "/v1/targets", Some("wrong-token-0123456789abcdef")).await;
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.iter().any(|l| l.contains("admin action") && l.contains("token=ops") && l.contains("result=\"ok\"")
        || l.contains("admin action") && l.contains("token=ops") && l.contains("result=ok")), "{log}");
    assert!(lines.iter().any(|l| l.contains("request denied") && l.contains("viewer") && l.contains("403")), "{log}");
    assert!(lines.iter().any(|l| l.contains("request denied") && l.contains("invalid_token")), "{log}");
    for secret in [READ, ADMIN, "wrong-token"] {
        assert!(!log.contains(secret), "token in the audit log:\n{log}");
    }
}

// ---------------------------------------------------------------------------------------------
// Triggers

async fn post_triggers(state: &Arc<State>, pid: u32, body: &str, token: &str) -> Resp {
    call(state, "POST", &format!("/v1/targets/{pid}/triggers"), Some(token), Some(body.as_bytes())).await
}

/// Runs one poll of every target's triggers to its end (the poller does this every 20 ms).
async fn poll(state: &Arc<State>) {
    for job in crate::agent::triggers::poll_once(&state.agent) {
        job.await.unwrap();
    }
}

/// The triggers of the fake target, by spec.
async fn trigger_views(state: &Arc<State>, pid: u32) -> Vec<Value> {
    let r = get(state, &format!("/v1/targets/{pid}/triggers"), Some(READ)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["triggers"].as_array().unwrap().clone()
}

/// Add with `spec` or `specs` (201 with the ids), list, delete; bad bodies and specs are 400,
/// an identical trigger 409, an unknown target or trigger 404.
#[tokio::test]
async fn triggers_add_list_delete() {
    let f = fixture();
    let r = post_triggers(&f.state, PID, r#"{"spec": "every=100ms"}"#, ADMIN).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let first = r.json()["ids"][0].as_u64().unwrap();
    assert_eq!(r.json()["triggers"][0]["spec"], "every=100ms");
    let r = post_triggers(&f.state, PID, r#"{"specs": ["growth=20%", "exit"], "min_spacing": "1s"}"#, ADMIN).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let ids: Vec<u64> = r.json()["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&first));

    let views = trigger_views(&f.state, PID).await;
    let specs: Vec<&str> = views.iter().map(|v| v["spec"].as_str().unwrap()).collect();
    assert_eq!(specs, ["every=100ms", "growth=20%", "exit"]);
    assert_eq!(views[0]["reason"], "interval");
    assert_eq!(views[0]["origin"], "api");
    assert_eq!(views[0]["min_spacing_s"], 5.0, "the agent's default spacing");
    assert_eq!(views[1]["min_spacing_s"], 1.0);
    for key in ["id", "fired", "suppressed", "suppressed_busy", "probes", "finished"] {
        assert!(!views[0][key].is_null(), "{key} in {}", views[0]);
    }

    let r = post_triggers(&f.state, PID, r#"{"spec": "every=100ms"}"#, ADMIN).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::CONFLICT, "trigger_exists"));
    for (bad, code) in [
        ("not json", "bad_body"),
        ("{}", "bad_body"),
        (r#"{"spec": "exit", "specs": ["gc"]}"#, "bad_body"),
        (r#"{"specs": []}"#, "bad_body"),
        (r#"{"spec": "every=1s", "x": 1}"#, "bad_body"),
        (r#"{"spec": "sometimes=1"}"#, "bad_trigger"),
        (r#"{"spec": "every=1ms"}"#, "bad_trigger"),
        (r#"{"specs": ["rss=1GiB", "rss=1GiB"]}"#, "bad_trigger"),
        (r#"{"spec": "rss=1GiB", "min_spacing": "soon"}"#, "bad_min_spacing"),
        (r#"{"spec": "rss=1GiB", "min_spacing": "2d"}"#, "bad_min_spacing"),
    ] {
        let r = post_triggers(&f.state, PID, bad, ADMIN).await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, code), "{bad}");
    }
    // All or nothing: the return trigger cannot be resolved (no process 4242 here), so the
    // interval trigger before it is not added either.
    let r = post_triggers(&f.state, PID, r#"{"specs": ["every=7s", "return=no_such_function"]}"#, ADMIN).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "trigger_failed"), "{:?}", r.body);
    assert_eq!(trigger_views(&f.state, PID).await.len(), 3);
    let r = post_triggers(&f.state, 999_999, r#"{"spec": "exit"}"#, ADMIN).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "target_not_found"));
    assert_eq!(get(&f.state, "/v1/targets/999999/triggers", Some(READ)).await.status, 404);

    let r = call(&f.state, "DELETE", &format!("/v1/targets/{PID}/triggers/{first}"), Some(ADMIN), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["deleted"], first);
    let r = call(&f.state, "DELETE", &format!("/v1/targets/{PID}/triggers/{first}"), Some(ADMIN), None).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, "trigger_not_found"));
    let left: Vec<u64> = trigger_views(&f.state, PID).await.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(left, ids);
}

/// The auth matrix of the trigger routes: a read token may list, not add or delete; no token
/// or a wrong one is 401; an admin token may do all three.
#[tokio::test]
async fn trigger_routes_auth_matrix() {
    let f = fixture();
    let list = format!("/v1/targets/{PID}/triggers");
    let r = post_triggers(&f.state, PID, r#"{"spec": "exit"}"#, ADMIN).await;
    assert_eq!(r.status, 201);
    let tid = r.json()["ids"][0].as_u64().unwrap();
    let one = format!("/v1/targets/{PID}/triggers/{tid}");
    let body = br#"{"spec": "every=1s"}"#;
    for token in [None, Some("wrong-token-0123456789abcdef")] {
        for (method, path) in [("GET", &list), ("POST", &list), ("DELETE", &one)] {
            let r = call(&f.state, method, path, token, Some(body)).await;
            assert_eq!(r.status, 401, "{method} {path} with {token:?}");
        }
    }
    assert_eq!(get(&f.state, &list, Some(READ)).await.status, 200);
    let r = call(&f.state, "POST", &list, Some(READ), Some(body)).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = call(&f.state, "DELETE", &one, Some(READ), None).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    assert_eq!(trigger_views(&f.state, PID).await.len(), 1, "nothing changed");
    assert_eq!(call(&f.state, "POST", &list, Some(ADMIN), Some(body)).await.status, 201);
    assert_eq!(call(&f.state, "DELETE", &one, Some(ADMIN), None).await.status, 200);
    assert_eq!(get(&f.state, &list, Some(ADMIN)).await.status, 200);
}

/// Interval firings are stored with their reason and time; once 3 snapshots are in, the leak
/// report and the stored snapshots' leak view carry verdicts (the fake leak grows linearly:
/// `growing`); API snapshots count for the series too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggered_snapshots_are_stored_with_verdicts() {
    let f = fixture();
    let r = post_triggers(&f.state, PID, r#"{"spec": "every=50ms", "min_spacing": "0s"}"#, ADMIN).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // Before the first tick nothing fires.
    poll(&f.state).await;
    assert!(f.state.store.list().is_empty());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        poll(&f.state).await;
    }
    let api = take_snapshot(&f.state).await;
    let list = f.state.store.list();
    let reasons: Vec<&str> = list.iter().map(|m| m.reason.as_str()).collect();
    assert_eq!(reasons, ["interval", "interval", "interval", "api"]);
    assert!(list.windows(2).all(|w| w[0].taken_at_ms < w[1].taken_at_ms));
    let views = trigger_views(&f.state, PID).await;
    assert_eq!(views[0]["fired"], 3);

    let r = get(&f.state, &format!("/v1/targets/{PID}/leaks?min_age=0s"), Some(READ)).await;
    let v = r.json();
    assert_eq!(v["verdict_snapshots"], 4, "{v:#}");
    let leak = &v["leaks"][0];
    assert_eq!(leak["frames"][0]["function"], "leaky_alloc");
    assert_eq!(leak["verdict"], "growing", "{v:#}");
    assert_eq!(leak["slope_bytes_per_s"], 2048.0);
    assert!(leak["confidence"].as_f64().unwrap() > 0.5);

    // The stored snapshots: the first has no verdict, the last (the API one) has.
    let r = get(&f.state, &format!("/v1/snapshots/{}?format=leaks", list[0].id), Some(READ)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let first = r.json();
    assert_eq!(first["reason"], "interval");
    assert_eq!(first["id"], list[0].id.as_str());
    assert!(first["taken_at"].as_str().unwrap().ends_with('Z'));
    assert!(first["leaks"][0]["verdict"].is_null() && first["verdict_snapshots"].is_null());
    let r = get(&f.state, &format!("/v1/snapshots/{api}?format=leaks&top=1"), Some(READ)).await;
    let last = r.json();
    assert_eq!(last["reason"], "api");
    assert_eq!(last["leaks"].as_array().unwrap().len(), 1);
    assert_eq!(last["leaks"][0]["verdict"], "growing", "{last:#}");
    for bad in ["format=leaks&measure=inuse", "format=svg&top=3", "format=leaks&top=0"] {
        let r = get(&f.state, &format!("/v1/snapshots/{api}?{bad}"), Some(READ)).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    // Deleting a snapshot forgets its verdicts.
    assert_eq!(call(&f.state, "DELETE", &format!("/v1/snapshots/{api}"), Some(ADMIN), None).await.status, 200);
    assert!(!f.state.snapshot_verdicts.lock().unwrap().contains_key(&api));
}

/// A firing while the cap on expensive work is full is dropped and counted as suppressed,
/// not queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firing_at_full_cap_is_suppressed() {
    let f = fixture_with(Limits { max_expensive: 1, ..generous() }, Duration::ZERO);
    let r = post_triggers(&f.state, PID, r#"{"spec": "every=50ms", "min_spacing": "0s"}"#, ADMIN).await;
    assert_eq!(r.status, 201);
    let held = f.state.expensive.clone().try_acquire_owned().unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    poll(&f.state).await;
    assert!(f.state.store.list().is_empty());
    let v = &trigger_views(&f.state, PID).await[0];
    assert_eq!((v["fired"].as_u64(), v["suppressed"].as_u64(), v["suppressed_busy"].as_u64()), (Some(1), Some(1), Some(1)));
    drop(held);
    tokio::time::sleep(Duration::from_millis(60)).await;
    poll(&f.state).await;
    assert_eq!(f.state.store.list().len(), 1);
}

/// When the target exits, the exit trigger's final snapshot is stored with reason `exit` (it
/// waits for a permit of a full cap instead of being dropped); the target stays listed as not
/// alive, its triggers finished, and no trigger can be added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_trigger_stores_the_final_snapshot() {
    let f = fixture_with(Limits { max_expensive: 1, ..generous() }, Duration::ZERO);
    let r = post_triggers(&f.state, PID, r#"{"specs": ["exit", "every=1h"]}"#, ADMIN).await;
    assert_eq!(r.status, 201);
    poll(&f.state).await;
    assert!(f.state.store.list().is_empty());
    f.target.dead.store(true, Ordering::SeqCst);
    let held = f.state.expensive.clone().try_acquire_owned().unwrap();
    let st = f.state.clone();
    let polling = tokio::spawn(async move { poll(&st).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(f.state.store.list().is_empty() && !polling.is_finished(), "waits for the permit");
    drop(held);
    polling.await.unwrap();
    let list = f.state.store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reason, "exit");
    poll(&f.state).await;
    assert_eq!(f.state.store.list().len(), 1, "only one exit snapshot");
    let views = trigger_views(&f.state, PID).await;
    assert!(views.iter().all(|v| v["finished"] == true), "{views:?}");
    assert_eq!(views[0]["fired"], 1);
    let targets = get(&f.state, "/v1/targets", Some(READ)).await.json();
    assert_eq!(targets["targets"][0]["alive"], false);
    let r = post_triggers(&f.state, PID, r#"{"spec": "every=1s"}"#, ADMIN).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::CONFLICT, "target_exited"));
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn memscope_api_test_trigger_target(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_add(1))
}

/// Return and gc triggers resolve functions in the target process (here: this test process,
/// behind a fake target): a function of it gets a probe and fires on a hit with reason
/// `return:...` (stored as `return_...`); `gc` on a process without V8 fails with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_and_gc_triggers_resolve_in_the_process() {
    assert_eq!(memscope_api_test_trigger_target(1), 2);
    let f = fixture();
    let me = std::process::id();
    let target = Arc::new(FakeTarget::new(me, Duration::ZERO));
    f.state.insert_target(target.clone());
    let r = post_triggers(&f.state, me, r#"{"spec": "gc"}"#, ADMIN).await;
    assert_eq!((r.status, r.code().as_str()), (StatusCode::BAD_REQUEST, "trigger_failed"));
    assert_eq!(
        r.json()["error"],
        format!("--on-gc: no V8 garbage collector found in process {me}'s executable or libraries (is it a Node.js process?)")
    );
    let r = post_triggers(&f.state, me, r#"{"spec": "return=memscope_api_test_trigger_target", "min_spacing": "0s"}"#, ADMIN).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.json()["triggers"][0]["probes"], 1);
    poll(&f.state).await;
    assert!(f.state.store.list().is_empty());
    target.hits.lock().unwrap()[0] += 1;
    poll(&f.state).await;
    let list = f.state.store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reason, "return_memscope_api_test_trigger");
    assert_eq!(trigger_views(&f.state, me).await[0]["reason"], "return:memscope_api_test_trigger_target");
}
