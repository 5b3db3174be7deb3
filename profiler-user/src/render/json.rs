//! JSON outputs and profile diffs.
//!
//! [`leaks_json`] is a public, documented contract (`leaks.json` of `memscope record`, the
//! HTTP API): its keys must not change without a version bump. Its schema:
//!
//! ```text
//! { "pid", "duration_s", "sample_bytes", "min_age_s", "taken_at_ms", "target_exited",
//!   "totals": { "live_bytes", "live_allocs", "allocated_bytes", "allocs", "frees" },
//!   "dropped": { "<reason>": count, ... },
//!   "unwind": { "truncated_no_cfi": n, "truncated_bad_frame": n, "truncated_depth": n,
//!               "truncated_unmapped": n, "frame_pointer_frames": n },
//!   "unseen_before_attach_bytes", "untracked_frees",
//!   "source", "live_tracking" (only for a USDT source: "usdt:ddheap", false for alloc-only),
//!   "coverage": { "rss_anon_bytes", "traced_live_bytes", "before_attach_bytes",
//!                 "unaccounted_bytes", "ratio", "low",
//!                 "reasons": [ { "reason": "<stable name>", "text", "bytes"? } ],
//!                 "breakdown"?: { "rss_bytes", "brk_heap_bytes", "anon_mapping_bytes",
//!                   "thread_stack_bytes", "file_backed_bytes", "file_private_anon_bytes",
//!                   "shared_bytes", "other_bytes", "mappings", "threads_located", "complete" } }
//!     (absent when the process's memory could not be read; see crate::coverage),
//!   "leaks": [ { "bytes", "allocs", "oldest_age_s",
//!                "frames": [ { "function", "file", "line", "module", "address" } ] } ] }
//!   (`"inlined": true` on a frame inlined into the next one, at the same address)
//! ```
//!
//! Leaks are largest first, frames innermost first; unknown frame fields are `null`; the
//! address is a `"0x..."` string (JSON numbers lose precision past 2^53).
//!
//! [`heap_json`] is the whole [`HeapProfile`] as serde writes it. [`diff_json`] and
//! [`diff_folded`] compare two profiles of the same process, matching stacks by their frames'
//! display names (addresses can move when a library is reloaded; names do not).
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::folded::Folder;
use crate::aggregate::{Frame, HeapProfile, Measure, StackSample};

fn frame_json(f: &Frame) -> Value {
    let mut v = json!({
        "function": f.function,
        "file": f.file,
        "line": f.line,
        "module": f.module,
        "address": format!("{:#x}", f.address),
    });
    if f.inlined {
        v["inlined"] = Value::Bool(true);
    }
    v
}

fn frames_json(frames: &[Frame]) -> Value {
    Value::Array(frames.iter().map(frame_json).collect())
}

/// The leak report as JSON (schema in the module doc), listing at most `top` leaks
/// (all when `None`); `leak_stacks` counts them all, so a cut list is visible as such.
pub fn leaks_json(p: &HeapProfile, top: Option<usize>) -> Value {
    let t = &p.totals;
    let all = p.leaks();
    let leak_stacks = all.len();
    let leaks: Vec<Value> = all
        .into_iter()
        .take(top.unwrap_or(usize::MAX))
        .map(|s| {
            let mut leak = json!({
                "bytes": s.leak_bytes,
                "allocs": s.leak_allocs,
                "oldest_age_s": s.oldest_age_s,
                "frames": frames_json(&s.frames),
            });
            if let Some(g) = p.probe_gaps {
                // Its oldest allocation predates the end of the last gap: some of it may have
                // been freed while the probes were out.
                let oldest_ms = p.taken_at_ms.saturating_sub((s.oldest_age_s * 1000.0) as u64);
                leak["may_include_unseen_frees"] = json!(oldest_ms < g.last_end_ms);
            }
            leak
        })
        .collect();
    let mut out = json!({
        "pid": p.pid,
        "duration_s": p.duration_s,
        "sample_bytes": p.sample_bytes,
        "min_age_s": p.min_age_s,
        "taken_at_ms": p.taken_at_ms,
        "target_exited": p.target_exited,
        "totals": {
            "live_bytes": t.live_bytes,
            "live_allocs": t.live_allocs,
            "allocated_bytes": t.allocated_bytes,
            "allocs": t.allocs,
            "frees": t.frees,
        },
        "dropped": p.dropped,
        "unwind": p.unwind,
        "unwind_tables": p.unwind_tables,
        "unseen_before_attach_bytes": p.unseen_before_attach_bytes,
        "untracked_frees": p.untracked_frees,
        "leak_stacks": leak_stacks,
        "leaks": leaks,
    });
    if let Some(source) = &p.source {
        out["source"] = json!(source);
        out["live_tracking"] = json!(p.live_tracking.unwrap_or(true));
    }
    if let Some(c) = &p.coverage {
        out["coverage"] = serde_json::to_value(c).unwrap_or(Value::Null);
    }
    if let Some(r) = &p.runtime_heap {
        out["runtime_heap"] = json!(r);
    }
    if let Some(g) = p.probe_gaps {
        out["probe_gaps"] = json!({
            "count": g.count,
            "total_ms": g.total_ms,
            "last_end_ms": g.last_end_ms,
            "note": "the allocator probes were out of the process during V8 heap walks: allocations and frees in these windows were not seen, so memory freed then may be listed as live (leaks with may_include_unseen_frees)",
        });
    }
    if let Some(js) = &p.js_names {
        let unnamed = js.unnamed_total();
        out["js_names"] = json!({
            "named": js.named,
            "unnamed": js.unnamed,
            "layout_error": js.layout_error,
            "note": format!("{unnamed} JS frames unnamed (their frames keep the interpreter's or JIT code's name or address)"),
        });
    }
    out
}

/// The whole profile, exactly as serde serializes [`HeapProfile`] (the snapshot file format).
pub fn heap_json(p: &HeapProfile) -> Value {
    // HeapProfile has only string map keys, so this cannot fail; NaN floats become null.
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// `after - before`, saturated to the i64 range.
fn delta(after: u64, before: u64) -> i64 {
    let d = i128::from(after) - i128::from(before);
    d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[derive(Default)]
struct Pair<'a> {
    frames: Option<&'a [Frame]>,
    before_bytes: u64,
    before_allocs: u64,
    after_bytes: u64,
    after_allocs: u64,
}

/// Live bytes and allocations of both profiles per stack, keyed by display names (innermost
/// first). Frames are taken from `after` when the stack is in both.
fn pair_stacks<'a>(before: &'a HeapProfile, after: &'a HeapProfile) -> BTreeMap<Vec<String>, Pair<'a>> {
    let mut map: BTreeMap<Vec<String>, Pair<'a>> = BTreeMap::new();
    let key = |s: &StackSample| s.frames.iter().map(|f| f.display_name()).collect::<Vec<_>>();
    for s in &after.stacks {
        let e = map.entry(key(s)).or_default();
        e.frames.get_or_insert(&s.frames);
        e.after_bytes += s.live_bytes;
        e.after_allocs += s.live_allocs;
    }
    for s in &before.stacks {
        let e = map.entry(key(s)).or_default();
        e.frames.get_or_insert(&s.frames);
        e.before_bytes += s.live_bytes;
        e.before_allocs += s.live_allocs;
    }
    map
}

/// Growth of the live heap from `before` to `after` (two snapshots of one process, `after`
/// later), per stack and in total:
///
/// ```text
/// { "pid", "before_taken_at_ms", "after_taken_at_ms", "interval_s",
///   "totals": { "growth_bytes", "growth_allocs", "before_bytes", "after_bytes",
///               "new_allocated_bytes", "new_allocs", "new_frees" },
///   "stacks_changed": n,
///   "stacks": [ { "growth_bytes", "growth_allocs", "before_bytes", "after_bytes",
///                 "frames": [ ... as in leaks_json ... ] } ] }
/// ```
///
/// Values are live bytes and allocations; growth may be negative. `stacks` lists the stacks
/// whose live bytes or allocations changed, largest growth first (ties: larger `after_bytes`,
/// then by frame names), at most `top` of them (all when `None`); `stacks_changed` counts them
/// all. The `new_*` totals are what happened between the two snapshots.
pub fn diff_json(before: &HeapProfile, after: &HeapProfile, top: Option<usize>) -> Value {
    let mut rows: Vec<(Vec<String>, Pair<'_>)> = pair_stacks(before, after)
        .into_iter()
        .filter(|(_, e)| e.before_bytes != e.after_bytes || e.before_allocs != e.after_allocs)
        .collect();
    rows.sort_by(|(ka, a), (kb, b)| {
        delta(b.after_bytes, b.before_bytes)
            .cmp(&delta(a.after_bytes, a.before_bytes))
            .then_with(|| b.after_bytes.cmp(&a.after_bytes))
            .then_with(|| ka.cmp(kb))
    });
    let changed = rows.len();
    let stacks: Vec<Value> = rows
        .into_iter()
        .take(top.unwrap_or(usize::MAX))
        .map(|(_, e)| {
            json!({
                "growth_bytes": delta(e.after_bytes, e.before_bytes),
                "growth_allocs": delta(e.after_allocs, e.before_allocs),
                "before_bytes": e.before_bytes,
                "after_bytes": e.after_bytes,
                "frames": frames_json(e.frames.unwrap_or_default()),
            })
        })
        .collect();
    let (b, a) = (&before.totals, &after.totals);
    json!({
        "pid": after.pid,
        "before_taken_at_ms": before.taken_at_ms,
        "after_taken_at_ms": after.taken_at_ms,
        "interval_s": after.duration_s - before.duration_s,
        "totals": {
            "growth_bytes": delta(a.live_bytes, b.live_bytes),
            "growth_allocs": delta(a.live_allocs, b.live_allocs),
            "before_bytes": b.live_bytes,
            "after_bytes": a.live_bytes,
            "new_allocated_bytes": delta(a.allocated_bytes, b.allocated_bytes),
            "new_allocs": delta(a.allocs, b.allocs),
            "new_frees": delta(a.frees, b.frees),
        },
        "stacks_changed": changed,
        "stacks": stacks,
    })
}

/// Differential folded stacks, inferno's and `difffolded.pl`'s input format: one line
/// `stack before after` per stack (folded as in [`super::folded`], names sanitized the same
/// way), values in bytes of measure `m`; stacks with the same folded names are merged, lines
/// where both values are zero are left out, lines are sorted.
pub fn diff_folded(before: &HeapProfile, after: &HeapProfile, m: Measure) -> String {
    let mut folder = Folder::default();
    let mut merged: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in &before.stacks {
        let v = m.of(s);
        if v > 0 {
            merged.entry(folder.stack_key(s)).or_default().0 += v;
        }
    }
    for s in &after.stacks {
        let v = m.of(s);
        if v > 0 {
            merged.entry(folder.stack_key(s)).or_default().1 += v;
        }
    }
    let mut out = String::new();
    for (stack, (b, a)) in merged {
        out.push_str(&format!("{stack} {b} {a}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FrameInfo;

    fn stack(name: &str, live: u64, address: u64) -> StackSample {
        StackSample {
            frames: vec![FrameInfo { function: Some(name.into()), address, ..FrameInfo::default() }.into()],
            live_bytes: live,
            live_allocs: live / 8,
            ..StackSample::default()
        }
    }

    #[test]
    fn diff_matches_by_name_not_address_and_sorts_by_growth() {
        let before = HeapProfile { stacks: vec![stack("a", 80, 1), stack("b", 800, 2)], ..HeapProfile::default() };
        let after = HeapProfile {
            stacks: vec![stack("a", 160, 0x99), stack("b", 8, 2), stack("c", 16, 3), stack("d", 0, 4)],
            ..HeapProfile::default()
        };
        let d = diff_json(&before, &after, None);
        let names: Vec<&str> =
            d["stacks"].as_array().unwrap().iter().map(|s| s["frames"][0]["function"].as_str().unwrap()).collect();
        assert_eq!(names, ["a", "c", "b"]);
        assert_eq!(d["stacks"][0]["growth_bytes"], 80);
        assert_eq!(d["stacks"][0]["frames"][0]["address"], "0x99");
        assert_eq!(d["stacks"][2]["growth_bytes"], -792);
        assert_eq!(d["stacks_changed"], 3);
        assert_eq!(diff_json(&before, &after, Some(1))["stacks"].as_array().unwrap().len(), 1);
        assert_eq!(diff_folded(&before, &after, Measure::Inuse), "a 80 160\nb 800 8\nc 0 16\n");
    }

    #[test]
    fn delta_saturates() {
        assert_eq!(delta(0, u64::MAX), i64::MIN);
        assert_eq!(delta(u64::MAX, 0), i64::MAX);
        assert_eq!(delta(3, 5), -2);
    }
}
