//! End-to-end tests of the maintenance endpoint with real tracing behind it: the real agent
//! binary on loopback with a token file and TLS (a self-signed certificate made by the test),
//! attached through the API to fixture processes of known ground truth, queried with the
//! `memscope` client. Need root (eBPF); CI runs them as root.
mod common;

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use common::{agent::*, alloc_fixture, require_root, Fixture};
use serde_json::Value;

fn parse_svg(svg: &str) {
    let opts = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(svg, opts).expect("SVG is well-formed XML");
}

fn tls_files(dir: &Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// Runs a client command that must succeed; returns its stdout.
fn ok(agent: &Agent, token: &str, cert: &str, args: &[&str]) -> String {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--ca-cert", cert]);
    let (status, stdout, stderr) = client(&agent.url, Some(token), &full);
    assert!(status.success(), "memscope {args:?} failed: {stderr}");
    stdout
}

/// Bytes and allocations leaked from call sites in `function`.
fn leaked_in(leaks: &Value, function: &str) -> (u64, u64) {
    leaks["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["frames"][0]["function"] == function)
        .fold((0, 0), |(b, n), l| (b + l["bytes"].as_u64().unwrap(), n + l["allocs"].as_u64().unwrap()))
}

/// Over TLS with tokens: attach a fixture through the API, get its exact leaks, a flamegraph
/// naming a fixture function, a pprof that decodes; take two snapshots around a growth and
/// diff them; restart the agent and find the snapshots again.
#[test]
fn agent_serves_a_traced_process_over_tls() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let (cert, key) = tls_files(dir.path());
    let data = data_dir(dir.path());
    let args = [
        "--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data,
        "--tls-cert", &cert, "--tls-key", &key, "--sampling", "full",
    ];
    let agent = start_agent(&args).unwrap();
    assert!(agent.url.starts_with("https://"));

    let mut fixture = Fixture::start(&alloc_fixture(), "basic");
    let pid = fixture.pid.to_string();
    // A read token may not attach.
    let (status, _, stderr) = client(&agent.url, Some(READ), &["targets", "--attach", &pid, "--ca-cert", &cert]);
    assert!(!status.success() && stderr.contains("admin"), "{stderr}");
    let targets: Value = serde_json::from_str(&ok(&agent, ADMIN, &cert, &["targets", "--attach", &pid])).unwrap();
    // This kernel (6.18) has uprobe.session.
    assert_eq!(targets["targets"][0]["probe_mode"], "session", "{targets:#}");
    fixture.go();

    let leaks: Value = serde_json::from_str(&ok(&agent, READ, &cert, &["leaks", &pid, "--min-age", "0s", "--json"])).unwrap();
    assert_eq!(leaked_in(&leaks, "leak_fixed"), (7000, 7), "{leaks:#}");
    assert_eq!(leaked_in(&leaks, "leak_big"), (2 << 20, 2));
    assert_eq!(leaks["totals"]["allocs"], 1022);

    let svg_path = dir.path().join("heap.svg");
    ok(&agent, READ, &cert, &["flamegraph", &pid, "-o", svg_path.to_str().unwrap()]);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    parse_svg(&svg);
    assert!(svg.contains("leak_calloc"));

    let pb_path = dir.path().join("heap.pb.gz");
    ok(&agent, READ, &cert, &["heap", &pid, "--format", "pprof", "-o", pb_path.to_str().unwrap()]);
    let pprof = profiler_user::render::pprof::decode_pprof_gz(&std::fs::read(&pb_path).unwrap()).unwrap();
    assert!(pprof.string_table.iter().any(|s| s == "leak_realloc"));
    assert!(pprof.string_table.iter().any(|s| s == "inuse_space"));

    // Two snapshots around a growth of a second, growing fixture.
    let mut grower = Fixture::start(&alloc_fixture(), "grow");
    let gpid = grower.pid.to_string();
    ok(&agent, ADMIN, &cert, &["targets", "--attach", &gpid]);
    grower.go();
    let take = |agent: &Agent| -> String {
        let v: Value = serde_json::from_str(&ok(agent, ADMIN, &cert, &["snapshot", "take", &gpid, "--json"])).unwrap();
        v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
    };
    let a = take(&agent);
    std::thread::sleep(Duration::from_millis(500));
    let b = take(&agent);
    let diff: Value = serde_json::from_str(&ok(&agent, READ, &cert, &["diff", &a, &b, "--format", "json"])).unwrap();
    let growth: i64 = diff["stacks"]
        .as_array()
        .unwrap_or_else(|| panic!("no stacks in {diff}"))
        .iter()
        .filter(|s| s["frames"][0]["function"] == "leak_fixed")
        .map(|s| s["growth_bytes"].as_i64().unwrap())
        .sum();
    assert!(growth >= 7000 * 10, "leak_fixed grew by {growth} in 0.5 s: {diff:#}");
    let diff_svg = dir.path().join("diff.svg");
    ok(&agent, READ, &cert, &["diff", &a, &b, "--format", "svg", "-o", diff_svg.to_str().unwrap()]);
    parse_svg(&std::fs::read_to_string(&diff_svg).unwrap());

    // Triggers through the client: a read token may list but not add; add, see it fire, delete.
    let (status, _, stderr) = client(&agent.url, Some(READ), &["triggers", "add", &gpid, "every=150ms", "--ca-cert", &cert]);
    assert!(!status.success() && stderr.contains("admin"), "{stderr}");
    let added: Value = serde_json::from_str(&ok(
        &agent,
        ADMIN,
        &cert,
        &["triggers", "add", &gpid, "every=150ms", "--min-spacing", "100ms", "--json"],
    ))
    .unwrap();
    let id = added["ids"][0].as_u64().unwrap_or_else(|| panic!("no id in {added}")).to_string();
    std::thread::sleep(Duration::from_millis(700));
    let list: Value = serde_json::from_str(&ok(&agent, READ, &cert, &["triggers", "list", &gpid, "--json"])).unwrap();
    let fired = list["triggers"].as_array().and_then(|t| t.first()).map(|t| t["fired"].as_u64().unwrap_or(0));
    assert!(fired >= Some(2), "{list:#}");
    ok(&agent, ADMIN, &cert, &["triggers", "delete", &gpid, &id]);
    let list: Value = serde_json::from_str(&ok(&agent, READ, &cert, &["triggers", "list", &gpid, "--json"])).unwrap();
    assert_eq!(list["triggers"].as_array().map(Vec::len), Some(0), "{list:#}");

    // The snapshots survive a restart of the agent.
    drop(agent);
    let agent = start_agent(&args).unwrap();
    let list = ok(&agent, READ, &cert, &["snapshot", "list", "--json"]);
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    drop(grower);
    fixture.finish();
}

/// A flood of requests gets 429s (with Retry-After) at once, while /healthz keeps answering
/// quickly.
#[test]
fn flood_gets_429_while_healthz_answers() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let data = data_dir(dir.path());
    let agent = start_agent(&[
        "--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data,
        "--rate-limit", "2",
    ])
    .unwrap();
    let addr = agent.url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let get = |path: &str, token: Option<&str>| -> String {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| (0..10).map(|_| get("/v1/targets", Some(READ))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let limited: Vec<&String> = answers.iter().filter(|a| a.starts_with("HTTP/1.1 429")).collect();
    assert!(!limited.is_empty(), "no 429 among {} answers", answers.len());
    assert!(limited[0].to_ascii_lowercase().contains("retry-after:"), "{}", limited[0]);
    assert!(limited[0].contains("\"code\""), "{}", limited[0]);
    let t = Instant::now();
    let health = get("/healthz", None);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(t.elapsed() < Duration::from_secs(1), "healthz took {:?}", t.elapsed());
}
