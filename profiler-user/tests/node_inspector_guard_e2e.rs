//! The Node.js inspector is memscope's alone while it holds it (issue 17, item 3), end to end
//! with the real eBPF guard and real node: the guard's programs refuse every other socket on a
//! guarded port (every local address form) and let memscope's through; an unprivileged
//! squatter polling both loopback addresses during a summary gets nothing while the summary
//! succeeds; a target listening on [::1] beside an impostor on 127.0.0.1 is reached on [::1]
//! and the impostor never; a target whose inspector would listen on 0.0.0.0 is refused before
//! any signal; after each operation the guard is gone. Needs root, node and setpriv.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    node::{alive, host_netns_turn, in_own_netns, node_js_heap, script, summary_of_pid},
    require_root,
};

use profiler_user::v8::{
    self,
    guard::{self, Guard},
    inspector::{self, own_listener_sockets, own_listeners},
};

/// The tests of this file check that the guard is detached after them: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `node` run by `setpriv` as user `nobody` (group `nogroup`, no supplementary groups).
fn node_as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "node"]);
    c
}

/// `nobody` connecting to 127.0.0.1:`port` from node: prints `connected` or the error's code.
fn nobody_connects(port: u16) -> std::process::Output {
    node_as_nobody()
        .arg("-e")
        .arg(format!("require('net').connect({port}, '127.0.0.1').on('connect', () => {{ console.log('connected'); process.exit(0) }}).on('error', e => {{ console.log(e.code); process.exit(0) }})"))
        .output()
        .unwrap()
}

/// What a connect from a socket memscope did not register gives.
fn connect_result(addr: SocketAddr) -> Result<(), std::io::ErrorKind> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(drop)
        .map_err(|e| e.kind())
}

/// `sendto(MSG_FASTOPEN)` of a few bytes to `addr` (IPv4) from a new socket.
fn fast_open(addr: SocketAddr) -> Result<(), std::io::ErrorKind> {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let msg = b"GET /json/list HTTP/1.0\r\n\r\n";
        let r = libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_FASTOPEN,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            Err(e.kind())
        } else {
            Ok(())
        }
    }
}

/// The guard's programs, without node: while a port is guarded, a socket memscope did not
/// register is refused with EPERM on every local address form (127.0.0.1, 127.0.0.2, 0.0.0.0,
/// ::1, ::, ::ffff:127.0.0.1), a registered one connects, another port is untouched; after the
/// guard is dropped the programs are detached and everyone connects again.
#[test]
fn guard_refuses_every_other_socket_until_dropped() {
    require_root();
    let _serial = serial();
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = v4.local_addr().unwrap().port();
    let v6 = TcpListener::bind(("::1", port)).unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let cookie = inspector::netns_cookie(std::process::id()).unwrap();
    let addrs: Vec<SocketAddr> = [
        "127.0.0.1",
        "127.0.0.2",
        "0.0.0.0",
        "::1",
        "::",
        "::ffff:127.0.0.1",
    ]
    .iter()
    .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
    .collect();
    // Wildcard and 127.0.0.2 need a listener that accepts them: bind them where the kernel lets us.
    let _any4 = TcpListener::bind(("127.0.0.2", port)).ok();

    let guard = Guard::install(cookie, port).unwrap();
    assert!(guard::attached());
    for a in &addrs {
        assert_eq!(
            connect_result(*a),
            Err(std::io::ErrorKind::PermissionDenied),
            "{a} was not refused"
        );
    }
    assert_eq!(
        connect_result(other.local_addr().unwrap()),
        Ok(()),
        "another port was refused"
    );
    // TCP fast open (connect and data in one sendto) goes through the same hook.
    assert_eq!(
        fast_open(addrs[0]),
        Err(std::io::ErrorKind::PermissionDenied),
        "a TCP fast open connect was not refused"
    );
    // Another user's process (not only another socket of this one).
    let out = nobody_connects(port);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "EPERM",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second guard of the same key (a window that would not close keeps its own): dropping
    // one keeps the key guarded.
    let second = Guard::install(cookie, port).unwrap();
    drop(second);
    assert_eq!(
        connect_result(addrs[0]),
        Err(std::io::ErrorKind::PermissionDenied),
        "dropping one of two guards of a key unguarded it"
    );
    drop(guard);
    assert!(!guard::attached());
    for a in &addrs[..2] {
        assert_eq!(
            connect_result(*a),
            Ok(()),
            "{a} refused after the guard was dropped"
        );
    }
    assert_eq!(connect_result(addrs[3]), Ok(()));
    drop((v4, v6));
}

/// The node squatter run as `nobody`: polls 127.0.0.1:PORT and [::1]:PORT `/json/list` in a
/// tight loop until its stdin closes (or 90 s), then prints what it got as JSON.
const SQUATTER: &str = r#"
const net = require('net');
const port = +process.argv[1];
const st = { connected: 0, json: 0, eperm: 0, refused: 0, other: 0 };
let stop = false;
process.stdin.on('data', () => {}).on('end', () => { stop = true; });
setTimeout(() => { stop = true; }, 90000).unref();
function once(host) {
  return new Promise(res => {
    const s = net.connect({ host, port });
    let buf = '';
    const done = () => { s.destroy(); res(); };
    s.setTimeout(1000, done);
    s.on('connect', () => {
      st.connected++;
      s.write(`GET /json/list HTTP/1.0\r\nHost: ${host.includes(':') ? '[' + host + ']' : host}:${port}\r\n\r\n`);
    });
    s.on('data', d => { buf += d; if (buf.includes('webSocketDebuggerUrl')) { st.json++; done(); } });
    s.on('error', e => { if (e.code === 'EPERM') st.eperm++; else if (e.code === 'ECONNREFUSED') st.refused++; else st.other++; done(); });
    s.on('close', res);
  });
}
(async () => {
  console.log('polling');
  while (!stop) { await once('127.0.0.1'); await once('::1'); }
  console.log(JSON.stringify(st));
  process.exit(0);
})();
"#;

/// An unprivileged process (`nobody`) polling both loopback addresses' `/json/list` on 9229
/// during two summaries of a node target gets no connection and no JSON (its connects are
/// refused with EPERM while the window is open), while the summaries succeed; afterwards the
/// guard is detached, the target listens on no port, and a plain listener on 9229 is reachable
/// from another process again.
#[test]
fn squatter_gets_nothing_during_a_summary() {
    require_root();
    let _serial = serial();
    let _turn = host_netns_turn();
    let mut node = node_js_heap();
    assert_eq!(node.ask("grow 300"), "grown 300");
    let mut squatter = node_as_nobody()
        .args(["-e", SQUATTER, "9229"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = squatter.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the squatter did not start"),
        "polling"
    );
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..2 {
        let s = summary_of_pid(node.pid, false, "guard-test").unwrap_or_else(|e| panic!("summary {i}: {e}"));
        assert!(s.get("LeakyRecord").unwrap().count >= 300);
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(squatter.stdin.take());
    let stats = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the squatter did not report");
    let deadline = Instant::now() + Duration::from_secs(10);
    while squatter.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = squatter.kill();
    let _ = squatter.wait();
    let v: serde_json::Value =
        serde_json::from_str(&stats).unwrap_or_else(|_| panic!("squatter said {stats:?}"));
    eprintln!("squatter: {v}");
    assert_eq!(v["connected"], 0, "the squatter connected: {v}");
    assert_eq!(v["json"], 0, "the squatter read /json/list: {v}");
    assert!(
        v["eperm"].as_u64().unwrap() > 0,
        "the squatter never ran into the guard (did it poll during the window?): {v}"
    );

    // The guard is gone: nothing attached, and a plain listener on 9229 is reachable by others.
    assert!(!guard::attached());
    assert!(alive(node.pid));
    assert_eq!(own_listeners(node.pid), Vec::<u16>::new());
    let plain = TcpListener::bind("127.0.0.1:9229").unwrap();
    let out = nobody_connects(9229);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "connected",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(plain);
}

/// The impostor: listens on 127.0.0.1:9229 in the target's namespace and logs every connection
/// to a file (answering like an inspector would, so that talking to it would "work"); it ends
/// when the target (its parent: `sh` exec'd into node) does.
fn impostor(log: &std::path::Path) -> String {
    format!(
        "node -e \"require('net').createServer(c => {{ require('fs').appendFileSync('{}', 'connection\\n'); c.end('HTTP/1.0 200 OK\\r\\n\\r\\n[]') }}).listen(9229, '127.0.0.1'); const p = process.ppid; setInterval(() => {{ if (process.ppid !== p) process.exit(0) }}, 200); setTimeout(() => process.exit(0), 120000)\" </dev/null >/dev/null 2>&1 & sleep 1; ",
        log.display()
    )
}

/// In a network namespace of its own: node's inspector on [::1]:9229 (`--inspect-port`), an
/// impostor on 127.0.0.1:9229. The summary succeeds, through node's own [::1] listener: the
/// impostor sees no connection. A node whose inspector would listen on 0.0.0.0 is refused
/// before any signal (no listener appears) and stays alive.
#[test]
fn ipv6_inspector_beside_an_ipv4_impostor() {
    require_root();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("impostor.log");
    std::fs::write(&log, "").unwrap();
    let mut node = in_own_netns(&format!(
        "{}exec node --inspect-port=[::1]:9229 {}",
        impostor(&log),
        script("node_js_heap.js").display()
    ));
    assert_eq!(node.ask("grow 200"), "grown 200");
    let s = summary_of_pid(node.pid, false, "impostor-test").unwrap();
    assert!(s.get("LeakyRecord").unwrap().count >= 200);
    let mut seen = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    assert_eq!(
        seen, "",
        "memscope talked to the impostor on 127.0.0.1:9229"
    );
    assert!(
        own_listener_sockets(node.pid).is_empty(),
        "{:?}",
        own_listener_sockets(node.pid)
    );
    assert!(!guard::attached());
    drop(node);

    let node = in_own_netns(&format!(
        "exec node --inspect-port=0.0.0.0:9229 {}",
        script("node_js_heap.js").display()
    ));
    let err = summary_of_pid(node.pid, false, "wildcard-test").unwrap_err();
    assert!(matches!(err, v8::V8Error::Unguardable { .. }), "{err}");
    assert!(err.to_string().contains("0.0.0.0"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        own_listener_sockets(node.pid).is_empty(),
        "the refused target listens: {:?}",
        own_listener_sockets(node.pid)
    );
    assert!(alive(node.pid));
    assert!(!guard::attached());
}

/// Not a check, a measurement (run with `--ignored --nocapture`): what putting the guard in
/// place costs (the first time: load, verify and attach; later: attach), and what a loopback
/// connect on the host costs while the programs are attached (to an unguarded port: every
/// connect of the host pays this during a window) against none attached.
#[test]
#[ignore]
fn guard_costs() {
    require_root();
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c)
        }
    });
    let cookie = inspector::netns_cookie(std::process::id()).unwrap();
    let connects = |n: u32| {
        let t = Instant::now();
        for _ in 0..n {
            drop(TcpStream::connect(target).unwrap());
        }
        t.elapsed() / n
    };
    let t = Instant::now();
    let g = Guard::install(cookie, 1).unwrap();
    let first = t.elapsed();
    drop(g);
    let mut later = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let g = Guard::install(cookie, 1).unwrap();
        later.push(t.elapsed());
        drop(g);
    }
    connects(500);
    let mut without = Vec::new();
    let mut with = Vec::new();
    for _ in 0..5 {
        without.push(connects(2000));
        let g = Guard::install(cookie, 1).unwrap();
        with.push(connects(2000));
        drop(g);
    }
    without.sort();
    with.sort();
    later.sort();
    eprintln!(
        "guard install: first {first:?}, later (median of 5) {:?}",
        later[2]
    );
    eprintln!("loopback connect+close: without guard {:?}, with guard attached {:?} (medians of 5 x 2000)", without[2], with[2]);
}

/// A node that moved its inspector port at run time (`process.debugPort = 9333`, which no flag
/// shows): the guard covered 9229, the inspector opens on 9333, so memscope closes it at once
/// (under a guard of its own) and refuses; afterwards the target listens on nothing and lives.
#[test]
fn inspector_on_an_unexpected_port_is_closed_and_refused() {
    require_root();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let preload = dir.path().join("port.js");
    std::fs::write(&preload, "process.debugPort = 9333;\n").unwrap();
    let node = in_own_netns(&format!(
        "exec node -r {} {}",
        preload.display(),
        script("node_js_heap.js").display()
    ));
    let err = summary_of_pid(node.pid, false, "moved-port-test").unwrap_err();
    assert!(
        matches!(err, v8::V8Error::Unguardable { .. }) && err.to_string().contains("9333"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !own_listener_sockets(node.pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        own_listener_sockets(node.pid).is_empty(),
        "the inspector on 9333 was left open: {:?}",
        own_listener_sockets(node.pid)
    );
    assert!(alive(node.pid));
    assert!(!guard::attached());
}
