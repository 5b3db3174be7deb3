//! The trigger engine: owns a target's triggers and says when to take a snapshot. The caller
//! polls it every [`POLL_INTERVAL`] and takes a snapshot for each [`Fired`] it returns; the
//! engine itself never snapshots, so `memscope record` and the agent drive it the same way.
//!
//! What each trigger watches, at each poll:
//! - interval: the clock (ticks at start + k × interval; ticks missed while the caller was busy
//!   are counted as suppressed, not made up);
//! - growth: live heap bytes (the probes' counters, cheap) against the live bytes at the last
//!   snapshot, whatever its reason ([`TriggerEngine::note_snapshot`] tells the engine of
//!   snapshots taken elsewhere);
//! - rss: `VmRSS`, or the memory charged to the target's cgroup ([`cgroup_memory`]: v2
//!   `memory.current`, v1 `memory.usage_in_bytes`); fires when it is at or above the
//!   threshold and armed, then re-arms once it falls below 90% of it (also fires at the first
//!   poll if the target is already above);
//! - heap_limit: the process's `RssAnon` (an upper bound of V8's used heap) against PCT of V8's
//!   heap limit (read once per process, cached); only when that bound is at or above the
//!   threshold, V8's used heap itself through an inspector session (at most once per
//!   [`heap_limit::CHECK_SPACING`]); fires when the used heap is at or above the threshold and
//!   armed, re-arms once it is below 90% of it (checked through a session at most once per
//!   [`heap_limit::REARM_CHECK_SPACING`] while the bound stays above that);
//! - return / usdt / gc: hit counters of uprobes the engine attached (via [`TriggerHost`]);
//!   `gc` is a return trigger on V8's [`V8_GC_FUNCTION`] with its own reason;
//! - exit: whether the target still runs. The exit firing ignores the minimum spacing; after
//!   it (or after the target exited without an exit trigger) the engine is finished.
//!
//! Spacing: each trigger fires at least `min_spacing` after its own previous firing, so a hot
//! function cannot flood the store, and one trigger cannot starve another (an interval locked
//! in phase with a gc cycle would otherwise hide every gc snapshot). Several triggers may fire
//! in the same poll: one snapshot each. A firing that the spacing holds back is counted as
//! *suppressed*: probe hits are lost (a later snapshot would not be "at the return" any more)
//! and each counts; interval ticks are lost and count; growth and RSS conditions stay pending
//! and fire as soon as the spacing allows, counted once. At most one firing per trigger per
//! poll; the extra hits of a probe trigger in one poll count as suppressed.
//!
//! Self-caused hits: probe-trigger hits while memscope itself paused the target for a V8
//! operation ([`crate::pause`]: the heap snapshot's own garbage collections, for `gc`) never
//! fire; they are counted as suppressed (`suppressed_self_caused`). While such a window is
//! open, probe triggers wait for it to close.
//!
//! Latency: a return or USDT hit is seen at the next poll (≤ 20 ms) and the snapshot follows;
//! the target keeps running meanwhile (nothing stops it).
use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;
use tracing::{debug, info};

use super::{
    resolve,
    spec::{GrowthThreshold, MemorySource, TriggerSpec, V8_GC_FUNCTION},
    usdt,
};
use crate::{
    bpf::attach::TriggerPoint,
    v8::heap_limit::{self, HeapUsage},
    procfs,
    session::Session,
    target::TracedTarget as _,
    target_fs::{self, Kind},
};

/// How often the caller should call [`TriggerEngine::poll`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// `--min-spacing` unless told otherwise.
pub const DEFAULT_MIN_SPACING: Duration = Duration::from_secs(5);
/// A percentage growth trigger also needs at least this many bytes of growth.
pub const GROWTH_PERCENT_FLOOR: u64 = 256 << 10;
/// An RSS trigger re-arms when the value falls below this fraction of its threshold.
pub const RSS_REARM_FRACTION: f64 = 0.9;

/// What the engine needs of a traced target. [`Session`] implements it; tests fake it.
pub trait TriggerHost {
    fn pid(&self) -> u32;
    fn alive(&self) -> bool;
    /// Live heap bytes as the probes count them (an estimate when sampling).
    fn live_bytes(&self) -> u64;
    /// Attaches a counting probe; returns its slot in [`TriggerHost::trigger_hits`].
    fn attach_trigger(&self, path_in_target: &str, file_offset: u64, point: TriggerPoint) -> anyhow::Result<u32>;
    fn trigger_hits(&self) -> anyhow::Result<Vec<u64>>;
    fn rss_bytes(&self) -> Option<u64> {
        procfs::status_bytes(self.pid(), "VmRSS").ok()
    }
    fn cgroup_memory_bytes(&self) -> Option<u64> {
        cgroup_memory(self.pid())
    }
    /// `RssAnon`: the upper bound of V8's used heap the `heap_limit` trigger polls.
    fn rss_anon_bytes(&self) -> Option<u64> {
        heap_limit::rss_anon(self.pid())
    }
    /// V8's heap limit (cached per process; the first call opens an inspector session). The
    /// default refuses: an inspector session acts on a process attached by identity only.
    fn v8_heap_limit(&self) -> anyhow::Result<u64> {
        anyhow::bail!("process {} is not attached by identity: no V8 inspector session", self.pid())
    }
    /// V8's used heap and limit, through an inspector session (`None` by default, as above).
    fn v8_heap(&self) -> Option<HeapUsage> {
        None
    }
    /// Hits of each trigger slot that memscope caused (inside its pause windows), cumulative;
    /// `None` while such a window is open. Empty: none.
    fn self_caused_hits(&self) -> Option<Vec<u64>> {
        Some(Vec::new())
    }
    /// `n` self-caused hits were not taken.
    fn note_self_caused(&self, _n: u64) {}
}

/// Memory charged to the cgroup of process `pid`: `memory.current` with cgroup v2, else the
/// v1 memory controller's `memory.usage_in_bytes` (hybrid hierarchies). `None` when neither
/// can be read.
pub fn cgroup_memory(pid: u32) -> Option<u64> {
    procfs::cgroup_memory_current(pid).or_else(|| {
        let cgroup = std::fs::File::open(format!("/proc/{pid}/cgroup"))
            .and_then(|f| target_fs::read_text(&f, Kind::ProcText))
            .ok()?;
        let path = cgroup.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, controllers, path) = (it.next()?, it.next()?, it.next()?);
            controllers.split(',').any(|c| c == "memory").then_some(path)
        })?;
        target_fs::read_beneath("/sys/fs/cgroup/memory", &format!("{path}/memory.usage_in_bytes"), Kind::ProcText)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

impl TriggerHost for Session {
    fn pid(&self) -> u32 {
        crate::target::TracedTarget::pid(self)
    }
    fn alive(&self) -> bool {
        Session::alive(self)
    }
    fn live_bytes(&self) -> u64 {
        self.stats().live_bytes
    }
    fn attach_trigger(&self, path_in_target: &str, file_offset: u64, point: TriggerPoint) -> anyhow::Result<u32> {
        Session::attach_trigger(self, path_in_target, file_offset, point)
    }
    // Read, then check the pid still names the traced process: never a newcomer's memory.
    fn rss_bytes(&self) -> Option<u64> {
        let rss = procfs::status_bytes(self.process().pid(), "VmRSS").ok();
        self.process().verified(rss).flatten()
    }
    fn cgroup_memory_bytes(&self) -> Option<u64> {
        let bytes = cgroup_memory(self.process().pid());
        self.process().verified(bytes).flatten()
    }
    fn rss_anon_bytes(&self) -> Option<u64> {
        let bytes = heap_limit::rss_anon(self.process().pid());
        self.process().verified(bytes).flatten()
    }
    fn v8_heap_limit(&self) -> anyhow::Result<u64> {
        let budget = crate::v8::Budget::new(heap_limit::SESSION_TIMEOUT);
        Ok(heap_limit::limit_of(self.process(), "trigger heap_limit: the heap limit", budget)?)
    }
    fn v8_heap(&self) -> Option<HeapUsage> {
        let budget = crate::v8::Budget::new(heap_limit::SESSION_TIMEOUT);
        let u = heap_limit::usage_of(self.process(), "trigger heap_limit: the used heap", budget);
        if let Err(e) = &u {
            debug!(pid = self.process().pid(), error = %e, "reading V8's used heap");
        }
        self.process().verified(u.ok()).flatten()
    }
    fn trigger_hits(&self) -> anyhow::Result<Vec<u64>> {
        Session::trigger_hits(self)
    }
    fn self_caused_hits(&self) -> Option<Vec<u64>> {
        crate::target::TracedTarget::pauses(self).and_then(|p| p.self_caused_hits())
    }
    fn note_self_caused(&self, n: u64) {
        if let Some(p) = crate::target::TracedTarget::pauses(self) {
            p.note_self_caused(n);
        }
    }
}

/// A trigger fired: take a snapshot now and store it with `reason`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    /// The trigger's reason name (`interval`, `return:gc_cycle`, ...).
    pub reason: String,
    /// Index of the trigger in the engine's list.
    pub trigger: usize,
    pub at: Instant,
    /// Wall-clock time of the firing, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Counts of one trigger, for reports and the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TriggerStatus {
    pub reason: String,
    /// The `kind=value` form of the trigger.
    pub spec: String,
    pub fired: u64,
    pub suppressed: u64,
    /// Of `suppressed`: probe hits memscope caused (see the module doc).
    pub suppressed_self_caused: u64,
    /// Probe sites attached (return and USDT triggers), 0 for the others.
    pub probes: usize,
}

enum State {
    Interval { every: Duration, next_due: Instant },
    Growth { threshold: GrowthThreshold, pending: bool },
    Rss { threshold: u64, source: MemorySource, armed: bool, pending: bool },
    Probe { slots: Vec<u32>, seen: u64, self_seen: u64 },
    /// `over`: the last reading of the used heap was at or above the threshold.
    HeapLimit { percent: f64, limit: u64, armed: bool, pending: bool, over: bool, next_check: Instant },
    Exit,
}

struct Trigger {
    spec: TriggerSpec,
    state: State,
    fired: u64,
    suppressed: u64,
    self_caused: u64,
    last_fired: Option<Instant>,
}

/// The triggers of one target. See the module doc.
pub struct TriggerEngine {
    triggers: Vec<Trigger>,
    min_spacing: Duration,
    baseline_live: u64,
    finished: bool,
    // Dropped with the engine: the semaphores go back to what they were.
    semaphores: Vec<usdt::Semaphore>,
}

impl TriggerEngine {
    /// Resolves and attaches every trigger of `specs` to the target: return triggers find
    /// their function (executable first, then mapped libraries) and get a uretprobe per match;
    /// USDT triggers get a uprobe per probe site and their semaphores enabled. Clocks start now.
    pub fn attach(host: &dyn TriggerHost, specs: &[TriggerSpec], min_spacing: Duration) -> anyhow::Result<TriggerEngine> {
        let pid = host.pid();
        let now = Instant::now();
        let mut triggers = Vec::with_capacity(specs.len());
        let mut semaphores = Vec::new();
        for spec in specs {
            let state = match spec {
                TriggerSpec::Return(query) => {
                    let found = resolve::find_function(pid, query).with_context(|| format!("--on-return {query}"))?;
                    attach_returns(host, &found, &format!("--on-return {query}"), &spec.reason())?
                }
                TriggerSpec::Gc => {
                    let found = match resolve::find_function(pid, V8_GC_FUNCTION) {
                        Ok(found) => found,
                        Err(resolve::ResolveError::NotFound { .. }) => anyhow::bail!(
                            "--on-gc: no V8 garbage collector found in process {pid}'s executable or libraries (is it a Node.js process?)"
                        ),
                        Err(e) => return Err(anyhow::Error::new(e).context("--on-gc")),
                    };
                    attach_returns(host, &found, "--on-gc", "gc")?
                }
                TriggerSpec::Usdt { provider, name } => {
                    let what = format!("{provider}:{name}");
                    let found = usdt::find(pid, provider, name).with_context(|| format!("--on-usdt {what}"))?;
                    let mut slots = Vec::new();
                    let mut enabled: HashSet<u64> = HashSet::new();
                    for f in &found {
                        let slot = host
                            .attach_trigger(&f.path_in_target, f.probe.file_offset, TriggerPoint::Entry)
                            .with_context(|| format!("attaching --on-usdt {what} in {}", f.path_in_target))?;
                        slots.push(slot);
                        if let Some(addr) = usdt::semaphore_address(pid, &f.path_in_target, &f.probe)? {
                            if enabled.insert(addr) {
                                semaphores.push(usdt::Semaphore::enable(pid, addr, &what)?);
                            }
                        }
                        info!(pid, "trigger usdt:{what}: uprobe at {:#x} of {}", f.probe.file_offset, f.path_in_target);
                    }
                    State::Probe { slots, seen: 0, self_seen: 0 }
                }
                TriggerSpec::Rss { source: MemorySource::CgroupMemory, .. } => {
                    if host.cgroup_memory_bytes().is_none() {
                        anyhow::bail!(
                            "--on-rss cgroup:…: cannot read the memory of process {pid}'s cgroup (neither cgroup v2 memory.current nor v1 memory.usage_in_bytes)"
                        );
                    }
                    state_for(spec, now)
                }
                TriggerSpec::HeapLimit(percent) => {
                    let limit = host.v8_heap_limit().with_context(|| {
                        format!("--on-heap-limit: reading V8's heap limit of process {pid} (is it Node.js?)")
                    })?;
                    info!(pid, limit, percent, "trigger heap_limit: V8's heap limit read");
                    State::HeapLimit { percent: *percent, limit, armed: true, pending: false, over: false, next_check: now }
                }
                other => state_for(other, now),
            };
            triggers.push(Trigger { spec: spec.clone(), state, fired: 0, suppressed: 0, self_caused: 0, last_fired: None });
        }
        let mut engine = TriggerEngine {
            triggers,
            min_spacing,
            baseline_live: 0,
            finished: false,
            semaphores,
        };
        engine.start(host);
        Ok(engine)
    }

    /// An engine for triggers that need no probe (interval, growth, rss, exit); return and
    /// USDT triggers need [`TriggerEngine::attach`].
    pub fn without_probes(host: &dyn TriggerHost, specs: &[TriggerSpec], min_spacing: Duration) -> anyhow::Result<TriggerEngine> {
        if let Some(s) = specs.iter().find(|s| s.needs_probe()) {
            anyhow::bail!("trigger {s} needs a probe: use TriggerEngine::attach");
        }
        Self::attach(host, specs, min_spacing)
    }

    fn start(&mut self, host: &dyn TriggerHost) {
        if self.triggers.iter().any(|t| matches!(t.state, State::Growth { .. })) {
            self.baseline_live = host.live_bytes();
        }
        if self.triggers.iter().any(|t| matches!(t.state, State::Probe { .. })) {
            let hits = host.trigger_hits().unwrap_or_default();
            let caused = host.self_caused_hits().unwrap_or_default();
            for t in &mut self.triggers {
                if let State::Probe { slots, seen, self_seen } = &mut t.state {
                    *seen = slots.iter().map(|s| hits.get(*s as usize).copied().unwrap_or(0)).sum();
                    *self_seen = slots.iter().map(|s| caused.get(*s as usize).copied().unwrap_or(0)).sum();
                }
            }
        }
    }

    /// Addresses (in the target) of the USDT semaphores the engine enabled.
    pub fn enabled_semaphores(&self) -> Vec<u64> {
        self.semaphores.iter().map(usdt::Semaphore::address).collect()
    }

    pub fn min_spacing(&self) -> Duration {
        self.min_spacing
    }

    /// Whether the target has exited (and the exit firing, if any, was returned).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether one of the triggers is `exit`.
    pub fn has_exit_trigger(&self) -> bool {
        self.triggers.iter().any(|t| matches!(t.state, State::Exit))
    }

    /// Suppressed firings of all triggers.
    pub fn suppressed(&self) -> u64 {
        self.triggers.iter().map(|t| t.suppressed).sum()
    }

    pub fn status(&self) -> Vec<TriggerStatus> {
        self.triggers
            .iter()
            .map(|t| TriggerStatus {
                reason: t.spec.reason(),
                spec: t.spec.describe(),
                fired: t.fired,
                suppressed: t.suppressed,
                suppressed_self_caused: t.self_caused,
                probes: match &t.state {
                    State::Probe { slots, .. } => slots.len(),
                    _ => 0,
                },
            })
            .collect()
    }

    /// Tells the engine a snapshot was taken outside it (e.g. on request): growth is then
    /// measured from `live_bytes`.
    pub fn note_snapshot(&mut self, live_bytes: u64) {
        self.baseline_live = live_bytes;
    }

    /// Checks every trigger now; returns the firings (at most one per trigger).
    pub fn poll(&mut self, host: &dyn TriggerHost) -> Vec<Fired> {
        self.poll_at(host, Instant::now(), wall_ms())
    }

    /// [`TriggerEngine::poll`] at a given time (for tests).
    pub fn poll_at(&mut self, host: &dyn TriggerHost, now: Instant, now_ms: u64) -> Vec<Fired> {
        if self.finished {
            return Vec::new();
        }
        if !host.alive() {
            self.finished = true;
            return match self.triggers.iter().position(|t| matches!(t.state, State::Exit)) {
                Some(i) => {
                    self.triggers[i].fired += 1;
                    self.triggers[i].last_fired = Some(now);
                    vec![Fired { reason: self.triggers[i].spec.reason(), trigger: i, at: now, at_ms: now_ms }]
                }
                None => Vec::new(),
            };
        }
        let has = |f: fn(&State) -> bool| self.triggers.iter().any(|t| f(&t.state));
        let live = has(|s| matches!(s, State::Growth { .. })).then(|| host.live_bytes());
        // Self-caused hits are read before and after the hits: a pause window that opened or
        // closed in between (or is open) leaves the probe triggers to the next poll.
        let hits = if has(|s| matches!(s, State::Probe { .. })) {
            let before = host.self_caused_hits();
            let hits = host.trigger_hits().ok();
            let after = host.self_caused_hits();
            match (before, hits, after) {
                (Some(b), Some(h), Some(a)) if a == b => Some((h, a)),
                _ => None,
            }
        } else {
            None
        };
        let mut self_caused_now = 0u64;
        let rss = has(|s| matches!(s, State::Rss { source: MemorySource::ProcessRss, .. }))
            .then(|| host.rss_bytes())
            .flatten();
        let cgroup = has(|s| matches!(s, State::Rss { source: MemorySource::CgroupMemory, .. }))
            .then(|| host.cgroup_memory_bytes())
            .flatten();
        let rss_anon = has(|s| matches!(s, State::HeapLimit { .. })).then(|| host.rss_anon_bytes()).flatten();

        let min_spacing = self.min_spacing;
        let mut out = Vec::new();
        for (i, t) in self.triggers.iter_mut().enumerate() {
            // How many firings this trigger asks for now, and whether a held-back one waits.
            let (wanted, deferrable) = match &mut t.state {
                State::Interval { every, next_due } => {
                    if now < *next_due {
                        (0, false)
                    } else {
                        let mut ticks = 0u64;
                        while *next_due <= now {
                            *next_due += *every;
                            ticks += 1;
                        }
                        t.suppressed += ticks - 1;
                        (1, false)
                    }
                }
                State::Growth { threshold, .. } => {
                    let Some(live) = live else { continue };
                    let need = match *threshold {
                        GrowthThreshold::Bytes(b) => b,
                        GrowthThreshold::Percent(p) => {
                            ((self.baseline_live as f64 * p / 100.0) as u64).max(GROWTH_PERCENT_FLOOR)
                        }
                    };
                    let grown = live >= self.baseline_live.saturating_add(need);
                    if grown {
                        debug!(live, baseline = self.baseline_live, need, "growth trigger condition met");
                    }
                    (u64::from(grown), true)
                }
                State::Rss { threshold, source, armed, .. } => {
                    let value = match source {
                        MemorySource::ProcessRss => rss,
                        MemorySource::CgroupMemory => cgroup,
                    };
                    let Some(value) = value else { continue };
                    if !*armed && (value as f64) < *threshold as f64 * RSS_REARM_FRACTION {
                        *armed = true;
                    }
                    (u64::from(*armed && value >= *threshold), true)
                }
                State::Probe { slots, seen, self_seen } => {
                    let Some((hits, caused)) = &hits else { continue };
                    let sum = |v: &[u64]| -> u64 { slots.iter().map(|s| v.get(*s as usize).copied().unwrap_or(0)).sum() };
                    let (total, caused) = (sum(hits), sum(caused));
                    let new = total.saturating_sub(*seen);
                    let mine = caused.saturating_sub(*self_seen).min(new);
                    *seen = total;
                    *self_seen = caused;
                    t.self_caused += mine;
                    t.suppressed += mine;
                    self_caused_now += mine;
                    (new - mine, false)
                }
                State::HeapLimit { percent, limit, armed, over, next_check, .. } => {
                    let Some(bound) = rss_anon else { continue };
                    let threshold = *limit as f64 * *percent / 100.0;
                    let rearm_below = threshold * RSS_REARM_FRACTION;
                    if (bound as f64) < rearm_below {
                        // The used heap is below the re-arm level for sure: no session.
                        *armed = true;
                        *over = false;
                        *next_check = now;
                    } else if (bound as f64) >= threshold || !*armed {
                        if now >= *next_check {
                            if let Some(u) = host.v8_heap() {
                                if !*armed && (u.used as f64) < rearm_below {
                                    *armed = true;
                                }
                                *over = (u.used as f64) >= threshold;
                                debug!(used = u.used, limit = u.limit, bound, armed = *armed, "trigger heap_limit: V8's used heap read");
                            }
                            *next_check = now + if *armed { heap_limit::CHECK_SPACING } else { heap_limit::REARM_CHECK_SPACING };
                        }
                    } else {
                        *over = false;
                    }
                    (u64::from(*armed && *over), true)
                }
                State::Exit => (0, false),
            };
            let pending = match &mut t.state {
                State::Growth { pending, .. } | State::Rss { pending, .. } | State::HeapLimit { pending, .. } => Some(pending),
                _ => None,
            };
            if wanted == 0 {
                if let Some(p) = pending {
                    *p = false;
                }
                continue;
            }
            if t.last_fired.is_none_or(|last| now.saturating_duration_since(last) >= min_spacing) {
                t.last_fired = Some(now);
                t.fired += 1;
                t.suppressed += wanted - 1;
                if let Some(p) = pending {
                    *p = false;
                }
                if let State::Rss { armed, .. } | State::HeapLimit { armed, .. } = &mut t.state {
                    *armed = false;
                }
                out.push(Fired { reason: t.spec.reason(), trigger: i, at: now, at_ms: now_ms });
            } else if deferrable {
                if let Some(p) = pending {
                    if !*p {
                        *p = true;
                        t.suppressed += 1;
                    }
                }
            } else {
                t.suppressed += wanted;
            }
        }
        if self_caused_now > 0 {
            debug!(self_caused_now, "probe-trigger hits caused by memscope's own V8 operations not taken");
            host.note_self_caused(self_caused_now);
        }
        if !out.is_empty() {
            if let Some(live) = live {
                self.baseline_live = live;
            }
        }
        out
    }
}

/// A uretprobe on each function of `found`; `what` names the flag in errors, `reason` the
/// trigger in the log.
fn attach_returns(host: &dyn TriggerHost, found: &[resolve::ResolvedFunction], what: &str, reason: &str) -> anyhow::Result<State> {
    let pid = host.pid();
    let mut slots = Vec::new();
    for f in found {
        let slot = host
            .attach_trigger(&f.path_in_target, f.symbol.file_offset, TriggerPoint::Return)
            .with_context(|| format!("attaching {what} to {}", f.path_in_target))?;
        info!(
            pid,
            "trigger {reason}: uretprobe on {} at {:#x} of {}",
            f.demangled.as_deref().unwrap_or(&f.symbol.name),
            f.symbol.file_offset,
            f.path_in_target
        );
        slots.push(slot);
    }
    Ok(State::Probe { slots, seen: 0, self_seen: 0 })
}

fn state_for(spec: &TriggerSpec, now: Instant) -> State {
    match spec {
        TriggerSpec::Interval(every) => State::Interval { every: *every, next_due: now + *every },
        TriggerSpec::Growth(threshold) => State::Growth { threshold: *threshold, pending: false },
        TriggerSpec::Rss { threshold, source } => {
            State::Rss { threshold: *threshold, source: *source, armed: true, pending: false }
        }
        TriggerSpec::Exit => State::Exit,
        // Needs the host (the limit): made in `attach`.
        TriggerSpec::HeapLimit(percent) => {
            State::HeapLimit { percent: *percent, limit: 0, armed: true, pending: false, over: false, next_check: now }
        }
        TriggerSpec::Return(_) | TriggerSpec::Usdt { .. } | TriggerSpec::Gc => {
            State::Probe { slots: Vec::new(), seen: 0, self_seen: 0 }
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    #[derive(Default)]
    struct Fake {
        dead: Cell<bool>,
        live: Cell<u64>,
        rss: Cell<u64>,
        hits: RefCell<Vec<u64>>,
        anon: Cell<u64>,
        used: Cell<u64>,
        heap_reads: Cell<u32>,
        /// Self-caused hits per slot, and whether a pause window is open.
        caused: RefCell<Vec<u64>>,
        window_open: Cell<bool>,
        noted: Cell<u64>,
    }

    impl TriggerHost for Fake {
        fn pid(&self) -> u32 {
            1
        }
        fn alive(&self) -> bool {
            !self.dead.get()
        }
        fn live_bytes(&self) -> u64 {
            self.live.get()
        }
        fn attach_trigger(&self, _: &str, _: u64, _: TriggerPoint) -> anyhow::Result<u32> {
            let mut h = self.hits.borrow_mut();
            h.push(0);
            Ok(h.len() as u32 - 1)
        }
        fn trigger_hits(&self) -> anyhow::Result<Vec<u64>> {
            Ok(self.hits.borrow().clone())
        }
        fn rss_bytes(&self) -> Option<u64> {
            Some(self.rss.get())
        }
        fn cgroup_memory_bytes(&self) -> Option<u64> {
            None
        }
        fn self_caused_hits(&self) -> Option<Vec<u64>> {
            (!self.window_open.get()).then(|| self.caused.borrow().clone())
        }
        fn note_self_caused(&self, n: u64) {
            self.noted.set(self.noted.get() + n);
        }
        fn rss_anon_bytes(&self) -> Option<u64> {
            Some(self.anon.get())
        }
        fn v8_heap_limit(&self) -> anyhow::Result<u64> {
            Ok(1000)
        }
        fn v8_heap(&self) -> Option<HeapUsage> {
            self.heap_reads.set(self.heap_reads.get() + 1);
            Some(HeapUsage { used: self.used.get(), limit: 1000, total: self.used.get() })
        }
    }

    /// heap_limit: no session while the outside bound is below the threshold; a session per
    /// CHECK_SPACING while it is above; fires once when the used heap crosses, not again while
    /// above; re-arms once the bound (or the used heap) falls below 90% of the threshold.
    #[test]
    fn heap_limit_reads_v8_only_near_the_limit() {
        let host = Fake::default();
        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::HeapLimit(50.0)], Duration::ZERO).unwrap();
        let t0 = Instant::now();
        let mut fired = 0;
        let mut step = |anon: u64, used: u64, at_ms: u64| {
            host.anon.set(anon);
            host.used.set(used);
            fired += e.poll_at(&host, ms(t0, at_ms), 0).len();
            (fired, host.heap_reads.get())
        };
        assert_eq!(step(300, 100, 0), (0, 0), "far below: no session");
        assert_eq!(step(499, 300, 20), (0, 0));
        assert_eq!(step(600, 300, 40), (0, 1), "bound above: one read, used below");
        assert_eq!(step(600, 510, 60), (0, 1), "within the check spacing: no read");
        assert_eq!(step(700, 510, 1100), (1, 2), "read again: over the threshold");
        assert_eq!(step(700, 520, 2200), (1, 3), "fired once per crossing");
        assert_eq!(step(700, 400, 3300), (1, 3), "disarmed: re-arm checks are spaced more");
        assert_eq!(step(700, 400, 14_000), (1, 4), "re-armed through a read");
        assert_eq!(step(700, 520, 15_100), (2, 5), "crossed again");
        assert_eq!(step(400, 100, 15_200), (2, 5), "bound below 90%: re-armed without a read");
        assert_eq!(step(800, 600, 15_220), (3, 6));
    }

    /// An engine with a probe trigger on a fake host (no symbol lookup).
    fn with_probe(host: &Fake, others: &[TriggerSpec], spacing: Duration) -> TriggerEngine {
        let mut e = TriggerEngine::without_probes(host, others, spacing).unwrap();
        let slot = host.attach_trigger("/x", 0, TriggerPoint::Return).unwrap();
        e.triggers.push(Trigger {
            spec: TriggerSpec::Return("gc".into()),
            state: State::Probe { slots: vec![slot], seen: 0, self_seen: 0 },
            fired: 0,
            suppressed: 0,
            self_caused: 0,
            last_fired: None,
        });
        e
    }

    fn ms(start: Instant, m: u64) -> Instant {
        start + Duration::from_millis(m)
    }

    fn reasons(f: Vec<Fired>) -> Vec<String> {
        f.into_iter().map(|f| f.reason).collect()
    }

    /// Interval ticks fire on time; ticks missed while the caller was busy count as
    /// suppressed, and ticks within the min spacing of another firing too.
    #[test]
    fn interval_ticks_and_missed_ticks() {
        let host = Fake::default();
        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::Interval(Duration::from_millis(100))], Duration::ZERO).unwrap();
        let t0 = Instant::now();
        assert!(e.poll_at(&host, ms(t0, 50), 0).is_empty());
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 101), 0)), ["interval"]);
        assert!(e.poll_at(&host, ms(t0, 150), 0).is_empty());
        // Busy until 450 ms: ticks 200, 300, 400 -> one firing, two suppressed.
        assert_eq!(e.poll_at(&host, ms(t0, 450), 0).len(), 1);
        assert_eq!(e.status()[0].fired, 2);
        assert_eq!(e.status()[0].suppressed, 2);
    }

    /// Growth fires at the threshold since the last snapshot, whatever took it; percentages
    /// have a floor.
    #[test]
    fn growth_since_last_snapshot() {
        let host = Fake::default();
        host.live.set(1000);
        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::Growth(GrowthThreshold::Bytes(500))], Duration::ZERO).unwrap();
        let t0 = Instant::now();
        host.live.set(1499);
        assert!(e.poll_at(&host, ms(t0, 20), 0).is_empty());
        host.live.set(1500);
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 40), 0)), ["growth"]);
        host.live.set(1900);
        assert!(e.poll_at(&host, ms(t0, 60), 0).is_empty());
        e.note_snapshot(1900);
        host.live.set(2300);
        assert!(e.poll_at(&host, ms(t0, 80), 0).is_empty(), "measured from the noted snapshot");
        host.live.set(2400);
        assert_eq!(e.poll_at(&host, ms(t0, 100), 0).len(), 1);

        host.live.set(0);
        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::Growth(GrowthThreshold::Percent(50.0))], Duration::ZERO).unwrap();
        host.live.set(GROWTH_PERCENT_FLOOR - 1);
        assert!(e.poll_at(&host, ms(t0, 20), 0).is_empty(), "floor");
        host.live.set(GROWTH_PERCENT_FLOOR);
        assert_eq!(e.poll_at(&host, ms(t0, 40), 0).len(), 1);
        host.live.set(GROWTH_PERCENT_FLOOR * 3 / 2);
        assert!(e.poll_at(&host, ms(t0, 60), 0).is_empty(), "+50% but below the floor");
        host.live.set(GROWTH_PERCENT_FLOOR * 4);
        assert_eq!(e.poll_at(&host, ms(t0, 80), 0).len(), 1);
        host.live.set(GROWTH_PERCENT_FLOOR * 6 - 1);
        assert!(e.poll_at(&host, ms(t0, 100), 0).is_empty());
        host.live.set(GROWTH_PERCENT_FLOOR * 6);
        assert_eq!(e.poll_at(&host, ms(t0, 120), 0).len(), 1, "+50%");
    }

    /// RSS fires once when crossing upwards, not again while above, again after falling
    /// below 90% and crossing anew.
    #[test]
    fn rss_crossing_with_rearm() {
        let host = Fake::default();
        let spec = TriggerSpec::Rss { threshold: 1000, source: MemorySource::ProcessRss };
        let mut e = TriggerEngine::without_probes(&host, &[spec], Duration::ZERO).unwrap();
        let t0 = Instant::now();
        let mut fired = 0;
        for (i, v) in [500, 999, 1000, 2000, 1500, 950, 1200, 899, 1000].into_iter().enumerate() {
            host.rss.set(v);
            fired += e.poll_at(&host, ms(t0, i as u64 * 20), 0).len();
            let expect = match v {
                _ if i < 2 => 0,
                _ if i < 8 => 1,
                _ => 2,
            };
            assert_eq!(fired, expect, "after value {v} (poll {i})");
        }
    }

    /// A hot function is limited by the min spacing, its extra hits counted as suppressed;
    /// another trigger is spaced on its own (not starved by the hot one); a pending condition
    /// (RSS crossing again too soon) fires once its spacing allows, counted once.
    #[test]
    fn min_spacing_and_suppression() {
        let host = Fake::default();
        let rss = TriggerSpec::Rss { threshold: 1000, source: MemorySource::ProcessRss };
        let mut e = with_probe(&host, &[rss], Duration::from_millis(100));
        let t0 = Instant::now();
        let mut fired = Vec::new();
        for i in 0..50u64 {
            host.hits.borrow_mut()[0] += 3; // 3 returns per 10 ms
            match i {
                12 | 16 => host.rss.set(5000), // crosses at 120 ms, and again at 160 ms
                14 => host.rss.set(0),         // re-arms
                _ => {}
            }
            fired.extend(e.poll_at(&host, ms(t0, i * 10), 0));
        }
        let got: Vec<(u128, &str)> =
            fired.iter().map(|f| (f.at.duration_since(t0).as_millis(), f.reason.as_str())).collect();
        assert_eq!(
            got,
            [(0, "return:gc"), (100, "return:gc"), (120, "rss"), (200, "return:gc"), (220, "rss"), (300, "return:gc"), (400, "return:gc")]
        );
        let st = e.status();
        assert_eq!((st[0].reason.as_str(), st[0].fired, st[0].suppressed), ("rss", 2, 1));
        assert_eq!((st[1].reason.as_str(), st[1].fired), ("return:gc", 5));
        assert_eq!(st[1].fired + st[1].suppressed, 150, "every hit is either fired or suppressed");
        assert_eq!(e.suppressed(), st[0].suppressed + st[1].suppressed);
    }

    /// Hits inside memscope's own pause windows never fire and count as suppressed
    /// (self-caused); while a window is open the probe trigger waits; the application's hits
    /// around it still fire.
    #[test]
    fn self_caused_hits_never_fire() {
        let host = Fake::default();
        let mut e = with_probe(&host, &[], Duration::ZERO);
        let t0 = Instant::now();
        host.hits.borrow_mut()[0] += 1;
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 20), 0)), ["return:gc"], "the application's own gc");
        // A window opens: 3 gcs of memscope's heap snapshot.
        host.window_open.set(true);
        host.hits.borrow_mut()[0] += 3;
        assert!(e.poll_at(&host, ms(t0, 40), 0).is_empty(), "waits while the window is open");
        *host.caused.borrow_mut() = vec![3];
        host.window_open.set(false);
        assert!(e.poll_at(&host, ms(t0, 60), 0).is_empty(), "memscope's gcs do not fire");
        let st = &e.status()[0];
        assert_eq!((st.fired, st.suppressed, st.suppressed_self_caused), (1, 3, 3));
        assert_eq!(host.noted.get(), 3);
        host.hits.borrow_mut()[0] += 1;
        assert_eq!(e.poll_at(&host, ms(t0, 80), 0).len(), 1, "the application's next gc fires");
    }

    /// The engine can move to another thread (the agent polls from a blocking task).
    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TriggerEngine>();
    }

    /// Two triggers due in the same poll both fire (one snapshot each).
    #[test]
    fn triggers_do_not_starve_each_other() {
        let host = Fake::default();
        let mut e = with_probe(&host, &[TriggerSpec::Interval(Duration::from_millis(100))], Duration::from_millis(100));
        let t0 = Instant::now();
        host.hits.borrow_mut()[0] += 1;
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 100), 0)), ["interval", "return:gc"]);
        host.hits.borrow_mut()[0] += 1;
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 200), 0)), ["interval", "return:gc"]);
    }

    /// On exit: one exit firing regardless of spacing, then nothing; without an exit
    /// trigger just finished.
    #[test]
    fn exit_fires_once() {
        let host = Fake::default();
        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::Interval(Duration::from_millis(50)), TriggerSpec::Exit], Duration::from_secs(60)).unwrap();
        let t0 = Instant::now();
        assert_eq!(e.poll_at(&host, ms(t0, 60), 0).len(), 1);
        host.dead.set(true);
        assert_eq!(reasons(e.poll_at(&host, ms(t0, 70), 7)), ["exit"]);
        assert!(e.finished() && e.has_exit_trigger());
        assert!(e.poll_at(&host, ms(t0, 90), 0).is_empty());

        let mut e = TriggerEngine::without_probes(&host, &[TriggerSpec::Interval(Duration::from_millis(50))], Duration::ZERO).unwrap();
        assert!(e.poll_at(&host, ms(t0, 100), 0).is_empty());
        assert!(e.finished());
        assert!(TriggerEngine::without_probes(&host, &[TriggerSpec::Return("f".into())], Duration::ZERO).is_err());
    }
}
