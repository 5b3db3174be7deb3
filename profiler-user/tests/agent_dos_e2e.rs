//! Hostile clients against the real agent binary: slowloris (slowhttptest sending headers a
//! line every 10 s on 1,000 connections from 127.0.0.1) while another client, bound to
//! 127.0.0.2 (curl --interface), must still get `/healthz` under 100 ms and an authorized read
//! route under 500 ms. Needs `slowhttptest` and `curl` (`cargo xtask setup` installs them).
mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::agent::{data_dir, standard_tokens, start_agent, READ};

/// `(HTTP status, seconds)` of one GET from 127.0.0.2.
fn probe(url: &str, token: Option<&str>) -> (u16, f64) {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-m", "5", "--interface", "127.0.0.2", "-w", "%{http_code} %{time_total}"]);
    if let Some(t) = token {
        c.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = c.arg(url).output().expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (code, secs) = text.split_once(' ').unwrap_or(("0", "99"));
    (code.parse().unwrap_or(0), secs.trim().parse().unwrap_or(99.0))
}

fn metric(url: &str, name: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "--interface", "127.0.0.2", "-H", &format!("Authorization: Bearer {READ}"), &format!("{url}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Under a slowloris attack from one address, clients from another address get answers
/// within the stated limits, and the refused connections are counted.
#[test]
fn slowloris_from_one_address_does_not_starve_others() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let agent = start_agent(&["--tokens", tokens.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", &data_dir(dir.path())])
        .unwrap();
    let url = agent.url.trim_end_matches('/').to_string();
    // The same URL from 127.0.0.2 (the agent listens on 127.0.0.1 only: connect there, from .2).
    assert_eq!(probe(&format!("{url}/healthz"), None).0, 200);

    let mut attack = Command::new("slowhttptest")
        .args(["-H", "-c", "1000", "-i", "10", "-r", "200", "-l", "30", "-u", &format!("{url}/v1/targets")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running slowhttptest (`cargo xtask setup` installs it)");
    // 1,000 connections at 200 per second: all open after 5 s.
    std::thread::sleep(Duration::from_secs(6));
    assert!(attack.try_wait().unwrap().is_none(), "slowhttptest ended early");

    let (mut health, mut read) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for _ in 0..10 {
        let (code, secs) = probe(&format!("{url}/healthz"), None);
        assert_eq!(code, 200, "/healthz during the attack");
        health.push(secs);
        let (code, secs) = probe(&format!("{url}/v1/targets"), Some(READ));
        assert_eq!(code, 200, "/v1/targets during the attack");
        read.push(secs);
        std::thread::sleep(Duration::from_millis(300));
    }
    let refused = metric(&url, "memscope_http_refused_total{limit=\"connections_per_address\"}");
    assert!(attack.try_wait().unwrap().is_none(), "slowhttptest ended during the probes");
    let _ = attack.kill();
    let _ = attack.wait();
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "during slowloris ({:.1} s of probes): /healthz max {:.1} ms, /v1/targets max {:.1} ms, {refused} connections refused",
        started.elapsed().as_secs_f64(),
        max(&health) * 1e3,
        max(&read) * 1e3
    );
    assert!(refused > 100.0, "the attack did not reach the per-address cap ({refused} refused)");
    assert!(max(&health) < 0.100, "/healthz took {:?} s", health);
    assert!(max(&read) < 0.500, "/v1/targets took {:?} s", read);
}
