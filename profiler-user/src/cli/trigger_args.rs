//! The trigger flags shared by `memscope record` and `memscope agent`: `--every`,
//! `--on-growth`, `--on-rss`, `--on-return`, `--on-usdt`, `--on-exit`, `--on-gc` and
//! `--min-spacing` (see [`crate::trigger`] and docs/triggers.md). One clap definition, so both
//! commands accept exactly the same syntax.
use std::time::Duration;

use clap::Args;

use crate::units::parse_duration;
use crate::trigger::{spec, GrowthThreshold, MemorySource, TriggerSpec, DEFAULT_MIN_SPACING};

#[derive(Args, Debug, Clone, PartialEq)]
pub struct TriggerArgs {
    /// Take a snapshot every this long (e.g. 30s).
    #[arg(long, value_parser = spec::parse_every, help_heading = "Triggers")]
    pub every: Option<Duration>,
    /// Take a snapshot when the live heap grew by this much since the last snapshot: a size
    /// (64MiB) or a percentage (20%).
    #[arg(long, value_parser = spec::parse_growth, help_heading = "Triggers")]
    pub on_growth: Option<GrowthThreshold>,
    /// Take a snapshot when the process's RSS crosses SIZE (e.g. 1GiB), or with `cgroup:SIZE`
    /// when its cgroup's memory.current does. Repeatable.
    #[arg(long, value_name = "[cgroup:]SIZE", value_parser = spec::parse_rss, help_heading = "Triggers")]
    pub on_rss: Vec<(u64, MemorySource)>,
    /// Take a snapshot each time this function returns: mangled or demangled name, in the
    /// executable or any mapped library. Repeatable.
    #[arg(long, value_name = "SYMBOL", value_parser = spec::parse_symbol, help_heading = "Triggers")]
    pub on_return: Vec<String>,
    /// Take a snapshot each time the target reaches this USDT probe (.note.stapsdt).
    /// Repeatable.
    #[arg(long, value_name = "PROVIDER:NAME", value_parser = spec::parse_usdt, help_heading = "Triggers")]
    pub on_usdt: Vec<(String, String)>,
    /// Take a snapshot when the target exits (record: the final snapshot and report, exit 0).
    #[arg(long, help_heading = "Triggers")]
    pub on_exit: bool,
    /// Node.js: take a snapshot after each V8 garbage collection (a return trigger on
    /// v8::internal::Heap::CollectGarbage, reason `gc`).
    #[arg(long, help_heading = "Triggers")]
    pub on_gc: bool,
    /// Node.js: a V8 heap summary (with the snapshot) when V8's used heap crosses this
    /// percentage of its limit (e.g. 80%), once per crossing: the outside equivalent of
    /// --heapsnapshot-near-heap-limit.
    #[arg(long, value_name = "PCT", value_parser = spec::parse_heap_limit, help_heading = "Triggers")]
    pub on_heap_limit: Option<f64>,
    /// Each trigger fires at most once per this long; its firings in between are counted as
    /// suppressed.
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Triggers")]
    pub min_spacing: Duration,
}

impl Default for TriggerArgs {
    fn default() -> Self {
        TriggerArgs {
            every: None,
            on_growth: None,
            on_rss: Vec::new(),
            on_return: Vec::new(),
            on_usdt: Vec::new(),
            on_exit: false,
            on_gc: false,
            on_heap_limit: None,
            min_spacing: DEFAULT_MIN_SPACING,
        }
    }
}

impl TriggerArgs {
    /// The triggers the flags ask for, in a fixed order (interval, growth, rss, return, usdt,
    /// gc, exit). A trigger given twice is an error.
    pub fn specs(&self) -> anyhow::Result<Vec<TriggerSpec>> {
        let mut specs: Vec<TriggerSpec> = Vec::new();
        let mut add = |s: TriggerSpec, flag: String| -> anyhow::Result<()> {
            anyhow::ensure!(!specs.contains(&s), "{flag} is given twice");
            specs.push(s);
            Ok(())
        };
        if let Some(d) = self.every {
            add(TriggerSpec::Interval(d), "--every".into())?;
        }
        if let Some(g) = self.on_growth {
            add(TriggerSpec::Growth(g), "--on-growth".into())?;
        }
        for (threshold, source) in &self.on_rss {
            add(TriggerSpec::Rss { threshold: *threshold, source: *source }, format!("--on-rss {threshold}"))?;
        }
        for sym in &self.on_return {
            add(TriggerSpec::Return(sym.clone()), format!("--on-return {sym}"))?;
        }
        for (provider, name) in &self.on_usdt {
            add(TriggerSpec::Usdt { provider: provider.clone(), name: name.clone() }, format!("--on-usdt {provider}:{name}"))?;
        }
        if self.on_gc {
            add(TriggerSpec::Gc, "--on-gc".into())?;
        }
        if let Some(p) = self.on_heap_limit {
            add(TriggerSpec::HeapLimit(p), format!("--on-heap-limit {p}%"))?;
        }
        if self.on_exit {
            add(TriggerSpec::Exit, "--on-exit".into())?;
        }
        Ok(specs)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        t: TriggerArgs,
    }

    fn parse(args: &[&str]) -> Result<TriggerArgs, clap::Error> {
        Cmd::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.t)
    }

    /// Every flag becomes its spec, in the fixed order; the defaults are no triggers and 5 s
    /// of spacing; repeated identical triggers and bad values are refused.
    #[test]
    fn flags_to_specs() {
        let t = parse(&[]).unwrap();
        assert_eq!(t, TriggerArgs::default());
        assert!(t.specs().unwrap().is_empty());
        assert_eq!(t.min_spacing, DEFAULT_MIN_SPACING);

        let t = parse(&[
            "--on-exit", "--on-gc", "--every", "300ms", "--on-growth", "20%", "--on-rss", "1GiB", "--on-rss",
            "cgroup:2GiB", "--on-return", "gc_cycle", "--on-usdt", "app:gc_done", "--min-spacing", "100ms",
        ])
        .unwrap();
        let described: Vec<String> = t.specs().unwrap().iter().map(TriggerSpec::describe).collect();
        assert_eq!(
            described,
            ["every=300ms", "growth=20%", "rss=1073741824", "rss=cgroup:2147483648", "return=gc_cycle", "usdt=app:gc_done", "gc", "exit"]
        );
        assert_eq!(t.min_spacing, Duration::from_millis(100));

        let twice = parse(&["--on-return", "f", "--on-return", "f"]).unwrap();
        assert!(twice.specs().unwrap_err().to_string().contains("--on-return f is given twice"));
        assert!(parse(&["--every", "10ms"]).is_err());
        assert!(parse(&["--on-usdt", "nocolon"]).is_err());
    }
}
