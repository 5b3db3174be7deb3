//! The coverage statement and what memscope can and cannot see (issue 19, items 1, 3, 5, 6),
//! on real processes with real eBPF:
//!
//! - a process allocating through malloc is covered (high share, no reason), one that maps its
//!   memory directly with mmap gets the low-coverage line naming mmap, and a Rust service with
//!   a `#[global_allocator]` memscope does not recognize gets "statically linked allocator not
//!   recognized": never "No leaks" without the line;
//! - a `gcc -static` executable is probed in itself (glibc's malloc linked in), exact at full
//!   recording; stripped, it is found through its debug file by build id inside the target's
//!   root (a root made by the test, the fixture chrooted into it), or refused with one line
//!   naming both remedies, or probed at the addresses `--alloc-symbol` names;
//! - on a sampled run no estimated figure is above its exact counterpart and the live figure,
//!   the stacks and the leak list state the same thing.
//!
//! Need root; CI runs them as root.
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{build_fixture, require_root, rust_service, Fixture};
use profiler_user::{
    aggregate::HeapProfile,
    bpf::{load::ProbeSettings, stripped::NamedEntries},
    coverage::Reason,
    render::{json::leaks_json, text::leak_report},
    session::Session,
    target::TracedTarget,
};

fn full() -> ProbeSettings {
    ProbeSettings { sample_bytes: 0, ..Default::default() }
}

fn reasons(p: &HeapProfile) -> Vec<Reason> {
    p.coverage.as_ref().expect("a coverage statement").reasons.iter().map(|w| w.reason).collect()
}

/// (live bytes, live allocations) of the stacks with a frame named `function`.
fn site(p: &HeapProfile, function: &str) -> (u64, u64) {
    common::stacks_through_path(p, function).fold((0, 0), |(b, n), s| (b + s.live_bytes, n + s.live_allocs))
}

/// Whatever the report concludes about leaks, a low coverage is stated with it.
fn assert_never_bare_no_leaks(report: &str) {
    assert!(report.contains("  coverage:   "), "{report}");
    if report.contains("LOW COVERAGE") {
        for verdict in ["No leaks", "No allocation seen"] {
            if report.contains(verdict) {
                assert!(report.contains("This covers only"), "{report}");
            }
        }
    }
}

/// 32 MiB kept through malloc after attach: covered, no reason, the breakdown complete, in the
/// report, leaks.json and the cheap statistics.
#[test]
fn malloc_process_is_covered() {
    require_root();
    let exe = build_fixture("coverage_fixture", &[]);
    let mut fixture = Fixture::start(&exe, "malloc");
    let session = Session::attach(fixture.pid, full()).unwrap();
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert_eq!(site(&p, "keep_malloc"), (512 * 65536, 512));
    let c = p.coverage.as_ref().expect("coverage");
    assert!(!c.low && c.ratio >= 0.8, "{c:#?}");
    assert!(c.reasons.is_empty(), "{c:#?}");
    let b = c.breakdown.as_ref().expect("breakdown");
    assert!(b.complete && b.anon_mapping_bytes + b.brk_heap_bytes >= 32 << 20, "{b:#?}");
    let report = leak_report(&p, 5);
    eprintln!("{report}");
    assert!(!report.contains("LOW COVERAGE"), "{report}");
    assert_never_bare_no_leaks(&report);
    assert_eq!(leaks_json(&p, None)["coverage"]["low"], false);
    let stats = session.stats();
    let cheap = stats.coverage.expect("coverage in the target's statistics");
    assert!(!cheap.low && cheap.breakdown.is_none(), "{cheap:#?}");
}

/// 64 MiB mapped directly with mmap: low coverage, "memory mapped directly with mmap" with its
/// bytes, in the report (never a bare "No leaks"), leaks.json and the cheap statistics.
#[test]
fn direct_mmap_gets_the_low_coverage_line() {
    require_root();
    let exe = build_fixture("coverage_fixture", &[]);
    let mut fixture = Fixture::start(&exe, "mmap");
    let session = Session::attach(fixture.pid, full()).unwrap();
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    let c = p.coverage.as_ref().expect("coverage");
    assert!(c.low, "{c:#?}");
    let mmap = c.reasons.iter().find(|w| w.reason == Reason::DirectMmap).unwrap_or_else(|| panic!("{c:#?}"));
    assert!(mmap.bytes.unwrap_or(0) >= 60 << 20, "{c:#?}");
    let report = leak_report(&p, 5);
    eprintln!("{report}");
    assert!(report.contains("LOW COVERAGE") && report.contains("memory mapped directly with mmap"), "{report}");
    assert_never_bare_no_leaks(&report);
    let json = leaks_json(&p, None);
    assert_eq!(json["coverage"]["low"], true);
    assert!(json["coverage"]["reasons"].as_array().unwrap().iter().any(|w| w["reason"] == "direct_mmap"), "{json}");
    let cheap = session.stats().coverage.expect("coverage");
    assert!(cheap.low, "{cheap:#?}");
    assert!(cheap.reasons.iter().any(|w| w.reason == Reason::NotSeenAllocated), "{cheap:#?}");
}

/// A Rust service whose `#[global_allocator]` is its own (a bump allocator over mmap): no
/// family recognizes it; the Rust shims are probed (or libc's malloc when the linker dropped
/// `__rust_dealloc`), and rustc inlines the allocator into its callers past the shims, so
/// nothing of the 16 MiB it keeps is seen: the coverage line says the statically linked
/// allocator was not recognized.
#[test]
fn unrecognized_rust_global_allocator_is_stated() {
    require_root();
    let exe = rust_service(Some("bump"));
    let mut fixture = Fixture::start(&exe, "keep");
    let session = Session::attach(fixture.pid, full()).unwrap();
    let probed: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    assert!(!probed.contains(&"mmap"), "{probed:?}");
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert!(p.totals.live_bytes < 1 << 20, "{:?}", p.totals);
    let why = reasons(&p);
    assert!(why.contains(&Reason::StaticAllocatorNotRecognized), "{why:?}");
    let report = leak_report(&p, 5);
    eprintln!("{report}");
    assert!(report.contains("statically linked allocator not recognized"), "{report}");
    assert_never_bare_no_leaks(&report);
    let cheap = session.stats().coverage.expect("coverage");
    assert!(cheap.reasons.iter().any(|w| w.reason == Reason::StaticAllocatorNotRecognized), "{cheap:#?}");
}

/// Sends "go" and checks the kept bytes of `keep_malloc`, exact at full recording, for a
/// fixture whose frames may have no names (stripped): by the totals then.
fn check_exact(session: &Session, fixture: &mut Fixture, named_frames: bool) {
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    if named_frames {
        assert_eq!(site(&p, "keep_malloc"), (512 * 65536, 512), "{:#?}", p.totals);
    }
    // Static glibc allocates nothing else after attach.
    assert!(p.totals.live_bytes >= 512 * 65536 && p.totals.live_bytes < 512 * 65536 + 65536, "{:?}", p.totals);
    assert!(p.totals.allocs >= 512 && p.totals.allocs < 520, "{:?}", p.totals);
    assert!(!p.coverage.as_ref().expect("coverage").low, "{:#?}", p.coverage);
}

/// glibc linked statically: malloc and free are found in the executable itself and every
/// allocation is seen at full recording.
#[test]
fn static_glibc_is_probed_in_the_executable() {
    require_root();
    let exe = build_fixture("coverage_fixture", &["-static"]);
    let mut fixture = Fixture::start(&exe, "malloc");
    let session = Session::attach(fixture.pid, full()).unwrap();
    assert_eq!(Path::new(session.allocator()), std::fs::canonicalize(&exe).unwrap());
    let probed: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    assert!(probed.contains(&"malloc") && probed.contains(&"free"), "{probed:?}");
    check_exact(&session, &mut fixture, true);
}

/// musl linked statically (musl-gcc: `cargo xtask setup` installs musl-tools), likewise.
#[test]
fn static_musl_is_probed_in_the_executable() {
    require_root();
    assert!(
        Command::new("musl-gcc").arg("--version").output().is_ok(),
        "musl-gcc is missing: `cargo xtask setup` installs musl-tools"
    );
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("coverage_fixture_musl");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coverage_fixture.c");
    let status = Command::new("musl-gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-static", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success());
    let mut fixture = Fixture::start(&exe, "malloc");
    let session = Session::attach(fixture.pid, full()).unwrap();
    assert_eq!(Path::new(session.allocator()), std::fs::canonicalize(&exe).unwrap());
    check_exact(&session, &mut fixture, true);
}

/// A root made by the test holding a stripped static build of the fixture at `/fixture`, and
/// the unstripped build (for `nm`) and the build id.
struct StrippedRoot {
    root: tempfile::TempDir,
    unstripped: PathBuf,
    build_id: String,
}

fn stripped_root() -> StrippedRoot {
    let unstripped = build_fixture("coverage_fixture", &["-static"]);
    let root = tempfile::Builder::new().prefix("memscope-root").tempdir_in("/tmp").unwrap();
    let exe = root.path().join("fixture");
    std::fs::copy(&unstripped, &exe).unwrap();
    let debug = root.path().join("fixture.debug");
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(Command::new("objcopy").arg("--only-keep-debug").arg(&exe).arg(&debug));
    run(Command::new("strip").arg("--strip-all").arg(&exe));
    let out = Command::new("readelf").arg("-n").arg(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let build_id =
        text.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).expect("a build id").trim().to_string();
    let nm = Command::new("nm").arg(&exe).output().unwrap();
    assert!(!nm.status.success() || nm.stdout.is_empty(), "the executable is stripped");
    StrippedRoot { root, unstripped, build_id }
}

impl StrippedRoot {
    fn place_debug_file(&self) {
        let dir = self.root.path().join(format!("usr/lib/debug/.build-id/{}", &self.build_id[..2]));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::rename(self.root.path().join("fixture.debug"), dir.join(format!("{}.debug", &self.build_id[2..])))
            .unwrap();
    }

    /// The fixture running chrooted into the root.
    fn start(&self) -> Fixture {
        let mut cmd = Command::new("chroot");
        cmd.arg(self.root.path()).args(["/fixture", "malloc"]);
        Fixture::spawn(cmd)
    }

    /// `nm`'s address of `name` in the unstripped build.
    fn address(&self, name: &str) -> u64 {
        let out = Command::new("nm").arg(&self.unstripped).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.ends_with(&format!(" T {name}"))).unwrap_or_else(|| panic!("{name} in nm"));
        u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
    }
}

/// A stripped static executable without a debug file is refused with one line naming both
/// remedies; with its debug file under the build-id path of its own root, its allocator is
/// found and every allocation seen.
#[test]
fn stripped_static_binary_uses_its_debug_file() {
    require_root();
    let root = stripped_root();
    let fixture = root.start();
    let err = format!("{:#}", Session::attach(fixture.pid, full()).err().expect("refused without a debug file"));
    assert!(err.contains("stripped") && err.contains(".build-id/") && err.contains("--alloc-symbol"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    drop(fixture);

    root.place_debug_file();
    let mut fixture = root.start();
    let session = Session::attach(fixture.pid, full()).unwrap();
    assert_eq!(session.allocator(), "/fixture");
    check_exact(&session, &mut fixture, false);
}

/// `--alloc-symbol` names a stripped executable's malloc and free by address: probed there,
/// every allocation seen.
#[test]
fn stripped_static_binary_with_named_entry_points() {
    require_root();
    let root = stripped_root();
    let named = format!("malloc={:#x},free={:#x}", root.address("malloc"), root.address("free"));
    let named = NamedEntries::parse(&named).unwrap();
    let mut fixture = root.start();
    let session = Session::attach_named(fixture.pid, full(), &named).unwrap();
    let probed: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    assert!(probed.contains(&"malloc") && probed.contains(&"free"), "{probed:?}");
    check_exact(&session, &mut fixture, false);
    // An address outside the code is refused, in one line.
    let bad = NamedEntries::parse("malloc=0x10,free=0x20").unwrap();
    let other = root.start();
    let err = format!("{:#}", Session::attach_named(other.pid, full(), &bad).err().expect("refused"));
    assert!(err.contains("no code") && !err.contains('\n'), "{err}");
}

/// A sampled run: no estimated figure above its exact counterpart (totals, stacks, cheap
/// statistics), the stacks add up to the live figure, and the leak list (min age 0: every live
/// allocation) states the same amount.
#[test]
fn sampled_counts_are_consistent() {
    require_root();
    let exe = build_fixture("coverage_fixture", &[]);
    let mut fixture = Fixture::start(&exe, "churn");
    let session = Session::attach(fixture.pid, ProbeSettings { sample_bytes: 4096, ..Default::default() }).unwrap();
    fixture.go();
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    let t = &p.totals;
    assert!(t.allocs >= 440_000, "{t:?}");
    assert!(t.live_allocs <= t.allocs && t.live_bytes <= t.allocated_bytes, "{t:?}");
    let sum = |f: fn(&profiler_user::aggregate::StackSample) -> u64| p.stacks.iter().map(f).sum::<u64>();
    assert_eq!(sum(|s| s.live_bytes), t.live_bytes);
    assert_eq!(sum(|s| s.live_allocs), t.live_allocs);
    assert!(sum(|s| s.total_bytes) <= t.allocated_bytes && sum(|s| s.total_allocs) <= t.allocs);
    assert_eq!(p.leaked_bytes(), t.live_bytes, "min age 0: the leak list is the live heap");
    let json = leaks_json(&p, None);
    let listed: u64 = json["leaks"].as_array().unwrap().iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    assert_eq!(listed, json["totals"]["live_bytes"].as_u64().unwrap());
    // 40,000 x 48 B kept: the estimate within the usual bound.
    let kept = site(&p, "keep_small").0 as f64;
    assert!((kept - 1_920_000.0).abs() / 1_920_000.0 < 0.15, "{kept}");
    let s = session.stats();
    assert!(s.live_allocs <= s.allocs, "{} > {}", s.live_allocs, s.allocs);
    // With an age, the report says how the live figure and the leak list relate.
    let older = session.snapshot(Duration::from_secs(3600)).unwrap();
    assert_eq!(older.leaked_bytes(), 0);
    assert!(older.totals.live_bytes <= older.totals.allocated_bytes);
}

/// Python keeping a million small tuples: pymalloc serves them from arenas it maps directly,
/// not through malloc (only the list's array is malloc'd): low coverage, "Python's pymalloc
/// arenas" among the reasons.
#[test]
fn python_pymalloc_is_named() {
    require_root();
    let script = "import os, sys\n\
                  print('ready', os.getpid(), flush=True)\n\
                  keep = []\n\
                  for line in sys.stdin:\n\
                  \x20   keep.append([(i, i + 1) for i in range(1_000_000)])\n\
                  \x20   print('done', flush=True)\n";
    // Debian's python3 (the one a node runs), not a version manager's shim.
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script]).env_remove("PYTHONMALLOC");
    let mut fixture = Fixture::spawn(cmd);
    let session = Session::attach(fixture.pid, full()).unwrap();
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    let why = reasons(&p);
    assert!(p.coverage.as_ref().unwrap().low, "{:#?}", p.coverage);
    assert!(why.contains(&Reason::PythonPymalloc), "{why:?}");
    let report = leak_report(&p, 1);
    assert!(report.contains("Python's pymalloc arenas"), "{report}");
    assert_never_bare_no_leaks(&report);
}
