//! The USDT heap-sampling contract (issue 21), with real eBPF on a real Rust service built
//! here (tests/fixtures/rust_usdt: `libdd-profiling-heap-allocator` with `live-heap` around the
//! system allocator and around a statically linked jemalloc, and an alloc-only build): memscope
//! finds `ddheap:alloc`/`ddheap:free` by itself, attaches there and not to the allocator, the
//! service starts sampling when memscope attaches (it reads its own semaphore,
//! `dd_heap_profiler_attached`) and stops when it detaches, the kept bytes per function are
//! within the sampling bound of the truth, frees are seen, and every output names the source.
//! Need root; CI runs them as root.
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    require_root,
    rust_usdt::{usdt_plugin, usdt_service},
    Fixture,
};
use profiler_user::{
    aggregate::HeapProfile,
    bpf::load::{ProbeSettings, SourceMode},
    render,
    session::Session,
    target::TracedTarget,
};

/// What `go` keeps: 1600 x 64 KiB in `keep_big`, 10,000 x 1000 B in `keep_small`.
const BIG: u64 = 1600 * 65536;
const SMALL: u64 = 10_000 * 1000;

/// (live bytes, allocated bytes) of the stacks with a frame in the fixture's `function`.
fn site(p: &HeapProfile, function: &str) -> (u64, u64) {
    common::stacks_through_path(p, function).fold((0, 0), |(l, t), s| (l + s.live_bytes, t + s.total_bytes))
}

fn within(label: &str, what: &str, got: u64, truth: u64, bound: f64) {
    let err = (got as f64 - truth as f64).abs() / truth as f64;
    assert!(err <= bound, "{label}: {what} {got} vs {truth} (error {:.1}% > {:.0}%)", err * 100.0, bound * 100.0);
}

/// Waits (at most 30 s) until the fixture says its semaphore reads `want`.
fn wait_attached(fixture: &mut Fixture, want: u64, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = fixture.count("attached");
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{label}: the service's semaphore still reads {got}, want {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_live_service(exe: &Path, label: &str) {
    let mut fixture = Fixture::start(exe, "serve");
    assert_eq!(fixture.count("attached"), 0, "{label}: sampling before memscope attached");
    let session = Session::attach(fixture.pid, ProbeSettings::default()).unwrap();
    assert_eq!(session.source(), Some("usdt:ddheap"), "{label}");
    assert!(session.live_tracking(), "{label}");
    // The contract's probes only: not one probe on the allocator.
    let functions: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    assert!(functions.contains(&"ddheap:alloc") && functions.contains(&"ddheap:free"), "{label}: {functions:?}");
    assert!(functions.iter().all(|f| f.starts_with("ddheap:")), "{label}: allocator probed too: {functions:?}");
    assert_eq!(session.stats().source, "usdt:ddheap");
    // The kernel holds the semaphore for memscope's links.
    assert_eq!(fixture.count("attached"), 1, "{label}: semaphore not held");

    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert_eq!(p.source.as_deref(), Some("usdt:ddheap"));
    // The producer's interval, read from the service (it set 64 KiB).
    assert_eq!(p.sample_bytes, 64 * 1024, "{label}");
    // ~1,600 samples at the fixture's 64 KiB interval: 2.5% standard error.
    within(label, "keep_big live", site(&p, "keep_big").0, BIG, 0.12);
    within(label, "keep_big allocated", site(&p, "keep_big").1, BIG, 0.12);
    // ~150 samples: 8% standard error.
    within(label, "keep_small live", site(&p, "keep_small").0, SMALL, 0.4);
    // Every churned sample was freed, and its free seen.
    assert_eq!(site(&p, "churn").0, 0, "{label}: churn live");
    assert!(site(&p, "churn").1 > 0, "{label}: no churn sample");
    assert!(p.totals.frees > 20, "{label}: frees {}", p.totals.frees);
    assert_eq!(p.dropped.values().sum::<u64>(), 0, "{label}: {:?}", p.dropped);
    // Every output says where the figures come from.
    let json = render::json::leaks_json(&p, Some(10));
    assert_eq!(json["source"], "usdt:ddheap", "{label}");
    assert_eq!(json["live_tracking"], true);
    assert!(render::text::leak_report(&p, 5).contains("usdt:ddheap"));

    assert_eq!(fixture.ask("release"), "done");
    let p = session.snapshot(Duration::ZERO).unwrap();
    assert_eq!(site(&p, "keep_big").0, 0, "{label}: kept bytes still live after release");
    within(label, "keep_big allocated after release", site(&p, "keep_big").1, BIG, 0.12);

    // Detaching releases the semaphore: the service stops sampling.
    drop(session);
    wait_attached(&mut fixture, 0, label);
}

/// A library `dlopen`ed after memscope attached, with a sampler of its own: found as the
/// service maps it, its semaphore held (it starts sampling) and its kept bytes reported under
/// its function; released at the detach like the executable's.
#[test]
fn a_library_dlopened_after_the_attach_is_traced_through_its_probes() {
    require_root();
    let exe = usdt_service("system", &[]);
    let plugin = usdt_plugin("system");
    let mut fixture = Fixture::start(&exe, "serve");
    let session = Session::attach(fixture.pid, ProbeSettings::default()).unwrap();
    assert_eq!(session.source(), Some("usdt:ddheap"));
    assert_eq!(fixture.ask(&format!("plugin {}", plugin.display())), "done");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fixture.count("plugin_attached") != 1 {
        assert!(Instant::now() < deadline, "the plugin's semaphore is not held 30 s after its dlopen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fixture.ask("plugin_keep 1600"), "done");
    let p = session.snapshot(Duration::ZERO).unwrap();
    within("plugin", "plugin_keep_big live", site(&p, "plugin_keep_big").0, BIG, 0.12);
    assert_eq!(site(&p, "keep_big").0, 0, "the executable kept nothing");
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fixture.count("plugin_attached") != 0 {
        assert!(Instant::now() < deadline, "the plugin's semaphore still held 30 s after the detach");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `SampledAllocator<System>` with live-heap.
#[test]
fn system_allocator_service_is_traced_through_its_probes() {
    require_root();
    check_live_service(&usdt_service("system", &[]), "system");
}

/// `SampledAllocator<tikv_jemallocator::Jemalloc>`: jemalloc linked statically into the
/// executable (memscope would otherwise probe `_rjem_malloc`), traced through the contract.
#[test]
fn jemalloc_service_is_traced_through_its_probes() {
    require_root();
    check_live_service(&usdt_service("jemalloc", &["--features", "jemalloc"]), "jemalloc");
}

/// An alloc-only build (no `live-heap`: no `ddheap:free` note): allocation profiles, and every
/// output says live tracking is unavailable instead of listing every sample as a leak.
#[test]
fn alloc_only_service_has_allocation_profiles_only() {
    require_root();
    let exe = usdt_service("alloc-only", &["--no-default-features"]);
    let mut fixture = Fixture::start(&exe, "serve");
    let session = Session::attach(fixture.pid, ProbeSettings::default()).unwrap();
    assert_eq!(session.source(), Some("usdt:ddheap"));
    assert!(!session.live_tracking());
    assert_eq!(fixture.count("attached"), 1);
    fixture.go();
    let p = session.snapshot(Duration::ZERO).unwrap();
    within("alloc-only", "keep_big allocated", site(&p, "keep_big").1, BIG, 0.12);
    assert_eq!(p.totals.live_bytes, 0);
    assert!(p.leaks().is_empty());
    let json = render::json::leaks_json(&p, Some(10));
    assert_eq!(json["live_tracking"], false);
    assert!(render::text::leak_report(&p, 5).contains("live tracking unavailable"));
    assert_eq!(session.stats().live_bytes, 0);
}

/// `--source allocator` traces a contract service through its allocator as before: the
/// semaphore is left alone (the service never samples) and the allocator is probed.
#[test]
fn source_allocator_ignores_the_contract() {
    require_root();
    let exe = usdt_service("system", &[]);
    let mut fixture = Fixture::start(&exe, "serve");
    let settings = ProbeSettings { source: SourceMode::Allocator, ..Default::default() };
    let session = Session::attach(fixture.pid, settings).unwrap();
    assert_eq!(session.source(), None);
    let functions: Vec<&str> = session.probe_sites().iter().map(|s| s.function.as_str()).collect();
    // Its `#[global_allocator]` is not a family memscope knows: probed at Rust's shims.
    assert!(functions.contains(&"__rust_alloc"), "{functions:?}");
    assert!(functions.iter().all(|f| !f.starts_with("ddheap:")), "{functions:?}");
    assert_eq!(fixture.count("attached"), 0);
    assert_eq!(session.stats().source, "allocator");
}

/// `--source usdt` refuses a process without the contract in one line that says where it
/// looked.
#[test]
fn source_usdt_refuses_a_process_without_the_contract() {
    require_root();
    let exe = common::alloc_fixture();
    let fixture = Fixture::start(&exe, "basic");
    let settings = ProbeSettings { source: SourceMode::Usdt, ..Default::default() };
    let err = Session::attach(fixture.pid, settings).err().expect("attached without the contract");
    let text = format!("{err:#}");
    assert!(text.contains("no USDT heap-sampling contract"), "{text}");
}

fn http_get(url: &str, path: &str) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent
        .get(format!("{url}{path}"))
        .header("Authorization", format!("Bearer {}", common::agent::READ))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// The agent: a selector with `usdt=ddheap` picks the contract service up by itself,
/// `/v1/targets` says its source, its leaks JSON carries the source and the kept bytes, and
/// the service samples while the agent traces it.
#[test]
fn agent_selects_and_traces_a_contract_service() {
    use common::agent::{data_dir, standard_tokens, start_agent};
    require_root();
    let exe = usdt_service("system", &[]);
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    // Its own fixture only (other tests run meanwhile); the usdt= term reads its notes.
    let select = format!("exe={},usdt=ddheap", exe.display());
    let data = data_dir(dir.path());
    let agent = start_agent(&["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data, "--select", &select])
        .unwrap();
    let mut fixture = Fixture::start(&exe, "serve");
    let pid = fixture.pid;
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let (_, v) = http_get(&agent.url, "/v1/targets");
        let found = v["targets"].as_array().and_then(|ts| ts.iter().find(|t| t["pid"] == pid).cloned());
        if let Some(t) = found {
            break t;
        }
        assert!(Instant::now() < deadline, "the agent did not attach to {pid}: {v:#}");
        // Under the token's 5 requests a second: a slow attach must not leave the next
        // request rate-limited.
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(row["source"], "usdt:ddheap", "{row:#}");
    wait_attached(&mut fixture, 1, "agent");
    fixture.go();
    let (status, leaks) = http_get(&agent.url, &format!("/v1/targets/{pid}/leaks?min_age=0s"));
    assert_eq!(status, 200, "{leaks}");
    assert_eq!(leaks["source"], "usdt:ddheap");
    assert_eq!(leaks["live_tracking"], true);
    let live = leaks["totals"]["live_bytes"].as_u64().unwrap();
    assert!(live as f64 > BIG as f64 * 0.85, "live bytes {live}");
}
