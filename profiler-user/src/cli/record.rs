//! `memscope record`: attach, show progress, stop at the duration or Ctrl-C, write reports.
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Process to trace.
    #[arg(long)]
    pub pid: u32,
}

pub fn run(_args: RecordArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("record is not implemented yet")
}
