//! `memscope v8 snapshot|profile|summary|gc PID`: the JavaScript heap of a Node.js process,
//! standalone (no agent): through its inspector, opened from outside and closed again (see
//! [`crate::v8::inspector`]). Needs root (setns into the target's network namespace, signal).
//!
//! The process is held from the start (a pidfd and its start time, [`Process::open`]): what is
//! checked (`SigCgt`, listeners) is checked again after being read, and the signal goes
//! through the pidfd, so a pid reused between the check and the signal is never signalled.
use std::{
    fs,
    sync::Arc,
    io::{BufWriter, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use crate::{
    aggregate::Measure,
    render,
    process::Process,
    v8::{inspector::DEFAULT_CALL_TIMEOUT, sampling, snapshot, Budget, Inspector, V8Error},
};

/// The whole exchange of a command that is not a sampling run (a heap snapshot of a large heap
/// takes minutes).
const SESSION_TIMEOUT: Duration = Duration::from_secs(600);

/// The process running as `pid` now, held by pidfd for the whole command.
fn hold(pid: u32) -> Result<Arc<Process>, V8Error> {
    Process::open(pid).map(Arc::new).map_err(|_| V8Error::NoSuchProcess(pid))
}

#[derive(Args, Debug)]
pub struct V8Args {
    #[command(subcommand)]
    pub action: V8Action,
}

#[derive(Subcommand, Debug)]
pub enum V8Action {
    /// Write a V8 heap snapshot (.heapsnapshot, for Chrome DevTools' Memory tab), streamed.
    Snapshot {
        pid: u32,
        /// Output file.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Collect garbage first (only live objects in the snapshot).
        #[arg(long)]
        gc: bool,
    },
    /// Sample the JavaScript allocations for a while: pprof, folded, svg or json by stack.
    Profile {
        pid: u32,
        /// How long to sample.
        #[arg(long, default_value = "10s", value_parser = super::units::parse_duration)]
        duration: Duration,
        /// Mean bytes between samples.
        #[arg(long, default_value_t = sampling::DEFAULT_INTERVAL)]
        interval: u64,
        /// json, pprof, folded or svg (default: from -o's extension, else folded).
        #[arg(long)]
        format: Option<String>,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print objects per constructor (count, self size) from a heap snapshot taken now.
    Summary {
        pid: u32,
        #[arg(long)]
        gc: bool,
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a full garbage collection in the target.
    Gc { pid: u32 },
}

fn format_for(format: Option<&str>, output: Option<&PathBuf>) -> anyhow::Result<render::Format> {
    let name = match (format, output.and_then(|o| o.extension()).and_then(|e| e.to_str())) {
        (Some(f), _) => f.to_string(),
        (None, Some("gz" | "pb")) => "pprof".into(),
        (None, Some("svg")) => "svg".into(),
        (None, Some("json")) => "json".into(),
        _ => "folded".into(),
    };
    match render::Format::parse(&name) {
        Some(f) if f != render::Format::Text => Ok(f),
        _ => bail!("unknown format {name:?} (use json, pprof, folded or svg)"),
    }
}

pub fn run(args: V8Args) -> anyhow::Result<()> {
    match args.action {
        V8Action::Snapshot { pid, output, gc } => {
            let file = fs::File::create(&output).with_context(|| format!("creating {}", output.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let mut insp = Inspector::open(hold(pid)?, "cli: v8 snapshot", Budget::new(SESSION_TIMEOUT))?;
            let bytes = snapshot::take(&mut insp, gc, DEFAULT_CALL_TIMEOUT, |c| w.write_all(c.as_bytes()).map_err(|e| V8Error::Sink(e.to_string())))?;
            insp.close()?;
            w.flush().with_context(|| format!("writing {}", output.display()))?;
            eprintln!("memscope: wrote {} ({})", output.display(), render::human_bytes(bytes));
        }
        V8Action::Profile { pid, duration, interval, format, output } => {
            let f = format_for(format.as_deref(), output.as_ref())?;
            if interval == 0 {
                bail!("--interval must be positive");
            }
            let mut insp = Inspector::open(hold(pid)?, "cli: v8 profile", Budget::new(duration + SESSION_TIMEOUT))?;
            let p = sampling::profile(&mut insp, duration, interval)?;
            insp.close()?;
            let body = match f {
                render::Format::Svg => render::flamegraph::flamegraph_svg(&p, Measure::Inuse, &format!("pid {pid}: JavaScript heap (sampled, live)"))?,
                f => render::render(&p, f, Measure::Inuse)?,
            };
            match output {
                Some(o) => fs::write(&o, body).with_context(|| format!("writing {}", o.display()))?,
                None => std::io::stdout().write_all(&body)?,
            }
        }
        V8Action::Summary { pid, gc, top, json } => {
            let s = crate::v8::summary_of(hold(pid)?, gc, "cli", Budget::new(SESSION_TIMEOUT))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{} objects, {} self size (retained sizes not computed)", s.node_count, render::human_bytes(s.self_size));
                println!("{:>12} {:>12}  constructor", "count", "self size");
                for c in s.constructors.iter().take(top) {
                    println!("{:>12} {:>12}  {}", c.count, render::human_bytes(c.self_size), render::escape::term(&c.name));
                }
            }
        }
        V8Action::Gc { pid } => {
            let mut insp = Inspector::open(hold(pid)?, "cli: v8 gc", Budget::new(SESSION_TIMEOUT))?;
            insp.collect_garbage()?;
            insp.close()?;
            eprintln!("memscope: garbage collected in {pid}");
        }
    }
    Ok(())
}

