//! The JavaScript heap of Node.js targets through the endpoint (see [`crate::v8`]). The
//! threads, summary, snapshot and profile routes reach `worker_threads` workers too: `?thread=`
//! is `main` (the default), a worker's id, or (summary and profile) `all`; see
//! [`crate::v8::workers`].
//!
//! - `GET /v1/targets/{id}/v8/threads` (read): the JavaScript threads (main, then each
//!   `worker_threads` worker: id, type, title, url).
//! - `GET /v1/targets/{id}/v8/summary[?gc=true]` (admin: V8 pauses the target as for a
//!   snapshot): objects per constructor of a heap snapshot summarized as it streams, with its
//!   thread; for `thread=all` a list of them.
//! - `GET /v1/targets/{id}/v8/heap-snapshot[?gc=true]` (admin): the `.heapsnapshot` streamed as
//!   V8 writes it (each chunk goes out as it comes; the agent holds a few chunks per client).
//!   One per target at a time: a request that arrives while another is being prepared (the
//!   inspector opening, the GC, V8 walking the heap) shares it; once bytes flow, 409. Needs a
//!   permit of the render cap; the V8 call is bounded by the request timeout.
//! - `GET /v1/targets/{id}/v8/heap-profile?seconds=N` (read): the sampling heap profiler,
//!   rendered like the native heap (json, pprof, folded, svg), through single-flight.
//! - `POST /v1/targets/{id}/actions/gc` (admin): a full garbage collection.
//! - `POST /v1/targets/{id}/actions/eval` (role `eval`, and only when the agent runs with
//!   `--allow-eval`): `Runtime.evaluate` of `{"expression": "..."}`, its result by value. Each
//!   call is audited (token, target, SHA-256 and length of the expression, result size) and
//!   limited to one per token every [`EVAL_SPACING`].
//!
//! Every route acts on the process attached as the target (its pidfd and start time), never on
//! whatever process has its pid now: once the target has exited, 410 `target_exited` and no
//! signal (see [`crate::v8::inspector`]). Each request's inspector session has one deadline
//! (the request timeout) and is cancelled when the request ends early (timeout, client gone):
//! its render slot is held by the request, not by the session, so it is free again at once.
//!
//! Every inspector session is audited by [`crate::v8::inspector`] too.
use std::{
    collections::HashMap,
    sync::{atomic::{AtomicBool, Ordering}, Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::Deserialize;
use tracing::info;
use warp::{
    http::{header, HeaderValue, Method, StatusCode},
    hyper::Body,
    reply::Response,
};

use super::{
    auth::Principal,
    errors::ApiError,
    handlers::{audit_action, json_reply, rendered_reply, Params},
    limits::{self, Rendered},
    State,
};
use crate::{
    aggregate::Measure,
    render,
    process::Process,
    v8::{
        channel,
        inspector::CancelOnDrop,
        sampling, snapshot,
        workers, Budget, Cancel, Inspector, Protocol as _, Thread, V8Error,
    },
};

/// Longest sampling accepted.
const MAX_SECONDS: u64 = 300;
/// Longest expression accepted, and largest result returned.
const MAX_EXPRESSION: usize = 4096;
const MAX_RESULT: usize = 1 << 20;
/// One evaluation per token in this time.
pub const EVAL_SPACING: Duration = Duration::from_secs(2);
/// Chunks buffered per snapshot client.
const CHUNKS_PER_CLIENT: usize = 8;

type Chunk = Result<Bytes, ApiError>;

/// A heap snapshot being prepared or streamed.
struct Flight {
    gc: bool,
    /// Tells this flight from a later one of the same process.
    generation: u64,
    thread: Thread,
    /// The clients; `None` once bytes flow (no one can join then).
    waiting: Option<Vec<tokio::sync::mpsc::Sender<Chunk>>>,
    /// What the clients hold; gone once the last client has gone.
    hold: std::sync::Weak<FlightHold>,
}

/// What every client of a snapshot flight holds (its request, then its response body): the
/// render slot and the cancellation of the session. The last client to go releases the slot
/// and cancels the session at once.
struct FlightHold {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _cancel: CancelOnDrop,
}

/// What the V8 routes keep in the agent's state.
#[derive(Default)]
pub struct V8State {
    flights: Mutex<HashMap<u32, Flight>>,
    next_flight: std::sync::atomic::AtomicU64,
    last_eval: Mutex<HashMap<String, Instant>>,
    /// `--allow-eval`.
    pub allow_eval: AtomicBool,
}

fn v8_error(e: V8Error) -> ApiError {
    let (status, code) = e.http();
    ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), code, e.to_string())
}

/// The process attached as target `id`: 404 when there is no such target, 410 when its
/// process has exited (its pid may belong to another process now: nothing is sent to it).
fn node_target(state: &State, id: u32) -> Result<Arc<Process>, ApiError> {
    let process = state
        .targets
        .read()
        .unwrap()
        .get(&id)
        .map(|e| e.target.process())
        .ok_or_else(|| ApiError::not_found("target_not_found", format!("no target {id}: attach it first")))?
        .ok_or_else(|| ApiError::conflict("no_process_identity", format!("target {id} is not a process memscope holds by pidfd: V8 operations refused")))?;
    if !process.alive() {
        return Err(v8_error(V8Error::Gone(process.pid())));
    }
    Ok(process)
}

/// The budget of one request's inspector session.
fn budget(state: &State, cancel: Cancel) -> Budget {
    Budget::with_cancel(state.limits.request_timeout, cancel)
}

fn flag(q: &Params, k: &str) -> Result<bool, ApiError> {
    match q.get(k) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::bad_request("bad_parameter", format!("{k} must be true or false"))),
    }
}

fn thread_param(q: &Params) -> Result<Thread, ApiError> {
    q.get("thread").unwrap_or("main").parse().map_err(|e: String| ApiError::bad_request("bad_thread", e))
}

/// `GET /v1/targets/{id}/v8/threads`: the JavaScript threads of the target.
pub(crate) async fn threads(state: Arc<State>, p: Principal, id: u32) -> Result<Response, ApiError> {
    let process = node_target(&state, id)?;
    let pid = process.pid();
    let purpose = format!("api: v8 threads by {}", p.name);
    cancellable(&state, format!("target:{id}|v8-threads"), move |budget| {
        let list = workers::threads_of(process, &purpose, budget).map_err(v8_error)?;
        let body = serde_json::to_vec(&serde_json::json!({ "pid": pid, "threads": list }))
            .map_err(|e| ApiError::internal("internal", e.to_string()))?;
        Ok(Rendered { content_type: "application/json", body: Bytes::from(body), status: 200 })
    })
    .await
}

/// `GET /v1/targets/{id}/v8/summary[?gc=true&thread=T]`: a heap summary of one thread (its
/// [`workers::ThreadSummary`]), or of every thread (`thread=all`: a list of them).
pub(crate) async fn summary(state: Arc<State>, p: Principal, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/v8/summary");
    let result = async {
        let q = Params::parse(q, &["gc", "thread"])?;
        let (gc, thread) = (flag(&q, "gc")?, thread_param(&q)?);
        let process = node_target(&state, id)?;
        let reason = format!("api by {}", p.name);
        cancellable(&state, format!("target:{id}|v8-summary|{gc}|{thread}"), move |budget| {
            let mut list = workers::summaries_of(process, &thread, gc, &reason, budget).map_err(v8_error)?;
            let body = if thread == Thread::All { serde_json::to_vec(&list) } else { serde_json::to_vec(&list.pop()) }
                .map_err(|e| ApiError::internal("internal", e.to_string()))?;
            Ok(Rendered { content_type: "application/json", body: Bytes::from(body), status: 200 })
        })
        .await
    }
    .await;
    audit_action(&p, &Method::GET, &route, result.as_ref().map(|_| "v8 heap summary"));
    result
}

pub(crate) async fn heap_snapshot(state: Arc<State>, p: Principal, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/v8/heap-snapshot");
    let result = heap_snapshot_inner(&state, &p, id, q).await;
    audit_action(&p, &Method::GET, &route, result.as_ref().map(|_| "heap snapshot streaming"));
    result
}

async fn heap_snapshot_inner(state: &Arc<State>, p: &Principal, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let q = Params::parse(q, &["gc", "thread"])?;
    let gc = flag(&q, "gc")?;
    let thread = thread_param(&q)?;
    if thread == Thread::All {
        return Err(ApiError::bad_request("bad_thread", "a heap snapshot is of one thread: main or a worker's id"));
    }
    let process = node_target(state, id)?;
    let pid = process.pid();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(CHUNKS_PER_CLIENT);
    let (hold, lead) = {
        let mut flights = state.v8.flights.lock().unwrap();
        let joined = match flights.get_mut(&pid) {
            Some(f) => match f.hold.upgrade() {
                Some(hold) if f.gc == gc && f.thread == thread && f.waiting.is_some() => {
                    f.waiting.as_mut().expect("checked").push(tx.clone());
                    Some(hold)
                }
                Some(_) => {
                    return Err(ApiError::conflict("snapshot_in_progress", format!("a heap snapshot of {pid} is already being taken; retry when it is done"))
                        .with_retry_after(Duration::from_secs(5)))
                }
                // Every client of that one has gone: it is being cancelled.
                None => None,
            },
            None => None,
        };
        match joined {
            Some(hold) => (hold, None),
            None => {
                let permit = state.expensive.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
                let cancel = Cancel::new();
                let hold = Arc::new(FlightHold { _permit: permit, _cancel: cancel.on_drop() });
                let generation = state.v8.next_flight.fetch_add(1, Ordering::Relaxed);
                flights.insert(pid, Flight { gc, generation, thread: thread.clone(), waiting: Some(vec![tx]), hold: Arc::downgrade(&hold) });
                (hold, Some((generation, cancel)))
            }
        }
    };
    if let Some((generation, cancel)) = lead {
        let st = state.clone();
        let purpose = format!("api: heap-snapshot by {}", p.name);
        let budget = budget(state, cancel);
        // Holds no permit: the clients do (`hold`).
        tokio::task::spawn_blocking(move || {
            stream_snapshot(&st, process, gc, &thread, &purpose, budget, generation);
            let mut flights = st.v8.flights.lock().unwrap();
            if flights.get(&pid).is_some_and(|f| f.generation == generation) {
                flights.remove(&pid);
            }
        });
    }
    let first = match tokio::time::timeout(state.limits.request_timeout, rx.recv()).await {
        Err(_) => return Err(ApiError::timeout(state.limits.request_timeout)),
        Ok(None) => return Err(ApiError::internal("v8_failed", "the heap snapshot ended before it began; see the agent's log")),
        Ok(Some(first)) => first?,
    };
    // The body holds the flight while it streams.
    let rest = futures_util::stream::unfold((rx, hold), |(mut rx, hold)| async move {
        rx.recv().await.map(|c| (c.map_err(|e| std::io::Error::other(e.message)), (rx, hold)))
    });
    let body = futures_util::StreamExt::chain(futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }), rest);
    let mut resp = Response::new(Body::wrap_stream(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{pid}.heapsnapshot\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// The producer: opens the session, streams every chunk to every client (at the pace of the
/// slowest), stops when all are gone.
fn stream_snapshot(state: &State, process: Arc<Process>, gc: bool, thread: &Thread, purpose: &str, budget: Budget, generation: u64) {
    let pid = process.pid();
    let waiting = || {
        state.v8.flights.lock().unwrap().get_mut(&pid).filter(|f| f.generation == generation).and_then(|f| f.waiting.take()).unwrap_or_default()
    };
    let mut clients: Vec<tokio::sync::mpsc::Sender<Chunk>> = Vec::new();
    let mut started = false;
    let mut sink = |chunk: &str| -> Result<(), V8Error> {
        if !started {
            started = true;
            clients = waiting();
            info!(pid, clients = clients.len(), "heap snapshot streaming");
        }
        let b = Bytes::copy_from_slice(chunk.as_bytes());
        clients.retain(|c| c.blocking_send(Ok(b.clone())).is_ok());
        if clients.is_empty() {
            return Err(V8Error::Sink("every client went away".into()));
        }
        Ok(())
    };
    let result = if *thread == Thread::Main {
        // Through the target's snapshot channel: the ids of surviving objects stay the same from
        // one snapshot to the next (see crate::v8::channel).
        let pause = crate::agent::pauses::begin(state, pid);
        let bytes = snapshot::take_keeping_ids(&process, purpose, gc, budget, &mut sink);
        drop(pause);
        bytes
    } else {
        // A worker's isolate: through a nested session of the inspector.
        let timeout = budget.left();
        Inspector::open(process, purpose, budget).and_then(|mut insp| {
            let pause = crate::agent::pauses::begin(state, pid);
            let taken = workers::with_threads(&mut insp, thread, |_, s| snapshot::take(s, gc, timeout, &mut sink));
            drop(pause);
            let bytes = taken?.pop().map(|(_, b)| b).unwrap_or(0);
            insp.close()?;
            Ok(bytes)
        })
    };
    if !started {
        clients = waiting();
    }
    match result {
        Ok(bytes) => info!(pid, bytes, "heap snapshot sent"),
        Err(e) => {
            tracing::warn!(pid, error = %e, "heap snapshot failed");
            let err = v8_error(e);
            for c in clients {
                let _ = c.blocking_send(Err(err.clone()));
            }
        }
    }
}

pub(crate) async fn heap_profile(state: Arc<State>, p: Principal, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let q = Params::parse(q, &["seconds", "format", "interval", "thread"])?;
    let thread = thread_param(&q)?;
    let limit = MAX_SECONDS.min(state.limits.request_timeout.as_secs().saturating_sub(5)).max(1);
    let seconds = match q.get("seconds") {
        None => 10.min(limit),
        Some(v) => v.parse::<u64>().ok().filter(|s| (1..=limit).contains(s))
            .ok_or_else(|| ApiError::bad_request("bad_seconds", format!("seconds must be 1 to {limit}")))?,
    };
    let interval = match q.get("interval") {
        None => sampling::DEFAULT_INTERVAL,
        Some(v) => v.parse::<u64>().ok().filter(|i| (1024..=1 << 30).contains(i))
            .ok_or_else(|| ApiError::bad_request("bad_interval", "interval must be 1024 to 1073741824 bytes"))?,
    };
    let format = match q.get("format").unwrap_or("json") {
        f @ ("json" | "pprof" | "folded" | "svg") => render::Format::parse(f).expect("known format"),
        f => return Err(ApiError::bad_request("bad_format", format!("unknown format {:?} (use json, pprof, folded, svg)", f.chars().take(64).collect::<String>()))),
    };
    let process = node_target(&state, id)?;
    let pid = process.pid();
    let key = format!("target:{id}|v8-heap-profile|{seconds}|{interval}|{}|{thread}", format.name());
    let purpose = format!("api: heap-profile by {}", p.name);
    let timeout = state.limits.request_timeout;
    let work = move |cancel: Cancel| {
        let d = Duration::from_secs(seconds);
        let budget = Budget::with_cancel(timeout, cancel);
        let prof = if thread == Thread::Main {
            // Through the snapshot channel: no inspector session ends, so the ids of the next
            // heap snapshot's objects stay those of the last one.
            channel::with_channel(&process, &purpose, budget, |ch| sampling::profile(ch, d, interval), |insp| sampling::profile(insp, d, interval))
        } else {
            Inspector::open(process, &purpose, budget).and_then(|mut insp| {
                let prof = workers::profile_threads(&mut insp, &thread, d, interval)?;
                insp.close()?;
                Ok(prof)
            })
        }
        .map_err(v8_error)?;
        let body = match format {
            render::Format::Svg => render::flamegraph::flamegraph_svg(&prof, Measure::Inuse, &format!("pid {pid}: JavaScript heap, live (sampled every {interval} B)")),
            f => render::render(&prof, f, Measure::Inuse),
        }
        .map_err(|e| ApiError::internal("render_failed", e.to_string()))?;
        Ok(Rendered { content_type: format.content_type(), body: Bytes::from(body), status: 200 })
    };
    let result = match tokio::time::timeout(timeout, state.flights.run_cancellable(key, &state.expensive, work)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::timeout(timeout)),
    };
    if matches!(&result, Err(e) if e.code == "busy") {
        state.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    }
    Ok(rendered_reply(&*result?))
}

/// Runs `work` (an inspector session, given the request's [`Budget`]) through single-flight
/// under `key`, its render slot held by the requests that wait for it: when they all end early
/// (timeout, client gone) the session is cancelled and the slot is free at once.
async fn cancellable<F>(state: &State, key: String, work: F) -> Result<Response, ApiError>
where
    F: FnOnce(Budget) -> Result<Rendered, ApiError> + Send + 'static,
{
    let timeout = state.limits.request_timeout;
    let work = move |cancel: Cancel| work(Budget::with_cancel(timeout, cancel));
    let result = match tokio::time::timeout(timeout, state.flights.run_cancellable(key, &state.expensive, work)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::timeout(timeout)),
    };
    if matches!(&result, Err(e) if e.code == "busy") {
        state.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    }
    Ok(rendered_reply(&*result?))
}

/// Runs `work` (an inspector session) under a render slot held by this request and its
/// timeout: the request ending early cancels the session and frees the slot at once.
async fn exclusive_session<T, F>(state: &State, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Budget) -> Result<T, ApiError> + Send + 'static,
{
    let timeout = state.limits.request_timeout;
    let result = tokio::time::timeout(timeout, limits::exclusive_cancellable(&state.expensive, move |cancel| work(Budget::with_cancel(timeout, cancel)))).await;
    let result = result.unwrap_or_else(|_| Err(ApiError::timeout(timeout)));
    if matches!(&result, Err(e) if e.code == "busy") {
        state.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    }
    result
}

pub(crate) async fn gc(state: Arc<State>, p: Principal, id: u32) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/actions/gc");
    let result = async {
        let process = node_target(&state, id)?;
        let purpose = format!("api: gc by {}", p.name);
        let traced = crate::agent::pauses::target_of(&state, id);
        exclusive_session(&state, move |budget| {
            let started = Instant::now();
            let t = budget.left();
            let pause = traced.and_then(crate::pause::PauseGuard::begin);
            let done = channel::with_channel(&process, &purpose, budget, |ch| ch.call("HeapProfiler.collectGarbage", serde_json::json!({}), t).map(|_| ()), |insp| {
                insp.collect_garbage()
            });
            drop(pause);
            done.map_err(v8_error)?;
            Ok(started.elapsed())
        })
        .await
    }
    .await;
    audit_action(&p, &Method::POST, &route, result.as_ref().map(|_| "garbage collected"));
    result.map(|d| json_reply(StatusCode::OK, &serde_json::json!({ "gc": "done", "ms": d.as_millis() as u64 })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    expression: String,
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) async fn eval(state: Arc<State>, p: Principal, id: u32, body: Bytes) -> Result<Response, ApiError> {
    if !state.v8.allow_eval.load(Ordering::Relaxed) {
        let e = ApiError::forbidden("evaluating expressions is off: the agent was not started with --allow-eval");
        audit_action(&p, &Method::POST, &format!("/v1/targets/{id}/actions/eval"), Err(&e));
        return Err(e);
    }
    let EvalBody { expression } = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("bad_body", "expected a JSON body {\"expression\": \"...\"}"))?;
    if expression.is_empty() || expression.len() > MAX_EXPRESSION {
        return Err(ApiError::bad_request("bad_expression", format!("the expression must be 1 to {MAX_EXPRESSION} bytes")));
    }
    let (hash, len) = (sha256_hex(&expression), expression.len());
    {
        let mut last = state.v8.last_eval.lock().unwrap();
        let now = Instant::now();
        if let Some(t) = last.get(&p.name) {
            let next = *t + EVAL_SPACING;
            if next > now {
                return Err(ApiError::rate_limited("one evaluation per token every 2 s", next - now));
            }
        }
        if last.len() > 10_000 {
            last.clear();
        }
        last.insert(p.name.clone(), now);
    }
    let pid = node_target(&state, id);
    let purpose = format!("api: eval by {}", p.name);
    let result = match pid {
        Err(e) => Err(e),
        Ok(process) => {
            exclusive_session(&state, move |budget| {
                let mut insp = Inspector::open(process, &purpose, budget).map_err(v8_error)?;
                let r = insp.evaluate(&expression, Duration::from_secs(10)).map_err(v8_error);
                insp.close().map_err(v8_error)?;
                let text = serde_json::to_vec(&serde_json::json!({ "result": r?.get("value").cloned().unwrap_or(serde_json::Value::Null) }))
                    .map_err(|e| ApiError::internal("internal", e.to_string()))?;
                if text.len() > MAX_RESULT {
                    return Err(ApiError::new(StatusCode::BAD_GATEWAY, "result_too_large", "the result is larger than 1 MiB"));
                }
                Ok(text)
            })
            .await
        }
    };
    match &result {
        Ok(text) => info!(target: "audit", token = %p.name, role = p.role.as_str(), target = id, expression_sha256 = %hash,
                          expression_len = len, result_bytes = text.len(), result = "ok", "eval"),
        Err(e) => info!(target: "audit", token = %p.name, role = p.role.as_str(), target = id, expression_sha256 = %hash,
                        expression_len = len, result = "error", status = e.status.as_u16(), code = e.code, "eval"),
    }
    let text = result?;
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}
