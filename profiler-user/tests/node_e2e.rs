//! Node.js end to end: the native heap of a real `node` process (Buffers come from calloc)
//! attributed to JavaScript functions through the perf map of `--perf-basic-prof`. Needs root
//! and `node` (installed on these machines).
mod common;

use std::time::Duration;

use common::{require_root, Fixture};
use profiler_user::{aggregate::HeapProfile, bpf::load::ProbeSettings, session::Session, target::TracedTarget};

/// Live bytes of the stacks that pass through JavaScript function `name`.
fn live_through(p: &HeapProfile, name: &str) -> u64 {
    common::stacks_through(p, name).map(|s| s.live_bytes).sum()
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

/// JIT names are right every time: 10 runs in a row of a program that keeps 200 x 64 KiB
/// Buffers from `leakyHandler` while V8 optimizes, compiles and frees other code around it;
/// each run gives `leakyHandler` its bytes within 5% (frames resolve to the newest perf-map
/// line covering them, named soon after the stack was recorded).
#[test]
fn node_jit_names_are_right_every_run() {
    require_root();
    let truth = 200.0 * 65536.0;
    let mut seen = Vec::new();
    for run in 0..10 {
        let mut node = Fixture::node("node_jit_leak.js");
        let session = Session::attach(node.pid, ProbeSettings::default()).unwrap();
        node.go();
        let p = session.snapshot(Duration::ZERO).unwrap();
        drop(node);
        let leaked = live_through(&p, "leakyHandler") as f64;
        seen.push(leaked);
        if (leaked - truth).abs() / truth >= 0.05 {
            let mut top: Vec<_> = p.stacks.iter().filter(|s| s.live_bytes > 65536).collect();
            top.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
            let names: Vec<String> = top
                .iter()
                .take(5)
                .map(|s| format!("{} B: {}", s.live_bytes, s.frames.iter().map(|f| f.display_name()).collect::<Vec<_>>().join(" < ")))
                .collect();
            panic!("run {run}: leakyHandler has {leaked} live bytes vs {truth} (runs so far {seen:?}); largest stacks:\n{}", names.join("\n"));
        }
    }
}
