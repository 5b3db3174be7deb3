//! The snapshot channel: a persistent, private line into a Node.js process, so that heap
//! snapshots taken one after the other keep the ids of the objects that survive.
//!
//! Why: V8 clears its heap object ids (`HeapProfiler::ClearObjectIds`, in
//! `V8HeapProfilerAgentImpl::disable`) whenever an inspector session ends
//! (`~V8InspectorSessionImpl` disables every agent) or disables `HeapProfiler`. Each snapshot
//! through its own inspector session therefore numbers every object anew, and comparison tools
//! (memlab, DevTools' comparison view), which match objects by id, see no growth. The service's
//! own snapshots (`v8.writeHeapSnapshot`) keep their ids because they end no session.
//!
//! What: the first time the agent needs it for a target, it opens an inspector session (with
//! every check of [`super::inspector`]), evaluates `channel_agent.js` in the target (memscope's
//! own code, audited), connects to the Unix socket that code listens on (through
//! `/proc/PID/root`, so the target's mount namespace and private `/tmp` do not matter), proves
//! it knows a random token, and closes the inspector session (the one id reset, before any
//! snapshot through the channel). The code in the target then stops listening and removes its
//! socket: the connection memscope holds is the only way in. Snapshots are
//! `v8.getHeapSnapshot()` in the target (V8's own serializer, streamed chunk by chunk as
//! framed data, never a file); `HeapProfiler` methods (GC, the sampling profiler) go through an
//! in-process session that stays connected, and `HeapProfiler.disable` is never sent.
//!
//! The connection's peer must be the target (`SO_PEERCRED`). Everything the target sends is
//! hostile: frames are size-capped, every read has a deadline, a broken channel is dropped and
//! installed again next time (one more id reset: after an agent restart or a target that
//! closed it). A channel is closed when its target is detached ([`forget`]) or exits, and with
//! the agent; one operation at a time per target.
//!
//! Memory budget: a frame's announced length is reserved on the target's account
//! ([`crate::budget::Use::V8`]) before its payload is allocated, and held until the frame is
//! parsed or forwarded; a refusal is [`V8Error::TooLarge`] and drops the channel (the rest of the
//! frame is unread: installed again next time).
use std::{
    collections::HashMap,
    io::{Read, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tracing::{info, warn};

use super::{inspector::RawReply, Budget, Inspector, V8Error};
use crate::budget::{Account, Reservation, Use};

/// The code evaluated in the target.
const AGENT_JS: &str = include_str!("channel_agent.js");
/// How long the target waits for memscope to connect before it removes the channel.
const EXPIRY: Duration = Duration::from_secs(30);
/// Largest data frame (V8's snapshot chunks are 64 KiB).
const MAX_DATA_FRAME: usize = 4 << 20;
/// Largest message: a sampling profile, capped as on the inspector.
const MAX_MESSAGE_FRAME: usize = super::inspector::MAX_PROFILE_MESSAGE_BYTES;
/// How long the target may take to start listening.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// One channel per target pid; `None` until installed (or after it broke).
type Slot = Arc<Mutex<Option<Channel>>>;
static CHANNELS: Mutex<Option<HashMap<u32, Slot>>> = Mutex::new(None);

/// A private connection to memscope's code in one Node.js process.
pub struct Channel {
    pid: u32,
    stream: UnixStream,
    next_id: u64,
    /// The target's share of the memory budget: every frame held is charged to it.
    account: Arc<Account>,
    /// The deadline and cancellation of the operation under way (set by [`with_channel`]).
    budget: Budget,
}

/// The channel speaks the protocol like an inspector session, except that it never disables
/// the heap profiler (that would clear the ids it exists to keep).
impl super::Protocol for Channel {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn budget(&self) -> &Budget {
        &self.budget
    }
    fn may_disable(&self) -> bool {
        false
    }
    /// `max_bytes`: the channel's frames are capped at [`MAX_MESSAGE_FRAME`] whatever the call.
    fn call_raw<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        _max_bytes: usize,
        mut on_event: F,
    ) -> Result<RawReply, V8Error> {
        let result = self.call_result(method, params, timeout, &mut on_event)?;
        Ok(RawReply::from_text(format!("{{\"result\":{result}}}")))
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, b.len() as isize, "getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The pid of the process at the other end of a Unix socket (the one that listened).
fn peer_pid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid as u32)
}

impl Channel {
    /// Installs the channel through an open inspector session (which the caller then closes).
    pub fn install(insp: &mut Inspector) -> Result<Channel, V8Error> {
        let pid = insp.pid();
        let token = random_token();
        let code = AGENT_JS
            .replace("__MEMSCOPE_TOKEN__", &token)
            .replace("__MEMSCOPE_EXPIRY_MS__", &EXPIRY.as_millis().to_string());
        let r = insp.call(
            "Runtime.evaluate",
            json!({ "expression": code, "returnByValue": true, "includeCommandLineAPI": true, "silent": true }),
            Duration::from_secs(10),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex
                .get("exception")
                .and_then(|e| e.get("description"))
                .and_then(Value::as_str)
                .unwrap_or("exception");
            return Err(V8Error::Remote(
                "installing the snapshot channel".into(),
                text.chars().take(200).collect(),
            ));
        }
        let path = r
            .get("result")
            .and_then(|v| v.get("value"))
            .and_then(Value::as_str)
            .unwrap_or("");
        // Only what the code makes: an absolute path ending in /memscope-XXXXXX/s.
        let ok = path.starts_with('/')
            && path.ends_with("/s")
            && !path.contains("..")
            && path.len() < 4096
            && path
                .rsplit('/')
                .nth(1)
                .is_some_and(|d| d.starts_with("memscope-"));
        if !ok {
            return Err(V8Error::Protocol(format!(
                "the snapshot channel answered a strange path {:?}",
                path.chars().take(100).collect::<String>()
            )));
        }
        let full = format!("/proc/{pid}/root{path}");
        let deadline = Instant::now() + CONNECT_WAIT;
        let stream = loop {
            match UnixStream::connect(&full) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(V8Error::Connect(format!(
                        "connecting to the snapshot channel of {pid}: {e}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // What was connected to must be what the program made: a socket in a real directory
        // (not a symlink the target planted towards another socket), held by the target.
        let made = std::fs::symlink_metadata(&full)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            && std::path::Path::new(&full)
                .parent()
                .is_some_and(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()));
        if !made {
            return Err(V8Error::Connect(format!(
                "the snapshot channel of {pid} is not a socket in a directory of its own"
            )));
        }
        match peer_pid(&stream) {
            Some(p) if p == pid => {}
            other => {
                return Err(V8Error::Connect(format!(
                    "the snapshot channel of {pid} is held by another process ({other:?})"
                )))
            }
        }
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let mut ch = Channel {
            pid,
            stream,
            next_id: 1,
            account: Account::for_pid(pid),
            budget: insp.budget().clone(),
        };
        ch.stream
            .write_all(format!("{token}\n").as_bytes())
            .map_err(|e| V8Error::Connect(format!("the snapshot channel of {pid}: {e}")))?;
        let hello = ch.read_message(
            Instant::now() + Duration::from_secs(5),
            "the snapshot channel's greeting",
        )?;
        if hello.get("ok") != Some(&Value::Bool(true)) {
            return Err(V8Error::Protocol(format!(
                "the snapshot channel of {pid} did not greet"
            )));
        }
        Ok(ch)
    }

    /// Whether the target's end is closed (or has sent something unasked: not usable either).
    fn closed(&self) -> bool {
        let mut b = [0u8; 1];
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
    }

    fn send(&mut self, mut req: Value) -> Result<u64, V8Error> {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        let line = format!("{req}\n");
        if line.len() > 65536 {
            return Err(V8Error::Protocol(
                "request too large for the snapshot channel".into(),
            ));
        }
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| V8Error::Connect(format!("writing to the snapshot channel: {e}")))?;
        Ok(id)
    }

    fn read_exact_by(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        what: &str,
    ) -> Result<(), V8Error> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(V8Error::Timeout(what.to_string(), Duration::ZERO));
            }
            self.stream
                .set_read_timeout(Some(left.min(Duration::from_secs(1))))
                .ok();
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(V8Error::Connect(format!(
                        "the snapshot channel of {} closed",
                        self.pid
                    )))
                }
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(V8Error::Connect(format!(
                        "reading the snapshot channel: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// One frame: (kind, payload, its bytes on the target's account), capped by kind and by the
    /// target's memory budget (reserved before the payload is allocated).
    fn read_frame(
        &mut self,
        deadline: Instant,
        what: &str,
    ) -> Result<(u8, Vec<u8>, Reservation), V8Error> {
        let mut head = [0u8; 5];
        self.read_exact_by(&mut head, deadline, what)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let cap = match head[0] {
            b'D' => MAX_DATA_FRAME,
            b'M' => MAX_MESSAGE_FRAME,
            k => {
                return Err(V8Error::Protocol(format!(
                    "the snapshot channel sent a frame of unknown kind {k}"
                )))
            }
        };
        if len > cap {
            return Err(V8Error::Protocol(format!(
                "the snapshot channel sent a {len}-byte frame (at most {cap})"
            )));
        }
        let held = self.account.reserve(Use::V8, len as u64).map_err(|e| {
            V8Error::TooLarge(format!(
                "a {len}-byte frame of the snapshot channel during {what}: {e}"
            ))
        })?;
        let mut payload = vec![0u8; len];
        self.read_exact_by(&mut payload, deadline, what)?;
        Ok((head[0], payload, held))
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, V8Error> {
        match self.read_frame(deadline, what)? {
            (b'M', p, _held) => serde_json::from_slice(&p).map_err(|_| {
                V8Error::Protocol("the snapshot channel sent something that is not JSON".into())
            }),
            _ => Err(V8Error::Protocol(
                "the snapshot channel sent data where a message was due".into(),
            )),
        }
    }

    /// Reads until the answer to `id`: data frames to `on_data`, events to `on_event`.
    /// Calls `method`; its `result` as raw JSON text.
    fn call_result(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        on_event: &mut dyn FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<String, V8Error> {
        let id = self.send(json!({ "op": "call", "method": method, "params": params }))?;
        self.finish(id, method, timeout, &mut |_| Err(V8Error::Protocol("data in answer to a call".into())), on_event)
    }

    /// Reads frames until the answer to `id`; returns its `result` as raw JSON text. Messages
    /// are parsed into an envelope (no generic tree of a large answer); events' params are small.
    fn finish(
        &mut self,
        id: u64,
        what: &str,
        timeout: Duration,
        on_data: &mut dyn FnMut(&[u8]) -> Result<(), V8Error>,
        on_event: &mut dyn FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<String, V8Error> {
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(default)]
            id: Option<u64>,
            #[serde(default, borrow)]
            error: Option<&'a serde_json::value::RawValue>,
            #[serde(default, borrow)]
            result: Option<&'a serde_json::value::RawValue>,
            #[serde(default)]
            method: Option<std::borrow::Cow<'a, str>>,
            #[serde(default, borrow)]
            params: Option<&'a serde_json::value::RawValue>,
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (kind, payload, _held) = self.read_frame(deadline, what).map_err(|e| match e {
                V8Error::Timeout(w, _) => V8Error::Timeout(w, timeout),
                e => e,
            })?;
            if kind == b'D' {
                on_data(&payload)?;
                continue;
            }
            let v: Envelope = serde_json::from_slice(&payload)
                .map_err(|_| V8Error::Protocol("the snapshot channel sent something that is not JSON".into()))?;
            if v.id == Some(id) {
                if let Some(err) = v.error {
                    let msg: Value = serde_json::from_str(err.get()).unwrap_or(Value::Null);
                    let msg = msg.as_str().unwrap_or("error");
                    return Err(V8Error::Remote(what.to_string(), msg.chars().take(200).collect()));
                }
                return Ok(v.result.map(|r| r.get().to_string()).unwrap_or_else(|| "null".into()));
            }
            if let Some(ev) = v.method {
                let params: Value = v.params.and_then(|p| serde_json::from_str(p.get()).ok()).unwrap_or(Value::Null);
                on_event(&ev, &params)?;
            }
        }
    }

    /// A heap snapshot through `v8.getHeapSnapshot()` in the target, chunk by chunk to `sink`
    /// (text: V8 writes the snapshot in ASCII). Returns the bytes written.
    pub fn snapshot(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(&str) -> Result<(), V8Error>,
    ) -> Result<u64, V8Error> {
        let id = self.send(json!({ "op": "snapshot" }))?;
        let mut bytes = 0u64;
        // A sink that fails (the client went away) stops the forwarding, not the reading: the
        // rest is read and dropped so that the channel stays usable (and the ids kept).
        let mut stopped: Option<V8Error> = None;
        self.finish(
            id,
            "the heap snapshot",
            timeout,
            &mut |d| {
                if stopped.is_some() {
                    return Ok(());
                }
                let text = std::str::from_utf8(d)
                    .map_err(|_| V8Error::Protocol("the heap snapshot is not text".into()))?;
                bytes += d.len() as u64;
                if let Err(e) = sink(text) {
                    stopped = Some(e);
                }
                Ok(())
            },
            &mut |_, _| Ok(()),
        )?;
        match stopped {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }
}

/// Whether an error means the channel itself is unusable (dropped, installed again next time)
/// rather than the operation failing.
fn broken(e: &V8Error) -> bool {
    matches!(
        e,
        V8Error::Connect(_) | V8Error::Protocol(_) | V8Error::Timeout(..) | V8Error::TooLarge(_)
    )
}

/// Runs `f` on the channel of `pid`, installing it first if needed (an inspector session,
/// audited with `purpose`). When the channel cannot be installed (a read-only temporary
/// directory, a Node.js without `require` in the inspector), `fallback` runs on that inspector
/// session instead (ids are not kept then) and a warning says why.
pub fn with_channel<R>(
    process: &std::sync::Arc<crate::process::Process>,
    purpose: &str,
    budget: super::Budget,
    f: impl FnOnce(&mut Channel) -> Result<R, V8Error>,
    fallback: impl FnOnce(&mut Inspector) -> Result<R, V8Error>,
) -> Result<R, V8Error> {
    let pid = process.pid();
    // The process attached, never whatever now has its pid: a channel to a process that exited
    // is closed (checked below), and a new one is installed only into this process.
    if !process.alive() {
        return Err(V8Error::Gone(pid));
    }
    let slot = CHANNELS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(pid)
        .or_default()
        .clone();
    let mut guard = slot.try_lock().map_err(|_| V8Error::Busy(pid))?;
    if guard.as_ref().is_some_and(|c| c.closed()) {
        // The target exited (or dropped its end): a pid reused since cannot be reached through
        // it, the connection was to that process. Installed again below, with every check.
        *guard = None;
    }
    if guard.is_none() {
        let mut insp = Inspector::open(process.clone(), &format!("{purpose} (installing the snapshot channel)"), budget.clone())?;
        match Channel::install(&mut insp) {
            Ok(ch) => {
                insp.close()?;
                info!(target: "audit", pid, purpose, result = "installed", "v8 snapshot channel");
                *guard = Some(ch);
            }
            // The session itself failed (a refused message is half read, the deadline, the process
            // gone): no fallback on it, the refusal is the answer.
            Err(e) if insp.is_broken() || matches!(e, V8Error::TooLarge(_) | V8Error::Gone(_) | V8Error::Cancelled(_) | V8Error::Timeout(..)) => {
                let _ = insp.close();
                return Err(e);
            }
            Err(e) => {
                warn!(pid, error = %e, "the snapshot channel could not be installed: this snapshot goes through the inspector, object ids are not kept across snapshots");
                let r = fallback(&mut insp);
                insp.close()?;
                return r;
            }
        }
    }
    let ch = guard.as_mut().expect("installed above");
    ch.budget = budget;
    let r = f(ch);
    if let Err(e) = &r {
        if broken(e) {
            warn!(pid, error = %e, "the snapshot channel broke; it is installed again next time");
            *guard = None;
        }
    }
    r
}

/// Forgets the channel of `pid` (its target exited or was detached): the connection closes and
/// the code in the target removes itself.
pub fn forget(pid: u32) {
    if let Some(map) = CHANNELS.lock().unwrap().as_mut() {
        map.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v8::Protocol as _;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (
            Channel {
                pid: 1,
                stream: a,
                next_id: 1,
                account: Account::for_pid(1),
                budget: Budget::new(Duration::from_secs(60)),
            },
            b,
        )
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A hostile target: a frame announced larger than the cap, or of an unknown kind, is refused
    /// before anything is allocated for it; silence ends at the deadline.
    #[test]
    fn hostile_frames_are_refused() {
        let (mut ch, mut peer) = pair();
        peer.write_all(&[b'D', 0xff, 0xff, 0xff, 0xff]).unwrap();
        let e = ch
            .snapshot(Duration::from_secs(5), &mut |_| Ok(()))
            .unwrap_err();
        assert!(
            matches!(e, V8Error::Protocol(ref m) if m.contains("frame")),
            "{e}"
        );
        assert!(broken(&e));

        let (mut ch, mut peer) = pair();
        peer.write_all(&frame(b'Z', b"x")).unwrap();
        assert!(matches!(
            ch.snapshot(Duration::from_secs(5), &mut |_| Ok(())),
            Err(V8Error::Protocol(_))
        ));

        let (mut ch, _peer) = pair();
        let started = Instant::now();
        let e = ch
            .call(
                "HeapProfiler.collectGarbage",
                json!({}),
                Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(matches!(e, V8Error::Timeout(..)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// A client that goes away mid-snapshot stops the forwarding, not the reading: the rest is
    /// drained up to the answer, so the channel stays in step (and the ids kept).
    #[test]
    fn a_failing_sink_drains_the_snapshot() {
        let (mut ch, mut peer) = pair();
        for _ in 0..3 {
            peer.write_all(&frame(b'D', b"{\"chunk\":1}")).unwrap();
        }
        peer.write_all(&frame(b'M', br#"{"id":1,"result":{}}"#))
            .unwrap();
        let mut calls = 0;
        let e = ch
            .snapshot(Duration::from_secs(5), &mut |_| {
                calls += 1;
                Err(V8Error::Sink("gone".into()))
            })
            .unwrap_err();
        assert!(matches!(e, V8Error::Sink(_)) && !broken(&e));
        assert_eq!(calls, 1);
        assert!(!ch.closed(), "nothing left unread");
        peer.write_all(&frame(b'M', br#"{"method":"HeapProfiler.x","params":{}}"#))
            .unwrap();
        peer.write_all(&frame(b'M', br#"{"id":2,"result":{"ok":true}}"#))
            .unwrap();
        assert_eq!(
            ch.call("HeapProfiler.enable", json!({}), Duration::from_secs(5))
                .unwrap(),
            json!({"ok": true})
        );
        drop(peer);
        assert!(ch.closed());
    }

    /// A frame past the target's memory budget is refused before its payload is allocated
    /// (TooLarge, counted and reported on the account, the channel dropped); a frame within it
    /// is held while parsed and its bytes come back afterwards.
    #[test]
    fn frames_are_charged_to_the_target_budget() {
        static POOL: crate::budget::Pool = crate::budget::Pool::new(1 << 20);
        let (mut ch, mut peer) = pair();
        ch.account = Account::in_pool(1, 64, &POOL);
        peer.write_all(&frame(b'M', br#"{"id":1,"result":{"ok":true}}"#))
            .unwrap();
        assert_eq!(
            ch.call("HeapProfiler.enable", json!({}), Duration::from_secs(5))
                .unwrap(),
            json!({"ok": true})
        );
        assert_eq!(ch.account.report().used_bytes, 0, "given back once parsed");
        assert_eq!(POOL.usage().0, 0);

        let big = format!(r#"{{"id":2,"result":{{"pad":"{}"}}}}"#, "x".repeat(100));
        peer.write_all(&frame(b'M', big.as_bytes())).unwrap();
        let e = ch
            .call("HeapProfiler.enable", json!({}), Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e, V8Error::TooLarge(ref m) if m.contains("budget")), "{e}");
        assert!(broken(&e), "the rest of the frame is unread: the channel is dropped");
        let report = ch.account.report();
        assert_eq!(report.used_bytes, 0);
        assert_eq!(report.refused["v8"].times, 1);
        assert_eq!(report.refused["v8"].limit, "target");
        assert!(crate::budget::refusals()
            .iter()
            .any(|&(u, l, n)| u == "v8" && l == "target" && n >= 1));
    }
}
