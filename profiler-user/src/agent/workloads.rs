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
//!
//! Capacity: the agent traces at most `--max-targets` processes. A workload found past it is
//! not refused silently: it waits in a queue (state `waiting`, a log line, `/readyz` says the
//! node is over capacity, `memscope_workloads{state="waiting"}`) and is attached, oldest
//! first, as soon as a target leaves.
//!
//! Housekeeping: a deleted selector's workloads leave the list; a workload without a process
//! is removed `--workload-ttl` after its last one exited (its stored snapshots stay, under
//! retention). A process is identified by what it runs after its `exec`: one found in
//! another cgroup than the one it exec'd in moved there since (as `runc init` joins the
//! container's cgroup, then execs the container's program) and is left for its next exec; a
//! traced process that execs is identified again.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
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

/// `--workload-ttl`: how long a workload without a process stays listed.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(6 * 3600);

/// What the node-level agent is told at start.
#[derive(Clone, Debug)]
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
    /// `--workload-ttl`.
    pub workload_ttl: Duration,
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

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            selectors: Vec::new(),
            select_file: None,
            file_selectors: Vec::new(),
            node_paths: NodePaths::default(),
            push: None,
            fork_min_lifetime: Duration::ZERO,
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        }
    }
}

/// A process waiting for a target slot.
#[derive(Clone, Debug)]
struct Queued {
    pid: u32,
    /// Its start time: a pid reused meanwhile is not the same process.
    start: u64,
    workload: String,
}

/// Node-level counters (`/metrics`).
#[derive(Default)]
pub struct Counters {
    /// New processes of known workloads attached.
    pub restarts: AtomicU64,
    /// Attaches that failed (not those that waited for capacity).
    pub attach_failures: AtomicU64,
    /// Processes that had to wait for a target slot.
    pub queued: AtomicU64,
    /// Workloads removed after `--workload-ttl` without a process.
    pub pruned: AtomicU64,
    /// Exec events of processes that had moved to another cgroup since (left for their next exec).
    pub unsettled: AtomicU64,
}

/// Why a process is considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// It exec'd, in the cgroup with this id (0: unknown).
    Exec(u64),
    /// Found running (at start, when a selector is added).
    Scan,
    /// Its turn in the capacity queue came.
    Queue,
    /// Another try (the how-many-th) after an attach right after its exec failed.
    Retry(u32),
}

/// When an attach right after an exec failed, the next try comes this much later, doubled at
/// each of at most `RETRIES` tries (1 + 2 + 4 + 8 s): on a loaded node the dynamic loader of a
/// process that just exec'd may take seconds to map its libraries (6 of 150 workloads were
/// refused with a single retry while the whole test suite ran beside them).
const RETRY_AFTER: Duration = Duration::from_secs(1);
const RETRIES: u32 = 4;

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
    /// Processes waiting for a target slot (`--max-targets`), oldest first.
    queue: Mutex<VecDeque<Queued>>,
    /// Woken when a target leaves: a slot may be free for the queue.
    slot_freed: tokio::sync::Notify,
    /// Whether the last capacity check found the node over capacity (logged when it changes).
    over_capacity: AtomicBool,
    pub(crate) counters: Counters,
    /// `--workload-ttl`.
    ttl: Duration,
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
            queue: Mutex::new(VecDeque::new()),
            slot_freed: tokio::sync::Notify::new(),
            over_capacity: AtomicBool::new(false),
            counters: Counters::default(),
            ttl: config.workload_ttl,
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
        tokio::spawn(run_queue(state.clone()));
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
                s.spawn(move || chunk.iter().for_each(|&pid| consider(state, pid, Why::Scan)));
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

    /// Every workload, and the pid traced now when there is one.
    pub fn list(&self) -> Vec<Workload> {
        self.registry.lock().unwrap().values().map(|e| e.workload.clone()).collect()
    }

    /// Each waiting workload's place in the capacity queue.
    pub fn queue_positions(&self) -> HashMap<String, usize> {
        self.queue.lock().unwrap().iter().enumerate().map(|(i, q)| (q.workload.clone(), i)).collect()
    }

    /// The workloads of the selector `sid` (just deleted) leave the list and the queue, and
    /// their processes are detached. Returns their ids and the pids detached.
    pub fn remove_workloads_of(&self, state: &State, sid: &str) -> (Vec<String>, Vec<u32>) {
        let (ids, pids): (Vec<String>, Vec<u32>) = {
            let mut reg = self.registry.lock().unwrap();
            let ids: Vec<String> = reg.iter().filter(|(_, e)| e.workload.selector == sid).map(|(id, _)| id.clone()).collect();
            let mut pids = Vec::new();
            for id in &ids {
                if let Some(e) = reg.remove(id) {
                    pids.extend(e.workload.pid);
                }
            }
            (ids, pids)
        };
        self.queue.lock().unwrap().retain(|q| !ids.contains(&q.workload));
        let mut by_pid = self.by_pid.lock().unwrap();
        let mut detached = Vec::new();
        let mut detached_pids = Vec::new();
        for pid in &pids {
            if by_pid.remove(pid).is_none() {
                continue;
            }
            detached_pids.push(*pid);
            crate::v8::channel::forget(*pid);
            if let Some(e) = state.targets.write().unwrap().remove(pid) {
                detached.push(e);
            }
        }
        drop(by_pid);
        drop(tokio::task::spawn_blocking(move || drop(detached)));
        self.slot_freed.notify_one();
        info!(selector = %sid, workloads = ids.len(), detached = detached_pids.len(), "selector deleted: its workloads left the list");
        (ids, detached_pids)
    }

    /// Processes waiting for a target slot.
    pub fn waiting(&self) -> usize {
        self.queue.lock().unwrap().len()
    }

    /// Puts `pid` of workload `id` (reserved for it) in the capacity queue: at its workload's
    /// place if the workload waits already, else at the back (at the front when its turn had
    /// come and the slot was taken meanwhile).
    fn enqueue(&self, state: &State, pid: u32, id: &str, front: bool) {
        let Ok(start) = crate::process::start_ticks(pid) else {
            self.release_gone(id, pid);
            return;
        };
        let position = {
            let mut q = self.queue.lock().unwrap();
            let entry = Queued { pid, start, workload: id.to_string() };
            match q.iter().position(|e| e.workload == id) {
                Some(i) => {
                    q[i] = entry;
                    i
                }
                None if front => {
                    q.push_front(entry);
                    0
                }
                None => {
                    q.push_back(entry);
                    q.len() - 1
                }
            }
        };
        let max = state.max_targets;
        let first_wait = {
            let mut reg = self.registry.lock().unwrap();
            let Some(e) = reg.get_mut(id) else { return };
            let first = e.workload.waiting_since_ms.is_none();
            e.workload.wait(pid, now_ms(), format!("waiting for a target slot: {max} targets traced (--max-targets)"));
            first
        };
        if first_wait && !front {
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
            warn!(pid, workload = %id, position, max_targets = max,
                  "over capacity: the workload waits for a target slot (--max-targets); attached when one is free");
        }
        if !self.over_capacity.swap(true, Ordering::Relaxed) {
            warn!(max_targets = max, "the node is over capacity: workloads wait for a target slot (see /readyz)");
        }
    }

    /// Takes `pid` out of the queue (it exited or exec'd); its workload has no process then.
    fn unqueue(&self, pid: u32) -> bool {
        let removed: Vec<Queued> = {
            let mut q = self.queue.lock().unwrap();
            let (gone, kept): (Vec<Queued>, Vec<Queued>) = q.drain(..).partition(|e| e.pid == pid);
            *q = kept.into();
            gone
        };
        for e in &removed {
            self.release_gone(&e.workload, pid);
        }
        !removed.is_empty()
    }

    /// The workload `id`, reserved or waiting for `pid`, has no process now.
    fn release_gone(&self, id: &str, pid: u32) {
        if let Some(e) = self.registry.lock().unwrap().get_mut(id) {
            if e.workload.pid == Some(pid) {
                e.workload.gone(now_ms());
            }
        }
    }

    /// Removes the workloads without a process for longer than `--workload-ttl`.
    fn prune(&self, now_ms: u64) {
        let ttl = self.ttl.as_millis() as u64;
        let mut reg = self.registry.lock().unwrap();
        let before = reg.len();
        reg.retain(|id, e| {
            let expired = e.workload.pid.is_none() && e.workload.exited_at_ms.is_some_and(|t| now_ms.saturating_sub(t) >= ttl);
            if expired {
                info!(workload = %id, "workload removed: no process for --workload-ttl (its stored snapshots stay)");
            }
            !expired
        });
        self.counters.pruned.fetch_add((before - reg.len()) as u64, Ordering::Relaxed);
    }

    /// The node-level series (`/metrics`): workloads by state, the capacity, restarts, attach
    /// failures, queued processes and pruned workloads.
    pub(crate) fn metrics(&self, state: &State) -> String {
        use std::fmt::Write as _;
        let mut by_state: BTreeMap<&'static str, u64> = ["attached", "waiting", "failed", "exited"].into_iter().map(|s| (s, 0)).collect();
        for e in self.registry.lock().unwrap().values() {
            *by_state.entry(e.workload.state()).or_default() += 1;
        }
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family("memscope_workloads", "gauge", "Workloads by state: attached, waiting (for a target slot, --max-targets), failed (the last attach failed), exited (no process; removed after --workload-ttl).");
        for (st, n) in &by_state {
            let _ = writeln!(out, "memscope_workloads{{state=\"{st}\"}} {n}");
        }
        let targets = state.targets.read().unwrap().len();
        let mut family = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        family("memscope_agent_targets", "gauge", "Processes traced now.", targets as u64);
        family("memscope_agent_max_targets", "gauge", "Processes the agent traces at most (--max-targets).", state.max_targets as u64);
        let c = &self.counters;
        family("memscope_workload_restarts_total", "counter", "New processes of known workloads attached.", c.restarts.load(Ordering::Relaxed));
        family("memscope_workload_attach_failures_total", "counter", "Attaches of workloads' processes that failed (see /v1/workloads last_error).", c.attach_failures.load(Ordering::Relaxed));
        family("memscope_workload_queued_total", "counter", "Workloads that had to wait for a target slot (--max-targets).", c.queued.load(Ordering::Relaxed));
        family("memscope_workloads_pruned_total", "counter", "Workloads removed after --workload-ttl without a process.", c.pruned.load(Ordering::Relaxed));
        family("memscope_workload_exec_moved_total", "counter", "Exec events of matching processes found in another cgroup than they exec'd in (a runtime's init before its exec): identified at their next exec.", c.unsettled.load(Ordering::Relaxed));
        out
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
        reload.detached.extend(w.remove_workloads_of(state, sid).1);
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
                    ProcEvent::Exec { pid, cgroup } => {
                        drop(tokio::task::spawn_blocking(move || {
                            // A traced (or waiting) process that execs is another program now:
                            // what it was identified by is void.
                            let previous = exec_replaced(&st, pid);
                            consider(&st, pid, Why::Exec(cgroup));
                            if let Some(old) = previous {
                                forget_if_only(&st, &old, pid);
                            }
                        }))
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
                w.prune(now_ms());
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

/// Attaches the processes of the capacity queue, oldest first, while there is room.
async fn run_queue(state: Arc<State>) {
    let Some(w) = state.workloads.get().cloned() else { return };
    loop {
        // Woken when a target leaves; every second too (targets detached through the API).
        let _ = tokio::time::timeout(Duration::from_secs(1), w.slot_freed.notified()).await;
        if w.waiting() == 0 {
            if w.over_capacity.swap(false, Ordering::Relaxed) {
                info!("the node is no longer over capacity: no workload waits for a target slot");
            }
            continue;
        }
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || drain_queue(&st)).await;
    }
}

/// One pass over the capacity queue. Blocking.
fn drain_queue(state: &Arc<State>) {
    let Some(w) = state.workloads.get() else { return };
    // Each waiting process once per pass: one put back (every slot of the probes still held
    // by departed targets) waits for the next.
    let mut turns = w.waiting();
    while turns > 0 && state.has_target_room() {
        turns -= 1;
        let Some(q) = w.queue.lock().unwrap().pop_front() else { break };
        let waiting = {
            let mut reg = w.registry.lock().unwrap();
            match reg.get_mut(&q.workload) {
                Some(e) if e.workload.pid == Some(q.pid) && e.workload.waiting_since_ms.is_some() => {
                    // Its reservation is given up for a fresh look at the process.
                    e.workload.pid = None;
                    true
                }
                _ => false,
            }
        };
        if !waiting {
            continue;
        }
        if crate::process::start_ticks(q.pid).ok() != Some(q.start) {
            if let Some(e) = w.registry.lock().unwrap().get_mut(&q.workload) {
                e.workload.gone(now_ms());
            }
            continue;
        }
        consider(state, q.pid, Why::Queue);
        // Not taken by the queue's workload (it matches nothing now, or another process of
        // the workload was attached): that workload waits no more.
        let mut reg = w.registry.lock().unwrap();
        if let Some(e) = reg.get_mut(&q.workload) {
            if e.workload.pid.is_none() && e.workload.waiting_since_ms.is_some() {
                e.workload.gone(now_ms());
            }
        }
    }
}

/// `pid`, traced or waiting, exec'd: it is detached (no exit snapshot: it did not exit) and
/// its workload has no process. Returns that workload. Blocking.
fn exec_replaced(state: &Arc<State>, pid: u32) -> Option<String> {
    let w = state.workloads.get()?;
    let queued = w.queue.lock().unwrap().iter().find(|e| e.pid == pid).map(|e| e.workload.clone());
    if let Some(id) = queued {
        w.unqueue(pid);
        return Some(id);
    }
    let id = w.by_pid.lock().unwrap().remove(&pid)?;
    if let Some(e) = w.registry.lock().unwrap().get_mut(&id) {
        if e.workload.pid == Some(pid) {
            e.workload.gone(now_ms());
        }
    }
    crate::v8::channel::forget(pid);
    let removed = state.targets.write().unwrap().remove(&pid);
    drop(removed);
    info!(pid, workload = %id, "a traced process exec'd: identified again by what it runs now");
    Some(id)
}

/// After `pid` exec'd: the workload `id` it was known by before, if it never had another
/// process, no snapshot and no process now, was only its image before that exec (a
/// wrapper, a runtime's init): it leaves the list.
fn forget_if_only(state: &State, id: &str, pid: u32) {
    let Some(w) = state.workloads.get() else { return };
    if w.by_pid.lock().unwrap().get(&pid).is_some_and(|now| now == id) {
        return;
    }
    let mut reg = w.registry.lock().unwrap();
    let only = reg.get(id).is_some_and(|e| e.workload.pid.is_none() && e.workload.pids.iter().all(|&p| p == pid));
    if only && !state.store.list().iter().any(|m| m.workload.as_deref() == Some(id)) {
        reg.remove(id);
        info!(pid, workload = %id, "workload removed: it was a process's image before its exec");
    }
}

/// Attaches `pid` if a selector matches it and its workload has no process traced. Blocking.
/// Under a `forks=true` selector, a process whose parent is of the same workload is a worker:
/// attached as one when its parent is traced (else left for its parent's turn).
fn consider(state: &Arc<State>, pid: u32, why: Why) {
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
    // Identified by what it exec'd: a process in another cgroup than the one it exec'd in
    // moved there since (a runtime's init joining the container), and runs the image it will
    // replace at its next exec.
    if let Why::Exec(exec_cgroup) = why {
        let now = discover::identity::cgroup_v2_id(pid);
        if exec_cgroup != 0 && now.is_some_and(|c| c != exec_cgroup) {
            w.counters.unsettled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pid, exe = %info.exe, "moved to another cgroup since its exec: identified at its next exec");
            return;
        }
    }
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
        attach_reserved(state, w, pid, &identity, &selector, tracking, fresh, why);
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
            return attach_reserved(state, w, child, &identity, &selector, tracking, fresh, Why::Exec(0));
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
                e.workload.gone(now_ms());
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
/// selector's triggers. After an exec or a fork (`why`), a failed attach is retried for a
/// while; without room (`--max-targets`, or every slot of the probes taken) the process
/// waits in the capacity queue. Blocking.
#[allow(clippy::too_many_arguments)]
fn attach_reserved(
    state: &Arc<State>,
    w: &Workloads,
    pid: u32,
    identity: &workload::Identity,
    selector: &Selector,
    tracking: Arc<Tracking>,
    fresh: bool,
    why: Why,
) {
    if fresh {
        restore_series(state, &tracking, &identity.id);
    }
    let just_started = matches!(why, Why::Exec(_));
    let release = |error: String| {
        w.counters.attach_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = w.registry.lock().unwrap().get_mut(&identity.id) {
            e.workload.failed(error, now_ms());
        }
    };
    if let Err(e) = state.begin_attach(pid) {
        match e {
            crate::agent::AttachRefused::TooManyTargets(_) => w.enqueue(state, pid, &identity.id, why == Why::Queue),
            e => release(e.to_string()),
        }
        return;
    }
    let started = Instant::now();
    let target = loop {
        let attached = if selector.follow_forks { state.attacher.attach_forking(pid) } else { state.attacher.attach(pid) };
        match attached {
            Ok(t) => break Ok(t),
            Err(e) if e.downcast_ref::<crate::bpf::target_view::SlotError>().is_some_and(|e| matches!(e, crate::bpf::target_view::SlotError::Full(_))) => {
                break Err(None);
            }
            Err(e) if just_started && started.elapsed() < ATTACH_RETRY_FOR && crate::procfs::exists(pid) => {
                tracing::debug!(pid, error = %crate::errors::one_line(&e), "attach after exec or fork failed; retrying");
                std::thread::sleep(Duration::from_millis(40));
            }
            Err(e) => break Err(Some(crate::errors::one_line(&e))),
        }
    };
    state.attaching.lock().unwrap().remove(&pid);
    let target: Arc<dyn TracedTarget> = match target {
        Ok(t) => t,
        // Gone meanwhile (a short-lived child, a restart): not a failure of the workload.
        Err(Some(line)) if !crate::procfs::running(pid) => {
            tracing::debug!(pid, workload = %identity.id, error = %line, "the process exited while it was being attached");
            w.forks.exited_while_attaching.fetch_add(1, Ordering::Relaxed);
            if let Some(e) = w.registry.lock().unwrap().get_mut(&identity.id) {
                e.workload.gone(now_ms());
            }
            return;
        }
        // Every slot of the probes is taken (departed targets not yet released): it waits.
        Err(None) => return w.enqueue(state, pid, &identity.id, true),
        Err(Some(line)) => {
            warn!(pid, workload = %identity.id, error = %line, "attaching a workload's process failed");
            release(line);
            // Just started on a loaded node, its loader may still be mapping its libraries
            // after the retry window: a few more tries, further and further apart.
            let tries = match why {
                Why::Exec(_) => Some(0),
                Why::Retry(n) if n + 1 < RETRIES => Some(n + 1),
                _ => None,
            };
            if let Some(n) = tries.filter(|_| crate::procfs::exists(pid)) {
                let st = state.clone();
                let _ = std::thread::Builder::new().name("attach-retry".into()).spawn(move || {
                    std::thread::sleep(RETRY_AFTER * 2u32.pow(n));
                    consider(&st, pid, Why::Retry(n));
                });
            }
            return;
        }
    };
    let restarted = {
        let mut reg = w.registry.lock().unwrap();
        let e = reg.get_mut(&identity.id).expect("registered above");
        let restarts = e.workload.restarts;
        e.workload.attached(pid, identity.labels.clone(), now_ms());
        if e.workload.restarts > restarts {
            w.counters.restarts.fetch_add(1, Ordering::Relaxed);
        }
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
    if w.unqueue(pid) {
        return;
    }
    let Some(id) = w.by_pid.lock().unwrap().remove(&pid) else { return };
    let tracking = {
        let mut reg = w.registry.lock().unwrap();
        let Some(e) = reg.get_mut(&id) else { return };
        if e.workload.pid == Some(pid) {
            e.workload.gone(now_ms());
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
        if let Some(w) = st.workloads.get() {
            w.slot_freed.notify_one();
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

/// The targets' figures for `/metrics`. A workload's process is labelled by its workload
/// (workload, node, namespace, pod, container, executable, worker), never by its pid: the
/// series of a workload keep their labels across its restarts. A previous process of a
/// workload still being detached (its exit snapshot) is left out, so that one workload has
/// one series. Other targets (`--pid`, `POST /v1/targets`) are labelled by pid and comm.
pub(crate) fn metric_stats(state: &State) -> Vec<crate::target::TargetStats> {
    let w = state.workloads.get();
    let targets = state.targets.read().unwrap();
    let mut out = Vec::with_capacity(targets.len());
    for (pid, e) in targets.iter() {
        let current = w.and_then(|w| w.labels_of_pid(*pid));
        if e.tracking.workload().is_some() && current.is_none() {
            continue;
        }
        let mut s = e.target.stats();
        if let Some((id, labels)) = current {
            s.labels.insert("workload".into(), id);
            for k in PUSH_LABELS {
                if let Some(v) = labels.get(*k) {
                    s.labels.insert(k.to_string(), v.clone());
                }
            }
        }
        out.push(s);
    }
    out
}

/// What `/readyz` says of the capacity.
#[derive(Serialize)]
pub(crate) struct Capacity {
    pub targets: usize,
    pub max_targets: usize,
    /// Workloads waiting for a target slot.
    pub waiting: usize,
    pub over_capacity: bool,
}

pub(crate) fn capacity(state: &State) -> Capacity {
    let waiting = state.workloads.get().map_or(0, |w| w.waiting());
    let targets = state.targets.read().unwrap().len();
    Capacity { targets, max_targets: state.max_targets, waiting, over_capacity: waiting > 0 }
}

/// The node-level series (`memscope_workloads{state}`, capacity, counters, forks, reloads).
pub(crate) fn node_metrics(state: &State) -> String {
    state.workloads.get().map(|w| w.metrics(state) + &fork_metrics(w)).unwrap_or_default()
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
        let app = push::service_name(&wl.id, &wl.labels);
        let until = profile.taken_at_ms / 1000;
        let from = last.lock().unwrap().insert(wl.id.clone(), until).unwrap_or_else(|| wl.attached_at_ms.unwrap_or(profile.taken_at_ms) / 1000);
        pusher.enqueue(PushJob { query: push::ingest_query(&app, &labels, from, until), body });
    }
}

/// What became of the children of `forks=true` workloads, and the reloads of `--select-file`,
/// in the Prometheus text format.
fn fork_metrics(w: &Workloads) -> String {
    use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
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
