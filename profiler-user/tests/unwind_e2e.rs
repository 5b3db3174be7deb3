//! Whole, correct stacks for code built without frame pointers (issue 10): ground-truth tests
//! of the unwinder through `memscope record` and `leaks.json`.
//!
//! Every fixture (tests/fixtures/unwind/) is built here WITHOUT frame pointers, the way
//! distributions and release builds are (`-O2 -fomit-frame-pointer -g`; Rust `-C opt-level=2
//! -C force-frame-pointers=no -g`), with `noinline` chains of known shape below `main`. The
//! ground truth is the chain in the source, innermost first, from the function that called the
//! allocator (or the STL, or `Box`) down to `main` (or `start_thread` on other threads), as a
//! DWARF unwinder reports it: `heaptrack_reports_the_ground_truth_chains` checks that heaptrack
//! (libunwind) sees exactly these chains on the same binaries.
//!
//! For each fixture, at `--sampling full` and at the default sampling, the tests require:
//! - at least 95% of the live bytes have EXACTLY the expected chain: after the allocator's and
//!   the runtime's own frames (libstdc++, `std::` templates, `alloc::`, libc, ld.so), the
//!   fixture's functions in order, contiguous, to `main`; inlined frames (same address as the
//!   frame they are inlined into, or marked `"inlined": true`) are ignored;
//! - no frame outside the target's file-backed executable mappings (a snapshot of
//!   /proc/PID/maps taken after the workload, dlopened libraries included);
//! - the unwinder's truncation counters in `leaks.json` (`unwind.truncated_no_cfi`,
//!   `unwind.truncated_bad_frame`, `unwind.truncated_depth`) are present and zero.
//!
//! A fixture stripped of its CFI must instead count truncations, and still show no garbage.
//! Need root; CI runs them as root.
mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{require_root, spawn_record, Fixture};
use serde_json::Value;

/// Share of the live bytes that must have exactly the expected chain.
const MIN_SHARE: f64 = 0.95;

// ---------------------------------------------------------------------------------------------
// Building the fixtures

fn fixtures_src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unwind")
}

/// A fresh output path per test process and thread (see common::build_fixture for why).
fn out_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("unwind-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    dir.join(format!("{name}.{}.{thread}", std::process::id()))
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?} (`cargo xtask setup` installs it): {e}"));
    assert!(status.success(), "{cmd:?} failed");
}

/// The C and C++ flags of every fixture: optimized, no frame pointers, debug info for names
/// and lines.
const NO_FP: &[&str] = &["-O2", "-fomit-frame-pointer", "-g", "-pthread"];

fn compile(compiler: &str, src: &str, name: &str, extra: &[&str]) -> PathBuf {
    let out = out_path(name);
    run(Command::new(compiler)
        .args(NO_FP)
        .args(extra)
        .arg("-o")
        .arg(&out)
        .arg(fixtures_src().join(src)));
    out
}

fn cxx_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| compile("c++", "unwind_cxx.cc", "unwind_cxx", &[]))
        .clone()
}

fn c_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let exe = compile("cc", "unwind_c.c", "unwind_c", &[]);
        // The ground truth says tail_entry's frame is absent: make sure it is a tail call.
        let dis = disassemble(&exe, "tail_entry");
        assert!(
            dis.contains("jmp") && dis.contains("<tail_callee>"),
            "tail_entry is not a tail call:\n{dis}"
        );
        exe
    })
    .clone()
}

/// The C fixture without any CFI: no unwind tables, and .eh_frame, .eh_frame_hdr and
/// .debug_frame removed from the file (the crt objects' CFI with them).
fn c_fixture_without_cfi() -> PathBuf {
    let exe = compile(
        "cc",
        "unwind_c.c",
        "unwind_c_nocfi",
        &["-fno-asynchronous-unwind-tables", "-fno-unwind-tables"],
    );
    run(Command::new("objcopy")
        .args([
            "--remove-section",
            ".eh_frame",
            "--remove-section",
            ".eh_frame_hdr",
            "--remove-section",
            ".debug_frame",
        ])
        .arg(&exe));
    let sections = String::from_utf8(Command::new("readelf").arg("-SW").arg(&exe).output().unwrap().stdout).unwrap();
    assert!(
        !sections.contains("eh_frame") && !sections.contains(".debug_frame"),
        "{sections}"
    );
    exe
}

/// The C fixture as a PIE with both an `.eh_frame` (its own code's CFI, as always) and a
/// zlib-compressed `.debug_frame` (`SHF_COMPRESSED`, as every Go/cgo binary has): one more
/// object built with `-fno-asynchronous-unwind-tables -g` puts its CFI in `.debug_frame`, and
/// the link compresses the debug sections. Checked with readelf.
fn c_fixture_compressed_debug_frame() -> PathBuf {
    let helper = out_path("debug_frame_helper.c");
    // Enough FDEs that compressing pays (ld leaves a section uncompressed otherwise).
    let helpers: String = (0..300)
        .map(|i| format!("int debug_frame_helper{i}(int x) {{ volatile int a[{}]; a[0] = x; return a[0] * {i}; }}\n", i % 7 + 2))
        .collect();
    std::fs::write(&helper, helpers).unwrap();
    let helper_obj = out_path("debug_frame_helper.o");
    run(Command::new("cc")
        .args(["-O2", "-fPIE", "-gdwarf-4", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-c", "-o"])
        .arg(&helper_obj)
        .arg("-x")
        .arg("c")
        .arg(&helper));
    let exe = compile(
        "cc",
        "unwind_c.c",
        "unwind_c_zdebug",
        &["-pie", "-fPIE", "-gdwarf-4", "-Wl,--compress-debug-sections=zlib", helper_obj.to_str().unwrap()],
    );
    let sections = String::from_utf8(Command::new("readelf").arg("-SW").arg(&exe).output().unwrap().stdout).unwrap();
    let line = |name: &str| sections.lines().find(|l| l.contains(&format!(" {name} "))).map(str::to_owned);
    let debug_frame = line(".debug_frame").unwrap_or_else(|| panic!("no .debug_frame:\n{sections}"));
    assert!(line(".eh_frame").is_some(), "no .eh_frame:\n{sections}");
    // The flags column holds C for SHF_COMPRESSED.
    let flags = debug_frame.split_whitespace().rev().nth(3).unwrap_or_default();
    assert!(flags.contains('C'), ".debug_frame not compressed: {debug_frame}");
    let header = String::from_utf8(Command::new("readelf").arg("-hW").arg(&exe).output().unwrap().stdout).unwrap();
    assert!(header.contains("DYN"), "not a PIE:\n{header}");
    exe
}

fn rust_fixture() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = out_path("unwind_rust");
        run(Command::new("rustc")
            .args([
                "--edition",
                "2021",
                "-C",
                "opt-level=2",
                "-C",
                "force-frame-pointers=no",
                "-g",
                "--crate-name",
                "unwind_rust",
            ])
            .arg("-o")
            .arg(&out)
            .arg(fixtures_src().join("unwind_rust.rs")));
        out
    })
    .clone()
}

/// (executable, plugin library).
fn dlopen_fixture() -> (PathBuf, PathBuf) {
    static P: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    P.get_or_init(|| {
        let plugin = compile("cc", "unwind_plugin.c", "libunwind_plugin.so", &["-fPIC", "-shared"]);
        let exe = compile("cc", "unwind_dlopen.c", "unwind_dlopen", &["-ldl"]);
        (exe, plugin)
    })
    .clone()
}

fn disassemble(exe: &Path, function: &str) -> String {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", &format!("--disassemble={function}")])
        .arg(exe)
        .output()
        .expect("objdump (binutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Ground truth

/// One element of an expected chain.
#[derive(Clone, Copy, Debug)]
enum Pat {
    /// A function of the fixture, by name (C++ parameters and Rust hashes ignored).
    F(&'static str),
    /// One or more frames in libc (a signal frame and `raise`'s own frames).
    Libc,
}
use Pat::{Libc, F};

/// An allocation site and its chain, innermost first, ending at `main` or `start_thread`.
struct Site {
    name: &'static str,
    chain: Vec<Pat>,
    /// Rust: the chain ends at the crate's `main`; C `main` must follow somewhere below it
    /// (after the standard library's `lang_start` frames).
    then_c_main: bool,
}

fn site(name: &'static str, chain: &[Pat]) -> Site {
    Site {
        name,
        chain: chain.to_vec(),
        then_c_main: false,
    }
}

fn cxx_sites() -> Vec<Site> {
    vec![
        site(
            "std::string",
            &[
                F("string_leaf"),
                F("string_b"),
                F("string_a"),
                F("run_strings"),
                F("main"),
            ],
        ),
        site(
            "std::vector",
            &[F("vector_leaf"), F("vector_a"), F("run_vectors"), F("main")],
        ),
        site(
            "std::unordered_map",
            &[
                F("map_leaf"),
                F("map_c"),
                F("map_b"),
                F("map_a"),
                F("run_maps"),
                F("main"),
            ],
        ),
        site("new", &[F("object_leaf"), F("object_a"), F("run_objects"), F("main")]),
    ]
}

fn c_sites() -> Vec<Site> {
    vec![
        // tail_entry tail-calls tail_callee: its frame is gone, as in any DWARF unwinder.
        site(
            "tail call",
            &[F("tail_leaf"), F("tail_callee"), F("run_tail"), F("main")],
        ),
        site(
            "signal handler",
            &[
                F("signal_leaf"),
                F("on_usr1"),
                Libc,
                F("raise_usr1"),
                F("run_signal"),
                F("main"),
            ],
        ),
    ]
}

fn thread_sites() -> Vec<Site> {
    vec![
        site(
            "threads",
            &[
                F("thread_leaf"),
                F("thread_b"),
                F("thread_a"),
                F("thread_main"),
                F("start_thread"),
            ],
        ),
        // pthread_create's own allocations (the new thread's TLS), made inside libc and ld.so.
        site("pthread_create", &[F("main")]),
    ]
}

fn rust_sites() -> Vec<Site> {
    vec![
        Site {
            name: "Box",
            chain: vec![F("box_leaf"), F("box_mid"), F("run_boxes"), F("main")],
            then_c_main: true,
        },
        Site {
            name: "Vec",
            chain: vec![F("vec_leaf"), F("vec_b"), F("vec_a"), F("run_vecs"), F("main")],
            then_c_main: true,
        },
    ]
}

fn dlopen_sites() -> Vec<Site> {
    vec![
        site(
            "plugin",
            &[
                F("plugin_leaf"),
                F("plugin_mid"),
                F("plugin_entry"),
                F("call_plugin"),
                F("run_plugin"),
                F("main"),
            ],
        ),
        // dlopen's own allocations (link map, ...), made inside ld.so and libc.
        site("dlopen", &[F("open_plugin"), F("run_plugin"), F("main")]),
    ]
}

/// One physical frame as the matcher sees it: the function at a return address, with the
/// functions inlined there (blazesym reports those as frames of the same address).
#[derive(Clone, Debug)]
struct Fr {
    names: Vec<String>,
    /// File name of the module (basename), when known.
    module: Option<String>,
    address: u64,
}

impl Fr {
    fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    fn show(&self) -> String {
        match self.names.iter().filter(|n| !n.is_empty()).cloned().collect::<Vec<_>>() {
            v if v.is_empty() => format!("{:#x}", self.address),
            v => v.join("/"),
        }
    }
}

/// The function name without C++ parameters, ` [clone ...]` suffixes or a Rust hash, and
/// without the Rust crate path of the fixture (`unwind_rust::box_leaf` -> `box_leaf`).
fn normalize(name: &str) -> String {
    let demangled = demangle_rust_legacy(name);
    let mut n = demangled.as_deref().unwrap_or(name);
    if let Some(i) = n.find('(') {
        n = &n[..i];
    }
    if let Some(i) = n.find(" [clone") {
        n = &n[..i];
    }
    if let Some((head, hash)) = n.rsplit_once("::h") {
        if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) {
            n = head;
        }
    }
    n.strip_prefix("unwind_rust::").unwrap_or(n).trim().to_string()
}

fn parse_address(f: &Value) -> u64 {
    f["address"]
        .as_str()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0)
}

/// Physical frames of a leak entry, innermost first: consecutive frames with the same address,
/// or marked `"inlined": true` (then grouped with the frame after them), are one frame.
fn frames_of(leak: &Value) -> Vec<Fr> {
    let mut out: Vec<Fr> = Vec::new();
    let mut open_inline = false;
    for f in leak["frames"].as_array().into_iter().flatten() {
        let address = parse_address(f);
        let name = f["function"].as_str().map(normalize).unwrap_or_default();
        let module = f["module"]
            .as_str()
            .map(|m| m.rsplit('/').next().unwrap_or(m).to_string());
        match out.last_mut() {
            Some(last) if open_inline || (last.address == address && address != 0) => {
                last.names.push(name);
                last.address = address;
                if module.is_some() {
                    last.module = module;
                }
            }
            _ => out.push(Fr {
                names: vec![name],
                module,
                address,
            }),
        }
        open_inline = f["inlined"].as_bool() == Some(true);
    }
    out
}

/// `_ZN11unwind_rust8box_leaf17h0123456789abcdefE` -> `unwind_rust::box_leaf::h0123456789abcdef`:
/// heaptrack leaves Rust's (legacy-mangled) names as they are in the symbol table.
fn demangle_rust_legacy(name: &str) -> Option<String> {
    let mut rest = name.strip_prefix("_ZN")?.strip_suffix('E')?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        let len: usize = rest[..digits].parse().ok()?;
        parts.push(rest.get(digits..digits + len)?);
        rest = &rest[digits + len..];
    }
    Some(parts.join("::"))
}

/// Frames of the runtime between the allocator and the fixture's code: the allocator itself,
/// libstdc++'s and Rust's allocation paths, STL templates instantiated in the executable.
fn is_runtime_name(name: &str) -> bool {
    [
        "operator new",
        "_R", // Rust's v0-mangled standard library, which heaptrack does not demangle
        "__rust",
        "__rdl",
        "__rg_",
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "std::",
        "<std::",
        "__gnu_cxx",
        "je_",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || name.contains(" std::")
}

fn is_libc(f: &Fr) -> bool {
    match &f.module {
        // heaptrack's folded stacks carry no module: there, any frame not of the fixture.
        Some(m) => m.starts_with("libc.so") || m.starts_with("libc-") || m == NOT_THE_FIXTURE,
        None => false,
    }
}

/// The module of a heaptrack frame that is none of the fixture's functions.
const NOT_THE_FIXTURE: &str = "(heaptrack: not the fixture)";

/// Whether `frames` is exactly `site`'s chain (after the allocator's and runtime's frames).
/// `own` are the fixture's module names: frames elsewhere before the chain are the runtime's.
fn matches(frames: &[Fr], site: &Site, own: &[String]) -> bool {
    let own_names: Vec<&str> = site
        .chain
        .iter()
        .filter_map(|p| if let F(n) = p { Some(*n) } else { None })
        .collect();
    let first = match site.chain[0] {
        F(n) => n,
        Libc => unreachable!("chains start with a fixture function"),
    };
    let mut i = 0;
    while i < frames.len() && !frames[i].has(first) {
        let f = &frames[i];
        let foreign = f.module.as_ref().is_some_and(|m| !own.contains(m));
        if !(foreign || f.names.iter().all(|n| is_runtime_name(n))) {
            return false;
        }
        i += 1;
    }
    for (k, pat) in site.chain.iter().enumerate() {
        match pat {
            F(n) => {
                if !frames.get(i).is_some_and(|f| f.has(n)) {
                    return false;
                }
                i += 1;
            }
            Libc => {
                let next = match site.chain.get(k + 1) {
                    Some(F(n)) => *n,
                    _ => unreachable!("Libc is followed by a fixture function"),
                };
                let start = i;
                while i < frames.len() && !frames[i].has(next) {
                    if !is_libc(&frames[i]) || own_names.iter().any(|n| frames[i].has(n)) {
                        return false;
                    }
                    i += 1;
                }
                if i == start {
                    return false;
                }
            }
        }
    }
    !site.then_c_main || frames[i..].iter().any(|f| f.has("main"))
}

// ---------------------------------------------------------------------------------------------
// Recording

struct Recording {
    leaks: Value,
    /// File-backed executable mappings of the target after its workload: (start, end, path).
    exec_maps: Vec<(u64, u64, String)>,
    pid: u32,
}

fn exec_mappings(pid: u32) -> Vec<(u64, u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?;
            let path = it.nth(3)?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                path.to_string(),
            ))
        })
        .collect()
}

/// Starts `cmd` (a fixture speaking the ready/go/done protocol), attaches `memscope record`
/// with `sampling` (None: the default), lets the workload run, snapshots the target's maps,
/// stops the recording with SIGINT and returns leaks.json.
fn record(cmd: Command, sampling: Option<&str>) -> Recording {
    let mut fixture = Fixture::spawn(cmd);
    let out = tempfile::tempdir().unwrap();
    let mut extra = vec!["--min-age", "0s", "--json-top", "1000000", "--max-stacks", "131072"];
    if let Some(s) = sampling {
        extra.extend(["--sampling", s]);
    }
    let mut child = spawn_record(fixture.pid, out.path(), &extra);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("attached") {
        let before = log.len();
        stderr.read_line(&mut log).unwrap();
        assert!(log.len() > before, "memscope ended before attaching: {log}");
    }
    fixture.go();
    let exec_maps = exec_mappings(fixture.pid);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    let leaks: Value = serde_json::from_slice(&std::fs::read(out.path().join("leaks.json")).unwrap()).unwrap();
    assert_eq!(
        leaks["leak_stacks"].as_u64(),
        Some(leaks["leaks"].as_array().unwrap().len() as u64),
        "every stack listed"
    );
    Recording {
        leaks,
        exec_maps,
        pid: fixture.pid,
    }
}

fn fixture_cmd(exe: &Path, args: &[&str], preload: Option<&str>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(lib) = preload {
        cmd.env("LD_PRELOAD", Path::new("/usr/lib/x86_64-linux-gnu").join(lib));
    }
    cmd
}

/// What the checks found, kept so a failure shows every figure at once.
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn fail(&mut self, msg: String) {
        eprintln!("FAIL {msg}");
        self.failures.push(msg);
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }

    /// At least 95% of the live bytes have exactly one of `sites`' chains, and each site that
    /// must be seen (`min_site_share` of the live bytes matched to it) is.
    fn whole_stacks(&mut self, label: &str, rec: &Recording, sites: &[Site], own: &[&Path]) {
        let own: Vec<String> = own
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let leaks = rec.leaks["leaks"].as_array().unwrap();
        let total: u64 = leaks.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
        let mut per_site: BTreeMap<&str, u64> = BTreeMap::new();
        let mut unmatched: Vec<(u64, String)> = Vec::new();
        for l in leaks {
            let frames = frames_of(l);
            let bytes = l["bytes"].as_u64().unwrap();
            match sites.iter().find(|s| matches(&frames, s, &own)) {
                Some(s) => *per_site.entry(s.name).or_default() += bytes,
                None => unmatched.push((bytes, frames.iter().map(Fr::show).collect::<Vec<_>>().join(" <- "))),
            }
        }
        let matched: u64 = per_site.values().sum();
        let share = if total == 0 { 0.0 } else { matched as f64 / total as f64 };
        unmatched.sort_by_key(|u| std::cmp::Reverse(u.0));
        eprintln!(
            "{label}: {:.1}% of {total} live bytes with the expected chain ({} stacks, {} unmatched); per site {per_site:?}",
            share * 100.0,
            leaks.len(),
            unmatched.len()
        );
        if share < MIN_SHARE || total == 0 {
            let worst: Vec<String> = unmatched
                .iter()
                .take(5)
                .map(|(b, s)| format!("    {b} B: {s}"))
                .collect();
            self.fail(format!(
                "{label}: {:.1}% of {total} live bytes have the expected chain (need >= {:.0}%), {} distinct stacks; largest unmatched:\n{}",
                share * 100.0,
                MIN_SHARE * 100.0,
                leaks.len(),
                worst.join("\n")
            ));
        }
    }

    /// Every frame of every stack is in a file-backed executable mapping of the target.
    fn no_foreign_frames(&mut self, label: &str, rec: &Recording) {
        let mut bad = 0usize;
        let mut frames = 0usize;
        let mut example = None;
        for l in rec.leaks["leaks"].as_array().unwrap() {
            for f in l["frames"].as_array().unwrap() {
                frames += 1;
                let a = f["address"]
                    .as_str()
                    .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
                    .unwrap_or(0);
                if !rec.exec_maps.iter().any(|(s, e, _)| (*s..*e).contains(&a)) {
                    bad += 1;
                    example.get_or_insert_with(|| f.to_string());
                }
            }
        }
        if bad > 0 {
            self.fail(format!(
                "{label}: {bad} of {frames} frames are outside pid {}'s executable mappings (first: {})",
                rec.pid,
                example.unwrap()
            ));
        }
    }

    /// leaks.json's `unwind` counters, by name (absent: None).
    fn unwind_counters(rec: &Recording) -> Option<BTreeMap<&'static str, u64>> {
        let u = rec.leaks.get("unwind")?;
        let mut m = BTreeMap::new();
        for k in ["truncated_no_cfi", "truncated_bad_frame", "truncated_depth"] {
            m.insert(k, u.get(k)?.as_u64()?);
        }
        Some(m)
    }

    /// The truncation counters are present and zero.
    fn no_truncation(&mut self, label: &str, rec: &Recording) {
        match Self::unwind_counters(rec) {
            None => self.fail(format!("{label}: leaks.json has no `unwind` object with truncated_no_cfi, truncated_bad_frame, truncated_depth")),
            Some(c) if c.values().any(|v| *v > 0) => self.fail(format!("{label}: truncated stacks {c:?}")),
            Some(_) => {}
        }
    }

    /// Whole stacks, no foreign frame, no truncation.
    fn all(&mut self, label: &str, rec: &Recording, sites: &[Site], own: &[&Path]) {
        self.whole_stacks(label, rec, sites, own);
        self.no_foreign_frames(label, rec);
        self.no_truncation(label, rec);
    }
}

/// Runs `cmd()` at `--sampling full` and at the default sampling, with every check.
fn check_both_samplings(name: &str, cmd: impl Fn() -> Command, sites: &[Site], own: &[&Path]) {
    require_root();
    let mut checks = Checks::default();
    for sampling in [Some("full"), None] {
        let label = format!(
            "{name} ({})",
            sampling.map_or("default sampling".to_string(), |s| format!("--sampling {s}"))
        );
        let rec = record(cmd(), sampling);
        checks.all(&label, &rec, sites, own);
    }
    checks.finish();
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The control: the same C++ fixture built WITH frame pointers, which the frame-pointer walk
/// (with its CFI step for libstdc++'s `operator new`) already unwinds, at full and default
/// sampling: the same matcher finds >= 95% of the std::vector, std::unordered_map and `new`
/// sites' live bytes with exactly their chain, and no foreign frame. It shows that memscope's
/// output can meet these ground truths, and must keep passing (frame pointers are still used
/// where code has them). The std::string site is left out: its buffer is allocated by
/// libstdc++'s `_M_construct`, which has no frame pointer, so the walk stops there today.
/// Truncation counters are not read here.
#[test]
fn cxx_with_frame_pointers_control() {
    require_root();
    let exe = compile("c++", "unwind_cxx.cc", "unwind_cxx_fp", &["-fno-omit-frame-pointer"]);
    let sites: Vec<Site> = cxx_sites().into_iter().filter(|s| s.name != "std::string").collect();
    let mut checks = Checks::default();
    for sampling in [Some("full"), None] {
        let label = format!("C++ with frame pointers ({})", sampling.unwrap_or("default sampling"));
        let mut rec = record(fixture_cmd(&exe, &["1500"], None), sampling);
        checks.no_foreign_frames(&label, &rec);
        // The stacks of those sites: the ones holding their leaf function.
        let leaves = ["vector_leaf", "map_leaf", "object_leaf"];
        rec.leaks["leaks"]
            .as_array_mut()
            .unwrap()
            .retain(|l| frames_of(l).iter().any(|f| leaves.iter().any(|n| f.has(n))));
        checks.whole_stacks(&label, &rec, &sites, &[&exe]);
    }
    checks.finish();
}

/// C++ at -O2 without frame pointers, on glibc through libstdc++'s `operator new`: the
/// std::string, std::vector, std::unordered_map and plain `new` sites (3-5 calls below main
/// each) have exactly their chain for >= 95% of the live bytes, at full and default sampling;
/// no frame outside the executable mappings; no truncation counted.
#[test]
fn cxx_stacks_are_whole() {
    let exe = cxx_fixture();
    check_both_samplings(
        "C++ (glibc)",
        || fixture_cmd(&exe, &["1500"], None),
        &cxx_sites(),
        &[&exe],
    );
}

/// The same C++ fixture with Debian's jemalloc preloaded (jemalloc defines its own `operator
/// new`, and has no frame pointers either): the same chains.
#[test]
fn cxx_stacks_are_whole_with_jemalloc() {
    let exe = cxx_fixture();
    check_both_samplings(
        "C++ (jemalloc)",
        || fixture_cmd(&exe, &["1500"], Some("libjemalloc.so.2")),
        &cxx_sites(),
        &[&exe],
    );
}

/// C at -O2 without frame pointers: a chain with a tail call (tail_entry `jmp`s to
/// tail_callee, so its frame is absent, as gdb and heaptrack show it) and allocations in a
/// SIGUSR1 handler (handler <- signal frame <- libc's raise <- the fixture's caller <- main).
#[test]
fn c_tail_call_and_signal_handler_stacks() {
    let exe = c_fixture();
    check_both_samplings(
        "C tail call + signal",
        || fixture_cmd(&exe, &["basic", "4000"], None),
        &c_sites(),
        &[&exe],
    );
}

/// A PIE with both `.eh_frame` and a compressed `.debug_frame` (issue 19): the compressed
/// section no longer hides the `.eh_frame` (before, the file counted as without CFI and its
/// stacks had one frame): the same whole chains to `main` as the plain C fixture.
#[test]
fn compressed_debug_frame_keeps_eh_frame_stacks() {
    let exe = c_fixture_compressed_debug_frame();
    check_both_samplings(
        "C PIE with compressed .debug_frame",
        || fixture_cmd(&exe, &["basic", "4000"], None),
        &c_sites(),
        &[&exe],
    );
}

/// Four threads allocating three calls below their thread function: every stack ends at
/// glibc's start_thread (libc6-dbg names it).
#[test]
fn thread_stacks_reach_start_thread() {
    let exe = c_fixture();
    check_both_samplings(
        "C threads",
        || fixture_cmd(&exe, &["threads", "8000"], None),
        &thread_sites(),
        &[&exe],
    );
}

/// A Rust release binary (no frame pointers): Box and Vec allocations through `__rust_alloc`
/// in chains of #[inline(never)] functions reach the crate's main, then C main.
#[test]
fn rust_release_stacks() {
    let exe = rust_fixture();
    check_both_samplings(
        "Rust release",
        || fixture_cmd(&exe, &["3000"], None),
        &rust_sites(),
        &[&exe],
    );
}

/// A shared library dlopen()ed after memscope attached (the fixture loads it on "go"): its
/// allocations, three calls deep inside the library, have their whole chain through the
/// executable to main; dlopen's own allocations end in the executable's caller of dlopen.
#[test]
fn dlopen_after_attach_stacks() {
    let (exe, plugin) = dlopen_fixture();
    let plugin_arg = plugin.to_str().unwrap().to_string();
    check_both_samplings(
        "dlopen after attach",
        || fixture_cmd(&exe, &[&plugin_arg, "3000"], None),
        &dlopen_sites(),
        &[&exe, &plugin],
    );
}

/// The C fixture with no CFI at all (built without unwind tables, .eh_frame, .eh_frame_hdr
/// and .debug_frame removed) and no frame pointers: the stacks cannot be whole, and that must
/// show as counted truncations, never as garbage frames; the allocator's caller is still right.
#[test]
fn stacks_without_cfi_are_truncated_and_counted() {
    require_root();
    let exe = c_fixture_without_cfi();
    let rec = record(fixture_cmd(&exe, &["basic", "2000"], None), Some("full"));
    let mut checks = Checks::default();
    checks.no_foreign_frames("no CFI", &rec);
    match Checks::unwind_counters(&rec) {
        None => checks.fail(
            "no CFI: leaks.json has no `unwind` object with truncated_no_cfi, truncated_bad_frame, truncated_depth"
                .into(),
        ),
        Some(c) => {
            eprintln!("no CFI: unwind counters {c:?}, unwind object {}", rec.leaks["unwind"]);
            if c["truncated_no_cfi"] + c["truncated_bad_frame"] == 0 {
                checks.fail(format!("no CFI: nothing counted as truncated: {c:?}"));
            }
        }
    }
    let leaks = rec.leaks["leaks"].as_array().unwrap();
    let first = |f: &str| -> u64 {
        leaks
            .iter()
            .filter(|l| frames_of(l).first().is_some_and(|x| x.has(f)))
            .map(|l| l["bytes"].as_u64().unwrap())
            .sum()
    };
    // 2000 x 8 KiB (+0..7) from tail_leaf, 1000 x 4 KiB from signal_leaf.
    assert!(first("tail_leaf") >= 2000 * 8192, "tail_leaf: {} B", first("tail_leaf"));
    assert_eq!(first("signal_leaf"), 1000 * 4096);
    checks.finish();
}

/// heaptrack (libunwind, DWARF) on the same binaries reports exactly the chains these tests
/// hold as ground truth: the tail-calling frame absent, the signal frame inside libc, the
/// thread chains ending at start_thread, the C++ STL chains to main. This checks the tests'
/// expectations, not memscope.
#[test]
fn heaptrack_reports_the_ground_truth_chains() {
    let dir = tempfile::tempdir().unwrap();
    let (dlopen_exe, plugin) = dlopen_fixture();
    let plugin = plugin.to_str().unwrap().to_string();
    let cases: Vec<(PathBuf, Vec<&str>, Vec<Site>)> = vec![
        (c_fixture(), vec!["basic", "400"], c_sites()),
        (c_fixture(), vec!["threads", "400"], thread_sites()),
        (cxx_fixture(), vec!["200"], cxx_sites()),
        (rust_fixture(), vec!["300"], rust_sites()),
        (dlopen_exe, vec![&plugin, "300"], dlopen_sites()),
    ];
    for (i, (exe, args, sites)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("ht{i}"));
        let mut child = Command::new("heaptrack")
            .arg("-o")
            .arg(&out)
            .arg(&exe)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("heaptrack (`cargo xtask setup` installs it)");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        while !line.starts_with("ready") {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "heaptrack's fixture ended");
        }
        std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done");
        drop(stdin);
        assert!(child.wait().unwrap().success());
        let data = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("ht{i}.")))
            .expect("heaptrack data file");
        let folded = dir.path().join(format!("ht{i}.folded"));
        run(Command::new("heaptrack_print")
            .arg("-f")
            .arg(&data)
            .args(["--flamegraph-cost-type", "leaked", "-F"])
            .arg(&folded)
            .stdout(Stdio::null()));
        let text = std::fs::read_to_string(&folded).unwrap();
        let mut per_site: BTreeMap<&str, u64> = BTreeMap::new();
        let (mut total, mut matched) = (0u64, 0u64);
        let own: Vec<&str> = sites
            .iter()
            .flat_map(|s| s.chain.iter())
            .filter_map(|p| if let F(n) = p { Some(*n) } else { None })
            .collect();
        for l in text.lines() {
            let Some((stack, bytes)) = l.rsplit_once(' ') else {
                continue;
            };
            let bytes: u64 = bytes.parse().unwrap_or(0);
            // heaptrack's folded lines are outermost first, `function (file)`, with inlined
            // functions as frames of their own (the STL's, dropped here) and no addresses.
            let frames: Vec<Fr> = stack
                .split(';')
                .filter(|s| !s.is_empty())
                .rev()
                .map(|s| normalize(s.split(" (").next().unwrap()))
                .filter(|n| !is_runtime_name(n))
                .map(|n| Fr {
                    module: (!own.contains(&n.as_str())).then(|| NOT_THE_FIXTURE.to_string()),
                    names: vec![n],
                    address: 0,
                })
                .collect();
            if !frames
                .iter()
                .any(|f| f.names[0].starts_with("run_") || f.has("thread_main"))
            {
                continue; // start-up allocations of ld.so and libc
            }
            total += bytes;
            if let Some(s) = sites.iter().find(|s| matches(&frames, s, &[])) {
                matched += bytes;
                *per_site.entry(s.name).or_default() += bytes;
            }
        }
        eprintln!(
            "heaptrack {} {args:?}: {matched} of {total} leaked bytes matched, {per_site:?}",
            exe.display()
        );
        assert!(
            total > 0 && matched == total,
            "heaptrack on {args:?}: {matched} of {total} bytes match:\n{text}"
        );
        // Every site of the fixture's own code (not pthread_create's or dlopen's, left out above).
        let own_sites = sites
            .iter()
            .filter(|s| {
                s.chain
                    .iter()
                    .any(|p| matches!(p, F(n) if n.starts_with("run_") || *n == "thread_main"))
            })
            .count();
        assert_eq!(per_site.len(), own_sites, "every site seen by heaptrack: {per_site:?}");
    }
}

/// redis-server from Debian's package, started in `dir` on a Unix socket (no TCP port, no
/// persistence), under `wrapper` (e.g. heaptrack) when given; returns it once it accepts.
fn start_redis(dir: &Path, wrapper: &[&str]) -> (std::process::Child, PathBuf) {
    let sock = dir.join("redis.sock");
    let mut cmd = match wrapper.split_first() {
        Some((w, args)) => {
            let mut c = Command::new(w);
            c.args(args).arg("redis-server");
            c
        }
        None => Command::new("redis-server"),
    };
    let redis = cmd
        .args(["--port", "0", "--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--unixsocket")
        .arg(&sock)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (`cargo xtask setup` installs the Debian package)");
    let started = Instant::now();
    while !sock.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "redis-server did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (redis, sock)
}

/// The load: 60k SETs of new keys (random over 10M) with 512-byte values, pipelined; the live
/// heap grows with every SET.
fn redis_load(sock: &Path) {
    run(Command::new("redis-benchmark")
        .arg("-s")
        .arg(sock)
        .args([
            "-t", "set", "-n", "60000", "-r", "10000000", "-d", "512", "-P", "16", "-q",
        ])
        .stdout(Stdio::null()));
}

/// The named functions of a stack, innermost first: unnamed frames (redis's static functions:
/// Debian strips its symbol table, its dynamic symbols name the rest) and jemalloc's own frames
/// left out, and nothing past `main` (heaptrack stops there, a DWARF unwinder goes on to
/// `__libc_start_call_main` and `_start`), so that memscope's and heaptrack's stacks compare.
fn named_chain(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut chain: Vec<String> = names
        .filter(|n| !n.is_empty() && !n.starts_with("0x") && !n.starts_with("je_"))
        .collect();
    if let Some(i) = chain.iter().position(|n| n == "main") {
        chain.truncate(i + 1);
    }
    chain
}

/// heaptrack's stacks of the bytes redis-server still holds at its end, after the same load.
fn heaptrack_redis_chains() -> BTreeMap<Vec<String>, u64> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ht");
    let out_arg = out.to_str().unwrap().to_string();
    let (mut redis, sock) = start_redis(dir.path(), &["heaptrack", "-o", &out_arg]);
    redis_load(&sock);
    run(Command::new("redis-cli")
        .arg("-s")
        .arg(&sock)
        .args(["shutdown", "nosave"])
        .stdout(Stdio::null()));
    assert!(redis.wait().unwrap().success(), "heaptrack redis-server");
    let data = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("ht."))
        .expect("heaptrack data file");
    let folded = dir.path().join("folded");
    run(Command::new("heaptrack_print")
        .arg("-f")
        .arg(&data)
        .args(["--flamegraph-cost-type", "leaked", "-F"])
        .arg(&folded)
        .stdout(Stdio::null()));
    let mut chains = BTreeMap::new();
    for l in std::fs::read_to_string(&folded).unwrap().lines() {
        let Some((stack, bytes)) = l.rsplit_once(' ') else {
            continue;
        };
        let frames = stack
            .split(';')
            .filter(|s| !s.is_empty())
            .rev()
            .map(|s| normalize(s.split(" (").next().unwrap()));
        *chains.entry(named_chain(frames)).or_default() += bytes.parse::<u64>().unwrap_or(0);
    }
    chains
}

/// redis-server from Debian's package (no frame pointers, Debian's jemalloc) under
/// redis-benchmark's SET load with random keys, at full and default sampling: >= 95% of the
/// live bytes recorded have a stack that reaches redis's `main` (main <- aeMain <- ... <-
/// readQueryFromClient <- processInputBuffer <- ... <- zmalloc, ten or more frames), or
/// `start_thread` for its background threads; >= 90% of them have a chain of named functions
/// that heaptrack also reports for the same load (its stacks are the reference); no frame
/// outside its executable mappings; no truncation counted.
#[test]
fn debian_redis_stacks_reach_main() {
    require_root();
    let reference = heaptrack_redis_chains();
    let ht_total: u64 = reference.values().sum();
    let ht_main: u64 = reference
        .iter()
        .filter(|(c, _)| c.iter().any(|f| f == "main"))
        .map(|(_, b)| b)
        .sum();
    eprintln!(
        "heaptrack on redis-server: {:.1}% of {ht_total} leaked bytes reach main; largest: {:?}",
        100.0 * ht_main as f64 / ht_total.max(1) as f64,
        reference.iter().max_by_key(|(_, b)| **b).map(|(c, _)| c.join(" <- "))
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut redis, sock) = start_redis(dir.path(), &[]);
    let pid = redis.id();
    let mut checks = Checks::default();
    for sampling in [Some("full"), None] {
        let label = format!("redis-server ({})", sampling.unwrap_or("default sampling"));
        let out = tempfile::tempdir().unwrap();
        let mut extra = vec!["--min-age", "0s", "--json-top", "1000000", "--max-stacks", "131072"];
        if let Some(s) = sampling {
            extra.extend(["--sampling", s]);
        }
        let mut child = spawn_record(pid, out.path(), &extra);
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        while !log.contains("attached") {
            let before = log.len();
            stderr.read_line(&mut log).unwrap();
            assert!(log.len() > before, "memscope ended before attaching: {log}");
        }
        redis_load(&sock);
        let exec_maps = exec_mappings(pid);
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0), "{log}");
        let leaks: Value = serde_json::from_slice(&std::fs::read(out.path().join("leaks.json")).unwrap()).unwrap();
        let rec = Recording { leaks, exec_maps, pid };
        let list = rec.leaks["leaks"].as_array().unwrap();
        let bytes = |l: &Value| l["bytes"].as_u64().unwrap();
        let total: u64 = list.iter().map(bytes).sum();
        let reach = |l: &&Value| frames_of(l).iter().any(|f| f.has("main") || f.has("start_thread"));
        let reached: u64 = list.iter().filter(reach).map(bytes).sum();
        let depth: Vec<usize> = list.iter().filter(reach).map(|l| frames_of(l).len()).collect();
        let chain_of = |l: &Value| {
            let frames: Vec<Fr> = frames_of(l)
                .into_iter()
                .skip_while(|f| f.module.as_deref().is_some_and(|m| m.starts_with("libjemalloc")))
                .collect();
            named_chain(frames.into_iter().map(|f| f.names.last().cloned().unwrap_or_default()))
        };
        let agreed: u64 = list
            .iter()
            .filter(|l| reference.contains_key(&chain_of(l)))
            .map(bytes)
            .sum();
        let share = reached as f64 / total.max(1) as f64;
        let agree = agreed as f64 / total.max(1) as f64;
        eprintln!(
            "{label}: {:.1}% of {total} live bytes reach main/start_thread ({} stacks; reaching ones {}..{} frames deep); {:.1}% have a chain heaptrack reports",
            share * 100.0,
            list.len(),
            depth.iter().min().unwrap_or(&0),
            depth.iter().max().unwrap_or(&0),
            agree * 100.0,
        );
        let biggest = list
            .first()
            .map(|l| frames_of(l).iter().map(Fr::show).collect::<Vec<_>>().join(" <- "));
        if total < 1 << 20 || share < MIN_SHARE {
            checks.fail(format!(
                "{label}: {:.1}% of {total} live bytes reach main (need >= 95% of >= 1 MiB); largest stack: {biggest:?}",
                share * 100.0
            ));
        }
        if agree < 0.90 {
            checks.fail(format!(
                "{label}: {:.1}% of the live bytes have a chain heaptrack reports (need >= 90%); largest stack: {biggest:?}",
                agree * 100.0
            ));
        }
        checks.no_foreign_frames(&label, &rec);
        checks.no_truncation(&label, &rec);
    }
    let _ = redis.kill();
    let _ = redis.wait();
    checks.finish();
}

/// Two processes of one binary traced as the agent traces them (one attacher): the second adds
/// no rows to the agent's shared unwind map (libc's, ld.so's and the binary's tables are
/// placed once), and both get whole stacks from it.
#[test]
fn agent_targets_share_unwind_rows() {
    use profiler_user::{bpf::load::ProbeSettings, session::EbpfAttacher, target::Attacher};
    require_root();
    let exe = c_fixture();
    let attacher = EbpfAttacher::new(ProbeSettings::default(), None);
    let mut a = Fixture::spawn(fixture_cmd(&exe, &["basic", "400"], None));
    let mut b = Fixture::spawn(fixture_cmd(&exe, &["basic", "400"], None));
    let ta = attacher.attach(a.pid).unwrap();
    let (after_one, capacity, _) = attacher.shared_rows_usage().expect("a shared row map");
    assert!(after_one > 1000 && after_one < capacity, "{after_one} rows of {capacity}");
    let tb = attacher.attach(b.pid).unwrap();
    assert_eq!(attacher.shared_rows_usage().unwrap().0, after_one, "the second target added rows");
    a.go();
    b.go();
    for t in [&ta, &tb] {
        let tables = t.stats().unwind_tables.expect("unwind tables");
        assert!(tables.shared_map && tables.files >= 3, "{tables:?}");
        let p = t.snapshot(std::time::Duration::ZERO).unwrap();
        let whole: u64 = p
            .stacks
            .iter()
            .filter(|s| {
                let names: Vec<&str> = s.frames.iter().filter_map(|f| f.function.as_deref()).collect();
                names.first() == Some(&"tail_leaf") && names.contains(&"run_tail") && names.contains(&"main")
            })
            .map(|s| s.live_bytes)
            .sum();
        assert!(whole >= 400 * 8192, "pid {}: {whole} bytes under tail_leaf <- .. <- main", t.pid());
        assert_eq!(p.unwind["truncated_no_cfi"] + p.unwind["truncated_bad_frame"], 0, "{:?}", p.unwind);
    }
    drop(ta);
    drop(tb);
}

/// Code whose CFI is only in `.debug_frame` (built with -fno-asynchronous-unwind-tables -g; the
/// crt objects keep theirs in `.eh_frame`), then the same binary stripped of `.debug_frame`
/// with its debug file installed under /usr/lib/debug/.build-id (as Debian's -dbgsym packages
/// do): whole stacks from either, no truncation.
#[test]
fn debug_frame_and_debug_files_give_whole_stacks() {
    require_root();
    let exe = compile(
        "cc",
        "unwind_c.c",
        "unwind_c_debug_frame",
        &["-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-Wl,--build-id"],
    );
    let sections = |exe: &Path| String::from_utf8(Command::new("readelf").arg("-SW").arg(exe).output().unwrap().stdout).unwrap();
    assert!(sections(&exe).contains(".debug_frame"), "{}", sections(&exe));
    let mut checks = Checks::default();
    let rec = record(fixture_cmd(&exe, &["basic", "2000"], None), Some("full"));
    checks.all("CFI in .debug_frame", &rec, &c_sites(), &[&exe]);

    // Split: the binary keeps its symbols, the debug file gets .debug_frame.
    let stripped = out_path("unwind_c_split");
    let debug = out_path("unwind_c_split.debug");
    run(Command::new("objcopy").arg("--only-keep-debug").arg(&exe).arg(&debug));
    run(Command::new("objcopy").args(["--remove-section", ".debug_frame"]).arg(&exe).arg(&stripped));
    assert!(!sections(&stripped).contains(".debug_frame"));
    let notes = String::from_utf8(Command::new("readelf").arg("-n").arg(&stripped).output().unwrap().stdout).unwrap();
    let id = notes.split("Build ID: ").nth(1).and_then(|s| s.split_whitespace().next()).expect("a build id").to_string();
    let dir = Path::new("/usr/lib/debug/.build-id").join(&id[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    let installed = dir.join(format!("{}.debug", &id[2..]));
    std::fs::copy(&debug, &installed).unwrap();
    let rec = record(fixture_cmd(&stripped, &["basic", "2000"], None), Some("full"));
    let _ = std::fs::remove_file(&installed);
    checks.all("CFI in the debug file", &rec, &c_sites(), &[&stripped]);
    checks.finish();
}

/// Functions inlined at an allocation's return address are frames of their own, innermost
/// first, marked `"inlined": true`, with the same names and lines as binutils' `addr2line -i`
/// gives for that address.
#[test]
fn inlined_functions_are_frames_of_their_own() {
    require_root();
    let exe = compile("cc", "unwind_inline.c", "unwind_inline", &[]);
    let rec = record(fixture_cmd(&exe, &[], None), Some("full"));
    let leak = rec.leaks["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["frames"][0]["function"] == "inner_inl")
        .unwrap_or_else(|| panic!("no stack starts at inner_inl: {}", rec.leaks["leaks"]));
    assert_eq!(leak["allocs"].as_u64(), Some(1000));
    let frames = leak["frames"].as_array().unwrap();
    let got: Vec<(String, u64, bool)> = frames[..3]
        .iter()
        .map(|f| (f["function"].as_str().unwrap().to_string(), f["line"].as_u64().unwrap_or(0), f["inlined"] == true))
        .collect();
    assert_eq!(frames[3]["function"], "main", "{frames:?}");
    // addr2line on the file address of the call (the return address - 1).
    let address = parse_address(&frames[0]);
    // gcc's PIE layout: the code segment is mapped from file offset 0x1000 at vaddr 0x1000.
    let (start, _, _) = rec.exec_maps.iter().find(|(s, e, _)| (*s..*e).contains(&address)).expect("an executable mapping");
    let offset = 0x1000;
    let text = String::from_utf8(
        Command::new("addr2line")
            .args(["-i", "-f", "-e"])
            .arg(&exe)
            .arg(format!("{:x}", address - start + offset - 1))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let expected: Vec<(String, u64, bool)> = lines
        .chunks(2)
        .enumerate()
        .map(|(i, c)| {
            let line = c[1].rsplit(':').next().and_then(|l| l.split_whitespace().next()).and_then(|l| l.parse().ok()).unwrap_or(0);
            (c[0].to_string(), line, i + 1 < lines.len() / 2)
        })
        .collect();
    assert_eq!(got, expected, "addr2line says:\n{text}");
}
