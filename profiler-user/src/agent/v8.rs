//! The V8 heap summaries the agent stores with snapshots (`--v8-summaries`, and near the heap
//! limit for the `heap_limit` trigger): taken in a pause window of the target ([`super::pauses`]),
//! added to the target's series of summaries ([`super::triggers::Tracking`]), kept with their
//! verdicts beside the snapshot (`DATA_DIR/v8/ID.json`), and read back to annotate diffs and
//! leak reports. The routes that open inspector sessions on request are [`crate::api::v8`]'s.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{triggers::Tracking, State};
use crate::{
    aggregate::growth::{Trend, Verdict},
    target::TracedTarget,
    v8::{growth as v8_growth, heap_limit::HeapUsage, summary::HeapSummary, Budget, Inspector},
};


/// Where the summary stored with snapshot `id` is kept: beside the snapshots, in `v8/`.
fn summary_path(state: &State, id: &str) -> std::path::PathBuf {
    state.store.dir().join("v8").join(format!("{id}.json"))
}

/// A V8 heap summary as stored beside snapshot `ID` (`DATA_DIR/v8/ID.json`): the summary,
/// plus the verdicts of the target's series of summaries when it was stored (absent in files
/// written before verdicts existed).
#[derive(Serialize, Deserialize)]
struct StoredSummary {
    #[serde(flatten)]
    summary: HeapSummary,
    #[serde(default)]
    verdicts: HashMap<String, Verdict>,
    /// V8's used heap and limit when it was taken (summaries of the `heap_limit` trigger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heap: Option<HeapUsage>,
}

/// Whether a snapshot stored for target `pid` gets a V8 heap summary (`--v8-summaries` and a
/// target that handles SIGUSR1): then storing it pauses the target.
pub(crate) fn would_summarize(state: &State, pid: u32) -> bool {
    state.v8_summaries.load(std::sync::atomic::Ordering::Relaxed) && crate::v8::inspector::catches_signal(pid, libc::SIGUSR1).unwrap_or(false)
}

/// After a snapshot of target `pid` was stored as `id` (by the API or a trigger, with its
/// reason): with `--v8-summaries` and a target that handles SIGUSR1 (Node.js), also takes a V8
/// heap snapshot, summarizes it as it streams, adds it to the target's series of summaries
/// (`tracking`) and keeps it with the series' verdicts beside the snapshot; drops the summaries
/// of snapshots the store `removed`. Blocking. Failures are logged, not fatal.
pub(crate) fn note_snapshot(state: &State, tracking: &Tracking, target: &dyn TracedTarget, id: &str, reason: &str, removed: &[String]) {
    for r in removed {
        let _ = std::fs::remove_file(summary_path(state, r));
    }
    if !state.v8_summaries.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    // The process attached, not whatever has its pid now: read, then check it still runs.
    let Some(process) = target.process() else { return };
    let pid = process.pid();
    let catches = crate::v8::inspector::catches_signal(pid, libc::SIGUSR1).unwrap_or(false);
    if !process.alive() || !catches {
        return;
    }
    let path = summary_path(state, id);
    let budget = Budget::new(state.request_timeout);
    let pause = super::pauses::begin(state, pid);
    let summary = crate::v8::summary_keeping_ids(&process, false, reason, budget);
    drop(pause);
    let result = summary.map_err(|e| e.to_string()).and_then(|summary| {
        let (verdicts, summaries) = tracking.note_v8_summary(&summary);
        let stored = StoredSummary { summary, verdicts, heap: None };
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".{id}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&stored).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        let growing = stored.verdicts.values().filter(|v| v.verdict == Trend::Growing).count();
        Ok((stored.summary.constructors.len(), summaries, growing))
    });
    match result {
        Ok((n, summaries, growing)) => info!(pid, id, reason, constructors = n, summaries, growing, "V8 heap summary stored"),
        Err(e) => tracing::warn!(pid, id, reason, error = %e, "V8 heap summary failed"),
    }
}

/// After a `heap_limit` trigger's snapshot of `target` was stored as `id`: reads V8's used
/// heap and limit and takes a V8 heap summary in one inspector session (whether or not the
/// agent runs with `--v8-summaries`), adds the summary to the target's series and keeps it,
/// with the heap figures, beside the snapshot. Blocking; failures are logged.
pub(crate) fn note_heap_limit(state: &State, tracking: &Tracking, target: &dyn TracedTarget, id: &str, reason: &str, removed: &[String]) {
    for r in removed {
        let _ = std::fs::remove_file(summary_path(state, r));
    }
    // The process attached, never whatever has its pid now.
    let Some(process) = target.process() else {
        tracing::warn!(pid = target.pid(), id, reason, "V8 heap summary near the heap limit skipped: the target is not held by identity");
        return;
    };
    let pid = process.pid();
    let path = summary_path(state, id);
    let budget = Budget::new(state.request_timeout);
    let taken = Inspector::open(process, &format!("trigger {reason}: summary"), budget).and_then(|mut insp| {
        let heap = crate::v8::heap_limit::read(&mut insp)?;
        let summary = crate::v8::summary_with(&mut insp, false, reason)?;
        insp.close()?;
        Ok((heap, summary))
    });
    let result = taken.map_err(|e| e.to_string()).and_then(|(heap, summary)| {
        let (verdicts, _) = tracking.note_v8_summary(&summary);
        let stored = StoredSummary { summary, verdicts, heap: Some(heap) };
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".{id}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&stored).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(heap)
    });
    match result {
        Ok(h) => info!(pid, id, used = h.used, limit = h.limit, percent = h.percent(), "V8 heap summary near the heap limit stored"),
        Err(e) => tracing::warn!(pid, id, reason, error = %e, "V8 heap summary near the heap limit failed"),
    }
}

/// A workload's stored snapshot `id` continues its series of V8 heap summaries (after a restart
/// of the agent), when it has one.
pub(crate) fn restore_summary(state: &State, tracking: &Tracking, id: &str) {
    if let Some(s) = load_summary(state, id) {
        tracking.note_v8_summary(&s.summary);
    }
}

fn load_summary(state: &State, id: &str) -> Option<StoredSummary> {
    let text = std::fs::read(summary_path(state, id)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Adds `v8` to a diff's JSON when both snapshots have a V8 summary: the constructors whose
/// object count grew (`constructors_grew`, most self-size growth first, at most `top`), each
/// with its verdict as of the later snapshot (`verdict`, `slope_bytes_per_s`, `confidence`,
/// `null` when none), and `verdict_snapshots`: how many summaries those verdicts are based on.
pub(crate) fn annotate_diff(state: &State, a: &str, b: &str, top: usize, json: &mut serde_json::Value) {
    let (Some(before), Some(after)) = (load_summary(state, a), load_summary(state, b)) else { return };
    let mut grew = crate::v8::summary::grew(&before.summary, &after.summary);
    grew.truncate(top);
    let (verdict_snapshots, window_s) = v8_growth::basis(&after.verdicts);
    let (before, after, verdicts) = (before.summary, after.summary, after.verdicts);
    json["v8"] = serde_json::json!({
        "before": { "reason": before.reason, "taken_at_ms": before.taken_at_ms, "self_size": before.self_size, "node_count": before.node_count },
        "after": { "reason": after.reason, "taken_at_ms": after.taken_at_ms, "self_size": after.self_size, "node_count": after.node_count },
        "verdict_snapshots": verdict_snapshots,
        "window_s": window_s,
        "constructors_grew": v8_growth::judge_growth(grew, &verdicts),
    });
}

/// Adds `v8` to the leak report of a target (`leaks.json`): the JavaScript heap's leak report
/// ([`v8_growth::JsHeapReport`]) of its latest V8 heap summary, with the verdicts of its
/// series; nothing when it has no summary.
pub(crate) fn annotate_leaks(tracking: &Tracking, top: usize, json: &mut serde_json::Value) {
    if let Some(r) = tracking.v8_report(top) {
        json["v8"] = serde_json::to_value(r).unwrap_or_default();
    }
}

/// Adds `v8` to the leak report of stored snapshot `id`: its V8 heap summary with the verdicts
/// stored with it; nothing when it has no summary.
pub(crate) fn annotate_stored_leaks(state: &State, id: &str, top: usize, json: &mut serde_json::Value) {
    if let Some(s) = load_summary(state, id) {
        json["v8"] = serde_json::to_value(v8_growth::report(&s.summary, &s.verdicts, top)).unwrap_or_default();
        if let Some(h) = s.heap {
            json["v8"]["heap"] = serde_json::json!({ "used": h.used, "limit": h.limit, "total": h.total, "percent": h.percent() });
        }
    }
}
