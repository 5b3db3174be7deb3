//! Node.js end to end: the native heap of a real `node` process (Buffers come from calloc)
//! attributed to JavaScript functions through the perf map of `--perf-basic-prof`. Needs root
//! and `node` (installed on these machines).
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::require_root;
use profiler_user::{aggregate::HeapProfile, bpf::load::ProbeSettings, session::Session, target::TracedTarget};

/// Live bytes of the stacks that pass through JavaScript function `name`.
fn live_through(p: &HeapProfile, name: &str) -> u64 {
    p.stacks
        .iter()
        .filter(|s| s.frames.iter().any(|f| f.function.as_deref() == Some(name)))
        .map(|s| s.live_bytes)
        .sum()
}

/// A Buffer leak is reported under the JavaScript function that made it, within 5% of the
/// truth; Buffers freed by the GC are not.
#[test]
fn node_buffers_are_attributed_to_javascript_functions() {
    require_root();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/node_leak.js");
    // node writes isolate-*-v8.log files into its working directory.
    let cwd = tempfile::tempdir().unwrap();
    let mut node = Command::new("node")
        .current_dir(cwd.path())
        .args(["--expose-gc", "--perf-basic-prof", "--interpreted-frames-native-stack", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting node (it is installed on these machines)");
    let mut out = BufReader::new(node.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let session = Session::attach(node.id(), ProbeSettings::default()).unwrap();
    node.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    let p = session.snapshot(Duration::ZERO).unwrap();
    let _ = node.kill();
    let _ = node.wait();
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", session.pid()));
    let truth = 200.0 * 65536.0;
    let leaked = live_through(&p, "leakyHandler") as f64;
    assert!((leaked - truth).abs() / truth < 0.05, "leakyHandler: {leaked} live bytes vs {truth}");
    let temp = live_through(&p, "tempWork") as f64;
    assert!(temp < 0.05 * 200.0 * 32768.0, "tempWork still has {temp} live bytes after GC");
}
