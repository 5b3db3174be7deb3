//! Snapshot triggers: take a heap snapshot of a target at the right moment, not only when asked.
//! Every interval, when the live heap grew, when RSS or the cgroup's memory crosses a threshold,
//! when a named function returns (a uretprobe), when a USDT probe is reached, when the target
//! exits. [`spec`] parses what the user asks for, [`engine`] decides when (with a minimum
//! spacing), [`resolve`] and [`usdt`] find the probe sites; the caller (`memscope record`, the
//! agent) takes the snapshots and stores them with their reason.
//!
//! Limits: one engine per target; return/USDT probes are attached to the objects mapped when
//! the engine starts (not to libraries loaded later); at most `crate::bpf::target_view::MAX_TRIGGERS_PER_TARGET`
//! probe sites per target. Needs what the session needs (root, kernel ≥ 5.15 for attach
//! cookies), plus ptrace access to the target for USDT semaphores.
pub mod engine;
pub mod resolve;
pub mod spec;
pub mod usdt;

use std::collections::HashMap;

use serde_json::{json, Value};

pub use engine::{Fired, TriggerEngine, TriggerHost, TriggerStatus, DEFAULT_MIN_SPACING, POLL_INTERVAL};
pub use spec::{GrowthThreshold, MemorySource, TriggerSpec};

use crate::aggregate::{growth, HeapProfile};

/// The file name of a triggered snapshot: `<seq>-<reason>.json`, seq zero-padded to 4 digits,
/// the reason reduced to `[A-Za-z0-9._-]` (others become `_`) and at most 80 characters:
/// `0003-return_gc_cycle.json`.
pub fn snapshot_file_name(seq: u64, reason: &str) -> String {
    let clean: String = reason
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(80)
        .collect();
    format!("{seq:04}-{clean}.json")
}

/// A triggered snapshot as JSON: the `leaks.json` schema ([`crate::render::json::leaks_json`],
/// with the verdict keys of [`growth::annotate_leaks_json`]) plus `"reason"` and `"taken_at"`
/// (RFC 3339, UTC, milliseconds).
pub fn snapshot_json(p: &HeapProfile, reason: &str, verdicts: &HashMap<String, growth::Verdict>) -> Value {
    let mut v = crate::render::json::leaks_json(p, None);
    growth::annotate_leaks_json(&mut v, verdicts);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("reason".into(), json!(reason));
        obj.insert("taken_at".into(), json!(rfc3339_utc(p.taken_at_ms)));
    }
    v
}

/// `2026-11-24T16:05:01.123Z` for milliseconds since the Unix epoch.
pub fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File names are ordered and safe; times are RFC 3339 UTC; snapshot JSON is leaks.json
    /// plus reason, time and (null) verdicts.
    #[test]
    fn names_times_and_json() {
        assert_eq!(snapshot_file_name(3, "return:gc_cycle"), "0003-return_gc_cycle.json");
        assert_eq!(snapshot_file_name(12, "usdt:app:gc"), "0012-usdt_app_gc.json");
        assert_eq!(snapshot_file_name(1, "return:ns::f(int)"), "0001-return_ns__f_int_.json");
        assert_eq!(snapshot_file_name(10000, "exit"), "10000-exit.json");
        assert!(!snapshot_file_name(1, "return:../../etc").contains('/'));
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_utc(1_795_536_301_250), "2026-11-24T16:05:01.250Z");
        let p = HeapProfile { taken_at_ms: 1_795_536_301_250, ..HeapProfile::default() };
        let j = snapshot_json(&p, "interval", &HashMap::new());
        assert_eq!(j["reason"], "interval");
        assert_eq!(j["taken_at"], "2026-11-24T16:05:01.250Z");
        assert_eq!(j["taken_at_ms"], 1_795_536_301_250u64);
        assert!(j["leaks"].is_array() && j["verdict_snapshots"].is_null());
    }
}
