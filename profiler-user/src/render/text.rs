//! The human leak report printed by `memscope record` and written to `report.txt`: a header
//! (process, duration, sampling, totals, dropped events, what memscope could not see), then the
//! largest leaks ([`HeapProfile::leaks`]) with their stacks, innermost frame first.
//!
//! Every string the target controls (function, file and module names) is escaped for a
//! terminal ([`super::escape::term`]): the report is printed and written to `report.txt`.
//!
//! Limits: plain text for a terminal or a file, no colors; the layout is for people, not
//! parsers (use [`super::json::leaks_json`] for that).
use std::fmt::Write as _;

use super::{escape::term, human_bytes};
use crate::aggregate::{Frame, HeapProfile};

/// The leak report of `p`, listing at most `top` leaks. Ends with a newline.
pub fn leak_report(p: &HeapProfile, top: usize) -> String {
    let mut out = String::new();
    header(&mut out, p);
    out.push('\n');
    leaks(&mut out, p, top);
    out
}

fn header(out: &mut String, p: &HeapProfile) {
    let t = &p.totals;
    let _ = writeln!(out, "memscope heap report: pid {}, {} recorded", p.pid, secs(p.duration_s));
    if p.sample_bytes > 0 {
        let _ = writeln!(
            out,
            "  sampling:   one sample per {} allocated on average (numbers below are estimates)",
            human_bytes(p.sample_bytes)
        );
    } else {
        let _ = writeln!(out, "  sampling:   every allocation");
    }
    let _ = writeln!(out, "  live:       {} in {}", human_bytes(t.live_bytes), plural(t.live_allocs, "allocation"));
    let _ = writeln!(
        out,
        "  allocated:  {} in {}, {}",
        human_bytes(t.allocated_bytes),
        plural(t.allocs, "allocation"),
        plural(t.frees, "free")
    );
    let dropped: u64 = p.dropped.values().sum();
    if p.dropped.is_empty() {
        let _ = writeln!(out, "  dropped:    none");
    } else {
        let _ = writeln!(out, "  dropped:    {}", by_reason(&p.dropped));
    }
    if dropped > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} dropped; the numbers in this report undercount and some leaks may be missing",
            plural(dropped, "event")
        );
    }
    let truncated: u64 = p.unwind.iter().filter(|(k, _)| k.starts_with("truncated")).map(|(_, v)| v).sum();
    if !p.unwind.is_empty() {
        let _ = writeln!(out, "  stacks:     {}", by_reason(&p.unwind));
    }
    if truncated > 0 {
        let _ = writeln!(
            out,
            "NOTE: {} ended before the outermost frame (code without unwind information, or a frame that could not be verified)",
            plural(truncated, "stack walk")
        );
    }
    if let Some(r) = &p.runtime_heap {
        let _ = writeln!(out, "  {}", term(r));
    }
    let _ =
        writeln!(out, "  heap bytes allocated before attach (not seen): {}", human_bytes(p.unseen_before_attach_bytes));
    if p.untracked_frees > 0 {
        let _ =
            writeln!(out, "  frees of memory not seen allocated (before attach or not sampled): {}", p.untracked_frees);
    }
    if p.target_exited {
        let _ = writeln!(out, "  the target exited during the recording");
    }
}

fn leaks(out: &mut String, p: &HeapProfile, top: usize) {
    let all = p.leaks();
    if all.is_empty() && p.totals.allocs == 0 {
        // Not "No leaks": nothing was seen, which says nothing about the heap.
        let _ = writeln!(
            out,
            "No allocation seen since attach: the process did not allocate through the probed allocator \
             (it may use one memscope does not recognize, or a runtime heap such as Go's); leaks cannot be judged."
        );
        return;
    }
    if all.is_empty() {
        let _ = writeln!(out, "No leaks: no live allocation is older than {}.", secs(p.min_age_s));
        return;
    }
    let shown = all.len().min(top);
    let _ = writeln!(
        out,
        "Top leaks (live and older than {}): {} in {}, showing {} of {}",
        secs(p.min_age_s),
        human_bytes(p.leaked_bytes()),
        plural(all.len() as u64, "stack"),
        shown,
        all.len()
    );
    for (i, s) in all.iter().take(top).enumerate() {
        let _ = writeln!(
            out,
            "\n#{}  {} in {}, oldest {}",
            i + 1,
            human_bytes(s.leak_bytes),
            plural(s.leak_allocs, "allocation"),
            secs(s.oldest_age_s)
        );
        if s.frames.is_empty() {
            let _ = writeln!(out, "  [no stack]");
        }
        for f in &s.frames {
            let _ = writeln!(out, "  {}", frame_line(f));
        }
    }
}

/// `function  (file:line)`, `function  (in libfoo.so)` or `module+0xoff`; the target's
/// names escaped for a terminal ([`term`]).
fn frame_line(f: &Frame) -> String {
    let name = f.display_name();
    let name = term(&name);
    match (f.location(), &f.function, &f.module) {
        (Some(loc), _, _) => format!("{name}  ({})", term(&loc)),
        (None, Some(_), Some(m)) => format!("{name}  (in {})", term(m.rsplit('/').next().unwrap_or(m))),
        _ => name.into_owned(),
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `3.2s`, `12m05s`, `2h03m`.
fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?s".to_string();
    }
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let whole = s.round() as u64;
    if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

/// `reason count, reason count, ...`.
fn by_reason(counts: &std::collections::BTreeMap<String, u64>) -> String {
    counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FrameInfo;
    use crate::aggregate::StackSample;

    #[test]
    fn durations() {
        assert_eq!(secs(3.24), "3.2s");
        assert_eq!(secs(725.0), "12m05s");
        assert_eq!(secs(7380.0), "2h03m");
        assert_eq!(secs(f64::NAN), "?s");
    }

    /// A recording that saw no allocation at all never says "No leaks".
    #[test]
    fn nothing_seen_is_not_no_leaks() {
        let mut p = HeapProfile::default();
        let r = leak_report(&p, 5);
        assert!(!r.contains("No leaks"), "{r}");
        assert!(r.contains("No allocation seen since attach"), "{r}");
        p.totals.allocs = 3;
        assert!(leak_report(&p, 5).contains("No leaks"));
    }

    #[test]
    fn warns_loudly_on_drops_and_caps_top() {
        let leak = |b: u64| StackSample {
            frames: vec![FrameInfo { function: Some(format!("f{b}").into()), ..FrameInfo::default() }.into()],
            leak_bytes: b,
            leak_allocs: 1,
            ..StackSample::default()
        };
        let mut p = HeapProfile { stacks: vec![leak(10), leak(30), leak(20)], ..HeapProfile::default() };
        p.dropped.insert("ringbuf_full".into(), 0);
        let r = leak_report(&p, 2);
        assert!(!r.contains("WARNING"), "{r}");
        assert!(r.contains("showing 2 of 3"), "{r}");
        assert!(r.contains("#1  30 B in 1 allocation"), "{r}");
        assert!(r.contains("#2  20 B"), "{r}");
        assert!(!r.contains("#3"), "{r}");
        p.dropped.insert("ringbuf_full".into(), 7);
        let r = leak_report(&p, 2);
        assert!(r.contains("WARNING: 7 events dropped"), "{r}");
        assert!(r.contains("ringbuf_full 7"), "{r}");
    }
}
