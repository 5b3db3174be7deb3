//! Helpers for tests that run the real `memscope agent` binary and its client commands.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub const READ: &str = "e2e-read-token-0123456789";
pub const ADMIN: &str = "e2e-admin-token-0123456789";

pub fn memscope() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memscope"));
    c.env_remove("MEMSCOPE_TOKEN")
        .env_remove("MEMSCOPE_AGENT")
        .env("MEMSCOPE_LOG", "warn,audit=info");
    c
}

pub fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

pub fn standard_tokens(dir: &Path) -> PathBuf {
    token_file(
        dir,
        &format!("# e2e\nviewer read {READ}\nops admin {ADMIN}\n"),
        0o600,
    )
}

/// Runs a command to its end (at most 60 s); returns its status, stdout and stderr.
pub fn run(mut cmd: Command) -> (ExitStatus, String, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("command did not end within 60 s")
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running agent; killed when dropped.
pub struct Agent {
    pub child: Child,
    pub url: String,
    /// Lines before the "listening on" line.
    pub early: Vec<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stderr lines printed so far.
    pub fn log(&self) -> Vec<String> {
        self.early
            .iter()
            .cloned()
            .chain(self.stderr.try_iter())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `memscope agent ARGS` and waits for its "listening on URL" line; on an early exit
/// returns its stderr.
pub fn start_agent(args: &[&str]) -> Result<Agent, String> {
    let mut cmd = memscope();
    cmd.arg("agent").args(args);
    start_agent_command(cmd)
}

/// Like [`start_agent`] for a command that runs the agent some other way (under `unshare`).
pub fn start_agent_command(mut cmd: Command) -> Result<Agent, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("memscope agent: listening on ") {
                    return Ok(Agent {
                        child,
                        url: url.trim().to_owned(),
                        early: seen,
                        stderr: rx,
                    });
                }
                seen.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return Err(seen.join("\n"));
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not start within 30 s: {}", seen.join("\n"));
        }
    }
}

pub fn data_dir(dir: &Path) -> String {
    dir.join("data").display().to_string()
}

/// A client command against `url` with `token` in MEMSCOPE_TOKEN.
pub fn client(url: &str, token: Option<&str>, args: &[&str]) -> (ExitStatus, String, String) {
    let mut c = memscope();
    c.args(args).arg("--agent").arg(url);
    if let Some(t) = token {
        c.env("MEMSCOPE_TOKEN", t);
    }
    run(c)
}

/// The tests of one file one at a time (each test binary has its own lock): for tests that
/// measure the agent or time its attaches, which agents starting at once on a 2-core host blur.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `method` (`GET`, `POST` of `body`, `DELETE`) of `url` + `path` with `token`: the status and
/// the body as text, statuses returned (not errors).
pub fn http_text(url: &str, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let full = format!("{url}{path}");
    let auth = format!("Bearer {token}");
    let mut resp = match (method, body) {
        ("POST", b) => agent.post(&full).header("Authorization", &auth).send(b.unwrap_or("")),
        ("DELETE", _) => agent.delete(&full).header("Authorization", &auth).call(),
        _ => agent.get(&full).header("Authorization", &auth).call(),
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
}

/// [`http_text`], the body read as JSON (a JSON string of the text when it is not JSON).
pub fn http(url: &str, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) = http_text(url, method, path, token, body);
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// The agent's workloads (`GET /v1/workloads` with the read token, which must answer 200).
pub fn workloads(url: &str) -> Vec<serde_json::Value> {
    let (status, v) = http(url, "GET", "/v1/workloads", READ, None);
    assert_eq!(status, 200, "{v}");
    v["workloads"].as_array().unwrap().clone()
}

/// Waits up to `within` for `pred`, polling every 100 ms; panics with `what` after.
pub fn wait_until(within: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let t = Instant::now();
    while !pred() {
        assert!(t.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of the running children of `pid`, in order.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| ppid(*c) == Some(pid))
        .collect();
    out.sort_unstable();
    out
}

/// The parent of `pid` (`PPid` of /proc/PID/status), if it still runs.
pub fn ppid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Starts `memscope agent` on 127.0.0.1 with [`standard_tokens`] and its data in `dir`, and
/// `extra` flags; panics when it does not start.
pub fn start_agent_in(dir: &Path, extra: &[&str]) -> Agent {
    let tokens = standard_tokens(dir);
    let data = data_dir(dir);
    let mut args = vec!["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data];
    args.extend_from_slice(extra);
    start_agent(&args).unwrap()
}
