//! Shared helpers of the privileged end-to-end tests: build fixture programs with the system C
//! compiler, start them, and talk to them over their stdin/stdout protocol.
#![allow(dead_code)]

pub mod agent;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::OnceLock,
};

/// Compiles `tests/fixtures/<name>.c` (with `extra` cc flags) and returns the executable.
/// Test binaries run in parallel processes (nextest), so each compiles to a private file and
/// renames it into place: no test ever runs, or overwrites, a half-written binary.
pub fn build_fixture(name: &str, extra: &[&str]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.c"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let tag = extra.join("").replace(['-', '='], "");
    let out = dir.join(format!("{name}{tag}"));
    let tmp = dir.join(format!(".{name}{tag}.{}.{:?}", std::process::id(), std::thread::current().id()));
    let status = Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&tmp)
        .arg(&src)
        .args(extra)
        .status()
        .expect("running cc (install gcc)");
    assert!(status.success(), "compiling {}", src.display());
    std::fs::rename(&tmp, &out).unwrap();
    out
}

pub fn alloc_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_fixture("alloc_fixture", &[])).clone()
}

/// A running fixture: waits at "ready" until `go()`.
pub struct Fixture {
    pub child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Fixture {
    pub fn start(exe: &std::path::Path, mode: &str) -> Fixture {
        let mut child = Command::new(exe)
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting fixture");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready "), "fixture said {line:?}");
        let pid = child.id();
        Fixture { child, pid, stdin, stdout }
    }

    /// Lets the workload run and waits until it says "done".
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "done\n");
    }

    /// Closes stdin: the fixture exits.
    pub fn finish(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The privileged tests need root; in CI they must run, so this fails instead of skipping.
pub fn require_root() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "memscope's end-to-end tests need root (eBPF)");
}
