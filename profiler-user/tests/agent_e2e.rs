//! End-to-end tests of `memscope agent` and the client commands, run as a user runs them: the
//! real binary, on loopback, without tracing anything (no `--pid`, no attach), so they need
//! neither root nor eBPF. They cover the start-up refusals, TLS with a self-signed certificate
//! made by the test, the client's one-line errors, SIGHUP reload and SIGTERM.
//!
//! The end-to-end tests with a traced fixture behind the agent are in agent_traced_e2e.rs.
mod common;

use common::agent::*;
use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

/// A token file that group or others may read is refused, in one line that does not show the
/// token; so is a missing --tokens.
#[test]
fn refuses_readable_or_missing_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), &format!("ops admin {ADMIN}\n"), 0o644);
    let err = start_agent(&["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path())])
        .err()
        .expect("the agent started with a 0644 token file");
    assert!(err.contains("mode 0644") && err.contains("chmod 600"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains(ADMIN));

    let err = start_agent(&["--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path())])
        .err()
        .expect("the agent started without --tokens");
    assert!(err.contains("--tokens"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing is created before the checks pass");
}

/// Tokens are never accepted on the command line.
#[test]
fn no_token_flag_exists() {
    let (status, _, stderr) = run({
        let mut c = memscope();
        c.args(["agent", "--token", ADMIN]);
        c
    });
    assert!(!status.success());
    assert!(stderr.contains("unexpected argument"), "{stderr}");
}

/// A non-loopback address without TLS is refused; with --allow-insecure-remote the agent
/// starts and warns, at start and in /readyz.
#[test]
fn remote_address_needs_tls_or_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let t = tokens.to_str().unwrap();
    let data = data_dir(dir.path());
    let err = start_agent(&["--tokens", t, "--listen", "0.0.0.0:0", "--data-dir", &data]).err().expect("started");
    assert!(err.contains("without TLS") && err.contains("--tls-cert"), "{err}");

    let agent =
        start_agent(&["--tokens", t, "--listen", "0.0.0.0:0", "--data-dir", &data, "--allow-insecure-remote"]).unwrap();
    let port = agent.url.rsplit(':').next().unwrap().to_owned();
    let local = format!("http://127.0.0.1:{port}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(agent.log().iter().any(|l| l.contains("without TLS")), "no warning at start");
    let (status, stdout, stderr) = client(&local, Some(READ), &["targets", "--json"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("\"targets\""), "{stdout}");
    let readyz = raw_http_get(&format!("127.0.0.1:{port}"), "/readyz");
    assert!(readyz.contains("200 OK") && readyz.contains("without TLS"), "{readyz}");
}

/// A plain HTTP/1.1 GET over TCP (for the unauthenticated health routes).
fn raw_http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// TLS with a self-signed certificate: the client trusts it with --ca-cert, fails clearly
/// without it, and plain HTTP to the TLS port fails.
#[test]
fn tls_with_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let agent = start_agent(&[
        "--tokens",
        tokens.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir(dir.path()),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .unwrap();
    assert!(agent.url.starts_with("https://127.0.0.1:"), "{}", agent.url);

    let (status, stdout, stderr) =
        client(&agent.url, Some(READ), &["targets", "--json", "--ca-cert", cert.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("\"targets\""), "{stdout}");
    let (status, _, stderr) = client(&agent.url, Some(READ), &["snapshot", "list", "--ca-cert", cert.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");

    let (status, _, stderr) = client(&agent.url, Some(READ), &["targets"]);
    assert!(!status.success());
    assert!(stderr.contains("TLS") && stderr.contains("--ca-cert"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let plain = agent.url.replace("https://", "http://");
    let (status, _, stderr) = client(&plain, Some(READ), &["targets"]);
    assert!(!status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // A client that connects and never starts the handshake does not block others.
    let _idle = std::net::TcpStream::connect(agent.url.trim_start_matches("https://")).unwrap();
    let (status, _, stderr) = client(&agent.url, Some(READ), &["targets", "--ca-cert", cert.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
}

/// The client's errors are one line each: unreachable agent, no token, wrong token, read
/// token on an admin action, unknown snapshot.
#[test]
fn client_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let agent =
        start_agent(&["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path())])
            .unwrap();
    let cases: [(Option<&str>, &[&str], &str); 5] = [
        (None, &["targets"], "MEMSCOPE_TOKEN"),
        (Some("wrong-token-0123456789abc"), &["targets"], "refused the token"),
        (Some(READ), &["targets", "--attach", "1"], "admin token"),
        (Some(READ), &["snapshot", "get", "20261124T160501Z-1-1"], "snapshot_not_found"),
        (Some(READ), &["diff", "../../etc", "20261124T160501Z-1-1"], "not a snapshot id"),
    ];
    for (token, args, needle) in cases {
        let (status, _, stderr) = client(&agent.url, token, args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains(READ) && !stderr.contains("wrong-token"), "token echoed: {stderr}");
    }
    // An address where nothing listens (the agent's port, after it stopped).
    let url = agent.url.clone();
    drop(agent);
    let (status, _, stderr) = client(&url, Some(READ), &["targets"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
}

/// SIGHUP re-reads the token file: the new token works, the old one is refused; an invalid
/// new file keeps the previous tokens. SIGTERM then stops the agent cleanly.
#[test]
fn sighup_reloads_tokens_and_sigterm_stops() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let mut agent =
        start_agent(&["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path())])
            .unwrap();
    assert!(client(&agent.url, Some(READ), &["targets"]).0.success());

    let fresh = "e2e-fresh-token-0123456789";
    token_file(dir.path(), &format!("fresh read {fresh}\n"), 0o600);
    // SAFETY: signalling a child this test started and still owns.
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client(&agent.url, Some(fresh), &["targets"]).0.code() != Some(0) {
        assert!(Instant::now() < deadline, "the new token was not accepted after SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(client(&agent.url, Some(READ), &["targets"]).0.code(), Some(1));

    token_file(dir.path(), "broken\n", 0o600);
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(client(&agent.url, Some(fresh), &["targets"]).0.success(), "an invalid file replaced the tokens");
    let log = agent.log().join("\n");
    assert!(log.contains("reload refused"), "{log}");
    assert!(!log.contains(fresh) && !log.contains(READ), "a token reached the log:\n{log}");

    unsafe { libc::kill(agent.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
