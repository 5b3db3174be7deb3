//! Store faults under the real agent: its data directory is a small tmpfs in a private mount
//! namespace (`unshare -m`), so the test can fill it and remount it read-only while the agent
//! serves a traced fixture. Every failed write is a JSON error (507 full, 503 read-only),
//! nothing stored before is lost or damaged, no temp file is left, and the store recovers once
//! space is back. (SIGKILL mid-write is `store::crash_tests` in the library.) Needs root.
mod common;

use std::{path::Path, process::Command};

use common::{
    agent::{memscope, standard_tokens, start_agent_command, Agent, ADMIN, READ},
    alloc_fixture, require_root, Fixture,
};
use serde_json::Value;

/// `(status, body as JSON or Null)` of one request with curl.
fn http(method: &str, url: &str, token: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "30", "-X", method, "-H", &format!("Authorization: Bearer {token}"), "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = c.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn snapshot(agent: &Agent, pid: u32) -> (u16, Value) {
    http("POST", &format!("{}/v1/targets/{pid}/snapshots", agent.url), ADMIN, None)
}

/// Every listed snapshot reads back whole; returns their ids.
fn all_readable(agent: &Agent) -> Vec<String> {
    let (code, list) = http("GET", &format!("{}/v1/snapshots", agent.url), READ, None);
    assert_eq!(code, 200, "{list}");
    let ids: Vec<String> = list["snapshots"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    for id in &ids {
        let (code, body) = http("GET", &format!("{}/v1/snapshots/{id}", agent.url), READ, None);
        assert_eq!(code, 200, "snapshot {id}: {body}");
        assert!(body["totals"].is_object() || body["leaks"].is_array() || body.is_object(), "snapshot {id}: {body}");
    }
    ids
}

fn temp_files(data: &Path) -> usize {
    std::fs::read_dir(data).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-")).count()
}

/// The data directory fills up, then turns read-only, then gets space back.
#[test]
fn full_and_read_only_data_dir() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let memscope = memscope();
    let mut cmd = Command::new("unshare");
    cmd.envs(memscope.get_envs().filter_map(|(k, v)| v.map(|v| (k, v)))).env_remove("MEMSCOPE_TOKEN");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!(
        "mount -t tmpfs -o size=96k,mode=0700 tmpfs {data} && exec {exe} agent --tokens {tokens} --listen 127.0.0.1:0 \
         --data-dir {data} --sampling full --retain-count 1000 --retain-bytes 1GiB --rate-limit 500",
        data = data.display(),
        exe = env!("CARGO_BIN_EXE_memscope"),
        tokens = tokens.display(),
    ));
    let agent = start_agent_command(cmd).unwrap();
    // The agent's view of its data directory (the tmpfs is in its namespace only).
    let agent_data = Path::new(&format!("/proc/{}/root", agent.pid())).join(data.strip_prefix("/").unwrap());

    let mut fixture = Fixture::start(&alloc_fixture(), "basic");
    let (code, body) = http("POST", &format!("{}/v1/targets", agent.url), ADMIN, Some(&format!("{{\"pid\": {}}}", fixture.pid)));
    assert!(code == 200 || code == 201, "attach: {code} {body}");
    fixture.go();

    // Fill it.
    let mut stored = 0;
    let full = loop {
        let (code, body) = snapshot(&agent, fixture.pid);
        match code {
            200 | 201 => stored += 1,
            _ => break (code, body),
        }
        assert!(stored < 200, "96 KiB never filled up");
    };
    assert!(stored >= 2, "only {stored} snapshots fit");
    assert_eq!(full.0, 507, "{}", full.1);
    assert_eq!(full.1["code"], "storage_full", "{}", full.1);
    assert!(full.1["error"].as_str().unwrap().contains("earlier snapshots are kept"));
    assert_eq!(snapshot(&agent, fixture.pid).0, 507, "a second try on a full disk");
    let kept = all_readable(&agent);
    assert_eq!(kept.len(), stored, "snapshots lost on a full disk");
    assert_eq!(temp_files(&agent_data), 0, "a temp file left after ENOSPC");

    // Read-only.
    let remount = |opts: &str| {
        let st = Command::new("nsenter")
            .args(["-t", &agent.pid().to_string(), "-m", "mount", "-o", &format!("remount,{opts}")])
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success(), "remount {opts}");
    };
    remount("ro");
    let (code, body) = snapshot(&agent, fixture.pid);
    assert_eq!((code, body["code"].as_str()), (503, Some("storage_read_only")), "{body}");
    let (code, body) = http("DELETE", &format!("{}/v1/snapshots/{}", agent.url, kept[0]), ADMIN, None);
    assert_eq!((code, body["code"].as_str()), (503, Some("storage_read_only")), "{body}");
    assert_eq!(all_readable(&agent), kept, "snapshots changed on a read-only disk");

    // Space back: deleting one makes room for a new one.
    remount("rw");
    let (code, body) = http("DELETE", &format!("{}/v1/snapshots/{}", agent.url, kept[0]), ADMIN, None);
    assert!(code == 200 || code == 204, "{code} {body}");
    let (code, body) = snapshot(&agent, fixture.pid);
    assert!(code == 200 || code == 201, "after freeing space: {code} {body}");
    assert_eq!(all_readable(&agent).len(), kept.len());
}

/// Adding a selector when the data directory is full answers 507 `storage_full` (it is
/// persisted there), nothing is added and no temp file is left; with space back it succeeds.
#[test]
fn selector_on_a_full_data_dir_is_507() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let tokens = standard_tokens(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.envs(memscope().get_envs().filter_map(|(k, v)| v.map(|v| (k, v)))).env_remove("MEMSCOPE_TOKEN");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!(
        "mount -t tmpfs -o size=64k,mode=0700 tmpfs {data} && exec {exe} agent --tokens {tokens} --listen 127.0.0.1:0 \
         --data-dir {data} --rate-limit 500",
        data = data.display(),
        exe = env!("CARGO_BIN_EXE_memscope"),
        tokens = tokens.display(),
    ));
    let agent = start_agent_command(cmd).unwrap();
    let agent_data = Path::new(&format!("/proc/{}/root", agent.pid())).join(data.strip_prefix("/").unwrap());
    // Fill the tmpfs to its last byte.
    let filler = agent_data.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0]);
        let _ = f.sync_all();
    }
    let url = format!("{}/v1/selectors", agent.url);
    let body = r#"{"select": "exe=/nonexistent/memscope-507-test"}"#;
    let (code, answer) = http("POST", &url, ADMIN, Some(body));
    assert_eq!((code, answer["code"].as_str()), (507, Some("storage_full")), "{answer}");
    let (code, list) = http("GET", &url, READ, None);
    assert_eq!(code, 200, "{list}");
    assert!(!list.to_string().contains("memscope-507-test"), "a selector not saved is listed: {list}");
    let leftovers: Vec<_> = std::fs::read_dir(&agent_data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    std::fs::remove_file(&filler).unwrap();
    let (code, answer) = http("POST", &url, ADMIN, Some(body));
    assert_eq!(code, 201, "{answer}");
}
