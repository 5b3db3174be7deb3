//! One memory budget for everything a traced process controls the size of: the JIT names of
//! its perf map, symbol tables, unwind tables and V8 inspector messages. Each target has an
//! [`Account`] with its own cap; all accounts together draw on
//! one agent-wide cap. A reader asks for bytes before it keeps them ([`Account::reserve`],
//! [`Reservation::try_grow`]) and gives them back by dropping the [`Reservation`].
//!
//! Why: a cap per file is not a cap per agent. A perf map capped at 64 MiB read still cost
//! ~225 MB of memory once parsed (short lines, a tree entry and a name each), and four targets
//! cost 961 MB, while the docs promise that what targets control stays within 256 MiB. The
//! bytes counted here are memory estimates of the parsed form (see each user), not file sizes.
//!
//! The users ([`Use`]), each charging [`Account::for_pid`] of its target:
//! - [`Use::PerfMap`]: `symbolize::perf_map`, each line kept (measured: 136 bytes plus the
//!   name); a refusal stops the reading (later JIT names unresolved).
//! - [`Use::Unwind`]: `unwind::target`, each file's compiled table (`Table::memory_bytes`)
//!   before its rows are placed; a refusal leaves the file to frame pointers. A table shared
//!   by several targets (one per file in `unwind::cache`) is charged in full to each: a
//!   target's count does not depend on the others, and the agent-wide sum may overstate.
//! - [`Use::Symbols`]: `symbolize::modules`, an estimate of what blazesym keeps of a module
//!   (its caches cannot be measured: 32 bytes per ELF symbol plus the DWARF sections' sizes)
//!   when the module is first opened; a refusal leaves its frames unnamed (module and offset).
//!   memscope's own ELF reading (`bpf::elf_symbols`): a trigger's function search keeps a
//!   candidate and up to 4 KiB of code per matching address, charged while it runs
//!   (`find_functions_charged`; a refusal fails the search); the allocator lookup at attach
//!   keeps one candidate per name asked for and is not charged.
//! - [`Use::V8`]: `v8::channel` reserves a frame's announced length before allocating it;
//!   `v8::inspector` charges a message once the WebSocket library hands it over whole. Both
//!   hold it until it is parsed (or forwarded); a refusal is `V8Error::TooLarge`.
//!
//! A refusal is not an error of the target: the reader stops loading (names past that point
//! stay unresolved), the refusal is counted per use and limit ([`refusals`], the
//! `memscope_target_budget_refusals_total` metric) and said in the target's status
//! ([`Account::report`]: `budget` in `GET /v1/targets` and `leaks.json`, a line in
//! `report.txt`).
//!
//! Defaults: [`DEFAULT_TOTAL`] for the agent, [`DEFAULT_PER_TARGET`] per target; `memscope
//! agent --target-data-budget` and `--target-data-budget-per-target` change them ([`configure`]).
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
};

/// Bytes all targets together may make the agent keep.
pub const DEFAULT_TOTAL: u64 = 256 << 20;
/// Bytes one target may make the agent keep.
pub const DEFAULT_PER_TARGET: u64 = 64 << 20;

/// What the bytes are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Use {
    /// Parsed JIT code names of `/tmp/perf-PID.map`.
    PerfMap,
    /// Symbol tables parsed from the target's files.
    Symbols,
    /// Unwind tables built from the target's `.eh_frame`.
    Unwind,
    /// Messages of the target's V8 inspector.
    V8,
}

impl Use {
    pub const fn name(self) -> &'static str {
        match self {
            Use::PerfMap => "perf_map",
            Use::Symbols => "symbols",
            Use::Unwind => "unwind",
            Use::V8 => "v8",
        }
    }
}

/// Which cap refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    Target,
    Agent,
}

impl Limit {
    pub const fn name(self) -> &'static str {
        match self {
            Limit::Target => "target",
            Limit::Agent => "agent",
        }
    }
}

/// A reservation that would pass a cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} of pid {pid}: {wanted} more bytes would pass the {} budget of {cap} bytes ({used} in use)", what.name(), limit.name())]
pub struct BudgetExceeded {
    pub pid: u32,
    pub what: Use,
    pub limit: Limit,
    pub wanted: u64,
    pub cap: u64,
    pub used: u64,
}

/// What all accounts together draw on: the agent's [`GLOBAL`] pool (tests make their own).
#[derive(Debug)]
pub struct Pool {
    cap: AtomicU64,
    used: AtomicU64,
}

impl Pool {
    pub const fn new(cap: u64) -> Pool {
        Pool {
            cap: AtomicU64::new(cap),
            used: AtomicU64::new(0),
        }
    }

    /// Takes `bytes`, or says how much is in use and the cap.
    fn take(&self, bytes: u64) -> Result<(), (u64, u64)> {
        let cap = self.cap.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= cap)
            })
            .map(|_| ())
            .map_err(|used| (used, cap))
    }

    fn give(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// `(bytes reserved now, cap)`.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.used.load(Ordering::Relaxed),
            self.cap.load(Ordering::Relaxed),
        )
    }
}

/// The agent-wide pool.
pub static GLOBAL: Pool = Pool::new(DEFAULT_TOTAL);
static PER_TARGET_CAP: AtomicU64 = AtomicU64::new(DEFAULT_PER_TARGET);
static REFUSALS: Mutex<BTreeMap<(Use, Limit), u64>> = Mutex::new(BTreeMap::new());
/// The live accounts by pid ([`Account::for_pid`]).
static ACCOUNTS: Mutex<BTreeMap<u32, Weak<Account>>> = Mutex::new(BTreeMap::new());

/// Sets the caps (the agent's flags); accounts made later take the per-target cap.
pub fn configure(total: u64, per_target: u64) {
    GLOBAL.cap.store(total, Ordering::Relaxed);
    PER_TARGET_CAP.store(per_target, Ordering::Relaxed);
}

/// `(bytes reserved by all targets now, the agent-wide cap)`.
pub fn usage() -> (u64, u64) {
    GLOBAL.usage()
}

/// Refusals so far, by use and limit: `(use, limit, count)`.
pub fn refusals() -> Vec<(&'static str, &'static str, u64)> {
    REFUSALS
        .lock()
        .unwrap()
        .iter()
        .map(|((u, l), n)| (u.name(), l.name(), *n))
        .collect()
}

/// The agent-wide figures as JSON, for `leaks.json`: `{"used_bytes": N, "cap_bytes": N,
/// "refused": {"perf_map": {"target": 1}}}`.
pub fn report_json() -> serde_json::Value {
    let (used, cap) = usage();
    let mut refused = serde_json::Map::new();
    for (what, limit, n) in refusals() {
        let e = refused.entry(what).or_insert_with(|| serde_json::json!({}));
        e[limit] = n.into();
    }
    serde_json::json!({ "used_bytes": used, "cap_bytes": cap, "refused": refused })
}

/// One target's share.
#[derive(Debug)]
pub struct Account {
    pid: u32,
    cap: u64,
    pool: &'static Pool,
    used: AtomicU64,
    /// Per use: bytes held now, and what was refused (the first refusal's message, the count).
    state: Mutex<BTreeMap<Use, UseState>>,
}

#[derive(Debug, Default)]
struct UseState {
    held: u64,
    refused: u64,
    first_refusal: Option<BudgetExceeded>,
    /// What the user says was not loaded (for the report), e.g. how much of a file was read.
    not_loaded: Option<String>,
}

/// What an account holds and what it refused, for the target's status.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct BudgetReport {
    pub cap_bytes: u64,
    pub used_bytes: u64,
    /// Bytes held now, by use.
    pub by_use: BTreeMap<&'static str, u64>,
    /// Uses that were refused bytes: which limit, how often, what was not loaded.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<&'static str, RefusalReport>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RefusalReport {
    /// `target` (this target's cap) or `agent` (all targets together).
    pub limit: &'static str,
    pub times: u64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_loaded: Option<String>,
}

impl Account {
    /// The account of target `pid`: the one its other readers hold, or a new one (the hook
    /// for every reader of a target's data: the perf map, V8 messages, symbol and unwind
    /// tables). An account lives as long as someone holds it.
    pub fn for_pid(pid: u32) -> Arc<Account> {
        let mut accounts = ACCOUNTS.lock().unwrap();
        accounts.retain(|_, a| a.strong_count() > 0);
        if let Some(a) = accounts.get(&pid).and_then(Weak::upgrade) {
            return a;
        }
        let a = Account::new(pid);
        accounts.insert(pid, Arc::downgrade(&a));
        a
    }

    /// A new account for `pid`, with the per-target cap in force now.
    pub fn new(pid: u32) -> Arc<Account> {
        Account::with_cap(pid, PER_TARGET_CAP.load(Ordering::Relaxed))
    }

    pub fn with_cap(pid: u32, cap: u64) -> Arc<Account> {
        Account::in_pool(pid, cap, &GLOBAL)
    }

    /// An account drawing on another pool than the agent's (tests).
    pub fn in_pool(pid: u32, cap: u64, pool: &'static Pool) -> Arc<Account> {
        Arc::new(Account {
            pid,
            cap,
            pool,
            used: AtomicU64::new(0),
            state: Mutex::new(BTreeMap::new()),
        })
    }

    /// An empty reservation for `what`, to grow as bytes are kept.
    pub fn reservation(self: &Arc<Self>, what: Use) -> Reservation {
        Reservation {
            account: self.clone(),
            what,
            bytes: 0,
        }
    }

    /// `bytes` for `what`, or the cap it would pass (counted).
    pub fn reserve(self: &Arc<Self>, what: Use, bytes: u64) -> Result<Reservation, BudgetExceeded> {
        let mut r = self.reservation(what);
        r.try_grow(bytes)?;
        Ok(r)
    }

    fn take(&self, what: Use, bytes: u64) -> Result<(), BudgetExceeded> {
        let exceeded = |limit, used, cap| BudgetExceeded {
            pid: self.pid,
            what,
            limit,
            wanted: bytes,
            cap,
            used,
        };
        let cap = self.cap;
        if let Err(used) = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= cap)
            })
        {
            return Err(self.refused(exceeded(Limit::Target, used, cap)));
        }
        if let Err((used, cap)) = self.pool.take(bytes) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(self.refused(exceeded(Limit::Agent, used, cap)));
        }
        self.state.lock().unwrap().entry(what).or_default().held += bytes;
        Ok(())
    }

    fn give(&self, what: Use, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.pool.give(bytes);
        if let Some(s) = self.state.lock().unwrap().get_mut(&what) {
            s.held = s.held.saturating_sub(bytes);
        }
    }

    fn refused(&self, e: BudgetExceeded) -> BudgetExceeded {
        *REFUSALS
            .lock()
            .unwrap()
            .entry((e.what, e.limit))
            .or_default() += 1;
        let mut state = self.state.lock().unwrap();
        let s = state.entry(e.what).or_default();
        s.refused += 1;
        if s.first_refusal.is_none() {
            tracing::warn!("memory budget: {e}; the rest is not loaded");
            s.first_refusal = Some(e.clone());
        }
        e
    }

    /// Records what a refusal left out (`what`'s user knows: bytes of a file not read, ...).
    pub fn note_not_loaded(&self, what: Use, text: String) {
        self.state
            .lock()
            .unwrap()
            .entry(what)
            .or_default()
            .not_loaded = Some(text);
    }

    pub fn report(&self) -> BudgetReport {
        let state = self.state.lock().unwrap();
        BudgetReport {
            cap_bytes: self.cap,
            used_bytes: self.used.load(Ordering::Relaxed),
            by_use: state
                .iter()
                .filter(|(_, s)| s.held > 0)
                .map(|(u, s)| (u.name(), s.held))
                .collect(),
            refused: state
                .iter()
                .filter_map(|(u, s)| {
                    let e = s.first_refusal.as_ref()?;
                    Some((
                        u.name(),
                        RefusalReport {
                            limit: e.limit.name(),
                            times: s.refused,
                            message: e.to_string(),
                            not_loaded: s.not_loaded.clone(),
                        },
                    ))
                })
                .collect(),
        }
    }
}

/// Bytes held for one use of one target; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<Account>,
    what: Use,
    bytes: u64,
}

impl Reservation {
    /// `more` bytes, or the cap they would pass (counted; the reservation keeps what it had).
    pub fn try_grow(&mut self, more: u64) -> Result<(), BudgetExceeded> {
        self.account.take(self.what, more)?;
        self.bytes += more;
        Ok(())
    }

    /// Gives back up to `less` bytes.
    pub fn shrink(&mut self, less: u64) {
        let less = less.min(self.bytes);
        self.account.give(self.what, less);
        self.bytes -= less;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.account.give(self.what, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-target cap refuses first; accounts together stop at the agent-wide cap; refusals
    /// are counted and reported with their limit; dropped reservations give their bytes back.
    #[test]
    fn one_account_per_live_target() {
        let a = Account::for_pid(u32::MAX - 7);
        let b = Account::for_pid(u32::MAX - 7);
        assert!(Arc::ptr_eq(&a, &b));
        let r = a.reserve(Use::V8, 10).unwrap();
        assert_eq!(b.report().by_use["v8"], 10);
        drop((r, a, b));
        assert_eq!(Account::for_pid(u32::MAX - 7).report().used_bytes, 0);
    }

    #[test]
    fn target_and_agent_caps() {
        static POOL: Pool = Pool::new(250);
        let a = Account::in_pool(1, 100, &POOL);
        let b = Account::in_pool(2, 100, &POOL);
        let c = Account::in_pool(3, 100, &POOL);
        let r1 = a.reserve(Use::PerfMap, 100).unwrap();
        let e = a.reserve(Use::Symbols, 1).unwrap_err();
        assert_eq!((e.limit, e.what), (Limit::Target, Use::Symbols));
        let mut r2 = b.reservation(Use::PerfMap);
        r2.try_grow(60).unwrap();
        r2.try_grow(40).unwrap();
        let _r3 = c.reserve(Use::Unwind, 50).unwrap();
        let e = c.reserve(Use::Unwind, 1).unwrap_err();
        assert_eq!(e.limit, Limit::Agent, "{e}");
        assert_eq!(
            c.report().used_bytes,
            50,
            "a refusal by the agent's cap leaves the target's count as it was"
        );
        c.note_not_loaded(Use::Unwind, "libx.so".into());
        let rep = c.report();
        assert_eq!(rep.refused["unwind"].limit, "agent");
        assert_eq!(rep.refused["unwind"].not_loaded.as_deref(), Some("libx.so"));
        assert_eq!(a.report().by_use["perf_map"], 100);
        drop(r1);
        assert_eq!(a.report().used_bytes, 0);
        let _again = c.reserve(Use::Unwind, 50).unwrap();
        r2.shrink(30);
        assert_eq!(b.report().used_bytes, 70);
        assert!(refusals()
            .iter()
            .any(|&(u, l, n)| u == "unwind" && l == "agent" && n >= 1));
        drop(r2);
        assert_eq!(POOL.usage().0, 100);
    }
}
