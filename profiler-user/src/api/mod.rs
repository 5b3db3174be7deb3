//! The agent's HTTP maintenance endpoint: `memscope agent` serves live heap reports, leak
//! reports, flamegraphs, stored snapshots and their diffs, and Prometheus metrics, for the
//! targets it traces (through an [`Attacher`]; the API knows nothing of eBPF).
//!
//! Security is on by default: loopback unless told otherwise, a remote address only with TLS
//! (or `--allow-insecure-remote`, with a warning at start and in `/readyz`), bearer tokens with
//! `read` and `admin` roles from a 0600 token file ([`auth`]), rate limits, single-flight and a
//! cap on expensive work ([`limits`]), a 16 KiB body limit, timeouts, an audit log, and JSON
//! errors ([`errors`]).
//!
//! Layout: [`routes`] (filters), [`handlers`], [`auth`], [`limits`] (rate budgets: a valid
//! token's own, the unauthenticated ones apart), [`errors`], [`metrics`], [`audit`] (bounded
//! audit lines: clipped values, aggregated denials), [`tls`] (listener, TLS, connection cap)
//! and [`conn_limits`] (which connections give way under the cap), [`triggers`] (snapshot
//! triggers, their poller, and leak verdicts per target). Snapshots are kept by
//! [`crate::store`].
//!
//! Limits: HTTP/1.1 only; one agent per data directory; the handshake timeout and connection
//! cap bound what a slow client holds, not what a botnet sends.
use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, Mutex, RwLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use tokio::sync::Semaphore;
use tracing::{info, warn};
use warp::hyper::{
    self,
    service::{make_service_fn, service_fn, Service as _},
};

use crate::{
    store::{Retention, SnapshotStore},
    target::{Attacher, TracedTarget},
    trigger::TriggerSpec,
};

pub mod audit;
pub mod auth;
pub mod conn_limits;
pub mod errors;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod pauses;
pub mod routes;
pub mod tls;
pub mod triggers;
pub mod v8;
pub mod workloads;

#[cfg(test)]
mod tests;

pub use errors::ApiError;
pub use limits::Limits;
pub use triggers::TriggerSettings;

/// How long requests in progress may still run after the shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

/// PEM files for TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything `memscope agent` is told on its command line.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    /// The token file; the agent refuses to start without one.
    pub tokens_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// Serve a non-loopback address without TLS (tokens then cross the network in clear).
    pub allow_insecure_remote: bool,
    pub data_dir: PathBuf,
    pub retention: Retention,
    /// Processes to attach to at start.
    pub pids: Vec<u32>,
    /// Snapshot triggers given on the command line, attached to each of `pids` at start.
    pub triggers: Vec<TriggerSpec>,
    /// `--min-spacing`, `--verdict-window`.
    pub trigger_settings: TriggerSettings,
    pub limits: Limits,
    /// `--allow-eval`: tokens of role `eval` may evaluate expressions in Node.js targets.
    pub allow_eval: bool,
    /// Selectors and discovery (`--select`, `--node-root`).
    pub node: workloads::NodeConfig,
    /// `--v8-summaries`: a V8 heap summary with every stored snapshot of a Node.js target.
    pub v8_summaries: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            tokens_file: None,
            tls: None,
            allow_insecure_remote: false,
            data_dir: PathBuf::from(crate::store::DEFAULT_DATA_DIR),
            retention: Retention::default(),
            pids: Vec::new(),
            triggers: Vec::new(),
            trigger_settings: TriggerSettings::default(),
            limits: Limits::default(),
            allow_eval: false,
            node: workloads::NodeConfig::default(),
            v8_summaries: false,
        }
    }
}

/// A traced target as the agent holds it.
pub struct TargetEntry {
    pub target: Arc<dyn TracedTarget>,
    pub attached_at_ms: u64,
    /// Its snapshot triggers, recent snapshots and verdicts.
    pub tracking: Arc<triggers::Tracking>,
}

/// Everything the handlers share.
pub struct State {
    pub(crate) auth: Arc<auth::Auth>,
    pub(crate) attacher: Arc<dyn Attacher>,
    pub(crate) targets: RwLock<BTreeMap<u32, TargetEntry>>,
    /// Pids being attached right now (a second attach of the same pid is a conflict).
    pub(crate) attaching: Mutex<HashSet<u32>>,
    pub(crate) store: Arc<SnapshotStore>,
    pub(crate) limiter: limits::RateLimiter,
    /// Denied requests, written to the audit log with bounds.
    pub(crate) denials: audit::DenialLog,
    pub(crate) flights: limits::SingleFlight,
    pub(crate) expensive: Arc<Semaphore>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) limits: Limits,
    /// Shown by `/readyz` (e.g. an insecure remote listener).
    pub(crate) warnings: Vec<String>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) trigger_settings: TriggerSettings,
    /// Ids of triggers, unique within this run of the agent.
    pub(crate) next_trigger_id: AtomicU64,
    /// Verdicts of stored snapshots, by snapshot id (in memory only).
    pub(crate) snapshot_verdicts: Mutex<std::collections::HashMap<String, triggers::StoredVerdicts>>,
    /// Heap snapshots in flight, eval spacing, `--allow-eval` (Node.js targets).
    pub(crate) v8: v8::V8State,
    /// Selectors and workloads (set by [`Agent::start`]).
    pub(crate) workloads: std::sync::OnceLock<Arc<workloads::Workloads>>,
}

impl State {
    pub fn new(
        auth: Arc<auth::Auth>,
        attacher: Arc<dyn Attacher>,
        store: Arc<SnapshotStore>,
        limits: Limits,
        warnings: Vec<String>,
    ) -> State {
        State {
            auth,
            attacher,
            targets: RwLock::new(BTreeMap::new()),
            attaching: Mutex::new(HashSet::new()),
            store,
            limiter: limits::RateLimiter::new(&limits),
            denials: audit::DenialLog::default(),
            flights: limits::SingleFlight::new(),
            expensive: Arc::new(Semaphore::new(limits.max_expensive.max(1))),
            metrics: metrics::Metrics::default(),
            limits,
            warnings,
            shutting_down: AtomicBool::new(false),
            trigger_settings: TriggerSettings::default(),
            next_trigger_id: AtomicU64::new(1),
            snapshot_verdicts: Mutex::new(std::collections::HashMap::new()),
            v8: v8::V8State::default(),
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
        targets.len() + self.attaching.lock().unwrap().len() < self.limits.max_targets
    }

    /// Reserves `pid` for an attach: 409 when it is attached, being attached, or the target
    /// limit is reached.
    pub(crate) fn begin_attach(&self, pid: u32) -> Result<(), ApiError> {
        let targets = self.targets.read().unwrap();
        let mut attaching = self.attaching.lock().unwrap();
        if targets.contains_key(&pid) || attaching.contains(&pid) {
            return Err(ApiError::conflict("already_attached", format!("process {pid} is already traced")));
        }
        if targets.len() + attaching.len() >= self.limits.max_targets {
            return Err(ApiError::conflict(
                "too_many_targets",
                format!("already tracing {} targets (--max-targets); detach one first", self.limits.max_targets),
            ));
        }
        attaching.insert(pid);
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A started agent: checks passed, tokens loaded, store opened, targets attached, socket bound.
pub struct Agent {
    state: Arc<State>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    local_addr: SocketAddr,
}

/// The refusals that happen before anything is opened: no token file, or a remote address
/// without TLS. Returns the warnings to show (in the log and in `/readyz`).
pub fn check_config(config: &AgentConfig) -> anyhow::Result<Vec<String>> {
    if config.tokens_file.is_none() {
        bail!("refusing to start without --tokens FILE (lines `NAME ROLE TOKEN`, mode 0600)");
    }
    let mut warnings = Vec::new();
    if !config.listen.ip().is_loopback() && config.tls.is_none() {
        if !config.allow_insecure_remote {
            bail!(
                "refusing to listen on {} without TLS: give --tls-cert and --tls-key, \
                 or --allow-insecure-remote to send tokens in clear",
                config.listen
            );
        }
        warnings.push(format!(
            "serving non-loopback address {} without TLS (--allow-insecure-remote): tokens and \
             reports cross the network in clear",
            config.listen
        ));
    }
    Ok(warnings)
}

impl Agent {
    /// Does everything that can fail at start, in order: configuration checks, token file,
    /// TLS files, snapshot store, attaching `--pid` targets, binding the socket.
    pub async fn start(config: AgentConfig, attacher: Arc<dyn Attacher>) -> anyhow::Result<Agent> {
        let warnings = check_config(&config)?;
        let tokens_file = config.tokens_file.clone().expect("checked");
        let auth = Arc::new(auth::Auth::load(&tokens_file)?);
        let tls = match &config.tls {
            Some(files) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(&files.cert, &files.key)?)),
            None => None,
        };
        let data_dir = config.data_dir.clone();
        let retention = config.retention;
        let (store, report) = tokio::task::spawn_blocking(move || SnapshotStore::open(&data_dir, retention))
            .await
            .context("opening the snapshot store")?
            .with_context(|| format!("opening the snapshot store in {}", config.data_dir.display()))?;
        info!(
            dir = %config.data_dir.display(),
            snapshots = report.loaded,
            stray_temp_files = report.stray_temp_files.len(),
            unreadable = report.unreadable.len(),
            removed_by_retention = report.removed_by_retention.len(),
            "snapshot store opened"
        );
        for w in &warnings {
            warn!("{w}");
        }
        let mut state = State::new(auth, attacher.clone(), Arc::new(store), config.limits.clone(), warnings);
        state.trigger_settings = config.trigger_settings.clone();
        state.v8.allow_eval.store(config.allow_eval, std::sync::atomic::Ordering::Relaxed);
        state.v8.summaries.store(config.v8_summaries, std::sync::atomic::Ordering::Relaxed);
        let state = Arc::new(state);
        for &pid in &config.pids {
            let attacher = attacher.clone();
            let target = tokio::task::spawn_blocking(move || attacher.attach(pid))
                .await
                .context("attaching")?
                .with_context(|| format!("attaching to process {pid}"))?;
            info!(pid, "attached");
            let tracking = state.insert_target(target.clone());
            if !config.triggers.is_empty() {
                let (st, specs) = (state.clone(), config.triggers.clone());
                let spacing = st.trigger_settings.min_spacing;
                tokio::task::spawn_blocking(move || {
                    triggers::attach(&st, &*target, &tracking, &specs, spacing, triggers::Origin::Flag, None)
                })
                .await
                .context("attaching triggers")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        let registry = workloads::Workloads::new(&config.node, &config.data_dir)?;
        let watch = registry.has_selectors();
        if let Some(push) = &config.node.push {
            let pusher = crate::export::push::Pusher::start(push.clone()).context("starting --push")?;
            let _ = registry.pusher.set(pusher);
        }
        let _ = state.workloads.set(Arc::new(registry));
        if watch {
            workloads::Workloads::start_watching(&state)?;
            let st = state.clone();
            tokio::task::spawn_blocking(move || workloads::Workloads::scan(&st)).await.context("scanning processes")?;
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;
        Ok(Agent { state, listener, tls, local_addr })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting and lets requests in progress
    /// finish. The token file is re-read on SIGHUP meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Agent { state, listener, tls, local_addr } = self;
        let reload = auth::spawn_sighup_reload(state.auth.clone()).context("installing the SIGHUP handler")?;
        let poller = triggers::spawn_poller(state.clone());
        let denials = {
            let st = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(audit::INTERVAL);
                loop {
                    tick.tick().await;
                    st.denials.flush_if_due();
                }
            })
        };
        let pushing = workloads::spawn_push(&state);
        let limits = state.limits.clone();
        let incoming = tls::incoming(
            listener,
            tls,
            limits.max_connections,
            limits.max_connections_per_address,
            limits.tls_handshake_timeout,
        );
        let filter = routes::routes(state.clone());
        let auth = state.auth.clone();
        let make = make_service_fn(move |conn: &tls::Conn| {
            let peer = routes::PeerAddr(conn.peer);
            let prover = conn.prover();
            let auth = auth.clone();
            let svc = warp::service(filter.clone());
            async move {
                Ok::<_, std::convert::Infallible>(service_fn(move |mut req: hyper::Request<hyper::Body>| {
                    // A head with a valid token, or a health check, keeps its connection (it is
                    // no longer closed to make room; see conn_limits).
                    let health = matches!(req.uri().path(), "/healthz" | "/readyz");
                    if health
                        || auth.authenticate(req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes())).is_ok()
                    {
                        prover.prove();
                    }
                    req.extensions_mut().insert(peer);
                    let mut svc = svc.clone();
                    async move { svc.call(req).await }
                }))
            }
        });
        let st = state.clone();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let server = hyper::Server::builder(hyper::server::accept::from_stream(incoming))
            .http1_only(true)
            // One request per connection: no idle keep-alive connection holds a slot of the
            // connection cap (a maintenance endpoint does not need connection reuse).
            .http1_keepalive(false)
            .http1_header_read_timeout(limits.header_read_timeout)
            .http1_max_buf_size(64 * 1024)
            .serve(make)
            .with_graceful_shutdown(async move {
                shutdown.await;
                st.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
                info!(addr = %local_addr, "shutting down");
                let _ = stopping_tx.send(());
            });
        // Requests in progress get a grace period after the shutdown signal, not forever.
        let grace = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = server => r.context("serving HTTP"),
            _ = grace => {
                warn!("requests still running {}s after the shutdown signal; stopping anyway", SHUTDOWN_GRACE.as_secs());
                Ok(())
            }
        };
        reload.abort();
        poller.abort();
        denials.abort();
        state.denials.flush_if_due();
        if let Some(p) = pushing {
            p.abort();
        }
        result
    }
}

/// Starts the agent and serves until SIGINT or SIGTERM.
pub async fn serve(config: AgentConfig, attacher: Arc<dyn Attacher>) -> anyhow::Result<()> {
    let agent = Agent::start(config, attacher).await?;
    let scheme = if agent.is_tls() { "https" } else { "http" };
    info!("memscope agent listening on {scheme}://{}", agent.local_addr());
    agent.run(shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
