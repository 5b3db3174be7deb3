//! The JavaScript heap of Node.js processes, from outside, through V8's inspector: heap
//! snapshots streamed as V8 writes them ([`snapshot`]), per-constructor summaries of them and
//! their growth ([`summary`]), growth verdicts across a series of summaries ([`growth`]), the sampling heap profiler rendered like the native heap
//! ([`sampling`]), and garbage collection or (opt-in) expression evaluation. [`inspector`] owns
//! the session: the `SIGUSR1` check, the target's network namespace, the WebSocket, closing;
//! [`guard`] keeps every other process off the inspector while memscope holds it.
//! [`workers`] reaches the process's `worker_threads` through that session (nested sessions of
//! the `NodeWorker` domain); [`heap_limit`] reads V8's heap limit and used heap for the
//! `heap_limit` trigger. Every operation runs on a [`Protocol`]: the main thread's session or a
//! worker's, within the session's one [`Budget`].
//! [`channel`] is the agent's persistent line into a target, which keeps heap object ids
//! stable from one snapshot to the next (an inspector session renumbers them when it ends).
//!
//! Needs: a Node.js target (any version with the inspector, v8+), root or `CAP_SYS_ADMIN`
//! (setns) and the right to signal it. No flag in the target.
pub mod channel;
pub mod growth;
pub mod guard;
pub mod heap_limit;
pub mod inspector;
pub mod sampling;
pub mod snapshot;
pub mod summary;
pub mod workers;

pub use inspector::{Budget, Cancel, Inspector, RawReply};
pub use workers::{Thread, ThreadInfo, WorkerSession};

use std::time::Duration;

use serde_json::{json, Value};

/// A DevTools-protocol session of one JavaScript thread: the main thread's ([`Inspector`]) or a
/// worker's ([`WorkerSession`], nested in the main one). Snapshots, summaries and sampling
/// profiles run on either.
pub trait Protocol {
    /// The process.
    fn pid(&self) -> u32;
    /// The session's one deadline and cancellation (helpers that wait check it).
    fn budget(&self) -> &Budget;
    /// Calls `method` and waits (up to `timeout`) for its result; events that arrive meanwhile
    /// go to `on_event(method, params)`, which may stop the call by returning an error.
    fn call_with_events<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        on_event: F,
    ) -> Result<Value, V8Error> {
        self.call_raw(method, params, timeout, inspector::MAX_MESSAGE_BYTES, on_event)?.result_value()
    }
    /// Like [`Protocol::call_with_events`], accepting an answer of up to `max_bytes` (at most
    /// [`inspector::MAX_PROFILE_MESSAGE_BYTES`]) and returning it unparsed, for the caller to
    /// parse into typed structs.
    fn call_raw<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        on_event: F,
    ) -> Result<RawReply, V8Error>;
    /// Whether `HeapProfiler.disable` may be sent: not on the snapshot channel, where it would
    /// clear the object ids the channel keeps ([`channel`]).
    fn may_disable(&self) -> bool {
        true
    }
    /// Calls `method` and returns its result, ignoring events.
    fn call(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, V8Error> {
        self.call_with_events(method, params, timeout, |_, _| Ok(()))
    }
    /// A full garbage collection (`HeapProfiler.collectGarbage`).
    fn collect_garbage(&mut self) -> Result<(), V8Error> {
        self.call("HeapProfiler.collectGarbage", json!({}), inspector::DEFAULT_CALL_TIMEOUT).map(|_| ())
    }
}

impl Protocol for Inspector {
    fn pid(&self) -> u32 {
        Inspector::pid(self)
    }
    fn budget(&self) -> &Budget {
        Inspector::budget(self)
    }
    fn call_raw<F: FnMut(&str, &Value) -> Result<(), V8Error>>(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        max_bytes: usize,
        on_event: F,
    ) -> Result<RawReply, V8Error> {
        Inspector::call_raw(self, method, params, timeout, max_bytes, on_event)
    }
}

/// Why a V8 operation failed or was refused. Each message is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum V8Error {
    #[error("no process {0}")]
    NoSuchProcess(u32),
    #[error("the process attached as {0} has exited; the pid may now belong to another process: refusing to touch it")]
    Gone(u32),
    #[error("{0} was cancelled: the request ended")]
    Cancelled(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("process {0} does not handle SIGUSR1 (not Node.js, or Node without its inspector): refusing to send a signal that would terminate it")]
    NoSigusr1Handler(u32),
    #[error("the inspector of process {pid} is already open on port {port}: another debugger may be using it; not touching it")]
    AlreadyOpen { pid: u32, port: u16 },
    #[error("port {port} in the network namespace of process {pid} is taken by another process: Node could not start its inspector")]
    PortTaken { pid: u32, port: u16 },
    #[error("refusing to open an unguarded inspector: {0}")]
    Guard(#[from] guard::GuardError),
    #[error("refusing to open the inspector of process {pid}: {reason}")]
    Unguardable { pid: u32, reason: String },
    #[error("the inspector of process {pid} listened on {addr} port {port}, reachable from other hosts: closed it at once, refusing")]
    NotLoopback { pid: u32, addr: String, port: u16 },
    #[error("process {0} did not open an inspector after SIGUSR1 (not Node.js, or started with --disable-sigusr1?)")]
    NoInspector(u32),
    #[error("another debugger is attached to process {0}")]
    DebuggerAttached(u32),
    #[error("an inspector session with process {0} is already in progress")]
    Busy(u32),
    #[error("the inspector of process {pid} still listens on port {port} after closing")]
    StillListening { pid: u32, port: u16 },
    #[error("process {pid} has no JavaScript thread {thread:?} (see the thread listing)")]
    NoSuchThread { pid: u32, thread: String },
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{0} failed in the target: {1}")]
    Remote(String, String),
    #[error("{0} took longer than {1:?}")]
    Timeout(String, std::time::Duration),
    #[error("the heap snapshot is malformed: {0}")]
    Malformed(String),
    #[error("writing the heap snapshot: {0}")]
    Sink(String),
}

impl V8Error {
    /// The HTTP status and error code the API answers with.
    pub fn http(&self) -> (u16, &'static str) {
        match self {
            V8Error::NoSuchProcess(_) => (404, "no_such_process"),
            V8Error::Gone(_) => (410, "target_exited"),
            V8Error::Cancelled(_) => (503, "v8_cancelled"),
            V8Error::TooLarge(_) => (502, "v8_too_large"),
            V8Error::NoSuchThread { .. } => (404, "no_such_thread"),
            V8Error::NoSigusr1Handler(_) => (409, "not_node"),
            V8Error::AlreadyOpen { .. } => (409, "inspector_in_use"),
            V8Error::PortTaken { .. } => (409, "inspector_port_taken"),
            V8Error::Guard(_) => (503, "inspector_guard_unavailable"),
            V8Error::Unguardable { .. } => (409, "inspector_unguardable"),
            V8Error::NotLoopback { .. } => (409, "inspector_not_loopback"),
            V8Error::NoInspector(_) => (409, "no_inspector"),
            V8Error::DebuggerAttached(_) => (409, "debugger_attached"),
            V8Error::Busy(_) => (409, "inspector_busy"),
            V8Error::Timeout(..) => (504, "v8_timeout"),
            _ => (502, "v8_failed"),
        }
    }
}

/// Takes a heap snapshot of `process` and summarizes it as it streams (never held whole),
/// within `budget`.
pub fn summary_of(
    process: std::sync::Arc<crate::process::Process>,
    gc: bool,
    reason: &str,
    budget: inspector::Budget,
) -> Result<summary::HeapSummary, V8Error> {
    let mut insp = Inspector::open(process, &format!("summary ({reason})"), budget)?;
    let s = summary_with(&mut insp, gc, reason)?;
    insp.close()?;
    Ok(s)
}

/// The summary of a snapshot taken through an open session.
pub fn summary_with(insp: &mut impl Protocol, gc: bool, reason: &str) -> Result<summary::HeapSummary, V8Error> {
    let pid = insp.pid();
    summarize_taken(pid, reason, |sink| snapshot::take(insp, gc, inspector::DEFAULT_CALL_TIMEOUT, sink))
}

/// Like [`summary_of`], through the target's snapshot channel ([`channel`]): the agent's way, so
/// that its summaries do not renumber the objects of the heap snapshots users take.
pub fn summary_keeping_ids(
    process: &std::sync::Arc<crate::process::Process>,
    gc: bool,
    reason: &str,
    budget: Budget,
) -> Result<summary::HeapSummary, V8Error> {
    let purpose = format!("summary ({reason})");
    summarize_taken(process.pid(), reason, |sink| snapshot::take_keeping_ids(process, &purpose, gc, budget, sink))
}

/// Summarizes, as it streams, the snapshot that `take` passes to its sink.
fn summarize_taken(
    pid: u32,
    reason: &str,
    take: impl FnOnce(&mut dyn FnMut(&str) -> Result<(), V8Error>) -> Result<u64, V8Error>,
) -> Result<summary::HeapSummary, V8Error> {
    let taken = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let (tx, reader) = summary::ChunkReader::new();
    let reason_owned = reason.to_string();
    let parser = std::thread::spawn(move || summary::summarize(reader, pid, taken, &reason_owned));
    let sent = take(&mut |c: &str| tx.send(c.to_string()).map_err(|_| V8Error::Sink("the summary parser stopped".into())));
    drop(tx);
    let parsed = parser.join().map_err(|_| V8Error::Malformed("the parser panicked".into()))?;
    sent?;
    parsed
}
