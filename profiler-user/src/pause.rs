//! The pauses memscope imposes on a traced process, and what they cost its native figures.
//!
//! A V8 heap snapshot, summary or garbage collection stops the JavaScript thread while V8
//! walks (and serializes) the heap, and V8 calls `malloc` millions of times doing it. With
//! memscope's allocator probes in the process every one of those calls traps into the kernel
//! (~0.5-1.3 us even when the eBPF program returns at once): the pause grows 5-7x. So around
//! every such operation the target's allocator probes leave the process ([`PauseGuard`]:
//! suspended when the first window opens, put back when the last one closes, on every path,
//! panics included) and the window is accounted for ([`PauseLedger`]):
//!
//! - *probe gaps*: how many windows and how long in all; allocations and frees in them were
//!   not seen, so an allocation freed during a gap stays listed as live (`probe_gaps` in the
//!   targets table, `leaks.json` and `/metrics`);
//! - *paused share*: the wall time of memscope's V8 operations on the target in the last
//!   `window` (a sliding window), against a budget ([`PauseBudget`], 5% of 60 s by default):
//!   a triggered snapshot whose V8 summary, if it lasts as long as the target's last one,
//!   would take the share past it is refused and counted (`pause_budget`). The first pause of
//!   a target is admitted whatever its length (not known before): a first summary longer
//!   than the budget (3 s of 60 s) goes past it once;
//! - *self-caused trigger hits*: probe triggers (`gc`, return, USDT) hit while a window is open
//!   were caused by memscope (the snapshot's own garbage collections): they never fire a
//!   snapshot and are counted as suppressed (`self_caused_gc`).
//!
//! The window includes opening and closing the inspector (a few milliseconds): an
//! over-estimate of the pause, never an under-estimate. A trigger hit of the application that
//! lands between the window's first trigger-counter read and the V8 operation (tens of
//! milliseconds, while the links are released) is taken for memscope's.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::target::TracedTarget;

/// The share of wall time memscope may pause a target, unless told otherwise.
pub const DEFAULT_BUDGET_PERCENT: f64 = 5.0;
/// The sliding window the share is measured over, unless told otherwise.
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(60);
/// Windows older than this are forgotten (the longest budget window accepted).
pub const MAX_BUDGET_WINDOW: Duration = Duration::from_secs(3600);

/// How much of its wall time memscope may pause a target: `percent` of any `window`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PauseBudget {
    pub percent: f64,
    pub window: Duration,
}

impl Default for PauseBudget {
    fn default() -> Self {
        PauseBudget { percent: DEFAULT_BUDGET_PERCENT, window: DEFAULT_BUDGET_WINDOW }
    }
}

impl std::fmt::Display for PauseBudget {
    /// `5%/60s`, the form [`PauseBudget::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%/{}s", self.percent, self.window.as_secs())
    }
}

impl PauseBudget {
    /// `PCT%` or `PCT%/WINDOW` (`5%`, `2.5%/5m`): a percentage from 0 (never pause on its own)
    /// to 100, over a window of 1 s to 1 h (60 s when not given).
    pub fn parse(s: &str) -> Result<PauseBudget, String> {
        let s = s.trim();
        let (pct, window) = match s.split_once('/') {
            Some((p, w)) => (p, Some(w)),
            None => (s, None),
        };
        let shape = || format!("invalid pause budget {s:?}: expected PCT% or PCT%/WINDOW, e.g. 5% or 2%/5m");
        let percent: f64 = pct.trim().strip_suffix('%').ok_or_else(shape)?.trim().parse().map_err(|_| shape())?;
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(format!("invalid pause budget {s:?}: the percentage is 0 to 100"));
        }
        let window = match window {
            None => DEFAULT_BUDGET_WINDOW,
            Some(w) => crate::units::parse_duration(w.trim())?,
        };
        if window < Duration::from_secs(1) || window > MAX_BUDGET_WINDOW {
            return Err(format!("invalid pause budget {s:?}: the window is 1s to 1h"));
        }
        Ok(PauseBudget { percent, window })
    }
}

static DEFAULT_BUDGET: Mutex<Option<PauseBudget>> = Mutex::new(None);

/// The budget of targets and triggers that name none (`memscope agent --pause-budget`).
pub fn default_budget() -> PauseBudget {
    DEFAULT_BUDGET.lock().unwrap().unwrap_or_default()
}

/// Sets [`default_budget`] for this process (the agent, at start).
pub fn set_default_budget(b: PauseBudget) {
    *DEFAULT_BUDGET.lock().unwrap() = Some(b);
}

/// The probe gaps of a target: windows during which its allocator probes were out of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ProbeGaps {
    pub count: u64,
    pub total_ms: u64,
    /// When the last one ended, milliseconds since the Unix epoch (0: none yet).
    pub last_end_ms: u64,
}

/// A target's pauses as the targets table shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PauseStatus {
    pub probe_gaps: ProbeGaps,
    /// Paused time in the budget's window (the last `budget_window_s`), and its share of that
    /// window, in percent.
    pub paused_ms: u64,
    pub paused_percent: f64,
    /// The budget (`PCT%/WINDOWs`).
    pub budget: String,
    pub budget_percent: f64,
    pub budget_window_s: u64,
    /// Firings refused, by reason: `pause_budget`, `self_caused_gc`.
    pub suppressed: std::collections::BTreeMap<String, u64>,
    /// A window is open now.
    pub paused: bool,
}

#[derive(Default)]
struct Record {
    gaps: ProbeGaps,
    total: Duration,
    /// Ended windows, oldest first.
    recent: VecDeque<(Instant, Instant)>,
    /// The last window's length: what the next one is expected to take.
    last: Option<Duration>,
    /// Hits of each trigger slot (index in `TriggerHost::trigger_hits`) inside windows.
    self_caused: Vec<u64>,
    suppressed_budget: u64,
    suppressed_self_caused: u64,
}

/// Open windows of one target: the first suspends the probes, the last puts them back.
struct Gate {
    open: u32,
    since: Option<Instant>,
    hits_at_open: Vec<u64>,
}

/// One target's pause accounting (see the module doc).
pub struct PauseLedger {
    started: Instant,
    gate: Mutex<Gate>,
    open: AtomicU32,
    record: Mutex<Record>,
    resume_failures: AtomicU64,
}

impl Default for PauseLedger {
    fn default() -> Self {
        PauseLedger::new()
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl PauseLedger {
    pub fn new() -> PauseLedger {
        PauseLedger {
            started: Instant::now(),
            gate: Mutex::new(Gate { open: 0, since: None, hits_at_open: Vec::new() }),
            open: AtomicU32::new(0),
            record: Mutex::new(Record::default()),
            resume_failures: AtomicU64::new(0),
        }
    }

    /// The probe gaps so far.
    pub fn gaps(&self) -> ProbeGaps {
        self.record.lock().unwrap().gaps
    }

    /// Whether a window is open now.
    pub fn paused(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }

    /// Paused time within `window` before `now` (the open window counted up to `now`).
    pub fn paused_within(&self, window: Duration, now: Instant) -> Duration {
        let from = now.checked_sub(window).unwrap_or(self.started).max(self.started);
        let overlap = |a: Instant, b: Instant| b.min(now).saturating_duration_since(a.max(from));
        let mut sum: Duration = self.record.lock().unwrap().recent.iter().map(|(a, b)| overlap(*a, *b)).sum();
        if let Some(since) = self.gate.try_lock().ok().and_then(|g| g.since) {
            sum += overlap(since, now);
        }
        sum
    }

    /// The wall time the share is measured over: the whole window, also while the target has
    /// been traced for less (it ran unpaused before).
    fn base(&self, window: Duration, _now: Instant) -> Duration {
        window.max(Duration::from_millis(1))
    }

    /// Paused share in percent of `budget`'s window.
    pub fn share_percent(&self, budget: &PauseBudget, now: Instant) -> f64 {
        self.paused_within(budget.window, now).as_secs_f64() * 100.0 / self.base(budget.window, now).as_secs_f64()
    }

    /// Whether one more pause, as long as the last one, keeps the share within `budget`. The
    /// first pause is always admitted (its length is not known yet); a budget of 0 admits none.
    pub fn admits(&self, budget: &PauseBudget, now: Instant) -> bool {
        if budget.percent <= 0.0 {
            return false;
        }
        let next = self.record.lock().unwrap().last.unwrap_or_default();
        let paused = self.paused_within(budget.window, now) + next;
        paused.as_secs_f64() <= budget.percent / 100.0 * self.base(budget.window, now).as_secs_f64()
    }

    /// Counts a firing refused by the budget.
    pub fn note_budget_refusal(&self) {
        self.record.lock().unwrap().suppressed_budget += 1;
    }

    /// Trigger hits (by trigger slot) that memscope caused, cumulative; `None` while a window
    /// is open (the hits of now cannot be told apart yet: wait for it to close).
    pub fn self_caused_hits(&self) -> Option<Vec<u64>> {
        if self.paused() {
            return None;
        }
        Some(self.record.lock().unwrap().self_caused.clone())
    }

    /// Counts probe-trigger hits that were not taken because memscope caused them.
    pub fn note_self_caused(&self, n: u64) {
        self.record.lock().unwrap().suppressed_self_caused += n;
    }

    /// The status under `budget`.
    pub fn status(&self, budget: &PauseBudget) -> PauseStatus {
        let now = Instant::now();
        let paused = self.paused_within(budget.window, now);
        let r = self.record.lock().unwrap();
        let mut suppressed = std::collections::BTreeMap::new();
        suppressed.insert("pause_budget".to_string(), r.suppressed_budget);
        suppressed.insert("self_caused_gc".to_string(), r.suppressed_self_caused);
        let gaps = r.gaps;
        drop(r);
        PauseStatus {
            probe_gaps: gaps,
            paused_ms: paused.as_millis() as u64,
            paused_percent: paused.as_secs_f64() * 100.0 / self.base(budget.window, now).as_secs_f64(),
            budget: budget.to_string(),
            budget_percent: budget.percent,
            budget_window_s: budget.window.as_secs(),
            suppressed,
            paused: self.paused(),
        }
    }

    /// Opens a window on `target`: the first open one suspends its allocator probes.
    fn open(&self, target: &dyn TracedTarget) {
        let mut gate = self.gate.lock().unwrap();
        gate.open += 1;
        self.open.store(gate.open, Ordering::Release);
        if gate.open > 1 {
            return;
        }
        gate.hits_at_open = trigger_hits(target);
        if let Err(e) = target.suspend_probes() {
            warn!(pid = target.pid(), error = %crate::errors::one_line(&e), "cannot suspend the allocator probes: the V8 operation runs with them");
        }
        gate.since = Some(Instant::now());
    }

    /// Closes a window opened at `started`: the last one puts the probes back and records the
    /// gap (from the suspension to now).
    fn close(&self, target: &dyn TracedTarget) {
        let mut gate = self.gate.lock().unwrap();
        gate.open = gate.open.saturating_sub(1);
        if gate.open > 0 {
            self.open.store(gate.open, Ordering::Release);
            return;
        }
        let hits = trigger_hits(target);
        if let Err(e) = target.resume_probes() {
            self.resume_failures.fetch_add(1, Ordering::Relaxed);
            warn!(pid = target.pid(), error = %crate::errors::one_line(&e), "cannot put the allocator probes back after a V8 operation");
        }
        let end = Instant::now();
        let since = gate.since.take().unwrap_or(end);
        let length = end.saturating_duration_since(since);
        {
            let mut r = self.record.lock().unwrap();
            r.gaps.count += 1;
            r.total += length;
            r.gaps.total_ms = r.total.as_millis() as u64;
            r.gaps.last_end_ms = wall_ms();
            r.last = Some(length);
            r.recent.push_back((since, end));
            while r.recent.front().is_some_and(|(_, b)| end.saturating_duration_since(*b) > MAX_BUDGET_WINDOW) {
                r.recent.pop_front();
            }
            if r.self_caused.len() < hits.len() {
                r.self_caused.resize(hits.len(), 0);
            }
            for (i, h) in hits.iter().enumerate() {
                let before = gate.hits_at_open.get(i).copied().unwrap_or(*h);
                r.self_caused[i] += h.saturating_sub(before);
            }
        }
        // Published last: a poll that sees no open window sees its self-caused hits.
        self.open.store(0, Ordering::Release);
        info!(pid = target.pid(), ms = length.as_millis() as u64, "allocator probes back after a V8 operation");
    }
}

fn trigger_hits(target: &dyn TracedTarget) -> Vec<u64> {
    target.trigger_host().and_then(|h| h.trigger_hits().ok()).unwrap_or_default()
}

/// One V8 operation's window on a target (see the module doc): the allocator probes are out
/// of the process from [`PauseGuard::begin`] until the guard is dropped.
pub struct PauseGuard {
    target: Arc<dyn TracedTarget>,
}

impl PauseGuard {
    /// Opens a window on `target`; `None` when the target keeps no pause ledger (then nothing
    /// is suspended).
    pub fn begin(target: Arc<dyn TracedTarget>) -> Option<PauseGuard> {
        target.pauses()?.open(&*target);
        Some(PauseGuard { target })
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        if let Some(ledger) = self.target.pauses() {
            ledger.close(&*self.target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Budgets parse with and without a window; bad ones say why.
    #[test]
    fn parses_budgets() {
        assert_eq!(PauseBudget::parse("5%").unwrap(), PauseBudget::default());
        assert_eq!(PauseBudget::parse(" 2.5%/5m ").unwrap(), PauseBudget { percent: 2.5, window: Duration::from_secs(300) });
        assert_eq!(PauseBudget::parse("0%").unwrap().percent, 0.0);
        assert!(PauseBudget::parse("5").unwrap_err().contains("PCT%"));
        assert!(PauseBudget::parse("101%").is_err());
        assert!(PauseBudget::parse("5%/100ms").is_err());
        assert!(PauseBudget::parse("5%/2h").is_err());
        assert_eq!(PauseBudget::parse("5%/60s").unwrap().to_string(), "5%/60s");
    }

    /// The share counts the windows that overlap the sliding window; the next pause is
    /// admitted only when one as long as the last keeps the share within the budget.
    #[test]
    fn share_and_admission() {
        let l = PauseLedger::new();
        let t0 = l.started;
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        {
            let mut r = l.record.lock().unwrap();
            r.recent.push_back((s(1_000), s(3_000)));
            r.last = Some(Duration::from_secs(2));
        }
        let b = PauseBudget { percent: 5.0, window: Duration::from_secs(60) };
        assert!((l.share_percent(&b, s(10_000)) - 2.0 * 100.0 / 60.0).abs() < 1e-6, "2 s of 60 s");
        assert!(!l.admits(&b, s(10_000)), "4 s of 60 s is past 5%");
        assert!(!l.admits(&b, s(61_000)), "all of the first pause is still in the window");
        assert!(l.admits(&b, s(62_000)), "1 s of it left in the window, 3 s of 60 is 5%");
        assert!((l.share_percent(&b, s(120_000))).abs() < 1e-6, "the window slid past it");
        assert!(!l.admits(&PauseBudget { percent: 0.0, ..b }, s(120_000)));
        assert!(PauseLedger::new().admits(&b, Instant::now()), "the first pause is admitted");
    }
}
