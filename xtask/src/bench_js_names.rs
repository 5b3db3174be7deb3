//! The `js names` section of `cargo xtask bench` (alone: `--js-names-only`): JavaScript names
//! without flags (issue 17, item 7). [`RUNS`] times: a plain `node` (no flag at all) runs
//! profiler-user/tests/fixtures/node_js_names.js under `memscope record --sampling full
//! --min-age 0s`; three functions keep known bytes of native memory (`onceLeak` interpreted,
//! `leftLeak` baseline, `rightLeak` optimized by TurboFan). Per run and function: the share
//! of the bytes it keeps that `leaks.json` puts on stacks carrying its name. Target: every
//! share >= [`MIN_SHARE`] in every run (10 of 10).
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::step;

pub const RUNS: usize = 10;
pub const MIN_SHARE: f64 = 0.9;
const DEADLINE: Duration = Duration::from_secs(120);

/// One run: per function, (bytes it keeps, bytes on stacks carrying its name); and the
/// JavaScript frames memscope named and left unnamed.
pub struct Run {
    pub functions: BTreeMap<String, (u64, u64)>,
    pub named_frames: u64,
    pub unnamed_frames: u64,
}

impl Run {
    pub fn share(&self, f: &str) -> f64 {
        self.functions
            .get(f)
            .map_or(0.0, |&(truth, named)| named as f64 / truth.max(1) as f64)
    }

    fn worst(&self) -> f64 {
        self.functions
            .keys()
            .map(|f| self.share(f))
            .fold(f64::INFINITY, f64::min)
    }
}

pub struct JsNames {
    pub runs: Vec<Run>,
}

/// A line reader with a deadline.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of(r: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    fn wait(&self, what: &str, matches: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(l) if matches(&l) => return Ok(l),
                Ok(_) => continue,
                Err(_) => bail!("no {what} within {DEADLINE:?}"),
            }
        }
    }
}

struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiler-user/tests/fixtures/node_js_names.js")
}

fn start_node(dir: &Path) -> Result<Node> {
    let mut child = Command::new("node")
        .arg(fixture())
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting node")?;
    let stdin = child.stdin.take().context("node stdin")?;
    let stdout: ChildStdout = child.stdout.take().context("node stdout")?;
    let node = Node {
        child,
        stdin,
        lines: Lines::of(stdout),
    };
    node.lines
        .wait("`ready` from node", |l| l.starts_with("ready "))?;
    Ok(node)
}

fn one_run(memscope: &Path, scratch: &Path, run: usize) -> Result<Run> {
    let dir = scratch.join(format!("js-names-{run}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut node = start_node(&dir)?;
    let pid = node.child.id();
    let out = dir.join("out");
    let mut record = Command::new(memscope)
        .args([
            "record",
            "--pid",
            &pid.to_string(),
            "--duration",
            "1h",
            "--sampling",
            "full",
            "--min-age",
            "0s",
            "--json-top",
            "100000",
        ])
        .arg("--out")
        .arg(&out)
        .env("MEMSCOPE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memscope record")?;
    let errs = Lines::of(record.stderr.take().context("memscope stderr")?);
    let attached = errs.wait("`attached` from memscope", |l| l.contains("attached"));
    if let Err(e) = attached {
        let _ = record.kill();
        let _ = record.wait();
        return Err(e);
    }
    writeln!(node.stdin, "go")?;
    node.lines.wait("`done` from node", |l| l == "done")?;
    writeln!(node.stdin, "truth?")?;
    let truth = node
        .lines
        .wait("the truth from node", |l| l.starts_with("truth "))?;
    unsafe { libc::kill(record.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + DEADLINE;
    while record.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = record.kill();
            bail!("memscope record did not stop within {DEADLINE:?} of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(node);
    let leaks: Value =
        serde_json::from_slice(&fs::read(out.join("leaks.json")).context("reading leaks.json")?)?;
    let mut functions = BTreeMap::new();
    for kv in truth.trim_start_matches("truth ").split(' ') {
        let Some((name, bytes)) = kv.split_once('=') else {
            continue;
        };
        if !name.ends_with("Leak") {
            continue;
        }
        let bytes: u64 = bytes.parse()?;
        let named: u64 = leaks["leaks"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|s| {
                        s["frames"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|f| f["function"] == name))
                    })
                    .map(|s| s["bytes"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        functions.insert(name.to_string(), (bytes, named));
    }
    let js = &leaks["js_names"];
    let unnamed = js["unnamed"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let _ = fs::remove_dir_all(&dir);
    Ok(Run {
        functions,
        named_frames: js["named"].as_u64().unwrap_or(0),
        unnamed_frames: unnamed,
    })
}

pub fn run(memscope: &Path, scratch: &Path) -> Result<JsNames> {
    step(format!(
        "js names: {RUNS} runs of a flagless node under memscope record --sampling full"
    ));
    let mut runs = Vec::new();
    for i in 0..RUNS {
        runs.push(one_run(memscope, scratch, i).with_context(|| format!("js names run {i}"))?);
    }
    Ok(JsNames { runs })
}

impl JsNames {
    fn names(&self) -> Vec<String> {
        self.runs
            .first()
            .map(|r| r.functions.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn good_runs(&self) -> usize {
        self.runs.iter().filter(|r| r.worst() >= MIN_SHARE).count()
    }

    pub fn render(&self) -> String {
        let names = self.names();
        let mut out = String::from("\n## JavaScript names without flags (plain `node`, `memscope record --sampling full`)\n\n");
        out.push_str(&format!(
            "| run | {} | JS frames named | unnamed |\n|---|",
            names.join(" | ")
        ));
        out.push_str(&"---|".repeat(names.len() + 2));
        out.push('\n');
        for (i, r) in self.runs.iter().enumerate() {
            let shares: Vec<String> = names
                .iter()
                .map(|n| format!("{:.1}%", 100.0 * r.share(n)))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                i + 1,
                shares.join(" | "),
                r.named_frames,
                r.unnamed_frames
            ));
        }
        out.push_str(&format!(
            "\nShare of the bytes each function keeps that carry its name; runs with every share >= {:.0}%: {} of {}\n",
            100.0 * MIN_SHARE,
            self.good_runs(),
            self.runs.len()
        ));
        out
    }

    pub fn targets(&self) -> Vec<(String, String, String, bool)> {
        vec![(
            "runs where every JS function's bytes carry its name (>= 90%)".to_string(),
            format!("{} of {}", self.runs.len(), self.runs.len()),
            format!("{} of {}", self.good_runs(), self.runs.len()),
            self.good_runs() == self.runs.len() && !self.runs.is_empty(),
        )]
    }

    pub fn to_json(&self) -> Value {
        json!({
            "min_share": MIN_SHARE,
            "runs": self.runs.iter().map(|r| json!({
                "functions": r.functions.iter().map(|(n, (truth, named))| (n.clone(), json!({"bytes": truth, "named_bytes": named, "share": r.share(n)}))).collect::<serde_json::Map<_, _>>(),
                "js_frames_named": r.named_frames,
                "js_frames_unnamed": r.unnamed_frames,
            })).collect::<Vec<_>>(),
            "good_runs": self.good_runs(),
        })
    }
}
