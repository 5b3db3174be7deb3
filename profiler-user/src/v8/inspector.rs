//! One DevTools-protocol session with a Node.js process's inspector, opened from outside:
//! no flag, no code change in the target.
//!
//! Opening: the target must catch `SIGUSR1` (`SigCgt` in `/proc/PID/status`: Node installs a
//! handler; for any other process the default action of `SIGUSR1` is to terminate it, so it is
//! never sent). An inspector the target already listens on is refused (another debugger may be
//! attached; memscope does not share it nor close it). `SIGUSR1` makes Node listen on loopback
//! inside its own network namespace (9229 unless started with another `--inspect-port`); the
//! port is the new listening socket that the target itself owns (its inode among the target's
//! descriptors, from `/proc/PID/net/tcp{,6}`), so a port taken by another process is reported
//! as such instead of being talked to. The socket is connected by a dedicated thread that
//! entered the target's network namespace (`setns(CLONE_NEWNET)`) and is then used from the
//! caller's thread. `/json/list` gives the WebSocket path (only the path is used: the host is
//! always the loopback address connected to). The protocol runs over tungstenite + serde_json.
//!
//! Closing (also on drop): `process._debugEnd()` through `Runtime.evaluate`, then a wait until
//! the port no longer listens, so that no debug port stays open. Every session (open, close,
//! refusal) is in the audit log (tracing target `audit`). One session per process at a time.
//!
//! Everything the target sends is hostile: answers are size-capped, every read has a deadline.
use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tracing::info;
use tungstenite::{protocol::WebSocketConfig, Message, WebSocket};

use super::V8Error;

/// Largest `/json/list` answer read.
const MAX_LIST_BYTES: usize = 64 * 1024;
/// Largest protocol message accepted (a sampling profile of a big program is a few MiB).
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// How long Node may take to start listening after `SIGUSR1`.
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// How long the inspector may take to stop listening after `_debugEnd`.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Default deadline of one protocol call (a heap snapshot of a large heap takes long).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Processes with a session open right now.
static OPEN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
/// Network namespaces (by inode) where this process has a session open: Node listens on 9229
/// unless told otherwise, so two Node processes of one namespace cannot both be open at once.
/// A second session in the same namespace waits for the first (up to [`NETNS_WAIT`]).
static NETNS: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
static NETNS_FREED: std::sync::Condvar = std::sync::Condvar::new();
const NETNS_WAIT: Duration = Duration::from_secs(30);

/// Holds a network namespace for one session.
struct NetnsTurn(u64);

impl NetnsTurn {
    fn take(pid: u32) -> Result<NetnsTurn, V8Error> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).map_err(|_| V8Error::NoSuchProcess(pid))?.ino();
        let deadline = Instant::now() + NETNS_WAIT;
        let mut held = NETNS.lock().unwrap();
        while held.get_or_insert_with(HashSet::new).contains(&ino) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(V8Error::Connect(format!("another inspector session in the network namespace of {pid} has not ended in {NETNS_WAIT:?}")));
            }
            held = NETNS_FREED.wait_timeout(held, left).unwrap().0;
        }
        held.get_or_insert_with(HashSet::new).insert(ino);
        Ok(NetnsTurn(ino))
    }
}

impl Drop for NetnsTurn {
    fn drop(&mut self) {
        NETNS.lock().unwrap().get_or_insert_with(HashSet::new).remove(&self.0);
        NETNS_FREED.notify_all();
    }
}

/// A DevTools-protocol session with one Node.js process.
pub struct Inspector {
    pid: u32,
    port: u16,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// Who asked, for the audit log.
    purpose: String,
    closed: bool,
    opened_at: Instant,
    turn: Option<NetnsTurn>,
}

/// Whether the process catches `sig` (its bit in `SigCgt`).
pub fn catches_signal(pid: u32, sig: i32) -> Result<bool, V8Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| V8Error::NoSuchProcess(pid))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or(V8Error::NoSuchProcess(pid))?;
    Ok(mask & (1u64 << (sig - 1)) != 0)
}

/// The socket inodes among the target's descriptors.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in dir.flatten() {
        if let Ok(link) = std::fs::read_link(e.path()) {
            let l = link.to_string_lossy();
            if let Some(n) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse().ok()) {
                out.insert(n);
            }
        }
    }
    out
}

/// A loopback TCP socket listening in the target's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub inode: u64,
}

/// Listening loopback TCP sockets in the network namespace of `pid` (IPv4 and IPv6).
pub fn loopback_listeners(pid: u32) -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, loopback) in [("tcp", "0100007F"), ("tcp6", "00000000000000000000000001000000")] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((ip, port)) = f[1].split_once(':') else { continue };
            if ip != loopback {
                continue;
            }
            if let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse()) {
                out.push(Listener { port, inode });
            }
        }
    }
    out
}

/// The loopback ports the target itself listens on.
pub fn own_listeners(pid: u32) -> Vec<u16> {
    let mine = socket_inodes(pid);
    let mut ports: Vec<u16> = loopback_listeners(pid).into_iter().filter(|l| mine.contains(&l.inode)).map(|l| l.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Connects to 127.0.0.1:`port` from inside the network namespace of `pid`.
fn connect_in_netns(pid: u32, port: u16, timeout: Duration) -> Result<TcpStream, V8Error> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| V8Error::Connect(format!("opening the network namespace of {pid}: {e}")))?;
    // setns changes only the calling thread's namespace: a thread of its own, which ends after.
    std::thread::Builder::new()
        .name(format!("netns-{pid}"))
        .spawn(move || -> Result<TcpStream, V8Error> {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(V8Error::Connect(format!("entering the network namespace of {pid}: {}", std::io::Error::last_os_error())));
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| V8Error::Connect(format!("connecting to the inspector of {pid} on port {port}: {e}")))
        })
        .map_err(|e| V8Error::Connect(format!("starting the namespace thread: {e}")))?
        .join()
        .map_err(|_| V8Error::Connect("the namespace thread panicked".into()))?
}

/// The WebSocket path from the inspector's `/json/list` (an HTTP/1.0 GET, answer capped).
fn websocket_path(pid: u32, port: u16) -> Result<String, V8Error> {
    let mut s = connect_in_netns(pid, port, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /json/list HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| V8Error::Protocol(format!("asking /json/list: {e}")))?;
    // Node keeps the connection open after answering: read until the body is complete.
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    let (body_at, body_len) = loop {
        let n = s.read(&mut piece).map_err(|e| V8Error::Protocol(format!("reading /json/list: {e}")))?;
        buf.extend_from_slice(&piece[..n]);
        if buf.len() > MAX_LIST_BYTES {
            return Err(V8Error::Protocol("the /json/list answer is larger than 64 KiB".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(at)) if resp.code == Some(200) => {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
                match len {
                    Some(len) if buf.len() >= at + len => break (at, len),
                    None if n == 0 => break (at, buf.len() - at),
                    _ if n == 0 => return Err(V8Error::Protocol("/json/list answer cut short".into())),
                    _ => {}
                }
            }
            Ok(httparse::Status::Partial) if n > 0 => {}
            _ => return Err(V8Error::Protocol(format!("port {port} did not answer /json/list like Node's inspector"))),
        }
    };
    let buf = &buf[..body_at + body_len];
    let list: Value = serde_json::from_slice(&buf[body_at..]).map_err(|_| V8Error::Protocol("/json/list is not JSON".into()))?;
    let url = list
        .as_array()
        .and_then(|a| a.iter().find_map(|t| t.get("webSocketDebuggerUrl").and_then(Value::as_str)))
        .ok_or_else(|| V8Error::Protocol("/json/list names no WebSocket".into()))?;
    let path = url.strip_prefix("ws://").and_then(|r| r.find('/').map(|i| &r[i..])).unwrap_or("");
    if path.len() < 2 || path.len() > 128 || !path[1..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(V8Error::Protocol("/json/list gave an unexpected WebSocket URL".into()));
    }
    Ok(path.to_string())
}

fn audit_refusal(pid: u32, purpose: &str, e: &V8Error) {
    info!(target: "audit", pid, purpose, result = "refused", reason = %e, "v8 inspector session");
}

impl Inspector {
    /// Opens a session with Node.js process `pid` (see the module doc for what is checked and
    /// refused). `purpose` (who asked and what for) goes to the audit log.
    pub fn open(pid: u32, purpose: &str) -> Result<Inspector, V8Error> {
        {
            let mut open = OPEN.lock().unwrap();
            let set = open.get_or_insert_with(HashSet::new);
            if !set.insert(pid) {
                let e = V8Error::Busy(pid);
                audit_refusal(pid, purpose, &e);
                return Err(e);
            }
        }
        let result = NetnsTurn::take(pid).and_then(|turn| {
            let mut s = Self::open_inner(pid, purpose)?;
            s.turn = Some(turn);
            Ok(s)
        });
        match &result {
            Ok(s) => info!(target: "audit", pid, port = s.port, purpose, result = "opened", "v8 inspector session"),
            Err(e) => {
                OPEN.lock().unwrap().get_or_insert_with(HashSet::new).remove(&pid);
                audit_refusal(pid, purpose, e);
            }
        }
        result
    }

    fn open_inner(pid: u32, purpose: &str) -> Result<Inspector, V8Error> {
        if !catches_signal(pid, libc::SIGUSR1)? {
            return Err(V8Error::NoSigusr1Handler(pid));
        }
        let before = own_listeners(pid);
        let taken_9229 = loopback_listeners(pid).iter().any(|l| l.port == 9229);
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if pidfd < 0 {
            return Err(V8Error::NoSuchProcess(pid));
        }
        let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as i32) };
        // Probe the inspector that may already be there: a listener of the target's that
        // answers /json/list. It may be someone else's debugging session: refused, untouched.
        for &port in before.iter().take(8) {
            if websocket_path(pid, port).is_ok() {
                return Err(V8Error::AlreadyOpen { pid, port });
            }
        }
        // Through the pidfd: the signal cannot reach another process that reused the pid.
        if unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGUSR1, std::ptr::null::<u8>(), 0) } != 0 {
            return Err(V8Error::Connect(format!("signalling {pid}: {}", std::io::Error::last_os_error())));
        }
        let deadline = Instant::now() + LISTEN_WAIT;
        let port = loop {
            let new: Vec<u16> = own_listeners(pid).into_iter().filter(|p| !before.contains(p)).collect();
            if let Some(&p) = new.iter().find(|&&p| p == 9229).or(new.first()) {
                break p;
            }
            if Instant::now() > deadline {
                return Err(if taken_9229 { V8Error::PortTaken { pid, port: 9229 } } else { V8Error::NoInspector(pid) });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut opened = Self::connect(pid, port, purpose);
        if opened.is_err() {
            // We started it: do not leave it listening. Without a session, only a second
            // SIGUSR1 is harmless (a no-op): close it the one way we can, by a session.
            if let Ok(path) = websocket_path(pid, port) {
                opened = Self::handshake(pid, port, &path, purpose);
            }
        }
        opened
    }

    fn connect(pid: u32, port: u16, purpose: &str) -> Result<Inspector, V8Error> {
        let path = websocket_path(pid, port)?;
        Self::handshake(pid, port, &path, purpose)
    }

    fn handshake(pid: u32, port: u16, path: &str, purpose: &str) -> Result<Inspector, V8Error> {
        let stream = connect_in_netns(pid, port, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES)).max_frame_size(Some(MAX_MESSAGE_BYTES));
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config)).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) if r.status() == 400 || r.status() == 403 => {
                V8Error::DebuggerAttached(pid)
            }
            e => V8Error::Protocol(format!("WebSocket handshake with the inspector of {pid}: {e}")),
        })?;
        Ok(Inspector { pid, port, ws, next_id: 1, purpose: purpose.to_string(), closed: false, opened_at: Instant::now(), turn: None })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Calls `method` and waits (up to `timeout`) for its result; events that arrive meanwhile
    /// go to `on_event(method, params)`, which may stop the call by returning an error.
    pub fn call_with_events(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        mut on_event: impl FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<Value, V8Error> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(msg)).map_err(|e| V8Error::Protocol(format!("sending {method}: {e}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(V8Error::Timeout(method.to_string(), timeout));
            }
            self.ws.get_ref().set_read_timeout(Some(left.min(Duration::from_secs(5)))).ok();
            let m = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(V8Error::Protocol(format!("reading the answer to {method}: {e}"))),
            };
            let text = match m {
                Message::Text(t) => t,
                Message::Close(_) => return Err(V8Error::Protocol(format!("the inspector closed the session during {method}"))),
                _ => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).map_err(|_| V8Error::Protocol("the inspector sent something that is not JSON".into()))?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = v.get("error") {
                    let msg = err.get("message").and_then(Value::as_str).unwrap_or("error");
                    return Err(V8Error::Remote(method.to_string(), msg.chars().take(200).collect()));
                }
                return Ok(v.get("result").cloned().unwrap_or(Value::Null));
            }
            if let Some(ev) = v.get("method").and_then(Value::as_str) {
                on_event(ev, v.get("params").unwrap_or(&Value::Null))?;
            }
        }
    }

    /// Reads events (no call) until `on_event` returns `true` (done) or `timeout` passes (then
    /// `V8Error::Timeout` naming `what`). For answers that come as events, e.g. those of a
    /// worker's nested session (see [`super::workers`]).
    pub fn read_events(
        &mut self,
        what: &str,
        timeout: Duration,
        mut on_event: impl FnMut(&str, &Value) -> Result<bool, V8Error>,
    ) -> Result<(), V8Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(V8Error::Timeout(what.to_string(), timeout));
            }
            self.ws.get_ref().set_read_timeout(Some(left.min(Duration::from_secs(5)))).ok();
            let m = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(V8Error::Protocol(format!("reading the answer to {what}: {e}"))),
            };
            let text = match m {
                Message::Text(t) => t,
                Message::Close(_) => return Err(V8Error::Protocol(format!("the inspector closed the session during {what}"))),
                _ => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).map_err(|_| V8Error::Protocol("the inspector sent something that is not JSON".into()))?;
            if let Some(ev) = v.get("method").and_then(Value::as_str) {
                if on_event(ev, v.get("params").unwrap_or(&Value::Null))? {
                    return Ok(());
                }
            }
        }
    }

    /// Calls `method` and returns its result, ignoring events.
    pub fn call(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, V8Error> {
        self.call_with_events(method, params, timeout, |_, _| Ok(()))
    }

    /// A full garbage collection (`HeapProfiler.collectGarbage`).
    pub fn collect_garbage(&mut self) -> Result<(), V8Error> {
        self.call("HeapProfiler.collectGarbage", json!({}), DEFAULT_CALL_TIMEOUT).map(|_| ())
    }

    /// Evaluates `expression` in the target's main context; returns the result object
    /// (`Runtime.evaluate`'s `result`, by value).
    pub fn evaluate(&mut self, expression: &str, timeout: Duration) -> Result<Value, V8Error> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "timeout": timeout.as_millis() as u64 }),
            timeout + Duration::from_secs(1),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex.get("exception").and_then(|e| e.get("description")).and_then(Value::as_str)
                .or_else(|| ex.get("text").and_then(Value::as_str)).unwrap_or("exception");
            return Err(V8Error::Remote("Runtime.evaluate".into(), text.chars().take(200).collect()));
        }
        Ok(r.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Closes the inspector (`process._debugEnd()`) and waits until its port no longer listens.
    pub fn close(mut self) -> Result<(), V8Error> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), V8Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // The answer may never come: the server closes under the call.
        let sent = self.ws.send(Message::text(
            json!({ "id": self.next_id, "method": "Runtime.evaluate", "params": { "expression": "process._debugEnd()" } }).to_string(),
        ));
        let _ = self.ws.flush();
        let deadline = Instant::now() + CLOSE_WAIT;
        let mut still = true;
        while Instant::now() < deadline {
            if !own_listeners(self.pid).contains(&self.port) {
                still = false;
                break;
            }
            self.ws.get_ref().set_read_timeout(Some(Duration::from_millis(50))).ok();
            let _ = self.ws.read();
        }
        let _ = self.ws.close(None);
        self.turn.take();
        OPEN.lock().unwrap().get_or_insert_with(HashSet::new).remove(&self.pid);
        let ms = self.opened_at.elapsed().as_millis() as u64;
        if still || sent.is_err() {
            info!(target: "audit", pid = self.pid, port = self.port, purpose = %self.purpose, result = "close_failed", ms, "v8 inspector session");
            return Err(V8Error::StillListening { pid: self.pid, port: self.port });
        }
        info!(target: "audit", pid = self.pid, port = self.port, purpose = %self.purpose, result = "closed", ms, "v8 inspector session");
        Ok(())
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(pid = self.pid, error = %e, "closing the inspector");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own process: SigCgt is read (the test harness does not catch SIGUSR1).
    #[test]
    fn reads_sigcgt() {
        assert!(!catches_signal(std::process::id(), libc::SIGUSR1).unwrap());
        assert!(matches!(catches_signal(u32::MAX - 1, libc::SIGUSR1), Err(V8Error::NoSuchProcess(_))));
    }
}
