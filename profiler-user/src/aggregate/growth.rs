//! Leak verdicts from growth: across the last N snapshots of one target, each allocation
//! stack gets a growth slope of its live bytes (bytes/s), a verdict (`growing`, `stable`,
//! `shrinking`) and a confidence in [0, 1]. "Unfreed at the end" calls every cache a leak;
//! a verdict asks whether the stack *keeps* growing.
//!
//! The test, per stack, on the points (snapshot time, live bytes), a stack absent from a
//! snapshot counting as 0 (nothing of it was live: memscope sees every allocation since attach):
//! 1. least-squares slope `b` over the whole window, and the two-sided p-value of the slope's
//!    t-statistic (Student t, n-2 degrees of freedom): is there a trend at all?
//! 2. persistence `ρ = clamp(b_recent / b, 0, 1)`, `b_recent` the slope over the most recent
//!    `n/2 + 1` points: is the trend still going on? A cache that filled and then plateaued
//!    has a positive `b` but a flat recent part, so `ρ ≈ 0`;
//! 3. relevance: the fitted change over the window, `|b| × window`, must be at least 2% of the
//!    stack's largest value, so that a large steady heap jittering by a few bytes is not called
//!    a leak.
//!
//! `growing` (or `shrinking`, by the sign of `b`) needs p ≤ 0.05, ρ ≥ 0.5 and relevance; its
//! confidence is `(1 - p) × ρ × (1 - 2^-(n-1))`. Everything else is `stable`, with confidence
//! `(1 - 2^-(n-1)) × (1 - (1 - p) × ρ × min(1, relevance))`: high for a flat, noisy-flat or
//! plateaued series, low for one that almost passed. The last factor says that 3 snapshots
//! are weaker evidence than 10. At least [`MIN_SNAPSHOTS`] snapshots are needed; with fewer
//! there are no verdicts (`null` in JSON).
//!
//! Limits: what was allocated before attach is invisible, so a pre-existing cache whose
//! entries get replaced shows up as filling from 0 and then plateauing: `growing` until the
//! window has seen the plateau. A cache still filling during the whole window looks exactly
//! like a leak; only a longer window tells them apart.
//!
//! Stacks are matched across snapshots by [`stack_id`]: named frames by function name and
//! line (stable across library reloads, and apart for two call sites of one function when
//! there is debug info), unnamed frames by module and address (stable while the process
//! lives). Stacks with the same id are summed.
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Frame, HeapProfile};

/// Fewer snapshots than this give no verdicts.
pub const MIN_SNAPSHOTS: usize = 3;
/// Snapshots a [`Series`] keeps unless told otherwise.
pub const DEFAULT_WINDOW: usize = 10;
/// Largest p-value of the slope that counts as a trend.
pub const MAX_P_VALUE: f64 = 0.05;
/// Smallest persistence (recent slope / whole-window slope) of a trend.
pub const MIN_PERSISTENCE: f64 = 0.5;
/// Smallest fitted change over the window, as a fraction of the stack's largest value.
pub const MIN_RELATIVE_CHANGE: f64 = 0.02;

/// The verdict on one stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    Growing,
    Stable,
    Shrinking,
}

impl Trend {
    pub fn as_str(self) -> &'static str {
        match self {
            Trend::Growing => "growing",
            Trend::Stable => "stable",
            Trend::Shrinking => "shrinking",
        }
    }
}

/// What the series says about one stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: Trend,
    /// Least-squares slope of live bytes over the whole window.
    pub slope_bytes_per_s: f64,
    /// In [0, 1]: how sure the verdict is (see the module doc).
    pub confidence: f64,
    /// Snapshots the verdict is based on.
    pub snapshots: usize,
    /// Seconds between the first and the last of them.
    pub window_s: f64,
}

/// A verdict's fields in JSON, as leaks carry them ([`annotate_leaks_json`]) and the
/// JavaScript heap's constructors ([`crate::v8::growth`]): all `null` when there is no verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerdictFields {
    pub verdict: Option<Trend>,
    pub slope_bytes_per_s: Option<f64>,
    pub confidence: Option<f64>,
}

impl VerdictFields {
    pub fn of(v: Option<&Verdict>) -> VerdictFields {
        match v {
            Some(v) => VerdictFields {
                verdict: Some(v.verdict),
                slope_bytes_per_s: Some(round3(v.slope_bytes_per_s)),
                confidence: Some(v.confidence),
            },
            None => VerdictFields::default(),
        }
    }

    /// As the text reports show it ([`verdict_text`]).
    pub fn text(&self) -> String {
        verdict_text(match (self.verdict, self.slope_bytes_per_s, self.confidence) {
            (Some(t), Some(s), Some(c)) => Some((t, s, c)),
            _ => None,
        })
    }
}

/// The key matching a stack across snapshots (see the module doc): frames outermost first,
/// `;`-separated; `function:line` or `function` for named frames, `module@0xaddress` or
/// `0xaddress` for the others.
pub fn stack_id(frames: &[Frame]) -> String {
    if frames.is_empty() {
        return "[no stack]".to_string();
    }
    let token = |f: &Frame| match (&f.function, f.line, &f.module) {
        (Some(func), Some(line), _) => format!("{func}:{line}"),
        (Some(func), None, _) => func.to_string(),
        (None, _, Some(m)) => format!("{}@{:#x}", m.rsplit('/').next().unwrap_or(m), f.address),
        (None, _, None) => format!("{:#x}", f.address),
    };
    frames.iter().rev().map(token).collect::<Vec<_>>().join(";")
}

/// Verdicts for every stack with live bytes in any of `series` (one target, oldest first).
/// Empty with fewer than [`MIN_SNAPSHOTS`] snapshots.
pub fn verdicts(series: &[HeapProfile]) -> HashMap<String, Verdict> {
    let mut s = Series::new(series.len().max(1));
    for p in series {
        s.push(p);
    }
    s.verdicts()
}

/// The last `window` snapshots of one target, kept compact (per key, e.g. stack id: live
/// bytes), for verdicts as snapshots come in.
#[derive(Clone, Debug)]
pub struct Series {
    window: usize,
    snaps: VecDeque<(u64, HashMap<String, u64>)>,
}

impl Series {
    pub fn new(window: usize) -> Series {
        Series { window: window.max(1), snaps: VecDeque::new() }
    }

    /// Adds a snapshot (later than those already in), dropping the oldest beyond the window.
    pub fn push(&mut self, p: &HeapProfile) {
        let mut live: HashMap<String, u64> = HashMap::new();
        for s in &p.stacks {
            if s.live_bytes > 0 {
                *live.entry(stack_id(&s.frames)).or_default() += s.live_bytes;
            }
        }
        self.push_values(p.taken_at_ms, live);
    }

    /// Adds a point of every key at `taken_at_ms` (later than those already in): the series
    /// of anything measured in bytes per key, e.g. the self size of each constructor of a V8
    /// heap summary ([`crate::v8::growth`]). A key absent counts as 0 at that time.
    pub fn push_values(&mut self, taken_at_ms: u64, values: HashMap<String, u64>) {
        self.snaps.push_back((taken_at_ms, values));
        while self.snaps.len() > self.window {
            self.snaps.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.snaps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snaps.is_empty()
    }

    /// Verdicts for every stack seen live in the window; empty below [`MIN_SNAPSHOTS`].
    pub fn verdicts(&self) -> HashMap<String, Verdict> {
        let mut out = HashMap::new();
        if self.snaps.len() < MIN_SNAPSHOTS {
            return out;
        }
        let t0 = self.snaps[0].0;
        let times: Vec<f64> = self.snaps.iter().map(|(t, _)| t.saturating_sub(t0) as f64 / 1000.0).collect();
        let mut keys: Vec<&String> = self.snaps.iter().flat_map(|(_, m)| m.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let points: Vec<(f64, f64)> = self
                .snaps
                .iter()
                .zip(&times)
                .map(|((_, m), &t)| (t, m.get(key).copied().unwrap_or(0) as f64))
                .collect();
            if let Some(v) = verdict_of(&points) {
                out.insert(key.clone(), v);
            }
        }
        out
    }
}

struct Fit {
    slope: f64,
    /// Two-sided p-value of the slope (1 when undefined).
    p: f64,
}

/// Least-squares line through `points`; `None` when all times are equal.
fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    let sst: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let ssr: f64 = points.iter().map(|p| (p.1 - (my + slope * (p.0 - mt))).powi(2)).sum();
    let dof = n - 2.0;
    let p = if dof < 1.0 || sst == 0.0 {
        1.0
    } else if ssr <= 1e-12 * sst {
        if slope == 0.0 { 1.0 } else { 0.0 }
    } else {
        let se = (ssr / dof / sxx).sqrt();
        t_two_sided_p(slope / se, dof)
    };
    Some(Fit { slope, p })
}

/// The verdict for one stack's points (seconds, live bytes), oldest first; `None` with fewer
/// than [`MIN_SNAPSHOTS`] points.
pub fn verdict_of(points: &[(f64, f64)]) -> Option<Verdict> {
    let n = points.len();
    if n < MIN_SNAPSHOTS {
        return None;
    }
    let window_s = points[n - 1].0 - points[0].0;
    let size = 1.0 - 0.5f64.powi(n as i32 - 1);
    let Some(full) = fit(points) else {
        return Some(Verdict { verdict: Trend::Stable, slope_bytes_per_s: 0.0, confidence: 0.0, snapshots: n, window_s });
    };
    let b = full.slope;
    let evidence = 1.0 - full.p;
    let recent = fit(&points[n - (n / 2 + 1)..]);
    let persistence = match recent {
        Some(r) if b != 0.0 => (r.slope / b).clamp(0.0, 1.0),
        _ => 0.0,
    };
    let max_y = points.iter().map(|p| p.1.abs()).fold(0.0, f64::max);
    let relevance = if max_y > 0.0 { b.abs() * window_s / (MIN_RELATIVE_CHANGE * max_y) } else { 0.0 };
    let trend = full.p <= MAX_P_VALUE && persistence >= MIN_PERSISTENCE && relevance >= 1.0;
    let (verdict, confidence) = if trend {
        (if b > 0.0 { Trend::Growing } else { Trend::Shrinking }, evidence * persistence * size)
    } else {
        (Trend::Stable, size * (1.0 - evidence * persistence * relevance.min(1.0)))
    };
    Some(Verdict {
        verdict,
        slope_bytes_per_s: b,
        confidence: (confidence.clamp(0.0, 1.0) * 1000.0).round() / 1000.0,
        snapshots: n,
        window_s,
    })
}

/// Two-sided p-value of Student's t with `dof` degrees of freedom.
fn t_two_sided_p(t: f64, dof: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF as _, StudentsT};
    if t.is_nan() {
        return 1.0;
    }
    if t.is_infinite() {
        return 0.0;
    }
    match StudentsT::new(0.0, 1.0, dof) {
        Ok(dist) => (2.0 * dist.sf(t.abs())).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// The stack id of a leak of `leaks.json` (its `frames` array), as [`stack_id`] gives it for
/// the profile's stack.
fn json_stack_id(leak: &Value) -> Option<String> {
    let frames: Vec<Frame> = serde_json::from_value(leak.get("frames")?.clone()).ok()?;
    Some(stack_id(&frames))
}

/// Adds the verdict to every leak of a `leaks.json` value
/// ([`crate::render::json::leaks_json`]): `"verdict"` (`"growing"`, `"stable"`,
/// `"shrinking"`), `"slope_bytes_per_s"` and `"confidence"`, all `null` when the stack has no
/// verdict (fewer than 3 snapshots); and at the top, `"verdict_snapshots"`: how many
/// snapshots the verdicts are based on (`null` when none).
pub fn annotate_leaks_json(json: &mut Value, verdicts: &HashMap<String, Verdict>) {
    let snapshots = verdicts.values().map(|v| v.snapshots).max();
    if let Some(leaks) = json.get_mut("leaks").and_then(Value::as_array_mut) {
        for leak in leaks {
            let v = VerdictFields::of(json_stack_id(leak).and_then(|id| verdicts.get(&id)));
            if let (Some(obj), Value::Object(fields)) = (leak.as_object_mut(), json!(v)) {
                obj.extend(fields);
            }
        }
    }
    if let Some(obj) = json.as_object_mut() {
        obj.insert("verdict_snapshots".into(), json!(snapshots));
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A text section for the leak report: the verdict of each of the `top` largest leaks of
/// `p`, numbered as in [`crate::render::text::leak_report`]. Ends with a newline.
pub fn verdict_report(p: &HeapProfile, verdicts: &HashMap<String, Verdict>, snapshots: usize, top: usize) -> String {
    let mut out = String::new();
    if snapshots < MIN_SNAPSHOTS {
        out.push_str(&format!(
            "Leak verdicts need at least {MIN_SNAPSHOTS} snapshots; this recording has {snapshots}.\n"
        ));
        return out;
    }
    let window = verdicts.values().map(|v| v.window_s).fold(0.0, f64::max);
    out.push_str(&format!(
        "Leak verdicts from growth across {snapshots} snapshots over {window:.1}s (live bytes per stack):\n"
    ));
    let leaks = p.leaks();
    if leaks.is_empty() {
        out.push_str("  no leaks to judge\n");
    }
    for (i, s) in leaks.iter().take(top).enumerate() {
        let name = s.frames.first().map(|f| f.display_name()).unwrap_or_else(|| "[no stack]".into());
        let name = crate::render::escape::term(&name);
        let v = verdicts.get(&stack_id(&s.frames));
        out.push_str(&format!("  #{:<3} {}  {name}\n", i + 1, verdict_text(v.map(|v| (v.verdict, v.slope_bytes_per_s, v.confidence)))));
    }
    out
}

/// A verdict as the text reports show it, in fixed-width columns:
/// `growing       +1.5 KiB/s  confidence 0.93`, or `no verdict`.
pub fn verdict_text(v: Option<(Trend, f64, f64)>) -> String {
    match v {
        Some((trend, slope, confidence)) => format!("{:<9}  {:>14}  confidence {confidence:.2}", trend.as_str(), rate(slope)),
        None => "no verdict".to_string(),
    }
}

/// `+1.5 KiB/s`, `-200 B/s`.
fn rate(bytes_per_s: f64) -> String {
    let sign = if bytes_per_s < 0.0 { "-" } else { "+" };
    let v = bytes_per_s.abs();
    let (div, unit) = if v >= (1u64 << 30) as f64 {
        ((1u64 << 30) as f64, "GiB")
    } else if v >= (1u64 << 20) as f64 {
        ((1u64 << 20) as f64, "MiB")
    } else if v >= 1024.0 {
        (1024.0, "KiB")
    } else {
        return format!("{sign}{v:.0} B/s");
    };
    format!("{sign}{:.1} {unit}/s", v / div)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FrameInfo;
    use crate::aggregate::StackSample;

    fn series(ys: &[f64], dt: f64) -> Vec<(f64, f64)> {
        ys.iter().enumerate().map(|(i, &y)| (i as f64 * dt, y)).collect()
    }

    /// Deterministic noise in [-1, 1].
    fn noise(i: usize) -> f64 {
        let x = ((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        2.0 * x - 1.0
    }

    /// p-values of Student's t against table values.
    #[test]
    fn t_distribution_matches_tables() {
        assert!((t_two_sided_p(12.706, 1.0) - 0.05).abs() < 1e-3);
        assert!((t_two_sided_p(2.776, 4.0) - 0.05).abs() < 1e-3);
        assert!((t_two_sided_p(3.169, 10.0) - 0.01).abs() < 1e-3);
        assert!((t_two_sided_p(0.0, 5.0) - 1.0).abs() < 1e-9);
        assert_eq!(t_two_sided_p(f64::INFINITY, 3.0), 0.0);
    }

    /// A steady leak (with allocation-sized steps and some noise) is growing with high
    /// confidence and the right slope; so are 3 perfect points, with less confidence.
    #[test]
    fn growing_leak() {
        let pts: Vec<(f64, f64)> =
            (0..10).map(|i| (i as f64 * 0.5, 4096.0 * (i as f64 * 10.0).floor() + 2000.0 * noise(i))).collect();
        let v = verdict_of(&pts).unwrap();
        assert_eq!(v.verdict, Trend::Growing, "{v:?}");
        assert!((v.slope_bytes_per_s - 81920.0).abs() < 81920.0 * 0.05, "{v:?}");
        assert!(v.confidence > 0.9, "{v:?}");
        assert_eq!((v.snapshots, v.window_s), (10, 4.5));

        let v = verdict_of(&series(&[1000.0, 2000.0, 3000.0], 1.0)).unwrap();
        assert_eq!(v.verdict, Trend::Growing);
        assert!(v.confidence >= 0.7 && v.confidence < 0.9, "{v:?}");
    }

    /// A cache that filled during the first part of the window and then plateaued is stable,
    /// although its whole-window slope is positive; so is one that filled before the window.
    #[test]
    fn plateaued_cache_is_stable() {
        let ys = [0.0, 40e3, 80e3, 128e3, 128e3, 128e3, 128e3, 128e3, 128e3, 128e3];
        let v = verdict_of(&series(&ys, 0.25)).unwrap();
        assert_eq!(v.verdict, Trend::Stable, "{v:?}");
        assert!(v.slope_bytes_per_s > 0.0);
        assert!(v.confidence > 0.8, "{v:?}");
        // Plateau with replacement jitter (one entry more or less).
        let ys: Vec<f64> = (0..10).map(|i| if i < 3 { i as f64 * 50e3 } else { 128e3 + 4096.0 * noise(i).round() }).collect();
        assert_eq!(verdict_of(&series(&ys, 0.25)).unwrap().verdict, Trend::Stable);
        let flat = verdict_of(&series(&[5e6; 6], 1.0)).unwrap();
        assert_eq!((flat.verdict, flat.slope_bytes_per_s), (Trend::Stable, 0.0));
        assert!(flat.confidence > 0.9);
    }

    /// Noise around a level, even large, is stable; a tiny drift on a big value is stable.
    #[test]
    fn noisy_flat_is_stable() {
        let ys: Vec<f64> = (0..10).map(|i| 1e6 + 3e5 * noise(i)).collect();
        let v = verdict_of(&series(&ys, 1.0)).unwrap();
        assert_eq!(v.verdict, Trend::Stable, "{v:?}");
        let ys: Vec<f64> = (0..10).map(|i| 100e6 + 1000.0 * i as f64).collect();
        assert_eq!(verdict_of(&series(&ys, 1.0)).unwrap().verdict, Trend::Stable);
    }

    /// A draining stack is shrinking; fewer than 3 points give nothing; equal times are
    /// stable with no confidence.
    #[test]
    fn shrinking_and_edge_cases() {
        let v = verdict_of(&series(&[9e5, 8e5, 7.1e5, 6e5, 5e5, 4e5], 1.0)).unwrap();
        assert_eq!(v.verdict, Trend::Shrinking, "{v:?}");
        assert!(v.slope_bytes_per_s < -9e4);
        assert!(verdict_of(&series(&[1.0, 2.0], 1.0)).is_none());
        let same = verdict_of(&[(1.0, 1.0), (1.0, 5.0), (1.0, 9.0)]).unwrap();
        assert_eq!((same.verdict, same.confidence), (Trend::Stable, 0.0));
    }

    fn frame(name: &str, line: u32) -> Frame {
        FrameInfo { function: Some(name.into()), line: Some(line), address: 0x1000 + u64::from(line), ..FrameInfo::default() }.into()
    }

    fn profile(t_ms: u64, grow: u64, cache: u64) -> HeapProfile {
        let st = |frames: Vec<Frame>, b: u64| StackSample { frames, live_bytes: b, leak_bytes: b, leak_allocs: 1, ..StackSample::default() };
        HeapProfile {
            taken_at_ms: t_ms,
            stacks: vec![
                st(vec![frame("leak_grow", 10), frame("main", 50)], grow),
                st(vec![frame("cache_put", 20), frame("main", 51)], cache),
            ],
            ..HeapProfile::default()
        }
    }

    /// From profiles to annotated leaks.json: stacks matched by id, verdicts in each leak,
    /// nulls with too few snapshots, and the report section numbered like the leak report.
    #[test]
    fn profiles_to_annotated_json() {
        let ps: Vec<HeapProfile> =
            (0..6).map(|i| profile(1000 + i * 500, 4096 * (i + 1) * 8, if i < 2 { 64 * 1024 * (i + 1) } else { 128 * 1024 })).collect();
        let v = verdicts(&ps);
        let grow_id = "main:50;leak_grow:10";
        assert_eq!(v[grow_id].verdict, Trend::Growing, "{v:?}");
        assert_eq!(v["main:51;cache_put:20"].verdict, Trend::Stable, "{v:?}");

        let last = ps.last().unwrap();
        let mut j = crate::render::json::leaks_json(last, None);
        annotate_leaks_json(&mut j, &v);
        assert_eq!(j["verdict_snapshots"], 6);
        let by_fn = |f: &str| j["leaks"].as_array().unwrap().iter().find(|l| l["frames"][0]["function"] == f).unwrap().clone();
        assert_eq!(by_fn("leak_grow")["verdict"], "growing");
        assert!(by_fn("leak_grow")["slope_bytes_per_s"].as_f64().unwrap() > 60000.0);
        assert!(by_fn("leak_grow")["confidence"].as_f64().unwrap() > 0.5);
        assert_eq!(by_fn("cache_put")["verdict"], "stable");

        let report = verdict_report(last, &v, 6, 10);
        assert!(report.contains("6 snapshots"), "{report}");
        assert!(report.lines().any(|l| l.contains("#1") && l.contains("growing") && l.contains("leak_grow")), "{report}");
        assert!(report.lines().any(|l| l.contains("#2") && l.contains("stable") && l.contains("cache_put")), "{report}");

        let few = verdicts(&ps[..2]);
        assert!(few.is_empty());
        let mut j = crate::render::json::leaks_json(last, None);
        annotate_leaks_json(&mut j, &few);
        assert!(j["leaks"][0]["verdict"].is_null() && j["leaks"][0]["confidence"].is_null());
        assert!(j["verdict_snapshots"].is_null());
        assert!(verdict_report(last, &few, 2, 10).contains("at least 3"));
    }

    /// A series keeps only its window; stack ids use names and lines, or module and address.
    #[test]
    fn series_window_and_ids() {
        let mut s = Series::new(3);
        for i in 0..5 {
            s.push(&profile(i * 1000, (i + 1) * 10_000, 5));
        }
        assert_eq!(s.len(), 3);
        let v = s.verdicts();
        assert_eq!(v["main:50;leak_grow:10"].window_s, 2.0);
        let unnamed: Frame = FrameInfo { module: Some("/usr/lib/libfoo.so".into()), address: 0xabc, ..FrameInfo::default() }.into();
        assert_eq!(stack_id(&[unnamed, frame("main", 3)]), "main:3;libfoo.so@0xabc");
        assert_eq!(stack_id(&[]), "[no stack]");
        assert_eq!(rate(1536.0), "+1.5 KiB/s");
        assert_eq!(rate(-200.0), "-200 B/s");
    }
}
