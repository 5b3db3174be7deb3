//! Request handlers: each takes the parsed request (principal, path parameters, query, body)
//! and the shared [`State`], and answers a reply or an [`ApiError`]. No routing here (see
//! [`super::routes`]), no rendering (see [`crate::render`]).
//!
//! Expensive work (a snapshot of a live target, reading a stored snapshot, rendering) runs in
//! `spawn_blocking` under the cap of [`super::limits`], through single-flight where identical
//! concurrent requests can share the result, and under the request timeout.
//! Admin actions and every denied request are written to the audit log (tracing target
//! `audit`, level info) with the token's name and role, the route and the result; denials
//! aggregated and client values clipped ([`super::audit`]).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::info;
use warp::{
    http::{header, HeaderValue, Method, StatusCode},
    hyper::Body,
    reply::Response,
    Reply,
};

use super::{
    auth::{Principal, Role},
    errors::ApiError,
    limits::{self, Rendered},
    State,
};
use crate::{
    agent::{
        triggers::{self, Tracking},
        TargetEntry,
    },
    aggregate::{growth, HeapProfile, Measure},
    render,
    store::{SnapshotId, SnapshotMeta},
    target::{TargetStats, TracedTarget},
    trigger::TriggerSpec,
};

/// Leak age used when a request names none.
pub use crate::agent::triggers::DEFAULT_MIN_AGE;
/// Longest `min_age` accepted.
const MAX_MIN_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default and largest `top`.
const DEFAULT_TOP: usize = 20;
const MAX_TOP: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Authentication and audit

fn audit_denied(
    state: &State,
    p: Option<&Principal>,
    peer: Option<IpAddr>,
    method: &Method,
    path: &str,
    err: &ApiError,
) {
    state.denials.record(p, peer, method, path, err);
}

/// Logs an admin action and its result (values from the request clipped, see
/// [`super::audit::Clip`]).
pub(crate) fn audit_action(p: &Principal, method: &Method, route: &str, result: Result<&str, &ApiError>) {
    use super::audit::Clip;
    match result {
        Ok(detail) => info!(target: "audit", token = %p.name, role = p.role.as_str(), %method, route = %Clip(route),
                            result = "ok", detail = %Clip(detail), "admin action"),
        Err(e) => info!(target: "audit", token = %p.name, role = p.role.as_str(), %method, route = %Clip(route),
                        result = "error", status = e.status.as_u16(), code = e.code, "admin action failed"),
    }
}

/// Checks the bearer token and the role, after [`precheck`] has spent the request's budget.
/// Every refusal is audited (aggregated).
pub(crate) fn authorize(
    state: &State,
    authorization: Option<&[u8]>,
    peer: Option<SocketAddr>,
    method: &Method,
    path: &str,
    needed: Role,
) -> Result<Principal, ApiError> {
    let ip = peer.map(|a| a.ip());
    let principal = match state.auth.authenticate(authorization) {
        Ok(p) => p,
        Err(failure) => {
            let err = ApiError::unauthorized(failure.code(), failure.message());
            audit_denied(state, None, ip, method, path, &err);
            return Err(err);
        }
    };
    if !principal.role.allows(needed) {
        let err = ApiError::forbidden(format!("this route needs the {} role", needed.as_str()));
        audit_denied(state, Some(&principal), ip, method, path, &err);
        return Err(err);
    }
    Ok(principal)
}

/// The checks in front of every route but the health checks: body size by Content-Length,
/// then the token (constant time) and the one budget the request draws from: its token's when
/// the token is valid, else the unauthenticated ones (per address, wrong tokens per address,
/// agent-wide; see [`limits::RateLimiter`]). So no client without a token can make a valid
/// token wait.
pub(crate) fn precheck(
    state: &State,
    content_length: Option<u64>,
    authorization: Option<&[u8]>,
    peer: Option<SocketAddr>,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    if content_length.is_some_and(|n| n > state.limits.body_bytes) {
        return Err(ApiError::too_large(state.limits.body_bytes));
    }
    let ip = peer.map(|a| a.ip());
    match state.auth.authenticate(authorization) {
        Ok(principal) => {
            if let Err(wait) = state.limiter.check_token(&principal.name) {
                state.metrics.refused_token.fetch_add(1, Ordering::Relaxed);
                let err = ApiError::rate_limited("per-token limit", wait);
                audit_denied(state, Some(&principal), ip, method, path, &err);
                return Err(err);
            }
        }
        Err(failure) => {
            let failed = failure != super::auth::AuthFailure::Missing;
            if let Err((why, wait)) = state.limiter.check_unauthenticated(ip, failed) {
                let counter = match why {
                    limits::UnauthRefusal::AuthFailures => &state.metrics.refused_auth_failures,
                    limits::UnauthRefusal::PerAddress => &state.metrics.refused_unauth_address,
                    limits::UnauthRefusal::Global => &state.metrics.refused_unauth,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let err = ApiError::rate_limited(why.message(), wait);
                audit_denied(state, None, ip, method, path, &err);
                return Err(err);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Query parameters

/// Query parameters of one request: only the allowed names, each at most once.
pub(crate) struct Params(BTreeMap<String, String>);

impl Params {
    pub(crate) fn parse(raw: Vec<(String, String)>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut map = BTreeMap::new();
        for (k, v) in raw {
            if !allowed.contains(&k.as_str()) {
                let hint = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {:?} (allowed: {hint})", truncate(&k)),
                ));
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad_request("duplicate_parameter", format!("query parameter {k:?} given twice")));
            }
        }
        Ok(Params(map))
    }

    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn format(&self, default: render::Format, allowed: &[&str]) -> Result<render::Format, ApiError> {
        let Some(v) = self.get("format") else { return Ok(default) };
        let bad = || {
            ApiError::bad_request(
                "bad_format",
                format!("unknown format {:?} (use {})", truncate(v), allowed.join(", ")),
            )
        };
        if !allowed.contains(&v) {
            return Err(bad());
        }
        parse_format(v).ok_or_else(bad)
    }

    fn measure(&self, key: &str) -> Result<Measure, ApiError> {
        let Some(v) = self.get(key) else { return Ok(Measure::Inuse) };
        Measure::parse(v).ok_or_else(|| {
            ApiError::bad_request("bad_measure", format!("unknown {key} {:?} (use inuse, alloc or leaks)", truncate(v)))
        })
    }

    fn min_age(&self) -> Result<Duration, ApiError> {
        let Some(v) = self.get("min_age") else { return Ok(DEFAULT_MIN_AGE) };
        let d = crate::units::parse_duration(v).map_err(|_| {
            ApiError::bad_request("bad_min_age", format!("invalid min_age {:?} (use e.g. 500ms, 30s, 5m)", truncate(v)))
        })?;
        if d > MAX_MIN_AGE {
            return Err(ApiError::bad_request("bad_min_age", "min_age longer than 30 days"));
        }
        Ok(d)
    }

    fn top(&self) -> Result<usize, ApiError> {
        let Some(v) = self.get("top") else { return Ok(DEFAULT_TOP) };
        match v.parse::<usize>() {
            Ok(n) if (1..=MAX_TOP).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request("bad_top", format!("top must be 1 to {MAX_TOP}"))),
        }
    }
}

/// At most 64 characters of a client's string, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

// ---------------------------------------------------------------------------------------------
// The renderers, as the API uses them.

fn parse_format(s: &str) -> Option<render::Format> {
    render::Format::parse(s)
}

fn content_type(f: render::Format) -> &'static str {
    f.content_type()
}

fn render_failed(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "rendering failed");
    ApiError::internal("render_failed", "rendering the report failed; see the agent's log")
}

fn render_profile(p: &HeapProfile, f: render::Format, m: Measure) -> Result<Rendered, ApiError> {
    let body = render::render(p, f, m).map_err(render_failed)?;
    Ok(Rendered { content_type: content_type(f), body: Bytes::from(body), status: 200 })
}

fn json_rendered(v: &serde_json::Value) -> Result<Rendered, ApiError> {
    let body = serde_json::to_vec_pretty(v).map_err(render_failed)?;
    Ok(Rendered { content_type: "application/json", body: Bytes::from(body), status: 200 })
}

fn svg_rendered(body: Vec<u8>) -> Rendered {
    Rendered { content_type: "image/svg+xml", body: Bytes::from(body), status: 200 }
}

// ---------------------------------------------------------------------------------------------
// Replies

pub(crate) fn json_reply<T: Serialize>(status: StatusCode, v: &T) -> Response {
    warp::reply::with_status(warp::reply::json(v), status).into_response()
}

pub(crate) fn rendered_reply(r: &Rendered) -> Response {
    let mut resp = Response::new(Body::from(r.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    if r.content_type.starts_with("image/svg") {
        // Flamegraphs carry inline script for zooming: allow that, and nothing from elsewhere.
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"),
        );
    }
    resp
}

async fn with_timeout<T>(
    state: &State,
    fut: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let limit = state.limits.request_timeout;
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::timeout(limit)),
    }
}

/// Runs an expensive computation through single-flight and the cap, under the timeout.
pub(crate) async fn expensive<F>(state: &State, key: String, work: F) -> Result<Response, ApiError>
where
    F: FnOnce() -> Result<Rendered, ApiError> + Send + 'static,
{
    let result = with_timeout(state, state.flights.run(key, &state.expensive, work)).await;
    if matches!(&result, Err(e) if e.code == "busy") {
        state.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    }
    Ok(rendered_reply(&*result?))
}

// ---------------------------------------------------------------------------------------------
// Health

pub(crate) fn healthz() -> Response {
    json_reply(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub(crate) fn readyz(state: &State) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": "shutting down", "warnings": state.warnings }),
        );
    }
    // Over capacity the agent is still ready (what it traces is served); it says so.
    let capacity = super::workloads::capacity(state);
    let mut warnings = state.warnings.clone();
    if capacity.over_capacity {
        warnings.push(format!(
            "over capacity: {} workload(s) wait for a target slot ({} of --max-targets {} traced)",
            capacity.waiting, capacity.targets, capacity.max_targets
        ));
    }
    json_reply(StatusCode::OK, &serde_json::json!({ "status": "ready", "warnings": warnings, "capacity": capacity }))
}

// ---------------------------------------------------------------------------------------------
// Targets

/// One target as `GET /v1/targets` lists it.
#[derive(Serialize)]
pub struct TargetView {
    /// The id used in `/v1/targets/{id}`: the pid.
    pub id: u32,
    pub attached_at_ms: u64,
    #[serde(flatten)]
    pub stats: TargetStats,
}

fn view(entry: &TargetEntry) -> TargetView {
    TargetView { id: entry.target.pid(), attached_at_ms: entry.attached_at_ms, stats: entry.target.stats() }
}

pub(crate) fn list_targets(state: &State) -> Response {
    let mut targets: Vec<TargetView> = state.targets.read().unwrap().values().map(view).collect();
    for t in &mut targets {
        crate::agent::workloads::label_stats(state, std::slice::from_mut(&mut t.stats));
    }
    json_reply(StatusCode::OK, &serde_json::json!({ "targets": targets, "target_files": crate::target_fs::report() }))
}

fn target(state: &State, id: u32) -> Result<Arc<dyn TracedTarget>, ApiError> {
    tracked(state, id).map(|(t, _)| t)
}

/// A target and its trigger and verdict state.
fn tracked(state: &State, id: u32) -> Result<(Arc<dyn TracedTarget>, Arc<Tracking>), ApiError> {
    state
        .targets
        .read()
        .unwrap()
        .get(&id)
        .map(|e| (e.target.clone(), e.tracking.clone()))
        .ok_or_else(|| ApiError::not_found("target_not_found", format!("no target {id}: attach it first")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    pid: u32,
}

pub(crate) async fn attach(state: Arc<State>, p: Principal, body: Bytes) -> Result<Response, ApiError> {
    let result = attach_inner(&state, body).await;
    let detail = result.as_ref().map(|(pid, _)| format!("attached pid {pid}"));
    audit_action(&p, &Method::POST, "/v1/targets", detail.as_deref().map_err(|e| *e));
    result.map(|(_, r)| r)
}

async fn attach_inner(state: &Arc<State>, body: Bytes) -> Result<(u32, Response), ApiError> {
    let AttachBody { pid } = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("bad_body", "expected a JSON body {\"pid\": N}"))?;
    if pid == 0 {
        return Err(ApiError::bad_request("bad_pid", "pid must be a positive number"));
    }
    state.begin_attach(pid)?;
    let result = attach_blocking(state, pid).await;
    state.attaching.lock().unwrap().remove(&pid);
    let target = result?;
    let entry = state.entry(target);
    let v = view(&entry);
    state.targets.write().unwrap().insert(pid, entry);
    Ok((pid, json_reply(StatusCode::CREATED, &v)))
}

async fn attach_blocking(state: &Arc<State>, pid: u32) -> Result<Arc<dyn TracedTarget>, ApiError> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ApiError::not_found("no_such_process", format!("no process {pid}")));
    }
    let attacher = state.attacher.clone();
    with_timeout(
        state,
        limits::exclusive(&state.expensive, move || {
            attacher.attach(pid).map_err(|e| {
                let line = crate::errors::one_line(&e);
                tracing::warn!(pid, error = %line, "attach failed");
                ApiError::internal("attach_failed", format!("attaching to {pid} failed: {line}"))
            })
        }),
    )
    .await
}

pub(crate) fn detach(state: &State, p: Principal, id: u32) -> Result<Response, ApiError> {
    let removed = state.targets.write().unwrap().remove(&id);
    crate::v8::channel::forget(id); // the agent keeps no line into a process it let go
    let route = format!("/v1/targets/{id}");
    let result = match removed {
        Some(_) => Ok(json_reply(StatusCode::OK, &serde_json::json!({ "detached": id }))),
        None => Err(ApiError::not_found("target_not_found", format!("no target {id}"))),
    };
    audit_action(&p, &Method::DELETE, &route, result.as_ref().map(|_| "detached"));
    result
}

pub(crate) async fn heap(state: Arc<State>, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let q = Params::parse(q, &["format", "measure", "min_age"])?;
    let format = q.format(render::Format::Json, &["json", "pprof", "folded", "svg", "text"])?;
    let measure = q.measure("measure")?;
    let min_age = q.min_age()?;
    let t = target(&state, id)?;
    let key = format!("target:{id}|heap|{}|{measure:?}|{}", format.name(), min_age.as_millis());
    expensive(&state, key, move || {
        let p = snapshot_of(&*t, min_age)?;
        render_profile(&p, format, measure)
    })
    .await
}

pub(crate) async fn leaks(state: Arc<State>, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let q = Params::parse(q, &["min_age", "top"])?;
    let min_age = q.min_age()?;
    let top = q.top()?;
    let (t, tracking) = tracked(&state, id)?;
    let key = format!("target:{id}|leaks|{}|{top}", min_age.as_millis());
    expensive(&state, key, move || {
        let p = snapshot_of(&*t, min_age)?;
        let mut json = render::json::leaks_json(&p, Some(top));
        // Verdicts of the target's stored snapshots (read after this snapshot: the newest).
        growth::annotate_leaks_json(&mut json, &tracking.verdicts());
        crate::agent::v8::annotate_leaks(&tracking, top, &mut json);
        json_rendered(&json)
    })
    .await
}

pub(crate) async fn flamegraph(state: Arc<State>, id: u32, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let q = Params::parse(q, &["kind", "min_age"])?;
    let kind = q.measure("kind")?;
    let min_age = q.min_age()?;
    let t = target(&state, id)?;
    let comm = t.stats().comm;
    let key = format!("target:{id}|flamegraph|{kind:?}|{}", min_age.as_millis());
    expensive(&state, key, move || {
        let p = snapshot_of(&*t, min_age)?;
        let title = format!("{comm} (pid {id}): {}", measure_title(kind));
        let svg = render::flamegraph::flamegraph_svg(&p, kind, &title).map_err(render_failed)?;
        Ok(svg_rendered(svg))
    })
    .await
}

fn measure_title(m: Measure) -> &'static str {
    match m {
        Measure::Inuse => "live bytes",
        Measure::Alloc => "bytes allocated since attach",
        Measure::Leaks => "leaked bytes",
    }
}

fn snapshot_of(t: &dyn TracedTarget, min_age: Duration) -> Result<HeapProfile, ApiError> {
    t.snapshot(min_age).map_err(|e| {
        let line = crate::errors::one_line(&e);
        tracing::warn!(pid = t.pid(), error = %line, "snapshot failed");
        ApiError::internal("snapshot_failed", format!("snapshot of {} failed: {line}", t.pid()))
    })
}

// ---------------------------------------------------------------------------------------------
// Snapshots

pub(crate) async fn take_snapshot(
    state: Arc<State>,
    p: Principal,
    id: u32,
    q: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/snapshots");
    let result = take_snapshot_inner(&state, id, q).await;
    audit_action(&p, &Method::POST, &route, result.as_ref().map(|(m, _)| m.id.as_str()));
    result.map(|(_, r)| r)
}

async fn take_snapshot_inner(
    state: &Arc<State>,
    id: u32,
    q: Vec<(String, String)>,
) -> Result<(SnapshotMeta, Response), ApiError> {
    let q = Params::parse(q, &["min_age"])?;
    let min_age = q.min_age()?;
    let (t, tracking) = tracked(state, id)?;
    let st = state.clone();
    let stored = with_timeout(
        state,
        limits::exclusive(&state.expensive, move || {
            let p = snapshot_of(&*t, min_age)?;
            let comm = t.stats().comm;
            let stored = st.store.put_for(&p, &comm, "api", tracking.workload())?;
            triggers::note_snapshot(&st, &tracking, &p, &stored.meta.id, &stored.removed);
            crate::agent::v8::note_snapshot(&st, &tracking, &*t, &stored.meta.id, "api", &stored.removed);
            Ok(stored)
        }),
    )
    .await?;
    if !stored.removed.is_empty() {
        info!(removed = ?stored.removed, "snapshots removed by retention");
    }
    let resp = json_reply(StatusCode::CREATED, &stored.meta);
    Ok((stored.meta, resp))
}

pub(crate) fn list_snapshots(state: &State) -> Response {
    let mut list = state.store.list();
    list.reverse();
    let (count, bytes) = state.store.usage();
    let r = state.store.retention();
    json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "snapshots": list,
            "count": count,
            "bytes": bytes,
            "retention": { "max_count": r.max_count, "max_bytes": r.max_bytes },
        }),
    )
}

fn snapshot_id(s: &str) -> Result<SnapshotId, ApiError> {
    Ok(SnapshotId::parse(s)?)
}

fn load_snapshot(state: &State, id: &SnapshotId) -> Result<HeapProfile, ApiError> {
    Ok(state.store.get(id)?.1)
}

pub(crate) async fn get_snapshot(state: Arc<State>, sid: String, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let id = snapshot_id(&sid)?;
    let q = Params::parse(q, &["format", "measure", "top"])?;
    if q.get("format") == Some("leaks") {
        return snapshot_leaks(state, id, &q).await;
    }
    if q.get("top").is_some() {
        return Err(ApiError::bad_request("bad_top", "top is only for format=leaks"));
    }
    let format = q.format(render::Format::Json, &["json", "pprof", "folded", "svg", "text", "leaks"])?;
    let measure = q.measure("measure")?;
    if state.store.meta(&id).is_none() {
        return Err(ApiError::not_found("snapshot_not_found", format!("no snapshot {id}")));
    }
    let key = format!("snapshot:{id}|{}|{measure:?}", format.name());
    let st = state.clone();
    expensive(&state, key, move || {
        let p = load_snapshot(&st, &id)?;
        render_profile(&p, format, measure)
    })
    .await
}

/// A stored snapshot as a leak report (`leaks.json` plus `id`, `reason`, `taken_at`), its
/// leaks annotated with the verdicts of the target's series when it was taken, and `v8` when
/// a V8 heap summary was stored with it.
async fn snapshot_leaks(state: Arc<State>, id: SnapshotId, q: &Params) -> Result<Response, ApiError> {
    let top = match q.get("top") {
        Some(_) => Some(q.top()?),
        None => None,
    };
    if q.get("measure").is_some() {
        return Err(ApiError::bad_request("bad_measure", "measure is not for format=leaks"));
    }
    let Some(meta) = state.store.meta(&id) else {
        return Err(ApiError::not_found("snapshot_not_found", format!("no snapshot {id}")));
    };
    let key = format!("snapshot:{id}|leaks|{top:?}");
    let st = state.clone();
    expensive(&state, key, move || {
        let p = load_snapshot(&st, &id)?;
        let (verdicts, snapshots) = match st.snapshot_verdicts.lock().unwrap().get(id.as_str()) {
            Some(v) => (v.by_stack(&p), Some(v.snapshots)),
            None => (Default::default(), None),
        };
        let mut json = render::json::leaks_json(&p, top);
        growth::annotate_leaks_json(&mut json, &verdicts);
        if let Some(obj) = json.as_object_mut() {
            // Also when the snapshot has no leaks to annotate.
            obj.insert("verdict_snapshots".into(), serde_json::json!(snapshots));
            obj.insert("id".into(), serde_json::json!(meta.id));
            obj.insert("reason".into(), serde_json::json!(meta.reason));
            obj.insert("taken_at".into(), serde_json::json!(crate::trigger::rfc3339_utc(meta.taken_at_ms)));
        }
        crate::agent::v8::annotate_stored_leaks(&st, id.as_str(), top.unwrap_or(DEFAULT_TOP), &mut json);
        json_rendered(&json)
    })
    .await
}

pub(crate) fn delete_snapshot(state: &State, p: Principal, sid: String) -> Result<Response, ApiError> {
    let result = snapshot_id(&sid).and_then(|id| Ok(state.store.delete(&id)?));
    if let Ok(meta) = &result {
        state.snapshot_verdicts.lock().unwrap().remove(&meta.id);
    }
    let route = format!("/v1/snapshots/{}", truncate(&sid));
    audit_action(&p, &Method::DELETE, &route, result.as_ref().map(|_| "deleted"));
    result.map(|m| json_reply(StatusCode::OK, &serde_json::json!({ "deleted": m.id })))
}

pub(crate) async fn diff(
    state: Arc<State>,
    a: String,
    b: String,
    q: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let (a, b) = (snapshot_id(&a)?, snapshot_id(&b)?);
    let q = Params::parse(q, &["format", "measure", "top"])?;
    let format = q.format(render::Format::Json, &["svg", "json", "folded"])?;
    let measure = q.measure("measure")?;
    let top = q.top()?;
    for id in [&a, &b] {
        if state.store.meta(id).is_none() {
            return Err(ApiError::not_found("snapshot_not_found", format!("no snapshot {id}")));
        }
    }
    let key = format!("diff:{a}:{b}|{}|{measure:?}|{top}", format.name());
    let st = state.clone();
    expensive(&state, key, move || {
        let before = load_snapshot(&st, &a)?;
        let after = load_snapshot(&st, &b)?;
        match format {
            render::Format::Svg => {
                let title = format!("growth from {a} to {b}: {}", measure_title(measure));
                let svg = render::flamegraph::diff_flamegraph_svg(&before, &after, measure, &title)
                    .map_err(render_failed)?;
                Ok(svg_rendered(svg))
            }
            render::Format::Folded => {
                let folded = render::json::diff_folded(&before, &after, measure);
                Ok(Rendered { content_type: "text/plain; charset=utf-8", body: Bytes::from(folded), status: 200 })
            }
            _ => {
                let mut json = render::json::diff_json(&before, &after, Some(top));
                crate::agent::v8::annotate_diff(&st, a.as_str(), b.as_str(), top, &mut json);
                json_rendered(&json)
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Triggers

/// Most specs in one `POST /v1/targets/{id}/triggers`.
const MAX_SPECS_PER_REQUEST: usize = 16;
/// Longest `min_spacing` accepted.
const MAX_MIN_SPACING: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggersBody {
    spec: Option<String>,
    specs: Option<Vec<String>>,
    min_spacing: Option<String>,
    /// `PCT%[/WINDOW]`: the pause budget of these triggers (see [`crate::pause`]).
    pause_budget: Option<String>,
}

/// What a `POST /v1/targets/{id}/triggers` body asks for.
struct TriggersRequest {
    specs: Vec<TriggerSpec>,
    min_spacing: Duration,
    pause_budget: Option<crate::pause::PauseBudget>,
}

/// The specs and spacing of a `POST /v1/targets/{id}/triggers` body.
fn parse_triggers_body(state: &State, body: &[u8]) -> Result<TriggersRequest, ApiError> {
    triggers_body(body, state.trigger_settings.min_spacing)
}

fn triggers_body(body: &[u8], default_spacing: Duration) -> Result<TriggersRequest, ApiError> {
    let shape = "expected a JSON body {\"spec\": \"every=30s\"} or {\"specs\": [\"gc\", \"growth=20%\"]}, optionally with \"min_spacing\": \"5s\"";
    let b: TriggersBody = serde_json::from_slice(body).map_err(|_| ApiError::bad_request("bad_body", shape))?;
    let raw = match (b.spec, b.specs) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() && many.len() <= MAX_SPECS_PER_REQUEST => many,
        (None, Some(_)) => {
            return Err(ApiError::bad_request("bad_body", format!("\"specs\" takes 1 to {MAX_SPECS_PER_REQUEST} triggers")))
        }
        _ => return Err(ApiError::bad_request("bad_body", shape)),
    };
    let mut specs: Vec<TriggerSpec> = Vec::with_capacity(raw.len());
    for r in &raw {
        let spec: TriggerSpec = r.parse().map_err(|e: String| ApiError::bad_request("bad_trigger", truncate_line(&e)))?;
        if specs.contains(&spec) {
            return Err(ApiError::bad_request("bad_trigger", format!("trigger {} is given twice", spec.describe())));
        }
        specs.push(spec);
    }
    let min_spacing = match b.min_spacing.as_deref() {
        None => default_spacing,
        Some(v) => {
            let d = crate::units::parse_duration(v).map_err(|_| {
                ApiError::bad_request("bad_min_spacing", format!("invalid min_spacing {:?} (use e.g. 500ms, 5s)", truncate(v)))
            })?;
            if d > MAX_MIN_SPACING {
                return Err(ApiError::bad_request("bad_min_spacing", "min_spacing longer than a day"));
            }
            d
        }
    };
    let pause_budget = match b.pause_budget.as_deref() {
        None => None,
        Some(v) => Some(crate::pause::PauseBudget::parse(v).map_err(|e| ApiError::bad_request("bad_pause_budget", truncate_line(&e)))?),
    };
    Ok(TriggersRequest { specs, min_spacing, pause_budget })
}

/// A client's message, at most 200 characters.
fn truncate_line(s: &str) -> String {
    s.chars().take(200).collect()
}

pub(crate) async fn list_triggers(state: Arc<State>, id: u32) -> Result<Response, ApiError> {
    let (t, tracking) = tracked(&state, id)?;
    // Waits while a poll of the target runs: off the async threads.
    let views = with_timeout(&state, async move {
        tokio::task::spawn_blocking(move || tracking.views())
            .await
            .map_err(|_| ApiError::internal("internal", "listing the triggers failed; see the agent's log"))
    })
    .await?;
    let alive = t.trigger_host().map(|h| h.alive());
    Ok(json_reply(StatusCode::OK, &serde_json::json!({ "id": id, "alive": alive, "triggers": views })))
}

pub(crate) async fn add_triggers(state: Arc<State>, p: Principal, id: u32, body: Bytes) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/triggers");
    let result = add_triggers_inner(&state, id, body).await;
    let detail = result.as_ref().map(|(ids, _)| format!("added triggers {ids:?}"));
    audit_action(&p, &Method::POST, &route, detail.as_deref().map_err(|e| *e));
    result.map(|(_, r)| r)
}

async fn add_triggers_inner(state: &Arc<State>, id: u32, body: Bytes) -> Result<(Vec<u64>, Response), ApiError> {
    let (t, tracking) = tracked(state, id)?;
    let TriggersRequest { specs, min_spacing, pause_budget } = parse_triggers_body(state, &body)?;
    let st = state.clone();
    let views = with_timeout(
        state,
        limits::exclusive(&state.expensive, move || {
            triggers::attach(&st, &*t, &tracking, &specs, min_spacing, triggers::Origin::Api, pause_budget).map_err(|e| {
                let msg = truncate_line(&e.to_string());
                match e {
                    triggers::AttachError::Unsupported(_) => ApiError::conflict("triggers_unsupported", msg),
                    triggers::AttachError::Exited(_) => ApiError::conflict("target_exited", msg),
                    triggers::AttachError::TooMany(_) => ApiError::conflict("too_many_triggers", msg),
                    triggers::AttachError::Exists { .. } => ApiError::conflict("trigger_exists", msg),
                    triggers::AttachError::Failed(_) => ApiError::bad_request("trigger_failed", msg),
                }
            })
        }),
    )
    .await?;
    let ids: Vec<u64> = views.iter().map(|v| v.id).collect();
    let resp = json_reply(StatusCode::CREATED, &serde_json::json!({ "ids": ids, "triggers": views }));
    Ok((ids, resp))
}

pub(crate) async fn delete_trigger(state: Arc<State>, p: Principal, id: u32, tid: u64) -> Result<Response, ApiError> {
    let route = format!("/v1/targets/{id}/triggers/{tid}");
    let result = async {
        let (_, tracking) = tracked(&state, id)?;
        let removed = with_timeout(&state, async move {
            tokio::task::spawn_blocking(move || tracking.remove(tid))
                .await
                .map_err(|_| ApiError::internal("internal", "deleting the trigger failed; see the agent's log"))
        })
        .await?;
        if !removed {
            return Err(ApiError::not_found("trigger_not_found", format!("target {id} has no trigger {tid}")));
        }
        Ok(json_reply(StatusCode::OK, &serde_json::json!({ "deleted": tid })))
    }
    .await;
    audit_action(&p, &Method::DELETE, &route, result.as_ref().map(|_| "deleted"));
    result
}

// ---------------------------------------------------------------------------------------------
// Metrics and documents

pub(crate) fn metrics(state: &State) -> Response {
    let stats = crate::agent::workloads::metric_stats(state);
    let mut text = state.metrics.render(&stats, state.store.usage(), state.flights.in_flight());
    text.push_str(&crate::agent::workloads::push_metrics(state));
    text.push_str(&crate::agent::workloads::node_metrics(state));
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

pub(crate) fn openapi() -> Response {
    let mut resp = Response::new(Body::from(super::routes::OPENAPI));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// For `crate::fuzzing`: query parameters as the API parses them, every accessor.
#[doc(hidden)]
pub(crate) fn fuzz_params(raw: Vec<(String, String)>) {
    if let Ok(p) = Params::parse(raw, &["min_age", "top", "format", "measure"]) {
        let _ = p.format(render::Format::Json, &["json", "svg", "pprof", "folded", "text"]);
        let _ = p.measure("measure");
        let _ = p.min_age();
        let _ = p.top();
    }
}

/// For `crate::fuzzing`: request bodies (attach, triggers) as the API parses them.
#[doc(hidden)]
pub(crate) fn fuzz_bodies(body: &[u8]) {
    let _ = serde_json::from_slice::<AttachBody>(body);
    let _ = triggers_body(body, Duration::from_secs(5));
}
