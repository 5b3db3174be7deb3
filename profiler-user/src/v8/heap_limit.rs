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
use std::{collections::HashMap, sync::Mutex, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Inspector, Protocol, V8Error};

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

/// Reads the heap figures through an open session.
pub fn read(insp: &mut impl Protocol) -> Result<HeapUsage, V8Error> {
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
        (Some(used), Some(limit), Some(total)) if limit > 0 => {
            remember(insp.pid(), limit);
            Ok(HeapUsage { used, limit, total })
        }
        _ => Err(V8Error::Protocol(
            "v8.getHeapStatistics() did not give numbers".into(),
        )),
    }
}

/// Reads the heap figures of `pid` through a session of their own.
pub fn usage_of(pid: u32, purpose: &str) -> Result<HeapUsage, V8Error> {
    let mut insp = Inspector::open(pid, purpose)?;
    let u = read(&mut insp);
    insp.close()?;
    u
}

/// Heap limits by (pid, start time).
static LIMITS: Mutex<Option<HashMap<(u32, u64), u64>>> = Mutex::new(None);
/// Most processes whose limit is kept (then the cache starts over).
const MAX_CACHED: usize = 4096;

/// When process `pid` started (field 22 of `/proc/PID/stat`, clock ticks since boot): with
/// the pid, the process's identity.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn remember(pid: u32, limit: u64) {
    let Some(start) = start_time(pid) else { return };
    let mut m = LIMITS.lock().unwrap();
    let m = m.get_or_insert_with(HashMap::new);
    if m.len() >= MAX_CACHED {
        m.clear();
    }
    m.insert((pid, start), limit);
}

/// The cached heap limit of process `pid`, if it was read before (by this process identity).
pub fn cached_limit(pid: u32) -> Option<u64> {
    let start = start_time(pid)?;
    LIMITS.lock().unwrap().as_ref()?.get(&(pid, start)).copied()
}

/// The heap limit of `pid`: cached, else read once through a session.
pub fn limit_of(pid: u32, purpose: &str) -> Result<u64, V8Error> {
    if let Some(l) = cached_limit(pid) {
        return Ok(l);
    }
    usage_of(pid, purpose).map(|u| u.limit)
}

/// `RssAnon` of `pid` in bytes: the upper bound of its used V8 heap.
pub fn rss_anon(pid: u32) -> Option<u64> {
    crate::procfs::status_bytes(pid, "RssAnon").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own start time is read, and a limit is cached by identity.
    #[test]
    fn identity_and_cache() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(rss_anon(me).is_some_and(|b| b > 0));
        remember(me, 123 << 20);
        assert_eq!(cached_limit(me), Some(123 << 20));
        assert_eq!(cached_limit(u32::MAX - 1), None);
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
