//! Selectors: which processes the agent traces without being given a pid.
//!
//! A selector is terms joined with `,`, all of which must match: `comm=GLOB` (the process
//! name, `/proc/PID/comm`), `exe=GLOB` (the executable's path as the process sees it),
//! `cgroup=GLOB` (the cgroup v2 path), `container=GLOB` (the container's id or name),
//! `pod=NAMESPACE/NAME-GLOB`, `usdt=PROVIDER-GLOB` (the process carries the USDT
//! heap-sampling contract, see [`crate::bpf::contract`]; `usdt=*` for any provider). A term that is a snapshot trigger (`every=30s`, `growth=20%`,
//! `exit`, ...; see [`crate::trigger::TriggerSpec`]) is not a match term: it is attached to
//! every process the selector attaches. `forks=true` is not a match term either: it makes the
//! agent follow the processes that an attached process of this selector forks (new processes,
//! not threads; each one a worker workload of its own, see [`crate::workload::worker`]);
//! without it a fork that does not exec is not attached. `pause_budget=PCT%[/WINDOW]` is not a
//! match term: the pause budget of its triggers (see [`crate::pause`]). A glob has `*` (any characters, `/` included) and `?`
//! (one character); nothing else is special, so a value may not contain `,`.
use std::fmt;

use crate::trigger::TriggerSpec;

use super::identity::ProcessInfo;

/// Longest selector accepted (a `POST /v1/selectors` body, a `--select` value).
pub const MAX_SELECTOR_LEN: usize = 1024;

/// `*` and `?` globs over a whole string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_string())
    }

    pub fn matches(&self, s: &str) -> bool {
        glob_match(self.0.as_bytes(), s.as_bytes())
    }
}

/// Iterative wildcard matching with one backtrack point (linear in practice, no recursion on
/// hostile input).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// One match term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Comm(Glob),
    Exe(Glob),
    Cgroup(Glob),
    Container(Glob),
    Pod { namespace: Glob, name: Glob },
    /// `usdt=PROVIDER-GLOB`: the process carries the USDT heap-sampling contract of a matching
    /// provider (`ddheap`, `otel_memory`; `usdt=*` for any), read from the notes of the files
    /// it maps (checked after every other term: it reads files).
    Usdt(Glob),
}

impl Term {
    fn matches(&self, p: &ProcessInfo) -> bool {
        match self {
            Term::Comm(g) => g.matches(&p.comm),
            Term::Exe(g) => g.matches(&p.exe),
            Term::Cgroup(g) => g.matches(&p.cgroup),
            Term::Container(g) => p.container.as_ref().is_some_and(|c| {
                c.id.as_deref().is_some_and(|id| g.matches(id)) || c.name.as_deref().is_some_and(|n| g.matches(n))
            }),
            Term::Pod { namespace, name } => p.container.as_ref().is_some_and(|c| {
                matches!((&c.namespace, &c.pod), (Some(ns), Some(pod)) if namespace.matches(ns) && name.matches(pod))
            }),
            Term::Usdt(g) => crate::bpf::contract::find(p.pid).ok().flatten().is_some_and(|c| g.matches(&c.provider)),
        }
    }
}

/// A parsed selector.
#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    /// The expression as given (trimmed).
    pub expr: String,
    pub terms: Vec<Term>,
    /// Snapshot triggers for every process it attaches.
    pub triggers: Vec<TriggerSpec>,
    /// `forks=true`: the processes its attached processes fork are attached too.
    pub follow_forks: bool,
    /// `pause_budget=PCT%[/WINDOW]`: the pause budget of its triggers (`None`: the agent's).
    pub pause_budget: Option<crate::pause::PauseBudget>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector: {0}")]
pub struct SelectorError(pub String);

impl Selector {
    pub fn parse(expr: &str) -> Result<Selector, SelectorError> {
        let expr = expr.trim();
        let bad = |m: String| SelectorError(m);
        if expr.len() > MAX_SELECTOR_LEN {
            return Err(bad(format!("longer than {MAX_SELECTOR_LEN} characters")));
        }
        if expr.chars().any(|c| c.is_control()) {
            return Err(bad("control characters are not allowed".into()));
        }
        let mut terms = Vec::new();
        let mut triggers: Vec<TriggerSpec> = Vec::new();
        let mut follow_forks: Option<bool> = None;
        let mut pause_budget = None;
        for raw in expr.split(',') {
            let raw = raw.trim();
            if raw.is_empty() {
                return Err(bad(format!("empty term in {expr:?} (terms are joined with ',')")));
            }
            let (key, value) = raw.split_once('=').unwrap_or((raw, ""));
            let glob = || -> Result<Glob, SelectorError> {
                if value.is_empty() {
                    Err(bad(format!("{key}= needs a value")))
                } else {
                    Ok(Glob::new(value))
                }
            };
            let term = match key.trim() {
                "comm" => Term::Comm(glob()?),
                "exe" => Term::Exe(glob()?),
                "cgroup" => Term::Cgroup(glob()?),
                "container" => Term::Container(glob()?),
                "usdt" => Term::Usdt(glob()?),
                "forks" => {
                    let follow = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(format!("forks= takes true or false, not {value:?}"))),
                    };
                    if follow_forks.replace(follow).is_some() {
                        return Err(bad("forks= is given twice".into()));
                    }
                    continue;
                }
                "pause_budget" => {
                    let b = crate::pause::PauseBudget::parse(value).map_err(bad)?;
                    if pause_budget.replace(b).is_some() {
                        return Err(bad("pause_budget= is given twice".into()));
                    }
                    continue;
                }
                "pod" => {
                    let (ns, name) = value
                        .split_once('/')
                        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                        .ok_or_else(|| bad(format!("pod= takes NAMESPACE/NAME (globs), not {value:?}")))?;
                    Term::Pod { namespace: Glob::new(ns), name: Glob::new(name) }
                }
                _ => {
                    let spec: TriggerSpec = raw.parse().map_err(|e: String| {
                        bad(format!("{e} (match terms: comm=, exe=, cgroup=, container=, pod=NS/NAME, usdt=PROVIDER; also forks=true)"))
                    })?;
                    if triggers.contains(&spec) {
                        return Err(bad(format!("trigger {} is given twice", spec.describe())));
                    }
                    triggers.push(spec);
                    continue;
                }
            };
            terms.push(term);
        }
        if terms.is_empty() {
            return Err(bad(format!("{expr:?} has no match term (comm=, exe=, cgroup=, container=, pod=, usdt=)")));
        }
        // The term that reads files goes last: `all` stops at the first term that fails.
        terms.sort_by_key(|t| matches!(t, Term::Usdt(_)));
        Ok(Selector { expr: expr.to_string(), terms, triggers, follow_forks: follow_forks.unwrap_or(false), pause_budget })
    }

    pub fn matches(&self, p: &ProcessInfo) -> bool {
        self.terms.iter().all(|t| t.matches(p))
    }

    /// A stable id for this selector: the same expression gets the same id on every node and
    /// after every restart.
    pub fn id(&self) -> String {
        format!("s{:012x}", fnv1a(self.expr.as_bytes()) & 0xffff_ffff_ffff)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

/// FNV-1a, 64 bits: stable ids from identity strings (not a security boundary: ids are checked
/// against the registry, never used as paths).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    /// `usdt=` is a match term (any glob over the provider), checked after the others.
    #[test]
    fn usdt_term_parses_and_goes_last() {
        let s = Selector::parse("usdt=ddheap,comm=api").unwrap();
        assert_eq!(s.terms, vec![Term::Comm(Glob::new("api")), Term::Usdt(Glob::new("ddheap"))]);
        assert!(Selector::parse("usdt=").is_err());
    }

    use super::*;
    use crate::discover::identity::ContainerIdentity;

    fn proc(comm: &str, exe: &str, cgroup: &str, c: Option<ContainerIdentity>) -> ProcessInfo {
        ProcessInfo { pid: 1, comm: comm.into(), exe: exe.into(), cgroup: cgroup.into(), container: c }
    }

    /// Globs: `*` spans `/`, `?` is one character, everything else is literal.
    #[test]
    fn globs() {
        let g = |p: &str, s: &str| Glob::new(p).matches(s);
        assert!(g("leaky*", "leaky_fixture"));
        assert!(g("*", ""));
        assert!(g("/kubepods.slice/*", "/kubepods.slice/a/b.scope"));
        assert!(g("a?c", "abc") && !g("a?c", "ac"));
        assert!(g("*a*b*c*", "xxaxxbxxcxx") && !g("*a*b*c*", "xxaxxcxxbxx"));
        assert!(!g("leaky", "leaky2") && !g("[ab]", "a"));
        // Pathological patterns stay fast.
        let s = "a".repeat(5000);
        assert!(!g(&format!("{}b", "*a".repeat(50)), &s));
    }

    /// Terms must all match; triggers ride along; ids are stable.
    #[test]
    fn parse_and_match() {
        let s = Selector::parse("comm=leaky*, exe=*/bin/*,every=30s,exit").unwrap();
        assert_eq!(s.terms.len(), 2);
        assert_eq!(s.triggers.len(), 2);
        assert!(s.matches(&proc("leaky1", "/usr/bin/leaky1", "/", None)));
        assert!(!s.matches(&proc("leaky1", "/opt/leaky1", "/", None)));
        assert!(!s.matches(&proc("other", "/usr/bin/leaky1", "/", None)));
        assert_eq!(s.id(), Selector::parse("comm=leaky*, exe=*/bin/*,every=30s,exit").unwrap().id());
        assert_ne!(s.id(), Selector::parse("comm=leaky*").unwrap().id());

        let c = ContainerIdentity {
            id: Some("abc123".into()),
            name: Some("app".into()),
            pod: Some("web-7d9f".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        };
        let p = proc("srv", "/srv", "/kubepods.slice/x", Some(c));
        assert!(Selector::parse("pod=shop/web-*").unwrap().matches(&p));
        assert!(!Selector::parse("pod=other/web-*").unwrap().matches(&p));
        assert!(Selector::parse("container=app").unwrap().matches(&p));
        assert!(Selector::parse("container=abc*").unwrap().matches(&p));
        assert!(Selector::parse("cgroup=/kubepods.slice/*,container=app").unwrap().matches(&p));
        assert!(!Selector::parse("pod=shop/web-*").unwrap().matches(&proc("srv", "/srv", "/", None)));
    }

    /// Bad selectors are refused with a message naming the problem.
    #[test]
    fn bad_selectors() {
        let e = |s: &str| Selector::parse(s).unwrap_err().to_string();
        assert!(e("").contains("empty term"));
        assert!(e("every=30s").contains("no match term"));
        assert!(e("comm=").contains("needs a value"));
        assert!(e("pod=web").contains("NAMESPACE/NAME"));
        assert!(e("color=red").contains("match terms"));
        assert!(e("comm=a,,exe=b").contains("empty term"));
        assert!(e(&"comm=a".repeat(400)).contains("longer"));
        assert!(e("comm=a\u{7}b").contains("control"));
        assert!(e("comm=a,exit,exit").contains("twice"));
        assert!(e("comm=a,forks=yes").contains("true or false"));
        assert!(e("comm=a,forks=true,forks=false").contains("twice"));
        assert!(e("forks=true").contains("no match term"));
    }

    /// `forks=true` follows forks; it is not a match term (nor a trigger), and off by default.
    #[test]
    fn forks_term() {
        let s = Selector::parse("comm=nginx,forks=true,every=30s").unwrap();
        assert!(s.follow_forks);
        assert_eq!((s.terms.len(), s.triggers.len()), (1, 1));
        assert!(s.matches(&proc("nginx", "/usr/sbin/nginx", "/", None)));
        assert!(!Selector::parse("comm=nginx").unwrap().follow_forks);
        assert!(!Selector::parse("comm=nginx,forks=false").unwrap().follow_forks);
    }

    /// `pause_budget=` sets its triggers' pause budget; it is not a match term; bad values and
    /// repeats are refused.
    #[test]
    fn pause_budget_term() {
        let s = Selector::parse("comm=node,gc,pause_budget=2%/30s").unwrap();
        assert_eq!((s.terms.len(), s.triggers.len()), (1, 1));
        assert_eq!(s.pause_budget, Some(crate::pause::PauseBudget { percent: 2.0, window: std::time::Duration::from_secs(30) }));
        assert_eq!(Selector::parse("comm=node").unwrap().pause_budget, None);
        assert!(Selector::parse("comm=node,pause_budget=lots").unwrap_err().to_string().contains("pause budget"));
        assert!(Selector::parse("comm=node,pause_budget=1%,pause_budget=2%").unwrap_err().to_string().contains("twice"));
    }
}
