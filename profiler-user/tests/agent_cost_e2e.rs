//! What the node agent costs and how it is run on a cluster, end to end with the real binary:
//! its memory under targets pushing profiles (bounded, not creeping), a fork-per-connection
//! server (PostgreSQL under `pgbench -C`) under a `forks=true` selector (no backend refused,
//! long-lived backends attached, short-lived ones counted), the `--select-file` reload (a
//! ConfigMap edit applies without detaching the other targets), and the read-only metrics
//! listener with its own token. Needs root (eBPF); CI runs it as root. PostgreSQL comes from
//! `cargo xtask setup` (Debian's postgresql).
mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{agent::*, build_fixture, cgroups::cgroup2_root, require_root};
use serde_json::Value;

// Its tests run `one_at_a_time`: each measures the agent, and two agents verifying their
// probes at once on a 2-core host would blur what each costs.

fn json(url: &str, path: &str) -> Value {
    let (status, text) = http_text(url, "GET", path, READ, None);
    assert_eq!(status, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The value of the series `name` (with its labels, e.g. `memscope_forks_total{result="seen"}`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

/// Processes killed (and reaped) when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Pyroscope-style ingest endpoint on loopback: answers every request 200 and counts them.
fn receiver() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let c = c.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(conn.try_clone().unwrap());
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
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            });
        }
    });
    (url, count)
}

/// The agent's memory with 20 targets in steady state, each pushed every second (a minute of an
/// hour's soak at 10 s, compressed): its own memory (`RssAnon`: the heap; the rest of its RSS
/// is file pages, of its executable, large in a debug build, and of the unwind-row map it
/// mmaps, which is the map's kernel memory) stays under 128 MiB, and over the second half of
/// the run it grows by less than 16 MiB (what grows without bound grows all along). The steady
/// fixture's heap and stacks stop growing after its first seconds. The bench's `soak` section
/// measures the release binary with 50 targets for minutes.
#[test]
fn agent_memory_stays_bounded_with_pushing_targets() {
    require_root();
    let _serial = one_at_a_time();
    const TARGETS: usize = 20;
    const RUN: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let exe = build_fixture("steady_fixture", &[]);
    // A comm of its own, so that no other test's process matches, and an executable per target:
    // a workload is a selector, an executable and a cgroup, so each is a workload of its own.
    let prefix = format!("stdy{}", std::process::id() % 100_000_000);
    let mut procs = Procs(Vec::new());
    for i in 0..TARGETS {
        let target = dir.path().join(format!("{prefix}_{i:02}"));
        std::fs::copy(&exe, &target).unwrap();
        procs.0.push(Command::new(&target).stdin(Stdio::null()).spawn().unwrap());
    }
    let (push_url, pushed) = receiver();
    let agent = start_agent_in(
        dir.path(),
        &["--rate-limit", "1000", "--select", &format!("comm={prefix}_*"), "--push", &push_url, "--push-interval", "1s"],
    );
    let url = agent.url.clone();
    wait_until(Duration::from_secs(120), "every target attached", || {
        workloads(&url).iter().filter(|w| w["attached"] == true).count() == TARGETS
    });
    let pid = agent.child.id();
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while started.elapsed() < RUN {
        std::thread::sleep(Duration::from_secs(2));
        samples.push((started.elapsed().as_secs_f64(), status_kib(pid, "RssAnon:")));
    }
    let sent = pushed.load(Ordering::Relaxed);
    let max = samples.iter().map(|s| s.1).max().unwrap();
    let half = samples.len() / 2;
    let (mid, end) = (samples[half].1, samples.last().unwrap().1);
    let mib = |k: u64| k as f64 / 1024.0;
    eprintln!(
        "agent RssAnon with {TARGETS} targets pushing every 1s: max {:.1} MiB, at {:.0}s {:.1} MiB, at end {:.1} MiB \
         (VmRSS {:.1} MiB); {sent} profiles received",
        mib(max),
        samples[half].0,
        mib(mid),
        mib(end),
        mib(status_kib(pid, "VmRSS:"))
    );
    // Pushes did happen (20 workloads, ~60 rounds; some skipped while renders are busy).
    assert!(sent >= (TARGETS * 10) as u64, "only {sent} profiles arrived");
    assert!(mib(max) < 128.0, "the agent's own memory reached {:.1} MiB: {samples:?}", mib(max));
    assert!(mib(end) - mib(mid) < 16.0, "the agent's own memory grew {:.1} MiB over the second half: {samples:?}", mib(end) - mib(mid));
}

/// A PostgreSQL cluster of its own, in a temporary directory (initdb as user postgres, a Unix
/// socket only) and a cgroup of its own (so that a selector finds its processes, not those of
/// another cluster on the machine: a workload is a selector, an executable and a cgroup);
/// stopped and removed when dropped.
struct Postgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    cgroup: PathBuf,
}

impl Postgres {
    fn start(dir: &Path, port: u16) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL is missing (/usr/lib/postgresql/*/bin/initdb): run `cargo xtask setup`");
        std::fs::create_dir_all(dir).unwrap();
        let chown = Command::new("chown").args(["-R", "postgres:"]).arg(dir).status().unwrap();
        assert!(chown.success());
        let cgroup = cgroup2_root().join(format!("memscope-pg-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup).unwrap();
        let pg = Postgres { dir: dir.to_owned(), port, bin, cgroup };
        let run = |args: &[&str]| {
            let out = Command::new("runuser").args(["-u", "postgres", "--"]).args(args).stdin(Stdio::null()).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let data = dir.join("data");
        run(&[pg.bin.join("initdb").to_str().unwrap(), "-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-N"]);
        let opts = format!("-p {port} -k {} -c listen_addresses='' -c max_connections=40 -c fsync=off", dir.display());
        // pg_ctl (and the postmaster it starts) in the cluster's cgroup.
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec runuser -u postgres -- "$@""#)
            .arg(&pg.cgroup)
            .arg(pg.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-o", &opts, "-l", dir.join("log").to_str().unwrap(), "-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
        let init = pg.client("pgbench").args(["-i", "-q", "postgres"]).output().unwrap();
        assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        pg
    }

    fn client(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.args(["-h", self.dir.to_str().unwrap(), "-p", &self.port.to_string(), "-U", "postgres"]).stdin(Stdio::null());
        c
    }

    /// The postmaster's pid (first line of postmaster.pid).
    fn postmaster(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    /// `pgbench -C -S -T seconds`: its tps.
    fn pgbench_connect_per_tx(&self, seconds: u32) -> f64 {
        let out = self.client("pgbench").args(["-C", "-S", "-T", &seconds.to_string(), "postgres"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
        text.lines().find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.dir.join("data").to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// PostgreSQL under `comm=postgres,forks=true` (one backend forked per connection, without
/// exec): its postmaster is attached, then `pgbench -C` opens hundreds of connections whose
/// backends live a few milliseconds: none is refused (no workload carries an error; a backend
/// that exits while it is being attached is counted, not refused), they are counted as forks,
/// the short-lived ones are not attached; a backend that lives (a connection held open by
/// `pg_sleep`) is attached as a worker of the postmaster's workload; the postmaster is probed
/// with classic uprobes, which its short-lived children shed. The throughput is logged
/// (the bound is `cargo xtask bench --pg-only`'s: timing depends on the machine's load).
#[test]
fn fork_per_connection_backends_are_not_refused_and_long_lived_ones_are_attached() {
    require_root();
    let _serial = one_at_a_time();
    let dir = tempfile::Builder::new().prefix("memscope-pg").tempdir_in("/tmp").unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let pg = Postgres::start(&dir.path().join("pg"), port);
    let postmaster = pg.postmaster();
    let untraced = pg.pgbench_connect_per_tx(4);
    // Only this cluster's processes: other tests may run their own postgres.
    let cgroup = pg.cgroup.file_name().unwrap().to_str().unwrap().to_string();
    let selector = format!("comm=postgres,cgroup=*{cgroup},forks=true");
    let agent = start_agent_in(dir.path(), &["--rate-limit", "1000", "--select", &selector]);
    let url = agent.url.clone();
    wait_until(Duration::from_secs(120), "the postmaster attached", || {
        workloads(&url).iter().any(|w| w["pid"] == postmaster && w["attached"] == true)
    });
    let before: Vec<u32> = children(postmaster);
    let traced = pg.pgbench_connect_per_tx(8);
    let (_, metrics) = http_text(&url, "GET", "/metrics", READ, None);
    let seen = metric(&metrics, "memscope_forks_total{result=\"seen\"}").unwrap_or(0.0);
    let short = metric(&metrics, "memscope_forks_total{result=\"short_lived\"}").unwrap_or(0.0);
    eprintln!("pgbench -C -S: {untraced:.0} tps untraced, {traced:.0} tps traced; forks seen {seen}, short-lived {short}");
    let refused: Vec<Value> = workloads(&url).into_iter().filter(|w| !w["last_error"].is_null()).collect();
    assert!(refused.is_empty(), "workloads with an error: {refused:#?}");
    let log = agent.log();
    let failed: Vec<&String> = log.iter().filter(|l| l.contains("attaching a workload's process failed")).collect();
    assert!(failed.is_empty(), "attach failures logged: {failed:#?}");
    assert!(seen >= 20.0, "only {seen} forks seen under pgbench -C");
    // What keeps the backends' throughput: the postmaster under classic uprobes, whose
    // breakpoints an untraced child sheds at its first hit (tests/fork_children_e2e.rs).
    let (_, targets) = http_text(&url, "GET", "/v1/targets", READ, None);
    let targets: Value = serde_json::from_str(&targets).unwrap();
    let mode = targets["targets"].as_array().unwrap().iter().find(|t| t["id"] == postmaster).map(|t| t["probe_mode"].clone());
    assert_eq!(mode, Some(Value::from("classic")), "{targets:#}");
    // A backend that lives: attached as the postmaster's worker.
    let mut held = Procs(vec![pg.client("psql").args(["-c", "select pg_sleep(30)", "postgres"]).stdout(Stdio::null()).spawn().unwrap()]);
    let backend = {
        let t = Instant::now();
        loop {
            let new: Vec<u32> = children(postmaster).into_iter().filter(|p| !before.contains(p)).collect();
            if let [one] = new[..] {
                break one;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no new backend for the held connection: {new:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_until(Duration::from_secs(30), "the held connection's backend attached as a worker", || {
        workloads(&url).iter().any(|w| w["pid"] == backend && w["attached"] == true && !w["worker"].is_null())
    });
    held.0[0].kill().unwrap();
}

/// `--select-file` is watched: a selector added to the file is applied (its process attached)
/// while the process of a selector kept in the file stays attached under the same pid, never
/// detached; a selector removed from the file detaches its process; a file with a bad line
/// changes nothing and is counted as refused.
#[test]
fn select_file_changes_apply_without_detaching_other_targets() {
    require_root();
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let exe = build_fixture("steady_fixture", &[]);
    let id = std::process::id() % 10_000_000;
    let (a, b) = (format!("sela{id}"), format!("selb{id}"));
    for name in [&a, &b] {
        std::fs::copy(&exe, dir.path().join(name)).unwrap();
    }
    let mut procs = Procs(Vec::new());
    for name in [&a, &b] {
        procs.0.push(Command::new(dir.path().join(name)).stdin(Stdio::null()).spawn().unwrap());
    }
    let (pid_a, pid_b) = (procs.0[0].id(), procs.0[1].id());
    let file = dir.path().join("selectors");
    std::fs::write(&file, format!("# the ConfigMap\ncomm={a}\n")).unwrap();
    let agent = start_agent_in(dir.path(), &["--rate-limit", "1000", "--select-file", file.to_str().unwrap()]);
    let url = agent.url.clone();
    let attached = |pid: u32| workloads(&url).iter().any(|w| w["pid"] == pid && w["attached"] == true);
    wait_until(Duration::from_secs(60), "a attached", || attached(pid_a));
    let attached_at = |pid: u32| {
        let targets = json(&url, "/v1/targets");
        targets["targets"].as_array().unwrap().iter().find(|t| t["id"] == pid).map(|t| t["attached_at_ms"].clone())
    };
    let a_since = attached_at(pid_a).expect("a is a target");
    // Add b (as kubelet does: the file replaced by a rename).
    let tmp = dir.path().join(".selectors.new");
    std::fs::write(&tmp, format!("comm={a}\ncomm={b}\n")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_until(Duration::from_secs(30), "b attached after the file changed", || attached(pid_b));
    assert_eq!(attached_at(pid_a), Some(a_since.clone()), "a was detached and attached again");
    // A bad line: refused, nothing changes.
    std::fs::write(&tmp, format!("comm={a}\nbogus\n")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_until(Duration::from_secs(30), "the bad file counted as refused", || {
        let (_, m) = http_text(&url, "GET", "/metrics", READ, None);
        metric(&m, "memscope_select_file_reloads_total{result=\"refused\"}") == Some(1.0)
    });
    assert!(attached(pid_a) && attached(pid_b));
    // b removed: detached; a stays.
    std::fs::write(&tmp, format!("comm={a}\n")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_until(Duration::from_secs(30), "b detached after its selector left the file", || !attached(pid_b));
    assert_eq!(attached_at(pid_a), Some(a_since.clone()), "a was detached and attached again");
    let (_, m) = http_text(&url, "GET", "/metrics", READ, None);
    assert_eq!(metric(&m, "memscope_select_file_reloads_total{result=\"applied\"}"), Some(2.0), "{m}");
}

/// `--metrics-listen` serves `/metrics` with the metrics token only (an API token, no token or
/// a wrong one: 401), `/healthz` and `/readyz` without a token, and nothing of the API (404);
/// the API's own listener does not accept the metrics token. A metrics token file readable by
/// others stops the agent at start with one line.
#[test]
fn metrics_listener_serves_metrics_with_its_own_token_only() {
    require_root();
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    const METRICS_TOKEN: &str = "scrape-token-0123456789abcdef";
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, format!("{METRICS_TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--listen", "127.0.0.1:0", "--tokens", tokens.to_str().unwrap(), "--data-dir", &data_dir(dir.path())]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = base(&["--metrics-listen", "127.0.0.1:0", "--metrics-token-file", token_file.to_str().unwrap()]);
    let err = start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).err().expect("a 0644 token file is refused");
    assert!(err.contains("0644") && !err.contains(METRICS_TOKEN), "{err}");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let metrics_url = {
        let t = Instant::now();
        loop {
            if let Some(u) = agent.log().iter().find_map(|l| l.strip_prefix("memscope agent: metrics on ").map(|u| u.trim().trim_end_matches("/metrics").to_string())) {
                break u;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no metrics line: {:?}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (status, body) = http_text(&metrics_url, "GET", "/metrics", METRICS_TOKEN, None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE"), "{body}");
    for bad in [READ, ADMIN, "scrape-token-0123456789abcdeX"] {
        assert_eq!(http_text(&metrics_url, "GET", "/metrics", bad, None).0, 401, "token {bad}");
    }
    assert_eq!(http_text(&metrics_url, "GET", "/healthz", "", None).0, 200);
    assert_eq!(http_text(&metrics_url, "GET", "/readyz", "", None).0, 200);
    for path in ["/v1/targets", "/v1/workloads", "/v1/openapi.json", "/metrics/../v1/targets"] {
        assert_eq!(http_text(&metrics_url, "GET", path, ADMIN, None).0, 404, "{path}");
    }
    assert_eq!(http_text(&metrics_url, "POST", "/metrics", METRICS_TOKEN, Some("")).0, 405);
    // The API does not take the metrics token.
    assert_eq!(http_text(&agent.url, "GET", "/metrics", METRICS_TOKEN, None).0, 401);
}
