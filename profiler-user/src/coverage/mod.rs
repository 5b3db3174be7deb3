//! What share of a target's memory memscope accounts for, and when it is low, why, in words.
//!
//! Owns the coverage statement every output carries (the text report, `leaks.json`,
//! `/v1/targets`, `/metrics`, `memscope targets`): the process's anonymous memory (`RssAnon`
//! of `/proc/PID/status`), the live bytes memscope traced by stack, what was there before
//! attach (seen only as it is freed), what is left unaccounted, and [`Reason`]s for a low
//! share. A snapshot adds a breakdown of the whole RSS by kind ([`smaps`]). It exists so that
//! a process memscope cannot see is never reported as "No leaks" without saying so.
//!
//! Reasons come from two places: what the target's files say at attach ([`Hints`]: a Rust
//! `#[global_allocator]` no family recognizes, Python, Go), and the figures (memory there
//! before attach, no allocation seen, unaccounted memory sitting in anonymous mappings or in
//! the brk heap). Each reason has a stable machine name ([`Reason::name`]) and a sentence
//! ([`Reason::text`]); new sources of blindness add a variant.
//!
//! Limits: `RssAnon` counts resident pages only (allocated but untouched memory is not in it,
//! so traced bytes may exceed it: the share is capped at 100%) and includes the private
//! copies of written file pages (`.data`, `.bss`) and thread stacks, which are not heap; the
//! breakdown lists those apart. memscope cannot tell an arena of malloc from memory mapped
//! directly with `mmap` by the mapping alone: the reason says "anonymous mappings not seen
//! allocated", naming both.
pub mod smaps;

use serde::{Deserialize, Serialize};

pub use smaps::Breakdown;

/// Below this share of `RssAnon` traced by stack, coverage is low: the outputs say why.
pub const LOW_RATIO: f64 = 0.5;

/// Why memscope accounts for little of a process's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The executable links its own allocator (a Rust `#[global_allocator]`) that no family
    /// recognizes: libc's `malloc` is probed, and the program does not use it.
    StaticAllocatorNotRecognized,
    /// Python: pymalloc serves objects up to 512 B from arenas it maps directly with `mmap`.
    PythonPymalloc,
    /// Go: the Go runtime's heap is not allocated through malloc.
    GoRuntimeHeap,
    /// Memory present when memscope attached: seen only when freed, never by stack.
    BeforeAttach,
    /// Not one allocation reached the probed allocator since attach.
    NoAllocationSeen,
    /// Unaccounted memory in anonymous mappings other than the brk heap: mapped directly with
    /// `mmap`, or by an allocator or runtime memscope does not probe.
    DirectMmap,
    /// Unaccounted memory in the brk heap: freed memory the allocator keeps, and its metadata.
    AllocatorRetained,
    /// Unaccounted memory memscope has no breakdown for (the cheap figures of `/v1/targets`
    /// and `/metrics`; a snapshot breaks it down).
    NotSeenAllocated,
}

impl Reason {
    /// Every reason, in the order outputs list them.
    pub const ALL: [Reason; 8] = [
        Reason::StaticAllocatorNotRecognized,
        Reason::PythonPymalloc,
        Reason::GoRuntimeHeap,
        Reason::BeforeAttach,
        Reason::NoAllocationSeen,
        Reason::DirectMmap,
        Reason::AllocatorRetained,
        Reason::NotSeenAllocated,
    ];

    /// Stable machine name (JSON, metrics label).
    pub fn name(self) -> &'static str {
        match self {
            Reason::StaticAllocatorNotRecognized => "static_allocator_not_recognized",
            Reason::PythonPymalloc => "python_pymalloc",
            Reason::GoRuntimeHeap => "go_runtime_heap",
            Reason::BeforeAttach => "before_attach",
            Reason::NoAllocationSeen => "no_allocation_seen",
            Reason::DirectMmap => "direct_mmap",
            Reason::AllocatorRetained => "allocator_retained",
            Reason::NotSeenAllocated => "not_seen_allocated",
        }
    }

    /// The reason in words.
    pub fn text(self) -> &'static str {
        match self {
            Reason::StaticAllocatorNotRecognized => {
                "statically linked allocator not recognized: the executable allocates through its own #[global_allocator], which memscope does not see (rustc inlines it past Rust's allocator shims; entry points with C layouts can be named with --alloc-symbol)"
            }
            Reason::PythonPymalloc => {
                "Python's pymalloc arenas: objects up to 512 bytes come from 256 KiB arenas Python maps directly with mmap (PYTHONMALLOC=malloc makes them visible)"
            }
            Reason::GoRuntimeHeap => "Go runtime heap: traced through the runtime's sampling, not through malloc",
            Reason::BeforeAttach => "allocated before memscope attached: seen only when freed, never by stack",
            Reason::NoAllocationSeen => "no allocation reached the probed allocator since attach",
            Reason::DirectMmap => {
                "memory mapped directly with mmap (anonymous mappings not seen allocated through the probed allocator)"
            }
            Reason::AllocatorRetained => "freed memory the allocator keeps in its heap, and its metadata",
            Reason::NotSeenAllocated => {
                "memory not seen allocated through the probed allocator (mapped directly with mmap, or another allocator); a snapshot breaks it down"
            }
        }
    }
}

/// One reason for a low coverage, as outputs carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Why {
    /// [`Reason::name`].
    pub reason: Reason,
    /// [`Reason::text`].
    pub text: String,
    /// The bytes it explains, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl Why {
    fn new(reason: Reason, bytes: Option<u64>) -> Why {
        Why { reason, text: reason.text().to_string(), bytes }
    }
}

/// The coverage statement of one process at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// The process's resident anonymous memory (`RssAnon`) now.
    pub rss_anon_bytes: u64,
    /// Live bytes memscope traced by stack (estimated when sampling).
    pub traced_live_bytes: u64,
    /// `RssAnon` at attach, at most what is resident now: memory memscope knows of but not by
    /// stack.
    pub before_attach_bytes: u64,
    /// `RssAnon` neither traced nor there at attach.
    pub unaccounted_bytes: u64,
    /// `traced_live_bytes / rss_anon_bytes`, at most 1 (1 when `RssAnon` is 0).
    pub ratio: f64,
    /// `ratio` below [`LOW_RATIO`]: `reasons` says why.
    pub low: bool,
    /// Why the share is low, largest known first; empty when it is not low.
    pub reasons: Vec<Why>,
    /// The whole RSS by kind (snapshots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<Breakdown>,
}

/// What the target's files say about what memscope cannot see, found once at attach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// Reasons that hold whatever the figures (a runtime or allocator memscope does not probe).
    pub reasons: Vec<Reason>,
}

impl Hints {
    /// Looks at the target's executable and mapped objects: `allocator_path` is the object
    /// memscope probes (as the target sees it), `exe` and `objects` the target's executable
    /// (a host path reopening it) and the paths of what it maps.
    /// `shims_only`: the allocator is probed at Rust's allocator shims only (the fallback of
    /// [`crate::bpf::families`], which rustc 1.9x inlines away from most calls).
    pub fn inspect(
        exe_in_target: &str,
        exe: &std::path::Path,
        allocator_path: &str,
        shims_only: bool,
        objects: &[String],
    ) -> Hints {
        let mut reasons = Vec::new();
        let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
        if objects.iter().chain([&exe_in_target.to_string()]).any(|p| {
            let b = base(p);
            b.starts_with("libpython") || (b.starts_with("python") && !b.contains(".py"))
        }) {
            reasons.push(Reason::PythonPymalloc);
        }
        let mut rust = false;
        let mut system_allocator = false;
        let mut go = false;
        let found = crate::bpf::elf_symbols::find_functions(exe, |n| {
            n.ends_with("rust_begin_unwind")
                || n == "runtime.mallocgc"
                || crate::bpf::families::rust_shim_name(n).is_some()
        });
        for f in found.unwrap_or_default() {
            match crate::bpf::families::rust_shim_name(&f.name) {
                Some("__rdl_alloc") => system_allocator = true,
                Some(_) => rust = true,
                None if f.name == "runtime.mallocgc" => go = true,
                None => rust = true,
            }
        }
        if go {
            reasons.push(Reason::GoRuntimeHeap);
        }
        // A Rust executable whose global allocator is not the system one (no `__rdl_alloc`),
        // probed elsewhere than in itself, or at its shims only: its allocator was not
        // recognized.
        if rust && !system_allocator && (allocator_path != exe_in_target || shims_only) {
            reasons.push(Reason::StaticAllocatorNotRecognized);
        }
        Hints { reasons }
    }
}

impl Hints {
    /// [`Hints::inspect`] on `pid`'s executable and mapped objects (none when they cannot be
    /// read: the figures still give their reasons).
    pub fn for_process(pid: u32, allocator_path: &str, shims_only: bool) -> Hints {
        let Ok(objects) = crate::procfs::objects(pid) else { return Hints::default() };
        let Some(exe) = objects.first() else { return Hints::default() };
        let paths: Vec<String> = objects.iter().map(|o| o.path.clone()).collect();
        Hints::inspect(&exe.path, exe.host_path.path(), allocator_path, shims_only, &paths)
    }
}

/// The statement for process `pid` now: its `RssAnon` read from `/proc/PID/status`, and with
/// `breakdown` its whole RSS by kind from `/proc/PID/smaps` (a snapshot's; the cheap figures
/// of `/v1/targets` and `/metrics` go without). `None` when the process cannot be read.
pub fn of_process(
    pid: u32,
    traced_live_bytes: u64,
    rss_anon_at_attach: u64,
    allocs: u64,
    hints: &Hints,
    breakdown: bool,
) -> Option<Coverage> {
    let rss_anon_bytes = crate::procfs::status_bytes(pid, "RssAnon").ok()?;
    let breakdown = if breakdown { smaps::read(pid) } else { None };
    Some(assess(Figures { rss_anon_bytes, traced_live_bytes, rss_anon_at_attach, allocs }, hints, breakdown))
}

/// One traced target's coverage: its hints and its `RssAnon` at attach, kept from attach.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    hints: Hints,
    rss_anon_at_attach: u64,
}

impl Tracker {
    /// At attach to `pid`, probed in the object at `allocator_path` (`shims_only`: through
    /// Rust's allocator shims alone), `rss_anon_at_attach` resident then.
    pub fn new(pid: u32, allocator_path: &str, shims_only: bool, rss_anon_at_attach: u64) -> Tracker {
        Tracker {
            hints: Hints::for_process(pid, allocator_path, shims_only),
            rss_anon_at_attach,
        }
    }

    /// [`of_process`] with what was found at attach.
    pub fn of(&self, pid: u32, traced_live_bytes: u64, allocs: u64, breakdown: bool) -> Option<Coverage> {
        of_process(pid, traced_live_bytes, self.rss_anon_at_attach, allocs, &self.hints, breakdown)
    }
}

/// The figures a coverage statement is made of.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub rss_anon_bytes: u64,
    pub traced_live_bytes: u64,
    /// `RssAnon` when memscope attached.
    pub rss_anon_at_attach: u64,
    /// Allocations seen since attach.
    pub allocs: u64,
}

/// The statement for `f`, with the reasons of `hints` and, when given, the RSS breakdown.
pub fn assess(f: Figures, hints: &Hints, breakdown: Option<Breakdown>) -> Coverage {
    let rss = f.rss_anon_bytes;
    let traced = f.traced_live_bytes.min(rss);
    let before = f.rss_anon_at_attach.min(rss - traced);
    let unaccounted = rss - traced - before;
    let ratio = if rss == 0 { 1.0 } else { traced as f64 / rss as f64 };
    let ratio = (ratio * 1000.0).round() / 1000.0;
    let low = ratio < LOW_RATIO;
    let mut reasons = Vec::new();
    if low {
        for r in &hints.reasons {
            reasons.push(Why::new(*r, None));
        }
        if f.allocs == 0 {
            reasons.push(Why::new(Reason::NoAllocationSeen, None));
        }
        if before > 0 && before >= rss / 4 {
            reasons.push(Why::new(Reason::BeforeAttach, Some(before)));
        }
        if unaccounted > 0 && unaccounted >= rss / 4 {
            match &breakdown {
                Some(b) => {
                    // Thread stacks and written file pages are in RssAnon but are not heap:
                    // what is left sits in anonymous mappings or the brk heap.
                    if b.anon_mapping_bytes > 0 {
                        reasons.push(Why::new(Reason::DirectMmap, Some(b.anon_mapping_bytes.min(unaccounted))));
                    }
                    if b.brk_heap_bytes > 0 && b.brk_heap_bytes >= unaccounted / 4 {
                        reasons.push(Why::new(Reason::AllocatorRetained, Some(b.brk_heap_bytes.min(unaccounted))));
                    }
                }
                None => reasons.push(Why::new(Reason::NotSeenAllocated, Some(unaccounted))),
            }
        }
        // Runtime and allocator reasons first, then the largest.
        reasons.sort_by_key(|w| (w.bytes.is_some(), std::cmp::Reverse(w.bytes.unwrap_or(0))));
    }
    Coverage {
        rss_anon_bytes: rss,
        traced_live_bytes: f.traced_live_bytes,
        before_attach_bytes: before,
        unaccounted_bytes: unaccounted,
        ratio,
        low,
        reasons,
        breakdown,
    }
}

impl Coverage {
    /// One line: `coverage 92% of 13.1 MiB anonymous memory traced by stack` and, when low,
    /// the reasons' names.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:.0}% of {} anonymous memory traced by stack",
            self.ratio * 100.0,
            crate::render::human_bytes(self.rss_anon_bytes)
        );
        if self.low {
            let names: Vec<&str> = self.reasons.iter().map(|w| w.reason.name()).collect();
            let why = if names.is_empty() { "unexplained".to_string() } else { names.join(", ") };
            s.push_str(&format!(" (LOW: {why})"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(rss: u64, traced: u64, at_attach: u64, allocs: u64) -> Figures {
        Figures { rss_anon_bytes: rss, traced_live_bytes: traced, rss_anon_at_attach: at_attach, allocs }
    }

    /// A process whose memory memscope traced is covered, with no reason listed.
    #[test]
    fn high_coverage_has_no_reasons() {
        let c = assess(figures(100 << 20, 92 << 20, 2 << 20, 1000), &Hints::default(), None);
        assert!(!c.low && c.reasons.is_empty(), "{c:?}");
        assert_eq!(c.ratio, 0.92);
        assert_eq!(c.before_attach_bytes, 2 << 20);
        assert_eq!(c.unaccounted_bytes, 6 << 20);
        // Traced bytes above RssAnon (untouched pages): capped at 100%.
        let c = assess(figures(1 << 20, 5 << 20, 0, 10), &Hints::default(), None);
        assert_eq!((c.ratio, c.unaccounted_bytes), (1.0, 0));
    }

    /// Low coverage says why: the executable's hints first, then the figures (before attach,
    /// direct mmaps from the breakdown, or the generic reason without one).
    #[test]
    fn low_coverage_names_reasons() {
        let hints = Hints { reasons: vec![Reason::StaticAllocatorNotRecognized] };
        let c = assess(figures(1 << 30, 0, 1 << 20, 0), &hints, None);
        assert!(c.low);
        let names: Vec<&str> = c.reasons.iter().map(|w| w.reason.name()).collect();
        assert_eq!(names, ["static_allocator_not_recognized", "no_allocation_seen", "not_seen_allocated"]);
        assert!(c.summary().contains("LOW: static_allocator_not_recognized"), "{}", c.summary());

        let b =
            Breakdown { anon_mapping_bytes: 64 << 20, brk_heap_bytes: 1 << 20, complete: true, ..Default::default() };
        let c = assess(figures(66 << 20, 1 << 20, 0, 50), &Hints::default(), Some(b));
        let names: Vec<&str> = c.reasons.iter().map(|w| w.reason.name()).collect();
        assert_eq!(names, ["direct_mmap"]);
        assert_eq!(c.reasons[0].bytes, Some(64 << 20));

        let c = assess(figures(100 << 20, 1 << 20, 90 << 20, 50), &Hints::default(), None);
        assert_eq!(c.reasons[0].reason, Reason::BeforeAttach);
        assert_eq!(c.reasons[0].bytes, Some(90 << 20));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["reasons"][0]["reason"], "before_attach");
    }

    /// Every reason has a distinct machine name and a sentence.
    #[test]
    fn reason_names_are_stable_and_distinct() {
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
            assert!(!r.text().is_empty());
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
