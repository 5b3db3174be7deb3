//! PID reuse: a traced target exits and its pid is given to a new process (forced here by
//! writing `/proc/sys/kernel/ns_last_pid` before forking). The session must never mistake
//! the newcomer for its target: not for liveness, snapshots (modules, JIT names), trigger
//! readings (RSS), new trigger probes, or signals. Needs root and `node`.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{alloc_fixture, require_root, Fixture};
use profiler_user::{
    bpf::{attach::TriggerPoint, load::ProbeSettings},
    session::Session,
    target::TracedTarget,
    trigger::TriggerHost,
};

/// A node process with a 64 MiB resident buffer and a perf map at /tmp/perf-PID.map, started
/// as `pid` (retried while other processes on the machine take the number first).
fn newcomer_as(pid: u32) -> Child {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new("node")
            .args(["--perf-basic-prof", "-e", "const b = Buffer.alloc(64 << 20, 1); console.log('ready'); setInterval(() => b[0]++, 100)"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        if child.id() == pid {
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready");
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a process as pid {pid}");
}

/// After the target exits and its pid is reused, the session reports it exited, keeps its
/// last view of the target, and never reads, probes or signals the newcomer.
#[test]
fn a_reused_pid_is_never_the_target() {
    require_root();
    let mut target = Fixture::start(&alloc_fixture(), "basic");
    let pid = target.pid;
    let session = Session::attach(pid, ProbeSettings { sample_bytes: 0, ..ProbeSettings::default() }).unwrap();
    target.go();
    let before = session.snapshot(Duration::ZERO).unwrap();
    target.finish();
    drop(target);

    let mut newcomer = newcomer_as(pid);
    let newcomer_rss = profiler_user::procfs::status_bytes(pid, "VmRSS").unwrap();
    assert!(newcomer_rss > 64 << 20, "the newcomer holds {newcomer_rss} bytes");

    assert!(!session.alive(), "the newcomer was taken for the target");
    assert!(!session.stats().alive);
    assert_eq!(TriggerHost::rss_bytes(&session), None, "the newcomer's RSS was read as the target's");
    assert_eq!(TriggerHost::cgroup_memory_bytes(&session), None);
    let exe = profiler_user::procfs::exe(pid).unwrap();
    assert!(session.attach_trigger(&exe, 0x1000, TriggerPoint::Entry).is_err(), "a probe was attached to the newcomer");
    assert!(session.process().signal(libc::SIGTERM).is_err(), "a signal reached the newcomer");
    assert!(newcomer.try_wait().unwrap().is_none(), "the newcomer was signalled");

    let after = session.snapshot(Duration::ZERO).unwrap();
    assert!(after.target_exited, "the snapshot does not say the target exited");
    assert_eq!(after.totals, before.totals, "the last view of the target changed");
    for stack in &after.stacks {
        for f in stack.frames.iter() {
            let module = f.module.as_deref().unwrap_or("");
            assert!(!module.contains("node") && module != "[jit]", "a frame of the newcomer: {f:?}");
        }
    }
    let named = |p: &profiler_user::aggregate::HeapProfile| {
        p.stacks.iter().filter(|s| s.frames.iter().any(|f| f.function.as_deref() == Some("leak_fixed"))).count()
    };
    assert_eq!(named(&after), named(&before), "the target's frames are no longer named");
    let _ = newcomer.kill();
    let _ = newcomer.wait();
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
}
