//! Golden-file tests of the renderers (profiler_user::render) on hand-built heap profiles, plus
//! structural checks that a golden file alone would not make: the pprof output decoded back
//! and checked against pprof's rules, decoded again by a standard reader (`protoc` with
//! pprof's own profile.proto), and the SVGs parsed by a strict XML parser.
//!
//! Golden files live in tests/golden/. After an intended change of output, rewrite them with
//! `MEMSCOPE_BLESS=1 cargo test -p profiler-user --test render_golden` and review the diff.
use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use profiler_user::{
    aggregate::{Frame, FrameInfo, HeapProfile, Measure, StackSample, Totals},
    render::{
        self, flamegraph, folded,
        json::{self, diff_folded, diff_json, leaks_json},
        pprof::{self, PprofProfile},
        text, Format,
    },
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const APP: &str = "/usr/bin/app";
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const PLUGIN: &str = "/usr/lib/libplugin.so";

fn frame(function: Option<&str>, file_line: Option<(&str, u32)>, module: &str, address: u64) -> Frame {
    FrameInfo {
        function: function.map(Into::into),
        file: file_line.map(|(f, _)| f.into()),
        line: file_line.map(|(_, l)| l),
        module: Some(module.into()),
        address,
        module_offset: None,
        ..Default::default()
    }
    .into()
}

fn main_frame() -> Frame {
    frame(Some("main"), Some(("src/main.c", 12)), APP, 0x5555_5555_1234)
}

fn libc_start() -> Frame {
    frame(Some("__libc_start_call_main"), None, LIBC, 0x7f00_0002_9d90)
}

/// Leak site A: 1.5 MiB in 12 allocations, with file:line everywhere but in libc.
fn leak_a(live: u64, allocs: u64, oldest: f64) -> StackSample {
    StackSample {
        frames: vec![
            frame(Some("make_buffer"), Some(("src/cache.c", 42)), APP, 0x5555_5555_1500),
            frame(Some("cache_insert"), Some(("src/cache.c", 88)), APP, 0x5555_5555_1600),
            main_frame(),
            libc_start(),
        ],
        live_bytes: live,
        live_allocs: allocs,
        total_bytes: 2 * live,
        total_allocs: 2 * allocs,
        leak_bytes: live,
        leak_allocs: allocs,
        oldest_age_s: oldest,
    }
}

/// Leak site B: 4 KiB in 2 allocations, innermost frame unnamed (module+offset).
fn leak_b() -> StackSample {
    StackSample {
        frames: vec![
            FrameInfo {
                function: None,
                file: None,
                line: None,
                module: Some(PLUGIN.into()),
                address: 0x7f00_1000_1a2b,
                module_offset: Some(0x1a2b),
                ..Default::default()
            }
            .into(),
            frame(Some("plugin_load"), None, PLUGIN, 0x7f00_1000_2000),
            frame(Some("main"), Some(("src/main.c", 14)), APP, 0x5555_5555_1250),
            libc_start(),
        ],
        live_bytes: 4 * KIB,
        live_allocs: 2,
        total_bytes: 4 * KIB,
        total_allocs: 2,
        leak_bytes: 4 * KIB,
        leak_allocs: 2,
        oldest_age_s: 12.5,
    }
}

/// Churn: 10 MiB allocated and all freed again; a Rust name with spaces.
fn churn() -> StackSample {
    StackSample {
        frames: vec![
            frame(Some("parse_request"), Some(("src/http.rs", 310)), APP, 0x5555_5555_2000),
            frame(Some("<impl Handler for Conn>::serve"), Some(("src/http.rs", 77)), APP, 0x5555_5555_2100),
            main_frame(),
            libc_start(),
        ],
        live_bytes: 0,
        live_allocs: 0,
        total_bytes: 10 * MIB,
        total_allocs: 5000,
        leak_bytes: 0,
        leak_allocs: 0,
        oldest_age_s: 0.0,
    }
}

/// Live but younger than min_age (not a leak); a name with `;` inside.
fn young() -> StackSample {
    StackSample {
        frames: vec![
            frame(Some("json::parse<[u8; 8]>"), Some(("src/json.rs", 5)), APP, 0x5555_5555_3000),
            main_frame(),
            libc_start(),
        ],
        live_bytes: 2 * KIB,
        live_allocs: 4,
        total_bytes: 8 * KIB,
        total_allocs: 16,
        leak_bytes: 0,
        leak_allocs: 0,
        oldest_age_s: 0.4,
    }
}

fn totals(stacks: &[StackSample]) -> Totals {
    let allocs: u64 = stacks.iter().map(|s| s.total_allocs).sum();
    let live_allocs: u64 = stacks.iter().map(|s| s.live_allocs).sum();
    Totals {
        live_bytes: stacks.iter().map(|s| s.live_bytes).sum(),
        live_allocs,
        allocated_bytes: stacks.iter().map(|s| s.total_bytes).sum(),
        allocs,
        frees: allocs - live_allocs,
    }
}

/// The main fixture: every allocation recorded, 3 events dropped, target exited.
fn fixture() -> HeapProfile {
    let stacks = vec![churn(), leak_b(), young(), leak_a(3 * MIB / 2, 12, 3.2)];
    HeapProfile {
        pid: 4242,
        taken_at_ms: 1_700_000_000_123,
        duration_s: 30.0,
        min_age_s: 1.0,
        sample_bytes: 0,
        totals: totals(&stacks),
        dropped: BTreeMap::from([("ringbuf_full".to_string(), 3), ("stack_missing".to_string(), 0)]),
        unwind: BTreeMap::from([("frame_pointer_frames".to_string(), 4), ("truncated_no_cfi".to_string(), 2)]),
        unwind_tables: None,
        unseen_before_attach_bytes: 256 * KIB,
        untracked_frees: 7,
        target_exited: true,
        stacks,
        mappings: Vec::new(),
        probe_gaps: None,
        source: None,
        live_tracking: None,
        coverage: None,
        runtime_heap: None,
        js_names: None,
    }
}

/// The same process sampled, nothing dropped, still running.
fn fixture_sampled() -> HeapProfile {
    let mut p = fixture();
    p.sample_bytes = 512 * KIB;
    p.dropped.insert("ringbuf_full".to_string(), 0);
    p.target_exited = false;
    p.untracked_frees = 0;
    p
}

/// An earlier snapshot of the same process: leak A smaller, leak B as now, young and churn
/// not yet there, and a stack that is gone by the later snapshot. Addresses of leak A's
/// innermost frame differ (a reloaded module) to check matching by name.
fn fixture_before() -> HeapProfile {
    let mut a = leak_a(512 * KIB, 4, 1.2);
    a.frames[0].address += 0x10_0000;
    let gone = StackSample {
        frames: vec![
            frame(Some("warm_cache"), Some(("src/cache.c", 20)), APP, 0x5555_5555_4000),
            main_frame(),
            libc_start(),
        ],
        live_bytes: 64 * KIB,
        live_allocs: 1,
        total_bytes: 64 * KIB,
        total_allocs: 1,
        leak_bytes: 64 * KIB,
        leak_allocs: 1,
        oldest_age_s: 1.5,
    };
    let stacks = vec![a, leak_b(), gone];
    HeapProfile {
        pid: 4242,
        taken_at_ms: 1_700_000_000_123 - 20_000,
        duration_s: 10.0,
        min_age_s: 1.0,
        totals: totals(&stacks),
        dropped: BTreeMap::from([("ringbuf_full".to_string(), 0), ("stack_missing".to_string(), 0)]),
        stacks,
        ..HeapProfile::default()
    }
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with tests/golden/`name`, or rewrites the file when MEMSCOPE_BLESS=1.
fn golden(name: &str, actual: &[u8]) {
    let path = golden_dir().join(name);
    if std::env::var("MEMSCOPE_BLESS").as_deref() == Ok("1") {
        fs::create_dir_all(golden_dir()).unwrap();
        fs::write(&path, actual).unwrap();
        return;
    }
    let expected = fs::read(&path)
        .unwrap_or_else(|e| panic!("reading golden file {}: {e}\n(create it with MEMSCOPE_BLESS=1)", path.display()));
    if expected == actual {
        return;
    }
    let (exp, act) = (String::from_utf8_lossy(&expected), String::from_utf8_lossy(actual));
    let first =
        exp.lines().zip(act.lines()).position(|(e, a)| e != a).unwrap_or(exp.lines().count().min(act.lines().count()));
    panic!(
        "{} differs from the renderer's output (first at line {}):\n  expected: {:?}\n  actual:   {:?}\n\
         full output:\n{act}\n(if the change is intended, re-run with MEMSCOPE_BLESS=1 and review the diff)",
        path.display(),
        first + 1,
        exp.lines().nth(first),
        act.lines().nth(first),
    );
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s.into_bytes()
}

/// The leak report: header (drops WARNING, unseen bytes, exit line) and leaks in order,
/// module+offset and file:line frames; and its sampled, clean variant.
#[test]
fn text_report_matches_golden() {
    let r = text::leak_report(&fixture(), 20);
    // The facts the golden file must keep, spelled out so a careless bless cannot lose them.
    assert!(r.contains("pid 4242"), "{r}");
    assert!(r.contains("every allocation"), "{r}");
    assert!(r.contains("WARNING: 3 events dropped"), "{r}");
    assert!(r.contains("heap bytes allocated before attach (not seen): 256.0 KiB"), "{r}");
    assert!(r.contains("exited"), "{r}");
    let a = r.find("#1  1.5 MiB in 12 allocations, oldest 3.2s").expect("leak A first");
    let b = r.find("#2  4.0 KiB in 2 allocations, oldest 12.5s").expect("leak B second");
    assert!(a < b);
    assert!(r.contains("  make_buffer  (src/cache.c:42)\n"), "{r}");
    assert!(r.contains("  libplugin.so+0x1a2b\n"), "{r}");
    assert!(!r.contains("parse_request") && !r.contains("json::parse"), "no leak there: {r}");
    golden("report.txt", r.as_bytes());

    let r = text::leak_report(&fixture_sampled(), 1);
    assert!(r.contains("512.0 KiB"), "{r}");
    assert!(!r.contains("WARNING") && !r.contains("exited"), "{r}");
    assert!(r.contains("#1 ") && !r.contains("#2 "), "top 1: {r}");
    golden("report_sampled_top1.txt", r.as_bytes());
}

/// Folded stacks of live bytes and of leaks: outermost first, sanitized names, merged and
/// sorted, zero stacks left out.
#[test]
fn folded_matches_golden() {
    let p = fixture();
    let inuse = folded::folded(&p, Measure::Inuse);
    for line in inuse.lines() {
        let (stack, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<u64>().unwrap() > 0, "{line}");
        assert!(stack.starts_with("__libc_start_call_main;main;"), "outermost first: {line}");
    }
    assert_eq!(inuse.lines().count(), 3, "churn has no live bytes: {inuse}");
    assert!(inuse.contains("json::parse<[u8:_8]>"), "`;` and space sanitized: {inuse}");
    assert!(inuse.contains(";plugin_load;libplugin.so+0x1a2b 4096\n"), "{inuse}");
    golden("inuse.folded", inuse.as_bytes());

    let leaks = folded::folded(&p, Measure::Leaks);
    assert_eq!(leaks.lines().count(), 2, "{leaks}");
    golden("leaks.folded", leaks.as_bytes());

    let alloc = folded::folded(&p, Measure::Alloc);
    assert!(alloc.contains(";<impl Handler for Conn>::serve;parse_request 10485760\n"), "{alloc}");
}

/// leaks.json: the documented schema exactly (key sets), leaks largest first, frames innermost
/// first with null for unknown fields and "0x..." addresses.
#[test]
fn leaks_json_matches_golden() {
    let v = leaks_json(&fixture(), None);
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort_unstable();
        k
    };
    let mut top = vec![
        "pid",
        "duration_s",
        "sample_bytes",
        "min_age_s",
        "taken_at_ms",
        "target_exited",
        "totals",
        "dropped",
        "unseen_before_attach_bytes",
        "untracked_frees",
        "unwind",
        "unwind_tables",
        "leak_stacks",
        "leaks",
    ];
    top.sort_unstable();
    assert_eq!(keys(&v), top);
    assert_eq!(keys(&v["totals"]), ["allocated_bytes", "allocs", "frees", "live_allocs", "live_bytes"]);
    assert_eq!(keys(&v["leaks"][0]), ["allocs", "bytes", "frames", "oldest_age_s"]);
    assert_eq!(keys(&v["leaks"][0]["frames"][0]), ["address", "file", "function", "line", "module"]);
    assert_eq!(v["leaks"].as_array().unwrap().len(), 2);
    assert_eq!(v["leaks"][0]["bytes"], 3 * MIB / 2);
    assert_eq!(v["leaks"][0]["allocs"], 12);
    assert_eq!(v["leaks"][0]["frames"][0]["function"], "make_buffer");
    assert_eq!(v["leaks"][0]["frames"][0]["address"], "0x555555551500");
    let unnamed = &v["leaks"][1]["frames"][0];
    assert!(unnamed["function"].is_null() && unnamed["file"].is_null() && unnamed["line"].is_null());
    assert_eq!(unnamed["module"], PLUGIN);
    assert_eq!(v["dropped"]["ringbuf_full"], 3);
    assert_eq!(leaks_json(&fixture(), Some(1))["leaks"].as_array().unwrap().len(), 1);
    golden("leaks.json", &pretty(&v));

    // heap_json is the serde form of the profile: it reads back to the same profile.
    let back: HeapProfile = serde_json::from_value(json::heap_json(&fixture())).unwrap();
    assert_eq!(back, fixture());
}

/// Differential outputs: diff_folded (`stack before after`) and diff_json (growth per stack,
/// matched by names across moved addresses, largest growth first, plus totals).
#[test]
fn diffs_match_golden() {
    let (before, after) = (fixture_before(), fixture());
    let folded = diff_folded(&before, &after, Measure::Inuse);
    for line in folded.lines() {
        let mut it = line.rsplitn(3, ' ');
        let (a, b) = (it.next().unwrap().parse::<u64>().unwrap(), it.next().unwrap().parse::<u64>().unwrap());
        assert!(a + b > 0, "{line}");
    }
    assert!(folded.contains(";cache_insert;make_buffer 524288 1572864\n"), "matched by name: {folded}");
    assert!(folded.contains(";warm_cache 65536 0\n"), "{folded}");
    golden("diff_inuse.folded", folded.as_bytes());

    let d = diff_json(&before, &after, None);
    let stacks = d["stacks"].as_array().unwrap();
    let growth: Vec<i64> = stacks.iter().map(|s| s["growth_bytes"].as_i64().unwrap()).collect();
    assert_eq!(growth, [1024 * 1024, 2048, -65536], "leak B did not change, so it is not listed");
    assert_eq!(stacks[0]["frames"][0]["function"], "make_buffer");
    assert_eq!(stacks[0]["growth_allocs"], 8);
    assert_eq!(stacks[0]["before_bytes"], 512 * KIB);
    assert_eq!(d["totals"]["growth_bytes"], 1024 * 1024 + 2048 - 65536);
    assert_eq!(d["stacks_changed"], 3);
    golden("diff.json", &pretty(&d));
}

/// Parses an SVG with a strict XML parser and returns all its text content.
fn svg_text(svg: &[u8]) -> String {
    let s = std::str::from_utf8(svg).expect("SVG is UTF-8");
    let opts = roxmltree::ParsingOptions { allow_dtd: true, ..roxmltree::ParsingOptions::default() };
    let doc =
        roxmltree::Document::parse_with_options(s, opts).unwrap_or_else(|e| panic!("SVG is not well-formed XML: {e}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants().filter_map(|n| n.text()).collect::<Vec<_>>().join("\n")
}

/// Flamegraph SVGs (profile, differential, empty): well-formed XML naming every function of
/// the shown stacks, deterministic, and equal to the golden files.
#[test]
fn flamegraphs_are_valid_svg_and_match_golden() {
    let p = fixture();
    let svg = flamegraph::flamegraph_svg(&p, Measure::Inuse, "memscope: live bytes of pid 4242").unwrap();
    assert_eq!(svg, flamegraph::flamegraph_svg(&p, Measure::Inuse, "memscope: live bytes of pid 4242").unwrap());
    let text = svg_text(&svg);
    for name in [
        "make_buffer",
        "cache_insert",
        "main",
        "__libc_start_call_main",
        "plugin_load",
        "libplugin.so+0x1a2b",
        "json::parse<[u8:_8]>",
    ] {
        assert!(text.contains(name), "{name} missing from the flamegraph");
    }
    assert!(!text.contains("parse_request"), "churn has no live bytes");
    assert!(text.contains("bytes"), "count name");
    golden("flamegraph_inuse.svg", &svg);

    let alloc = svg_text(&render::render(&p, Format::Svg, Measure::Alloc).unwrap());
    assert!(alloc.contains("<impl Handler for Conn>::serve") && alloc.contains("parse_request"));

    let diff = flamegraph::diff_flamegraph_svg(&fixture_before(), &p, Measure::Inuse, "growth").unwrap();
    let text = svg_text(&diff);
    assert!(text.contains("make_buffer") && text.contains("json::parse<[u8:_8]>"), "{text}");
    golden("diff_flamegraph_inuse.svg", &diff);

    // Nothing to draw: a valid SVG that says so, not an error.
    let empty = flamegraph::flamegraph_svg(&HeapProfile::default(), Measure::Inuse, "empty <&>").unwrap();
    let text = svg_text(&empty);
    assert!(text.contains("no allocations") && text.contains("empty <&>"), "{text}");
    golden("empty.svg", &empty);
    let all_freed = HeapProfile { stacks: Vec::new(), ..fixture_before() };
    let text = svg_text(&flamegraph::diff_flamegraph_svg(&p, &all_freed, Measure::Inuse, "all freed").unwrap());
    assert!(text.contains("no allocations"), "{text}");
}

/// Checks pprof's own rules, which decoders do not: string_table[0] is "", ids start at 1
/// and are dense and unique, and every id and string index resolves.
fn check_pprof_rules(pb: &PprofProfile) {
    assert_eq!(pb.string_table.first().map(String::as_str), Some(""), "string_table[0] must be empty");
    let n = pb.string_table.len() as i64;
    let s = |i: i64, what: &str| {
        assert!((0..n).contains(&i), "{what}: string index {i} out of 0..{n}");
    };
    for vt in pb.sample_type.iter().chain(&pb.period_type) {
        s(vt.r#type, "value type");
        s(vt.unit, "value unit");
    }
    s(pb.default_sample_type, "default_sample_type");
    pb.comment.iter().for_each(|&c| s(c, "comment"));
    let ids = |v: Vec<u64>, what: &str| -> HashSet<u64> {
        let expected: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(v, expected, "{what} ids must be 1..=n in order");
        v.into_iter().collect()
    };
    let mappings = ids(pb.mapping.iter().map(|m| m.id).collect(), "mapping");
    let functions = ids(pb.function.iter().map(|f| f.id).collect(), "function");
    let locations = ids(pb.location.iter().map(|l| l.id).collect(), "location");
    for m in &pb.mapping {
        s(m.filename, "mapping filename");
        s(m.build_id, "mapping build_id");
        assert!(m.memory_start < m.memory_limit, "{m:?}");
    }
    for f in &pb.function {
        s(f.name, "function name");
        s(f.system_name, "function system_name");
        s(f.filename, "function filename");
        assert_ne!(f.name, 0, "function without a name: {f:?}");
    }
    let mut addresses = HashSet::new();
    for l in &pb.location {
        assert!(l.mapping_id == 0 || mappings.contains(&l.mapping_id), "{l:?}");
        assert!(addresses.insert(l.address), "one location per address: {l:?}");
        assert_eq!(l.line.len(), 1, "{l:?}");
        assert!(functions.contains(&l.line[0].function_id), "{l:?}");
    }
    for smp in &pb.sample {
        assert_eq!(smp.value.len(), pb.sample_type.len(), "{smp:?}");
        assert!(!smp.location_id.is_empty());
        smp.location_id.iter().for_each(|id| assert!(locations.contains(id), "{smp:?}"));
        for l in &smp.label {
            s(l.key, "label key");
            s(l.str, "label str");
            s(l.num_unit, "label num_unit");
        }
    }
}

/// Function names of a sample's locations, innermost first.
fn sample_names(pb: &PprofProfile, smp: &pprof::Sample) -> Vec<String> {
    smp.location_id
        .iter()
        .map(|id| {
            let loc = &pb.location[*id as usize - 1];
            let f = &pb.function[loc.line[0].function_id as usize - 1];
            pb.string_table[f.name as usize].clone()
        })
        .collect()
}

/// pprof: decoded back with prost, shaped like a Go heap profile (sample types in Go's order,
/// inuse_space default, period), values per stack right, stacks innermost first, names,
/// files and line numbers present, and pprof's rules hold.
#[test]
fn pprof_decodes_back_and_follows_pprof_rules() {
    let p = fixture_sampled();
    let gz = pprof::pprof_gz(&p).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    assert_eq!(gz, pprof::pprof_gz(&p).unwrap(), "deterministic");
    assert_eq!(render::render(&p, Format::Pprof, Measure::Leaks).unwrap(), gz);
    let pb = pprof::decode_pprof_gz(&gz).unwrap();
    check_pprof_rules(&pb);
    let st = |i: i64| pb.string_table[i as usize].as_str();

    let types: Vec<(&str, &str)> = pb.sample_type.iter().map(|v| (st(v.r#type), st(v.unit))).collect();
    assert_eq!(
        types,
        [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")]
    );
    assert_eq!(st(pb.default_sample_type), "inuse_space");
    let period = pb.period_type.as_ref().unwrap();
    assert_eq!((st(period.r#type), st(period.unit)), ("space", "bytes"));
    assert_eq!(pb.period, 512 * 1024);
    assert_eq!(pb.time_nanos, 1_700_000_000_123_000_000);
    assert_eq!(pb.duration_nanos, 30_000_000_000);
    assert_eq!(pb.sample.len(), 4);

    let by_leaf: BTreeMap<String, (&pprof::Sample, Vec<String>)> = pb
        .sample
        .iter()
        .map(|smp| {
            let names = sample_names(&pb, smp);
            (names[0].clone(), (smp, names))
        })
        .collect();
    let (a, names) = &by_leaf["make_buffer"];
    assert_eq!(names, &["make_buffer", "cache_insert", "main", "__libc_start_call_main"]);
    assert_eq!(a.value, [24, 3 * 1024 * 1024, 12, 3 * 1024 * 1024 / 2]);
    let leak_label = a.label.iter().find(|l| st(l.key) == "leak_bytes").expect("leak_bytes label");
    assert_eq!((leak_label.num, st(leak_label.num_unit)), (3 * 1024 * 1024 / 2, "bytes"));
    let (churn, _) = &by_leaf["parse_request"];
    assert_eq!(churn.value, [5000, 10 * 1024 * 1024, 0, 0]);
    assert!(churn.label.is_empty());
    assert_eq!(by_leaf["libplugin.so+0x1a2b"].0.value, [2, 4096, 2, 4096]);

    // main at 0x555555551234 is shared by three stacks: one location; main at another address
    // (leak B) is a different location but the same function (same name and file).
    let main_fns: Vec<_> = pb.function.iter().filter(|f| st(f.name) == "main").collect();
    assert_eq!(main_fns.len(), 1);
    assert_eq!(st(main_fns[0].filename), "src/main.c");
    let main_locs: Vec<_> = pb.location.iter().filter(|l| l.line[0].function_id == main_fns[0].id).collect();
    assert_eq!(main_locs.len(), 2);
    assert!(main_locs.iter().any(|l| l.address == 0x5555_5555_1234 && l.line[0].line == 12));

    // Mappings: one per module; the plugin's file offset follows from the module offset.
    let maps: BTreeMap<&str, &pprof::Mapping> = pb.mapping.iter().map(|m| (st(m.filename), m)).collect();
    assert_eq!(maps.keys().copied().collect::<Vec<_>>(), [LIBC, APP, PLUGIN]);
    let plugin = maps[PLUGIN];
    assert_eq!((plugin.memory_start, plugin.file_offset), (0x7f00_1000_1a2b, 0x1a2b));
    assert!(!plugin.has_functions, "one frame of the plugin has no name");
    assert!(maps[APP].has_functions && maps[APP].has_line_numbers);
    let plugin_loc = pb.location.iter().find(|l| l.address == 0x7f00_1000_1a2b).unwrap();
    assert_eq!(plugin_loc.mapping_id, plugin.id);
}

/// Where the Debian package golang-github-google-pprof-dev puts profile.proto.
fn pprof_proto() -> PathBuf {
    const HINT: &str = "install them with: apt-get install -y protobuf-compiler golang-github-google-pprof-dev \
                        (cargo xtask test does this in CI)";
    let out = Command::new("dpkg")
        .args(["-L", "golang-github-google-pprof-dev"])
        .output()
        .unwrap_or_else(|e| panic!("running dpkg: {e}; this test needs the Debian packages protobuf-compiler and golang-github-google-pprof-dev; {HINT}"));
    assert!(
        out.status.success(),
        "package golang-github-google-pprof-dev is not installed (dpkg -L: {}); this test needs it and protobuf-compiler; {HINT}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with("/proto/profile.proto") || l.ends_with("/profile.proto"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("golang-github-google-pprof-dev ships no profile.proto here; {HINT}"));
    assert!(
        Command::new("protoc").arg("--version").output().is_ok_and(|o| o.status.success()),
        "protoc not found: this test needs the Debian package protobuf-compiler; {HINT}"
    );
    path
}

/// Decodes our pprof output with a standard reader, `protoc --decode` and pprof's own
/// profile.proto (never skipped: the packages are a test requirement): it decodes, has no
/// field that profile.proto does not know, names every function and sample type, and its
/// sample_type indices point at the right strings.
#[test]
fn pprof_decodes_with_protoc_and_pprofs_profile_proto() {
    let proto = pprof_proto();
    let gz = pprof::pprof_gz(&fixture()).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw).unwrap();

    let mut child = Command::new("protoc")
        .arg("--decode=perftools.profiles.Profile")
        .arg(format!("--proto_path={}", proto.parent().unwrap().display()))
        .arg(proto.file_name().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning protoc");
    child.stdin.take().unwrap().write_all(&raw).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "protoc failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));

    // Unknown fields print as `<number>: value`: there must be none.
    let unknown: Vec<&str> =
        stdout.lines().filter(|l| l.trim_start().split(':').next().is_some_and(|k| k.parse::<u32>().is_ok())).collect();
    assert!(unknown.is_empty(), "fields unknown to profile.proto: {unknown:?}");

    let strings: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("string_table: "))
        .map(|q| q.trim_matches('"').to_string())
        .collect();
    assert_eq!(strings.first().map(String::as_str), Some(""), "string_table[0]");
    for name in [
        "make_buffer",
        "cache_insert",
        "main",
        "__libc_start_call_main",
        "plugin_load",
        "libplugin.so+0x1a2b",
        "parse_request",
        "<impl Handler for Conn>::serve",
        "json::parse<[u8; 8]>",
        "src/cache.c",
        "alloc_objects",
        "alloc_space",
        "inuse_objects",
        "inuse_space",
        "count",
        "bytes",
    ] {
        assert!(strings.iter().any(|s| s == name), "{name:?} not in protoc's string_table: {strings:?}");
    }

    // sample_type { type: i unit: j } blocks, resolved through protoc's own string table.
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let num = |l: &str, key: &str| l.strip_prefix(key).and_then(|v| v.trim().parse::<usize>().ok());
    let types: Vec<(String, String)> = lines
        .windows(3)
        .filter(|w| w[0] == "sample_type {")
        .map(|w| {
            let t = num(w[1], "type:").expect("type index");
            let u = num(w[2], "unit:").expect("unit index");
            (strings[t].clone(), strings[u].clone())
        })
        .collect();
    let expected: Vec<(String, String)> =
        pprof::SAMPLE_TYPES.iter().map(|(t, u)| (t.to_string(), u.to_string())).collect();
    assert_eq!(types, expected);
    assert_eq!(lines.iter().filter(|l| **l == "sample {").count(), 4, "one sample per stack");
}

/// The Format switch renders what its name says.
#[test]
fn render_dispatches_by_format() {
    let p = fixture();
    assert_eq!(render::render(&p, Format::Text, Measure::Inuse).unwrap(), text::leak_report(&p, 20).into_bytes());
    assert_eq!(
        render::render(&p, Format::Folded, Measure::Leaks).unwrap(),
        folded::folded(&p, Measure::Leaks).into_bytes()
    );
    let j: serde_json::Value =
        serde_json::from_slice(&render::render(&p, Format::Json, Measure::Inuse).unwrap()).unwrap();
    assert_eq!(j, json::heap_json(&p));
    assert_eq!(Format::parse("pprof").unwrap().file_extension(), "pb.gz");
    assert_eq!(Format::Svg.content_type(), "image/svg+xml");
}
