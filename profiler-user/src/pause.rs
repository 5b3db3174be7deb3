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
//!   `window` (a sliding window), against a budget ([`PauseBudget`], 5% of 60 s by default).
//!   A triggered summary is admitted only if its own *predicted* pause fits ([`PauseLedger::admit`]):
//!   the prediction is the target's anonymous memory (`RssAnon`, read from `/proc` at no cost
//!   to the target) times a per-target rate in milliseconds per MiB, learned from every summary
//!   window that completed ([`Operation::Summary`]; it rises at once to a slower summary and
//!   falls by a quarter of the way to a faster one), [`DEFAULT_MS_PER_MIB`] until the first,
//!   with a margin ([`PREDICTION_MARGIN`]).
//!   A firing whose predicted pause would take the share past the budget is refused
//!   (`pause_budget`); one whose predicted pause alone is more than the budget ever allows
//!   (more than `percent` of `window`) is refused as `pause_exceeds_budget`, logged once, and
//!   shown in the targets table: it would never fit, whatever the wait;
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
/// The rate (milliseconds per MiB of the target's anonymous memory) until one of its
/// summaries has been measured: with [`PREDICTION_MARGIN`], above what a summary took on a
/// loaded 2-core machine (see docs/performance.md), so that the first one does not go past
/// the budget.
pub const DEFAULT_MS_PER_MIB: f64 = 100.0;
/// Predictions are the rate times the size times this: one summary may take longer than the
/// last on a loaded machine.
pub const PREDICTION_MARGIN: f64 = 1.25;
/// The kind of V8 operation a pause window is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A heap summary (a snapshot summarized by the agent as it streams): V8's own pace, the
    /// operation the budget predicts; its length teaches the ledger the target's rate.
    Summary,
    /// Anything else (a GC; a heap snapshot streamed at the pace of an HTTP client): counted
    /// in the share, not learned from.
    Other,
}

/// What the budget says of one more triggered summary ([`PauseLedger::admit`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// It fits: its predicted pause keeps the share within the budget.
    Admit { predicted: Duration },
    /// Not now: with its predicted pause the share would pass the budget (`pause_budget`).
    OverBudget { predicted: Duration, paused: Duration, allowed: Duration },
    /// Never: its predicted pause alone is more than the budget allows in a whole window
    /// (`pause_exceeds_budget`); also every firing under a budget of 0%.
    ExceedsBudget { predicted: Duration, allowed: Duration },
}

impl Admission {
    /// The suppression reason of a refusal (`None`: admitted).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Admission::Admit { .. } => None,
            Admission::OverBudget { .. } => Some("pause_budget"),
            Admission::ExceedsBudget { .. } => Some("pause_exceeds_budget"),
        }
    }
}

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
    /// Firings refused, by reason: `pause_budget`, `pause_exceeds_budget`, `self_caused_gc`.
    pub suppressed: std::collections::BTreeMap<String, u64>,
    /// A window is open now.
    pub paused: bool,
    /// The learned summary rate, milliseconds per MiB of anonymous memory (`None`: no summary
    /// measured yet, the default is used).
    pub rate_ms_per_mib: Option<f64>,
    /// The predicted pause of the last triggered summary the budget was asked about.
    pub predicted_ms: Option<u64>,
    /// The last prediction said one summary alone needs more than the budget ever allows:
    /// triggered summaries of this target are refused until it changes.
    pub exceeds_budget: bool,
    /// Why the last refused firing was refused, with its predicted pause.
    pub last_refusal: Option<String>,
}

#[derive(Default)]
struct Record {
    gaps: ProbeGaps,
    total: Duration,
    /// Ended windows, oldest first.
    recent: VecDeque<(Instant, Instant)>,
    /// The learned summary rate, ms per MiB of anonymous memory.
    rate: Option<f64>,
    /// The anonymous memory at the start of the last measured summary, and how much more the
    /// summary itself left in the process (V8's snapshot structures, memory the allocator
    /// keeps): not heap a next summary walks.
    anon_before: u64,
    inflation: u64,
    /// The last prediction, and whether it exceeded the whole budget.
    predicted: Option<Duration>,
    exceeds: bool,
    /// The exceeding was logged (once until a summary is admitted again).
    exceeds_logged: bool,
    last_refusal: Option<String>,
    /// Hits of each trigger slot (index in `TriggerHost::trigger_hits`) inside windows.
    self_caused: Vec<u64>,
    suppressed_budget: u64,
    suppressed_exceeds: u64,
    suppressed_self_caused: u64,
}

/// Open windows of one target: the first suspends the probes, the last puts them back.
struct Gate {
    open: u32,
    since: Option<Instant>,
    hits_at_open: Vec<u64>,
    /// The window is one summary alone, of a target of this much anonymous memory: its
    /// length teaches the rate.
    learn_bytes: Option<u64>,
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
            gate: Mutex::new(Gate { open: 0, since: None, hits_at_open: Vec::new(), learn_bytes: None }),
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

    /// The pause a summary of a target of `anon_bytes` anonymous memory is predicted to take.
    /// What the last summary left in the process is not counted (the anonymous memory of a
    /// Node.js service grows by several times its heap after a heap snapshot and does not come
    /// back), but growth since is.
    pub fn predict(&self, anon_bytes: u64) -> Duration {
        let r = self.record.lock().unwrap();
        let rate = r.rate.unwrap_or(DEFAULT_MS_PER_MIB);
        let size = if r.inflation > 0 { anon_bytes.saturating_sub(r.inflation).max(r.anon_before.min(anon_bytes)) } else { anon_bytes };
        Duration::from_secs_f64((PREDICTION_MARGIN * rate * size as f64 / MIB / 1e3).min(MAX_BUDGET_WINDOW.as_secs_f64()))
    }

    /// Whether one more summary of a target of `anon_bytes` anonymous memory keeps the share
    /// within `budget` (see [`Admission`]); the prediction is kept for the status. A budget
    /// of 0 admits none.
    pub fn admit(&self, budget: &PauseBudget, anon_bytes: u64, now: Instant) -> Admission {
        let predicted = self.predict(anon_bytes);
        let allowed = Duration::from_secs_f64(budget.percent / 100.0 * self.base(budget.window, now).as_secs_f64());
        let paused = self.paused_within(budget.window, now);
        let verdict = if budget.percent <= 0.0 || predicted > allowed {
            Admission::ExceedsBudget { predicted, allowed }
        } else if paused + predicted > allowed {
            Admission::OverBudget { predicted, paused, allowed }
        } else {
            Admission::Admit { predicted }
        };
        let mut r = self.record.lock().unwrap();
        r.predicted = Some(predicted);
        r.exceeds = matches!(verdict, Admission::ExceedsBudget { .. });
        if !r.exceeds {
            r.exceeds_logged = false;
        }
        verdict
    }

    /// Counts a firing the budget refused (`verdict` of [`PauseLedger::admit`]), keeping its
    /// reason; logs once when one summary alone needs more than the budget ever allows.
    pub fn note_refusal(&self, pid: u32, budget: &PauseBudget, verdict: &Admission) {
        let secs = |d: &Duration| format!("{:.1} s", d.as_secs_f64());
        let mut r = self.record.lock().unwrap();
        let rate = match r.rate {
            Some(x) => format!("{x:.1} ms/MiB measured, x{PREDICTION_MARGIN}"),
            None => format!("{DEFAULT_MS_PER_MIB:.0} ms/MiB until one is measured, x{PREDICTION_MARGIN}"),
        };
        let why = match verdict {
            Admission::Admit { .. } => return,
            Admission::OverBudget { predicted, paused, allowed } => {
                r.suppressed_budget += 1;
                format!(
                    "pause_budget: a summary is predicted to pause the target {} ({rate}); {} of the {} that {budget} allows are used",
                    secs(predicted), secs(paused), secs(allowed)
                )
            }
            Admission::ExceedsBudget { predicted, allowed } => {
                r.suppressed_exceeds += 1;
                let why = format!(
                    "pause_exceeds_budget: a summary is predicted to pause the target {} ({rate}), more than the {} that {budget} ever allows",
                    secs(predicted), secs(allowed)
                );
                if !r.exceeds_logged {
                    r.exceeds_logged = true;
                    let pct = (predicted.as_secs_f64() * 100.0 / budget.window.as_secs_f64()).ceil();
                    let minutes = (predicted.as_secs_f64() * 100.0 / budget.percent.max(0.01) / 60.0).ceil();
                    let instead = if pct <= 100.0 {
                        format!("a budget of {pct}% of this window, or a window of {minutes} min at {}%, would admit one", budget.percent)
                    } else if minutes <= 60.0 {
                        format!("a window of {minutes} min at {}% would admit one", budget.percent)
                    } else {
                        "no budget of at most 1 h would admit one (the pause alone is that long)".to_string()
                    };
                    warn!(pid, budget = %budget, "{why}: its triggered summaries are refused; {instead}");
                }
                why
            }
        };
        r.last_refusal = Some(why);
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
        suppressed.insert("pause_exceeds_budget".to_string(), r.suppressed_exceeds);
        suppressed.insert("self_caused_gc".to_string(), r.suppressed_self_caused);
        let gaps = r.gaps;
        let (rate, predicted, exceeds, last_refusal) = (r.rate, r.predicted, r.exceeds, r.last_refusal.clone());
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
            rate_ms_per_mib: rate,
            predicted_ms: predicted.map(|d| d.as_millis() as u64),
            exceeds_budget: exceeds,
            last_refusal,
        }
    }

    /// Opens a window on `target` for `op`: the first open one suspends its allocator probes.
    fn open(&self, target: &dyn TracedTarget, op: Operation) {
        let mut gate = self.gate.lock().unwrap();
        gate.open += 1;
        self.open.store(gate.open, Ordering::Release);
        if gate.open > 1 {
            // Two operations at once: the length is not one summary's.
            gate.learn_bytes = None;
            return;
        }
        gate.learn_bytes = if op == Operation::Summary { anon_bytes(target) } else { None };
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
        let anon_after = gate.learn_bytes.and_then(|_| anon_bytes(target));
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
            if let Some(bytes) = gate.learn_bytes.take().filter(|b| *b >= MIB as u64) {
                let sample = length.as_secs_f64() * 1e3 * MIB / bytes as f64;
                r.rate = Some(match r.rate {
                    Some(old) if sample < old => old * 0.75 + sample * 0.25,
                    _ => sample,
                });
                if let Some(after) = anon_after {
                    (r.anon_before, r.inflation) = (bytes, after.saturating_sub(bytes));
                }
            }
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

const MIB: f64 = 1024.0 * 1024.0;

/// The anonymous memory of the process `target` attached (`RssAnon`), the size a pause is
/// predicted from; `None` when it has exited or cannot be read.
pub fn anon_bytes(target: &dyn TracedTarget) -> Option<u64> {
    if target.process().is_some_and(|p| !p.alive()) {
        return None;
    }
    crate::procfs::status_bytes(target.pid(), "RssAnon").ok()
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
    /// Opens a window on `target` for `op`; `None` when the target keeps no pause ledger
    /// (then nothing is suspended).
    pub fn begin(target: Arc<dyn TracedTarget>, op: Operation) -> Option<PauseGuard> {
        target.pauses()?.open(&*target, op);
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

    /// The share counts the windows that overlap the sliding window; a summary is admitted
    /// only when its predicted pause (anonymous memory times the rate) keeps the share within
    /// the budget, and refused as exceeding it when it alone is more than the budget allows.
    #[test]
    fn share_and_admission() {
        let l = PauseLedger::new();
        let t0 = l.started;
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let mib = |n: u64| n << 20;
        {
            let mut r = l.record.lock().unwrap();
            r.recent.push_back((s(1_000), s(3_000)));
            r.rate = Some(8.0);
        }
        let b = PauseBudget { percent: 5.0, window: Duration::from_secs(60) };
        assert!((l.share_percent(&b, s(10_000)) - 2.0 * 100.0 / 60.0).abs() < 1e-6, "2 s of 60 s");
        assert_eq!(l.predict(mib(200)), Duration::from_secs(2), "8 ms/MiB of 200 MiB, and the margin");
        let over = l.admit(&b, mib(200), s(10_000));
        assert_eq!(over.reason(), Some("pause_budget"), "2 s + 2 s of 60 s is past 5%: {over:?}");
        assert!(!l.status(&b).exceeds_budget);
        assert_eq!(l.admit(&b, mib(100), s(10_000)), Admission::Admit { predicted: Duration::from_secs(1) }, "2 s + 1 s is 5%");
        assert!(l.admit(&b, mib(200), s(61_000)).reason().is_some(), "all of the first pause is still in the window");
        assert!(l.admit(&b, mib(200), s(62_000)).reason().is_none(), "1 s of it left in the window, 3 s of 60 is 5%");
        assert!((l.share_percent(&b, s(120_000))).abs() < 1e-6, "the window slid past it");
        let never = l.admit(&b, mib(400), s(120_000));
        assert_eq!(never.reason(), Some("pause_exceeds_budget"), "4 s alone is past the 3 s of any window: {never:?}");
        l.note_refusal(1, &b, &never);
        l.note_refusal(1, &b, &over);
        let st = l.status(&b);
        assert!(st.exceeds_budget && st.predicted_ms == Some(4_000), "{st:?}");
        assert_eq!((st.suppressed["pause_budget"], st.suppressed["pause_exceeds_budget"]), (1, 1));
        assert!(st.last_refusal.as_deref().unwrap().contains("2.0 s"), "{st:?}");
        assert_eq!(l.admit(&PauseBudget { percent: 0.0, ..b }, 0, s(120_000)).reason(), Some("pause_exceeds_budget"));
        // Before any summary was measured: the default rate.
        let fresh = PauseLedger::new();
        assert_eq!(fresh.predict(mib(10)), Duration::from_secs_f64(PREDICTION_MARGIN * DEFAULT_MS_PER_MIB * 10.0 / 1e3));
    }

    /// The rate rises at once to a slower summary and falls by a quarter of the way to a
    /// faster one; only a window of one summary teaches it.
    #[test]
    fn learns_the_rate() {
        let l = PauseLedger::new();
        let learn = |bytes: u64, ms: u64| {
            let mut g = l.gate.lock().unwrap();
            let now = Instant::now();
            g.since = Some(now - Duration::from_millis(ms));
            g.learn_bytes = Some(bytes);
            g.open = 1;
            drop(g);
            l.close(&NoTarget);
            l.record.lock().unwrap().rate.unwrap()
        };
        let r = learn(100 << 20, 1_000);
        assert!((r - 10.0).abs() < 0.5, "1 s for 100 MiB: {r}");
        let r = learn(100 << 20, 3_000);
        assert!((r - 30.0).abs() < 0.5, "slower: at once: {r}");
        let r = learn(100 << 20, 1_000);
        assert!((r - 25.0).abs() < 0.5, "faster: a quarter of the way: {r}");
        assert_eq!(l.status(&PauseBudget::default()).rate_ms_per_mib.map(|x| x.round()), Some(25.0));
    }

    /// What the last summary left in the process is not counted in the next prediction;
    /// growth since is.
    #[test]
    fn prediction_leaves_out_what_a_summary_left() {
        let l = PauseLedger::new();
        {
            let mut r = l.record.lock().unwrap();
            r.rate = Some(8.0);
            (r.anon_before, r.inflation) = (100 << 20, 400 << 20);
        }
        assert_eq!(l.predict(500 << 20), Duration::from_secs(1), "500 MiB after a summary of 100: 100");
        assert_eq!(l.predict(600 << 20), Duration::from_secs(2), "100 MiB of growth since");
        assert_eq!(l.predict(50 << 20), Duration::from_millis(500), "memory given back: what there is");
    }

    struct NoTarget;
    impl TracedTarget for NoTarget {
        fn pid(&self) -> u32 {
            0
        }
        fn snapshot(&self, _: Duration) -> anyhow::Result<crate::aggregate::HeapProfile> {
            anyhow::bail!("none")
        }
        fn stats(&self) -> crate::target::TargetStats {
            Default::default()
        }
    }
}
