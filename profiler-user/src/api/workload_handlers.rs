//! The routes of selectors and workloads (`/v1/selectors`, `/v1/workloads`): parse, check,
//! call the agent's workload registry ([`crate::agent::workloads`]), answer. A workload's
//! heap, leaks and flamegraph are those of the process it is traced as now.
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use warp::{
    http::{Method, StatusCode},
    reply::Response,
};

use super::{
    auth::Principal,
    errors::ApiError,
    handlers::{self, audit_action, json_reply},
    State,
};
use crate::{
    agent::workloads::{Workloads, MAX_SELECTORS},
    discover::Selector,
    workload::{self, SelectorEntry, SelectorFileError, Workload},
};

/// Saving the selectors failed: nothing changed.
fn save_error(e: SelectorFileError) -> ApiError {
    match e.io_kind() {
        Some(std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage_full",
            "the data directory is full: the selectors were not saved and nothing changed; free space",
        ),
        Some(std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_read_only",
            "the data directory is not writable: the selectors were not saved and nothing changed",
        ),
        _ => ApiError::internal("store_failed", "saving the selectors failed; see the agent's log"),
    }
}

fn workloads(state: &State) -> Result<&Arc<Workloads>, ApiError> {
    state.workloads.get().ok_or_else(|| ApiError::not_found("no_workloads", "this agent has no workload registry"))
}

pub(crate) fn list_selectors(state: &State) -> Response {
    let views = state.workloads.get().map(|w| w.selector_views()).unwrap_or_default();
    json_reply(StatusCode::OK, &serde_json::json!({ "selectors": views }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorBody {
    select: String,
}

pub(crate) async fn add_selector(state: Arc<State>, p: Principal, body: Bytes) -> Result<Response, ApiError> {
    let result = add_selector_inner(&state, &body).await;
    let detail = result.as_ref().map(|(id, _)| format!("added selector {id}"));
    audit_action(&p, &Method::POST, "/v1/selectors", detail.as_deref().map_err(|e| *e));
    result.map(|(_, r)| r)
}

async fn add_selector_inner(state: &Arc<State>, body: &[u8]) -> Result<(String, Response), ApiError> {
    let w = workloads(state)?.clone();
    let b: SelectorBody = serde_json::from_slice(body).map_err(|_| {
        ApiError::bad_request("bad_body", "expected a JSON body {\"select\": \"comm=GLOB,exe=GLOB,...\"}")
    })?;
    let selector =
        Selector::parse(&b.select).map_err(|e| ApiError::bad_request("bad_selector", e.to_string().chars().take(200).collect::<String>()))?;
    let id = selector.id();
    {
        let mut sels = w.selectors.lock().unwrap();
        if sels.iter().any(|e| e.selector.id() == id) {
            return Err(ApiError::conflict("selector_exists", format!("selector {id} already exists")));
        }
        if sels.len() >= MAX_SELECTORS {
            return Err(ApiError::conflict("too_many_selectors", format!("at most {MAX_SELECTORS} selectors")));
        }
        sels.push(SelectorEntry { selector: selector.clone(), origin: "api" });
        if let Err(e) = w.save(&sels) {
            sels.pop();
            return Err(save_error(e));
        }
    }
    info!(selector = %selector.expr, id = %id, "selector added");
    Workloads::start_watching(&state.agent).map_err(|e| {
        let line = crate::errors::one_line(&e);
        warn!(error = %line, "starting the process watcher failed");
        ApiError::internal("watch_failed", format!("watching processes failed: {line}"))
    })?;
    let st = state.agent.clone();
    drop(tokio::task::spawn_blocking(move || Workloads::scan(&st)));
    let view = w.selector_views().into_iter().find(|v| v.id == id);
    Ok((id, json_reply(StatusCode::CREATED, &view)))
}

pub(crate) fn delete_selector(state: &State, p: Principal, sid: String) -> Result<Response, ApiError> {
    let route = format!("/v1/selectors/{}", sid.chars().take(64).collect::<String>());
    let result = (|| {
        let w = workloads(state)?;
        let mut sels = w.selectors.lock().unwrap();
        let Some(i) = sels.iter().position(|e| e.selector.id() == sid) else {
            return Err(ApiError::not_found("selector_not_found", format!("no selector {}", sid.chars().take(64).collect::<String>())));
        };
        let removed = sels.remove(i);
        if let Err(e) = w.save(&sels) {
            sels.insert(i, removed);
            return Err(save_error(e));
        }
        drop(sels);
        // Its workloads are detached and leave the list (their stored snapshots stay, under
        // retention, at /v1/workloads/{id}/snapshots).
        let (ids, detached) = w.remove_workloads_of(state, &sid);
        Ok(json_reply(StatusCode::OK, &serde_json::json!({ "deleted": sid, "detached": detached, "removed_workloads": ids })))
    })();
    audit_action(&p, &Method::DELETE, &route, result.as_ref().map(|_| "deleted"));
    result
}

/// One workload as `GET /v1/workloads` lists it.
#[derive(Serialize)]
struct WorkloadView {
    #[serde(flatten)]
    workload: Workload,
    /// `attached`, `waiting` (for a target slot), `failed` or `exited`.
    state: &'static str,
    /// Its place in the capacity queue (0: attached next) while it waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_position: Option<usize>,
    /// The live figures of its current process (as `/v1/targets`), when attached.
    stats: Option<crate::target::TargetStats>,
    /// Snapshots stored under it.
    snapshots: usize,
}

pub(crate) fn list_workloads(state: &State) -> Response {
    let list = state.workloads.get().map(|w| w.list()).unwrap_or_default();
    let positions = state.workloads.get().map(|w| w.queue_positions()).unwrap_or_default();
    let metas = state.store.list();
    let views: Vec<WorkloadView> = list
        .into_iter()
        .map(|w| {
            let stats = w.pid.and_then(|p| state.targets.read().unwrap().get(&p).map(|e| e.target.stats()));
            let snapshots = metas.iter().filter(|m| m.workload.as_deref() == Some(&w.id)).count();
            WorkloadView { state: w.state(), queue_position: positions.get(&w.id).copied(), workload: w, stats, snapshots }
        })
        .collect();
    json_reply(StatusCode::OK, &serde_json::json!({ "workloads": views }))
}

/// The pid a workload is traced as now: 404 for an unknown workload, 409 between processes.
fn attached_pid(state: &State, id: &str) -> Result<u32, ApiError> {
    if !workload::valid_id(id) {
        return Err(ApiError::bad_request("bad_workload_id", "invalid workload id"));
    }
    let (pid, _) = workloads(state)?
        .current(id)
        .ok_or_else(|| ApiError::not_found("workload_not_found", format!("no workload {id}")))?;
    let pid = pid.ok_or_else(|| ApiError::conflict("workload_not_attached", format!("workload {id} has no process traced now")))?;
    if !state.targets.read().unwrap().contains_key(&pid) {
        return Err(ApiError::conflict("workload_not_attached", format!("workload {id} is being attached")));
    }
    Ok(pid)
}

pub(crate) async fn heap(state: Arc<State>, id: String, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let pid = attached_pid(&state, &id)?;
    handlers::heap(state, pid, q).await
}

pub(crate) async fn leaks(state: Arc<State>, id: String, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let pid = attached_pid(&state, &id)?;
    handlers::leaks(state, pid, q).await
}

pub(crate) async fn flamegraph(state: Arc<State>, id: String, q: Vec<(String, String)>) -> Result<Response, ApiError> {
    let pid = attached_pid(&state, &id)?;
    handlers::flamegraph(state, pid, q).await
}

pub(crate) fn snapshots(state: &State, id: String) -> Result<Response, ApiError> {
    if !workload::valid_id(&id) {
        return Err(ApiError::bad_request("bad_workload_id", "invalid workload id"));
    }
    let known = workloads(state)?.current(&id).is_some();
    let list: Vec<_> = state.store.list().into_iter().filter(|m| m.workload.as_deref() == Some(id.as_str())).collect();
    if !known && list.is_empty() {
        return Err(ApiError::not_found("workload_not_found", format!("no workload {id}")));
    }
    Ok(json_reply(StatusCode::OK, &serde_json::json!({ "id": id, "snapshots": list })))
}
