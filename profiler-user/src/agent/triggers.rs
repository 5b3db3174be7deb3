//! Snapshot triggers and leak verdicts in the agent.
//!
//! Each target has a [`Tracking`]: its triggers (one [`TriggerEngine`] per trigger, so each can
//! be added and deleted on its own; each engine spaces its own firings, as in `memscope
//! record`), the [`growth::Series`] of its recent snapshots (every snapshot stored for it, by a
//! trigger or by `POST /v1/targets/{id}/snapshots`) and the verdicts of that series.
//!
//! One background task ([`spawn_poller`]) wakes every [`POLL_INTERVAL`] and, for every target
//! with a trigger still running and no job in progress, starts one blocking job: poll the
//! target's engines, then take and store a snapshot for each firing. So a slow snapshot of one
//! target never delays the triggers of another, and the triggers of one target are not polled
//! while its snapshot runs (what fired meanwhile is seen at the next poll, as in `record`).
//! Each snapshot needs a permit of the cap on expensive work (`--max-renders`); a firing that
//! finds the cap full is dropped and counted as suppressed (`suppressed_busy`), never queued.
//! Only the exit snapshot waits for a permit (up to the request timeout): it cannot be taken
//! later.
//!
//! Pause budget: a firing whose snapshot would get a V8 heap summary (`--v8-summaries`, a
//! Node.js target) pauses the target; when one more pause (as long as its last) would take
//! the target's paused share past the trigger's budget ([`crate::pause`]: `pause_budget` of
//! the trigger, of the selector that made it, or the agent's `--pause-budget`, 5% of 60 s by
//! default), the firing is refused and counted as suppressed (`suppressed_pause_budget`).
//! Probe hits memscope itself caused (the summaries' own garbage collections) never fire
//! (`suppressed_self_caused`, see [`crate::trigger::engine`]).
//!
//! When a target exits: with an `exit` trigger its final snapshot is stored with reason
//! `exit`; either way the target stays listed (`alive: false`) with its triggers finished,
//! until it is detached.
//!
//! Verdicts: `GET /v1/targets/{id}/leaks` annotates leaks with the verdicts of the target's
//! series as of its last stored snapshot; each stored snapshot keeps the verdicts of the series
//! when it was taken, in memory (for `GET /v1/snapshots/{sid}?format=leaks`). A restarted agent
//! has no verdicts for the snapshots of before the restart (the keys are then `null`).
//! The V8 heap summaries stored with snapshots (`--v8-summaries`) have a series and verdicts
//! of their own, per constructor ([`crate::v8::growth`]): not every stored snapshot has one.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::{sync::OwnedSemaphorePermit, task::JoinHandle};
use tracing::{info, warn};

use super::State;
use crate::{
    aggregate::{
        growth::{self, Verdict},
        HeapProfile,
    },
    pause::PauseBudget,
    target::TracedTarget,
    trigger::{TriggerEngine, TriggerSpec, POLL_INTERVAL},
    v8::{
        growth::{JsHeapReport, SummarySeries},
        summary::HeapSummary,
    },
};

/// Most triggers one target may have at once (probe sites have their own limit of 64).
pub const MAX_TRIGGERS_PER_TARGET: usize = 32;
/// Leak age of snapshots when none is given: what their leak reports count as leaked.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(30);
/// Most leaks per stored snapshot whose verdicts are kept (the largest).
const MAX_STORED_VERDICTS: usize = 10_000;

/// Trigger settings of the agent (`--min-spacing`, `--verdict-window`).
#[derive(Clone, Debug)]
pub struct TriggerSettings {
    /// Spacing of the command-line triggers, and of API triggers that name none.
    pub min_spacing: Duration,
    /// Snapshots per target the verdicts are computed from.
    pub verdict_window: usize,
    /// Leak age of triggered snapshots (what their leak reports count as leaked).
    pub min_age: Duration,
}

impl Default for TriggerSettings {
    fn default() -> Self {
        TriggerSettings {
            min_spacing: crate::trigger::DEFAULT_MIN_SPACING,
            verdict_window: growth::DEFAULT_WINDOW,
            min_age: DEFAULT_MIN_AGE,
        }
    }
}

/// Who made a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A command-line flag of `memscope agent` (`--every`, ...).
    Flag,
    /// `POST /v1/targets/{id}/triggers`.
    Api,
    /// The selector that attached the target's workload (`--select`, `/v1/selectors`).
    Selector,
}

struct AgentTrigger {
    id: u64,
    origin: Origin,
    engine: TriggerEngine,
    /// Firings dropped because the cap on expensive work was full.
    busy_suppressed: u64,
    /// Its pause budget (`None`: the agent's).
    pause_budget: Option<PauseBudget>,
    /// Firings refused by the pause budget.
    budget_suppressed: u64,
}

/// One trigger as `GET /v1/targets/{id}/triggers` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TriggerView {
    pub id: u64,
    /// The `kind=value` form (`every=30s`, `return=gc_cycle`, `gc`, ...).
    pub spec: String,
    /// The reason its snapshots are stored with (before [`store_reason`]).
    pub reason: String,
    pub fired: u64,
    /// Firings not taken: held back by the minimum spacing, or dropped while the cap on
    /// expensive work was full (`suppressed_busy` of them).
    pub suppressed: u64,
    pub suppressed_busy: u64,
    /// Refused because the target's paused share would go past the pause budget.
    pub suppressed_pause_budget: u64,
    /// Probe hits memscope caused itself (its V8 operations' garbage collections).
    pub suppressed_self_caused: u64,
    /// The pause budget its firings are held to (`PCT%/WINDOWs`).
    pub pause_budget: String,
    /// Probe sites attached (return, usdt and gc triggers).
    pub probes: usize,
    pub min_spacing_s: f64,
    pub origin: Origin,
    /// The target has exited: the trigger fires no more.
    pub finished: bool,
}

impl AgentTrigger {
    fn budget(&self) -> PauseBudget {
        self.pause_budget.unwrap_or_else(crate::pause::default_budget)
    }

    fn view(&self) -> TriggerView {
        let st = self.engine.status().into_iter().next();
        let (spec, reason, fired, suppressed, self_caused, probes) = match st {
            Some(s) => (s.spec, s.reason, s.fired, s.suppressed, s.suppressed_self_caused, s.probes),
            None => Default::default(),
        };
        TriggerView {
            id: self.id,
            spec,
            reason,
            // A firing the budget refused took no snapshot: suppressed, not fired.
            fired: fired.saturating_sub(self.budget_suppressed),
            suppressed: suppressed + self.busy_suppressed + self.budget_suppressed,
            suppressed_busy: self.busy_suppressed,
            suppressed_pause_budget: self.budget_suppressed,
            suppressed_self_caused: self_caused,
            pause_budget: self.budget().to_string(),
            probes,
            min_spacing_s: self.engine.min_spacing().as_secs_f64(),
            origin: self.origin,
            finished: self.engine.finished(),
        }
    }
}

/// The agent's per-target trigger and verdict state (see the module doc).
pub struct Tracking {
    triggers: Mutex<Vec<AgentTrigger>>,
    series: Mutex<growth::Series>,
    /// The verdicts of `series` as of its last snapshot.
    verdicts: Mutex<Arc<HashMap<String, Verdict>>>,
    /// The V8 heap summaries stored with its snapshots (`--v8-summaries`) and their verdicts.
    v8: Mutex<SummarySeries>,
    /// A poll job of this target is running.
    busy: AtomicBool,
    /// The workload whose process this is: its snapshots are stored under it, and this
    /// tracking (series, verdicts) passes from one process of the workload to the next.
    workload: Option<String>,
}

impl Tracking {
    pub fn new(verdict_window: usize) -> Tracking {
        Tracking {
            triggers: Mutex::new(Vec::new()),
            series: Mutex::new(growth::Series::new(verdict_window)),
            verdicts: Mutex::new(Arc::new(HashMap::new())),
            v8: Mutex::new(SummarySeries::new(verdict_window)),
            busy: AtomicBool::new(false),
            workload: None,
        }
    }

    /// The tracking of a workload (see [`Tracking::workload`]).
    pub fn for_workload(verdict_window: usize, id: &str) -> Tracking {
        Tracking { workload: Some(id.to_string()), ..Tracking::new(verdict_window) }
    }

    pub fn workload(&self) -> Option<&str> {
        self.workload.as_deref()
    }

    /// Drops the triggers that fire no more (those of a previous process of the workload).
    pub fn remove_finished(&self) {
        self.triggers.lock().unwrap().retain(|t| !t.engine.finished());
    }

    /// No trigger is left to run and no poll job runs: the target may be detached.
    pub fn idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire) && self.triggers.lock().unwrap().iter().all(|t| t.engine.finished())
    }

    /// The current verdicts (empty below 3 snapshots).
    pub fn verdicts(&self) -> Arc<HashMap<String, Verdict>> {
        self.verdicts.lock().unwrap().clone()
    }

    /// Snapshots in the series.
    pub fn snapshots(&self) -> usize {
        self.series.lock().unwrap().len()
    }

    /// Adds a V8 heap summary to the target's series of them; the verdicts of that series
    /// then, and how many summaries they are based on.
    pub(crate) fn note_v8_summary(&self, s: &HeapSummary) -> (HashMap<String, Verdict>, usize) {
        let mut v8 = self.v8.lock().unwrap();
        v8.push(s);
        (v8.verdicts().clone(), v8.len())
    }

    /// The JavaScript heap's leak report: the latest V8 heap summary with the verdicts of
    /// the series (`None` without summaries).
    pub(crate) fn v8_report(&self, top: usize) -> Option<JsHeapReport> {
        self.v8.lock().unwrap().report(top)
    }

    /// Every trigger of the target. Waits while a poll of the target runs (call it from a
    /// blocking thread).
    pub fn views(&self) -> Vec<TriggerView> {
        self.triggers.lock().unwrap().iter().map(AgentTrigger::view).collect()
    }

    /// Removes trigger `id` (its USDT semaphores go back; a uretprobe stays attached,
    /// uncounted, until the target is detached). Whether it was there.
    pub fn remove(&self, id: u64) -> bool {
        let mut t = self.triggers.lock().unwrap();
        let before = t.len();
        t.retain(|x| x.id != id);
        t.len() != before
    }

    /// Whether the poller has something to do for this target now (never blocks: a target
    /// whose triggers are being changed is skipped for one tick).
    fn wants_poll(&self) -> bool {
        if self.busy.load(Ordering::Acquire) {
            return false;
        }
        match self.triggers.try_lock() {
            Ok(t) => t.iter().any(|x| !x.engine.finished()),
            Err(_) => false,
        }
    }
}

/// The reason as the snapshot store takes it: lowercase, characters other than `a-z`, `0-9`,
/// `-` and `_` become `_`, at most 32 characters (`return:gc_cycle` → `return_gc_cycle`).
pub fn store_reason(reason: &str) -> String {
    let s: String = reason
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' { c } else { '_' })
        .take(32)
        .collect();
    if s.is_empty() {
        "trigger".to_string()
    } else {
        s
    }
}

/// The verdicts of one stored snapshot: one per leak, in the order of
/// [`HeapProfile::leaks`] (the stored profile reads back equal, so the order holds).
pub(crate) struct StoredVerdicts {
    per_leak: Vec<Option<Verdict>>,
    /// Snapshots the verdicts are based on.
    pub(crate) snapshots: usize,
}

impl StoredVerdicts {
    fn of(p: &HeapProfile, verdicts: &HashMap<String, Verdict>, snapshots: usize) -> StoredVerdicts {
        let per_leak = p
            .leaks()
            .iter()
            .take(MAX_STORED_VERDICTS)
            .map(|s| verdicts.get(&growth::stack_id(&s.frames)).cloned())
            .collect();
        StoredVerdicts { per_leak, snapshots }
    }

    /// The verdicts by stack id, for [`growth::annotate_leaks_json`] on `p` (the profile they
    /// were taken with).
    pub(crate) fn by_stack(&self, p: &HeapProfile) -> HashMap<String, Verdict> {
        p.leaks()
            .iter()
            .zip(&self.per_leak)
            .filter_map(|(s, v)| v.clone().map(|v| (growth::stack_id(&s.frames), v)))
            .collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Attaches one engine per spec to `target` (blocking: symbol lookups, probes). All or nothing:
/// on an error no trigger is added. Returns the new triggers.
pub(crate) fn attach(
    state: &State,
    target: &dyn TracedTarget,
    tracking: &Tracking,
    specs: &[TriggerSpec],
    min_spacing: Duration,
    origin: Origin,
    pause_budget: Option<PauseBudget>,
) -> Result<Vec<TriggerView>, AttachError> {
    let pid = target.pid();
    let host = target.trigger_host().ok_or(AttachError::Unsupported(pid))?;
    if !host.alive() {
        return Err(AttachError::Exited(pid));
    }
    {
        let existing = tracking.triggers.lock().unwrap();
        if existing.len() + specs.len() > MAX_TRIGGERS_PER_TARGET {
            return Err(AttachError::TooMany(existing.len()));
        }
        for s in specs {
            if let Some(t) = existing.iter().find(|t| t.engine.status().first().is_some_and(|st| st.spec == s.describe())) {
                return Err(AttachError::Exists { spec: s.describe(), id: t.id });
            }
        }
    }
    let mut added = Vec::with_capacity(specs.len());
    for s in specs {
        let engine = TriggerEngine::attach(host, std::slice::from_ref(s), min_spacing).map_err(AttachError::Failed)?;
        let id = state.next_trigger_id.fetch_add(1, Ordering::Relaxed);
        added.push(AgentTrigger { id, origin, engine, busy_suppressed: 0, pause_budget, budget_suppressed: 0 });
    }
    let views: Vec<TriggerView> = added.iter().map(AgentTrigger::view).collect();
    tracking.triggers.lock().unwrap().extend(added);
    info!(pid, triggers = ?views.iter().map(|v| v.spec.as_str()).collect::<Vec<_>>(), "triggers attached");
    Ok(views)
}

/// Why triggers could not be added.
#[derive(Debug)]
pub(crate) enum AttachError {
    Unsupported(u32),
    Exited(u32),
    TooMany(usize),
    Exists { spec: String, id: u64 },
    Failed(anyhow::Error),
}

impl std::fmt::Display for AttachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachError::Unsupported(pid) => write!(f, "target {pid} cannot host snapshot triggers"),
            AttachError::Exited(pid) => write!(f, "process {pid} has exited"),
            AttachError::TooMany(n) => {
                write!(f, "the target has {n} triggers; at most {MAX_TRIGGERS_PER_TARGET} (delete one first)")
            }
            AttachError::Exists { spec, id } => write!(f, "trigger {spec} already exists (id {id})"),
            AttachError::Failed(e) => f.write_str(&crate::errors::one_line(e)),
        }
    }
}

/// Notes a snapshot stored for a target (by a trigger or the API): adds it to the series,
/// recomputes the verdicts, keeps them for the stored snapshot `id`, and tells every engine
/// (growth triggers measure from the last snapshot). Forgets the verdicts of snapshots the
/// store `removed`.
pub(crate) fn note_snapshot(state: &State, tracking: &Tracking, p: &HeapProfile, id: &str, removed: &[String]) {
    let (verdicts, snapshots) = {
        let mut series = tracking.series.lock().unwrap();
        series.push(p);
        (Arc::new(series.verdicts()), series.len())
    };
    *tracking.verdicts.lock().unwrap() = verdicts.clone();
    {
        let mut map = state.snapshot_verdicts.lock().unwrap();
        for r in removed {
            map.remove(r);
        }
        if snapshots >= growth::MIN_SNAPSHOTS {
            map.insert(id.to_string(), StoredVerdicts::of(p, &verdicts, snapshots));
        }
    }
    for t in tracking.triggers.lock().unwrap().iter_mut() {
        t.engine.note_snapshot(p.totals.live_bytes);
    }
}

/// One poll job of one target (blocking): poll its engines, then a snapshot per firing.
fn poll_job(state: &State, target: &dyn TracedTarget, tracking: &Tracking) {
    let Some(host) = target.trigger_host() else { return };
    let fired: Vec<(u64, PauseBudget, crate::trigger::Fired)> = {
        let mut triggers = tracking.triggers.lock().unwrap();
        triggers
            .iter_mut()
            .flat_map(|t| {
                let (id, budget) = (t.id, t.budget());
                t.engine.poll(host).into_iter().map(move |f| (id, budget, f))
            })
            .collect::<Vec<_>>()
    };
    let mut summarizes: Option<bool> = None;
    for (tid, budget, f) in fired {
        let is_exit = f.reason == TriggerSpec::Exit.reason();
        // Its snapshot would get a V8 summary: a pause of the target, within its budget only.
        let pauses = *summarizes.get_or_insert_with(|| super::v8::would_summarize(state, target.pid()));
        if pauses && !is_exit {
            if let Some(ledger) = target.pauses().filter(|l| !l.admits(&budget, std::time::Instant::now())) {
                ledger.note_budget_refusal();
                if let Some(t) = tracking.triggers.lock().unwrap().iter_mut().find(|t| t.id == tid) {
                    t.budget_suppressed += 1;
                }
                tracing::debug!(pid = target.pid(), reason = %f.reason, %budget, "firing refused by the pause budget");
                continue;
            }
        }
        let Some(_permit) = permit(state, is_exit) else {
            if let Some(t) = tracking.triggers.lock().unwrap().iter_mut().find(|t| t.id == tid) {
                t.busy_suppressed += 1;
            }
            state.refused_busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let pid = target.pid();
        let profile = match target.snapshot(state.trigger_settings.min_age) {
            Ok(p) => p,
            Err(e) => {
                warn!(pid, reason = %f.reason, error = %crate::errors::one_line(&e), "triggered snapshot failed");
                continue;
            }
        };
        let comm = target.stats().comm;
        match state.store.put_for(&profile, &comm, &store_reason(&f.reason), tracking.workload()) {
            Ok(stored) => {
                info!(pid, reason = %f.reason, id = %stored.meta.id, live_bytes = profile.totals.live_bytes,
                      latency_ms = now_ms().saturating_sub(f.at_ms), "triggered snapshot stored");
                note_snapshot(state, tracking, &profile, &stored.meta.id, &stored.removed);
                if f.reason == crate::trigger::spec::HEAP_LIMIT_REASON {
                    super::v8::note_heap_limit(state, tracking, target, &stored.meta.id, &store_reason(&f.reason), &stored.removed);
                } else {
                    super::v8::note_snapshot(state, tracking, target, &stored.meta.id, &store_reason(&f.reason), &stored.removed);
                }
            }
            Err(e) => warn!(pid, reason = %f.reason, error = %e, "storing a triggered snapshot failed"),
        }
    }
}

/// A permit of the cap on expensive work: at once or `None`; for the exit snapshot, waiting
/// up to the request timeout.
fn permit(state: &State, wait: bool) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = state.expensive.clone().try_acquire_owned() {
        return Some(p);
    }
    if !wait {
        return None;
    }
    let sem = state.expensive.clone();
    let limit = state.request_timeout;
    tokio::runtime::Handle::current()
        .block_on(async move { tokio::time::timeout(limit, sem.acquire_owned()).await.ok()?.ok() })
}

/// Clears a target's busy flag when its job ends, even by a panic.
struct BusyGuard(Arc<Tracking>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Starts a poll job for every target that has a running trigger and no job in progress;
/// returns the jobs (the poller lets them run; tests await them).
pub(crate) fn poll_once(state: &Arc<State>) -> Vec<JoinHandle<()>> {
    let due: Vec<(Arc<dyn TracedTarget>, Arc<Tracking>)> = state
        .targets
        .read()
        .unwrap()
        .values()
        .filter(|e| e.tracking.wants_poll())
        .map(|e| (e.target.clone(), e.tracking.clone()))
        .collect();
    let mut jobs = Vec::new();
    for (target, tracking) in due {
        if tracking.busy.swap(true, Ordering::AcqRel) {
            continue;
        }
        let st = state.clone();
        jobs.push(tokio::task::spawn_blocking(move || {
            let guard = BusyGuard(tracking);
            poll_job(&st, &*target, &guard.0);
        }));
    }
    jobs
}

/// The one background task that polls every target's triggers every [`POLL_INTERVAL`].
pub(crate) fn spawn_poller(state: Arc<State>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            drop(poll_once(&state));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasons become store reasons: lowercase, safe characters, at most 32 of them.
    #[test]
    fn store_reasons() {
        assert_eq!(store_reason("interval"), "interval");
        assert_eq!(store_reason("gc"), "gc");
        assert_eq!(store_reason("return:gc_cycle"), "return_gc_cycle");
        assert_eq!(store_reason("usdt:app:gc-done"), "usdt_app_gc-done");
        assert_eq!(store_reason("return:ns::Cache::Collect(int)"), "return_ns__cache__collect_int_");
        assert_eq!(store_reason(&format!("return:{}", "x".repeat(100))).len(), 32);
        assert_eq!(store_reason(""), "trigger");
    }
}
