//! Hostile targets: processes in their own mount namespace (made here with `unshare -m` and a
//! tmpfs on /tmp, a container's view) that turn the files memscope reads against it. Their
//! perf map becomes a symlink to a file that exists only on the host, a FIFO, or a 2 GiB
//! sparse file; their allocator library is swapped for a symlink after they mapped it.
//! `memscope record` must finish, write its report, put no host-only byte in any output,
//! stay under a memory cap, and count what it refused. Also: memory that never answers, a
//! million distinct stacks and ten thousand threads. Needs root, `unshare` and `node`.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{alloc_fixture, require_root, spawn_record, Fixture};
use serde_json::Value;

/// Peak RSS allowed to `memscope record` on these targets, with the default map sizes
/// (32,768 stacks, 1,048,576 live allocations): measured 31-42 MiB on the hostile files and
/// 10,000 threads, 173 MiB with a million live allocations on a million stacks.
const RSS_CAP_BYTES: u64 = 256 << 20;
const SECRET: &str = "HOSTONLY_SECRET_7f3a";

/// `sh -c SCRIPT` in a new private mount namespace with its own tmpfs on /tmp; `exec` keeps the
/// pid, so the fixture's pid is the child's.
///
/// The test's own files (compiled fixtures, node scripts) live in the checkout and its target
/// directory, which may be under /tmp (a fresh clone there): the new tmpfs would hide them and
/// the exec fail. Each such directory is opened before the tmpfs is mounted and bound back at
/// the same path inside it, so the target sees them where the host does.
fn contained(script: &str) -> Command {
    let mut keep = String::new();
    let dirs = [PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures"), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")];
    let mut bind = String::new();
    for (fd, dir) in (7..).zip(dirs.iter().filter(|d| d.starts_with("/tmp"))) {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        keep += &format!("exec {fd}<'{d}' && ");
        bind += &format!("mkdir -p '{d}' && mount --no-canonicalize --bind /proc/self/fd/{fd} '{d}' && exec {fd}<&- && ");
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!("{keep}mount -t tmpfs tmpfs /tmp && {bind}{script}"));
    cmd
}

fn contained_node(cwd: &Path) -> Fixture {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node_leak.js");
    let mut cmd = contained(&format!(
        "exec node --expose-gc --perf-basic-prof --interpreted-frames-native-stack {}",
        script.display()
    ));
    cmd.current_dir(cwd);
    Fixture::spawn(cmd)
}

/// A file only the host sees (its /tmp, hidden from the target by the target's tmpfs), as a
/// perf map naming every address after the secret.
fn host_only_file(dir: &Path) -> PathBuf {
    let path = dir.join("host-only.map");
    std::fs::write(&path, format!("0 7fffffffffff JS:*{SECRET} /host/{SECRET}.js:1:1\n")).unwrap();
    path
}

struct Recorded {
    code: i32,
    stderr: String,
    peak_rss: u64,
    leaks: Value,
    /// Every output file, concatenated (the pprof file gunzipped).
    all_text: Vec<u8>,
}

/// `memscope record --sampling full --min-age 0s` on `fixture`: waits for "attached", runs the
/// workload, stops the recording with SIGINT within 60 s, and measures its peak RSS.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its rusage
fn record(fixture: &mut Fixture, out: &Path) -> Recorded {
    let mut child = spawn_record(fixture.pid, out, &["--min-age", "0s", "--sampling", "full"]);
    let (mut text, mut stderr) = wait_attached(&mut child);
    fixture.go();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    loop {
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut usage) };
        if r == child.id() as i32 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("memscope record hangs after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    text += &reader.join().unwrap();
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let leaks: Value = std::fs::read(out.join("leaks.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no leaks.json written: {text}"));
    let mut all_text = Vec::new();
    for name in ["report.txt", "leaks.json", "flamegraph.svg", "heap.folded"] {
        all_text.extend(std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name} not written: {e}\n{text}")));
    }
    flate2::read::GzDecoder::new(std::fs::File::open(out.join("heap.pb.gz")).unwrap()).read_to_end(&mut all_text).unwrap();
    Recorded { code, stderr: text, peak_rss: usage.ru_maxrss as u64 * 1024, leaks, all_text }
}

/// Reads `memscope record`'s stderr until its "attached" line, for at most 120 s (then it is
/// killed and the test fails); returns what was read and the rest of the stream.
fn wait_attached(child: &mut std::process::Child) -> (String, BufReader<std::process::ChildStderr>) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        while !text.contains("attached") {
            let before = text.len();
            if stderr.read_line(&mut text).is_err() || text.len() == before {
                break;
            }
        }
        let _ = tx.send((text, stderr));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok((text, stderr)) => {
            assert!(text.contains("attached"), "memscope ended before attaching: {text}");
            (text, stderr)
        }
        Err(_) => {
            let _ = child.kill();
            panic!("memscope record did not attach within 120 s");
        }
    }
}

fn assert_clean(r: &Recorded) {
    assert_eq!(r.code, 0, "{}", r.stderr);
    let found = r.all_text.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
    assert!(!found, "host-only content in the outputs");
    assert!(!r.stderr.contains(SECRET), "host-only content on stderr: {}", r.stderr);
    assert!(r.peak_rss < RSS_CAP_BYTES, "memscope record peaked at {} MiB (cap {} MiB)", r.peak_rss >> 20, RSS_CAP_BYTES >> 20);
}

fn refused(leaks: &Value, kind: &str, reason: &str) -> u64 {
    leaks["target_files"]["refused"][kind][reason].as_u64().unwrap_or(0)
}

/// Where the host sees the target's perf map (in the target's tmpfs).
fn perf_map(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{pid}.map"))
}

/// The perf map replaced by an absolute symlink to a host-only file: resolved inside the
/// target's root (where it names nothing), so no host byte reaches a report.
#[test]
fn perf_map_symlink_to_a_host_file_is_not_followed() {
    require_root();
    let cwd = tempfile::tempdir().unwrap();
    let secret = host_only_file(cwd.path());
    let mut node = contained_node(cwd.path());
    let map = perf_map(node.pid);
    assert!(map.exists(), "node wrote no perf map in its /tmp");
    assert!(!Path::new(&format!("/tmp/perf-{}.map", node.pid)).exists(), "the target's /tmp is the host's");
    std::fs::remove_file(&map).unwrap();
    symlink(&secret, &map).unwrap();
    // What memscope did before: the host follows the link to its own file.
    assert!(std::fs::read_to_string(&map).unwrap().contains(SECRET));
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut node, out.path());
    assert_clean(&r);
    assert!(r.leaks["target_files"]["symlinks_in_root"].as_u64().unwrap() >= 1, "{}", r.leaks["target_files"]);
}

/// The perf map replaced by a FIFO that nobody writes: refused (counted) without blocking.
#[test]
fn perf_map_fifo_is_refused() {
    require_root();
    let cwd = tempfile::tempdir().unwrap();
    let mut node = contained_node(cwd.path());
    let map = perf_map(node.pid);
    std::fs::remove_file(&map).unwrap();
    let c = std::ffi::CString::new(map.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut node, out.path());
    assert_clean(&r);
    assert!(refused(&r.leaks, "perf_map", "not_regular") >= 1, "{}", r.leaks["target_files"]);
    let report = String::from_utf8_lossy(&r.all_text);
    assert!(report.contains("perf_map not_regular"), "report.txt does not show the refusal");
}

/// The perf map grown to a 2 GiB sparse file (its real lines first): read up to the cap, the
/// rest refused and counted; memory stays bounded and the JIT names read are still used.
#[test]
fn perf_map_of_2_gib_is_read_up_to_the_cap() {
    require_root();
    let cwd = tempfile::tempdir().unwrap();
    let mut node = contained_node(cwd.path());
    let map = perf_map(node.pid);
    let file = std::fs::OpenOptions::new().write(true).open(&map).unwrap();
    file.set_len(2 << 30).unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut node, out.path());
    assert_clean(&r);
    assert!(refused(&r.leaks, "perf_map", "too_large") >= 1, "{}", r.leaks["target_files"]);
    assert!(String::from_utf8_lossy(&r.all_text).contains("leakyHandler"), "JIT names before the cap were lost");
    eprintln!("peak RSS of memscope record on a 2 GiB perf map: {} MiB", r.peak_rss >> 20);
}

/// The target's allocator (a copy of libc in its /tmp) swapped for a symlink to a host-only
/// file after the target mapped it: memscope opens the mapped inode itself and counts exactly.
#[test]
fn swapped_library_is_read_from_the_mapped_inode() {
    require_root();
    let libc_path = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .find_map(|l| l.split_whitespace().nth(5).filter(|p| p.contains("/libc.so")).map(str::to_string))
        .unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let secret = host_only_file(cwd.path());
    let exe = alloc_fixture();
    let mut fixture = Fixture::spawn(contained(&format!(
        "mkdir /tmp/lib && cp {libc_path} /tmp/lib/ && LD_LIBRARY_PATH=/tmp/lib exec {} basic",
        exe.display()
    )));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid)).unwrap();
    assert!(maps.contains("/tmp/lib/libc.so"), "the fixture does not use the copied libc:\n{maps}");
    let lib = PathBuf::from(format!("/proc/{}/root/tmp/lib/libc.so.6", fixture.pid));
    std::fs::remove_file(&lib).unwrap();
    symlink(&secret, &lib).unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut fixture, out.path());
    assert_clean(&r);
    let t = &r.leaks["totals"];
    assert_eq!((t["allocs"].as_u64(), t["live_bytes"].as_u64()), (Some(1022), Some(2111788)), "{t}");
}

/// Memory of the target that never answers (a page registered with userfaultfd whose faults
/// are never served): reading or enabling a USDT semaphore there fails within the deadline
/// of `target_mem` instead of hanging the agent.
#[test]
fn memory_that_never_answers_does_not_hang() {
    require_root();
    let mut stall = Fixture::start(&common::build_fixture("uffd_stall", &[]), "");
    let addr = u64::from_str_radix(stall.ask("addr?").strip_prefix("addr ").unwrap(), 16).unwrap();
    let limit = profiler_user::target_mem::DEADLINE + Duration::from_secs(1);
    let started = Instant::now();
    assert!(profiler_user::trigger::usdt::read_semaphore(stall.pid, addr).is_err());
    assert!(profiler_user::trigger::usdt::Semaphore::enable(stall.pid, addr, "test:stall").is_err());
    assert!(started.elapsed() < limit * 2, "took {:?}", started.elapsed());
    // The process is still there and still stuck on that page: nothing was served.
    assert!(profiler_user::procfs::exists(stall.pid));
}

fn many_stacks() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| common::build_fixture("many_stacks", &[])).clone()
}

/// A target with 2^20 (1,048,576) distinct leaking stacks: the stack maps keep what fits
/// (32,768 by default), the rest is counted as dropped and shown; the recorder's memory
/// stays under the cap and the report is written.
#[test]
fn a_million_distinct_stacks_are_bounded_and_counted() {
    require_root();
    let mut fixture = Fixture::start(&many_stacks(), "stacks");
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut fixture, out.path());
    assert_clean(&r);
    let dropped = &r.leaks["dropped"];
    let stack_drops = dropped["stack_map_full"].as_u64().unwrap_or(0) + dropped["stack_stats_full"].as_u64().unwrap_or(0);
    assert!(stack_drops > 100_000, "{dropped}");
    assert!(r.leaks["totals"]["allocs"].as_u64().unwrap() >= 1 << 20, "{}", r.leaks["totals"]);
    eprintln!("peak RSS of memscope record on 2^20 distinct stacks: {} MiB; dropped {dropped}", r.peak_rss >> 20);
}

/// A target with 10,000 threads, each leaking 64 bytes: all counted, memory bounded.
#[test]
fn ten_thousand_threads_are_bounded() {
    require_root();
    let mut fixture = Fixture::start(&many_stacks(), "threads");
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut fixture, out.path());
    assert_clean(&r);
    let leaked: u64 = r.leaks["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["frames"][0]["function"] == "thread_main")
        .map(|l| l["allocs"].as_u64().unwrap())
        .sum();
    assert_eq!(leaked, 10_000, "{}", r.leaks["totals"]);
    eprintln!("peak RSS of memscope record on 10,000 threads: {} MiB", r.peak_rss >> 20);
}

/// A target whose allocator lives under a path that is not UTF-8 (`/tmp/l\xffb/libc.so.6`):
/// its maps still parse, the library is opened by inode, and the counts are exact.
#[test]
fn non_utf8_library_paths_are_traced() {
    require_root();
    let libc_path = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .find_map(|l| l.split_whitespace().nth(5).filter(|p| p.contains("/libc.so")).map(str::to_string))
        .unwrap();
    let exe = alloc_fixture();
    let mut fixture = Fixture::spawn(contained(&format!(
        "d=$(printf '/tmp/l\\377b') && mkdir \"$d\" && cp {libc_path} \"$d\"/ && LD_LIBRARY_PATH=\"$d\" exec {} basic",
        exe.display()
    )));
    let maps = std::fs::read(format!("/proc/{}/maps", fixture.pid)).unwrap();
    assert!(maps.windows(6).any(|w| w == b"/l\xffb/l"), "the fixture does not use the copied libc");
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut fixture, out.path());
    assert_clean(&r);
    let t = &r.leaks["totals"];
    assert_eq!((t["allocs"].as_u64(), t["live_bytes"].as_u64()), (Some(1022), Some(2111788)), "{t}");
}

/// The perf map behind a FUSE file system that never answers, mounted in the target's mount
/// namespace (as a container can): the path's lookup would block forever. `memscope record`
/// finishes, writes its report, and counts the perf map as `hung`.
#[test]
fn perf_map_on_a_fuse_mount_that_never_answers() {
    require_root();
    let cwd = tempfile::tempdir().unwrap();
    let mut node = contained_node(cwd.path());
    let root = format!("/proc/{}/root", node.pid);
    std::fs::create_dir(format!("{root}/tmp/hang")).unwrap();
    let server = common::build_fixture("fuse_hang", &[]);
    let mut fuse = Command::new("nsenter")
        .args(["-t", &node.pid.to_string(), "-m"])
        .arg(&server)
        .arg("/tmp/hang")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fuse.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "mounted\n", "the FUSE server did not mount");
    let map = perf_map(node.pid);
    std::fs::remove_file(&map).unwrap();
    symlink("/tmp/hang/perf.map", &map).unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut node, out.path());
    let _ = fuse.kill();
    let _ = fuse.wait();
    assert_clean(&r);
    assert!(refused(&r.leaks, "perf_map", "hung") >= 1, "{}", r.leaks["target_files"]);
}

/// A target in another root (as in a container: here `chroot` into a bind mount of `/` in a
/// private mount namespace). The kernel writes its `/proc/PID/maps` paths relative to the
/// reader's root, so the host reads `<root>/usr/lib/.../libc.so.6`; the outputs show the paths
/// as the target sees them, never the host's location of its root, and the counts are exact.
#[test]
fn container_paths_are_shown_as_the_container_sees_them() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let exe = alloc_fixture();
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!(
        "mount --rbind / '{root}' && exec chroot '{root}' {exe} basic",
        root = root.path().display(),
        exe = exe.display()
    ));
    let mut fixture = Fixture::spawn(cmd);
    let host_view = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid)).unwrap();
    let prefix = root.path().to_str().unwrap().to_string();
    assert!(host_view.contains(&format!("{prefix}/")), "the host does not see the root's prefix:\n{host_view}");
    let seen = profiler_user::procfs::maps(fixture.pid).unwrap();
    assert!(seen.iter().filter_map(|m| m.path.as_deref()).all(|p| !p.starts_with(&prefix)), "{seen:?}");
    let out = tempfile::tempdir().unwrap();
    let r = record(&mut fixture, out.path());
    assert_clean(&r);
    assert!(!r.all_text.windows(prefix.len()).any(|w| w == prefix.as_bytes()), "the host path of the root is in the outputs");
    let t = &r.leaks["totals"];
    assert_eq!((t["allocs"].as_u64(), t["live_bytes"].as_u64()), (Some(1022), Some(2111788)), "{t}");
}

/// `(status, body as JSON or Null)` of one request to the agent, with curl (30 s at most).
fn http(method: &str, url: &str, token: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-X", method, "-H", &format!("Authorization: Bearer {token}"), "-w", "\n%{http_code}"])
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Peak resident memory of `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim();
    kb.parse::<u64>().unwrap() * 1024
}

/// Four targets, each with a 200 MB perf map of short lines (the worst case: ~100 bytes of
/// memory per 23-byte line). Before the memory budget each target cost the agent ~225 MB
/// (961 MB for four). Now each target's parsed names are charged to its share (64 MiB by
/// default) and all of them to the agent's (`--target-data-budget`, 192 MiB here so that both
/// caps are hit): the agent's peak RSS stays under that budget plus its own working memory
/// (128 MiB), and every target's status says what was not loaded and which cap refused, as do
/// the metrics.
#[test]
fn four_targets_with_200_mb_perf_maps_stay_within_the_budget() {
    require_root();
    const BUDGET_MIB: u64 = 192;
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::agent::standard_tokens(dir.path());
    let data = common::agent::data_dir(dir.path());
    let budget = format!("{BUDGET_MIB}MiB");
    let agent = common::agent::start_agent(&[
        "--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data,
        "--sampling", "full", "--rate-limit", "500", "--target-data-budget", &budget,
    ])
    .unwrap();
    let base_rss = peak_rss(agent.pid());
    // One 200 MB map, linked as each target's /tmp/perf-PID.map.
    let big = dir.path().join("perf.map");
    {
        use std::io::Write as _;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut i: u64 = 0;
        let mut written = 0u64;
        while written < 200_000_000 {
            let line = format!("{:x} 10 f{i:07}\n", 0x7f00_0000_0000u64 + i * 16);
            w.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
        }
        w.flush().unwrap();
    }
    let mut fixtures = Vec::new();
    for _ in 0..4 {
        let mut f = Fixture::start(&alloc_fixture(), "basic");
        let link = PathBuf::from(format!("/tmp/perf-{}.map", f.pid));
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(&big, &link).unwrap();
        let (code, body) = http_post_attach(&agent.url, f.pid);
        assert!(code == 200 || code == 201, "attach: {code} {body}");
        f.go();
        fixtures.push(f);
    }
    for f in &fixtures {
        let (code, body) = http("POST", &format!("{}/v1/targets/{}/snapshots", agent.url, f.pid), common::agent::ADMIN);
        assert!(code == 200 || code == 201, "snapshot: {code} {body}");
    }
    let peak = peak_rss(agent.pid());
    let (code, targets) = http("GET", &format!("{}/v1/targets", agent.url), common::agent::READ);
    assert_eq!(code, 200, "{targets}");
    let list = targets["targets"].as_array().unwrap();
    assert_eq!(list.len(), 4, "{targets:#}");
    let mut limits = Vec::new();
    let mut used = 0;
    for t in list {
        let b = &t["memory_budget"];
        let refusal = &b["refused"]["perf_map"];
        assert!(refusal.is_object(), "no refusal reported for pid {}: {b:#}", t["pid"]);
        assert!(refusal["not_loaded"].as_str().unwrap_or("").contains("not loaded"), "{b:#}");
        assert!(b["used_bytes"].as_u64().unwrap() <= 64 << 20, "{b:#}");
        used += b["used_bytes"].as_u64().unwrap();
        limits.push(refusal["limit"].as_str().unwrap().to_string());
    }
    assert!(used <= BUDGET_MIB << 20, "targets hold {} MiB together", used >> 20);
    assert!(limits.iter().any(|l| l == "agent"), "the agent-wide cap never refused: {limits:?}");
    let metrics = Command::new("curl")
        .args(["-s", "-m", "30", "-H", &format!("Authorization: Bearer {}", common::agent::READ)])
        .arg(format!("{}/metrics", agent.url))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("memscope_target_budget_refusals_total{use=\"perf_map\",limit=\"agent\"}"), "{metrics}");
    for f in &fixtures {
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", f.pid));
    }
    eprintln!(
        "agent peak RSS with four 200 MB perf maps: {} MiB (at start {} MiB; {} MiB of names held; refusals {limits:?})",
        peak >> 20,
        base_rss >> 20,
        used >> 20
    );
    let cap = (BUDGET_MIB + 128) << 20;
    assert!(peak < cap, "agent peaked at {} MiB (cap {} MiB)", peak >> 20, cap >> 20);
}

/// The unwind tables and symbols of a target's files are charged to its account: with a
/// per-target budget of 128 KiB, libc's unwind table (~250 KB once compiled) is refused, the
/// target is still traced (libc's frames by frame pointers), and the refusal shows in its
/// `memory_budget` and `unwind_tables` in `GET /v1/targets`, and in `/metrics`.
#[test]
fn unwind_tables_past_the_per_target_budget_are_refused_and_reported() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = common::agent::standard_tokens(dir.path());
    let data = common::agent::data_dir(dir.path());
    let agent = common::agent::start_agent(&[
        "--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data,
        "--sampling", "full", "--target-data-budget-per-target", "128KiB",
    ])
    .unwrap();
    let mut f = Fixture::start(&alloc_fixture(), "basic");
    let (code, body) = http_post_attach(&agent.url, f.pid);
    assert!(code == 200 || code == 201, "attach: {code} {body}");
    f.go();
    let (code, snap) = http("POST", &format!("{}/v1/targets/{}/snapshots", agent.url, f.pid), common::agent::ADMIN);
    assert!(code == 200 || code == 201, "a target over its budget is still profiled: {code} {snap}");
    let (code, targets) = http("GET", &format!("{}/v1/targets", agent.url), common::agent::READ);
    assert_eq!(code, 200, "{targets}");
    let t = &targets["targets"].as_array().unwrap()[0];
    let b = &t["memory_budget"];
    let refusal = &b["refused"]["unwind"];
    assert_eq!(refusal["limit"], "target", "{t:#}");
    assert!(refusal["not_loaded"].as_str().unwrap_or("").contains("libc"), "{b:#}");
    assert!(b["used_bytes"].as_u64().unwrap() <= 128 << 10, "{b:#}");
    assert!(t["unwind_tables"]["files_over_budget"].as_u64().unwrap() >= 1, "{t:#}");
    let metrics = Command::new("curl")
        .args(["-s", "-m", "30", "-H", &format!("Authorization: Bearer {}", common::agent::READ)])
        .arg(format!("{}/metrics", agent.url))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("memscope_target_budget_refusals_total{use=\"unwind\",limit=\"target\"}"), "{metrics}");
    eprintln!("memory_budget of a target capped at 128 KiB: {b}");
}

fn http_post_attach(url: &str, pid: u32) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-X", "POST", "-H", &format!("Authorization: Bearer {}", common::agent::ADMIN)])
        .args(["-H", "Content-Type: application/json", "--data", &format!("{{\"pid\": {pid}}}"), "-w", "\n%{http_code}"])
        .arg(format!("{url}/v1/targets"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Hostile bytes in what a target names: node started through a symlink whose name (its
/// comm) holds an escape sequence (set the window title, clear the screen) and a newline, on
/// a script whose file name (in every JIT frame's location, through the perf map) holds others.
/// `memscope record`'s report (stdout and report.txt), and the client's `targets` and `leaks`
/// tables on a terminal (a pty through `script`), hold no raw control byte but their own
/// newlines: the names are there, escaped.
#[test]
fn hostile_names_never_reach_the_terminal_raw() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let node = String::from_utf8(Command::new("sh").args(["-c", "command -v node"]).output().unwrap().stdout).unwrap();
    // 15 bytes: all of it is the comm.
    let evil_exe = dir.path().join("\x1b]0;p\x07\x1b[2J\nFAKE");
    symlink(node.trim(), &evil_exe).unwrap();
    let script = dir.path().join("app\x1b[31m\nfake row.js");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node_leak.js"), &script).unwrap();
    let spawn = || {
        let mut cmd = Command::new(&evil_exe);
        cmd.current_dir(dir.path()).args(["--expose-gc", "--perf-basic-prof", "--interpreted-frames-native-stack"]).arg(&script);
        Fixture::spawn(cmd)
    };
    let clean = |what: &str, bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
        assert!(!profiler_user::render::escape::has_raw_control(text.as_bytes()), "{what} has raw control bytes:\n{text:?}");
    };

    // memscope record: stdout (the report), stderr, report.txt.
    let mut target = spawn();
    let comm = std::fs::read(format!("/proc/{}/comm", target.pid)).unwrap();
    assert!(comm.contains(&0x1b), "the comm is not hostile: {comm:?}");
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memscope"))
        .args(["record", "--pid", &target.pid.to_string(), "--duration", "60s", "--min-age", "0s", "--sampling", "full", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut err_text, mut stderr) = wait_attached(&mut child);
    target.go();
    // The JIT names are pinned within ~200 ms of the stacks being recorded.
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = BufReader::new(stdout).read_to_end(&mut all);
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        let _ = tx.send((all, rest));
    });
    let (report_out, rest) = rx.recv_timeout(Duration::from_secs(90)).expect("memscope record did not end within 90 s of SIGINT");
    let _ = child.wait();
    err_text += &rest;
    let report = std::fs::read(out.join("report.txt")).unwrap();
    clean("report.txt", &report);
    clean("record's stdout", &report_out);
    clean("record's stderr", err_text.as_bytes());
    let report = String::from_utf8_lossy(&report);
    // V8 writes the name raw, so the newline ends that perf map line: the part before it is
    // the frame's file.
    assert!(report.contains("app\\e[31m"), "the hostile file name is not shown escaped:\n{report}");
    assert!(err_text.contains("\\e]0;p\\u{7}\\e[2J\\nFAKE"), "the comm is not shown escaped: {err_text}");
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", target.pid));
    drop(target);

    // The client on a terminal.
    let mut target = spawn();
    let tokens = common::agent::standard_tokens(dir.path());
    let data = common::agent::data_dir(dir.path());
    let agent = common::agent::start_agent(&[
        "--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data, "--sampling", "full",
    ])
    .unwrap();
    let (code, body) = http_post_attach(&agent.url, target.pid);
    assert!(code == 200 || code == 201, "attach: {code} {body}");
    target.go();
    std::thread::sleep(Duration::from_millis(1500));
    let on_tty = |args: &str| {
        let cmd = format!("{} {args} --agent {}", env!("CARGO_BIN_EXE_memscope"), agent.url);
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"]).env("MEMSCOPE_TOKEN", common::agent::READ).env_remove("MEMSCOPE_AGENT");
        let (status, stdout, stderr) = common::agent::run(c);
        assert!(status.success(), "memscope {args}: {stdout}{stderr}");
        stdout
    };
    let table = on_tty("targets");
    clean("memscope targets", table.as_bytes());
    assert!(table.contains("\\e]0;p\\u{7}"), "the comm is not in the table, escaped:\n{table}");
    assert_eq!(table.replace("\r\n", "\n").trim_end().lines().count(), 2, "the comm added rows:\n{table}");
    let leaks = on_tty(&format!("leaks {} --min-age 0s", target.pid));
    clean("memscope leaks", leaks.as_bytes());
    assert!(leaks.contains("#1 "), "no leak listed:\n{leaks}");
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", target.pid));
}
