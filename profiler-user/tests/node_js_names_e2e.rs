//! JavaScript names without flags (issue 17, item 7): a Node.js process started with plain
//! `node` (no `--perf-basic-prof`) has the native memory its JavaScript functions keep
//! attributed to them by name, read from V8's own heap (`symbolize::v8`). Needs root and
//! `node` (installed on these machines).
mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{require_root, Fixture};
use profiler_user::{
    aggregate::HeapProfile, bpf::load::ProbeSettings, session::Session, target::TracedTarget,
};

/// Live bytes of the stacks with a frame named `name`.
fn live_through(p: &HeapProfile, name: &str) -> u64 {
    common::stacks_through(p, name).map(|s| s.live_bytes).sum()
}

/// The fixture's ground truth: bytes each function keeps.
fn truth(node: &mut Fixture) -> BTreeMap<String, u64> {
    let answer = node.ask("truth?");
    answer
        .strip_prefix("truth ")
        .unwrap_or_else(|| panic!("fixture said {answer:?}"))
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.ends_with("Leak"))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

/// The five largest stacks, for a failure message.
fn largest(p: &HeapProfile) -> String {
    let mut top: Vec<_> = p.stacks.iter().filter(|s| s.live_bytes > 65536).collect();
    top.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    top.iter()
        .take(5)
        .map(|s| {
            format!(
                "{} B: {}",
                s.live_bytes,
                s.frames
                    .iter()
                    .map(|f| f.display_name())
                    .collect::<Vec<_>>()
                    .join(" < ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Three functions of a flagless node keep native memory: `onceLeak` (run once: interpreted
/// code), `leftLeak` (cold: baseline code) and `rightLeak` (hot: optimized by TurboFan). In
/// each of 3 runs, at least 90% (and at most 110%: the Buffers' own bookkeeping) of the
/// bytes each keeps is on stacks carrying its name, and its name is never on another one's
/// stacks; every JavaScript frame the probes kept is accounted for in `js_names`. (The
/// 10-run measure is `cargo xtask bench --js-names-only`.)
#[test]
fn flagless_node_functions_keep_their_names() {
    require_root();
    for run in 0..3 {
        let mut node = Fixture::node_plain("node_js_names.js");
        let session = Session::attach(node.pid, ProbeSettings::default()).unwrap();
        node.go();
        let truth = truth(&mut node);
        let p = session.snapshot(Duration::ZERO).unwrap();
        drop(node);
        let js = p
            .js_names
            .clone()
            .expect("a node target has JavaScript naming stats");
        assert!(js.layout_error.is_none(), "run {run}: {js:?}");
        assert!(js.named > 0, "run {run}: no JavaScript frame named: {js:?}");
        for (name, &bytes) in &truth {
            let named = live_through(&p, name) as f64;
            let share = named / bytes as f64;
            assert!((0.9..=1.1).contains(&share), "run {run}: {name} keeps {bytes} B, {named} B carry its name ({share:.3}); js_names {js:?}; largest stacks:\n{}", largest(&p));
        }
        // Each name on its own bytes only: no stack carries two of them.
        for s in &p.stacks {
            let names: Vec<&str> = truth
                .keys()
                .map(String::as_str)
                .filter(|n| s.frames.iter().any(|f| f.function.as_deref() == Some(*n)))
                .collect();
            assert!(names.len() <= 1, "run {run}: one stack carries {names:?}");
        }
    }
}
