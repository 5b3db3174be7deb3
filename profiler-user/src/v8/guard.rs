//! The inspector guard: while memscope holds a Node.js inspector window, no other process of
//! any user can connect to it (issue 17, item 3).
//!
//! Node's inspector has no authentication: whoever connects to its port can evaluate code as
//! the service's user. memscope opens it with `SIGUSR1` for the few seconds an operation
//! takes; this module makes that window memscope's alone. It loads the small `inspector-guard`
//! eBPF object (`profiler-ebpf/src/guard.rs`, a separate object from the allocator probes, so
//! their load and path stay untouched) and attaches its `cgroup/connect4` and
//! `cgroup/connect6` programs to the root of the cgroup v2 hierarchy (every process on the
//! host, in every container, is below it) while at least one window is open. A [`Guard`] puts
//! `(network namespace cookie, port)` into the programs' `GUARDED` map: from then on every
//! connect to a local address (127.0.0.0/8, ::1, 0.0.0.0, ::, ::ffff:127.x) on that port in that
//! namespace fails with `EPERM`, except from the sockets memscope registered ([`Guard::allow`],
//! by their socket cookie, `SO_COOKIE`, before connecting).
//!
//! The guard is put in place before `SIGUSR1` and removed after the inspector closed (on drop,
//! so on every error path too); the programs are detached when the last window closes, and
//! the kernel detaches them by itself if memscope dies (the links are file descriptors). A
//! guard that cannot be put in place is an error: memscope never opens an unguarded window.
//!
//! Needs: cgroup v2 (pure or hybrid: `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`; in a
//! container with its own cgroup namespace, the host's hierarchy through `/proc/1/root` with
//! `hostPID`), BPF links for cgroups (Linux 5.7+), root or CAP_SYS_ADMIN + CAP_NET_ADMIN.
//! Does not cover: remote hosts (a non-loopback inspector is refused by the caller instead),
//! root processes that can load their own BPF or enter the target's namespaces anyway.
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{cgroup_sock_addr::CgroupSockAddrLinkId, CgroupAttachMode, CgroupSockAddr},
    Ebpf, EbpfLoader,
};
use tracing::{debug, info};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inspector-guard.o"));

const PROGRAMS: [&str; 2] = ["guard_connect4", "guard_connect6"];
/// `statfs` magic of cgroup v2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Why the guard cannot be put in place. Each message is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("this memscope was built without its inspector-guard eBPF object: run `cargo xtask build-ebpf`, then rebuild")]
    NotBuilt,
    #[error("no cgroup v2 root hierarchy found (checked {0}): the inspector guard attaches there")]
    NoCgroup2(String),
    #[error("loading the inspector guard: {0}")]
    Load(String),
    #[error("attaching the inspector guard to the cgroup root {path}: {reason}")]
    Attach { path: String, reason: String },
    #[error("the inspector guard's map {map}: {reason}")]
    Map { map: &'static str, reason: String },
}

/// The loaded programs and their maps, kept for the life of the process once loaded.
struct Loaded {
    ebpf: Ebpf,
    guarded: HashMap<MapData, [u64; 2], u32>,
    allowed: HashMap<MapData, u64, [u64; 2]>,
    cgroup: File,
    cgroup_path: PathBuf,
    /// Link ids while attached (some window is open).
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    /// Guards alive per key: one key may be guarded twice (a window that could not be closed
    /// keeps its guard while a new one starts), and stays in `GUARDED` until the last goes.
    keys: std::collections::HashMap<[u64; 2], usize>,
    /// Guards alive right now.
    windows: usize,
}

static STATE: Mutex<Option<Loaded>> = Mutex::new(None);

/// One guarded `(network namespace, port)`: connects to it from anything but the sockets
/// registered with [`Guard::allow`] are refused until this is dropped.
#[derive(Debug)]
pub struct Guard {
    key: [u64; 2],
    cookies: Vec<u64>,
}

impl Guard {
    /// Guards `port` in the network namespace whose cookie (`SO_NETNS_COOKIE`) is
    /// `netns_cookie`. Loads and attaches the programs if no other window is open.
    pub fn install(netns_cookie: u64, port: u16) -> Result<Guard, GuardError> {
        let key = [netns_cookie, u64::from(port)];
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.is_none() {
            *state = Some(load()?);
        }
        let loaded = state.as_mut().expect("loaded above");
        if loaded.windows == 0 {
            attach(loaded)?;
        }
        loaded.windows += 1;
        // From here on, dropping the guard undoes what was done.
        let guard = Guard {
            key,
            cookies: Vec::new(),
        };
        *loaded.keys.entry(key).or_insert(0) += 1;
        if let Err(e) = loaded.guarded.insert(key, 1, 0) {
            drop(state);
            drop(guard);
            return Err(GuardError::Map {
                map: "GUARDED",
                reason: e.to_string(),
            });
        }
        debug!(netns_cookie, port, "inspector guard in place");
        Ok(guard)
    }

    /// Lets the socket with cookie `socket_cookie` (`SO_COOKIE`) connect to the guarded port.
    pub fn allow(&mut self, socket_cookie: u64) -> Result<(), GuardError> {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = state
            .as_mut()
            .ok_or(GuardError::Load("the guard is not loaded".into()))?;
        loaded
            .allowed
            .insert(socket_cookie, self.key, 0)
            .map_err(|e| GuardError::Map {
                map: "ALLOWED",
                reason: e.to_string(),
            })?;
        self.cookies.push(socket_cookie);
        Ok(())
    }

    /// The guarded port.
    pub fn port(&self) -> u16 {
        self.key[1] as u16
    }

    /// The guarded network namespace's cookie.
    pub fn netns_cookie(&self) -> u64 {
        self.key[0]
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let Some(loaded) = state.as_mut() else { return };
        let left = loaded.keys.get_mut(&self.key).map(|n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left.unwrap_or(0) == 0 {
            loaded.keys.remove(&self.key);
            let _ = loaded.guarded.remove(&self.key);
        }
        for c in self.cookies.drain(..) {
            let _ = loaded.allowed.remove(&c);
        }
        loaded.windows = loaded.windows.saturating_sub(1);
        if loaded.windows == 0 {
            detach(loaded);
        }
        debug!(
            netns_cookie = self.key[0],
            port = self.key[1],
            "inspector guard removed"
        );
    }
}

/// Whether the programs are attached right now (some window is open).
pub fn attached() -> bool {
    STATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|l| !l.links.is_empty())
}

fn load() -> Result<Loaded, GuardError> {
    if OBJECT.is_empty() {
        return Err(GuardError::NotBuilt);
    }
    let (cgroup, cgroup_path) = cgroup_root()?;
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| GuardError::Load(e.to_string()))?;
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| GuardError::Load(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| GuardError::Load(format!("{name}: {e}")))?;
        prog.load()
            .map_err(|e| GuardError::Load(format!("{name}: {}", chain(&e))))?;
    }
    let guarded = take_map(&mut ebpf, "GUARDED")?;
    let allowed = take_map(&mut ebpf, "ALLOWED")?;
    info!(cgroup = %cgroup_path.display(), "inspector guard loaded");
    Ok(Loaded {
        ebpf,
        guarded,
        allowed,
        cgroup,
        cgroup_path,
        links: Vec::new(),
        windows: 0,
        keys: Default::default(),
    })
}

fn take_map<T>(ebpf: &mut Ebpf, map: &'static str) -> Result<T, GuardError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(map).ok_or(GuardError::Map {
        map,
        reason: "missing from the object".into(),
    })?;
    T::try_from(m).map_err(|e| GuardError::Map {
        map,
        reason: e.to_string(),
    })
}

fn attach(loaded: &mut Loaded) -> Result<(), GuardError> {
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = loaded
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in load()");
        // A BPF link (aya uses one on 5.7+): the kernel takes no flags for cgroup links and
        // attaches them as multi-programs, so other programs on the root (systemd's, a CNI's)
        // keep running, and ours runs for every cgroup below whatever they attach there.
        match prog.attach(&loaded.cgroup, CgroupAttachMode::Single) {
            Ok(id) => loaded.links.push((name, id)),
            Err(e) => {
                detach(loaded);
                return Err(GuardError::Attach {
                    path: loaded.cgroup_path.display().to_string(),
                    reason: chain(&e),
                });
            }
        }
    }
    Ok(())
}

/// An error with its causes (aya's syscall errors keep the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn detach(loaded: &mut Loaded) {
    for (name, id) in loaded.links.drain(..) {
        if let Some(prog) = loaded
            .ebpf
            .program_mut(name)
            .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
        {
            if let Err(e) = prog.detach(id) {
                tracing::warn!(program = name, error = %e, "detaching the inspector guard");
            }
        }
    }
}

/// The root of the host's cgroup v2 hierarchy (a directory of a cgroup2 file system without
/// `cgroup.events`, which every cgroup but the root has; the root of a cgroup namespace is
/// not the root).
fn cgroup_root() -> Result<(File, PathBuf), GuardError> {
    let candidates = [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/proc/1/root/sys/fs/cgroup",
        "/proc/1/root/sys/fs/cgroup/unified",
    ];
    for c in candidates {
        let path = Path::new(c);
        if is_cgroup2(path) && !path.join("cgroup.events").exists() {
            if let Ok(f) = File::open(path) {
                return Ok((f, path.to_path_buf()));
            }
        }
    }
    Err(GuardError::NoCgroup2(candidates.join(", ")))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's cgroup v2 root is found (pure or hybrid hierarchy), and it is the root.
    #[test]
    fn finds_cgroup2_root() {
        if !Path::new("/proc/self/ns/cgroup").exists() {
            return;
        }
        let (_, path) = cgroup_root().expect("a cgroup v2 root");
        assert!(path.join("cgroup.procs").exists());
    }
}
