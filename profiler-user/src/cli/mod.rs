//! The command line (clap derive): `record` traces once and writes reports, `agent` serves the
//! HTTP maintenance endpoint, and the client commands talk to a running agent.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod record;

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
}

pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(args) => record::run(args),
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

/// The whole error chain on one line: `outer: cause: root cause`.
pub fn one_line(err: &anyhow::Error) -> String {
    err.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_env("MEMSCOPE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
