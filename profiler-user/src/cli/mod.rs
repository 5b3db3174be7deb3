//! The command line (clap derive): `record` traces once and writes reports, `agent` serves the
//! HTTP maintenance endpoint, and the client commands talk to a running agent.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod agent;
pub mod client;
pub mod node_args;
pub mod record;
pub mod trigger_args;
pub mod v8;
/// Moved to [`crate::units`] (api and trigger parse units too); kept here for old paths.
pub use crate::units;

#[derive(Parser, Debug)]
#[command(name = "memscope", version, about = "Trace a live process's heap from outside, with eBPF")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to a running process, record its allocations, write a leak report and profiles.
    Record(record::RecordArgs),
    /// Serve the HTTP maintenance endpoint: live heap reports, leak reports, flamegraphs,
    /// snapshots and metrics for the traced processes, behind tokens.
    Agent(agent::AgentArgs),
    /// List the targets of a running agent; attach or detach one.
    Targets(client::TargetsArgs),
    /// Fetch a target's live heap from a running agent.
    Heap(client::HeapArgs),
    /// Fetch a target's leak report from a running agent.
    Leaks(client::LeaksArgs),
    /// Fetch a target's flamegraph (SVG) from a running agent.
    Flamegraph(client::FlamegraphArgs),
    /// Take, list, fetch or delete snapshots stored by a running agent.
    Snapshot(client::SnapshotArgs),
    /// Compare two snapshots stored by a running agent: growth per stack.
    Diff(client::DiffArgs),
    /// List, add or delete a target's snapshot triggers in a running agent.
    Triggers(client::TriggersArgs),
    /// Node.js: V8 heap snapshots, sampling heap profiles, summaries and GC of a process,
    /// through its inspector (no agent needed).
    V8(v8::V8Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Agent(_)));
    crate::truncation_guard::install();
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Record(args) => record::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Targets(args) => ok(client::targets(args)),
        Command::Heap(args) => ok(client::heap(args)),
        Command::Leaks(args) => ok(client::leaks(args)),
        Command::Flamegraph(args) => ok(client::flamegraph(args)),
        Command::Snapshot(args) => ok(client::snapshot(args)),
        Command::Diff(args) => ok(client::diff(args)),
        Command::Triggers(args) => ok(client::triggers(args)),
        Command::V8(args) => ok(v8::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("memscope: {}", one_line(&err));
            ExitCode::from(1)
        }
    }
}

/// Moved to [`crate::errors`]; kept here for old paths.
pub use crate::errors::one_line;

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs go to stderr, filtered by `MEMSCOPE_LOG`. The agent logs its own info lines and the
/// audit log (target `audit`) by default, with targets shown so `audit` lines can be picked out.
fn init_tracing(agent: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let default = if agent { "warn,audit=info,profiler_user=info" } else { "warn" };
    let filter = EnvFilter::try_from_env("MEMSCOPE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(agent).init();
}
