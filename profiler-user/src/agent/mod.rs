//! The long-running agent itself, without HTTP: how a process (a pod's container, or a `--pid`)
//! becomes a traced target and what the agent does with it on its own.
//!
//! - [`State`]: the target registry (pid -> [`TargetEntry`]: the attached target, its snapshot
//!   triggers and series), the pids being attached (one attach per pid, a cap on targets),
//!   the snapshot store and the cap on expensive work shared with the HTTP layer.
//! - [`workloads`]: selectors and workloads: discovery events (exec, fork, exit) and the scan at
//!   start become attaches and detaches; a workload keeps its id, series and snapshots across
//!   restarts of its process; `--push` of each workload's profile.
//! - [`triggers`]: the snapshot triggers of each target, the poller that fires them, the leak
//!   verdicts of each target's series.
//! - [`pauses`]: the pause window of a traced target while V8 walks its heap.
//! - [`v8`]: the V8 heap summaries stored with snapshots (`--v8-summaries`, the `heap_limit`
//!   trigger) and their verdicts.
//!
//! [`start`] attaches what the command line names and starts discovery; [`spawn_background`]
//! runs the trigger poller and the pusher. [`crate::api`] serves all this over HTTP (routes,
//! auth, limits, TLS) and calls into this module; nothing here knows of HTTP, `api` or `cli`.
use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{sync::Semaphore, task::JoinHandle};
use tracing::info;

use crate::{
    store::SnapshotStore,
    target::{Attacher, TracedTarget},
    trigger::TriggerSpec,
};

pub mod pauses;
pub mod triggers;
pub mod v8;
pub mod workloads;

pub use triggers::TriggerSettings;

/// A traced target as the agent holds it.
pub struct TargetEntry {
    pub target: Arc<dyn TracedTarget>,
    pub attached_at_ms: u64,
    /// Its snapshot triggers, recent snapshots and verdicts.
    pub tracking: Arc<triggers::Tracking>,
}

/// Why an attach was refused before it began.
#[derive(Debug, thiserror::Error)]
pub enum AttachRefused {
    #[error("process {0} is already traced")]
    AlreadyAttached(u32),
    #[error("already tracing {0} targets (--max-targets); detach one first")]
    TooManyTargets(usize),
}

/// The agent's state: targets, workloads, triggers, store (see the module doc).
pub struct State {
    pub(crate) attacher: Arc<dyn Attacher>,
    pub(crate) targets: RwLock<BTreeMap<u32, TargetEntry>>,
    /// Pids being attached right now (a second attach of the same pid is a conflict).
    pub(crate) attaching: Mutex<HashSet<u32>>,
    pub(crate) store: Arc<SnapshotStore>,
    /// The cap on expensive work (renders, snapshots, V8 sessions), shared with the HTTP layer.
    pub(crate) expensive: Arc<Semaphore>,
    /// Most targets at once.
    pub(crate) max_targets: usize,
    /// How long a snapshot, a V8 session or an exit snapshot's wait for a permit may take.
    pub(crate) request_timeout: Duration,
    /// Work refused because the cap on expensive work was full (shared with the HTTP metrics).
    pub(crate) refused_busy: Arc<AtomicU64>,
    pub(crate) trigger_settings: TriggerSettings,
    /// Ids of triggers, unique within this run of the agent.
    pub(crate) next_trigger_id: AtomicU64,
    /// Verdicts of stored snapshots, by snapshot id (in memory only).
    pub(crate) snapshot_verdicts: Mutex<std::collections::HashMap<String, triggers::StoredVerdicts>>,
    /// `--v8-summaries`: every stored snapshot of a Node.js target gets a V8 heap summary.
    pub(crate) v8_summaries: AtomicBool,
    /// Selectors and workloads (set by [`start`]).
    pub(crate) workloads: std::sync::OnceLock<Arc<workloads::Workloads>>,
}

impl State {
    pub fn new(
        attacher: Arc<dyn Attacher>,
        store: Arc<SnapshotStore>,
        max_expensive: usize,
        max_targets: usize,
        request_timeout: Duration,
    ) -> State {
        State {
            attacher,
            targets: RwLock::new(BTreeMap::new()),
            attaching: Mutex::new(HashSet::new()),
            store,
            expensive: Arc::new(Semaphore::new(max_expensive.max(1))),
            max_targets,
            request_timeout,
            refused_busy: Arc::new(AtomicU64::new(0)),
            trigger_settings: TriggerSettings::default(),
            next_trigger_id: AtomicU64::new(1),
            snapshot_verdicts: Mutex::new(std::collections::HashMap::new()),
            v8_summaries: AtomicBool::new(false),
            workloads: std::sync::OnceLock::new(),
        }
    }

    /// A new entry for a target attached now.
    pub(crate) fn entry(&self, target: Arc<dyn TracedTarget>) -> TargetEntry {
        TargetEntry {
            target,
            attached_at_ms: now_ms(),
            tracking: Arc::new(triggers::Tracking::new(self.trigger_settings.verdict_window)),
        }
    }

    /// Adds a target attached outside the API (at start); returns its tracking state.
    pub fn insert_target(&self, target: Arc<dyn TracedTarget>) -> Arc<triggers::Tracking> {
        let entry = self.entry(target.clone());
        let tracking = entry.tracking.clone();
        self.targets.write().unwrap().insert(target.pid(), entry);
        tracking
    }

    /// Whether one more target may be attached (`--max-targets`).
    pub(crate) fn has_target_room(&self) -> bool {
        let targets = self.targets.read().unwrap();
        targets.len() + self.attaching.lock().unwrap().len() < self.max_targets
    }

    /// Reserves `pid` for an attach: refused when it is attached, being attached, or the target
    /// limit is reached.
    pub(crate) fn begin_attach(&self, pid: u32) -> Result<(), AttachRefused> {
        let targets = self.targets.read().unwrap();
        let mut attaching = self.attaching.lock().unwrap();
        if targets.contains_key(&pid) || attaching.contains(&pid) {
            return Err(AttachRefused::AlreadyAttached(pid));
        }
        if targets.len() + attaching.len() >= self.max_targets {
            return Err(AttachRefused::TooManyTargets(self.max_targets));
        }
        attaching.insert(pid);
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What [`start`] is told: the `--pid` targets and their `--trigger`s, the selectors and
/// discovery, `--push`, the data directory (persisted selectors).
pub struct StartConfig<'a> {
    pub pids: &'a [u32],
    pub triggers: &'a [TriggerSpec],
    pub node: &'a workloads::NodeConfig,
    pub data_dir: &'a Path,
}

/// Attaches the `--pid` targets (with their triggers), sets up the workload registry and the
/// pusher, and, with selectors, starts discovery and attaches every running match. Fails on the
/// first target that cannot be attached.
pub async fn start(state: &Arc<State>, config: StartConfig<'_>) -> anyhow::Result<()> {
    for &pid in config.pids {
        let attacher = state.attacher.clone();
        let target = tokio::task::spawn_blocking(move || attacher.attach(pid))
            .await
            .context("attaching")?
            .with_context(|| format!("attaching to process {pid}"))?;
        info!(pid, "attached");
        let tracking = state.insert_target(target.clone());
        if !config.triggers.is_empty() {
            let (st, specs) = (state.clone(), config.triggers.to_vec());
            let spacing = st.trigger_settings.min_spacing;
            tokio::task::spawn_blocking(move || {
                triggers::attach(&st, &*target, &tracking, &specs, spacing, triggers::Origin::Flag, None)
            })
            .await
            .context("attaching triggers")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let registry = workloads::Workloads::new(config.node, config.data_dir)?;
    let watch = registry.has_selectors();
    if let Some(push) = &config.node.push {
        let pusher = crate::export::push::Pusher::start(push.clone()).context("starting --push")?;
        let _ = registry.pusher.set(pusher);
    }
    let _ = state.workloads.set(Arc::new(registry));
    if watch {
        workloads::Workloads::start_watching(state)?;
        let st = state.clone();
        tokio::task::spawn_blocking(move || workloads::Workloads::scan(&st)).await.context("scanning processes")?;
    }
    Ok(())
}

/// The agent's background tasks: the trigger poller and the pusher (with `--push`).
pub struct Background {
    poller: JoinHandle<()>,
    pushing: Option<JoinHandle<()>>,
    /// `--select-file`'s watch.
    select_watch: Option<JoinHandle<()>>,
}

/// Starts the agent's background tasks (within a tokio runtime).
pub fn spawn_background(state: &Arc<State>) -> Background {
    Background {
        poller: triggers::spawn_poller(state.clone()),
        pushing: workloads::spawn_push(state),
        select_watch: workloads::spawn_select_file_watch(state),
    }
}

impl Background {
    /// Stops them.
    pub fn abort(self) {
        self.poller.abort();
        for task in [self.pushing, self.select_watch].into_iter().flatten() {
            task.abort();
        }
    }
}
