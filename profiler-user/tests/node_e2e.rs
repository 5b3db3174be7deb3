//! Node.js end to end: the native heap of a real `node` process (Buffers come from calloc)
//! attributed to JavaScript functions through the perf map of `--perf-basic-prof`. Needs root
//! and `node` (installed on these machines).
mod common;

use std::time::Duration;

use common::{require_root, Fixture};
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
    let mut node = Fixture::node("node_leak.js");
    let session = Session::attach(node.pid, ProbeSettings::default()).unwrap();
    node.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    drop(node);
    let truth = 200.0 * 65536.0;
    let leaked = live_through(&p, "leakyHandler") as f64;
    assert!((leaked - truth).abs() / truth < 0.05, "leakyHandler: {leaked} live bytes vs {truth}");
    let temp = live_through(&p, "tempWork") as f64;
    assert!(temp < 0.05 * 200.0 * 32768.0, "tempWork still has {temp} live bytes after GC");
}
