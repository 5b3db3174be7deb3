//! uprobe.session (Linux 6.13+): one program sees both the entry and the return of a call, and
//! its entry decides whether the kernel stops at the return at all. All probes of a program go
//! into one uprobe_multi link, attached and detached in one system call each.
//!
//! aya 0.14 can neither load a program with the `BPF_TRACE_UPROBE_SESSION` attach type nor
//! create uprobe_multi links, so this module does both with raw `bpf(2)` calls. The program's
//! instructions come from the same object aya loaded (parsed by aya-obj), relocated against the
//! maps aya created: both kinds of probes share every map.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` (uapi/linux/bpf.h), after BPF_TRACE_KPROBE_SESSION = 56.
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// Plain uprobes in a uprobe_multi link (Linux 6.6+): the USDT contract's programs, whose
/// links also take reference counters (USDT semaphores).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const LOG_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionLinkError {
    #[error("cannot parse the eBPF object: {0}")]
    Parse(String),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(String),
    #[error("eBPF map {0} has a type memscope does not relocate")]
    MapType(String),
    #[error("cannot relocate eBPF program {name}: {reason}")]
    Relocate { name: String, reason: String },
    #[error("the kernel refused eBPF program {name} as a uprobe.session (or uprobe_multi) program: {source}{log}")]
    Load { name: String, source: io::Error, log: String },
    #[error("cannot attach a uprobe.session link to {path}: {source}")]
    Attach { path: String, source: io::Error },
}

/// A loaded uprobe.session program (or, from [`SessionProgram::load_multi`], a plain uprobe
/// program for uprobe_multi links).
#[derive(Debug)]
pub struct SessionProgram {
    fd: OwnedFd,
    attach_type: u32,
}

/// Probes attached through one uprobe_multi link; dropping it detaches all of them.
#[derive(Debug)]
pub struct SessionLink {
    _fd: OwnedFd,
}

/// One probe of a link: a file offset and the cookie the program reads there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionProbe {
    pub file_offset: u64,
    pub cookie: u64,
    /// File offset of a `u16` the kernel increments in the target while the probe is
    /// installed and decrements when it goes (a USDT semaphore), 0 for none.
    pub ref_ctr_offset: u64,
}

fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::StackTraceMap(m)
        | Map::RingBuf(m) => m,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

impl SessionProgram {
    /// The program's descriptor (its run statistics are in `/proc/self/fdinfo`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Loads programs `names` of `object`, their map references pointing at `ebpf`'s maps (call
    /// before taking any map out of `ebpf`).
    pub fn load<const N: usize>(object: &[u8], ebpf: &Ebpf, names: [&str; N]) -> Result<[Self; N], SessionLinkError> {
        Self::load_as(object, ebpf, names, BPF_TRACE_UPROBE_SESSION)
    }

    /// Loads programs `names` as plain uprobes for uprobe_multi links (Linux 6.6+), whose
    /// probes may carry reference counters (see [`SessionProbe::ref_ctr_offset`]).
    pub fn load_multi<const N: usize>(object: &[u8], ebpf: &Ebpf, names: [&str; N]) -> Result<[Self; N], SessionLinkError> {
        Self::load_as(object, ebpf, names, BPF_TRACE_UPROBE_MULTI)
    }

    fn load_as<const N: usize>(
        object: &[u8],
        ebpf: &Ebpf,
        names: [&str; N],
        attach_type: u32,
    ) -> Result<[Self; N], SessionLinkError> {
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| SessionLinkError::Parse(e.to_string()))?;
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        let mut fds = HashMap::new();
        for (map_name, map) in ebpf.maps() {
            let fd = map_fd(map).ok_or_else(|| SessionLinkError::MapType(map_name.to_string()))?;
            fds.insert(map_name.to_string(), fd);
        }
        let maps = obj.maps.clone();
        let relocate_err =
            |reason: String| SessionLinkError::Relocate { name: names.join(", "), reason };
        let with_fds = maps
            .iter()
            .map(|(n, m)| Ok((n.as_str(), *fds.get(n).ok_or_else(|| relocate_err(format!("map {n} was not created")))?, m)))
            .collect::<Result<Vec<_>, SessionLinkError>>()?;
        obj.relocate_maps(with_fds.into_iter(), &text_sections).map_err(|e| relocate_err(e.to_string()))?;
        obj.relocate_calls(&text_sections).map_err(|e| relocate_err(e.to_string()))?;
        let load_one = |name: &str| {
            let missing = || SessionLinkError::MissingProgram(name.to_string());
            let program = obj.programs.get(name).ok_or_else(missing)?;
            let function = obj.functions.get(&program.function_key()).ok_or_else(missing)?;
            let fd = prog_load(name, &function.instructions, &obj.license, attach_type)
                .map_err(|(source, log)| SessionLinkError::Load { name: name.to_string(), source, log })?;
            Ok(SessionProgram { fd, attach_type })
        };
        let mut loaded = Vec::with_capacity(N);
        for name in names {
            loaded.push(load_one(name)?);
        }
        Ok(loaded.try_into().expect("one program per name"))
    }

    /// Attaches the program at every probe of `path` (host path of the target's file), for the
    /// threads of process `pid` only.
    pub fn attach(&self, path: &Path, probes: &[SessionProbe], pid: u32) -> Result<SessionLink, SessionLinkError> {
        let err = |source| SessionLinkError::Attach { path: path.display().to_string(), source };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let offsets: Vec<u64> = probes.iter().map(|p| p.file_offset).collect();
        let cookies: Vec<u64> = probes.iter().map(|p| p.cookie).collect();
        let ref_ctrs: Vec<u64> = probes.iter().map(|p| p.ref_ctr_offset).collect();
        let ref_ctr_offsets = if ref_ctrs.iter().any(|&r| r != 0) { ref_ctrs.as_ptr() as u64 } else { 0 };
        let attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_fd: 0,
            attach_type: self.attach_type,
            flags: 0,
            path: c_path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            ref_ctr_offsets,
            cookies: cookies.as_ptr() as u64,
            cnt: probes.len() as u32,
            multi_flags: 0,
            pid,
            _pad: 0,
        };
        let fd = bpf(BPF_LINK_CREATE, &attr).map_err(err)?;
        Ok(SessionLink { _fd: fd })
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `uprobe_multi` member.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Loads the instructions; on refusal, loads them again with the verifier log to say why.
fn prog_load(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
    attach_type: u32,
) -> Result<OwnedFd, (io::Error, String)> {
    let mut prog_name = [0u8; 16];
    for (dst, src) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    let first = match bpf(BPF_PROG_LOAD, &attr) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let mut log = vec![0u8; LOG_SIZE];
    attr.log_level = 1;
    attr.log_size = LOG_SIZE as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    let _ = bpf(BPF_PROG_LOAD, &attr);
    let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    // The verifier's conclusion is its last line before the statistics.
    let last = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time"))
        .map(|l| format!(" (verifier: {l})"));
    Err((first, last.unwrap_or_default()))
}
