//! The node-level agent: selectors and workloads. [`Workloads`] holds the selectors (from
//! `--select`, and from `/v1/selectors`, persisted in the data directory) and the registry of
//! workloads; it attaches every running match at start ([`Workloads::scan`]), every process
//! that starts matching later from the exec events of [`crate::discover::ProcWatcher`], and
//! detaches a process when it exits (after its exit trigger, if any, took its snapshot).
//!
//! Selectors come from the flags (`--select`), from a `--select-file` (a mounted ConfigMap),
//! which is watched ([`spawn_select_file_watch`]: selectors it no longer has are removed and
//! their workloads detached, new ones added and scanned for; unchanged ones keep their targets
//! attached), and from the API (persisted).
//!
//! A workload's [`Tracking`] (snapshot series, verdicts) is handed from one process of the
//! workload to the next, its selector's triggers are attached again to each new process, and
//! its snapshots are stored under its id (`/v1/workloads/{id}/snapshots`). One process per
//! workload is traced at a time: the first that matches. Under a `forks=true` selector, the
//! processes an attached process forks (from the fork events) are attached as its workers,
//! workloads of their own ([`workload::worker`]), once they lived `--fork-min-lifetime`: a
//! fork-per-connection server (PostgreSQL, a pre-fork CGI server under `pgbench -C`-like load)
//! forks hundreds of children a second that live a few milliseconds each; attaching each (its
//! allocator searched, its probes verified and attached, its unwind maps written) would cost
//! the agent a core and the server most of its throughput, for children that exit before
//! their first snapshot. Those are counted (`memscope_forks_total{result="short_lived"}`), not
//! attached; a child that exits while it is being attached is counted as such, never refused.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    triggers::{self, Tracking},
    State, TargetEntry,
};
use crate::{
    discover::{self, NodePaths, ProcEvent, ProcWatcher, Selector},
    export::push::{self, PushJob, Pusher},
    target::TracedTarget,
    workload::{self, SelectorEntry, SelectorFile, SelectorFileError, Workload},
};

/// Most selectors at once.
pub const MAX_SELECTORS: usize = 64;
/// How often attached workloads are checked for an exit the event stream missed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// How long attaching a process that just exec'd is retried (its allocator may not be mapped
/// yet: the dynamic loader maps libc right after exec).
const ATTACH_RETRY_FOR: Duration = Duration::from_millis(800);
/// Default of `--fork-min-lifetime`: a child of a `forks=true` workload is attached once it
/// lived this long (connection backends living a few ms are not worth attaching; pre-fork
/// workers are attached well within a second).
pub const DEFAULT_FORK_MIN_LIFETIME: Duration = Duration::from_millis(250);

/// What the node-level agent is told at start.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    /// `--select`, in order.
    pub selectors: Vec<Selector>,
    /// `--select-file`, watched for changes, and the selectors it held at start.
    pub select_file: Option<std::path::PathBuf>,
    pub file_selectors: Vec<Selector>,
    /// `--node-root`.
    pub node_paths: NodePaths,
    /// `--push` and its options.
    pub push: Option<crate::export::push::PushConfig>,
    /// `--fork-min-lifetime`: how long a child of a `forks=true` workload must live before it
    /// is attached.
    pub fork_min_lifetime: Duration,
}

/// What became of the children of `forks=true` workloads (`memscope_forks_total`).
#[derive(Default)]
pub struct ForkStats {
    /// Children of a followed process seen (fork events).
    pub seen: std::sync::atomic::AtomicU64,
    /// Exited (or reaped) before `--fork-min-lifetime`: not attached.
    pub short_lived: std::sync::atomic::AtomicU64,
    /// Exited while being attached (counted, not an attach failure).
    pub exited_while_attaching: std::sync::atomic::AtomicU64,
    /// Attached as workers.
    pub attached: std::sync::atomic::AtomicU64,
}

pub(crate) struct Entry {
    pub(crate) workload: Workload,
    pub(crate) tracking: Arc<Tracking>,
}

/// The selectors and the workload registry (see the module doc).
pub struct Workloads {
    node: NodePaths,
    node_name: String,
    file: SelectorFile,
    pub(crate) selectors: Mutex<Vec<SelectorEntry>>,
    pub(crate) registry: Mutex<BTreeMap<String, Entry>>,
    /// Pid traced now -> its workload.
    pub(crate) by_pid: Mutex<HashMap<u32, String>>,
    watcher: Mutex<Option<ProcWatcher>>,
    events: Mutex<Option<mpsc::Sender<ProcEvent>>>,
    own_pid: u32,
    /// `--push`: the queue and sender of heap profiles.
    pub(crate) pusher: std::sync::OnceLock<Arc<Pusher>>,
    fork_min_lifetime: Duration,
    pub(crate) forks: ForkStats,
    /// `--select-file` and the text of it in force.
    select_file: Option<std::path::PathBuf>,
    select_text: Mutex<Option<String>>,
    /// Changes of `--select-file` applied and refused (`memscope_select_file_reloads_total`).
    reloads_applied: std::sync::atomic::AtomicU64,
    reloads_refused: std::sync::atomic::AtomicU64,
}

/// How often `--select-file` is checked for a change (kubelet itself takes up to a minute or
/// two to update a mounted ConfigMap).
const SELECT_FILE_INTERVAL: Duration = Duration::from_secs(5);

/// A selector as `/v1/selectors` shows it.
#[derive(Serialize)]
pub struct SelectorView {
    pub id: String,
    pub select: String,
    pub origin: &'static str,
    pub triggers: Vec<String>,
    /// Workloads it found so far.
    pub workloads: usize,
}

impl Workloads {
    /// Loads the persisted selectors of `data_dir` after those of the flags (a persisted one
    /// equal to a flag's is kept once).
    pub fn new(config: &NodeConfig, data_dir: &std::path::Path) -> anyhow::Result<Workloads> {
        let file = SelectorFile::in_dir(data_dir);
        let mut selectors: Vec<SelectorEntry> = Vec::new();
        for s in &config.selectors {
            if !selectors.iter().any(|e| e.selector.id() == s.id()) {
                selectors.push(SelectorEntry { selector: s.clone(), origin: "flag" });
            }
        }
        for s in &config.file_selectors {
            if !selectors.iter().any(|e| e.selector.id() == s.id()) {
                selectors.push(SelectorEntry { selector: s.clone(), origin: "file" });
            }
        }
        let restored = file.load()?;
        if !restored.is_empty() {
            info!(count = restored.len(), file = %file.path().display(), "selectors restored");
        }
        for s in restored {
            if !selectors.iter().any(|e| e.selector.id() == s.id()) {
                selectors.push(SelectorEntry { selector: s, origin: "api" });
            }
        }
        Ok(Workloads {
            node: config.node_paths.clone(),
            node_name: workload::node_name(),
            file,
            selectors: Mutex::new(selectors),
            registry: Mutex::new(BTreeMap::new()),
            by_pid: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            events: Mutex::new(None),
            own_pid: std::process::id(),
            pusher: std::sync::OnceLock::new(),
            fork_min_lifetime: config.fork_min_lifetime,
            forks: ForkStats::default(),
            select_text: Mutex::new(config.select_file.as_deref().and_then(|p| workload::read_select_text(p).ok())),
            select_file: config.select_file.clone(),
            reloads_applied: Default::default(),
            reloads_refused: Default::default(),
        })
    }

    pub fn has_selectors(&self) -> bool {
        !self.selectors.lock().unwrap().is_empty()
    }

    /// Starts the exec/exit watcher (once) and the task that acts on its events.
    pub fn start_watching(state: &Arc<State>) -> anyhow::Result<()> {
        let Some(w) = state.workloads.get() else { return Ok(()) };
        let mut watcher = w.watcher.lock().unwrap();
        if watcher.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<ProcEvent>(4096);
        let sender = tx.clone();
        *watcher = Some(ProcWatcher::start(move |e| {
            // Blocks the reader when the agent falls behind: the kernel then counts lost events.
            let _ = sender.blocking_send(e);
        })?);
        *w.events.lock().unwrap() = Some(tx);
        tokio::spawn(run_events(state.clone(), rx));
        Ok(())
    }

    /// Considers every running process (at start and when a selector is added), then the
    /// workers (`forks=true`) of those attached, a generation at a time. Blocking.
    pub fn scan(state: &Arc<State>) {
        let pids = discover::scan();
        std::thread::scope(|s| {
            // Two at a time: attaching is mostly the kernel verifying the probes.
            let chunks: Vec<&[u32]> = pids.chunks(pids.len().div_ceil(2).max(1)).collect();
            for chunk in chunks {
                s.spawn(move || chunk.iter().for_each(|&pid| consider(state, pid, false)));
            }
        });
        let Some(w) = state.workloads.get() else { return };
        if !w.selectors.lock().unwrap().iter().any(|e| e.selector.follow_forks) {
            return;
        }
        for _generation in 0..4 {
            let traced = w.by_pid.lock().unwrap().len();
            for &pid in &pids {
                let parent = crate::procfs::status_number(pid, "PPid");
                if let Some(parent) = parent.filter(|p| w.by_pid.lock().unwrap().contains_key(p)) {
                    forked(state, parent, pid);
                }
            }
            if w.by_pid.lock().unwrap().len() == traced {
                break;
            }
        }
    }

    pub(crate) fn selector_views(&self) -> Vec<SelectorView> {
        let reg = self.registry.lock().unwrap();
        self.selectors
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                let id = e.selector.id();
                SelectorView {
                    workloads: reg.values().filter(|w| w.workload.selector == id).count(),
                    id,
                    select: e.selector.expr.clone(),
                    origin: e.origin,
                    triggers: e.selector.triggers.iter().map(|t| t.describe()).collect(),
                }
            })
            .collect()
    }

    /// Persists the selectors added through the API (a failure is logged here; the caller
    /// puts the list back as it was).
    pub(crate) fn save(&self, selectors: &[SelectorEntry]) -> Result<(), SelectorFileError> {
        let api: Vec<&Selector> = selectors.iter().filter(|e| e.origin == "api").map(|e| &e.selector).collect();
        self.file.save(&api).inspect_err(|e| warn!(error = %e, "saving the selectors failed"))
    }

    /// The current pid and tracking of a workload.
    pub(crate) fn current(&self, id: &str) -> Option<(Option<u32>, Arc<Tracking>)> {
        let reg = self.registry.lock().unwrap();
        let e = reg.get(id)?;
        Some((e.workload.pid, e.tracking.clone()))
    }

    /// The labels of the workload traced as `pid`, if it is one (for metrics and push).
    pub fn labels_of_pid(&self, pid: u32) -> Option<(String, BTreeMap<String, String>)> {
        let id = self.by_pid.lock().unwrap().get(&pid).cloned()?;
        let reg = self.registry.lock().unwrap();
        reg.get(&id).map(|e| (id.clone(), e.workload.labels.clone()))
    }

    /// Whether `pid` is traced under a `forks=true` selector.
    fn follows_forks_of(&self, pid: u32) -> bool {
        let Some(id) = self.by_pid.lock().unwrap().get(&pid).cloned() else { return false };
        let Some(selector) = self.registry.lock().unwrap().get(&id).map(|e| e.workload.selector.clone()) else { return false };
        self.selectors.lock().unwrap().iter().any(|e| e.selector.follow_forks && e.selector.id() == selector)
    }

    /// Whether `pid` is traced as a worker (`forks=true`).
    fn is_worker(&self, pid: u32) -> bool {
        let Some(id) = self.by_pid.lock().unwrap().get(&pid).cloned() else { return false };
        self.registry.lock().unwrap().get(&id).is_some_and(|e| e.workload.worker.is_some())
    }

    /// Every workload, and the pid traced now when there is one.
    pub fn list(&self) -> Vec<Workload> {
        self.registry.lock().unwrap().values().map(|e| e.workload.clone()).collect()
    }
}

/// Checks `--select-file` every [`SELECT_FILE_INTERVAL`] and applies its changes (see
/// [`reload_select_file`]); `None` without the flag.
pub(crate) fn spawn_select_file_watch(state: &Arc<State>) -> Option<tokio::task::JoinHandle<()>> {
    state.workloads.get()?.select_file.as_ref()?;
    let state = state.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SELECT_FILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let st = state.clone();
            let _ = tokio::task::spawn_blocking(move || reload_select_file(&st)).await;
        }
    }))
}

/// What a reload of `--select-file` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Pids detached with the removed selectors.
    pub detached: Vec<u32>,
}

/// Re-reads `--select-file`; when its text changed, removes the selectors it no longer has
/// (their workloads' processes detached, as `DELETE /v1/selectors/{id}` does) and adds the
/// new ones (then scans for their processes). Selectors in both keep their targets attached;
/// a line that changed is a new selector (the old one removed). A file that cannot be read or
/// parsed changes nothing: the error is logged and counted, and the same text is not reported
/// again. Blocking.
pub fn reload_select_file(state: &Arc<State>) -> Result<Reload, String> {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(w) = state.workloads.get() else { return Ok(Reload::default()) };
    let Some(path) = w.select_file.clone() else { return Ok(Reload::default()) };
    let refuse = |text: Option<String>, line: String| {
        let mut last = w.select_text.lock().unwrap();
        if text.is_none() || *last != text {
            warn!(file = %path.display(), error = %line, "--select-file changed but cannot be used; the selectors in force stay");
            w.reloads_refused.fetch_add(1, Relaxed);
        }
        if text.is_some() {
            *last = text;
        }
        Err(line)
    };
    let text = match workload::read_select_text(&path) {
        Ok(t) => t,
        Err(e) => return refuse(None, crate::errors::one_line(&e)),
    };
    if w.select_text.lock().unwrap().as_deref() == Some(text.as_str()) {
        return Ok(Reload::default());
    }
    let wanted = match workload::parse_select_file(&path, &text) {
        Ok(s) => s,
        Err(e) => return refuse(Some(text), crate::errors::one_line(&e)),
    };
    let mut reload = Reload::default();
    {
        let mut sels = w.selectors.lock().unwrap();
        let wanted_ids: Vec<String> = wanted.iter().map(|s| s.id()).collect();
        let kept = sels.len() - sels.iter().filter(|e| e.origin == "file" && !wanted_ids.contains(&e.selector.id())).count();
        let new: Vec<&Selector> = wanted.iter().filter(|s| !sels.iter().any(|e| e.selector.id() == s.id())).collect();
        if kept + new.len() > MAX_SELECTORS {
            drop(sels);
            return refuse(Some(text), format!("{}: more than {MAX_SELECTORS} selectors in all", path.display()));
        }
        sels.retain(|e| {
            let gone = e.origin == "file" && !wanted_ids.contains(&e.selector.id());
            if gone {
                reload.removed.push(e.selector.id());
            }
            !gone
        });
        for s in new {
            reload.added.push(s.id());
            sels.push(SelectorEntry { selector: s.clone(), origin: "file" });
        }
    }
    *w.select_text.lock().unwrap() = Some(text);
    w.reloads_applied.fetch_add(1, Relaxed);
    for sid in &reload.removed {
        reload.detached.extend(detach_selector(state, w, sid));
    }
    info!(file = %path.display(), added = ?reload.added, removed = ?reload.removed, detached = reload.detached.len(), "--select-file reloaded");
    if !reload.added.is_empty() {
        if let Err(e) = Workloads::start_watching(state) {
            warn!(error = %crate::errors::one_line(&e), "starting the process watcher failed");
        }
        Workloads::scan(state);
    }
    Ok(reload)
}

/// Detaches the processes of the workloads of selector `sid` (removed): they stay listed with
/// their snapshots. Returns their pids.
fn detach_selector(state: &State, w: &Workloads, sid: &str) -> Vec<u32> {
    let pids: Vec<u32> = {
        let mut reg = w.registry.lock().unwrap();
        reg.values_mut()
            .filter(|e| e.workload.selector == sid)
            .filter_map(|e| {
                let pid = e.workload.pid;
                e.workload.gone();
                pid
            })
            .collect()
    };
    let mut by_pid = w.by_pid.lock().unwrap();
    let mut detached = Vec::new();
    for pid in &pids {
        by_pid.remove(pid);
        crate::v8::channel::forget(*pid);
        if let Some(e) = state.targets.write().unwrap().remove(pid) {
            detached.push(e);
        }
    }
    drop(by_pid);
    // Dropped on a thread of its own: detaching takes the kernel a while.
    drop(std::thread::Builder::new().name("detach".into()).spawn(move || drop(detached)));
    pids
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Acts on the watcher's events, and sweeps for exits it missed.
async fn run_events(state: Arc<State>, mut rx: mpsc::Receiver<ProcEvent>) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            e = rx.recv() => {
                let Some(e) = e else { return };
                let st = state.clone();
                match e {
                    ProcEvent::Exec(pid) => {
                        // A worker that execs is another program now, no longer its parent's worker.
                        if state.workloads.get().is_some_and(|w| w.is_worker(pid)) {
                            exited(&st, pid);
                        }
                        drop(tokio::task::spawn_blocking(move || consider(&st, pid, true)))
                    }
                    ProcEvent::Exit(pid) => exited(&st, pid),
                    // Most new tasks (threads above all) are of processes not followed: dismissed here.
                    ProcEvent::Fork { parent, child } => {
                        if let Some(w) = state.workloads.get().filter(|w| w.follows_forks_of(parent)) {
                            w.forks.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::spawn(fork_after_min_lifetime(st, parent, child, w.fork_min_lifetime));
                        }
                    }
                }
            }
            _ = sweep.tick() => {
                let Some(w) = state.workloads.get() else { continue };
                let pids: Vec<u32> = w.by_pid.lock().unwrap().keys().copied().collect();
                for pid in pids {
                    let alive = state.targets.read().unwrap().get(&pid).and_then(|e| e.target.trigger_host().map(|h| h.alive()));
                    if alive == Some(false) {
                        exited(&state, pid);
                    }
                }
            }
        }
    }
}

/// Attaches `pid` if a selector matches it and its workload has no process traced. Blocking.
/// Under a `forks=true` selector, a process whose parent is of the same workload is a worker:
/// attached as one when its parent is traced (else left for its parent's turn).
fn consider(state: &Arc<State>, pid: u32, just_exec: bool) {
    let Some(w) = state.workloads.get() else { return };
    if pid == w.own_pid || w.by_pid.lock().unwrap().contains_key(&pid) {
        return;
    }
    let Some(info) = discover::identity::process_info(pid, &w.node) else { return };
    let selector = {
        let sels = w.selectors.lock().unwrap();
        match sels.iter().find(|e| e.selector.matches(&info)) {
            Some(e) => e.selector.clone(),
            None => return,
        }
    };
    let identity = workload::identify(&selector, &info, &w.node_name);
    if selector.follow_forks {
        if let Some(ppid) = crate::procfs::status_number(pid, "PPid") {
            if w.by_pid.lock().unwrap().contains_key(&ppid) {
                return forked(state, ppid, pid);
            }
            let parent = discover::identity::process_info(ppid, &w.node);
            if parent.is_some_and(|p| selector.matches(&p) && workload::identify(&selector, &p, &w.node_name).id == identity.id) {
                return;
            }
        }
    }
    if let Some((tracking, fresh)) = reserve(state, w, pid, &identity, &selector.id()) {
        attach_reserved(state, w, pid, &identity, &selector, tracking, fresh, just_exec);
    }
}

/// Attaches `child` of the followed `parent` as a worker if it still runs, as `parent`'s child,
/// after `min_lifetime` (see the module doc); a child gone by then is counted as short-lived.
async fn fork_after_min_lifetime(state: Arc<State>, parent: u32, child: u32, min_lifetime: Duration) {
    if !min_lifetime.is_zero() {
        tokio::time::sleep(min_lifetime).await;
    }
    let Some(w) = state.workloads.get() else { return };
    // Still running, and still `parent`'s (not a reused pid, not re-parented after its
    // parent exited).
    let running = crate::procfs::running(child) && crate::procfs::status_number(child, "PPid") == Some(parent);
    if !running {
        w.forks.short_lived.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(pid = child, parent, "a forked child exited before --fork-min-lifetime: not attached");
        return;
    }
    drop(tokio::task::spawn_blocking(move || forked(&state, parent, child)));
}

/// Most worker slots of one workload (`forks=true`).
const MAX_WORKER_SLOTS: u32 = 256;

/// `parent` (traced) created the task `child`: attached as the parent workload's worker in the
/// lowest free slot, if the parent's selector follows forks and `child` is a process, not a
/// thread. Blocking.
fn forked(state: &Arc<State>, parent: u32, child: u32) {
    let Some(w) = state.workloads.get() else { return };
    let Some(parent_id) = w.by_pid.lock().unwrap().get(&parent).cloned() else { return };
    let (selector, parent_identity) = {
        let reg = w.registry.lock().unwrap();
        let Some(e) = reg.get(&parent_id) else { return };
        let sels = w.selectors.lock().unwrap();
        match sels.iter().find(|s| s.selector.follow_forks && s.selector.id() == e.workload.selector) {
            Some(s) => (s.selector.clone(), workload::Identity { id: parent_id.clone(), labels: e.workload.labels.clone() }),
            None => return,
        }
    };
    if child == w.own_pid || !discover::events::is_process(child) || w.by_pid.lock().unwrap().contains_key(&child) {
        return;
    }
    for slot in 0..MAX_WORKER_SLOTS {
        let identity = workload::worker(&parent_identity, slot);
        if let Some((tracking, fresh)) = reserve(state, w, child, &identity, &selector.id()) {
            return attach_reserved(state, w, child, &identity, &selector, tracking, fresh, true);
        }
    }
    warn!(pid = child, workload = %parent_id, "not attached: the workload has {MAX_WORKER_SLOTS} workers attached already");
}

/// Reserves the workload `identity` for `pid` (registering it if new): its tracking, and
/// whether it is new; `None` when another live process of it is traced or being attached.
fn reserve(state: &State, w: &Workloads, pid: u32, identity: &workload::Identity, selector_id: &str) -> Option<(Arc<Tracking>, bool)> {
    let mut reg = w.registry.lock().unwrap();
    // Its process is traced (or being attached), unless that one is gone already: a
    // restarted process may exec before the exit of its predecessor is seen.
    if let Some(e) = reg.get_mut(&identity.id) {
        match e.workload.pid {
            Some(p) if p != pid && !crate::procfs::exists(p) => {
                w.by_pid.lock().unwrap().remove(&p);
                e.workload.gone();
            }
            Some(_) => return None,
            None => {}
        }
    }
    let fresh = !reg.contains_key(&identity.id);
    let e = reg.entry(identity.id.clone()).or_insert_with(|| Entry {
        workload: Workload::new(identity, selector_id, now_ms()),
        tracking: Arc::new(Tracking::for_workload(state.trigger_settings.verdict_window, &identity.id)),
    });
    // Reserved: a second process of the workload is not attached meanwhile.
    e.workload.pid = Some(pid);
    Some((e.tracking.clone(), fresh))
}

/// Attaches `pid` as the process of the workload `identity` (reserved for it), with its
/// selector's triggers. `just_started`: it just exec'd or was forked, so a failed attach is
/// retried for a while. Blocking.
#[allow(clippy::too_many_arguments)]
fn attach_reserved(
    state: &Arc<State>,
    w: &Workloads,
    pid: u32,
    identity: &workload::Identity,
    selector: &Selector,
    tracking: Arc<Tracking>,
    fresh: bool,
    just_started: bool,
) {
    if fresh {
        restore_series(state, &tracking, &identity.id);
    }
    let release = |error: Option<String>| {
        if let Some(e) = w.registry.lock().unwrap().get_mut(&identity.id) {
            e.workload.pid = None;
            e.workload.last_error = error;
        }
    };
    if let Err(e) = state.begin_attach(pid) {
        release(Some(e.to_string()));
        return;
    }
    let started = Instant::now();
    let target = loop {
        match state.attacher.attach(pid) {
            Ok(t) => break Ok(t),
            Err(e) if just_started && started.elapsed() < ATTACH_RETRY_FOR && crate::procfs::exists(pid) => {
                tracing::debug!(pid, error = %crate::errors::one_line(&e), "attach after exec or fork failed; retrying");
                std::thread::sleep(Duration::from_millis(40));
            }
            Err(e) => break Err(crate::errors::one_line(&e)),
        }
    };
    state.attaching.lock().unwrap().remove(&pid);
    let target: Arc<dyn TracedTarget> = match target {
        Ok(t) => t,
        // Gone meanwhile (a short-lived child, a restart): not a failure of the workload.
        Err(line) if !crate::procfs::running(pid) => {
            tracing::debug!(pid, workload = %identity.id, error = %line, "the process exited while it was being attached");
            w.forks.exited_while_attaching.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            release(None);
            return;
        }
        Err(line) => {
            warn!(pid, workload = %identity.id, error = %line, "attaching a workload's process failed");
            release(Some(line));
            return;
        }
    };
    let restarted = {
        let mut reg = w.registry.lock().unwrap();
        let e = reg.get_mut(&identity.id).expect("registered above");
        e.workload.attached(pid, identity.labels.clone(), now_ms());
        e.workload.restarts > 0
    };
    w.by_pid.lock().unwrap().insert(pid, identity.id.clone());
    let previous: Vec<TargetEntry> = {
        let mut targets = state.targets.write().unwrap();
        // The entries of the workload's previous processes: their probes are detached now.
        let old: Vec<u32> =
            targets.iter().filter(|(p, e)| **p != pid && Arc::ptr_eq(&e.tracking, &tracking)).map(|(p, _)| *p).collect();
        let previous = old.iter().filter_map(|p| targets.remove(p)).collect();
        targets.insert(pid, TargetEntry { target: target.clone(), attached_at_ms: now_ms(), tracking: tracking.clone() });
        previous
    };
    drop(previous);
    if identity.labels.contains_key("worker") {
        w.forks.attached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    info!(pid, workload = %identity.id, selector = %selector.expr, restarted,
          latency_ms = started.elapsed().as_millis() as u64, "workload attached");
    tracking.remove_finished();
    if !selector.triggers.is_empty() {
        let spacing = state.trigger_settings.min_spacing;
        if let Err(e) = triggers::attach(state, &*target, &tracking, &selector.triggers, spacing, triggers::Origin::Selector, selector.pause_budget) {
            warn!(pid, workload = %identity.id, error = %e, "attaching the selector's triggers failed");
        }
    }
}

/// A workload seen for the first time in this run of the agent continues the series of its
/// stored snapshots (those of before a restart of the agent), and of their V8 heap summaries.
fn restore_series(state: &State, tracking: &Tracking, id: &str) {
    let mut metas: Vec<_> = state.store.list().into_iter().filter(|m| m.workload.as_deref() == Some(id)).collect();
    let keep = state.trigger_settings.verdict_window;
    let metas = metas.split_off(metas.len().saturating_sub(keep));
    for m in &metas {
        let Ok(sid) = crate::store::SnapshotId::parse(&m.id) else { continue };
        match state.store.get(&sid) {
            Ok((_, p)) => {
                triggers::note_snapshot(state, tracking, &p, &m.id, &[]);
                super::v8::restore_summary(state, tracking, &m.id);
            }
            Err(e) => warn!(id = %m.id, error = %e, "a stored snapshot of a workload is unreadable"),
        }
    }
    if !metas.is_empty() {
        info!(workload = id, snapshots = metas.len(), "workload series restored from the store");
    }
}

/// `pid` exited: its workload has no process now; the target is detached once its triggers
/// (an exit snapshot) are done.
fn exited(state: &Arc<State>, pid: u32) {
    let Some(w) = state.workloads.get() else { return };
    let Some(id) = w.by_pid.lock().unwrap().remove(&pid) else { return };
    let tracking = {
        let mut reg = w.registry.lock().unwrap();
        let Some(e) = reg.get_mut(&id) else { return };
        if e.workload.pid == Some(pid) {
            e.workload.gone();
        }
        e.tracking.clone()
    };
    info!(pid, workload = %id, "workload process exited");
    let st = state.clone();
    let limit = state.request_timeout;
    tokio::spawn(async move {
        let started = Instant::now();
        while !tracking.idle() && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let removed = {
            let mut targets = st.targets.write().unwrap();
            match targets.get(&pid) {
                Some(e) if Arc::ptr_eq(&e.tracking, &tracking) => targets.remove(&pid),
                _ => None,
            }
        };
        // Dropped off the async threads: detaching takes the kernel a while.
        if let Some(entry) = removed {
            drop(tokio::task::spawn_blocking(move || drop(entry)));
        }
    });
}

/// Adds the workload labels (workload, node, namespace, pod, container, executable) to the
/// stats of the targets that are workloads' processes.
pub(crate) fn label_stats(state: &State, stats: &mut [crate::target::TargetStats]) {
    let Some(w) = state.workloads.get() else { return };
    for s in stats {
        if let Some((id, labels)) = w.labels_of_pid(s.pid) {
            s.labels.insert("workload".into(), id);
            for k in PUSH_LABELS {
                if let Some(v) = labels.get(*k) {
                    s.labels.insert(k.to_string(), v.clone());
                }
            }
        }
    }
}

/// The labels a workload's figures carry outside the agent (`/metrics`, `--push`).
pub const PUSH_LABELS: &[&str] = &["node", "namespace", "pod", "container", "executable", "worker"];

/// Makes the target `pid` (attached already) the process of a workload `id`, for the API's
/// tests (which have no real processes to discover).
#[cfg(test)]
pub(crate) fn adopt_for_test(state: &State, pid: u32, id: &str, data_dir: &std::path::Path) {
    let w = state.workloads.get_or_init(|| Arc::new(Workloads::new(&NodeConfig::default(), data_dir).unwrap()));
    let tracking = state.targets.read().unwrap()[&pid].tracking.clone();
    let identity = workload::Identity { id: id.to_string(), labels: [("node".to_string(), "n1".to_string())].into() };
    let mut workload = Workload::new(&identity, "s000000000000", now_ms());
    workload.attached(pid, identity.labels.clone(), now_ms());
    w.registry.lock().unwrap().insert(id.to_string(), Entry { workload, tracking });
    w.by_pid.lock().unwrap().insert(pid, id.to_string());
}

// ---------------------------------------------------------------------------------------------
// Push

/// Every `--push-interval`, one heap profile per attached workload, queued for the pusher.
pub(crate) fn spawn_push(state: &Arc<State>) -> Option<tokio::task::JoinHandle<()>> {
    let pusher = state.workloads.get()?.pusher.get()?.clone();
    let state = state.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(pusher.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        loop {
            tick.tick().await;
            let (st, p, last) = (state.clone(), pusher.clone(), last.clone());
            let _ = tokio::task::spawn_blocking(move || push_round(&st, &p, &last)).await;
        }
    }))
}

/// One round: a profile of each attached workload, queued.
fn push_round(state: &State, pusher: &Pusher, last: &Mutex<HashMap<String, u64>>) {
    let Some(w) = state.workloads.get() else { return };
    let list = w.list();
    // Bounded by the workloads listed now (not by every workload ever pushed).
    last.lock().unwrap().retain(|id, _| list.iter().any(|w| w.id == *id));
    for wl in list.into_iter().filter(|w| w.attached) {
        let Some(pid) = wl.pid else { continue };
        let Some(target) = state.targets.read().unwrap().get(&pid).map(|e| e.target.clone()) else { continue };
        let skipped = || pusher.stats.skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(_permit) = state.expensive.clone().try_acquire_owned() else {
            skipped();
            continue;
        };
        let profile = match target.snapshot(state.trigger_settings.min_age) {
            Ok(p) => p,
            Err(e) => {
                warn!(pid, workload = %wl.id, error = %crate::errors::one_line(&e), "snapshot for push failed");
                skipped();
                continue;
            }
        };
        let body = match crate::render::pprof::pprof_gz(&profile) {
            Ok(b) => b,
            Err(e) => {
                warn!(workload = %wl.id, error = %e, "rendering a pushed profile failed");
                skipped();
                continue;
            }
        };
        let mut labels: BTreeMap<String, String> =
            PUSH_LABELS.iter().filter_map(|k| wl.labels.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
        labels.insert("workload".into(), wl.id.clone());
        let app = wl
            .labels
            .get("container")
            .cloned()
            .unwrap_or_else(|| wl.labels.get("executable").map(|e| e.rsplit('/').next().unwrap_or(e).to_string()).unwrap_or_default());
        let until = profile.taken_at_ms / 1000;
        let from = last.lock().unwrap().insert(wl.id.clone(), until).unwrap_or_else(|| wl.attached_at_ms.unwrap_or(profile.taken_at_ms) / 1000);
        pusher.enqueue(PushJob { query: push::ingest_query(&app, &labels, from, until), body });
    }
}

/// What became of the children of `forks=true` workloads, and the reloads of `--select-file`,
/// in the Prometheus text format.
pub(crate) fn node_metrics(state: &State) -> String {
    use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
    let Some(w) = state.workloads.get() else { return String::new() };
    let f = &w.forks;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP memscope_forks_total Children of forks=true workloads, by what became of them.\n# TYPE memscope_forks_total counter"
    );
    for (result, n) in [
        ("seen", &f.seen),
        ("short_lived", &f.short_lived),
        ("exited_while_attaching", &f.exited_while_attaching),
        ("attached", &f.attached),
    ] {
        let _ = writeln!(out, "memscope_forks_total{{result=\"{result}\"}} {}", n.load(Relaxed));
    }
    if w.select_file.is_some() {
        let _ = writeln!(
            out,
            "# HELP memscope_select_file_reloads_total Changes of --select-file applied or refused (unreadable, a bad line).\n# TYPE memscope_select_file_reloads_total counter"
        );
        for (result, n) in [("applied", &w.reloads_applied), ("refused", &w.reloads_refused)] {
            let _ = writeln!(out, "memscope_select_file_reloads_total{{result=\"{result}\"}} {}", n.load(Relaxed));
        }
    }
    out
}

/// The pusher's counters in the Prometheus text format (empty without `--push`).
pub(crate) fn push_metrics(state: &State) -> String {
    use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
    let Some(p) = state.workloads.get().and_then(|w| w.pusher.get()) else { return String::new() };
    let s = &p.stats;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP memscope_push_profiles_total Heap profiles for --push, by result.\n# TYPE memscope_push_profiles_total counter");
    for (result, n) in [("sent", &s.sent), ("failed", &s.failed), ("dropped", &s.dropped), ("skipped", &s.skipped)] {
        let _ = writeln!(out, "memscope_push_profiles_total{{result=\"{result}\"}} {}", n.load(Relaxed));
    }
    let _ = writeln!(out, "# HELP memscope_push_retries_total Posts to the ingest endpoint retried.\n# TYPE memscope_push_retries_total counter");
    let _ = writeln!(out, "memscope_push_retries_total {}", s.retries.load(Relaxed));
    let _ = writeln!(out, "# HELP memscope_push_bytes_total Bytes of profiles the ingest endpoint accepted.\n# TYPE memscope_push_bytes_total counter");
    let _ = writeln!(out, "memscope_push_bytes_total {}", s.bytes.load(Relaxed));
    out
}
