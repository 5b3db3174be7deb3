//! Growth verdicts for the JavaScript heap: the test of [`crate::aggregate::growth`] (least-
//! squares slope and its p-value, persistence of the recent slope, relevance, the same
//! confidence and the same thresholds), applied per constructor to its self size across the V8
//! heap summaries ([`super::summary`]) of one target or workload, oldest first. A summary
//! covers the whole JavaScript heap, so a constructor absent from one had no objects then and
//! counts as 0. At least [`growth::MIN_SNAPSHOTS`] summaries are needed; with fewer there are
//! no verdicts (`null` in JSON).
//!
//! Self size, not retained size: retained sizes are not computed (see [`super::summary`]). A
//! `Map` that keeps records shows its records' constructor growing (and `(array)` for the
//! map's backing store), not the `Map` itself.
//!
//! [`report`] is the JavaScript heap's leak report: the constructors of the latest summary
//! with their verdicts, growing ones first; [`judge_growth`] adds the verdicts to a diff.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::summary::{ConstructorGrowth, HeapSummary};
use crate::aggregate::growth::{self, Trend, Verdict, VerdictFields};

/// The last `window` summaries of one target (per constructor: self size) and their verdicts.
#[derive(Clone, Debug)]
pub struct SummarySeries {
    series: growth::Series,
    verdicts: HashMap<String, Verdict>,
    latest: Option<HeapSummary>,
}

impl SummarySeries {
    pub fn new(window: usize) -> SummarySeries {
        SummarySeries { series: growth::Series::new(window), verdicts: HashMap::new(), latest: None }
    }

    /// Adds a summary (later than those already in) and recomputes the verdicts.
    pub fn push(&mut self, s: &HeapSummary) {
        let values = s.constructors.iter().filter(|c| c.self_size > 0).map(|c| (c.name.clone(), c.self_size)).collect();
        self.series.push_values(s.taken_at_ms, values);
        self.verdicts = self.series.verdicts();
        self.latest = Some(s.clone());
    }

    /// Summaries in the window.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Verdicts by constructor name; empty below [`growth::MIN_SNAPSHOTS`] summaries.
    pub fn verdicts(&self) -> &HashMap<String, Verdict> {
        &self.verdicts
    }

    /// The leak report of the latest summary (`None` before the first).
    pub fn report(&self, top: usize) -> Option<JsHeapReport> {
        self.latest.as_ref().map(|s| report(s, &self.verdicts, top))
    }
}

/// One constructor of the latest summary, with its verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstructorVerdict {
    pub name: String,
    pub count: u64,
    pub self_size: u64,
    #[serde(flatten)]
    pub verdict: VerdictFields,
}

/// The JavaScript heap's leak report (`"v8"` in the agent's leak reports).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsHeapReport {
    /// The latest summary's reason, time and totals.
    pub reason: String,
    pub taken_at_ms: u64,
    pub node_count: u64,
    pub self_size: u64,
    pub retained_size_computed: bool,
    /// Summaries the verdicts are based on (`null` below 3), and the seconds they span.
    pub verdict_snapshots: Option<usize>,
    pub window_s: Option<f64>,
    /// Constructors of the latest summary; `constructors` lists the first `top` of them:
    /// growing ones first (steepest first), then the others by self size.
    pub constructor_count: usize,
    pub constructors: Vec<ConstructorVerdict>,
}

/// The leak report of summary `s` with the verdicts of its series (see [`JsHeapReport`]).
pub fn report(s: &HeapSummary, verdicts: &HashMap<String, Verdict>, top: usize) -> JsHeapReport {
    let mut rows: Vec<(Option<&Verdict>, ConstructorVerdict)> = s
        .constructors
        .iter()
        .map(|c| {
            let v = verdicts.get(&c.name);
            (v, ConstructorVerdict { name: c.name.clone(), count: c.count, self_size: c.self_size, verdict: VerdictFields::of(v) })
        })
        .collect();
    let growing = |v: Option<&Verdict>| v.filter(|v| v.verdict == Trend::Growing).map(|v| v.slope_bytes_per_s);
    rows.sort_by(|(va, a), (vb, b)| match (growing(*va), growing(*vb)) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.self_size.cmp(&a.self_size),
    }
    .then_with(|| a.name.cmp(&b.name)));
    let (verdict_snapshots, window_s) = basis(verdicts);
    JsHeapReport {
        reason: s.reason.clone(),
        taken_at_ms: s.taken_at_ms,
        node_count: s.node_count,
        self_size: s.self_size,
        retained_size_computed: s.retained_size_computed,
        verdict_snapshots,
        window_s,
        constructor_count: rows.len(),
        constructors: rows.into_iter().take(top).map(|(_, c)| c).collect(),
    }
}

/// What `verdicts` are based on: how many summaries, over how many seconds (`None` without
/// verdicts).
pub fn basis(verdicts: &HashMap<String, Verdict>) -> (Option<usize>, Option<f64>) {
    let n = verdicts.values().map(|v| v.snapshots).max();
    (n, n.map(|_| verdicts.values().map(|v| v.window_s).fold(0.0, f64::max)))
}

impl JsHeapReport {
    /// A text section for the leak report: the verdict of each listed constructor. Ends with
    /// a newline.
    pub fn text(&self) -> String {
        let mut out = match (self.verdict_snapshots, self.window_s) {
            (Some(n), Some(w)) => format!(
                "JavaScript heap verdicts from growth across {n} V8 heap summaries over {w:.1}s (self size per constructor):\n"
            ),
            _ => format!(
                "JavaScript heap (V8 heap summary, {}): verdicts need at least {} summaries\n",
                self.reason,
                growth::MIN_SNAPSHOTS
            ),
        };
        if self.constructors.is_empty() {
            out.push_str("  no objects\n");
        }
        for (i, c) in self.constructors.iter().enumerate() {
            out.push_str(&format!(
                "  #{:<3} {}  {} objects, {}  {}\n",
                i + 1,
                c.verdict.text(),
                c.count,
                crate::render::human_bytes(c.self_size),
                crate::render::escape::term(&c.name)
            ));
        }
        out
    }
}

/// A constructor that grew between two summaries, with its verdict as of the later one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgedGrowth {
    #[serde(flatten)]
    pub growth: ConstructorGrowth,
    #[serde(flatten)]
    pub verdict: VerdictFields,
}

/// Adds to each constructor of `grew` its verdict in `verdicts`.
pub fn judge_growth(grew: Vec<ConstructorGrowth>, verdicts: &HashMap<String, Verdict>) -> Vec<JudgedGrowth> {
    grew.into_iter()
        .map(|g| {
            let verdict = VerdictFields::of(verdicts.get(&g.name));
            JudgedGrowth { growth: g, verdict }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v8::summary::{grew, ConstructorStat};

    fn summary(t_ms: u64, leaky: u64, churn: u64) -> HeapSummary {
        let c = |name: &str, count: u64| ConstructorStat { name: name.into(), count, self_size: count * 32 };
        let mut constructors = vec![c("LeakyRecord", leaky), c("Big", 10_000)];
        if churn > 0 {
            constructors.push(c("ChurnRecord", churn));
        }
        HeapSummary { pid: 1, taken_at_ms: t_ms, reason: "api".into(), node_count: 1, self_size: 1, retained_size_computed: false, constructors }
    }

    /// Three summaries: the constructor that keeps growing is growing (confidence as for
    /// native stacks with 3 snapshots), one that comes and goes and one that stays are not;
    /// the report lists the growing one first and has no verdicts before 3 summaries.
    #[test]
    fn verdicts_across_summaries() {
        let mut s = SummarySeries::new(growth::DEFAULT_WINDOW);
        s.push(&summary(0, 1000, 0));
        s.push(&summary(3000, 5000, 480));
        let r = s.report(10).unwrap();
        assert_eq!((r.verdict_snapshots, r.window_s), (None, None));
        assert!(r.constructors.iter().all(|c| c.verdict == VerdictFields::default()));
        assert!(r.text().contains("need at least 3"), "{}", r.text());

        s.push(&summary(6100, 9000, 0));
        let v = &s.verdicts()["LeakyRecord"];
        assert_eq!(v.verdict, Trend::Growing, "{v:?}");
        assert!(v.confidence > 0.5 && v.confidence <= 0.75, "{v:?}");
        assert!((v.slope_bytes_per_s - 8000.0 * 32.0 / 6.1).abs() < 3000.0, "{v:?}");
        assert_ne!(s.verdicts()["ChurnRecord"].verdict, Trend::Growing);
        assert_eq!(s.verdicts()["Big"].verdict, Trend::Stable);

        let r = s.report(10).unwrap();
        assert_eq!((r.verdict_snapshots, r.constructor_count), (Some(3), 2));
        assert_eq!(r.constructors[0].name, "LeakyRecord");
        assert_eq!(r.constructors[0].verdict.verdict, Some(Trend::Growing));
        let text = r.text();
        assert!(text.contains("3 V8 heap summaries over 6.1s"), "{text}");
        assert!(text.lines().any(|l| l.contains("#1") && l.contains("growing") && l.contains("LeakyRecord")), "{text}");
        assert!(text.lines().any(|l| l.contains("#2") && l.contains("stable") && l.contains("Big")), "{text}");

        // JSON: the native keys; reads back equal (the CLI renders the agent's JSON).
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["constructors"][0]["verdict"], "growing");
        assert!(j["constructors"][0]["confidence"].as_f64().unwrap() > 0.5);
        assert_eq!(serde_json::from_value::<JsHeapReport>(j).unwrap(), r);
        assert_eq!(s.report(1).unwrap().constructors.len(), 1);
    }

    /// A diff's growth carries the verdicts of the later summary's series.
    #[test]
    fn judged_growth() {
        let mut s = SummarySeries::new(3);
        for (i, n) in [1000, 2000, 3000, 4000].into_iter().enumerate() {
            s.push(&summary(i as u64 * 1000, n, 0));
        }
        assert_eq!(s.len(), 3);
        let g = judge_growth(grew(&summary(0, 1000, 0), &summary(3000, 4000, 0)), s.verdicts());
        assert_eq!((g[0].growth.name.as_str(), g[0].verdict.verdict), ("LeakyRecord", Some(Trend::Growing)));
        let j = serde_json::to_value(&g[0]).unwrap();
        assert_eq!((j["count_delta"].as_i64(), j["verdict"].as_str()), (Some(3000), Some("growing")));
        assert!(judge_growth(g.into_iter().map(|g| g.growth).collect(), &HashMap::new())[0].verdict.confidence.is_none());
    }
}
