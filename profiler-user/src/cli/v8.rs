//! `memscope v8 snapshot|profile|summary|threads|gc PID`: the JavaScript heap of a Node.js
//! process, standalone: through its inspector, opened from outside and closed again (see
//! [`crate::v8::inspector`]; needs root: setns into the target's network namespace, signal),
//! or with `--agent URL` through that agent's V8 routes (the target attached there; token as
//! for the other client commands). `--thread` picks the main thread, a `worker_threads`
//! worker, or all of them ([`crate::v8::workers`]).
//!
//! Standalone, the process is held from the start (a pidfd and its start time,
//! [`Process::open`]): what is checked (`SigCgt`, listeners) is checked again after being read,
//! and the signal goes through the pidfd, so a pid reused between the check and the signal is
//! never signalled.
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
    v8::{
        inspector::DEFAULT_CALL_TIMEOUT,
        sampling, snapshot,
        workers::{self, ThreadSummary},
        Budget, Inspector, Thread, ThreadInfo, V8Error,
    },
};

use super::client::{self, ConnArgs};

/// The whole exchange of a command that is not a sampling run (a heap snapshot of a large heap
/// takes minutes).
const SESSION_TIMEOUT: Duration = Duration::from_secs(600);

/// The process running as `pid` now, held by pidfd for the whole command.
fn hold(pid: u32) -> Result<Arc<Process>, V8Error> {
    Process::open(pid).map(Arc::new).map_err(|_| V8Error::NoSuchProcess(pid))
}

#[derive(Args, Debug)]
pub struct V8Args {
    /// Ask this agent (its V8 routes, the target attached there) instead of opening the
    /// target's inspector from here.
    #[arg(long, global = true, value_name = "URL")]
    pub agent: Option<String>,
    /// With --agent: file holding the token (else the MEMSCOPE_TOKEN environment variable).
    #[arg(long, global = true, value_name = "FILE", requires = "agent")]
    pub token_file: Option<PathBuf>,
    /// With --agent: PEM CA certificate to trust for an https agent.
    #[arg(long, global = true, value_name = "FILE", requires = "agent")]
    pub ca_cert: Option<PathBuf>,
    /// With --agent: give up on an answer after this long.
    #[arg(long, global = true, default_value = "150s", value_parser = super::units::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
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
        /// Which JavaScript thread: main, or a worker's id (see `memscope v8 threads`).
        #[arg(long, default_value = "main")]
        thread: Thread,
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
        /// Which JavaScript thread: main, a worker's id, or all (each thread under a root
        /// frame naming it).
        #[arg(long, default_value = "main")]
        thread: Thread,
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
        /// Which JavaScript thread: main, a worker's id, or all (one summary each).
        #[arg(long, default_value = "main")]
        thread: Thread,
    },
    /// List the JavaScript threads: the main thread and each worker_threads worker.
    Threads {
        pid: u32,
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
    if let Some(agent) = args.agent.clone() {
        let conn = ConnArgs { agent, token_file: args.token_file, ca_cert: args.ca_cert, timeout: args.timeout };
        return run_remote(&conn, args.action);
    }
    match args.action {
        V8Action::Snapshot { pid, output, gc, thread } => {
            if thread == Thread::All {
                bail!("a heap snapshot is of one thread: --thread main or a worker's id");
            }
            let process = hold(pid)?;
            let file = fs::File::create(&output).with_context(|| format!("creating {}", output.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let mut insp = Inspector::open(process, "cli: v8 snapshot", Budget::new(SESSION_TIMEOUT))?;
            let mut sink = |c: &str| w.write_all(c.as_bytes()).map_err(|e| V8Error::Sink(e.to_string()));
            let taken = workers::with_threads(&mut insp, &thread, |_, s| snapshot::take(s, gc, DEFAULT_CALL_TIMEOUT, &mut sink))?;
            insp.close()?;
            let bytes = taken.first().map_or(0, |(_, b)| *b);
            w.flush().with_context(|| format!("writing {}", output.display()))?;
            eprintln!("memscope: wrote {} ({})", output.display(), render::human_bytes(bytes));
        }
        V8Action::Profile { pid, duration, interval, format, output, thread } => {
            let f = format_for(format.as_deref(), output.as_ref())?;
            if interval == 0 {
                bail!("--interval must be positive");
            }
            let process = hold(pid)?;
            let mut insp = Inspector::open(process, "cli: v8 profile", Budget::new(duration + SESSION_TIMEOUT))?;
            let p = workers::profile_threads(&mut insp, &thread, duration, interval)?;
            insp.close()?;
            let body = match f {
                render::Format::Svg => render::flamegraph::flamegraph_svg(&p, Measure::Inuse, &format!("pid {pid}: JavaScript heap (sampled, live)"))?,
                f => render::render(&p, f, Measure::Inuse)?,
            };
            write_out(output.as_deref(), &body)?;
        }
        V8Action::Summary { pid, gc, top, json, thread } => {
            let list = workers::summaries_of(hold(pid)?, &thread, gc, "cli", Budget::new(SESSION_TIMEOUT))?;
            print_summaries(&list, thread == Thread::All, top, json)?;
        }
        V8Action::Threads { pid, json } => {
            let list = workers::threads_of(hold(pid)?, "cli: v8 threads", Budget::new(SESSION_TIMEOUT))?;
            print_threads(&list, json)?;
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

/// The same commands through an agent's V8 routes (the target attached there, by its pid).
fn run_remote(conn: &ConnArgs, action: V8Action) -> anyhow::Result<()> {
    match action {
        V8Action::Snapshot { pid, output, gc, thread } => {
            let file = fs::File::create(&output).with_context(|| format!("creating {}", output.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let q = client::query(&[("gc", gc.then(|| "true".to_string())), ("thread", Some(thread.to_string()))]);
            let bytes = client::get_streamed(conn, &format!("/v1/targets/{pid}/v8/heap-snapshot{q}"), &mut w)?;
            w.flush().with_context(|| format!("writing {}", output.display()))?;
            eprintln!("memscope: wrote {} ({})", output.display(), render::human_bytes(bytes));
        }
        V8Action::Profile { pid, duration, interval, format, output, thread } => {
            let f = format_for(format.as_deref(), output.as_ref())?;
            let q = client::query(&[
                ("seconds", Some(duration.as_secs().max(1).to_string())),
                ("interval", Some(interval.to_string())),
                ("format", Some(f.name().to_string())),
                ("thread", Some(thread.to_string())),
            ]);
            let body = client::request(conn, "GET", &format!("/v1/targets/{pid}/v8/heap-profile{q}"), None)?;
            write_out(output.as_deref(), &body)?;
        }
        V8Action::Summary { pid, gc, top, json, thread } => {
            let q = client::query(&[("gc", gc.then(|| "true".to_string())), ("thread", Some(thread.to_string()))]);
            let body = client::request(conn, "GET", &format!("/v1/targets/{pid}/v8/summary{q}"), None)?;
            let list: Vec<ThreadSummary> = if thread == Thread::All {
                serde_json::from_slice(&body).context("the agent's summaries are not what was expected")?
            } else {
                vec![serde_json::from_slice(&body).context("the agent's summary is not what was expected")?]
            };
            print_summaries(&list, thread == Thread::All, top, json)?;
        }
        V8Action::Threads { pid, json } => {
            let body = client::request(conn, "GET", &format!("/v1/targets/{pid}/v8/threads"), None)?;
            let v: serde_json::Value = serde_json::from_slice(&body).context("the agent's answer is not JSON")?;
            let list: Vec<ThreadInfo> = serde_json::from_value(v["threads"].clone()).context("the agent's thread list is not what was expected")?;
            print_threads(&list, json)?;
        }
        V8Action::Gc { pid } => {
            client::request(conn, "POST", &format!("/v1/targets/{pid}/actions/gc"), None)?;
            eprintln!("memscope: garbage collected in {pid}");
        }
    }
    Ok(())
}

fn write_out(output: Option<&std::path::Path>, body: &[u8]) -> anyhow::Result<()> {
    match output {
        Some(o) => fs::write(o, body).with_context(|| format!("writing {}", o.display())),
        None => Ok(std::io::stdout().write_all(body)?),
    }
}

fn print_summaries(list: &[ThreadSummary], all: bool, top: usize, json: bool) -> anyhow::Result<()> {
    if json {
        let text = if all { serde_json::to_string_pretty(list)? } else { serde_json::to_string_pretty(&list.first())? };
        println!("{text}");
        return Ok(());
    }
    for (i, t) in list.iter().enumerate() {
        let s = &t.summary;
        if all || t.thread.kind != "main" {
            if i > 0 {
                println!();
            }
            println!(
                "thread {} ({}{})",
                render::escape::term(&t.thread.id),
                t.thread.kind,
                if t.thread.title.is_empty() { String::new() } else { format!(": {}", render::escape::term(&t.thread.title)) }
            );
        }
        println!("{} objects, {} self size (retained sizes not computed)", s.node_count, render::human_bytes(s.self_size));
        println!("{:>12} {:>12}  constructor", "count", "self size");
        for c in s.constructors.iter().take(top) {
            println!("{:>12} {:>12}  {}", c.count, render::human_bytes(c.self_size), render::escape::term(&c.name));
        }
    }
    Ok(())
}

fn print_threads(list: &[ThreadInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    println!("{:<8} {:<7} {:<32} url", "id", "type", "title");
    for t in list {
        println!("{:<8} {:<7} {:<32} {}", t.id, t.kind, t.title, t.url);
    }
    Ok(())
}
