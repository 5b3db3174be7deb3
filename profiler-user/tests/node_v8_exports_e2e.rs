//! What memscope exports of a Node.js heap must open right in the tools people use, checked
//! against node itself: the sampling heap profile keeps V8's call tree (the tree node's own
//! in-process inspector gives for the same workload; pprof readable by `go tool pprof` with one
//! function per frame), and heap snapshots taken one after the other through the agent keep the
//! ids of the objects that survive (what memlab and DevTools' comparison match objects by).
//! Real node started with no flags, the real agent. Needs root, node and `go` (golang-go).
mod common;

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use common::{
    agent::*,
    node::{self, host_netns_turn},
    require_root,
};
use serde_json::Value;

/// The `memscope-*` directories in the target's /tmp.
fn memscope_dirs(pid: u32) -> BTreeSet<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/root/tmp"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("memscope-") && e.path().is_dir())
        .map(|e| e.path())
        .collect()
}

/// `go tool pprof ARGS FILE`, at most 60 s; its stdout. Fails clearly when Go is missing.
fn go_pprof(args: &[&str], file: &std::path::Path) -> String {
    let mut cmd = Command::new("go");
    cmd.arg("tool").arg("pprof").args(args).arg(file);
    let (st, out, err) =
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || run(cmd))) {
            Ok(r) => r,
            Err(_) => panic!(
                "`go tool pprof` could not run: install golang-go (`cargo xtask setup` does)"
            ),
        };
    assert!(st.success(), "go tool pprof {args:?}: {err}");
    out
}

/// The stacks of `go tool pprof -traces`, outermost frame first, joined by `;`.
fn pprof_traces(text: &str) -> Vec<String> {
    let mut traces = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("-----------+") {
            if !cur.is_empty() {
                cur.reverse();
                traces.push(cur.join(";"));
                cur.clear();
            }
            continue;
        }
        // "      64kB   leftLeak" for the first frame of a stack, "             caller" after.
        let Some(frame) = line.get(13..).map(str::trim) else {
            continue;
        };
        if !frame.is_empty() && line.starts_with(' ') {
            cur.push(frame.to_string());
        }
    }
    traces
}

/// The paths of interest: those through `caller`.
fn through_caller<'a>(paths: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    paths
        .into_iter()
        .filter(|p| p.split(';').any(|f| f == "caller"))
        .map(str::to_string)
        .collect()
}

/// The paths that end in one of the leaks (what nearly every sample of the workload has;
/// rarer ones, like a builtin under a leak growing its array, come and go with sampling).
fn leak_paths(paths: &BTreeSet<String>) -> BTreeSet<String> {
    paths
        .iter()
        .filter(|p| p.ends_with(";leftLeak") || p.ends_with(";rightLeak"))
        .cloned()
        .collect()
}

/// `ours` (paths through caller) has node's tree: the same leak paths as the reference, and
/// nothing else than paths below them; leftLeak and rightLeak never on one path.
fn same_tree(ours: &BTreeSet<String>, reference: &BTreeSet<String>, what: &str) {
    assert_eq!(leak_paths(ours), *reference, "{what}: {ours:#?}");
    for p in ours {
        assert!(
            !(p.contains(";leftLeak") && p.contains(";rightLeak")),
            "{what}: siblings nested in {p}"
        );
        assert!(
            reference
                .iter()
                .any(|r| p == r || p.starts_with(&format!("{r};"))),
            "{what}: {p} is not in node's tree {reference:#?}"
        );
    }
}

/// The sampling heap profile through the agent has node's own tree: the paths through
/// `caller` are the ones node's in-process inspector session gives for the same workload
/// (`...;caller;leftLeak` and `...;caller;rightLeak`, siblings, never one under the other), in
/// folded stacks, in JSON (frames innermost first) and in pprof, where `go tool pprof -traces`
/// shows the same stacks and `-top` lists leftLeak and rightLeak as two functions.
#[test]
fn v8_sampling_profile_keeps_nodes_call_tree() {
    require_root();
    let mut node = node::node("node_siblings.js", &[]);
    std::thread::sleep(Duration::from_millis(500));
    let answer = node.ask("ref 3000");
    let reference: Vec<String> = serde_json::from_str(
        answer
            .strip_prefix("ref ")
            .unwrap_or_else(|| panic!("fixture said {answer}")),
    )
    .unwrap_or_else(|e| panic!("{e}: {answer}"));
    let reference = leak_paths(&through_caller(reference.iter().map(String::as_str)));
    assert_eq!(reference.len(), 2, "node's own tree: {reference:?}");
    assert!(
        reference
            .iter()
            .all(|p| p.ends_with(";caller;leftLeak") || p.ends_with(";caller;rightLeak")),
        "node's own tree: {reference:?}"
    );

    let _turn = host_netns_turn();
    let dir = tempfile::tempdir().unwrap();
    let a = start_agent_in(dir.path(), &["--pid", &node.pid.to_string()]);
    let profile = |format: &str| {
        let (s, b) = node::http("GET", &format!(
                "{}/v1/targets/{}/v8/heap-profile?seconds=3&format={format}",
                a.url, node.pid
            ),
            READ, None,
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        b
    };

    let folded = String::from_utf8(profile("folded")).unwrap();
    let ours = through_caller(
        folded
            .lines()
            .filter_map(|l| l.rsplit_once(' ').map(|(p, _)| p)),
    );
    same_tree(
        &ours,
        &reference,
        &format!("folded stacks through the agent:\n{folded}"),
    );

    let json: Value = serde_json::from_slice(&profile("json")).unwrap();
    let mut json_paths = BTreeSet::new();
    for s in json["stacks"].as_array().unwrap() {
        let names: Vec<&str> = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|f| f["function"].as_str().unwrap_or("?"))
            .collect();
        json_paths.insert(names.join(";"));
    }
    same_tree(
        &through_caller(json_paths.iter().map(String::as_str)),
        &reference,
        "JSON through the agent",
    );

    let pb = dir.path().join("js.pb.gz");
    std::fs::write(&pb, profile("pprof")).unwrap();
    let traces_text = go_pprof(&["-traces"], &pb);
    let traces = pprof_traces(&traces_text);
    same_tree(
        &through_caller(traces.iter().map(String::as_str)),
        &reference,
        &format!("go tool pprof -traces:\n{traces_text}"),
    );
    for t in &traces {
        let frames: Vec<&str> = t.split(';').collect();
        let mut distinct = frames.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            frames.len(),
            "a frame repeated in one stack: {t}\n{traces_text}"
        );
    }
    let top = go_pprof(&["-top"], &pb);
    let rows: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .collect();
    let named = |f: &str| {
        rows.iter()
            .filter(|r| r.split_whitespace().last() == Some(f))
            .count()
    };
    assert_eq!(
        (named("leftLeak"), named("rightLeak")),
        (1, 1),
        "go tool pprof -top:\n{top}"
    );
    assert!(
        rows.len() >= 2 && !rows[0].contains("100%  100%"),
        "one function holds everything:\n{top}"
    );
    drop(a);
}

/// The ids of the objects named `class` in a `.heapsnapshot` (checking its format).
fn ids_of(bytes: &[u8], class: &str) -> BTreeSet<u64> {
    let v: Value = serde_json::from_slice(bytes).expect("the heap snapshot is JSON");
    let meta = &v["snapshot"]["meta"];
    let fields: Vec<&str> = meta["node_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let at = |name: &str| {
        fields
            .iter()
            .position(|f| *f == name)
            .unwrap_or_else(|| panic!("node_fields {fields:?} lack {name}"))
    };
    let (ti, ni, ii) = (at("type"), at("name"), at("id"));
    let types: Vec<&str> = meta["node_types"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let strings = v["strings"].as_array().unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len() % fields.len(), 0);
    nodes
        .chunks(fields.len())
        .filter(|n| {
            types[n[ti].as_u64().unwrap() as usize] == "object"
                && strings[n[ni].as_u64().unwrap() as usize] == class
        })
        .map(|n| n[ii].as_u64().unwrap())
        .collect()
}

/// `memlab find-leaks` on three snapshots: the count it gives for `class` in its table of
/// objects allocated in the target snapshot and still alive in the final one (`None`: absent).
fn memlab_new_and_alive(dir: &std::path::Path, snaps: &[PathBuf; 3], class: &str) -> Option<u64> {
    let mut cmd = Command::new("memlab");
    cmd.arg("find-leaks")
        .arg("--baseline")
        .arg(&snaps[0])
        .arg("--target")
        .arg(&snaps[1])
        .arg("--final")
        .arg(&snaps[2])
        .arg("--work-dir")
        .arg(dir.join("memlab"));
    let (st, out, err) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        run(cmd)
    })) {
        Ok(r) => r,
        Err(_) => panic!(
            "memlab could not run: `cargo xtask setup` installs it (npm install -g @memlab/cli)"
        ),
    };
    assert!(st.success(), "memlab find-leaks: {out}\n{err}");
    // "│ 0 │ 'LeakyRecord' │ 'object' │ 1000 │ '72KB' │"
    let quoted = format!("'{class}'");
    out.lines().find(|l| l.contains(&quoted)).and_then(|l| {
        let cells: Vec<&str> = l.split('│').map(str::trim).collect();
        let at = cells.iter().position(|c| *c == quoted)?;
        cells.get(at + 2)?.parse().ok()
    })
}

/// Three heap snapshots through the agent of a node that keeps growing LeakyRecord (1000, then
/// 2000, then 3000 kept; a sampling profile and a GC through the agent before the third): every
/// LeakyRecord of a snapshot has the same id in the next ones (the ids of surviving objects are
/// stable), one channel served it all, nothing is left listening or in the target's /tmp, and
/// memlab's find-leaks, given the three, counts the 1000 LeakyRecord made between the first and
/// the second and alive in the third.
#[test]
fn v8_snapshot_ids_are_stable_across_agent_snapshots() {
    require_root();
    let _turn = host_netns_turn();
    let mut node = node::node_js_heap();
    let dirs_before = memscope_dirs(node.pid);
    assert_eq!(node.ask("grow 1000"), "grown 1000");
    let dir = tempfile::tempdir().unwrap();
    let a = start_agent_in(dir.path(), &["--pid", &node.pid.to_string()]);
    let url = format!("{}/v1/targets/{}/v8/heap-snapshot", a.url, node.pid);
    let mut snaps: Vec<PathBuf> = Vec::new();
    let mut ids: Vec<BTreeSet<u64>> = Vec::new();
    for (i, total) in [1000u64, 2000, 3000].into_iter().enumerate() {
        if i > 0 {
            assert_eq!(node.ask("grow 1000"), format!("grown {total}"));
        }
        if i == 2 {
            // The agent's other V8 work in between renumbers nothing either.
            let (s, b) = node::http("GET", &format!(
                    "{}/v1/targets/{}/v8/heap-profile?seconds=1&format=folded",
                    a.url, node.pid
                ),
                READ, None,
            );
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            let gc = format!("{}/v1/targets/{}/actions/gc", a.url, node.pid);
            assert_eq!(node::http("POST", &gc, ADMIN, None).0, 200);
        }
        let (s, b) = node::http("GET", &url, ADMIN, None);
        assert_eq!(
            s,
            200,
            "{}",
            String::from_utf8_lossy(&b[..b.len().min(300)])
        );
        let these = ids_of(&b, "LeakyRecord");
        assert_eq!(
            these.len() as u64,
            total,
            "LeakyRecord in snapshot {}",
            i + 1
        );
        let path = dir.path().join(format!("s{}.heapsnapshot", i + 1));
        std::fs::write(&path, &b).unwrap();
        snaps.push(path);
        ids.push(these);
    }
    for (i, pair) in ids.windows(2).enumerate() {
        let kept = pair[0].intersection(&pair[1]).count();
        assert_eq!(
            kept,
            pair[0].len(),
            "of the {} LeakyRecord of snapshot {}, {kept} kept their id in snapshot {}",
            pair[0].len(),
            i + 1,
            i + 2
        );
    }
    let log = a.log();
    let installs = log
        .iter()
        .filter(|l| l.contains("v8 snapshot channel") && l.contains("installed"))
        .count();
    assert_eq!(installs, 1, "one channel for the three snapshots: {log:#?}");
    assert_eq!(
        common_listeners(node.pid),
        0,
        "the target listens on no TCP port afterwards"
    );
    // Only the directories made since the test started: /tmp is shared with other tests.
    let left: Vec<_> = memscope_dirs(node.pid).difference(&dirs_before).cloned().collect();
    assert!(
        left.is_empty(),
        "the channel's socket is left in the target's /tmp: {left:?}"
    );

    let snaps: [PathBuf; 3] = snaps.try_into().unwrap();
    let grew = memlab_new_and_alive(dir.path(), &snaps, "LeakyRecord");
    assert_eq!(grew, Some(1000), "memlab find-leaks: LeakyRecord made between the first two snapshots and alive in the third");
}

/// The TCP ports the process listens on.
fn common_listeners(pid: u32) -> usize {
    profiler_user::v8::inspector::own_listeners(pid).len()
}
