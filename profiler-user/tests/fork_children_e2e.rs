//! Processes that fork (prefork servers, fork-per-connection servers such as PostgreSQL), with
//! real eBPF on tests/fixtures/fork_fixture.c. A child forked by a traced process inherits the
//! breakpoints memscope placed in its parent. Under uprobe.session (a uprobe_multi link) the
//! kernel leaves them in the untraced child, which then traps on every call for nothing; under
//! classic uprobes the child sheds each one at its first hit. memscope gives a process that
//! forks classic uprobes (`session::classic_for_forks`); these tests show both sides. Need
//! root; CI runs them as root.
mod common;

use std::{sync::Arc, time::Duration};

use common::{build_fixture, require_root, Fixture};
use profiler_user::{
    bpf::load::{ProbeMode, ProbeSettings, Probes},
    session::Session,
    target::TracedTarget,
    unwind,
};

// The fixture is linked statically, its malloc in its own (per-test) executable: a uprobe is
// one per file and offset, and its breakpoint leaves a child only when every consumer on it
// asks for that, so another test's probes on the shared libc would keep the children trapping.
const PAIRS: u64 = 200_000;
/// ns per `malloc`+`free` pair under which a child pays no trap per call: two traps cost
/// ~1.3 µs here (3.4 µs on a loaded machine), a bare pair ~20 ns.
const NO_TRAP_NS: f64 = 300.0;

/// How much CPU time a child forked now spends per pair (its traps included, its waits for a
/// CPU on a busy machine not).
fn child_ns(f: &mut Fixture) -> f64 {
    let a = f.ask(&format!("child {PAIRS}"));
    a.strip_prefix("child_ns ").and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("fixture said {a:?}"))
}

/// A process with a forked worker at the attach gets classic uprobes: a connection-like child
/// forked afterwards runs its calls untrapped, and the parent's own allocations are recorded.
#[test]
fn a_process_with_forked_workers_gets_classic_probes_that_children_shed() {
    require_root();
    let exe = build_fixture("fork_fixture", &["-static"]);
    let mut f = Fixture::start(&exe, "serve");
    assert_eq!(f.ask("worker"), "done");
    let session = Session::attach(f.pid, ProbeSettings::default()).unwrap();
    assert_eq!(session.probe_mode(), ProbeMode::Classic);
    assert_eq!(session.stats().probe_mode, "classic");
    let ns = child_ns(&mut f);
    assert!(ns < NO_TRAP_NS, "a child forked after the attach pays {ns:.0} ns per pair: it traps");
    assert_eq!(f.ask("own 1000"), "done");
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert!(p.totals.allocs >= 1000, "the parent's own 1000 allocations: {} recorded", p.totals.allocs);
}

/// Without a child at the attach: uprobe.session, whose breakpoints a child forked afterwards
/// keeps though nobody traces it (the kernel's behaviour the rule above works around; if a
/// kernel sheds them one day, forking processes could keep uprobe.session).
#[test]
fn without_children_session_probes_stay_and_children_keep_their_breakpoints() {
    require_root();
    let exe = build_fixture("fork_fixture", &["-static"]);
    let mut f = Fixture::start(&exe, "serve");
    let session = Session::attach(f.pid, ProbeSettings::default()).unwrap();
    assert_eq!(session.probe_mode(), ProbeMode::Session);
    let ns = child_ns(&mut f);
    assert!(ns > NO_TRAP_NS, "a child under uprobe.session paid only {ns:.0} ns per pair");
    drop(session);
    let ns = child_ns(&mut f);
    assert!(ns < NO_TRAP_NS, "after the detach a child still pays {ns:.0} ns per pair");
}

/// Two processes on one allocator file (one executable here; on a node, one libc in an image
/// layer many containers share): a target on it under uprobe.session would keep the forking
/// one's children trapping, so it is switched to classic uprobes when the forking one is
/// attached to the same probes (as in the agent), and is still recorded.
#[test]
fn a_forking_process_switches_the_other_targets_on_its_allocator_to_classic() {
    require_root();
    let exe = build_fixture("fork_fixture", &["-static"]);
    let (mut plain, mut forking) = (Fixture::start(&exe, "serve"), Fixture::start(&exe, "serve"));
    assert_eq!(forking.ask("worker"), "done");
    let probes = Arc::new(Probes::load(ProbeSettings::default(), 1 << 18).unwrap());
    let attach = |pid: u32| Session::attach_on(&probes, pid, unwind::target::plan(pid)).unwrap();
    let a = attach(plain.pid);
    assert_eq!(a.probe_mode(), ProbeMode::Session);
    let b = attach(forking.pid);
    assert_eq!(b.probe_mode(), ProbeMode::Classic);
    assert_eq!(a.probe_mode(), ProbeMode::Classic, "the other target on the file kept uprobe.session");
    let ns = child_ns(&mut forking);
    assert!(ns < NO_TRAP_NS, "a child of the forking target pays {ns:.0} ns per pair: it traps");
    assert_eq!(plain.ask("own 1000"), "done");
    let p = a.snapshot(Duration::ZERO).unwrap();
    assert!(p.totals.allocs >= 1000, "the switched target's 1000 allocations: {} recorded", p.totals.allocs);
    // A third process on the file attaches with classic uprobes from the start.
    let third = Fixture::start(&exe, "serve");
    assert_eq!(attach(third.pid).probe_mode(), ProbeMode::Classic);
}
