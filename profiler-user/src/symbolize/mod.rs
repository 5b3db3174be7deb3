//! Symbolization: return addresses of a target -> function, `file:line`, module. Batched per
//! module and cached per process (addresses are stable while the mappings are), using blazesym
//! on the module files kept open by [`modules`]. Frames that cannot be named keep their module
//! and file offset.
pub mod modules;
pub mod perf_map;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use blazesym::symbolize::{source::{Elf, Source}, Input, Symbolized, Symbolizer as Blaze};

use crate::{
    aggregate::{Frame, FrameInfo},
    process::Process,
};
use modules::{Modules, Place};
use perf_map::PerfMap;

thread_local! {
    // blazesym's symbolizer is not Send; each thread keeps its own, with its parsed-file cache
    // (keyed by path and file identity, so a reused /proc/self/fd number cannot fool it).
    static BLAZE: Blaze = Blaze::builder().enable_inlined_fns(false).enable_code_info(true).build();
}

pub struct Symbolizer {
    /// Names shared by every frame that carries them.
    names: HashSet<Arc<str>>,
    modules: Modules,
    /// JIT code names, for addresses outside any file (Node.js with --perf-basic-prof).
    jit: PerfMap,
    cache: HashMap<u64, Frame>,
}

impl Symbolizer {
    pub fn new(pid: u32) -> Symbolizer {
        Symbolizer::with(Modules::new(pid), PerfMap::for_pid(pid))
    }

    /// For a process held by identity: nothing is read once its pid names another process.
    pub fn for_process(process: Arc<Process>) -> Symbolizer {
        Symbolizer::with(Modules::for_process(process.clone()), PerfMap::for_process(process))
    }

    fn with(mut modules: Modules, jit: PerfMap) -> Symbolizer {
        modules.refresh();
        Symbolizer { names: HashSet::new(), modules, jit, cache: HashMap::new() }
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
                    by_module
                        .entry(module.path.clone())
                        .or_insert_with(|| (module.open_path.clone(), Vec::new()))
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
            let src = Source::Elf(Elf::new(open_path));
            let results = BLAZE
                .with(|b| b.symbolize(&src, Input::FileOffset(&offsets)).map(|r| r.into_iter().map(named).collect::<Vec<_>>()))
                .unwrap_or_default();
            let module = intern(&mut self.names, &module);
            for (i, &(addr, off)) in items.iter().enumerate() {
                let mut frame = FrameInfo {
                    address: addr,
                    module: Some(module.clone()),
                    module_offset: Some(off),
                    ..Default::default()
                };
                if let Some(Some((function, file, line))) = results.get(i) {
                    frame.function = Some(intern(&mut self.names, function));
                    frame.file = file.as_deref().map(|f| intern(&mut self.names, f));
                    frame.line = *line;
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

/// Function name, source file and line of a symbolized address.
fn named(s: Symbolized<'_>) -> Option<(String, Option<String>, Option<u32>)> {
    let Symbolized::Sym(sym) = s else { return None };
    let (file, line) = match &sym.code_info {
        Some(ci) => {
            let file = match &ci.dir {
                Some(dir) => dir.join(&*ci.file).to_string_lossy().into_owned(),
                None => ci.file.to_string_lossy().into_owned(),
            };
            (Some(file), ci.line)
        }
        None => (None, None),
    };
    Some((sym.name.to_string(), file, line))
}
