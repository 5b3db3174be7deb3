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
