//! What a trigger is: parsed from command-line flags (`--every 30s`, `--on-growth 64MiB`,
//! `--on-rss cgroup:1GiB`, `--on-return SYMBOL`, `--on-usdt provider:name`, `--on-exit`,
//! `--on-gc`, `--on-heap-limit 80%`) or from one `kind=value` string (`every=30s`, `growth=20%`,
//! `rss=1GiB`, `return=gc_cycle`, `usdt=myapp:gc_done`, `exit`, `gc`, `heap_limit=80%`), the
//! form an API or a config file can carry.
//!
//! [`TriggerSpec`]'s `Display` is the *reason* stored with each snapshot it causes:
//! `interval`, `growth`, `rss`, `return:SYMBOL`, `usdt:PROVIDER:NAME`, `exit`, `gc`,
//! `heap_limit`.
use std::{fmt, str::FromStr, time::Duration};

use crate::units::{parse_duration, parse_size};

/// The shortest interval accepted by `--every`: below it the poll period (20 ms) dominates.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// The function whose returns [`TriggerSpec::Gc`] watches: V8's garbage collector entry
/// point (every scavenge and mark-compact of a Node.js process, `global.gc()` included), by
/// its demangled name without parameters.
pub const V8_GC_FUNCTION: &str = "v8::internal::Heap::CollectGarbage";

/// One snapshot trigger of a target.
#[derive(Clone, Debug, PartialEq)]
pub enum TriggerSpec {
    /// Every this long, counted from when triggers start.
    Interval(Duration),
    /// When the live heap grew by this much since the last snapshot.
    Growth(GrowthThreshold),
    /// When a memory counter of the target crosses `threshold` bytes upwards.
    Rss { threshold: u64, source: MemorySource },
    /// When this function of the target (executable or any mapped library) returns; mangled
    /// or demangled name, with or without the parameter list.
    Return(String),
    /// When the target reaches this USDT probe (`.note.stapsdt`).
    Usdt { provider: String, name: String },
    /// When the target exits: a final snapshot.
    Exit,
    /// At the end of each garbage collection of a Node.js (V8) process: a return trigger on
    /// [`V8_GC_FUNCTION`], with its own reason `gc` (`--on-gc`).
    Gc,
    /// When V8's used heap (of a Node.js process's main thread) crosses this percentage of its
    /// limit (`heap_size_limit`): the outside equivalent of `--heapsnapshot-near-heap-limit`.
    /// Fires once per crossing; re-arms once the used heap is below 90% of the threshold. See
    /// [`crate::v8::heap_limit`] for how it is watched without an inspector session per poll.
    HeapLimit(f64),
}

/// The reason of [`TriggerSpec::HeapLimit`].
pub const HEAP_LIMIT_REASON: &str = "heap_limit";

/// How much growth of the live heap fires [`TriggerSpec::Growth`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GrowthThreshold {
    Bytes(u64),
    /// Percent of the live heap at the last snapshot (and never less than
    /// [`super::engine::GROWTH_PERCENT_FLOOR`] bytes, so a nearly empty heap does not fire on
    /// noise).
    Percent(f64),
}

/// Which memory counter [`TriggerSpec::Rss`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// `VmRSS` of `/proc/PID/status`.
    ProcessRss,
    /// `memory.current` of the target's cgroup (v2): what its container's limit is checked
    /// against.
    CgroupMemory,
}

impl fmt::Display for TriggerSpec {
    /// The reason name stored with each snapshot this trigger takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerSpec::Interval(_) => f.write_str("interval"),
            TriggerSpec::Growth(_) => f.write_str("growth"),
            TriggerSpec::Rss { .. } => f.write_str("rss"),
            TriggerSpec::Return(sym) => write!(f, "return:{sym}"),
            TriggerSpec::Usdt { provider, name } => write!(f, "usdt:{provider}:{name}"),
            TriggerSpec::Exit => f.write_str("exit"),
            TriggerSpec::Gc => f.write_str("gc"),
            TriggerSpec::HeapLimit(_) => f.write_str(HEAP_LIMIT_REASON),
        }
    }
}

impl TriggerSpec {
    /// The reason name (same as `Display`).
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// The `kind=value` form [`FromStr`] reads back, e.g. `every=30s`, `growth=20%`,
    /// `rss=cgroup:1073741824`.
    pub fn describe(&self) -> String {
        match self {
            TriggerSpec::Interval(d) => format!("every={}", fmt_duration(*d)),
            TriggerSpec::Growth(GrowthThreshold::Bytes(b)) => format!("growth={b}"),
            TriggerSpec::Growth(GrowthThreshold::Percent(p)) => format!("growth={p}%"),
            TriggerSpec::Rss { threshold, source: MemorySource::ProcessRss } => format!("rss={threshold}"),
            TriggerSpec::Rss { threshold, source: MemorySource::CgroupMemory } => {
                format!("rss=cgroup:{threshold}")
            }
            TriggerSpec::Return(sym) => format!("return={sym}"),
            TriggerSpec::Usdt { provider, name } => format!("usdt={provider}:{name}"),
            TriggerSpec::Exit => "exit".to_string(),
            TriggerSpec::Gc => "gc".to_string(),
            TriggerSpec::HeapLimit(p) => format!("heap_limit={p}%"),
        }
    }

    /// Whether the engine needs a kernel probe for it (return, USDT and gc triggers).
    pub fn needs_probe(&self) -> bool {
        matches!(self, TriggerSpec::Return(_) | TriggerSpec::Usdt { .. } | TriggerSpec::Gc)
    }
}

fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `--every`: a duration of at least [`MIN_INTERVAL`].
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("interval {s:?} is too short: at least {}ms", MIN_INTERVAL.as_millis()));
    }
    Ok(d)
}

/// `--on-growth`: a size (`64MiB`) or a percentage (`20%`), above zero.
pub fn parse_growth(s: &str) -> Result<GrowthThreshold, String> {
    let s = s.trim();
    if let Some(pct) = s.strip_suffix('%') {
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("invalid growth {s:?}: expected a size (64MiB) or a percentage (20%)"))?;
        if !p.is_finite() || p <= 0.0 || p > 1e6 {
            return Err(format!("invalid growth {s:?}: the percentage must be above 0"));
        }
        return Ok(GrowthThreshold::Percent(p));
    }
    let b = parse_size(s).map_err(|e| format!("{e}; or a percentage such as 20%"))?;
    if b == 0 {
        return Err(format!("invalid growth {s:?}: must be above 0"));
    }
    Ok(GrowthThreshold::Bytes(b))
}

/// `--on-heap-limit`: a percentage of V8's heap limit, above 0 and at most 100 (`80%` or `80`).
pub fn parse_heap_limit(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let p: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("invalid heap limit percentage {s:?}: expected a percentage such as 80%"))?;
    if !p.is_finite() || p <= 0.0 || p > 100.0 {
        return Err(format!("invalid heap limit percentage {s:?}: above 0 and at most 100"));
    }
    Ok(p)
}

/// `--on-rss`: `SIZE` for the process's RSS, `cgroup:SIZE` for its cgroup's `memory.current`.
pub fn parse_rss(s: &str) -> Result<(u64, MemorySource), String> {
    let s = s.trim();
    let (source, size) = match s.strip_prefix("cgroup:") {
        Some(rest) => (MemorySource::CgroupMemory, rest),
        None => (MemorySource::ProcessRss, s.strip_prefix("rss:").unwrap_or(s)),
    };
    let b = parse_size(size).map_err(|e| format!("{e}; `cgroup:SIZE` watches the cgroup's memory.current"))?;
    if b == 0 {
        return Err(format!("invalid threshold {s:?}: must be above 0"));
    }
    Ok((b, source))
}

/// `--on-return`: a non-empty symbol, mangled or demangled.
pub fn parse_symbol(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty symbol name".into());
    }
    if t.chars().any(char::is_control) {
        return Err(format!("invalid symbol name {s:?}"));
    }
    Ok(t.to_string())
}

/// `--on-usdt`: `provider:name`, both non-empty identifiers (letters, digits, `_`).
pub fn parse_usdt(s: &str) -> Result<(String, String), String> {
    let (provider, name) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("invalid USDT probe {s:?}: expected provider:name"))?;
    let ident = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ident(provider) || !ident(name) {
        return Err(format!("invalid USDT probe {s:?}: provider and name are identifiers, as in provider:name"));
    }
    Ok((provider.to_string(), name.to_string()))
}

impl FromStr for TriggerSpec {
    type Err = String;

    /// `every=DURATION`, `growth=SIZE|PCT%`, `rss=[cgroup:]SIZE`, `return=SYMBOL`,
    /// `usdt=PROVIDER:NAME`, `exit`, `gc`, `heap_limit=PCT%`.
    fn from_str(s: &str) -> Result<TriggerSpec, String> {
        let s = s.trim();
        match s {
            "exit" => return Ok(TriggerSpec::Exit),
            "gc" => return Ok(TriggerSpec::Gc),
            _ => {}
        }
        let (kind, value) = s.split_once('=').ok_or_else(|| {
            format!("invalid trigger {s:?}: expected kind=value (every, growth, rss, return, usdt, heap_limit), exit or gc")
        })?;
        match kind.trim() {
            "every" | "interval" => parse_every(value).map(TriggerSpec::Interval),
            "growth" => parse_growth(value).map(TriggerSpec::Growth),
            "rss" => parse_rss(value).map(|(threshold, source)| TriggerSpec::Rss { threshold, source }),
            "return" => parse_symbol(value).map(TriggerSpec::Return),
            "usdt" => parse_usdt(value).map(|(provider, name)| TriggerSpec::Usdt { provider, name }),
            "heap_limit" => parse_heap_limit(value).map(TriggerSpec::HeapLimit),
            other => Err(format!("unknown trigger kind {other:?}: use every, growth, rss, return, usdt, heap_limit, exit or gc")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag form parses, and bad values give a message naming the value.
    #[test]
    fn parses_flag_values() {
        assert_eq!(parse_every("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_every("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_every("10ms").unwrap_err().contains("too short"));
        assert!(parse_every("soon").is_err());

        assert_eq!(parse_growth("64MiB").unwrap(), GrowthThreshold::Bytes(64 << 20));
        assert_eq!(parse_growth("20%").unwrap(), GrowthThreshold::Percent(20.0));
        assert_eq!(parse_growth(" 2.5 %").unwrap(), GrowthThreshold::Percent(2.5));
        assert!(parse_growth("0").is_err());
        assert!(parse_growth("-5%").is_err());
        assert!(parse_growth("lots").unwrap_err().contains("percentage"));

        assert_eq!(parse_rss("1GiB").unwrap(), (1 << 30, MemorySource::ProcessRss));
        assert_eq!(parse_rss("cgroup:512MiB").unwrap(), (512 << 20, MemorySource::CgroupMemory));
        assert!(parse_rss("cgroup:").is_err());
        assert!(parse_rss("0").is_err());

        assert_eq!(parse_symbol(" gc_cycle ").unwrap(), "gc_cycle");
        assert_eq!(parse_symbol("ns::Cache::gc(int)").unwrap(), "ns::Cache::gc(int)");
        assert!(parse_symbol("  ").is_err());

        assert_eq!(parse_usdt("myapp:gc_done").unwrap(), ("myapp".into(), "gc_done".into()));
        assert!(parse_usdt("myapp").is_err());
        assert!(parse_usdt(":x").is_err());
        assert!(parse_usdt("a:b c").is_err());
    }

    /// Reasons are the documented names; `describe` reads back through `FromStr`.
    #[test]
    fn reasons_and_round_trip() {
        let specs = [
            TriggerSpec::Interval(Duration::from_millis(1500)),
            TriggerSpec::Interval(Duration::from_secs(30)),
            TriggerSpec::Growth(GrowthThreshold::Bytes(1 << 20)),
            TriggerSpec::Growth(GrowthThreshold::Percent(20.0)),
            TriggerSpec::Rss { threshold: 1 << 30, source: MemorySource::ProcessRss },
            TriggerSpec::Rss { threshold: 1 << 30, source: MemorySource::CgroupMemory },
            TriggerSpec::Return("gc_cycle".into()),
            TriggerSpec::Usdt { provider: "p".into(), name: "n".into() },
            TriggerSpec::Exit,
            TriggerSpec::Gc,
            TriggerSpec::HeapLimit(80.0),
            TriggerSpec::HeapLimit(62.5),
        ];
        let reasons: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            reasons,
            ["interval", "interval", "growth", "growth", "rss", "rss", "return:gc_cycle", "usdt:p:n", "exit", "gc", "heap_limit", "heap_limit"]
        );
        for s in &specs {
            assert_eq!(&s.describe().parse::<TriggerSpec>().unwrap(), s, "{}", s.describe());
        }
        assert!("sometimes=1".parse::<TriggerSpec>().unwrap_err().contains("unknown trigger kind"));
        assert!("every".parse::<TriggerSpec>().is_err());
        assert!(TriggerSpec::Return("f".into()).needs_probe() && !TriggerSpec::Exit.needs_probe());
        assert!(TriggerSpec::Gc.needs_probe());
        assert!("gc=1".parse::<TriggerSpec>().is_err());
        assert_eq!("heap_limit=75".parse::<TriggerSpec>().unwrap(), TriggerSpec::HeapLimit(75.0));
        assert!(!TriggerSpec::HeapLimit(75.0).needs_probe());
        for bad in ["heap_limit=0", "heap_limit=101%", "heap_limit=lots", "heap_limit=-5%"] {
            assert!(bad.parse::<TriggerSpec>().is_err(), "{bad}");
        }
    }
}
