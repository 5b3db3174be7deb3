//! The router: warp filters only, no logic. Order of checks on a request:
//! health checks first (never behind a limit, never behind a token); then the body size (by
//! Content-Length) and the global rate limit; then the path and method; only after the route
//! matched, the token (per-IP failure limit, constant-time check, per-token limit, role); then
//! query and body (16 KiB at most, also without Content-Length); then the handler. One
//! [`super::errors::recover`] turns every rejection into a JSON error, and every answer is
//! counted in the metrics by route template and status.
//!
//! [`ROUTES`] lists every route; the OpenAPI document [`OPENAPI`] (`profiler-user/openapi.json`)
//! must describe exactly these (a test checks both directions, and that the router serves
//! each of them).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use warp::{
    http::{header, HeaderMap, Method},
    path::FullPath,
    reply::Response,
    Filter, Rejection, Reply,
};

use super::{auth::Role, errors::ApiError, handlers, workload_handlers as workloads, State};

/// Every route the agent serves, as `(method, path template)`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/targets"),
    ("POST", "/v1/targets"),
    ("DELETE", "/v1/targets/{id}"),
    ("GET", "/v1/targets/{id}/heap"),
    ("GET", "/v1/targets/{id}/leaks"),
    ("GET", "/v1/targets/{id}/flamegraph.svg"),
    ("POST", "/v1/targets/{id}/snapshots"),
    ("GET", "/v1/targets/{id}/triggers"),
    ("POST", "/v1/targets/{id}/triggers"),
    ("DELETE", "/v1/targets/{id}/triggers/{tid}"),
    ("GET", "/v1/snapshots"),
    ("GET", "/v1/snapshots/{sid}"),
    ("DELETE", "/v1/snapshots/{sid}"),
    ("GET", "/v1/snapshots/{a}/diff/{b}"),
    ("GET", "/v1/selectors"),
    ("POST", "/v1/selectors"),
    ("DELETE", "/v1/selectors/{sid}"),
    ("GET", "/v1/workloads"),
    ("GET", "/v1/workloads/{wid}/heap"),
    ("GET", "/v1/workloads/{wid}/leaks"),
    ("GET", "/v1/workloads/{wid}/flamegraph.svg"),
    ("GET", "/v1/workloads/{wid}/snapshots"),
    ("GET", "/v1/targets/{id}/v8/heap-snapshot"),
    ("GET", "/v1/targets/{id}/v8/heap-profile"),
    ("GET", "/v1/targets/{id}/v8/threads"),
    ("GET", "/v1/targets/{id}/v8/summary"),
    ("POST", "/v1/targets/{id}/actions/gc"),
    ("POST", "/v1/targets/{id}/actions/eval"),
];

/// The OpenAPI 3 document describing [`ROUTES`].
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The peer address of a connection accepted by [`super::tls::incoming`], put into each
/// request's extensions (warp's own remote address is not available over a custom listener).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

fn with_state(state: Arc<State>) -> impl Filter<Extract = (Arc<State>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The client's address: from our listener, else from warp (tests set it).
fn peer() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerAddr>()
        .and(warp::addr::remote())
        .map(|ours: Option<PeerAddr>, warps: Option<SocketAddr>| ours.map(|p| p.0).or(warps))
}

fn reject(e: ApiError) -> Rejection {
    warp::reject::custom(e)
}

/// Authenticates and authorizes; extracts the principal.
fn authed(
    state: Arc<State>,
    needed: Role,
) -> impl Filter<Extract = (super::auth::Principal,), Error = Rejection> + Clone {
    with_state(state)
        .and(warp::header::headers_cloned())
        .and(peer())
        .and(warp::method())
        .and(warp::path::full())
        .and_then(move |state: Arc<State>, headers: HeaderMap, peer, method: Method, path: FullPath| async move {
            let authz = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            handlers::authorize(&state, authz, peer, &method, path.as_str(), needed).map_err(reject)
        })
}

/// The body, at most `limit` bytes, with or without Content-Length, within `timeout`.
fn body(limit: u64, timeout: std::time::Duration) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::body::stream().and_then(move |s| async move {
        match tokio::time::timeout(timeout, collect_limited(s, limit)).await {
            Ok(r) => r.map_err(reject),
            Err(_) => Err(reject(ApiError::bad_request("body_timeout", "the request body arrived too slowly"))),
        }
    })
}

/// Collects a body stream, refusing (413) as soon as it grows past `limit`.
pub(crate) async fn collect_limited<S, B>(s: S, limit: u64) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    futures_util::pin_mut!(s);
    let mut out = BytesMut::new();
    while let Some(chunk) = s.next().await {
        let mut chunk = chunk.map_err(|_| ApiError::bad_request("bad_body", "could not read the request body"))?;
        if out.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(ApiError::too_large(limit));
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            let n = piece.len();
            out.extend_from_slice(piece);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

fn query() -> impl Filter<Extract = (Vec<(String, String)>,), Error = Rejection> + Clone {
    warp::query::<Vec<(String, String)>>()
}

type Handled = Result<Response, Rejection>;

fn done(r: Result<Response, ApiError>) -> Handled {
    r.map_err(reject)
}

/// The whole API: routes, limits, error recovery, metrics and common headers.
pub fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone + Send + Sync + 'static {
    let body_bytes = state.limits.body_bytes;
    let body_timeout = state.limits.header_read_timeout;
    let s = state.clone();
    let st = move || with_state(s.clone());
    let a = state.clone();
    let auth = move |role| authed(a.clone(), role);

    // Health checks: no token, no data, no limits.
    let healthz = warp::path!("healthz").and(warp::get()).map(handlers::healthz).boxed();
    let readyz = warp::path!("readyz").and(warp::get()).and(st()).map(|s: Arc<State>| handlers::readyz(&s)).boxed();

    let openapi = warp::path!("v1" / "openapi.json").and(warp::get()).map(handlers::openapi).boxed();
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .map(|_p, s: Arc<State>| handlers::metrics(&s))
        .boxed();

    let list_targets = warp::path!("v1" / "targets")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .map(|_p, s: Arc<State>| handlers::list_targets(&s))
        .boxed();
    let attach = warp::path!("v1" / "targets")
        .and(warp::post())
        .and(auth(Role::Admin))
        .and(st())
        .and(body(body_bytes, body_timeout))
        .and_then(|p, s, b| async move { done(handlers::attach(s, p, b).await) })
        .boxed();
    let detach = warp::path!("v1" / "targets" / u32)
        .and(warp::delete())
        .and(auth(Role::Admin))
        .and(st())
        .and_then(|id, p, s: Arc<State>| async move { done(handlers::detach(&s, p, id)) })
        .boxed();
    let heap = warp::path!("v1" / "targets" / u32 / "heap")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(handlers::heap(s, id, q).await) })
        .boxed();
    let leaks = warp::path!("v1" / "targets" / u32 / "leaks")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(handlers::leaks(s, id, q).await) })
        .boxed();
    let flamegraph = warp::path!("v1" / "targets" / u32 / "flamegraph.svg")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(handlers::flamegraph(s, id, q).await) })
        .boxed();
    let take_snapshot = warp::path!("v1" / "targets" / u32 / "snapshots")
        .and(warp::post())
        .and(auth(Role::Admin))
        .and(st())
        .and(query())
        .and(body(body_bytes, body_timeout))
        .and_then(|id, p, s, q, _body: Bytes| async move { done(handlers::take_snapshot(s, p, id, q).await) })
        .boxed();
    let list_triggers = warp::path!("v1" / "targets" / u32 / "triggers")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and_then(|id, _p, s| async move { done(handlers::list_triggers(s, id).await) })
        .boxed();
    let add_triggers = warp::path!("v1" / "targets" / u32 / "triggers")
        .and(warp::post())
        .and(auth(Role::Admin))
        .and(st())
        .and(body(body_bytes, body_timeout))
        .and_then(|id, p, s, b| async move { done(handlers::add_triggers(s, p, id, b).await) })
        .boxed();
    let delete_trigger = warp::path!("v1" / "targets" / u32 / "triggers" / u64)
        .and(warp::delete())
        .and(auth(Role::Admin))
        .and(st())
        .and_then(|id, tid, p, s| async move { done(handlers::delete_trigger(s, p, id, tid).await) })
        .boxed();
    let list_snapshots = warp::path!("v1" / "snapshots")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .map(|_p, s: Arc<State>| handlers::list_snapshots(&s))
        .boxed();
    let get_snapshot = warp::path!("v1" / "snapshots" / String)
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|sid, _p, s, q| async move { done(handlers::get_snapshot(s, sid, q).await) })
        .boxed();
    let delete_snapshot = warp::path!("v1" / "snapshots" / String)
        .and(warp::delete())
        .and(auth(Role::Admin))
        .and(st())
        .and_then(|sid, p, s: Arc<State>| async move { done(handlers::delete_snapshot(&s, p, sid)) })
        .boxed();
    let diff = warp::path!("v1" / "snapshots" / String / "diff" / String)
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|a, b, _p, s, q| async move { done(handlers::diff(s, a, b, q).await) })
        .boxed();

    let v8_snapshot = warp::path!("v1" / "targets" / u32 / "v8" / "heap-snapshot")
        .and(warp::get())
        .and(auth(Role::Admin))
        .and(st())
        .and(query())
        .and_then(|id, p, s, q| async move { done(super::v8::heap_snapshot(s, p, id, q).await) })
        .boxed();
    let v8_profile = warp::path!("v1" / "targets" / u32 / "v8" / "heap-profile")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, p, s, q| async move { done(super::v8::heap_profile(s, p, id, q).await) })
        .boxed();
    let v8_threads = warp::path!("v1" / "targets" / u32 / "v8" / "threads")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and_then(|id, p, s| async move { done(super::v8::threads(s, p, id).await) })
        .boxed();
    let v8_summary = warp::path!("v1" / "targets" / u32 / "v8" / "summary")
        .and(warp::get())
        .and(auth(Role::Admin))
        .and(st())
        .and(query())
        .and_then(|id, p, s, q| async move { done(super::v8::summary(s, p, id, q).await) })
        .boxed();
    let v8_gc = warp::path!("v1" / "targets" / u32 / "actions" / "gc")
        .and(warp::post())
        .and(auth(Role::Admin))
        .and(st())
        .and(body(body_bytes, body_timeout))
        .and_then(|id, p, s, _b: Bytes| async move { done(super::v8::gc(s, p, id).await) })
        .boxed();
    let v8_eval = warp::path!("v1" / "targets" / u32 / "actions" / "eval")
        .and(warp::post())
        .and(auth(Role::Eval))
        .and(st())
        .and(body(body_bytes, body_timeout))
        .and_then(|id, p, s, b| async move { done(super::v8::eval(s, p, id, b).await) })
        .boxed();

    let list_selectors = warp::path!("v1" / "selectors")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .map(|_p, s: Arc<State>| workloads::list_selectors(&s))
        .boxed();
    let add_selector = warp::path!("v1" / "selectors")
        .and(warp::post())
        .and(auth(Role::Admin))
        .and(st())
        .and(body(body_bytes, body_timeout))
        .and_then(|p, s, b| async move { done(workloads::add_selector(s, p, b).await) })
        .boxed();
    let delete_selector = warp::path!("v1" / "selectors" / String)
        .and(warp::delete())
        .and(auth(Role::Admin))
        .and(st())
        .and_then(|sid, p, s: Arc<State>| async move { done(workloads::delete_selector(&s, p, sid)) })
        .boxed();
    let list_workloads = warp::path!("v1" / "workloads")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .map(|_p, s: Arc<State>| workloads::list_workloads(&s))
        .boxed();
    let workload_heap = warp::path!("v1" / "workloads" / String / "heap")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(workloads::heap(s, id, q).await) })
        .boxed();
    let workload_leaks = warp::path!("v1" / "workloads" / String / "leaks")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(workloads::leaks(s, id, q).await) })
        .boxed();
    let workload_flamegraph = warp::path!("v1" / "workloads" / String / "flamegraph.svg")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and(query())
        .and_then(|id, _p, s, q| async move { done(workloads::flamegraph(s, id, q).await) })
        .boxed();
    let workload_snapshots = warp::path!("v1" / "workloads" / String / "snapshots")
        .and(warp::get())
        .and(auth(Role::Read))
        .and(st())
        .and_then(|id, _p, s: Arc<State>| async move { done(workloads::snapshots(&s, id)) })
        .boxed();
    let node = list_selectors
        .or(add_selector)
        .unify()
        .or(delete_selector)
        .unify()
        .or(list_workloads)
        .unify()
        .or(workload_heap)
        .unify()
        .or(workload_leaks)
        .unify()
        .or(workload_flamegraph)
        .unify()
        .or(workload_snapshots)
        .unify()
        .boxed();

    let api = openapi
        .or(metrics)
        .unify()
        .or(list_targets)
        .unify()
        .or(attach)
        .unify()
        .or(detach)
        .unify()
        .or(heap)
        .unify()
        .or(leaks)
        .unify()
        .or(flamegraph)
        .unify()
        .or(take_snapshot)
        .unify()
        .or(list_triggers)
        .unify()
        .or(add_triggers)
        .unify()
        .or(delete_trigger)
        .unify()
        .or(list_snapshots)
        .unify()
        .or(get_snapshot)
        .unify()
        .or(delete_snapshot)
        .unify()
        .or(diff)
        .unify()
        .or(v8_snapshot)
        .unify()
        .or(v8_profile)
        .unify()
        .or(v8_threads)
        .unify()
        .or(v8_summary)
        .unify()
        .or(v8_gc)
        .unify()
        .or(v8_eval)
        .unify()
        .or(node)
        .unify()
        .boxed();

    // The token first, then the one budget the request draws from (see handlers::precheck).
    let precheck = st()
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::headers_cloned())
        .and(peer())
        .and(warp::method())
        .and(warp::path::full())
        .and_then(|s: Arc<State>, len, headers: HeaderMap, peer, m: Method, p: FullPath| async move {
            let authz = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            handlers::precheck(&s, len, authz, peer, &m, p.as_str()).map_err(reject)
        })
        .untuple_one();

    let m = state.clone();
    healthz
        .or(readyz)
        .unify()
        .or(precheck.and(api))
        .unify()
        .recover(super::errors::recover)
        .unify()
        .map(common_headers)
        .with(warp::log::custom(move |info| m.metrics.observe(info.method(), info.path(), info.status())))
}

/// Headers on every answer: nothing is cached, nothing is sniffed.
fn common_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    resp
}
