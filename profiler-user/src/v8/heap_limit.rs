//! V8's used heap against its limit, for the `heap_limit=PCT` trigger: the outside equivalent
//! of Node's `--heapsnapshot-near-heap-limit` (a start flag), for a process started without it.
//!
//! Reading V8's figures needs an inspector session (`v8.getHeapStatistics()` through
//! `Runtime.evaluate`): a window opened in the target, not something to do every poll. So:
//! - the limit (`heap_size_limit`, fixed for the life of the isolate) is read once per process
//!   and cached by process identity (pid and start time: a reused pid is another process);
//! - the trigger polls a cheap outside bound of the used heap instead: the process's
//!   `RssAnon` (`/proc/PID/status`). Live V8 objects sit in pages V8 has touched, which are
//!   resident anonymous memory (swap aside), so used heap <= `RssAnon`; while `RssAnon` is
//!   below the threshold nothing is opened;
//! - only when that bound crosses the threshold does it open a session to read the real used
//!   heap (at most once per [`CHECK_SPACING`] while the bound stays above).
//!
//! Main thread only: a worker's isolate has a limit of its own (see [`super::workers`]).
//!
//! Every session acts on the attached [`Process`] (never a pid) within one [`Budget`].
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Budget, Inspector, Protocol, V8Error};
use crate::process::Process;

/// Deadline of one session that reads the heap figures (open, evaluate, close).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two sessions that read the used heap while the bound stays above.
pub const CHECK_SPACING: Duration = Duration::from_secs(1);
/// Least time between two sessions that check whether a fired trigger can re-arm (its bound
/// still above the re-arm level): re-arming is not urgent.
pub const REARM_CHECK_SPACING: Duration = Duration::from_secs(10);

/// V8's heap figures of the main isolate (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapUsage {
    /// `used_heap_size`: bytes of live and not yet collected objects.
    pub used: u64,
    /// `heap_size_limit`: where V8 gives up (out of memory).
    pub limit: u64,
    /// `total_heap_size`: bytes V8 has reserved for its heap.
    pub total: u64,
}

impl HeapUsage {
    /// `used` as a percentage of `limit`.
    pub fn percent(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.used as f64 * 100.0 / self.limit as f64
        }
    }
}

/// The expression read: the `v8` module's statistics (`process.getBuiltinModule` in recent
/// Node, else `require` of the console's command-line API), as three numbers.
const EXPRESSION: &str = "(() => { const v8 = (typeof process.getBuiltinModule === 'function') ? process.getBuiltinModule('v8') : require('v8'); \
const s = v8.getHeapStatistics(); return [s.used_heap_size, s.heap_size_limit, s.total_heap_size]; })()";

/// Reads the heap figures through an open session of the main thread (the limit is cached for
/// the session's process).
pub fn read(insp: &mut Inspector) -> Result<HeapUsage, V8Error> {
    let u = read_on(insp)?;
    remember(insp.process(), u.limit);
    Ok(u)
}

/// Reads the heap figures through an open session of any thread (nothing cached).
pub fn read_on(insp: &mut impl Protocol) -> Result<HeapUsage, V8Error> {
    let r = insp.call(
        "Runtime.evaluate",
        json!({ "expression": EXPRESSION, "returnByValue": true, "includeCommandLineAPI": true, "silent": true, "timeout": 5000 }),
        Duration::from_secs(10),
    )?;
    if r.get("exceptionDetails").is_some() {
        return Err(V8Error::Remote(
            "v8.getHeapStatistics()".into(),
            "an exception".into(),
        ));
    }
    let v = r
        .get("result")
        .and_then(|r| r.get("value"))
        .and_then(Value::as_array);
    let n = |i: usize| {
        v.and_then(|a| a.get(i))
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(|x| x as u64)
    };
    match (n(0), n(1), n(2)) {
        (Some(used), Some(limit), Some(total)) if limit > 0 => Ok(HeapUsage { used, limit, total }),
        _ => Err(V8Error::Protocol(
            "v8.getHeapStatistics() did not give numbers".into(),
        )),
    }
}

/// Reads the heap figures of `process` through a session of their own, within `budget`.
pub fn usage_of(
    process: &Arc<Process>,
    purpose: &str,
    budget: Budget,
) -> Result<HeapUsage, V8Error> {
    let mut insp = Inspector::open(process.clone(), purpose, budget)?;
    let u = read(&mut insp);
    insp.close()?;
    u
}

/// Heap limits by process identity (pid, start time).
static LIMITS: Mutex<Option<HashMap<(u32, u64), u64>>> = Mutex::new(None);
/// Most processes whose limit is kept (then the cache starts over).
const MAX_CACHED: usize = 4096;

/// The identity of `process`: a reused pid is another process (another start time).
fn identity(process: &Process) -> (u32, u64) {
    (process.pid(), process.start_ticks())
}

fn remember(process: &Process, limit: u64) {
    remember_by(identity(process), limit)
}

fn remember_by(key: (u32, u64), limit: u64) {
    let mut m = LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    let m = m.get_or_insert_with(HashMap::new);
    if m.len() >= MAX_CACHED {
        m.clear();
    }
    m.insert(key, limit);
}

fn cached_by(key: (u32, u64)) -> Option<u64> {
    LIMITS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .get(&key)
        .copied()
}

/// The cached heap limit of `process`, if it was read before (for this process identity).
pub fn cached_limit(process: &Process) -> Option<u64> {
    cached_by(identity(process))
}

/// The heap limit of `process`: cached, else read once through a session within `budget`.
pub fn limit_of(process: &Arc<Process>, purpose: &str, budget: Budget) -> Result<u64, V8Error> {
    if let Some(l) = cached_limit(process) {
        return Ok(l);
    }
    usage_of(process, purpose, budget).map(|u| u.limit)
}

/// `RssAnon` of `pid` in bytes: the upper bound of its used V8 heap.
pub fn rss_anon(pid: u32) -> Option<u64> {
    crate::procfs::status_bytes(pid, "RssAnon").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own identity is read, and a limit is cached by identity: not for another pid, nor
    /// for another process with our pid (another start time).
    #[test]
    fn identity_and_cache() {
        let me = std::process::id();
        let process = Process::open(me).unwrap();
        assert_eq!(identity(&process).0, me);
        assert!(rss_anon(me).is_some_and(|b| b > 0));
        remember(&process, 123 << 20);
        assert_eq!(cached_limit(&process), Some(123 << 20));
        assert_eq!(cached_by((u32::MAX - 1, process.start_ticks())), None);
        assert_eq!(cached_by((me, process.start_ticks() + 1)), None);
        assert_eq!(
            HeapUsage {
                used: 50,
                limit: 200,
                total: 100
            }
            .percent(),
            25.0
        );
    }
}
