//! The audit log's bounds: what a client controls is never written whole, and repeated
//! refusals are written once per interval with a count.
//!
//! The audit log is the `tracing` target `audit` (stderr of the agent, wherever the service
//! manager puts it). Every byte of a request is hostile, and a refused request costs its
//! sender nothing, so without bounds a client with no token could fill the node's disk through
//! our log (60 KiB paths, one line each: +65 MB in 4 s). Here:
//!
//! - [`Clip`] writes a client-controlled value (path, header, user agent, snapshot id) as an
//!   escaped prefix of at most [`CLIP_CHARS`] characters (control characters, quotes,
//!   backslashes and non-ASCII as `\n`, `\u{1b}`...; `…` when cut); the full length goes in a
//!   field of its own.
//! - [`DenialLog`] aggregates denied requests: in each interval (10 s), the first denial of a
//!   (client address, token name, reason) is written in full, at most [`MAX_LINES`] such lines
//!   per interval in all; later ones are counted and written as one summary line per key at the
//!   end of the interval (at most [`MAX_LINES`] again, the rest summed up in one line). Under
//!   any flood the log grows by at most ~2 × `MAX_LINES` + 1 lines of bounded length per
//!   interval: about 100 KiB a minute.
//!
//! No crate is used for this: `tracing` has no rate-limited layer among its maintained crates,
//! and the aggregation needs the request's key, which a generic log throttle does not know.
use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::info;
use warp::http::Method;

use super::{auth::Principal, errors::ApiError};

/// Most characters of a client-controlled value written to the log (after escaping).
pub const CLIP_CHARS: usize = 64;
/// Length of one aggregation interval.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Most full denial lines, and most summary lines, per interval.
pub const MAX_LINES: usize = 20;
/// Most keys counted per interval; past it denials go to the overflow count.
const MAX_KEYS: usize = 4096;

/// A client-controlled string as the log shows it: escaped, at most [`CLIP_CHARS`] characters.
pub struct Clip<'a>(pub &'a str);

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(CLIP_CHARS + 4);
        let mut used = 0;
        for c in self.0.chars() {
            let piece: String = if c.is_ascii_graphic() && c != '\\' && c != '"' || c == ' ' {
                c.to_string()
            } else {
                c.escape_default().collect()
            };
            if used + piece.len() > CLIP_CHARS {
                out.push('…');
                break;
            }
            used += piece.len();
            out.push_str(&piece);
        }
        f.write_str(&out)
    }
}

/// What identifies a run of similar denials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    peer: Option<IpAddr>,
    token: Option<String>,
    code: &'static str,
    status: u16,
}

struct Window {
    start: Instant,
    full_lines: usize,
    /// Denials not written, by key.
    suppressed: HashMap<Key, u64>,
    /// Denials not written and not counted by key (the key map was full).
    overflow: u64,
}

/// Denied requests, written with bounds (see the module doc).
pub struct DenialLog {
    interval: Duration,
    window: Mutex<Window>,
}

impl Default for DenialLog {
    fn default() -> Self {
        DenialLog::new(INTERVAL)
    }
}

impl DenialLog {
    pub fn new(interval: Duration) -> DenialLog {
        DenialLog {
            interval,
            window: Mutex::new(Window {
                start: Instant::now(),
                full_lines: 0,
                suppressed: HashMap::new(),
                overflow: 0,
            }),
        }
    }

    /// A denied request: written in full when it is the first of its key in this interval
    /// (and the interval's line budget allows), else counted.
    pub fn record(&self, p: Option<&Principal>, peer: Option<IpAddr>, method: &Method, path: &str, err: &ApiError) {
        let key = Key { peer, token: p.map(|p| p.name.clone()), code: err.code, status: err.status.as_u16() };
        let (summary, write) = {
            let mut w = self.window.lock().unwrap();
            let summary = self.roll(&mut w, Instant::now());
            let write = if w.suppressed.contains_key(&key) {
                *w.suppressed.get_mut(&key).expect("present") += 1;
                false
            } else if w.suppressed.len() >= MAX_KEYS {
                w.overflow += 1;
                false
            } else if w.full_lines >= MAX_LINES {
                w.suppressed.insert(key.clone(), 1);
                false
            } else {
                w.full_lines += 1;
                w.suppressed.insert(key.clone(), 0);
                true
            };
            (summary, write)
        };
        emit(summary, self.interval);
        if write {
            let (name, role) = p.map_or(("-", "-"), |p| (p.name.as_str(), p.role.as_str()));
            let peer = peer.map_or_else(|| "-".to_string(), |ip| ip.to_string());
            info!(target: "audit", token = name, role, %peer, %method, route = %Clip(path), route_len = path.len(),
                  result = "denied", status = err.status.as_u16(), code = err.code,
                  "request denied (more like it in the next {} s are counted)", self.interval.as_secs());
        }
    }

    /// Writes the summary of the interval if it is over (the agent calls this every interval,
    /// so counts are written even when the flood stops).
    pub fn flush_if_due(&self) {
        let summary = self.roll(&mut self.window.lock().unwrap(), Instant::now());
        emit(summary, self.interval);
    }

    /// Ends the window when its interval is over; returns what to write.
    fn roll(&self, w: &mut Window, now: Instant) -> Option<Summary> {
        if now.saturating_duration_since(w.start) < self.interval {
            return None;
        }
        let mut counts: Vec<(Key, u64)> = w.suppressed.drain().filter(|(_, n)| *n > 0).collect();
        let overflow = std::mem::take(&mut w.overflow);
        w.start = now;
        w.full_lines = 0;
        if counts.is_empty() && overflow == 0 {
            return None;
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let rest = counts.split_off(counts.len().min(MAX_LINES));
        Some(Summary { counts, rest_keys: rest.len(), rest: rest.iter().map(|(_, n)| n).sum::<u64>() + overflow })
    }
}

struct Summary {
    counts: Vec<(Key, u64)>,
    rest_keys: usize,
    rest: u64,
}

fn emit(summary: Option<Summary>, interval: Duration) {
    let Some(s) = summary else { return };
    let secs = interval.as_secs();
    for (k, n) in &s.counts {
        let peer = k.peer.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        info!(target: "audit", token = k.token.as_deref().unwrap_or("-"), %peer, result = "denied", status = k.status,
              code = k.code, count = n, "requests denied in the last {secs} s (not written one by one)");
    }
    if s.rest > 0 {
        info!(target: "audit", result = "denied", count = s.rest, keys = s.rest_keys,
              "requests denied in the last {secs} s from other addresses or for other reasons (not written one by one)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long hostile value is cut to a short escaped prefix with no raw control byte.
    #[test]
    fn clip_escapes_and_cuts() {
        let s = format!("/v1/\u{1b}[2J\n\"x\\{}", "A".repeat(60_000));
        let out = Clip(&s).to_string();
        assert!(out.chars().count() <= CLIP_CHARS + 1, "{out}");
        assert!(out.ends_with('…'));
        assert!(!out.bytes().any(|b| b.is_ascii_control()), "{out:?}");
        assert!(out.starts_with(r#"/v1/\u{1b}[2J\n\"x\\AAA"#), "{out}");
        assert_eq!(Clip("/v1/targets").to_string(), "/v1/targets");
        assert_eq!(Clip("é").to_string(), "\\u{e9}");
    }

    /// Repeats of a key are counted, not written; the summary comes when the interval ends,
    /// and the full lines of an interval are capped.
    #[test]
    fn denials_are_aggregated_per_key_and_interval() {
        let log = DenialLog::new(Duration::from_secs(3600));
        let err = ApiError::unauthorized("invalid_token", "unknown token");
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            log.record(None, Some(peer), &Method::GET, "/x", &err);
        }
        for i in 0..100u32 {
            log.record(None, Some(IpAddr::from(i.to_be_bytes())), &Method::GET, "/x", &err);
        }
        let mut w = log.window.lock().unwrap();
        assert_eq!(w.full_lines, MAX_LINES);
        assert_eq!(w.suppressed[&Key { peer: Some(peer), token: None, code: "invalid_token", status: 401 }], 999);
        let s = log.roll(&mut w, Instant::now() + Duration::from_secs(3601)).expect("a summary");
        assert!(s.counts.len() <= MAX_LINES);
        assert_eq!(s.counts[0].1, 999);
        let total: u64 = s.counts.iter().map(|(_, n)| n).sum::<u64>() + s.rest;
        assert_eq!(total, 999 + (100 - (MAX_LINES as u64 - 1)));
        assert!(w.suppressed.is_empty() && w.full_lines == 0);
    }
}
