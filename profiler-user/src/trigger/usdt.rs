//! USDT probes (SystemTap/DTrace style, `<sys/sdt.h>`): reading the `.note.stapsdt` notes of
//! an ELF file, finding a `provider:name` probe in a running target (its executable and every
//! mapped library), and enabling the probe's semaphore while memscope watches it.
//!
//! Each note (owner `stapsdt`, type 3) holds three addresses (the probe site `pc`, the link-time
//! address of the `.stapsdt.base` section, the semaphore or 0) and three strings (provider,
//! name, argument description). When the file was prelinked, `.stapsdt.base` moved and `pc`
//! moves with it (as libbpf does). The site is a `nop`; a uprobe at its file offset fires each
//! time it is reached.
//!
//! A probe with a semaphore is guarded in the program by `if (semaphore)`: the site is never
//! reached while the semaphore is 0. [`Semaphore`] increments it through `/proc/PID/mem` when
//! created and decrements it when dropped (needs ptrace access to the target: root or
//! CAP_SYS_PTRACE). The increment is a read-modify-write from outside, not atomic against
//! another tracer doing the same at the same moment.
//!
//! Reads and writes of the semaphore go through [`target_mem`]: bounded in time.
//!
//! Limits: 64-bit little- or big-endian ELF; libraries loaded after the probe was attached
//! are not searched.
use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{
    elf,
    read::elf::{FileHeader, ProgramHeader, SectionHeader},
    Endianness,
};
use tracing::debug;

use crate::{
    procfs::{self, ProcError},
    target_mem,
};

type Elf64 = elf::FileHeader64<Endianness>;

/// `NT_STAPSDT`: the note type of SystemTap SDT probes.
pub const NT_STAPSDT: u32 = 3;

/// One USDT probe site of an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// Link-time address of the probe site, already adjusted for prelinking.
    pub pc: u64,
    /// `.stapsdt.base` as recorded in the note.
    pub base: u64,
    /// Link-time address of the semaphore (a `u16`), 0 when the probe has none.
    pub semaphore: u64,
    /// The argument description, e.g. `-4@%esi 8@%rax`.
    pub args: String,
    /// Where the site is in the file: what the uprobe attaches to.
    pub file_offset: u64,
    /// Where the semaphore is in the file, when it has one.
    pub semaphore_file_offset: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsdtError {
    #[error("cannot read ELF file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not a readable 64-bit ELF file: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("no USDT probe {provider}:{name} in process {pid} (searched {searched}); the binary needs a .note.stapsdt section, e.g. built with <sys/sdt.h>")]
    NotFound { pid: u32, provider: String, name: String, searched: String },
    #[error("cannot {what} the semaphore of USDT probe {probe} at {addr:#x} in process {pid}: {source}")]
    Semaphore { what: &'static str, probe: String, pid: u32, addr: u64, source: std::io::Error },
    #[error("the semaphore of USDT probe {probe} (file offset {offset:#x} of {path}) is not mapped in process {pid}")]
    SemaphoreNotMapped { probe: String, path: String, offset: u64, pid: u32 },
}

/// Every USDT probe of the ELF file at `path`, in note order.
pub fn probes(path: impl AsRef<Path>) -> Result<Vec<UsdtProbe>, UsdtError> {
    let path = path.as_ref();
    let io = |source| UsdtError::Io { path: path.to_owned(), source };
    let file = crate::target_fs::open_checked(path, crate::target_fs::Kind::Elf).map_err(|e| io(e.into()))?;
    let map = file.bytes().map_err(io)?;
    parse(path, &map)
}

fn parse(path: &Path, data: &[u8]) -> Result<Vec<UsdtProbe>, UsdtError> {
    let bad = |reason: String| UsdtError::Parse { path: path.to_owned(), reason };
    if data.get(..5).is_none_or(|h| h[..4] != elf::ELFMAG || h[4] != elf::ELFCLASS64) {
        return Err(bad("not a 64-bit ELF file".into()));
    }
    let header = Elf64::parse(data).map_err(|e| bad(e.to_string()))?;
    let endian = header.endian().map_err(|e| bad(e.to_string()))?;
    let sections = header.sections(endian, data).map_err(|e| bad(e.to_string()))?;
    let segments = header.program_headers(endian, data).map_err(|e| bad(e.to_string()))?;
    let name_of = |s: &elf::SectionHeader64<Endianness>| sections.section_name(endian, s).unwrap_or_default();
    let actual_base = sections.iter().find(|s| name_of(s) == b".stapsdt.base").map(|s| s.sh_addr(endian));

    let to_file_offset = |vaddr: u64| {
        segments.iter().find_map(|p| {
            let (addr, filesz, offset) = (p.p_vaddr(endian), p.p_filesz(endian), p.p_offset(endian));
            (p.p_type(endian) == elf::PT_LOAD && vaddr >= addr && vaddr - addr < filesz).then(|| vaddr - addr + offset)
        })
    };
    let big = header.is_big_endian();
    let word = |b: &[u8]| -> u64 {
        let a: [u8; 8] = b.try_into().unwrap_or_default();
        if big { u64::from_be_bytes(a) } else { u64::from_le_bytes(a) }
    };

    let mut out = Vec::new();
    for section in sections.iter() {
        if section.sh_type(endian) != elf::SHT_NOTE || name_of(section) != b".note.stapsdt" {
            continue;
        }
        let Some(mut notes) = section.notes(endian, data).map_err(|e| bad(e.to_string()))? else {
            continue;
        };
        while let Some(note) = notes.next().map_err(|e| bad(e.to_string()))? {
            if note.name() != b"stapsdt" || note.n_type(endian) != NT_STAPSDT {
                continue;
            }
            let desc = note.desc();
            if desc.len() < 24 {
                debug!("{}: short stapsdt note skipped", path.display());
                continue;
            }
            let (pc, base, semaphore) = (word(&desc[0..8]), word(&desc[8..16]), word(&desc[16..24]));
            let mut strings = desc[24..].split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
            let provider = strings.next().unwrap_or_default();
            let name = strings.next().unwrap_or_default();
            let args = strings.next().unwrap_or_default();
            // Prelinked: the section moved from `base` to `actual_base`, and the site with it.
            let pc = match actual_base {
                Some(actual) if base != 0 && actual != base => pc.wrapping_add(actual.wrapping_sub(base)),
                _ => pc,
            };
            let Some(file_offset) = to_file_offset(pc) else {
                debug!("{}: USDT {provider}:{name} at {pc:#x} is outside every loaded segment", path.display());
                continue;
            };
            out.push(UsdtProbe {
                semaphore_file_offset: (semaphore != 0).then(|| to_file_offset(semaphore)).flatten(),
                provider,
                name,
                pc,
                base,
                semaphore,
                args,
                file_offset,
            });
        }
    }
    Ok(out)
}

/// A probe found in a running process: the file as the target sees it, and the probe.
#[derive(Clone, Debug)]
pub struct FoundProbe {
    pub path_in_target: String,
    pub probe: UsdtProbe,
}

/// Every site of USDT probe `provider:name` in the first object of the target that has it,
/// searching the executable first, then every mapped executable file in address order.
pub fn find(pid: u32, provider: &str, name: &str) -> Result<Vec<FoundProbe>, UsdtError> {
    let mut searched: Vec<String> = Vec::new();
    for procfs::MappedObject { path, host_path } in procfs::objects(pid)? {
        let all = match probes(&host_path) {
            Ok(p) => p,
            Err(e) => {
                debug!("USDT search skips {path}: {e}");
                searched.push(path);
                continue;
            }
        };
        let found: Vec<FoundProbe> = all
            .into_iter()
            .filter(|p| p.provider == provider && p.name == name)
            .map(|probe| FoundProbe { path_in_target: path.clone(), probe })
            .collect();
        if !found.is_empty() {
            return Ok(found);
        }
        searched.push(path);
    }
    Err(UsdtError::NotFound { pid, provider: provider.into(), name: name.into(), searched: searched.join(", ") })
}

/// Where the semaphore of `probe` (in the file the target maps at `path_in_target`) is in
/// the target's memory, from `/proc/PID/maps`.
pub fn semaphore_address(pid: u32, path_in_target: &str, probe: &UsdtProbe) -> Result<Option<u64>, UsdtError> {
    let Some(off) = probe.semaphore_file_offset else {
        return Ok(None);
    };
    match procfs::address_of(&procfs::maps(pid)?, path_in_target, off, 2) {
        Some(a) => Ok(Some(a)),
        None => Err(UsdtError::SemaphoreNotMapped {
            probe: format!("{}:{}", probe.provider, probe.name),
            path: path_in_target.to_string(),
            offset: off,
            pid,
        }),
    }
}

/// Reads a probe semaphore (a native-endian `u16`) from the target's memory.
pub fn read_semaphore(pid: u32, addr: u64) -> std::io::Result<u16> {
    let mem = Arc::new(File::open(format!("/proc/{pid}/mem"))?);
    let b = target_mem::read_at(&mem, addr, 2)?;
    Ok(u16::from_ne_bytes([b[0], b[1]]))
}

/// An enabled probe semaphore: incremented on creation, decremented on drop (when the target
/// still runs).
#[derive(Debug)]
pub struct Semaphore {
    pid: u32,
    addr: u64,
    probe: String,
    mem: Arc<File>,
}

impl Semaphore {
    /// Increments the semaphore at `addr` of process `pid`.
    pub fn enable(pid: u32, addr: u64, probe: &str) -> Result<Semaphore, UsdtError> {
        let err = |what, source| UsdtError::Semaphore { what, probe: probe.to_string(), pid, addr, source };
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| err("open /proc/PID/mem to enable", e))?;
        let s = Semaphore { pid, addr, probe: probe.to_string(), mem: Arc::new(mem) };
        s.add(1).map_err(|e| err("enable", e))?;
        Ok(s)
    }

    pub fn address(&self) -> u64 {
        self.addr
    }

    /// Bounded in time (see [`target_mem`]): a page that never answers cannot hang us.
    fn add(&self, delta: i32) -> std::io::Result<()> {
        let b = target_mem::read_at(&self.mem, self.addr, 2)?;
        let v = (i32::from(u16::from_ne_bytes([b[0], b[1]])) + delta).clamp(0, i32::from(u16::MAX)) as u16;
        target_mem::write_at(&self.mem, self.addr, v.to_ne_bytes().to_vec())
    }
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        if let Err(e) = self.add(-1) {
            // The target has usually exited; nothing to undo then.
            debug!("USDT {}: semaphore at {:#x} of process {} not decremented: {e}", self.probe, self.addr, self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built ELF file with one PT_LOAD, a `.stapsdt.base` section and a
    /// `.note.stapsdt` section holding two probes (one with a semaphore), parsed back; then
    /// the same file "prelinked" (the base section moved by 0x1000) moves the site, not the
    /// semaphore.
    #[test]
    fn parses_notes_and_adjusts_for_prelink() {
        let data = tiny_elf(0x400f00);
        let p = parse(Path::new("tiny"), &data).unwrap();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].provider.as_str(), p[0].name.as_str()), ("app", "tick"));
        assert_eq!(p[0].pc, 0x401010);
        assert_eq!(p[0].file_offset, 0x1010);
        assert_eq!(p[0].semaphore, 0x401100);
        assert_eq!(p[0].semaphore_file_offset, Some(0x1100));
        assert_eq!(p[0].args, "-4@%esi");
        assert_eq!((p[1].name.as_str(), p[1].semaphore, p[1].semaphore_file_offset), ("done", 0, None));
        assert_eq!(p[1].args, "");

        let moved = tiny_elf(0x401f00);
        let p = parse(Path::new("tiny"), &moved).unwrap();
        assert_eq!(p[0].pc, 0x402010);
        assert_eq!(p[0].file_offset, 0x2010);
        assert_eq!(p[0].semaphore, 0x401100);

        assert!(matches!(parse(Path::new("x"), b"not an elf"), Err(UsdtError::Parse { .. })));
    }

    /// A minimal ELF64 executable: one PT_LOAD mapping file offset 0 at 0x400000 (0x3000 bytes),
    /// sections: null, `.stapsdt.base` at `base_addr`, `.note.stapsdt`, `.shstrtab`.
    fn tiny_elf(base_addr: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x3000];
        let put = |f: &mut Vec<u8>, at: usize, b: &[u8]| f[at..at + b.len()].copy_from_slice(b);
        // ELF header.
        put(&mut f, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &62u16.to_le_bytes()); // x86-64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 40, &0x800u64.to_le_bytes()); // e_shoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut f, 56, &1u16.to_le_bytes()); // e_phnum
        put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize
        put(&mut f, 60, &4u16.to_le_bytes()); // e_shnum
        put(&mut f, 62, &3u16.to_le_bytes()); // e_shstrndx
        // PT_LOAD: offset 0 -> 0x400000, 0x3000 bytes.
        put(&mut f, 64, &1u32.to_le_bytes());
        put(&mut f, 68, &5u32.to_le_bytes());
        put(&mut f, 72, &0u64.to_le_bytes());
        put(&mut f, 80, &0x400000u64.to_le_bytes());
        put(&mut f, 88, &0x400000u64.to_le_bytes());
        put(&mut f, 96, &0x3000u64.to_le_bytes());
        put(&mut f, 104, &0x3000u64.to_le_bytes());
        // Notes at 0x200.
        let mut notes = Vec::new();
        let note = |notes: &mut Vec<u8>, pc: u64, sem: u64, strs: &[u8]| {
            let mut desc = Vec::new();
            desc.extend_from_slice(&pc.to_le_bytes());
            desc.extend_from_slice(&0x400f00u64.to_le_bytes()); // base at link time
            desc.extend_from_slice(&sem.to_le_bytes());
            desc.extend_from_slice(strs);
            notes.extend_from_slice(&8u32.to_le_bytes()); // namesz incl. NUL
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&NT_STAPSDT.to_le_bytes());
            notes.extend_from_slice(b"stapsdt\0");
            notes.extend_from_slice(&desc);
            while !notes.len().is_multiple_of(4) {
                notes.push(0);
            }
        };
        note(&mut notes, 0x401010, 0x401100, b"app\0tick\0-4@%esi\0");
        note(&mut notes, 0x401020, 0, b"app\0done\0\0");
        put(&mut f, 0x200, &notes);
        // .shstrtab at 0x700.
        let shstr = b"\0.stapsdt.base\0.note.stapsdt\0.shstrtab\0";
        put(&mut f, 0x700, shstr);
        // Section headers at 0x800: [0] null.
        let sh = |f: &mut Vec<u8>, i: usize, name: u32, ty: u32, addr: u64, off: u64, size: u64| {
            let at = 0x800 + i * 64;
            put(f, at, &name.to_le_bytes());
            put(f, at + 4, &ty.to_le_bytes());
            put(f, at + 16, &addr.to_le_bytes());
            put(f, at + 24, &off.to_le_bytes());
            put(f, at + 32, &size.to_le_bytes());
            put(f, at + 48, &4u64.to_le_bytes()); // align
        };
        sh(&mut f, 1, 1, elf::SHT_PROGBITS, base_addr, 0xf00, 1);
        sh(&mut f, 2, 15, elf::SHT_NOTE, 0, 0x200, notes.len() as u64);
        sh(&mut f, 3, 29, elf::SHT_STRTAB, 0, 0x700, shstr.len() as u64);
        f
    }
}
