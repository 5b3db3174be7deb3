//! The agent's HTTP maintenance endpoint: what each route does. `memscope agent` serves live
//! heap reports, leak reports, flamegraphs, stored snapshots and their diffs, and Prometheus
//! metrics, for the targets it traces (through an [`Attacher`]; the API knows nothing of eBPF).
//! How a process becomes a target (the registry, workloads and discovery, triggers, push,
//! pauses) is [`crate::agent`]'s: the handlers call into it and own no agent state; [`State`]
//! is the HTTP layer's (auth, rate limits, single-flight, metrics) around the agent's.
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
//! and [`conn_limits`] (which connections give way under the cap), [`workload_handlers`]
//! (selectors and workloads), [`v8`] (the JavaScript heap of Node.js targets). Snapshots are
//! kept by [`crate::store`].
//!
//! Limits: HTTP/1.1 only; one agent per data directory; the handshake timeout and connection
//! cap bound what a slow client holds, not what a botnet sends.
use std::{future::Future, net::SocketAddr, path::PathBuf, sync::atomic::AtomicBool, sync::Arc};

use anyhow::{bail, Context as _};
use tracing::{info, warn};
use warp::hyper::{
    self,
    service::{make_service_fn, service_fn, Service as _},
};

use crate::{
    agent::workloads,
    store::{Retention, SnapshotStore},
    target::Attacher,
    trigger::TriggerSpec,
};

pub mod audit;
pub mod auth;
pub mod conn_limits;
pub mod errors;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod tls;
pub mod v8;
pub mod workload_handlers;

#[cfg(test)]
mod tests;

pub use errors::ApiError;
pub use limits::Limits;
pub use crate::agent::TriggerSettings;

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

/// Everything the handlers share: the agent's state (targets, workloads, triggers, store; see
/// [`crate::agent`], reached through `Deref`) and the HTTP layer's own.
pub struct State {
    pub(crate) agent: Arc<crate::agent::State>,
    pub(crate) auth: Arc<auth::Auth>,
    pub(crate) limiter: limits::RateLimiter,
    /// Denied requests, written to the audit log with bounds.
    pub(crate) denials: audit::DenialLog,
    pub(crate) flights: limits::SingleFlight,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) limits: Limits,
    /// Shown by `/readyz` (e.g. an insecure remote listener).
    pub(crate) warnings: Vec<String>,
    pub(crate) shutting_down: AtomicBool,
    /// Heap snapshots in flight, eval spacing, `--allow-eval` (Node.js targets).
    pub(crate) v8: v8::V8State,
}

impl std::ops::Deref for State {
    type Target = crate::agent::State;

    fn deref(&self) -> &crate::agent::State {
        &self.agent
    }
}

impl State {
    pub fn new(
        auth: Arc<auth::Auth>,
        attacher: Arc<dyn Attacher>,
        store: Arc<SnapshotStore>,
        limits: Limits,
        warnings: Vec<String>,
    ) -> State {
        let agent = crate::agent::State::new(attacher, store, limits.max_expensive, limits.max_targets, limits.request_timeout);
        State::with_agent(auth, agent, limits, warnings)
    }

    /// The HTTP layer around an agent's state built by the caller.
    pub fn with_agent(auth: Arc<auth::Auth>, agent: crate::agent::State, limits: Limits, warnings: Vec<String>) -> State {
        let mut metrics = metrics::Metrics::default();
        metrics.refused_busy = agent.refused_busy.clone();
        State {
            agent: Arc::new(agent),
            auth,
            limiter: limits::RateLimiter::new(&limits),
            denials: audit::DenialLog::default(),
            flights: limits::SingleFlight::new(),
            metrics,
            limits,
            warnings,
            shutting_down: AtomicBool::new(false),
            v8: v8::V8State::default(),
        }
    }
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
        let limits = &config.limits;
        let mut agent =
            crate::agent::State::new(attacher, Arc::new(store), limits.max_expensive, limits.max_targets, limits.request_timeout);
        agent.trigger_settings = config.trigger_settings.clone();
        agent.v8_summaries.store(config.v8_summaries, std::sync::atomic::Ordering::Relaxed);
        let state = State::with_agent(auth, agent, config.limits.clone(), warnings);
        state.v8.allow_eval.store(config.allow_eval, std::sync::atomic::Ordering::Relaxed);
        let state = Arc::new(state);
        let start = crate::agent::StartConfig {
            pids: &config.pids,
            triggers: &config.triggers,
            node: &config.node,
            data_dir: &config.data_dir,
        };
        crate::agent::start(&state.agent, start).await?;
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
        let background = crate::agent::spawn_background(&state.agent);
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
        background.abort();
        denials.abort();
        state.denials.flush_if_due();
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
