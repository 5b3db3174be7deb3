//! Symbolization: return addresses of a target -> function, `file:line`, module. Batched per
//! module and cached per process (addresses are stable while the mappings are), using blazesym
//! on the module files kept open by [`modules`]. Frames that cannot be named keep their module
//! and file offset.
//!
//! JIT frames are named twice: [`Symbolizer::pin_jit`] names the JIT frames of each new stack
//! soon after it was recorded (the session calls it periodically) and keeps that name for that
//! (stack, address); a snapshot uses the pinned name, and looks the perf map up only for frames
//! that were not pinned. V8 frees code and reuses its memory: a name looked up only when a
//! snapshot is read can belong to code that was written there later.
//!
//! JavaScript frames of a Node.js target started without flags are named from V8's heap
//! ([`v8`]): the probes keep each V8 frame's function (its `SharedFunctionInfo`), and
//! [`Symbolizer::pin_jit`] reads its name, script and line at the same time as the JIT names,
//! pinned per (stack, frame position): two frames of one stack can return to the same
//! interpreter address for two different functions. A name from the perf map, when the target
//! writes one, wins; frames that could not be named are counted ([`v8::JsNameStats`]).
pub mod mappings;
pub mod modules;
pub mod perf_map;
pub mod v8;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use blazesym::symbolize::{source::{Elf, Source}, Input, Symbolized, Symbolizer as Blaze};

use profiler_common::StackKey;

use crate::{
    aggregate::{Frame, FrameInfo},
    bpf::reader::RawStack,
    process::Process,
};
use modules::{Modules, Place};
use perf_map::PerfMap;

/// blazesym's symbolizer with its cache of parsed files lives on one thread of its own
/// (blazesym's symbolizer is not Send), which every snapshot asks. One per thread that
/// symbolizes (a per-thread cache) held a parse of the same files (libc's DWARF: tens of MiB)
/// on each of the runtime's up to 16 blocking threads: the agent's RSS grew with every thread
/// that ever rendered a profile. Its cache is keyed by path and file identity, so a reused
/// /proc/self/fd number cannot fool it.
type Job = Box<dyn FnOnce(&mut (Blaze, u64)) + Send>;
static WORKER: std::sync::OnceLock<std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>> = std::sync::OnceLock::new();

fn new_blaze() -> Blaze {
    Blaze::builder().enable_inlined_fns(true).enable_code_info(true).build()
}

fn worker() -> Option<std::sync::mpsc::Sender<Job>> {
    let cell = WORKER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("symbolize".into()).spawn(move || {
            // The symbolizer, and how far it applied the list of closed files (see `forget`).
            let mut state = (new_blaze(), 0u64);
            for job in rx {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut state)));
                if caught.is_err() {
                    tracing::warn!("symbolizing panicked; the symbolizer starts afresh");
                    state = (new_blaze(), 0);
                }
            }
        });
        match spawned {
            Ok(_) => std::sync::Mutex::new(Some(tx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the symbolizer's thread: frames stay unnamed");
                std::sync::Mutex::new(None)
            }
        }
    });
    cell.lock().unwrap().clone()
}

/// Paths (`/proc/self/fd/N`) of modules closed since the start, the oldest dropped past
/// [`MAX_CLOSED`]: `(number of the first one kept, paths)`. blazesym keeps what it parsed of a
/// file for as long as its symbolizer lives, and one per thread lives as long as the agent: a
/// closed module's parsed symbols and DWARF (and its file, held open) would stay, a leak with
/// every process that exits, and the fd number reused by the next file would keep the old
/// one's parse alive too. The symbolizer's thread evicts these paths before its next job.
static CLOSED: std::sync::Mutex<(u64, std::collections::VecDeque<std::path::PathBuf>)> =
    std::sync::Mutex::new((0, std::collections::VecDeque::new()));
/// Closed paths remembered; a symbolizer that fell further behind starts afresh.
const MAX_CLOSED: usize = 4096;

/// The module read through `open_path` was closed: the symbolizer drops what it parsed of it.
pub(crate) fn forget(open_path: &std::path::Path) {
    let mut closed = CLOSED.lock().unwrap();
    closed.1.push_back(open_path.to_owned());
    if closed.1.len() > MAX_CLOSED {
        closed.1.pop_front();
        closed.0 += 1;
    }
}

/// Runs `f` on the symbolizer's thread, after evicting the modules closed since its last job;
/// `None` when that thread is not there.
fn with_blaze<R: Send + 'static>(f: impl FnOnce(&Blaze) -> R + Send + 'static) -> Option<R> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let job: Job = Box::new(move |b: &mut (Blaze, u64)| {
        {
            let closed = CLOSED.lock().unwrap();
            let end = closed.0 + closed.1.len() as u64;
            if b.1 < closed.0 {
                *b = (new_blaze(), end);
            } else {
                for path in closed.1.iter().skip((b.1 - closed.0) as usize) {
                    let _ = b.0.evict(&blazesym::symbolize::evict::Evict::Elf(blazesym::symbolize::evict::Elf::new(path.clone())));
                }
                b.1 = end;
            }
        }
        let _ = reply.send(f(&b.0));
    });
    worker()?.send(job).ok()?;
    answer.recv().ok()
}

pub struct Symbolizer {
    /// Names shared by every frame that carries them.
    names: HashSet<Arc<str>>,
    modules: Modules,
    /// JIT code names, for addresses outside any file (Node.js with --perf-basic-prof).
    jit: PerfMap,
    cache: HashMap<u64, Frame>,
    /// JIT frames named when their stack was new, by (stack, return address).
    pinned: HashMap<(StackKey, u64), Frame>,
    /// Stacks whose JIT frames are all pinned (or that have none), and attempts for the others.
    pinned_stacks: HashSet<StackKey>,
    pin_attempts: HashMap<StackKey, u8>,
    /// JavaScript frames named from V8's heap, by (stack, position in its return addresses).
    pinned_js: HashMap<(StackKey, usize), Frame>,
    js: Option<JsFrames>,
}

/// What names a V8 target's JavaScript frames.
struct JsFrames {
    /// `None` once its reader was lost (a read blocked past its deadline) or when the layout
    /// could not be read.
    namer: Option<v8::JsNamer<Arc<std::fs::File>>>,
    /// Stacks whose JavaScript frames were named (or counted unnamed) already.
    done: HashSet<StackKey>,
    stats: v8::JsNameStats,
}

/// Attempts to name a stack's JIT frames (the perf map line may not be written yet).
const PIN_ATTEMPTS: u8 = 8;

impl Symbolizer {
    pub fn new(pid: u32) -> Symbolizer {
        Symbolizer::with(Modules::new(pid), PerfMap::for_pid(pid))
    }

    /// For a process held by identity: nothing is read once its pid names another process.
    /// What it keeps of the target's perf map, and an estimate of what blazesym keeps of its
    /// modules' symbols ([`modules`]), are charged to `budget` (the target's account).
    pub fn for_process(process: Arc<Process>, budget: Arc<crate::budget::Account>) -> Symbolizer {
        Symbolizer::with(Modules::for_process(process.clone(), budget.clone()), PerfMap::for_process(process, budget))
    }

    fn with(mut modules: Modules, jit: PerfMap) -> Symbolizer {
        modules.refresh();
        Symbolizer {
            names: HashSet::new(),
            modules,
            jit,
            cache: HashMap::new(),
            pinned: HashMap::new(),
            pinned_stacks: HashSet::new(),
            pin_attempts: HashMap::new(),
            pinned_js: HashMap::new(),
            js: None,
        }
    }

    /// Names this target's JavaScript frames from its V8 heap with `namer` (see [`v8`]).
    pub fn enable_js(&mut self, namer: v8::JsNamer<Arc<std::fs::File>>) {
        self.js = Some(JsFrames { namer: Some(namer), done: HashSet::new(), stats: Default::default() });
    }

    /// A V8 target whose layout could not be read: its JavaScript frames are counted unnamed,
    /// and `error` says why.
    pub fn js_unavailable(&mut self, error: String) {
        let stats = v8::JsNameStats { layout_error: Some(error), ..Default::default() };
        self.js = Some(JsFrames { namer: None, done: HashSet::new(), stats });
    }

    /// JavaScript frames named and unnamed since attach (a V8 target only).
    pub fn js_stats(&self) -> Option<v8::JsNameStats> {
        self.js.as_ref().map(|j| j.stats.clone())
    }

    /// Whether there is anything to pin: a perf map, or JavaScript frames to name.
    pub fn pins(&self) -> bool {
        self.js.is_some() || self.has_jit()
    }

    /// The frame pinned for position `index` (address `addr`) of stack `key`: its JavaScript
    /// name, else its perf-map name.
    pub fn pinned_at(&self, key: &StackKey, index: usize, addr: u64) -> Option<&Frame> {
        self.pinned.get(&(*key, addr)).or_else(|| self.pinned_js.get(&(*key, index)))
    }

    /// Names the JavaScript frames of `stacks` not named yet: one batch of reads of the
    /// target's memory on a worker, with a deadline.
    fn pin_js(&mut self, stacks: &[RawStack]) {
        let Some(js) = self.js.as_mut() else { return };
        let mut work: Vec<(StackKey, usize, u64, u64)> = Vec::new();
        for s in stacks {
            if s.js.is_empty() || !js.done.insert(s.key) {
                continue;
            }
            for (i, (addr, f)) in s.return_frames().into_iter().enumerate() {
                if f != 0 {
                    work.push((s.key, i, f, addr));
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let unnamed = |js: &mut JsFrames, why: v8::Unnamed, n: u64| {
            *js.stats.unnamed.entry(why.name().to_string()).or_default() += n;
        };
        let Some(mut namer) = js.namer.take() else {
            let why = if js.stats.layout_error.is_some() { v8::Unnamed::NoLayout } else { v8::Unnamed::TimedOut };
            unnamed(js, why, work.len() as u64);
            return;
        };
        let mut sfis: Vec<u64> = work.iter().map(|w| w.2).collect();
        sfis.sort_unstable();
        sfis.dedup();
        let named = crate::target_mem::with_deadline("naming JavaScript frames", crate::target_mem::DEADLINE, move || {
            namer.new_batch();
            let names: HashMap<u64, Result<v8::JsName, v8::Unnamed>> = sfis.iter().map(|&f| (f, namer.name(f))).collect();
            Ok((namer, names))
        });
        let names = match named {
            Ok((namer, names)) => {
                js.namer = Some(namer);
                names
            }
            Err(e) => {
                tracing::warn!("JavaScript frames left unnamed: {e}");
                unnamed(js, v8::Unnamed::TimedOut, work.len() as u64);
                return;
            }
        };
        for (key, i, f, address) in work {
            match names.get(&f) {
                Some(Ok(n)) => {
                    js.stats.named += 1;
                    let frame = FrameInfo {
                        function: Some(intern(&mut self.names, &n.function)),
                        file: n.script.as_deref().map(|f| intern(&mut self.names, f)),
                        line: n.line,
                        module: Some(intern(&mut self.names, "[js]")),
                        address,
                        ..Default::default()
                    };
                    self.pinned_js.insert((key, i), frame.into());
                }
                Some(Err(why)) => unnamed(js, *why, 1),
                None => unnamed(js, v8::Unnamed::Unreadable, 1),
            }
        }
    }

    /// Whether the target writes a perf map (only then is there JIT code to pin).
    pub fn has_jit(&self) -> bool {
        self.jit.present()
    }

    /// Stacks already pinned: [`crate::bpf::reader::new_stacks`] skips them.
    pub fn pinned_stacks(&self) -> &HashSet<StackKey> {
        &self.pinned_stacks
    }

    /// Names the JIT frames of `stacks` against the perf map as it is now, and keeps each name
    /// for its (stack, address).
    pub fn pin_jit(&mut self, stacks: &[RawStack]) {
        if stacks.is_empty() {
            return;
        }
        self.pin_js(stacks);
        if !self.has_jit() {
            for s in stacks {
                self.pinned_stacks.insert(s.key);
            }
            return;
        }
        if self.modules.refresh() {
            self.cache.clear();
        }
        self.jit.refresh();
        for s in stacks {
            let mut missing = false;
            for addr in s.return_addresses() {
                if !matches!(self.modules.place(addr), Place::Anonymous) || self.pinned.contains_key(&(s.key, addr)) {
                    continue;
                }
                match self.jit.lookup(addr) {
                    Some(frame) => {
                        self.pinned.insert((s.key, addr), frame);
                    }
                    None => missing = true,
                }
            }
            let tries = self.pin_attempts.entry(s.key).or_insert(0);
            *tries += 1;
            if !missing || *tries >= PIN_ATTEMPTS {
                self.pin_attempts.remove(&s.key);
                self.pinned_stacks.insert(s.key);
            }
        }
    }

    /// The name pinned for `addr` in stack `key`, if any.
    pub fn pinned(&self, key: &StackKey, addr: u64) -> Option<&Frame> {
        self.pinned.get(&(*key, addr))
    }

    /// Names every address (all are return addresses: the call is the byte before).
    pub fn symbolize(&mut self, addrs: &[u64]) -> HashMap<u64, Frame> {
        if self.modules.refresh() {
            self.cache.clear();
        }
        self.jit.refresh();
        let mut jit_frames: HashMap<u64, Frame> = HashMap::new();
        // module path -> (open path, [(addr, file offset)])
        let mut by_module: HashMap<String, (std::path::PathBuf, Vec<(u64, u64)>)> = HashMap::new();
        for &addr in addrs {
            if self.cache.contains_key(&addr) {
                continue;
            }
            match self.modules.place(addr) {
                Place::File { module, file_offset } => {
                    // Symbols the memory budget refused: module and offset only.
                    let open_path = if module.symbols { module.open_path.clone() } else { std::path::PathBuf::new() };
                    by_module
                        .entry(module.path.clone())
                        .or_insert_with(|| (open_path, Vec::new()))
                        .1
                        .push((addr, file_offset));
                }
                Place::Anonymous => {
                    // JIT code can be replaced: never cached.
                    let frame = self.jit.lookup(addr).unwrap_or_else(|| FrameInfo { address: addr, ..Default::default() }.into());
                    jit_frames.insert(addr, frame);
                }
            }
        }
        for (module, (open_path, items)) in by_module {
            let offsets: Vec<u64> = items.iter().map(|&(_, off)| off.saturating_sub(1)).collect();
            // An empty path: the module's symbols were refused by the memory budget.
            let results = if open_path.as_os_str().is_empty() {
                Vec::new()
            } else {
                with_blaze(move |b| {
                    let src = Source::Elf(Elf::new(open_path));
                    b.symbolize(&src, Input::FileOffset(&offsets)).map(|r| r.into_iter().map(named).collect::<Vec<_>>()).unwrap_or_default()
                })
                .unwrap_or_default()
            };
            let module = intern(&mut self.names, &module);
            for (i, &(addr, off)) in items.iter().enumerate() {
                let mut frame = FrameInfo {
                    address: addr,
                    module: Some(module.clone()),
                    module_offset: Some(off),
                    ..Default::default()
                };
                if let Some(Some(named)) = results.get(i) {
                    let ((function, file, line), inlined) = named.split_last().expect("one at least");
                    frame.function = Some(intern(&mut self.names, function));
                    frame.file = file.as_deref().map(|f| intern(&mut self.names, f));
                    frame.line = *line;
                    frame.inlined_frames = inlined
                        .iter()
                        .map(|(function, file, line)| {
                            FrameInfo {
                                function: Some(intern(&mut self.names, function)),
                                file: file.as_deref().map(|f| intern(&mut self.names, f)),
                                line: *line,
                                inlined: true,
                                ..frame.clone()
                            }
                            .into()
                        })
                        .collect();
                }
                self.cache.insert(addr, frame.into());
            }
        }
        addrs
            .iter()
            .filter_map(|a| jit_frames.remove(a).or_else(|| self.cache.get(a).cloned()).map(|f| (*a, f)))
            .collect()
    }
}

fn intern(names: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(known) = names.get(s) {
        return known.clone();
    }
    let new: Arc<str> = s.into();
    names.insert(new.clone());
    new
}

/// A function name, its source file and line.
type Named = (String, Option<String>, Option<u32>);

/// Function name, source file and line of a symbolized address, for the functions inlined there
/// (innermost first) and last for the function holding it. Each location is the one inside that
/// function (blazesym moves the call sites up a level).
fn named(s: Symbolized<'_>) -> Option<Vec<Named>> {
    let Symbolized::Sym(sym) = s else { return None };
    let place = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| match ci {
        Some(ci) => {
            let file = match &ci.dir {
                Some(dir) => dir.join(&*ci.file).to_string_lossy().into_owned(),
                None => ci.file.to_string_lossy().into_owned(),
            };
            (Some(file), ci.line)
        }
        None => (None, None),
    };
    let mut frames: Vec<_> = sym
        .inlined
        .iter()
        .rev()
        .map(|f| {
            let (file, line) = place(f.code_info.as_ref());
            (f.name.to_string(), file, line)
        })
        .collect();
    let (file, line) = place(sym.code_info.as_deref());
    frames.push((sym.name.to_string(), file, line));
    Some(frames)
}
