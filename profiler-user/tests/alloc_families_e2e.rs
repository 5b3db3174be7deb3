//! Rust services on the allocators production Rust uses (issue 19): `tikv-jemallocator` and
//! `mimalloc` linked statically into the executable, a custom `#[global_allocator]` over the
//! system allocator (whose shims reach `malloc`: seen at `malloc`) and the system allocator.
//! Real eBPF on a real release build of tests/fixtures/rust_alloc, built here with cargo
//! (crates from crates.io) in its own target directory under this crate's `CARGO_TARGET_TMPDIR`,
//! so a second run reuses it. For each: the probed functions are the ones the Rust code really
//! calls (never libc's unused `malloc` for a statically linked allocator), the kept bytes of
//! the named functions are exact at full recording and frees are seen (jemalloc's `sdallocx`,
//! mimalloc's `mi_free`); the sampled estimate is within the usual bound by default.
//! Need root; CI runs them as root.
mod common;

use std::{path::Path, time::Duration};

use common::{require_root, rust_service, Fixture};
use profiler_user::{aggregate::HeapProfile, bpf::load::ProbeSettings, session::Session, target::TracedTarget};

/// (live bytes, live allocations) of the stacks with a frame in the fixture's `function`
/// (`rust_alloc_fixture::leak_rust`), each stack once.
fn site(p: &HeapProfile, function: &str) -> (u64, u64) {
    common::stacks_through_path(p, function).fold((0, 0), |(b, n), s| (b + s.live_bytes, n + s.live_allocs))
}

fn attached(exe: &Path, mode: &str, sample_bytes: u64) -> (Fixture, Session) {
    let fixture = Fixture::start(exe, mode);
    let session = Session::attach(fixture.pid, ProbeSettings { sample_bytes, ..Default::default() }).unwrap();
    (fixture, session)
}

/// The whole check for one build: `probed` must be among the probed functions, and the
/// allocator must be the executable itself (`in_exe`) or libc.
fn check_service(feature: Option<&str>, probed: &[&str], in_exe: bool) {
    require_root();
    let exe = rust_service(feature);
    let label = feature.unwrap_or("system");

    let (mut fixture, session) = attached(&exe, "basic", 0);
    let functions: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    for f in probed {
        assert!(functions.contains(f), "{label}: {f} not probed; probed {functions:?}");
    }
    let exe_real = std::fs::canonicalize(&exe).unwrap();
    if in_exe {
        assert_eq!(Path::new(session.allocator()), exe_real, "{label}: probed {functions:?}");
    } else {
        assert!(session.allocator().contains("libc"), "{label}: {}", session.allocator());
    }
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert_eq!(site(&p, "leak_rust"), (10 * 4096, 10), "{label}: {:#?}", p.totals);
    assert_eq!(site(&p, "leak_grown"), (5 * 4000, 5), "{label}");
    assert_eq!(site(&p, "churn"), (0, 0), "{label}");
    // 10,000 churned buffers, and the 5 grown ones' first blocks.
    assert!(p.totals.frees >= 10_005, "{label}: frees {}", p.totals.frees);
    assert!(p.totals.allocs >= 10_020 && p.totals.allocs < 10_200, "{label}: allocs {}", p.totals.allocs);
    // Only what the runtime allocated before attach may be freed unseen.
    assert!(p.untracked_frees < 20, "{label}: {} frees of allocations not seen", p.untracked_frees);
    assert_eq!(p.dropped.values().sum::<u64>(), 0, "{label}: {:?}", p.dropped);
    drop(fixture);

    let (mut fixture, session) = attached(&exe, "sample", 512 * 1024);
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    let truth = (6400 * 65536) as f64;
    let bytes = site(&p, "leak_rust").0 as f64;
    assert!((bytes - truth).abs() / truth < 0.15, "{label}: estimate {bytes} vs {truth}");
    // Every call counted once (no nested entry point counted again).
    assert!(p.totals.allocs >= 106_400 && p.totals.allocs < 106_600, "{label}: allocs {}", p.totals.allocs);
    assert!(p.totals.live_allocs <= p.totals.allocs);
}

/// tikv-jemallocator, statically linked with its `_rjem_` prefix: Rust allocates through
/// `_rjem_malloc` and `_rjem_realloc`, frees through `_rjem_sdallocx`; libc's `malloc` is not
/// what gets probed.
#[test]
fn jemalloc_rust_service_is_exact() {
    check_service(Some("jemalloc"), &["_rjem_malloc", "_rjem_sdallocx", "_rjem_realloc", "_rjem_mallocx"], true);
}

/// mimalloc, statically linked: `mi_malloc_aligned`, `mi_realloc_aligned`, `mi_free`.
#[test]
fn mimalloc_rust_service_is_exact() {
    check_service(Some("mimalloc"), &["mi_malloc_aligned", "mi_realloc_aligned", "mi_free"], true);
}

/// A `#[global_allocator]` that wraps `System`: rustc inlines it into the crate's own code,
/// which then calls libc's `malloc` without going through Rust's shims (`leak_rust` calls
/// `malloc` directly), so the shims (which also reach `malloc`) are not probed: `malloc` is,
/// and sees every allocation.
#[test]
fn custom_global_allocator_over_system_is_seen_at_malloc() {
    check_service(Some("custom"), &["malloc", "free", "realloc"], false);
}

/// The system allocator: libc's `malloc`, as before.
#[test]
fn system_allocator_rust_service_is_exact() {
    check_service(None, &["malloc", "free", "realloc"], false);
}
