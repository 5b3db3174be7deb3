//! The Go heap from outside (issue 19): a Go program (tests/fixtures/go_heap, built here with
//! the installed `go`, with and without cgo) is traced through its runtime's own allocation
//! sampling, and memscope's live bytes per Go function are compared with the same process's
//! own `runtime/pprof` heap profile (`inuse_space`, cumulative per function, read with
//! `go tool pprof`): the ground truth a Go developer would look at. With cgo, the C
//! allocations are still seen at libc's `malloc`, exactly, and their stacks continue past
//! `runtime.asmcgocall` into the Go function that made the cgo call. A Go version memscope
//! did not validate is refused by name.
//! Real eBPF, real processes; need root and `go` (installed by `cargo xtask setup`).
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{require_root, Fixture};
use profiler_user::{
    aggregate::HeapProfile, bpf::load::ProbeSettings, session::Session, target::TracedTarget,
};

/// Go's caches for the builds here (never the user's).
const GO_CACHE: &str = "/tmp/memscope-test-go-cache";

/// Builds the fixture with or without cgo into this crate's `CARGO_TARGET_TMPDIR` and returns
/// a private copy of the executable (one per test process and thread: a probed file is not
/// rewritten under another test).
fn go_fixture(cgo: bool) -> PathBuf {
    go_fixture_with(cgo, &[])
}

/// [`go_fixture`] with more `go build` flags (`-tags noprof`: without runtime/pprof;
/// `-buildmode=pie`).
fn go_fixture_with(cgo: bool, flags: &[&str]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go_heap");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures/go_heap");
    std::fs::create_dir_all(&out).unwrap();
    let suffix: String = flags.concat().chars().filter(char::is_ascii_alphanumeric).collect();
    let name = format!("go_heap-{}{suffix}", if cgo { "cgo" } else { "nocgo" });
    let built = out.join(format!("{name}.{}", std::process::id()));
    let status = Command::new("go")
        .current_dir(&src)
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&built)
        .arg(".")
        .env("CGO_ENABLED", if cgo { "1" } else { "0" })
        .env("GOCACHE", format!("{GO_CACHE}/build"))
        .env("GOPATH", format!("{GO_CACHE}/path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .status()
        .unwrap_or_else(|e| panic!("running go (install golang-go: cargo xtask setup): {e}"));
    assert!(status.success(), "building the Go fixture ({name})");
    let thread =
        format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let copy = out.join(format!("{name}.{}.{thread}", std::process::id()));
    std::fs::rename(&built, &copy).unwrap();
    copy
}

/// Live bytes of the stacks with a frame in `function`, each stack once.
fn site(p: &HeapProfile, function: &str) -> u64 {
    common::stacks_through(p, function).map(|s| s.live_bytes).sum()
}

/// The process's own heap profile: `inuse_space` cumulative per function, as `go tool pprof`
/// shows it.
fn own_pprof(fixture: &mut Fixture, dir: &Path) -> Vec<(String, u64)> {
    let file = dir.join("heap.pb.gz");
    assert_eq!(
        fixture.ask(&format!("profile {}", file.display())),
        "written"
    );
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-cum",
            "-sample_index=inuse_space",
            "-unit=B",
            "-nodecount=1000",
        ])
        .arg(&file)
        .env("GOCACHE", format!("{GO_CACHE}/build"))
        .env("HOME", dir)
        .output()
        .expect("running go tool pprof");
    assert!(
        out.status.success(),
        "go tool pprof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "  flat  flat%  sum%  cum  cum%  name": cum is the fourth column.
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 6 || !cols[5].contains('.') {
                return None;
            }
            let cum = cols[3].strip_suffix('B').unwrap_or(cols[3]).parse().ok()?;
            Some((cols[5..].join(" "), cum))
        })
        .collect()
}

fn cum(pprof: &[(String, u64)], function: &str) -> u64 {
    pprof
        .iter()
        .find(|(f, _)| f == function)
        .map(|(_, b)| *b)
        .unwrap_or(0)
}

fn within(ours: u64, truth: u64, tolerance: f64) -> bool {
    (ours as f64 - truth as f64).abs() <= tolerance * truth as f64
}

/// What both builds check: the Go runtime probed and said so, keepA's and keepB's live bytes
/// within 25% of the runtime's own profile (and near what they keep), the churned garbage seen
/// freed. Returns the snapshot.
fn check_go_heap(cgo: bool, flags: &[&str]) -> HeapProfile {
    require_root();
    let label = if cgo { "cgo" } else { "no cgo" };
    let exe = go_fixture_with(cgo, flags);
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::start(&exe, "");
    let started = Instant::now();
    let session = Session::attach(fixture.pid, ProbeSettings::default()).unwrap();
    let functions: Vec<&str> = session
        .probe_sites()
        .iter()
        .map(|s| s.function.as_str())
        .collect();
    assert!(
        functions.contains(&"runtime.mProf_Malloc") && functions.contains(&"runtime.freeSpecial"),
        "{label}: {functions:?}"
    );
    if cgo {
        assert!(
            functions.contains(&"malloc"),
            "{label}: libc's malloc probed too: {functions:?}"
        );
        assert!(
            session.allocator().contains("libc"),
            "{label}: {}",
            session.allocator()
        );
    } else {
        assert_eq!(
            Path::new(session.allocator()),
            std::fs::canonicalize(&exe).unwrap(),
            "{label}"
        );
    }
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    let line = p.runtime_heap.clone().unwrap_or_default();
    assert!(
        line.starts_with("Go runtime heap (go1.19")
            && line.ends_with("traced through the runtime's sampling (MemProfileRate 524288)"),
        "{label}: {line:?}"
    );
    assert_eq!(session.stats().runtime_heap.as_deref(), Some(line.as_str()));
    let truth = own_pprof(&mut fixture, dir.path());
    let (a, b) = (site(&p, "main.keepA"), site(&p, "main.keepB"));
    let (ta, tb) = (cum(&truth, "main.keepA"), cum(&truth, "main.keepB"));
    eprintln!(
        "{label}: memscope keepA {a} keepB {b}; runtime/pprof keepA {ta} keepB {tb}; {:?}",
        started.elapsed()
    );
    assert!(
        ta > 0 && tb > 0,
        "{label}: the runtime's own profile: {truth:?}"
    );
    assert!(
        within(a, ta, 0.25),
        "{label}: keepA {a} vs runtime/pprof {ta}"
    );
    assert!(
        within(b, tb, 0.25),
        "{label}: keepB {b} vs runtime/pprof {tb}"
    );
    // What the functions keep (64 and 16 MiB): the runtime's sampling is an estimate.
    assert!(
        within(a, 64 << 20, 0.5) && within(b, 16 << 20, 0.75),
        "{label}: keepA {a}, keepB {b}"
    );
    // 64 MiB churned and collected: its samples were seen freed by the GC.
    assert!(
        site(&p, "main.churn") < 8 << 20,
        "{label}: churn {}",
        site(&p, "main.churn")
    );
    assert!(p.totals.frees > 0, "{label}: no free seen: {:?}", p.totals);
    assert!(
        p.totals.live_allocs <= p.totals.allocs && p.totals.live_bytes <= p.totals.allocated_bytes,
        "{:?}",
        p.totals
    );
    assert_eq!(
        p.dropped.values().sum::<u64>(),
        0,
        "{label}: {:?}",
        p.dropped
    );
    // Every output says how the Go heap is seen and shows the Go stacks.
    let text = profiler_user::render::text::leak_report(&p, 20);
    assert!(text.contains(&line) && text.contains("main.keepA"), "{label}: {text}");
    let json = profiler_user::render::json::leaks_json(&p, None);
    assert_eq!(json["runtime_heap"], line.as_str());
    let folded = profiler_user::render::folded::folded(&p, profiler_user::aggregate::Measure::Inuse);
    assert!(folded.lines().any(|l| l.contains("main.keepA")), "{label}: {folded}");
    let pprof = profiler_user::render::pprof::pprof_profile(&p);
    assert!(pprof.string_table.iter().any(|s| s == "main.keepB"), "{label}: pprof names main.keepB");
    let _ = std::fs::remove_file(&exe);
    p
}

/// A `CGO_ENABLED=0` Go program (no libc, no `malloc`): traced through its runtime's sampling,
/// live bytes per Go function as its own runtime/pprof heap profile says.
#[test]
fn go_heap_without_cgo_matches_its_own_pprof() {
    let p = check_go_heap(false, &[]);
    // Go stacks reach the goroutine's start.
    let deep = p
        .stacks
        .iter()
        .filter(|s| {
            s.frames
                .iter()
                .any(|f| f.function.as_deref() == Some("main.keepA"))
        })
        .all(|s| {
            s.frames
                .iter()
                .any(|f| f.function.as_deref() == Some("main.main"))
        });
    assert!(deep, "keepA's stacks reach main.main");
}

/// A cgo build: the Go heap as above, and the C code's allocations at libc's `malloc`, exact,
/// with stacks that continue from the C function past `runtime.asmcgocall` into `main.keepC`
/// and `main.main`.
#[test]
fn go_heap_with_cgo_and_c_stacks_into_go() {
    let p = check_go_heap(true, &[]);
    let c = site(&p, "keep_c_blocks");
    assert_eq!(c, 64 * 65536, "C allocations from keep_c_blocks, exact");
    let shown: Vec<Vec<&str>> = common::stacks_through(&p, "keep_c_blocks")
        .map(|s| s.frames.iter().map(|f| f.function.as_deref().unwrap_or("?")).collect())
        .collect();
    let into_go = shown.iter().all(|names| names.contains(&"main.keepC") && names.contains(&"main.main"));
    assert!(
        into_go,
        "the C stacks continue into the Go caller: {shown:?}"
    );
}

/// A position-independent build (`-buildmode=pie`, loaded at a random address): the probes'
/// addresses (the sampling rate's, asmcgocall's) are where the program is mapped.
#[test]
fn go_heap_of_a_pie_build() {
    check_go_heap(true, &["-buildmode=pie"]);
}

/// A Go version memscope did not validate: the same program with its build information saying
/// go1.99.8 (same length, the code untouched) is refused, naming the version.
#[test]
fn unvalidated_go_version_is_refused_by_name() {
    require_root();
    let exe = go_fixture(false);
    let mut bytes = std::fs::read(&exe).unwrap();
    // Every copy of the version (.go.buildinfo's and runtime.buildVersion's).
    let at: Vec<usize> = bytes
        .windows(7)
        .enumerate()
        .filter(|(_, w)| w == b"go1.19.")
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "the version in .go.buildinfo");
    for i in at {
        bytes[i..i + 6].copy_from_slice(b"go1.99");
    }
    let patched = exe.with_extension("go199");
    std::fs::write(&patched, &bytes).unwrap();
    std::fs::set_permissions(
        &patched,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fixture = Fixture::start(&patched, "");
    let err = match Session::attach(fixture.pid, ProbeSettings::default()) {
        Ok(_) => panic!("a go1.99 program was traced"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("Go program built with go1.99") && err.contains("go1.19"),
        "{err}"
    );
    drop(fixture);
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_file(&patched);
}

/// A Go program that never links `runtime.MemProfile` (here: without runtime/pprof): the
/// linker switched the runtime's sampling off (MemProfileRate 0), so its Go heap cannot be
/// seen, and without cgo there is nothing else: refused, saying why, never "No leaks".
#[test]
fn go_program_without_sampling_is_refused_clearly() {
    require_root();
    let exe = go_fixture_with(false, &["-tags", "noprof"]);
    let mut fixture = Fixture::start(&exe, "");
    assert_eq!(fixture.ask("rate?"), "rate 0");
    let err = match Session::attach(fixture.pid, ProbeSettings::default()) {
        Ok(_) => panic!("a Go program with its sampling off was traced"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("runtime.MemProfileRate is 0") && err.contains("go1.19"), "{err}");
    drop(fixture);
    let _ = std::fs::remove_file(&exe);
}
