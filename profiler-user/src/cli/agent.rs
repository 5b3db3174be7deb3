//! `memscope agent`: the long-running HTTP maintenance endpoint (see [`crate::api`]).
//!
//! Parses the flags into an [`AgentConfig`] and runs [`api::serve`] on a tokio runtime. The
//! trigger flags ([`TriggerArgs`], as for `memscope record`) are attached to every `--pid`
//! target at start; a trigger that cannot be attached (e.g. `--on-gc` on a process without V8)
//! stops the agent with one line.
//! Refuses to start, with one line, without a token file, with a token file that group or
//! others may read, or on a non-loopback address without TLS (unless
//! `--allow-insecure-remote`). Tokens are never taken on the command line.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;

use super::trigger_args::TriggerArgs;
use crate::{
    aggregate::growth,
    api::{self, AgentConfig, Limits, TlsFiles, TriggerSettings},
    bpf::load::{ProbeMode, ProbeSettings, SourceMode},
    session::EbpfAttacher,
    store::Retention,
    target::Attacher,
};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Address to listen on. Loopback by default; a remote address needs TLS.
    #[arg(long, default_value = api::DEFAULT_LISTEN, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Token file: lines `NAME ROLE TOKEN` (ROLE read or admin), mode 0600. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve a non-loopback address without TLS: tokens and reports cross the network in clear.
    #[arg(long)]
    pub allow_insecure_remote: bool,
    /// Let tokens of role `eval` evaluate JavaScript expressions in Node.js targets
    /// (`POST /v1/targets/{id}/actions/eval`): arbitrary code in the target. Off by default.
    #[arg(long)]
    pub allow_eval: bool,
    /// With every snapshot stored for a Node.js target (by a trigger such as `gc`, or the
    /// API), also take a V8 heap snapshot and keep its per-constructor summary; diffs then list
    /// the constructors that grew. Each pauses the target for the heap snapshot.
    #[arg(long)]
    pub v8_summaries: bool,
    /// Where snapshots are kept.
    #[arg(long, default_value = crate::store::DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Most snapshots kept; the oldest are removed first.
    #[arg(long, default_value_t = Retention::DEFAULT_COUNT, value_name = "N")]
    pub retain_count: usize,
    /// Most bytes of snapshots kept on disk (e.g. 512MiB, 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = crate::units::parse_size, value_name = "SIZE")]
    pub retain_bytes: u64,
    /// Process to trace from the start (repeat for several).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// `full` records every allocation; a size (e.g. 512KiB) samples one per that many bytes.
    #[arg(long, default_value = "512KiB", value_parser = crate::units::parse_sampling)]
    pub sampling: u64,
    /// Live allocations tracked at once, all targets together: each gets an equal share, and
    /// its allocations past it are dropped (counted as `live_map_full` for that target).
    #[arg(long, default_value_t = ProbeSettings::default().max_allocs)]
    pub max_allocs: u32,
    /// Distinct allocation stacks tracked, all targets together.
    #[arg(long, default_value_t = 1 << 16)]
    pub max_stacks: u32,
    /// Keep what the probes cost each target under this share of one CPU (percent, e.g. 2):
    /// the target's sampling interval widens under load and narrows back when it drops. The
    /// interval in force is in every output.
    #[arg(long, value_name = "PERCENT", value_parser = parse_budget)]
    pub cpu_budget: Option<f64>,
    /// Unwind rows (8 bytes each) for all targets: one map shared by every target, each file's
    /// table placed once (libc's serves every process), allocated at the first attach (the
    /// default, 4 Mi rows, is 32 MiB). Files that do not fit use frame pointers, counted.
    #[arg(long, default_value_t = 1 << 22, value_name = "N")]
    pub max_unwind_rows: u32,
    /// Unload the probes, freeing their preallocated maps (`--max-allocs`, `--max-stacks`,
    /// `--max-unwind-rows`), after this long without any target; the next attach loads them
    /// again (about half a second of CPU). `0s` keeps them loaded.
    #[arg(long, default_value = "60s", value_parser = crate::units::parse_duration, value_name = "DURATION")]
    pub release_probes_after: Duration,
    /// Processes traced at once, all together (`--pid`, the API, workloads). Workloads found past
    /// it wait in a queue and are attached in order as targets leave; `/readyz` and
    /// `memscope_workloads{state="waiting"}` say so. Each costs 80 KiB of BPF maps.
    #[arg(long, default_value_t = crate::api::limits::DEFAULT_MAX_TARGETS, value_parser = parse_max_targets, value_name = "N")]
    pub max_targets: usize,
    /// A workload whose last process exited is removed from `/v1/workloads` after this long
    /// (its stored snapshots stay, under retention).
    #[arg(long, default_value = "6h", value_parser = crate::units::parse_duration, value_name = "DURATION", help_heading = "Node")]
    pub workload_ttl: Duration,
    /// How the allocator probes are attached: `session` (Linux 6.13+) lets unsampled calls
    /// skip the return trap; `auto` uses it where the kernel has it.
    #[arg(long, value_enum, default_value_t = ProbeMode::Auto)]
    pub probe_mode: ProbeMode,
    /// Where allocations are seen: `auto` traces a process that carries the USDT
    /// heap-sampling contract (`ddheap:alloc`/`free`, `otel_memory:alloc`/`free`) through it,
    /// one trap per sample, and any other process through its allocator; `allocator` and
    /// `usdt` force either (`usdt` refuses a process without the contract).
    #[arg(long, value_enum, default_value_t = SourceMode::Auto)]
    pub source: SourceMode,
    /// Concurrent snapshots and renders; more are answered 503 at once.
    #[arg(long, default_value_t = Limits::default().max_expensive, value_name = "N")]
    pub max_renders: usize,
    /// Concurrent connections; when reached, the oldest connection that has not shown a valid
    /// token yet is closed for a newcomer.
    #[arg(long, default_value_t = Limits::default().max_connections, value_name = "N")]
    pub max_connections: usize,
    /// Connections from one client address (IPv4 with all of 127.0.0.0/8 as one, or IPv6 /64)
    /// that have not shown a valid token yet; past it the address's oldest is closed. Raise it
    /// when all clients come through one proxy.
    #[arg(long, default_value_t = Limits::default().max_connections_per_address, value_name = "N")]
    pub max_connections_per_address: usize,
    /// Memory the agent may keep of what all targets together control (the parsed names of
    /// their perf maps, ...); past it, more is not loaded and the refusal is reported.
    #[arg(long, default_value = "256MiB", value_parser = crate::units::parse_size, value_name = "SIZE")]
    pub target_data_budget: u64,
    /// The same for one target (its share, within --target-data-budget).
    #[arg(long, default_value = "64MiB", value_parser = crate::units::parse_size, value_name = "SIZE")]
    pub target_data_budget_per_target: u64,
    /// Requests per second allowed per token (burst: 4x, at least 20).
    #[arg(long, default_value_t = Limits::default().token_per_sec, value_name = "RPS")]
    pub rate_limit: f64,
    /// Longest a snapshot or render may take before the request is answered 503.
    #[arg(long, default_value = "120s", value_parser = crate::units::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
    /// Snapshot triggers for every --pid target (as for `memscope record`; more through
    /// `POST /v1/targets/{id}/triggers`).
    #[command(flatten)]
    pub triggers: TriggerArgs,
    /// Leak verdicts use each target's last this many snapshots (at least 3).
    #[arg(long, default_value_t = growth::DEFAULT_WINDOW, value_parser = super::record::parse_window, help_heading = "Triggers")]
    pub verdict_window: usize,
    /// The share of wall time memscope may pause a target with the V8 operations of its own
    /// triggers (summaries with --v8-summaries): `PCT%` or `PCT%/WINDOW` over a sliding window
    /// (60 s by default); firings past it are suppressed (`pause_budget`). Per trigger:
    /// `pause_budget` in `POST /v1/targets/ID/triggers`; per selector: a `pause_budget=` term.
    #[arg(long, default_value = "5%", value_parser = crate::pause::PauseBudget::parse, value_name = "PCT%[/WINDOW]", help_heading = "Triggers")]
    pub pause_budget: crate::pause::PauseBudget,
    /// Selectors and node paths (`--select`, `--node-root`).
    #[command(flatten)]
    pub node: Box<super::node_args::NodeArgs>,
    /// Also serve `GET /metrics` (and `/healthz`, `/readyz`) read-only on this address, e.g. the
    /// pod IP for an in-cluster Prometheus; nothing else of the API is reachable there. Needs
    /// --metrics-token-file; TLS with --tls-cert/--tls-key when given.
    #[arg(long, value_name = "ADDR:PORT", requires = "metrics_token_file")]
    pub metrics_listen: Option<SocketAddr>,
    /// File (mode 0600) holding the one bearer token `/metrics` on --metrics-listen accepts;
    /// re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,
}

impl AgentArgs {
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let defaults = Limits::default();
        let burst = ((self.rate_limit * 4.0).ceil() as u32).max(defaults.token_burst);
        let triggers = self.triggers.specs()?;
        if !triggers.is_empty() && self.pids.is_empty() {
            anyhow::bail!("trigger flags apply to --pid targets: give --pid (or add triggers with POST /v1/targets/ID/triggers)");
        }
        Ok(AgentConfig {
            listen: self.listen,
            tokens_file: self.tokens.clone(),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
                _ => None,
            },
            allow_insecure_remote: self.allow_insecure_remote,
            allow_eval: self.allow_eval,
            v8_summaries: self.v8_summaries,
            data_dir: self.data_dir.clone(),
            retention: Retention { max_count: self.retain_count, max_bytes: self.retain_bytes },
            pids: self.pids.clone(),
            triggers,
            trigger_settings: TriggerSettings {
                min_spacing: self.triggers.min_spacing,
                verdict_window: self.verdict_window,
                ..TriggerSettings::default()
            },
            limits: Limits {
                max_expensive: self.max_renders.max(1),
                max_connections: self.max_connections.max(1),
                max_connections_per_address: self.max_connections_per_address.max(1),
                token_per_sec: self.rate_limit,
                token_burst: burst,
                request_timeout: self.request_timeout,
                max_targets: self.max_targets,
                ..defaults
            },
            node: crate::agent::workloads::NodeConfig { workload_ttl: self.workload_ttl, ..self.node.config(self.allow_insecure_remote)? },
            metrics: match (self.metrics_listen, &self.metrics_token_file) {
                (Some(addr), Some(token_file)) => Some(api::metrics_listener::MetricsListen { addr, token_file: token_file.clone() }),
                _ => None,
            },
        })
    }
}

/// The attacher the agent uses for `--pid` and `POST /v1/targets`: the eBPF session.
fn attacher(args: &AgentArgs) -> Arc<dyn Attacher> {
    let settings = ProbeSettings {
        max_allocs: args.max_allocs,
        max_stacks: args.max_stacks,
        sample_bytes: args.sampling,
        probe_mode: args.probe_mode,
        max_unwind_rows: args.max_unwind_rows,
        source: args.source,
        target_slots: crate::bpf::load::slots_for(args.max_targets),
    };
    let attacher = Arc::new(EbpfAttacher::new(settings, args.cpu_budget));
    if !args.release_probes_after.is_zero() {
        attacher.release_idle(args.release_probes_after);
    }
    attacher
}

fn parse_max_targets(s: &str) -> Result<usize, String> {
    let max = profiler_common::MAX_TARGET_SLOTS as usize / 2;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of targets between 1 and {max}")),
    }
}

fn parse_budget(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err(format!("{s:?} is not a percentage of one CPU between 0 and 100 (e.g. 2 or 0.5)")),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    crate::budget::configure(args.target_data_budget, args.target_data_budget_per_target.min(args.target_data_budget));
    crate::pause::set_default_budget(args.pause_budget);
    let attacher = attacher(&args);
    // Refuse bad configurations before starting threads or touching the data directory.
    api::check_config(&config)?;
    let warming = Arc::clone(&attacher);
    std::thread::Builder::new().name("probe-load".into()).spawn(move || warming.warm_up()).context("starting a thread")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .thread_name("memscope-agent")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let agent = api::Agent::start(config, attacher).await?;
        let scheme = if agent.is_tls() { "https" } else { "http" };
        eprintln!("memscope agent: listening on {scheme}://{}", agent.local_addr());
        if let Some(addr) = agent.metrics_addr() {
            eprintln!("memscope agent: metrics on {scheme}://{addr}/metrics");
        }
        agent.run(api::shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}
