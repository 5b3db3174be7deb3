//! The target's executable file mappings with each file's GNU build id, as pprof `Mapping`
//! rows want them (start, limit, file offset, file name, build id), so that a backend
//! (Pyroscope, Parca, `go tool pprof` with a symbol server) can symbolize by itself.
//!
//! Read at snapshot time from `/proc/PID/maps`; each file is opened through the target's root
//! (`procfs::mapped_file`) and only its ELF notes are parsed. Files larger than 4 GiB are not
//! opened; a file that cannot be read gets no build id.
use std::{collections::HashMap, fs::File};

use crate::{aggregate::ModuleMapping, procfs};

/// The executable mappings of `pid`, in address order; empty when the process is gone.
pub fn executable_mappings(pid: u32) -> Vec<ModuleMapping> {
    let Ok(maps) = procfs::maps(pid) else { return Vec::new() };
    let mut ids: HashMap<(u64, u64), Option<String>> = HashMap::new();
    maps.iter()
        .filter(|m| m.executable && m.is_file())
        .map(|m| {
            let build_id = ids.entry((m.dev, m.inode)).or_insert_with(|| procfs::mapped_file(pid, m).ok().and_then(|f| build_id(&f))).clone();
            ModuleMapping {
                start: m.start,
                limit: m.end,
                file_offset: m.offset,
                path: procfs::without_deleted(m.path.as_deref().unwrap_or_default()).to_string(),
                build_id,
            }
        })
        .collect()
}

/// The GNU build id of an ELF file, in hex.
pub fn build_id(path: &std::path::Path) -> Option<String> {
    use object::Object as _;
    let file = File::open(path).ok()?;
    if file.metadata().ok()?.len() > 4 << 30 {
        return None;
    }
    // SAFETY: read-only private mapping; a file truncated meanwhile faults the read, which
    // `crate::truncation_guard` answers with zeros (as for the symbolizer's mappings).
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*map).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's own mappings: its executable is there with the build id the linker
    /// wrote (Debian's gcc and rustc both emit one).
    #[test]
    fn own_mappings_have_build_ids() {
        let maps = executable_mappings(std::process::id());
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let me = maps.iter().find(|m| m.path == exe.to_str().unwrap()).expect("own executable mapped");
        assert!(me.limit > me.start);
        let libc = maps.iter().find(|m| m.path.contains("libc.so")).expect("libc mapped");
        assert!(libc.build_id.as_ref().is_some_and(|b| b.len() >= 32 && b.bytes().all(|c| c.is_ascii_hexdigit())), "{libc:?}");
        assert!(executable_mappings(u32::MAX - 1).is_empty());
    }
}
