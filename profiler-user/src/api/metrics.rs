//! `GET /metrics`: Prometheus text format (0.0.4). Per target: live bytes and allocations,
//! allocation and free events, dropped events by reason. The agent itself: CPU seconds and
//! resident memory (from `/proc/self/stat`), requests by route template and status, refusals
//! by limit, snapshots stored.
//!
//! Route labels are templates (`/v1/targets/{id}/heap`), never raw paths, so label
//! cardinality stays bounded whatever clients send; unknown routes count as `unmatched`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use warp::http::{Method, StatusCode};

use super::routes::ROUTES;
use crate::target::TargetStats;

/// Counters kept by the agent.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    /// Refusals by limit (`memscope_http_refused_total{limit}`).
    /// Requests without a valid token refused by the agent-wide unauthenticated budget.
    pub refused_unauth: AtomicU64,
    /// ... by their address's unauthenticated budget.
    pub refused_unauth_address: AtomicU64,
    /// ... by their address's failed-authentication budget.
    pub refused_auth_failures: AtomicU64,
    /// Requests with a valid token refused by their token's budget.
    pub refused_token: AtomicU64,
    /// Expensive requests refused because the cap was full (shared with the agent's triggers:
    /// [`crate::agent::State`]'s `refused_busy`).
    pub refused_busy: std::sync::Arc<AtomicU64>,
}

/// The route template that `method path` matches, or `unmatched`.
pub fn route_label(method: &Method, path: &str) -> (&'static str, &'static str) {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for &(m, template) in ROUTES {
        if m != method.as_str() {
            continue;
        }
        let tsegs: Vec<&str> = template.trim_start_matches('/').split('/').collect();
        if tsegs.len() == segs.len()
            && tsegs.iter().zip(&segs).all(|(t, s)| (t.starts_with('{') && !s.is_empty()) || t == s)
        {
            return (m, template);
        }
    }
    ("-", "unmatched")
}

impl Metrics {
    pub fn observe(&self, method: &Method, path: &str, status: StatusCode) {
        let (m, route) = route_label(method, path);
        *self.requests.lock().unwrap().entry((m, route, status.as_u16())).or_default() += 1;
    }

    /// The whole exposition text.
    pub fn render(&self, targets: &[TargetStats], snapshots: (usize, u64), in_flight: usize) -> String {
        let mut out = String::with_capacity(4096);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        family(&mut out, "memscope_target_live_bytes", "gauge", "Bytes allocated and not yet freed.");
        for t in targets {
            let _ = writeln!(out, "memscope_target_live_bytes{{{}}} {}", target_labels(t), t.live_bytes);
        }
        family(&mut out, "memscope_target_live_allocations", "gauge", "Allocations not yet freed.");
        for t in targets {
            let _ = writeln!(out, "memscope_target_live_allocations{{{}}} {}", target_labels(t), t.live_allocs);
        }
        family(&mut out, "memscope_target_events_total", "counter", "Allocation and free events seen since attach.");
        for t in targets {
            let l = target_labels(t);
            let _ = writeln!(out, "memscope_target_events_total{{{l},kind=\"alloc\"}} {}", t.allocs);
            let _ = writeln!(out, "memscope_target_events_total{{{l},kind=\"free\"}} {}", t.frees);
        }
        family(&mut out, "memscope_target_dropped_events_total", "counter", "Events that could not be recorded, by reason.");
        for t in targets {
            let l = target_labels(t);
            for (reason, n) in &t.dropped {
                let _ = writeln!(out, "memscope_target_dropped_events_total{{{l},reason=\"{}\"}} {n}", escape(reason));
            }
        }
        family(&mut out, "memscope_target_unwind_total", "counter", "Stack walks that ended early by reason (truncated_*), and frames found by frame pointers.");
        for t in targets {
            let l = target_labels(t);
            for (reason, n) in &t.unwind {
                let _ = writeln!(out, "memscope_target_unwind_total{{{l},reason=\"{}\"}} {n}", escape(reason));
            }
        }
        family(&mut out, "memscope_target_unwind_table_bytes", "gauge", "Kernel memory of the target's unwind tables (map size).");
        for t in targets {
            let bytes = t.unwind_tables.as_ref().map_or(0, |u| u.map_bytes);
            let _ = writeln!(out, "memscope_target_unwind_table_bytes{{{}}} {bytes}", target_labels(t));
        }
        family(&mut out, "memscope_target_alive", "gauge", "1 while the traced process runs.");
        for t in targets {
            let _ = writeln!(out, "memscope_target_alive{{{}}} {}", target_labels(t), u8::from(t.alive));
        }
        family(&mut out, "memscope_target_sample_bytes", "gauge", "Mean bytes between samples; 0 records every allocation.");
        for t in targets {
            let _ = writeln!(out, "memscope_target_sample_bytes{{{}}} {}", target_labels(t), t.sample_bytes);
        }
        coverage(&mut out, targets);
        let governed: Vec<_> = targets.iter().filter_map(|t| Some((t, t.probe_cost.as_ref()?))).collect();
        if !governed.is_empty() {
            family(&mut out, "memscope_target_probe_cpu_percent", "gauge", "Share of one CPU the probes cost the target (governor's measure).");
            for (t, c) in &governed {
                let _ = writeln!(out, "memscope_target_probe_cpu_percent{{{}}} {}", target_labels(t), c.cpu_percent);
            }
            family(&mut out, "memscope_target_cpu_budget_percent", "gauge", "The governor's budget for the target (--cpu-budget).");
            for (t, c) in &governed {
                let _ = writeln!(out, "memscope_target_cpu_budget_percent{{{}}} {}", target_labels(t), c.budget_percent.unwrap_or(0.0));
            }
        }
        let paused: Vec<_> = targets.iter().filter_map(|t| Some((pause_labels(t), t.pauses.as_ref()?))).collect();
        if !paused.is_empty() {
            family(&mut out, "memscope_target_probe_gaps_total", "counter", "Windows during which the allocator probes were out of the target (V8 heap walks): allocations and frees in them were not seen.");
            for (l, p) in &paused {
                let _ = writeln!(out, "memscope_target_probe_gaps_total{{{l}}} {}", p.probe_gaps.count);
            }
            family(&mut out, "memscope_target_probe_gap_seconds_total", "counter", "Time the allocator probes were out of the target.");
            for (l, p) in &paused {
                let _ = writeln!(out, "memscope_target_probe_gap_seconds_total{{{l}}} {:.3}", p.probe_gaps.total_ms as f64 / 1000.0);
            }
            family(&mut out, "memscope_target_paused_ratio", "gauge", "Share of wall time memscope's V8 operations paused the target over the pause budget's window.");
            for (l, p) in &paused {
                let _ = writeln!(out, "memscope_target_paused_ratio{{{l}}} {:.6}", p.paused_percent / 100.0);
            }
            family(&mut out, "memscope_target_pause_budget_ratio", "gauge", "The pause budget: the share of wall time memscope may pause the target (--pause-budget).");
            for (l, p) in &paused {
                let _ = writeln!(out, "memscope_target_pause_budget_ratio{{{l}}} {:.6}", p.budget_percent / 100.0);
            }
            family(&mut out, "memscope_target_pause_exceeds_budget", "gauge", "1 when one triggered V8 summary alone is predicted to pause the target longer than its pause budget ever allows (its triggered summaries are refused).");
            for (l, p) in &paused {
                let _ = writeln!(out, "memscope_target_pause_exceeds_budget{{{l}}} {}", u8::from(p.exceeds_budget));
            }
            family(&mut out, "memscope_target_suppressed_firings_total", "counter", "Trigger firings not taken to spare the target a pause, by reason (pause_budget, pause_exceeds_budget, self_caused_gc).");
            for (l, p) in &paused {
                for (reason, n) in &p.suppressed {
                    let _ = writeln!(out, "memscope_target_suppressed_firings_total{{{l},reason=\"{}\"}} {n}", escape(reason));
                }
            }
        }

        if let Some(s) = self_stat() {
            family(&mut out, "memscope_agent_cpu_seconds_total", "counter", "CPU time used by the agent (user and system).");
            let _ = writeln!(out, "memscope_agent_cpu_seconds_total {:.3}", s.cpu_seconds);
            family(&mut out, "memscope_agent_resident_bytes", "gauge", "Resident memory of the agent.");
            let _ = writeln!(out, "memscope_agent_resident_bytes {}", s.rss_bytes);
            family(&mut out, "memscope_agent_truncated_reads_total", "counter", "Reads of mapped target files truncated meanwhile, answered with zeros.");
            let _ = writeln!(out, "memscope_agent_truncated_reads_total {}", crate::truncation_guard::recovered());
        }
        family(&mut out, "memscope_target_file_refusals_total", "counter", "Files of targets not opened or not read to the end, by kind and reason.");
        for (kind, reason, n) in crate::target_fs::refusals() {
            let _ = writeln!(out, "memscope_target_file_refusals_total{{kind=\"{kind}\",reason=\"{reason}\"}} {n}");
        }
        family(&mut out, "memscope_target_budget_refusals_total", "counter", "Target-controlled data not loaded because a memory budget (the target's or the agent's) was spent, by use and limit.");
        for (what, limit, n) in crate::budget::refusals() {
            let _ = writeln!(out, "memscope_target_budget_refusals_total{{use=\"{what}\",limit=\"{limit}\"}} {n}");
        }
        let (used, cap) = crate::budget::usage();
        family(&mut out, "memscope_target_budget_bytes", "gauge", "Memory held for target-controlled data (perf map names, ...), all targets.");
        let _ = writeln!(out, "memscope_target_budget_bytes {used}");
        family(&mut out, "memscope_target_budget_cap_bytes", "gauge", "The agent-wide memory budget for target-controlled data.");
        let _ = writeln!(out, "memscope_target_budget_cap_bytes {cap}");
        family(&mut out, "memscope_agent_snapshots", "gauge", "Snapshots in the store.");
        let _ = writeln!(out, "memscope_agent_snapshots {}", snapshots.0);
        family(&mut out, "memscope_agent_snapshot_bytes", "gauge", "Bytes of snapshots on disk.");
        let _ = writeln!(out, "memscope_agent_snapshot_bytes {}", snapshots.1);
        family(&mut out, "memscope_agent_renders_in_flight", "gauge", "Expensive computations in progress.");
        let _ = writeln!(out, "memscope_agent_renders_in_flight {in_flight}");

        family(&mut out, "memscope_http_requests_total", "counter", "HTTP requests by route template and status.");
        for ((m, route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "memscope_http_requests_total{{method=\"{m}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        family(&mut out, "memscope_http_refused_total", "counter", "Requests refused by a limit, by limit.");
        for (limit, c) in [
            ("unauthenticated", &self.refused_unauth),
            ("unauthenticated_per_address", &self.refused_unauth_address),
            ("auth_failures", &self.refused_auth_failures),
            ("token", &self.refused_token),
            ("busy", &*self.refused_busy),
        ] {
            let _ = writeln!(out, "memscope_http_refused_total{{limit=\"{limit}\"}} {}", c.load(Ordering::Relaxed));
        }
        let per_address = super::conn_limits::refused();
        let _ = writeln!(out, "memscope_http_refused_total{{limit=\"connections_per_address\"}} {per_address}");
        let evicted = super::conn_limits::evicted();
        let _ = writeln!(out, "memscope_http_refused_total{{limit=\"connections\"}} {evicted}");
        out
    }
}

/// The coverage series ([`crate::coverage`]), one per workload (its labels), or per executable
/// name for a target of no workload: never a pid label (a pid changes with every restart).
/// Targets sharing labels (a workload's processes) are summed; the ratio is of the sums.
fn coverage(out: &mut String, targets: &[TargetStats]) {
    let mut by: BTreeMap<String, (u64, u64, bool, std::collections::BTreeSet<&'static str>)> = BTreeMap::new();
    for t in targets {
        let Some(c) = &t.coverage else { continue };
        let labels = if t.labels.is_empty() {
            format!("comm=\"{}\"", escape(&t.comm))
        } else {
            t.labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",")
        };
        let e = by.entry(labels).or_default();
        e.0 += c.rss_anon_bytes;
        e.1 += c.traced_live_bytes.min(c.rss_anon_bytes);
        e.2 |= c.low;
        e.3.extend(c.reasons.iter().map(|w| w.reason.name()));
    }
    if by.is_empty() {
        return;
    }
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(out, "memscope_coverage_anon_rss_bytes", "gauge", "Resident anonymous memory (RssAnon) of the traced processes, by workload.");
    for (l, (rss, _, _, _)) in &by {
        let _ = writeln!(out, "memscope_coverage_anon_rss_bytes{{{l}}} {rss}");
    }
    family(out, "memscope_coverage_traced_bytes", "gauge", "Live bytes memscope traced by stack, at most RssAnon, by workload.");
    for (l, (_, traced, _, _)) in &by {
        let _ = writeln!(out, "memscope_coverage_traced_bytes{{{l}}} {traced}");
    }
    family(out, "memscope_coverage_ratio", "gauge", "Share of the resident anonymous memory memscope traced by stack (1 when there is none).");
    for (l, (rss, traced, _, _)) in &by {
        let ratio = if *rss == 0 { 1.0 } else { *traced as f64 / *rss as f64 };
        let _ = writeln!(out, "memscope_coverage_ratio{{{l}}} {ratio:.4}");
    }
    family(out, "memscope_coverage_low_reason", "gauge", "1 for each reason a workload's coverage is low (see docs/coverage.md).");
    for (l, (_, _, low, reasons)) in &by {
        if !*low {
            continue;
        }
        if reasons.is_empty() {
            let _ = writeln!(out, "memscope_coverage_low_reason{{{l},reason=\"unexplained\"}} 1");
        }
        for r in reasons {
            let _ = writeln!(out, "memscope_coverage_low_reason{{{l},reason=\"{r}\"}} 1");
        }
    }
}

/// The labels of a target's series: a workload's process has its workload's labels only (a
/// pid changes with every restart: one label set per workload keeps the series count to the
/// workloads', not to the processes they ever had); other targets have pid and comm.
fn target_labels(t: &TargetStats) -> String {
    if t.labels.contains_key("workload") {
        return t.labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",");
    }
    let mut l = format!("pid=\"{}\",comm=\"{}\"", t.pid, escape(&t.comm));
    for (k, v) in &t.labels {
        let _ = write!(l, ",{k}=\"{}\"", escape(v));
    }
    l
}

/// Labels of the pause series: as every other series of the target.
fn pause_labels(t: &TargetStats) -> String {
    target_labels(t)
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The agent's own CPU time and resident memory.
#[derive(Clone, Copy, Debug)]
pub struct SelfStat {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

pub fn self_stat() -> Option<SelfStat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`: fields after the `)` that ends comm; utime and stime are fields 14
/// and 15, rss (pages) field 24, counting from 1.
pub(crate) fn parse_stat(text: &str) -> Option<SelfStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    Some(SelfStat {
        cpu_seconds: field(14)?.saturating_add(field(15)?) as f64 / ticks,
        rss_bytes: field(24)?.saturating_mul(page),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths map to their route template; anything else is `unmatched`.
    #[test]
    fn labels_are_templates() {
        assert_eq!(route_label(&Method::GET, "/v1/targets/123/heap"), ("GET", "/v1/targets/{id}/heap"));
        assert_eq!(
            route_label(&Method::GET, "/v1/snapshots/a/diff/b"),
            ("GET", "/v1/snapshots/{a}/diff/{b}")
        );
        assert_eq!(route_label(&Method::GET, "/v1/targets/1/../../x").1, "unmatched");
        assert_eq!(route_label(&Method::PUT, "/v1/targets").1, "unmatched");
        assert_eq!(route_label(&Method::GET, "/metrics"), ("GET", "/metrics"));
    }

    /// `/proc/self/stat` parses, also with spaces and parentheses in comm.
    #[test]
    fn parses_proc_stat() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 12345678 300 18446744073709551615";
        let s = parse_stat(line).unwrap();
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((s.cpu_seconds - 300.0 / ticks).abs() < 1e-9);
        assert_eq!(s.rss_bytes, 300 * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64);
        assert!(self_stat().unwrap().rss_bytes > 0);
    }

    /// The exposition has target and agent families, with escaped labels.
    #[test]
    fn renders_exposition() {
        let m = Metrics::default();
        m.observe(&Method::GET, "/v1/targets/7/heap", StatusCode::OK);
        m.observe(&Method::GET, "/nope", StatusCode::NOT_FOUND);
        let t = TargetStats {
            pid: 7,
            comm: "we\"ird".into(),
            live_bytes: 4096,
            dropped: [("stack_map_full".to_string(), 3)].into(),
            unwind: [("truncated_bad_frame".to_string(), 5)].into(),
            alive: true,
            ..TargetStats::default()
        };
        let low = crate::coverage::assess(
            crate::coverage::Figures { rss_anon_bytes: 1 << 30, traced_live_bytes: 4096, rss_anon_at_attach: 0, allocs: 0 },
            &crate::coverage::Hints { reasons: vec![crate::coverage::Reason::StaticAllocatorNotRecognized] },
            None,
        );
        let t = TargetStats { coverage: Some(low), ..t };
        let mut sibling = t.clone();
        sibling.pid = 8;
        let text = m.render(&[t, sibling], (2, 100), 0);
        // Coverage: no pid label, the two processes of one name summed, reasons as labels.
        assert!(text.contains("memscope_coverage_anon_rss_bytes{comm=\"we\\\"ird\"} 2147483648"), "{text}");
        assert!(text.contains("memscope_coverage_traced_bytes{comm=\"we\\\"ird\"} 8192"), "{text}");
        assert!(text.contains("memscope_coverage_ratio{comm=\"we\\\"ird\"} 0.0000"), "{text}");
        assert!(text.contains("memscope_coverage_low_reason{comm=\"we\\\"ird\",reason=\"static_allocator_not_recognized\"} 1"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("memscope_coverage") && l.contains("pid=")), "{text}");
        assert!(text.contains("memscope_target_live_bytes{pid=\"7\",comm=\"we\\\"ird\"} 4096"), "{text}");
        assert!(text.contains("reason=\"stack_map_full\"} 3"));
        assert!(text.contains("memscope_target_unwind_total{pid=\"7\",comm=\"we\\\"ird\",reason=\"truncated_bad_frame\"} 5"), "{text}");
        assert!(text.contains(
            "memscope_http_requests_total{method=\"GET\",route=\"/v1/targets/{id}/heap\",status=\"200\"} 1"
        ));
        assert!(text.contains("route=\"unmatched\",status=\"404\"} 1"));
        assert!(text.contains("memscope_agent_cpu_seconds_total "));
        assert!(text.contains("memscope_agent_resident_bytes "));
    }

    /// A workload's process is labelled by its workload, never by pid or comm: a restart (a
    /// new pid) leaves the label set unchanged.
    #[test]
    fn workload_series_carry_no_pid() {
        let m = Metrics::default();
        let labels: BTreeMap<String, String> =
            [("workload", "app-0123456789ab"), ("namespace", "shop"), ("pod", "web-0"), ("container", "app")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let of = |pid| TargetStats { pid, comm: "srv".into(), labels: labels.clone(), alive: true, ..TargetStats::default() };
        let (a, b) = (m.render(&[of(41)], (0, 0), 0), m.render(&[of(42)], (0, 0), 0));
        let series = |text: &str| -> Vec<String> {
            text.lines().filter(|l| l.starts_with("memscope_target_")).map(|l| l.rsplit_once(' ').unwrap().0.to_string()).collect()
        };
        assert!(!series(&a).is_empty());
        assert_eq!(series(&a), series(&b));
        assert!(series(&a).iter().all(|l| !l.contains("pid=") && !l.contains("comm=")), "{a}");
        assert!(a.contains("memscope_target_alive{container=\"app\",namespace=\"shop\",pod=\"web-0\",workload=\"app-0123456789ab\"} 1"), "{a}");
    }
}
