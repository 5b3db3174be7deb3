//! Shared helpers of the privileged end-to-end tests: build fixture programs with the system C
//! compiler, start them, and talk to them over their stdin/stdout protocol.
#![allow(dead_code)]

pub mod agent;
pub mod cgroups;
pub mod rust_usdt;
pub mod node;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::OnceLock,
};

use profiler_user::aggregate::{HeapProfile, StackSample};

/// The stacks of `p` with a frame named `function`.
pub fn stacks_through<'a>(p: &'a HeapProfile, function: &'a str) -> impl Iterator<Item = &'a StackSample> + 'a {
    p.stacks.iter().filter(move |s| s.frames.iter().any(|f| f.function.as_deref() == Some(function)))
}

/// The stacks of `p` with a frame named `function` or `path::function` (a Rust or C++ path).
pub fn stacks_through_path<'a>(p: &'a HeapProfile, function: &'a str) -> impl Iterator<Item = &'a StackSample> + 'a {
    let suffix = format!("::{function}");
    let named = move |f: &str| f == function || f.ends_with(&suffix);
    p.stacks.iter().filter(move |s| s.frames.iter().any(|f| f.function.as_deref().is_some_and(&named)))
}

/// Longest a test waits for one line of a fixture (a loaded 2-core machine included).
pub const FIXTURE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Compiles `tests/fixtures/<name>.c` with `cc`, or `<name>.cc` with `c++` (with `extra`
/// flags), and returns the executable.
/// Tests run in parallel processes (nextest), so each process compiles its own copy: replacing
/// a binary another test is running would make its mappings read `(deleted)`, and a shared
/// half-written file could be executed.
pub fn build_fixture(name: &str, extra: &[&str]) -> PathBuf {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (src, compiler) = match fixtures.join(format!("{name}.cc")) {
        cxx if cxx.exists() => (cxx, "c++"),
        _ => (fixtures.join(format!("{name}.c")), "cc"),
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let tag = extra.join("").replace(['-', '='], "");
    let thread =
        format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let out = dir.join(format!("{name}{tag}.{}.{thread}", std::process::id()));
    let status = Command::new(compiler)
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {compiler} (`cargo xtask setup` installs gcc and g++): {e}")
        });
    assert!(status.success(), "compiling {}", src.display());
    out
}

/// `memscope record --pid PID --duration 60s --out OUT EXTRA...`, started with stderr piped
/// (its progress and "attached" line) and stdout discarded.
pub fn spawn_record(pid: u32, out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_memscope"))
        .args([
            "record",
            "--pid",
            &pid.to_string(),
            "--duration",
            "60s",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting memscope record")
}

/// Builds tests/fixtures/rust_alloc with `feature` (None: the system allocator) and returns a private copy
/// of the executable (see [`build_fixture`] for why a copy per test process and thread).
pub fn rust_service(feature: Option<&str>) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rust_alloc");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures/rust_alloc");
    std::fs::create_dir_all(root.join("src")).unwrap();
    // Copied only when changed: cargo's cache (by mtime) then holds across runs.
    for file in ["Cargo.toml", "src/main.rs"] {
        let text = std::fs::read(src.join(file)).unwrap();
        if std::fs::read(root.join(file)).ok().as_deref() != Some(&text[..]) {
            let tmp = root.join(format!("{file}.{}", std::process::id()));
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, root.join(file)).unwrap();
        }
    }
    let name = feature.unwrap_or("system");
    let target = root.join(format!("target-{name}"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    if let Some(f) = feature {
        cmd.args(["--features", f]);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("running cargo: {e}"));
    assert!(status.success(), "building the Rust fixture with {name} (crates.io must be reachable the first time)");
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let copy = root.join(format!("rust_alloc-{name}.{}.{thread}", std::process::id()));
    std::fs::copy(target.join("release/rust_alloc_fixture"), &copy).unwrap();
    copy
}

pub fn alloc_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_fixture("alloc_fixture", &[]))
        .clone()
}

/// A running fixture process: it printed "ready <pid>" and waits for "go" on stdin (the
/// protocol of every fixture under tests/fixtures). Killed when dropped.
pub struct Fixture {
    pub child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    /// Taken while a line is being read (on a thread, with a deadline).
    stdout: Option<BufReader<ChildStdout>>,
    /// node's working directory (V8 writes isolate-*-v8.log files there), removed on drop.
    node_cwd: Option<tempfile::TempDir>,
}

impl Fixture {
    /// Starts `cmd` with piped stdin/stdout and waits for its "ready" line.
    pub fn spawn(mut cmd: Command) -> Fixture {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting fixture");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut f = Fixture {
            pid: child.id(),
            child,
            stdin,
            stdout: Some(stdout),
            node_cwd: None,
        };
        let line = f.read_line();
        assert!(line.starts_with("ready "), "fixture said {line:?}");
        f
    }

    /// The fixture's next line, waiting at most [`FIXTURE_DEADLINE`]: past it the fixture is
    /// killed and the test fails (a test never blocks forever on a fixture).
    fn read_line(&mut self) -> String {
        let mut stdout = self.stdout.take().expect("fixture stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send((stdout, line));
        });
        match rx.recv_timeout(FIXTURE_DEADLINE) {
            Ok((stdout, line)) => {
                self.stdout = Some(stdout);
                line
            }
            Err(_) => {
                let _ = self.child.kill();
                panic!(
                    "fixture {} did not answer within {FIXTURE_DEADLINE:?}",
                    self.pid
                );
            }
        }
    }

    /// A compiled fixture in `mode`.
    pub fn start(exe: &std::path::Path, mode: &str) -> Fixture {
        let mut cmd = Command::new(exe);
        cmd.arg(mode);
        Fixture::spawn(cmd)
    }

    /// tests/fixtures/`script` under node with JIT symbols (`--perf-basic-prof
    /// --interpreted-frames-native-stack`) and `--expose-gc`, in a temporary directory.
    pub fn node(script: &str) -> Fixture {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(script);
        let cwd = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("node");
        cmd.current_dir(cwd.path())
            .args([
                "--expose-gc",
                "--perf-basic-prof",
                "--interpreted-frames-native-stack",
            ])
            .arg(script);
        let mut f = Fixture::spawn(cmd);
        f.node_cwd = Some(cwd);
        f
    }

    /// tests/fixtures/`script` under plain `node`, started with no flag at all (as services
    /// run in production), in a temporary directory.
    pub fn node_plain(script: &str) -> Fixture {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(script);
        let cwd = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("node");
        cmd.current_dir(cwd.path()).arg(script);
        let mut f = Fixture::spawn(cmd);
        f.node_cwd = Some(cwd);
        f
    }

    /// Sends one line, returns the answer line (without its newline).
    pub fn ask(&mut self, q: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{q}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        self.read_line().trim_end().to_string()
    }

    /// Lets the workload run and waits until it says "done".
    pub fn go(&mut self) {
        assert_eq!(self.ask("go"), "done");
    }

    /// The number after `word` in the answer to `word?`.
    pub fn count(&mut self, word: &str) -> u64 {
        let a = self.ask(&format!("{word}?"));
        a.strip_prefix(&format!("{word} "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("fixture said {a:?}"))
    }

    /// Closes stdin: the fixture exits.
    pub fn finish(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.node_cwd.is_some() {
            // The JIT map that --perf-basic-prof wrote.
            let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.pid));
        }
    }
}

/// The privileged tests need root; in CI they must run, so this fails instead of skipping.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "memscope's end-to-end tests need root (eBPF)"
    );
}
