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
    if let Some(note) = p.source_note() {
        let _ = writeln!(out, "  source:     {note} (numbers below are estimates)");
    } else if p.sample_bytes > 0 {
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
    coverage(out, p);
}

/// The coverage statement ([`crate::coverage`]): always a line, and when low, why in words.
fn coverage(out: &mut String, p: &HeapProfile) {
    let Some(c) = &p.coverage else {
        let why = if p.target_exited { "the process had exited" } else { "its memory could not be read" };
        let _ = writeln!(out, "  coverage:   unknown: {why} at snapshot time (see docs/coverage.md)");
        return;
    };
    let _ = writeln!(
        out,
        "  coverage:   {} traced live of {} anonymous memory (RssAnon): {:.0}%; {} there before attach, {} unaccounted",
        human_bytes(c.traced_live_bytes),
        human_bytes(c.rss_anon_bytes),
        c.ratio * 100.0,
        human_bytes(c.before_attach_bytes),
        human_bytes(c.unaccounted_bytes)
    );
    if let Some(b) = &c.breakdown {
        let _ = writeln!(
            out,
            "  memory:     RSS {} = brk heap {}, anonymous mappings {}, thread stacks {}, file-backed {} (+{} written copies), shared {}, other {}{}",
            human_bytes(b.rss_bytes),
            human_bytes(b.brk_heap_bytes),
            human_bytes(b.anon_mapping_bytes),
            human_bytes(b.thread_stack_bytes),
            human_bytes(b.file_backed_bytes),
            human_bytes(b.file_private_anon_bytes),
            human_bytes(b.shared_bytes),
            human_bytes(b.other_bytes),
            if b.complete { "" } else { " (incomplete: a bound on the target's mappings was reached)" }
        );
    }
    if c.low {
        let _ = writeln!(
            out,
            "LOW COVERAGE: memscope accounts for {:.0}% of the process's anonymous memory by stack. Why:",
            c.ratio * 100.0
        );
        if c.reasons.is_empty() {
            let _ = writeln!(out, "  - unexplained");
        }
        for w in &c.reasons {
            match w.bytes {
                Some(b) => {
                    let _ = writeln!(out, "  - {} ({})", w.text, human_bytes(b));
                }
                None => {
                    let _ = writeln!(out, "  - {}", w.text);
                }
            }
        }
    }
}

/// What the leak list can claim: all of the memory, or only the part memscope sees.
fn scope_note(p: &HeapProfile) -> String {
    match &p.coverage {
        Some(c) if c.low => format!(
            " This covers only the {:.0}% of the process's anonymous memory memscope sees (see LOW COVERAGE above).",
            c.ratio * 100.0
        ),
        Some(_) => String::new(),
        None => " Coverage unknown: memory memscope does not see is not judged.".to_string(),
    }
}

fn leaks(out: &mut String, p: &HeapProfile, top: usize) {
    let all = p.leaks();
    if p.live_tracking == Some(false) {
        let _ = writeln!(
            out,
            "Leaks cannot be judged: the service's sampler reports no frees (an alloc-only build; live tracking \
             needs its live-heap feature). Allocation figures only."
        );
        return;
    }
    if all.is_empty() && p.totals.allocs == 0 {
        // Not "No leaks": nothing was seen, which says nothing about the heap.
        let _ = writeln!(
            out,
            "No allocation seen since attach: the process did not allocate through the probed allocator \
             (it may use one memscope does not recognize, or a runtime heap such as Go's); leaks cannot be judged.{}",
            scope_note(p)
        );
        return;
    }
    if all.is_empty() {
        let _ = writeln!(out, "No leaks: no live allocation is older than {}.{}", secs(p.min_age_s), scope_note(p));
        return;
    }
    let shown = all.len().min(top);
    let leaked = p.leaked_bytes();
    if leaked != p.totals.live_bytes {
        // The two figures state different things: say how they relate.
        let _ = writeln!(
            out,
            "Live {}: {} of it older than {} (the leaks below), {} younger.",
            human_bytes(p.totals.live_bytes),
            human_bytes(leaked),
            secs(p.min_age_s),
            human_bytes(p.totals.live_bytes.saturating_sub(leaked))
        );
    }
    let _ = writeln!(
        out,
        "Top leaks (live and older than {}): {} in {}, showing {} of {}",
        secs(p.min_age_s),
        human_bytes(leaked),
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

    /// A low coverage is stated with its reasons, and "No leaks" then says what it covers.
    #[test]
    fn low_coverage_qualifies_no_leaks() {
        use crate::coverage::{assess, Figures, Hints, Reason};
        let hints = Hints { reasons: vec![Reason::StaticAllocatorNotRecognized] };
        let figures = Figures { rss_anon_bytes: 1 << 30, traced_live_bytes: 864, rss_anon_at_attach: 0, allocs: 3 };
        let p = HeapProfile {
            coverage: Some(assess(figures, &hints, None)),
            totals: crate::aggregate::Totals { allocs: 3, ..Default::default() },
            ..HeapProfile::default()
        };
        let r = leak_report(&p, 5);
        assert!(r.contains("  coverage:   864 B traced live of 1.0 GiB anonymous memory (RssAnon): 0%"), "{r}");
        assert!(r.contains("LOW COVERAGE") && r.contains("  - statically linked allocator not recognized"), "{r}");
        assert!(r.contains("No leaks: no live allocation is older than 0.0s. This covers only the 0%"), "{r}");
        let figures = Figures { rss_anon_bytes: 1 << 20, traced_live_bytes: 1 << 20, rss_anon_at_attach: 0, allocs: 3 };
        let p = HeapProfile { coverage: Some(assess(figures, &hints, None)), ..p };
        let r = leak_report(&p, 5);
        assert!(!r.contains("LOW") && r.contains("No leaks: no live allocation is older than 0.0s.\n"), "{r}");
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
