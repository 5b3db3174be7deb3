//! The `worker_threads` of a Node.js process, through the main thread's inspector session:
//! each worker has a V8 isolate (a heap) of its own, invisible to the main thread's
//! `HeapProfiler`. Node's `NodeWorker` domain reaches them: `NodeWorker.enable
//! {waitForDebuggerOnStart: false}` announces every running worker (`attachedToWorker`, with a
//! session id and the worker's id, title and URL) without pausing any; a worker's own protocol
//! messages then travel inside `NodeWorker.sendMessageToWorker` and come back (answers and
//! events, heap snapshot chunks included) inside `NodeWorker.receivedMessageFromWorker`.
//!
//! [`WorkerSession`] is such a nested session and implements [`Protocol`], so snapshots,
//! summaries and sampling profiles run on a worker as on the main thread. [`Thread`] selects
//! threads (`main`, a worker's id, `all`); [`with_threads`] runs an operation on each selected
//! one. Workers started while the session is open are attached too (not paused); a worker that
//! exits during a call ends that call with an error.
//!
//! Everything a worker sends is hostile like the rest: nested messages are bounded by the
//! session's message cap (the event that carries one is read whole under the call's cap:
//! [`super::inspector::MAX_PROFILE_MESSAGE_BYTES`] when a worker's sampling profile is read,
//! else [`super::inspector::MAX_MESSAGE_BYTES`]) and parsed into an envelope whose payload stays
//! raw text, never a generic JSON tree; every wait has a deadline within the session's one
//! [`Budget`] (and its cancellation); ids and titles are length-checked. Sessions act on the
//! attached [`Process`], never a pid.
use std::{
    borrow::Cow,
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, value::RawValue, Value};

use super::{
    inspector::{self, MAX_PROFILE_MESSAGE_BYTES},
    sampling,
    summary::HeapSummary,
    Budget, Inspector, Protocol, RawReply, V8Error,
};
use crate::{
    aggregate::{FrameInfo, HeapProfile},
    process::Process,
};

/// Most workers attached in one session.
const MAX_WORKERS: usize = 256;
/// Ids of nested calls: unique across the agent's sessions, so that a late answer to a
/// timed-out call cannot be taken for another call's.
static NESTED_ID: AtomicU64 = AtomicU64::new(1);

/// Which JavaScript threads of a process an operation is for (`?thread=` of the V8 routes,
/// `--thread` of `memscope v8`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Thread {
    /// The main thread (the default).
    #[default]
    Main,
    /// One worker, by its id (`NodeWorker`'s `workerId`: Node's `threadId`).
    Worker(String),
    /// The main thread and every worker.
    All,
}

impl FromStr for Thread {
    type Err = String;
    fn from_str(s: &str) -> Result<Thread, String> {
        match s {
            "main" => Ok(Thread::Main),
            "all" => Ok(Thread::All),
            id if valid_id(id) => Ok(Thread::Worker(id.to_string())),
            _ => Err(format!(
                "invalid thread {:?}: main, all, or a worker's id (see `memscope v8 threads`)",
                s.chars().take(40).collect::<String>()
            )),
        }
    }
}

impl fmt::Display for Thread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Thread::Main => f.write_str("main"),
            Thread::All => f.write_str("all"),
            Thread::Worker(id) => f.write_str(id),
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One JavaScript thread of a process, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// `main`, or the worker's id.
    pub id: String,
    /// `main` or `worker`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The worker's title (Node: `[worker ID] NAME`); the process's name for the main thread.
    pub title: String,
    /// The worker's script URL; empty for the main thread.
    pub url: String,
}

impl ThreadInfo {
    /// The main thread of `process` (its name read, then checked to be the process's).
    fn main(process: &Process) -> Result<ThreadInfo, V8Error> {
        let pid = process.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = process.verified(comm).ok_or(V8Error::Gone(pid))?;
        Ok(ThreadInfo {
            id: "main".into(),
            kind: "main".into(),
            title: clip(comm.trim()),
            url: String::new(),
        })
    }
}

fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(512).collect()
}

/// A worker attached in a session: its nested session's id and what it is.
#[derive(Clone, Debug)]
pub struct Attached {
    pub session_id: String,
    pub info: ThreadInfo,
}

/// Turns on `NodeWorker` in `insp` and returns the running workers (none on a Node without
/// workers, or a Node without the domain: then the error says so).
pub fn attach(insp: &mut Inspector) -> Result<Vec<Attached>, V8Error> {
    let mut out: Vec<Attached> = Vec::new();
    // Node reports the running workers before it answers `enable`.
    insp.call_with_events(
        "NodeWorker.enable",
        json!({ "waitForDebuggerOnStart": false }),
        Duration::from_secs(10),
        |m, p| {
            if m == "NodeWorker.attachedToWorker" && out.len() < MAX_WORKERS {
                if let Some(a) = attached(p) {
                    if !out.iter().any(|o| o.session_id == a.session_id) {
                        out.push(a);
                    }
                }
            }
            Ok(())
        },
    )?;
    out.sort_by_key(|a| natural(&a.info.id));
    Ok(out)
}

/// Sort key of ids: numbers by value.
fn natural(id: &str) -> (u64, String) {
    (id.parse().unwrap_or(u64::MAX), id.to_string())
}

fn attached(p: &Value) -> Option<Attached> {
    let session_id = p
        .get("sessionId")?
        .as_str()
        .filter(|s| valid_id(s))?
        .to_string();
    let w = p.get("workerInfo")?;
    let id = w
        .get("workerId")?
        .as_str()
        .filter(|s| valid_id(s))?
        .to_string();
    let s = |k: &str| {
        w.get(k)
            .and_then(Value::as_str)
            .map(clip)
            .unwrap_or_default()
    };
    Some(Attached {
        session_id,
        info: ThreadInfo {
            id,
            kind: "worker".into(),
            title: s("title"),
            url: s("url"),
        },
    })
}

/// Turns `NodeWorker` off again (best effort: closing the inspector ends it anyway).
pub fn detach(insp: &mut Inspector) {
    let _ = insp.call("NodeWorker.disable", json!({}), Duration::from_secs(5));
}

/// The JavaScript threads of the process: the main thread, then each worker.
pub fn list(insp: &mut Inspector) -> Result<Vec<ThreadInfo>, V8Error> {
    let workers = attach(insp)?;
    detach(insp);
    let mut out = vec![ThreadInfo::main(insp.process())?];
    out.extend(workers.into_iter().map(|a| a.info));
    Ok(out)
}

/// The threads of `process`, through a session of its own within `budget`.
pub fn threads_of(
    process: Arc<Process>,
    purpose: &str,
    budget: Budget,
) -> Result<Vec<ThreadInfo>, V8Error> {
    let mut insp = Inspector::open(process, purpose, budget)?;
    let out = list(&mut insp)?;
    insp.close()?;
    Ok(out)
}

/// A worker's nested protocol session, inside the main thread's session.
pub struct WorkerSession<'a> {
    insp: &'a mut Inspector,
    session_id: String,
}

impl<'a> WorkerSession<'a> {
    pub fn new(insp: &'a mut Inspector, worker: &Attached) -> WorkerSession<'a> {
        WorkerSession {
            insp,
            session_id: worker.session_id.clone(),
        }
    }
}

/// `NodeWorker.receivedMessageFromWorker`'s params: the nested message stays text (borrowed
/// from the event when it holds no escapes).
#[derive(Deserialize)]
struct FromWorker<'a> {
    #[serde(rename = "sessionId", borrow)]
    session_id: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
}

/// `NodeWorker.detachedFromWorker`'s params.
#[derive(Deserialize)]
struct Detached<'a> {
    #[serde(rename = "sessionId", borrow)]
    session_id: Cow<'a, str>,
}

impl WorkerSession<'_> {
    /// Sends `method` to the worker and waits (up to `timeout`, within the session's budget)
    /// for its answer, nested in a `receivedMessageFromWorker` event of at most `max_bytes`;
    /// the worker's own events go to `on_event`.
    fn nested(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        mut on_event: impl FnMut(&str, &Value) -> Result<(), V8Error>,
    ) -> Result<RawReply, V8Error> {
        let id = NESTED_ID.fetch_add(1, Ordering::Relaxed);
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        let sid = self.session_id.clone();
        let answer: std::cell::RefCell<Option<Result<RawReply, V8Error>>> =
            std::cell::RefCell::new(None);
        let mut handle = |m: &str, p: Option<&RawValue>| -> Result<bool, V8Error> {
            let Some(p) = p else { return Ok(false) };
            match m {
                "NodeWorker.receivedMessageFromWorker" => {
                    let w: FromWorker = serde_json::from_str(p.get())
                        .map_err(|_| V8Error::Protocol("a worker's message is malformed".into()))?;
                    if w.session_id != sid {
                        return Ok(false);
                    }
                    let env = inspector::envelope(&w.message).map_err(|_| {
                        V8Error::Protocol("a worker sent something that is not JSON".into())
                    })?;
                    if env.id == Some(id) {
                        let error = env.error;
                        *answer.borrow_mut() = Some(match error {
                            Some(msg) => Err(V8Error::Remote(method.to_string(), msg)),
                            None => Ok(RawReply::from_text(w.message.into_owned())),
                        });
                        return Ok(true);
                    }
                    if let Some(ev) = env.method {
                        let params: Value = match env.params {
                            Some(p) => serde_json::from_str(p.get()).map_err(|_| {
                                V8Error::Protocol("a worker sent an event that is not JSON".into())
                            })?,
                            None => Value::Null,
                        };
                        on_event(&ev, &params)?;
                    }
                    Ok(false)
                }
                "NodeWorker.detachedFromWorker" => {
                    match serde_json::from_str::<Detached>(p.get()) {
                        Ok(d) if d.session_id == sid => Err(V8Error::Protocol(format!(
                            "the worker exited during {method}"
                        ))),
                        _ => Ok(false),
                    }
                }
                _ => Ok(false),
            }
        };
        let started = Instant::now();
        self.insp.call_raw_events(
            "NodeWorker.sendMessageToWorker",
            json!({ "message": message, "sessionId": self.session_id }),
            timeout,
            max_bytes,
            |m, p| handle(m, p).map(|_| ()),
        )?;
        if answer.borrow().is_none() {
            let left = timeout.saturating_sub(started.elapsed());
            self.insp
                .read_events_raw(method, left, max_bytes, &mut handle)?;
        }
        answer
            .into_inner()
            .unwrap_or_else(|| Err(V8Error::Timeout(method.to_string(), timeout)))
    }
}

impl Protocol for WorkerSession<'_> {
    fn pid(&self) -> u32 {
        self.insp.pid()
    }

    fn budget(&self) -> &Budget {
        self.insp.budget()
    }

    fn call_raw<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        on_event: F,
    ) -> Result<RawReply, V8Error> {
        self.nested(method, params, timeout, max_bytes, on_event)
    }
}

/// The session of one thread: the main thread's or a worker's.
pub enum ThreadSession<'a> {
    Main(&'a mut Inspector),
    Worker(WorkerSession<'a>),
}

impl Protocol for ThreadSession<'_> {
    fn pid(&self) -> u32 {
        match self {
            ThreadSession::Main(i) => i.pid(),
            ThreadSession::Worker(w) => w.pid(),
        }
    }
    fn budget(&self) -> &Budget {
        match self {
            ThreadSession::Main(i) => i.budget(),
            ThreadSession::Worker(w) => w.budget(),
        }
    }
    fn call_raw<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        on_event: F,
    ) -> Result<RawReply, V8Error> {
        match self {
            ThreadSession::Main(i) => {
                Inspector::call_raw(i, method, params, timeout, max_bytes, on_event)
            }
            ThreadSession::Worker(w) => w.call_raw(method, params, timeout, max_bytes, on_event),
        }
    }
}

/// The session of the main thread (`worker` `None`) or of `worker`, on `insp`.
fn session<'a>(insp: &'a mut Inspector, worker: Option<&Attached>) -> ThreadSession<'a> {
    match worker {
        None => ThreadSession::Main(insp),
        Some(w) => ThreadSession::Worker(WorkerSession::new(insp, w)),
    }
}

/// Why a thread could not be found.
fn no_such_worker(pid: u32, id: &str) -> V8Error {
    V8Error::NoSuchThread {
        pid,
        thread: id.to_string(),
    }
}

/// Runs `f` on each thread `thread` selects (main first, then workers by id) and returns each
/// thread with its result. A worker that is not running is [`V8Error::NoSuchThread`].
pub fn with_threads<T>(
    insp: &mut Inspector,
    thread: &Thread,
    mut f: impl FnMut(&ThreadInfo, &mut ThreadSession<'_>) -> Result<T, V8Error>,
) -> Result<Vec<(ThreadInfo, T)>, V8Error> {
    let pid = insp.pid();
    let mut out = Vec::new();
    if matches!(thread, Thread::Main | Thread::All) {
        let info = ThreadInfo::main(insp.process())?;
        let r = f(&info, &mut session(insp, None))?;
        out.push((info, r));
        if *thread == Thread::Main {
            return Ok(out);
        }
    }
    let workers = attach(insp)?;
    let chosen: Vec<&Attached> = match thread {
        Thread::Worker(id) => vec![workers
            .iter()
            .find(|w| w.info.id == *id)
            .ok_or_else(|| no_such_worker(pid, id))?],
        _ => workers.iter().collect(),
    };
    let result = (|| {
        for w in chosen {
            let r = f(&w.info, &mut session(insp, Some(w)))?;
            out.push((w.info.clone(), r));
        }
        Ok(())
    })();
    detach(insp);
    result.map(|_| out)
}

/// A heap summary with the thread it is of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreadSummary {
    pub thread: ThreadInfo,
    #[serde(flatten)]
    pub summary: HeapSummary,
}

/// Summaries of the selected threads of `process`, through a session of their own within
/// `budget`.
pub fn summaries_of(
    process: Arc<Process>,
    thread: &Thread,
    gc: bool,
    reason: &str,
    budget: Budget,
) -> Result<Vec<ThreadSummary>, V8Error> {
    let mut insp = Inspector::open(
        process,
        &format!("summary ({reason}, thread {thread})"),
        budget,
    )?;
    let out = with_threads(&mut insp, thread, |_, s| super::summary_with(s, gc, reason))?;
    insp.close()?;
    Ok(out
        .into_iter()
        .map(|(thread, summary)| ThreadSummary { thread, summary })
        .collect())
}

/// Samples the JavaScript allocations of the selected threads at once for `duration`. One
/// thread: its profile as [`sampling::profile`] gives it. Several: their stacks together, each
/// under a root frame naming its thread (`[thread main]`, `[worker 1] …`).
pub fn profile_threads(
    insp: &mut Inspector,
    thread: &Thread,
    duration: Duration,
    interval: u64,
) -> Result<HeapProfile, V8Error> {
    if *thread != Thread::All {
        let mut got = with_threads(insp, thread, |_, s| {
            sampling::profile(s, duration, interval)
        })?;
        return got
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| V8Error::Protocol("no thread sampled".into()));
    }
    let t = Duration::from_secs(30);
    let pid = insp.pid();
    let main = ThreadInfo::main(insp.process())?;
    let workers = attach(insp)?;
    // One set of nested sessions from start to end: a worker's sampling ends with its session.
    let got = (|| {
        let mut threads: Vec<(ThreadInfo, Option<&Attached>)> = vec![(main, None)];
        threads.extend(workers.iter().map(|w| (w.info.clone(), Some(w))));
        let mut sampling = Vec::new();
        for (info, w) in threads {
            let mut s = session(insp, w);
            let started = s.call("HeapProfiler.enable", json!({}), t).and_then(|_| {
                s.call(
                    "HeapProfiler.startSampling",
                    json!({ "samplingInterval": interval as f64 }),
                    t,
                )
            });
            match started {
                Ok(_) => sampling.push((info, w)),
                // A worker that exited meanwhile: without it.
                Err(_) if w.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        let end = Instant::now() + duration;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            insp.budget().check("sampling the JavaScript heap")?;
            std::thread::sleep(left.min(inspector::READ_SLICE));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut out = Vec::new();
        for (info, w) in sampling {
            let mut s = session(insp, w);
            // stopSampling answers the profile (as getSamplingProfile would) and stops.
            let got = s.call_raw(
                "HeapProfiler.stopSampling",
                json!({}),
                Duration::from_secs(60),
                MAX_PROFILE_MESSAGE_BYTES,
                |_, _| Ok(()),
            );
            let _ = s.call("HeapProfiler.disable", json!({}), t);
            match got.and_then(sampling::parse_reply) {
                Ok(parsed) => out.push((
                    info,
                    sampling::to_profile(&parsed, pid, now, duration, interval)?,
                )),
                // A worker that exited meanwhile: without it (a refused or cancelled read is an error).
                Err(V8Error::Protocol(_) | V8Error::Remote(..)) if w.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok((now, out))
    })();
    detach(insp);
    let (now, got) = got?;
    let mut merged = HeapProfile {
        pid,
        taken_at_ms: now,
        duration_s: duration.as_secs_f64(),
        sample_bytes: interval,
        ..Default::default()
    };
    for (info, p) in got {
        let root: crate::aggregate::Frame = FrameInfo {
            function: Some(Arc::from(if info.kind == "main" {
                "[thread main]".to_string()
            } else {
                thread_label(&info)
            })),
            module: Some(Arc::from("[js]")),
            ..Default::default()
        }
        .into();
        for mut s in p.stacks {
            s.frames.push(root.clone());
            merged.stacks.push(s);
        }
        merged.totals.live_bytes += p.totals.live_bytes;
        merged.totals.live_allocs += p.totals.live_allocs;
        merged.totals.allocated_bytes += p.totals.allocated_bytes;
        merged.totals.allocs += p.totals.allocs;
    }
    merged
        .stacks
        .sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    Ok(merged)
}

fn thread_label(info: &ThreadInfo) -> String {
    if info.title.is_empty() {
        format!("[worker {}]", info.id)
    } else {
        info.title.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thread selectors parse; odd ids are refused.
    #[test]
    fn parses_threads() {
        assert_eq!("main".parse::<Thread>().unwrap(), Thread::Main);
        assert_eq!("all".parse::<Thread>().unwrap(), Thread::All);
        assert_eq!("3".parse::<Thread>().unwrap(), Thread::Worker("3".into()));
        assert!("".parse::<Thread>().is_err());
        assert!("../x".parse::<Thread>().is_err());
        assert!("x".repeat(65).parse::<Thread>().is_err());
        assert_eq!(Thread::Worker("7".into()).to_string(), "7");
    }

    /// `attachedToWorker` events become threads; malformed ones are dropped.
    #[test]
    fn reads_attached_workers() {
        let p = json!({"sessionId": "1", "workerInfo": {"workerId": "2", "type": "worker", "title": "[worker 2] cache", "url": "file:///w.js"}, "waitingForDebugger": false});
        let a = attached(&p).unwrap();
        assert_eq!(
            (
                a.session_id.as_str(),
                a.info.id.as_str(),
                a.info.title.as_str(),
                a.info.url.as_str()
            ),
            ("1", "2", "[worker 2] cache", "file:///w.js")
        );
        assert!(attached(&json!({"sessionId": "1"})).is_none());
        assert!(attached(&json!({"sessionId": "a b", "workerInfo": {"workerId": "2"}})).is_none());
    }

    /// A worker's answer nested in `receivedMessageFromWorker` (its message a JSON string, with
    /// escapes): the session id and the inner envelope are read without a generic tree, and the
    /// answer is handed on as text; a sampling profile in it parses with sampling's typed parser.
    #[test]
    fn reads_nested_answers() {
        let inner = json!({"id": 7, "result": {"profile": {"head": {"callFrame": {"functionName": "f\"q", "url": "file:///w.js",
            "lineNumber": 1, "columnNumber": 2}, "selfSize": 64, "id": 1, "children": []}, "samples": [{"size": 64, "nodeId": 1, "ordinal": 1}]}}})
        .to_string();
        let outer = json!({"sessionId": "1", "message": inner, "workerId": "2"}).to_string();
        let w: FromWorker = serde_json::from_str(&outer).unwrap();
        assert_eq!(w.session_id, "1");
        let env = inspector::envelope(&w.message).unwrap();
        assert_eq!(
            (env.id, env.method.is_none(), env.error.is_none()),
            (Some(7), true, true)
        );
        let parsed = sampling::parse_reply(RawReply::from_text(w.message.into_owned())).unwrap();
        assert_eq!(parsed.head.call_frame.function_name, "f\"q");
        assert_eq!((parsed.head.self_size, parsed.samples), (64, 1));

        let err = json!({"id": 8, "error": {"code": -1, "message": "x".repeat(1000)}}).to_string();
        let env = inspector::envelope(&err).unwrap();
        assert_eq!(env.error.map(|m| m.len()), Some(200));
        assert!(inspector::envelope("[1, 2]").is_err());
        assert!(serde_json::from_str::<FromWorker>(r#"{"message": "{}"}"#).is_err());
        let d: Detached = serde_json::from_str(r#"{"sessionId": "3", "workerId": "4"}"#).unwrap();
        assert_eq!(d.session_id, "3");
    }
}
