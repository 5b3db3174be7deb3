//! Two sections of `cargo xtask bench` about what the node agent costs over time:
//!
//! - `soak` (`--soak-only`): one agent, `--soak-targets` (50) steady services (the test
//!   fixture `steady_fixture.c`: a bounded live heap, 64 distinct stacks) found by a selector,
//!   each workload's profile pushed every `--soak-push-interval` (10 s) to a loopback
//!   Pyroscope-style receiver, for `--soak-minutes` (5; the hour, shortened). The agent's
//!   RSS is sampled every 10 s; reported: the series, its maximum, and its slope (least squares,
//!   MiB per hour) over the second half of the run, when start-up is over. Targets: maximum
//!   under 128 MiB, slope under 32 MiB/h (what is left of start-up).
//! - `pg` (`--pg-only`): PostgreSQL (initdb in a scratch directory, a Unix socket only) under
//!   `pgbench -C -S` (a new connection, hence a forked backend, per transaction): tps untraced
//!   (the mean of a run before and one after), then traced by an agent with
//!   `comm=postgres,forks=true`; the agent's CPU and peak RSS meanwhile, the forks it saw and
//!   what became of them, and the workloads it marked failed. Targets: traced tps at least 70%
//!   of untraced, no backend refused, RSS under 128 MiB.
//!
//! Nothing is asserted; each target is printed as met or not met.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::{self, step};

pub const SOAK_MAX_RSS_MIB: f64 = 128.0;
pub const SOAK_MAX_SLOPE_MIB_H: f64 = 32.0;
pub const PG_MIN_RATIO: f64 = 0.70;
const TOKEN: &str = "bench-agent-admin-token-0123456789";
const PG_SECONDS: u32 = 15;

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent(memscope: &Path, dir: &Path, extra: &[String]) -> Result<(Killed, String)> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("data"))?;
    let tokens = dir.join("tokens");
    fs::write(&tokens, format!("bench admin {TOKEN}\n"))?;
    fs::set_permissions(&tokens, fs::Permissions::from_mode(0o600))?;
    let mut child = Command::new(memscope)
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "1000",
            "--tokens",
        ])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .env("MEMSCOPE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memscope agent")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("memscope agent: listening on ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the agent did not say where it listens")?;
    Ok((Killed(vec![child]), url))
}

fn get(url: &str, path: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-fsS", "-m", "30", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("{url}{path}"))
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn workloads(url: &str) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&get(url, "/v1/workloads")?)?;
    Ok(v["workloads"].as_array().cloned().unwrap_or_default())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} missing"))
}

fn cpu_s(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Kernel memory of every BPF map `pid` holds, each map once.
fn bpf_map_bytes(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut total = 0;
    for fd in dir.flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                total += memlock.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// A loopback ingest endpoint: answers 200 to every request, counts those with a body.
fn receiver() -> Result<(String, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let c = c.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(clone) = conn.try_clone() else { return };
                let mut reader = BufReader::new(clone);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    Ok((url, count))
}

/// Least-squares slope of `(seconds, MiB)` points, in MiB per hour.
fn slope_mib_per_h(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), p| {
        (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx).powi(2))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den * 3600.0
    }
}

// ---- soak --------------------------------------------------------------------------------------

pub struct SoakRun {
    pub targets: usize,
    pub push_interval_s: u64,
    pub minutes: f64,
    /// `(seconds since all were attached, RSS KiB)`.
    pub rss: Vec<(f64, u64)>,
    pub map_bytes: u64,
    pub pushed: u64,
    pub cpu_s: f64,
}

pub fn soak(
    memscope: &Path,
    scratch: &Path,
    targets: usize,
    minutes: f64,
    push_interval_s: u64,
) -> Result<SoakRun> {
    step(format!(
        "soak: one agent, {targets} steady targets pushing every {push_interval_s}s, {minutes} min"
    ));
    let dir = scratch.join("soak");
    fs::create_dir_all(&dir)?;
    let exe = dir.join("steady_fixture");
    let source = cmd::workspace_root().join("profiler-user/tests/fixtures/steady_fixture.c");
    cmd::run(
        Command::new("cc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&exe)
            .arg(&source),
    )
    .context("compiling steady_fixture.c")?;
    // One executable per target (comm `msteady_N`): a workload is a selector, an executable and
    // a cgroup, so each is a workload of its own, as 50 services on a node are.
    let mut services = Killed(Vec::new());
    for i in 0..targets {
        let copy = dir.join(format!("msteady_{i:03}"));
        fs::copy(&exe, &copy).with_context(|| format!("copying to {}", copy.display()))?;
        services.0.push(
            Command::new(&copy)
                .stdin(Stdio::null())
                .spawn()
                .context("starting a steady target")?,
        );
    }
    let (push_url, pushed) = receiver()?;
    let extra: Vec<String> = vec![
        "--select".into(),
        "comm=msteady_*".into(),
        "--push".into(),
        push_url,
        "--push-interval".into(),
        format!("{push_interval_s}s"),
    ];
    let (agent, url) = agent(memscope, &dir.join("agent"), &extra)?;
    let pid = agent.0[0].id();
    let t = Instant::now();
    loop {
        let attached = workloads(&url)?
            .iter()
            .filter(|w| w["attached"] == true)
            .count();
        if attached >= targets {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("only {attached} of {targets} targets attached after 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    step(format!(
        "  {targets} attached in {:.1} s; sampling RSS every 10 s",
        t.elapsed().as_secs_f64()
    ));
    let cpu_before = cpu_s(pid)?;
    let started = Instant::now();
    let run = Duration::from_secs_f64(minutes * 60.0);
    let mut rss = vec![(0.0, status_kib(pid, "VmRSS:")?)];
    while started.elapsed() < run {
        std::thread::sleep(Duration::from_secs(10));
        let sample = (started.elapsed().as_secs_f64(), status_kib(pid, "VmRSS:")?);
        step(format!(
            "  t={:>4.0}s RSS {:.1} MiB, {} profiles received",
            sample.0,
            sample.1 as f64 / 1024.0,
            pushed.load(Ordering::Relaxed)
        ));
        rss.push(sample);
    }
    let out = SoakRun {
        targets,
        push_interval_s,
        minutes,
        map_bytes: bpf_map_bytes(pid),
        pushed: pushed.load(Ordering::Relaxed),
        cpu_s: cpu_s(pid)? - cpu_before,
        rss,
    };
    drop(agent);
    drop(services);
    Ok(out)
}

impl SoakRun {
    fn max_mib(&self) -> f64 {
        self.rss.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0
    }

    /// MiB per hour over the second half.
    fn slope(&self) -> f64 {
        let half = self.rss.len() / 2;
        let pts: Vec<(f64, f64)> = self.rss[half..]
            .iter()
            .map(|&(t, k)| (t, k as f64 / 1024.0))
            .collect();
        slope_mib_per_h(&pts)
    }

    pub fn targets_table(&self) -> Vec<(String, String, String, bool)> {
        vec![
            (
                format!(
                    "soak: agent RSS max, {} targets pushing every {}s",
                    self.targets, self.push_interval_s
                ),
                format!("< {SOAK_MAX_RSS_MIB:.0} MiB"),
                format!("{:.1} MiB", self.max_mib()),
                self.max_mib() < SOAK_MAX_RSS_MIB,
            ),
            (
                "soak: agent RSS slope, second half".into(),
                format!("< {SOAK_MAX_SLOPE_MIB_H:.0} MiB/h"),
                format!("{:.1} MiB/h", self.slope()),
                self.slope() < SOAK_MAX_SLOPE_MIB_H,
            ),
        ]
    }

    pub fn render(&self) -> String {
        let series: Vec<String> = self
            .rss
            .iter()
            .map(|(t, k)| format!("{t:.0}s:{:.1}", *k as f64 / 1024.0))
            .collect();
        format!(
            "\nsoak: {} targets, push every {}s, {:.1} min: RSS max {:.1} MiB, slope (second half) {:.1} MiB/h, \
             BPF maps {:.0} MiB, {} profiles received, agent CPU {:.1}% of one core\n  RSS MiB: {}\n",
            self.targets,
            self.push_interval_s,
            self.minutes,
            self.max_mib(),
            self.slope(),
            self.map_bytes as f64 / 1048576.0,
            self.pushed,
            100.0 * self.cpu_s / (self.minutes * 60.0).max(1.0),
            series.join(" ")
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "targets": self.targets, "push_interval_s": self.push_interval_s, "minutes": self.minutes,
            "rss_kib": self.rss, "rss_max_mib": self.max_mib(), "rss_slope_mib_per_h": self.slope(),
            "map_bytes": self.map_bytes, "profiles_received": self.pushed, "cpu_s": self.cpu_s,
        })
    }
}

// ---- pg ----------------------------------------------------------------------------------------

struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    fn start(dir: &Path, port: u16) -> Result<Postgres> {
        let bin = fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .find(|b| b.join("initdb").exists())
        });
        let bin = match bin {
            Some(b) => b,
            None => {
                crate::setup::debian_packages().context("installing postgresql failed")?;
                fs::read_dir("/usr/lib/postgresql")?
                    .flatten()
                    .map(|e| e.path().join("bin"))
                    .find(|b| b.join("initdb").exists())
                    .context("PostgreSQL is still missing after installing Debian packages")?
            }
        };
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        cmd::run(Command::new("chown").args(["-R", "postgres:"]).arg(dir))?;
        let pg = Postgres {
            dir: dir.to_owned(),
            bin,
            port,
        };
        let data = dir.join("data");
        pg.as_postgres(&[
            pg.bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-N",
        ])?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses='' -c max_connections=40 -c fsync=off",
            dir.display()
        );
        let log = dir.join("log");
        pg.as_postgres(&[
            pg.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ])?;
        cmd::run(pg.client("pgbench").args(["-i", "-q", "postgres"])).context("pgbench -i")?;
        Ok(pg)
    }

    fn as_postgres(&self, args: &[&str]) -> Result<()> {
        cmd::run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .stdout(Stdio::null()),
        )
    }

    fn client(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.args([
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ])
        .stdin(Stdio::null());
        c
    }

    fn tps(&self, seconds: u32) -> Result<f64> {
        let out = cmd::output(self.client("pgbench").args([
            "-C",
            "-S",
            "-T",
            &seconds.to_string(),
            "postgres",
        ]))?;
        out.lines()
            .find_map(|l| {
                l.strip_prefix("tps = ")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no tps in pgbench's output:\n{out}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub struct PgRun {
    pub untraced_tps: Vec<f64>,
    pub traced_tps: f64,
    pub agent_cpu_s: f64,
    pub agent_peak_rss_kib: u64,
    pub forks: Vec<(String, f64)>,
    /// Workloads with a `last_error`, and the errors.
    pub failed: Vec<String>,
    pub workers_attached: usize,
}

pub fn pg(memscope: &Path, scratch: &Path) -> Result<PgRun> {
    step(format!("pg: PostgreSQL under pgbench -C -S ({PG_SECONDS} s each), untraced and traced with comm=postgres,forks=true"));
    let dir = scratch.join("pg");
    let pg = Postgres::start(&dir.join("cluster"), 54_329)?;
    let before = pg.tps(PG_SECONDS)?;
    step(format!("  untraced: {before:.0} tps"));
    let selector = format!("comm=postgres,exe={}/postgres,forks=true", pg.bin.display());
    let (agent, url) = agent(memscope, &dir.join("agent"), &["--select".into(), selector])?;
    let pid = agent.0[0].id();
    let t = Instant::now();
    while !workloads(&url)?
        .iter()
        .any(|w| w["attached"] == true && w["worker"].is_null())
    {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the postmaster was not attached within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its long-lived children (checkpointer, walwriter, ...) attach as workers meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let cpu_before = cpu_s(pid)?;
    let traced = pg.tps(PG_SECONDS)?;
    let agent_cpu_s = cpu_s(pid)? - cpu_before;
    step(format!(
        "  traced: {traced:.0} tps, agent CPU {agent_cpu_s:.1} s"
    ));
    let metrics = get(&url, "/metrics")?;
    let forks = ["seen", "short_lived", "exited_while_attaching", "attached"]
        .iter()
        .map(|r| {
            (
                r.to_string(),
                metric(&metrics, &format!("memscope_forks_total{{result=\"{r}\"}}")),
            )
        })
        .collect();
    let list = workloads(&url)?;
    let failed = list
        .iter()
        .filter_map(|w| {
            w["last_error"]
                .as_str()
                .map(|e| format!("{}: {e}", w["id"]))
        })
        .collect();
    let workers_attached = list
        .iter()
        .filter(|w| w["attached"] == true && !w["worker"].is_null())
        .count();
    let agent_peak_rss_kib = status_kib(pid, "VmHWM:")?;
    drop(agent);
    let after = pg.tps(PG_SECONDS)?;
    step(format!("  untraced again: {after:.0} tps"));
    Ok(PgRun {
        untraced_tps: vec![before, after],
        traced_tps: traced,
        agent_cpu_s,
        agent_peak_rss_kib,
        forks,
        failed,
        workers_attached,
    })
}

impl PgRun {
    fn untraced(&self) -> f64 {
        self.untraced_tps.iter().sum::<f64>() / self.untraced_tps.len().max(1) as f64
    }

    fn ratio(&self) -> f64 {
        if self.untraced() > 0.0 {
            self.traced_tps / self.untraced()
        } else {
            0.0
        }
    }

    pub fn targets_table(&self) -> Vec<(String, String, String, bool)> {
        let rss = self.agent_peak_rss_kib as f64 / 1024.0;
        vec![
            (
                "pg: pgbench -C tps traced / untraced (forks=true)".into(),
                format!(">= {PG_MIN_RATIO:.2}"),
                format!(
                    "{:.2} ({:.0} / {:.0})",
                    self.ratio(),
                    self.traced_tps,
                    self.untraced()
                ),
                self.ratio() >= PG_MIN_RATIO,
            ),
            (
                "pg: backends refused".into(),
                "0".into(),
                self.failed.len().to_string(),
                self.failed.is_empty(),
            ),
            (
                "pg: agent peak RSS".into(),
                format!("< {SOAK_MAX_RSS_MIB:.0} MiB"),
                format!("{rss:.1} MiB"),
                rss < SOAK_MAX_RSS_MIB,
            ),
        ]
    }

    pub fn render(&self) -> String {
        let forks: Vec<String> = self
            .forks
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        format!(
            "\npg: pgbench -C -S {PG_SECONDS}s: untraced {:.0} tps (runs {:?}), traced {:.0} tps ({:.2}); agent CPU {:.1} s \
             ({:.0}% of one core), peak RSS {:.1} MiB; forks: {}; workers attached now {}; failed workloads {}{}\n",
            self.untraced(),
            self.untraced_tps.iter().map(|t| t.round()).collect::<Vec<_>>(),
            self.traced_tps,
            self.ratio(),
            self.agent_cpu_s,
            100.0 * self.agent_cpu_s / f64::from(PG_SECONDS),
            self.agent_peak_rss_kib as f64 / 1024.0,
            forks.join(", "),
            self.workers_attached,
            self.failed.len(),
            if self.failed.is_empty() { String::new() } else { format!(": {}", self.failed.join("; ")) }
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "untraced_tps": self.untraced_tps, "traced_tps": self.traced_tps, "ratio": self.ratio(),
            "agent_cpu_s": self.agent_cpu_s, "agent_peak_rss_kib": self.agent_peak_rss_kib,
            "forks": self.forks.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "failed": self.failed, "workers_attached": self.workers_attached,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slope of a line is found; a flat series has none.
    #[test]
    fn slope() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 60.0, 100.0 + i as f64))
            .collect();
        assert!((slope_mib_per_h(&pts) - 60.0).abs() < 1e-9);
        assert_eq!(slope_mib_per_h(&[(0.0, 5.0), (10.0, 5.0)]), 0.0);
    }
}
