//! The `node` section of `cargo xtask bench`: one agent, 50 targets, as on a node running 50
//! services. Measures what the issue bounds: the agent's BPF map memory (fdinfo `memlock` of
//! its map descriptors) and RSS with 50 targets attached, the agent CPU each attach costs, and
//! each detach's wall time. The targets are Debian's `sleep` (idle, glibc's allocator): the
//! figures are the per-target fixed costs, not the cost of tracing load.
use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::step;

pub const TARGETS: usize = 50;
pub const MAX_MAP_MIB: f64 = 256.0;
pub const MAX_RSS_MIB: f64 = 256.0;
pub const MAX_ATTACH_CPU_S: f64 = 0.3;
pub const MAX_DETACH_S: f64 = 0.05;
const TOKEN: &str = "bench-node-admin-token-0123456789";

pub struct NodeRun {
    pub map_bytes: u64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// Agent CPU per attach, the first one (which loads and verifies the programs) apart.
    pub first_attach_cpu_s: f64,
    pub attach_cpu_s: Vec<f64>,
    pub detach_s: Vec<f64>,
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(memscope: &Path, scratch: &Path) -> Result<NodeRun> {
    step(format!("node: one agent, {TARGETS} idle targets (sleep), attached and detached one by one"));
    let dir = scratch.join("node");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("data"))?;
    let tokens = dir.join("tokens");
    fs::write(&tokens, format!("bench admin {TOKEN}\n"))?;
    fs::set_permissions(&tokens, fs::Permissions::from_mode(0o600))?;
    let mut agent = Command::new(memscope)
        .args(["agent", "--listen", "127.0.0.1:0", "--rate-limit", "1000", "--tokens"])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("MEMSCOPE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memscope agent")?;
    let url = listening_url(&mut agent)?;
    let agent = Killed(vec![agent]);
    let agent_pid = agent.0[0].id();
    let mut sleepers = Killed(Vec::new());
    for _ in 0..TARGETS {
        sleepers.0.push(Command::new("sleep").arg("600").spawn().context("starting sleep")?);
    }
    let mut attach_cpu = Vec::new();
    for s in &sleepers.0 {
        let before = cpu_s(agent_pid)?;
        let (code, body) = curl(&url, "POST", "/v1/targets", Some(&format!("{{\"pid\": {}}}", s.id())))?;
        if code != 200 && code != 201 {
            bail!("attaching to sleep {}: HTTP {code}: {body}", s.id());
        }
        attach_cpu.push(cpu_s(agent_pid)? - before);
    }
    let map_bytes = bpf_map_bytes(agent_pid);
    let rss_kib = status_kib(agent_pid, "VmRSS:")?;
    let mut detach_s = Vec::new();
    for s in &sleepers.0 {
        let started = Instant::now();
        let (code, body) = curl(&url, "DELETE", &format!("/v1/targets/{}", s.id()), None)?;
        if code >= 300 {
            bail!("detaching from sleep {}: HTTP {code}: {body}", s.id());
        }
        detach_s.push(started.elapsed().as_secs_f64());
    }
    let peak_rss_kib = status_kib(agent_pid, "VmHWM:")?;
    drop(agent);
    let first_attach_cpu_s = attach_cpu.remove(0);
    let run = NodeRun { map_bytes, rss_kib, peak_rss_kib, first_attach_cpu_s, attach_cpu_s: attach_cpu, detach_s };
    step(format!(
        "  maps {:.0} MiB, RSS {:.0} MiB, attach CPU median {:.3} s (first {:.2} s), detach median {:.1} ms",
        run.map_bytes as f64 / 1048576.0,
        run.rss_kib as f64 / 1024.0,
        median(&run.attach_cpu_s),
        run.first_attach_cpu_s,
        median(&run.detach_s) * 1e3
    ));
    Ok(run)
}

/// The agent's "listening on URL" line.
fn listening_url(agent: &mut Child) -> Result<String> {
    let stderr = agent.stderr.take().context("agent stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("http://") {
                let _ = tx.send(line[i..].split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).context("the agent did not say where it listens")
}

fn curl(url: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "60", "-X", method, "-w", "\n%{http_code}", "-H"]).arg(format!("Authorization: Bearer {TOKEN}"));
    if let Some(body) = body {
        c.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    let out = c
        .arg(format!("{url}{path}"))
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

fn cpu_s(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} missing"))
}

/// Kernel memory of every BPF map `pid` holds, each map once.
fn bpf_map_bytes(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0 };
    let mut total = 0;
    for fd in dir.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                total += memlock.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

impl NodeRun {
    /// `(name, limit, value, met)` rows for the targets table.
    pub fn targets(&self) -> Vec<(String, String, String, bool)> {
        let maps = self.map_bytes as f64 / 1048576.0;
        let rss = self.rss_kib as f64 / 1024.0;
        vec![
            (format!("node: BPF map memory, {TARGETS} targets"), format!("<= {MAX_MAP_MIB:.0} MiB"), format!("{maps:.0} MiB"), maps <= MAX_MAP_MIB),
            (format!("node: agent RSS, {TARGETS} targets"), format!("<= {MAX_RSS_MIB:.0} MiB"), format!("{rss:.0} MiB"), rss <= MAX_RSS_MIB),
            (
                "node: agent CPU per attach (max; first apart)".into(),
                format!("<= {MAX_ATTACH_CPU_S} s"),
                format!("{:.3} s (first {:.2} s)", max(&self.attach_cpu_s), self.first_attach_cpu_s),
                max(&self.attach_cpu_s) <= MAX_ATTACH_CPU_S,
            ),
            (
                "node: detach wall time (max)".into(),
                format!("<= {:.0} ms", MAX_DETACH_S * 1e3),
                format!("{:.1} ms (median {:.1})", max(&self.detach_s) * 1e3, median(&self.detach_s) * 1e3),
                max(&self.detach_s) <= MAX_DETACH_S,
            ),
        ]
    }

    pub fn render(&self) -> String {
        format!(
            "\nnode: one agent, {TARGETS} idle targets: BPF maps {:.0} MiB, RSS {:.0} MiB (peak {:.0}), \
             attach CPU median {:.3} s / max {:.3} s (the first, which loads the programs: {:.2} s), \
             detach median {:.1} ms / max {:.1} ms\n",
            self.map_bytes as f64 / 1048576.0,
            self.rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / 1024.0,
            median(&self.attach_cpu_s),
            max(&self.attach_cpu_s),
            self.first_attach_cpu_s,
            median(&self.detach_s) * 1e3,
            max(&self.detach_s) * 1e3,
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "targets": TARGETS, "map_bytes": self.map_bytes, "rss_kib": self.rss_kib,
            "peak_rss_kib": self.peak_rss_kib, "first_attach_cpu_s": self.first_attach_cpu_s,
            "attach_cpu_s": self.attach_cpu_s, "detach_s": self.detach_s,
        })
    }
}
