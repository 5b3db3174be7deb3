//! The V8 routes against processes that are not what they should be, end to end with the real
//! agent: a target that exited and whose pid a newcomer took (forced with `ns_last_pid`) gets
//! 410 and the newcomer no signal; fake inspectors (tests/fixtures/fake_inspector.py: a process
//! that handles SIGUSR1 and answers as Node's inspector would, in a network namespace of its
//! own) that send one huge message, a huge sample array, or one byte every 2 s get a clear
//! error, leave the agent's memory under 256 MiB, and leave its render slot free once the
//! request has ended. Needs root, node and python3.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    agent::*,
    node::{eval_tokens as tokens, host_netns_turn, http_json, node_js_heap, EVAL},
    require_root,
};

const PYTHON: &str = "/usr/bin/python3";
/// The agent's memory bound whatever a target sends.
const RSS_BOUND: u64 = 256 << 20;

fn fake_script() -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_inspector.py").display().to_string()
}

/// A process of the test with its stdout lines, killed when dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 15 s) for the line `want`.
    fn expect(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return,
                Ok(_) => {}
                Err(e) => panic!("no {want:?} from process {}: {e}", self.pid()),
            }
        }
    }

    /// The lines printed so far.
    fn printed(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake inspector in a network namespace of its own (loopback up), ready for SIGUSR1.
fn fake(mode: &str) -> Proc {
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$1\" \"$2\"", PYTHON, &fake_script(), mode]);
    let p = Proc::spawn(cmd);
    p.expect("ready");
    p
}

/// A fake that only counts SIGUSR1, started as `pid` (retried while other processes on the
/// machine take the number first).
fn newcomer_as(pid: u32) -> Proc {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut cmd = Command::new(PYTHON);
        cmd.args([&fake_script(), "count"]);
        let p = Proc::spawn(cmd);
        if p.pid() == pid {
            p.expect("ready");
            return p;
        }
    }
    panic!("could not start a process as pid {pid}");
}

/// The agent's peak resident memory (VmHWM).
fn peak_rss(agent: &Agent) -> u64 {
    profiler_user::procfs::status_bytes(agent.pid() as u32, "VmHWM").unwrap()
}

/// A Node.js target attached through the agent exits; a process that handles SIGUSR1 takes
/// its pid. Every V8 route of the old target answers 410 with a clear error, and the newcomer
/// gets no SIGUSR1.
#[test]
fn a_reused_pid_gets_410_and_no_signal() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let mut node = node_js_heap();
    let pid = node.pid;
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--allow-eval", "--pid", &pid.to_string()]).unwrap();
    node.finish();
    drop(node);
    let newcomer = newcomer_as(pid);

    let base = format!("{}/v1/targets/{pid}", a.url);
    for (method, route, token, body) in [
        ("GET", "v8/heap-snapshot", ADMIN, None),
        ("GET", "v8/heap-profile?seconds=1", READ, None),
        ("POST", "actions/gc", ADMIN, None),
        ("POST", "actions/eval", EVAL, Some(r#"{"expression": "process.pid"}"#)),
    ] {
        let (s, b) = http_json(method, &format!("{base}/{route}"), token, body);
        assert!(s == 410 || s == 404, "{method} {route}: {s} {b}");
        assert_eq!(b["code"], "target_exited", "{method} {route}: {b}");
        assert!(b["error"].as_str().unwrap().contains("has exited"), "{b}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(newcomer.printed().iter().all(|l| l != "usr1"), "the newcomer was signalled");
    assert!(profiler_user::v8::inspector::own_listeners(pid).is_empty(), "the newcomer listens");
}

/// One message of 300 MiB (announced in one frame header, then in 1 MiB fragments): refused
/// with a clear error as soon as it passes the cap; the agent stays under its memory bound.
#[test]
fn a_huge_message_is_refused_and_memory_stays_bounded() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let fake = fake("huge");
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--pid", &fake.pid().to_string()]).unwrap();
    let base = format!("{}/v1/targets/{}", a.url, fake.pid());
    for round in ["announced", "fragmented"] {
        let (s, b) = http_json("POST", &format!("{base}/actions/gc"), ADMIN, None);
        assert_eq!((s, b["code"].as_str()), (502, Some("v8_too_large")), "{round}: {b}");
        assert!(b["error"].as_str().unwrap().contains("larger than the 4 MiB"), "{round}: {b}");
        // The fake stops listening once the session is gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !profiler_user::v8::inspector::own_listeners(fake.pid()).is_empty() {
            assert!(Instant::now() < deadline, "the fake still listens");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let peak = peak_rss(&a);
    eprintln!("agent peak RSS after two 300 MiB messages: {} MiB", peak >> 20);
    assert!(peak < RSS_BOUND, "the agent peaked at {} MiB", peak >> 20);
}

/// A heap profile answered with a 64 MiB sample array (over the message cap), then with 700000
/// samples in 10 MiB (under it, over the sample cap): both refused with a clear error; the
/// agent stays under its memory bound.
#[test]
fn a_huge_sample_array_is_refused_and_memory_stays_bounded() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let fake = fake("samples");
    let a = start_agent(&["--tokens", tf.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path()), "--pid", &fake.pid().to_string()]).unwrap();
    let base = format!("{}/v1/targets/{}", a.url, fake.pid());
    for (round, says) in [("64 MiB", "larger than the 16 MiB"), ("700000 samples", "more than 500000 samples")] {
        let (s, b) = http_json("GET", &format!("{base}/v8/heap-profile?seconds=1"), READ, None);
        assert_eq!((s, b["code"].as_str()), (502, Some("v8_too_large")), "{round}: {b} {:?}", a.log());
        assert!(b["error"].as_str().unwrap().contains(says), "{round}: {b}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !profiler_user::v8::inspector::own_listeners(fake.pid()).is_empty() {
            assert!(Instant::now() < deadline, "the fake still listens");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let peak = peak_rss(&a);
    eprintln!("agent peak RSS after the sample arrays: {} MiB", peak >> 20);
    assert!(peak < RSS_BOUND, "the agent peaked at {} MiB", peak >> 20);
}

/// Inspectors that answer one byte every 2 s, one per kind of V8 request (a heap snapshot, a
/// GC, a heap profile): with one render slot and an 8 s request timeout, each request times
/// out, and right after each a heap profile of another target (a real node) gets the slot
/// (not 503).
#[test]
fn a_dripping_inspector_frees_its_render_slot_when_the_request_ends() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tf = tokens(dir.path());
    let fakes = [fake("drip"), fake("drip"), fake("drip")];
    let _turn = host_netns_turn();
    let node = node_js_heap();
    let mut args = vec!["--tokens".to_string(), tf.display().to_string(), "--listen".into(), "127.0.0.1:0".into(), "--data-dir".into(), data_dir(dir.path())];
    args.extend(["--max-renders", "1", "--request-timeout", "8s", "--pid", &node.pid.to_string()].map(String::from));
    for f in &fakes {
        args.extend(["--pid".to_string(), f.pid().to_string()]);
    }
    let a = start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    for (fake, method, route, token) in [
        (&fakes[0], "GET", "v8/heap-snapshot", ADMIN),
        (&fakes[1], "POST", "actions/gc", ADMIN),
        (&fakes[2], "GET", "v8/heap-profile?seconds=1", READ),
    ] {
        let started = Instant::now();
        let (s, b) = http_json(method, &format!("{}/v1/targets/{}/{route}", a.url, fake.pid()), token, None);
        assert_eq!((s, b["code"].as_str()), (503, Some("timeout")), "{route}: {b}");
        assert!(started.elapsed() < Duration::from_secs(30), "{route}: the request outlived its timeout by far: {:?}", started.elapsed());
        let (s, b) = http_json("GET", &format!("{}/v1/targets/{}/v8/heap-profile?seconds=1&format=json", a.url, node.pid), READ, None);
        assert_ne!(b["code"].as_str(), Some("busy"), "after {route}: the render slot is still taken: {b}");
        assert_eq!(s, 200, "after {route}: {b}");
    }
}
