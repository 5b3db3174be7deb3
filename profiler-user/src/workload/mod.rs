//! Workloads: the identity that outlives pids. A Kubernetes container is its namespace, pod
//! name and container name (a restarted container, a new pid in a new cgroup of the same pod,
//! is the same workload); any other process is the selector that matched it, its executable
//! and its cgroup. A workload keeps its snapshot series, its triggers (its selector's) and its
//! verdicts across restarts of its process; the agent re-attaches a restarted one by itself.
//!
//! A process forked by an attached process of a `forks=true` selector (a pre-fork server's
//! worker) is a workload of its own, [`worker`]: `<parent id>` + `-w<slot>`, the slot being the
//! lowest one free among the parent's workers when it is forked. A worker the master replaces
//! (gunicorn's `max_requests`, a crashed nginx worker) takes the freed slot and continues its
//! series, so a server with N workers has N worker workloads however often they are recycled,
//! and each worker's heap, leaks and growth verdict are its own (one leaking worker stands
//! out instead of being averaged away).
//!
//! This module owns the identities and the registry (pure data) and the selectors file of the
//! data directory ([`SelectorFile`]); the agent drives them (`agent::workloads`).
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::discover::{selector::fnv1a, ProcessInfo, Selector};

/// Past pids kept per workload.
const MAX_PAST_PIDS: usize = 32;

/// Who a workload is: its id (stable across restarts of the process, of the agent, and equal
/// on every node for the same pod and container) and its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub labels: BTreeMap<String, String>,
}

/// `[a-z0-9-]`, at most 32 characters, for the readable part of an id.
fn slug(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let s = s.trim_matches('-');
    let s: String = s.chars().take(32).collect();
    if s.is_empty() { "w".into() } else { s.trim_end_matches('-').to_string() }
}

/// Whether `s` has the shape of a workload id (checked before a client's id is looked up).
pub fn valid_id(s: &str) -> bool {
    (3..=48).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The workload `p` belongs to, found by `selector`. `node` is the node's name (a label).
pub fn identify(selector: &Selector, p: &ProcessInfo, node: &str) -> Identity {
    let exe_base = p.exe.rsplit('/').next().unwrap_or(&p.exe);
    let mut labels = BTreeMap::new();
    labels.insert("node".to_string(), node.to_string());
    labels.insert("executable".to_string(), p.exe.clone());
    labels.insert("selector".to_string(), selector.id());
    let (key, readable) = match &p.container {
        Some(c) => {
            labels.extend(c.labels());
            match (&c.namespace, &c.pod, &c.name) {
                (Some(ns), Some(pod), Some(name)) => (format!("k8s\0{ns}\0{pod}\0{name}"), name.clone()),
                _ => match (&c.pod_uid, &c.name) {
                    (Some(uid), name) => {
                        let who = name.clone().unwrap_or_else(|| exe_base.to_string());
                        (format!("pod\0{uid}\0{who}"), who)
                    }
                    // A container without a pod (Docker): its name, else its executable.
                    (None, Some(name)) => (format!("container\0{name}"), name.clone()),
                    (None, None) => (format!("proc\0{}\0{}", selector.id(), p.exe), exe_base.to_string()),
                },
            }
        }
        None => {
            labels.insert("cgroup".to_string(), p.cgroup.clone());
            (format!("proc\0{}\0{}\0{}", selector.id(), p.exe, p.cgroup), exe_base.to_string())
        }
    };
    let id = format!("{}-{:012x}", slug(&readable), fnv1a(key.as_bytes()) & 0xffff_ffff_ffff);
    Identity { id, labels }
}

/// The identity of the worker in `slot` of the workload `parent` (see the module doc): the
/// parent's labels plus `worker` (the slot) and `parent_workload`.
pub fn worker(parent: &Identity, slot: u32) -> Identity {
    // The parent's readable part (its id less `-` and 12 hex digits), shortened so that the
    // id stays within `valid_id`'s 48 characters.
    let readable = &parent.id[..parent.id.len().saturating_sub(13)];
    let suffix = format!("-w{slot}");
    let readable: String = readable.chars().take(32 - suffix.len()).collect();
    let key = format!("worker\0{}\0{slot}", parent.id);
    let id = format!("{}{suffix}-{:012x}", readable.trim_end_matches('-'), fnv1a(key.as_bytes()) & 0xffff_ffff_ffff);
    let mut labels = parent.labels.clone();
    labels.insert("worker".to_string(), slot.to_string());
    labels.insert("parent_workload".to_string(), parent.id.clone());
    Identity { id, labels }
}

/// One workload in the registry.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub id: String,
    /// node, executable, selector, and namespace, pod, container, pod_uid, container_id (or
    /// cgroup) as of its latest process.
    pub labels: BTreeMap<String, String>,
    /// The selector that matched it (a worker's: its parent's).
    pub selector: String,
    /// A worker's parent workload (`forks=true`), and the worker's slot in it.
    pub parent: Option<String>,
    pub worker: Option<u32>,
    /// The pid traced now, if any.
    pub pid: Option<u32>,
    /// Every pid it had (at most the last 32), oldest first.
    pub pids: Vec<u32>,
    /// How many times a new process of it was attached after the first.
    pub restarts: u32,
    pub attached: bool,
    pub first_seen_ms: u64,
    pub attached_at_ms: Option<u64>,
    /// Why the last attach failed (or why its process waits), if it did.
    pub last_error: Option<String>,
    /// Since when its process waits for a target slot (`--max-targets`), if it does.
    pub waiting_since_ms: Option<u64>,
    /// When its last process exited, was detached or failed to attach: without a process it
    /// is removed `--workload-ttl` later.
    pub exited_at_ms: Option<u64>,
}

impl Workload {
    pub fn new(identity: &Identity, selector: &str, now_ms: u64) -> Workload {
        Workload {
            id: identity.id.clone(),
            labels: identity.labels.clone(),
            selector: selector.to_string(),
            parent: identity.labels.get("parent_workload").cloned(),
            worker: identity.labels.get("worker").and_then(|w| w.parse().ok()),
            pid: None,
            pids: Vec::new(),
            restarts: 0,
            attached: false,
            first_seen_ms: now_ms,
            attached_at_ms: None,
            last_error: None,
            waiting_since_ms: None,
            exited_at_ms: None,
        }
    }

    /// `attached`, `waiting` (for a target slot), `failed` (the last attach failed) or
    /// `exited` (no process).
    pub fn state(&self) -> &'static str {
        if self.attached {
            "attached"
        } else if self.waiting_since_ms.is_some() {
            "waiting"
        } else if self.last_error.is_some() && self.pid.is_none() {
            "failed"
        } else if self.pid.is_some() {
            // Reserved: being attached.
            "waiting"
        } else {
            "exited"
        }
    }

    /// Notes that `pid` waits for a target slot (reserved for it meanwhile).
    pub fn wait(&mut self, pid: u32, now_ms: u64, why: String) {
        self.pid = Some(pid);
        self.attached = false;
        self.waiting_since_ms.get_or_insert(now_ms);
        self.exited_at_ms = None;
        self.last_error = Some(why);
    }

    /// Notes that attaching its process failed.
    pub fn failed(&mut self, error: String, now_ms: u64) {
        self.pid = None;
        self.attached = false;
        self.waiting_since_ms = None;
        self.last_error = Some(error);
        self.exited_at_ms = Some(now_ms);
    }

    /// Notes that `pid` is attached now (a restart when the workload had another process
    /// before; the same process again after its exec is not one).
    pub fn attached(&mut self, pid: u32, labels: BTreeMap<String, String>, now_ms: u64) {
        if self.pids.last() != Some(&pid) {
            if !self.pids.is_empty() {
                self.restarts += 1;
            }
            self.pids.push(pid);
        }
        if self.pids.len() > MAX_PAST_PIDS {
            self.pids.remove(0);
        }
        self.waiting_since_ms = None;
        self.exited_at_ms = None;
        self.labels = labels;
        self.pid = Some(pid);
        self.attached = true;
        self.attached_at_ms = Some(now_ms);
        self.last_error = None;
    }

    /// Notes that its process exited (or was detached, or stopped waiting).
    pub fn gone(&mut self, now_ms: u64) {
        self.pid = None;
        self.attached = false;
        self.waiting_since_ms = None;
        self.exited_at_ms = Some(now_ms);
    }
}

/// A selector as the agent keeps it.
#[derive(Clone, Debug)]
pub struct SelectorEntry {
    pub selector: Selector,
    /// `flag` (`--select`, not persisted), `file` (`--select-file`, watched, not persisted) or
    /// `api` (persisted in the data directory).
    pub origin: &'static str,
}

/// Most bytes of a `--select-file`.
pub const MAX_SELECT_FILE_BYTES: u64 = 1 << 20;

/// The selectors of a `--select-file`'s text: one per line, blank lines and `#` comments
/// skipped; a bad line is named by its number.
pub fn parse_select_file(path: &Path, text: &str) -> anyhow::Result<Vec<Selector>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(l, _)| l).trim();
        if line.is_empty() {
            continue;
        }
        out.push(Selector::parse(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?);
    }
    Ok(out)
}

/// Reads a `--select-file` (at most [`MAX_SELECT_FILE_BYTES`]): its text.
pub fn read_select_text(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::io::Read as _;
    let f = fs::File::open(path).with_context(|| format!("--select-file {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_SELECT_FILE_BYTES + 1).read_to_string(&mut text).with_context(|| format!("--select-file {}", path.display()))?;
    anyhow::ensure!(text.len() as u64 <= MAX_SELECT_FILE_BYTES, "--select-file {}: larger than 1 MiB", path.display());
    Ok(text)
}

/// `selectors.json` in the data directory: the selectors added through the API, restored when
/// the agent starts. Written atomically (temp file, fsync, rename, fsync of the directory).
pub struct SelectorFile {
    path: PathBuf,
}

#[derive(Serialize, Deserialize, Default)]
struct SelectorFileBody {
    version: u32,
    selectors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectorFileError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a memscope selectors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl SelectorFileError {
    /// The kind of the I/O error, when it is one (a full disk answers 507).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            SelectorFileError::Io { source, .. } => Some(source.kind()),
            SelectorFileError::Corrupt { .. } => None,
        }
    }
}

impl SelectorFile {
    pub const NAME: &'static str = "selectors.json";

    pub fn in_dir(dir: &Path) -> SelectorFile {
        SelectorFile { path: dir.join(Self::NAME) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored selectors (none when the file does not exist yet).
    pub fn load(&self) -> Result<Vec<Selector>, SelectorFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SelectorFileError::Io { what: "reading", path: self.path.clone(), source }),
        };
        let corrupt = |reason: String| SelectorFileError::Corrupt { path: self.path.clone(), reason };
        let body: SelectorFileBody = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        body.selectors.iter().map(|s| Selector::parse(s).map_err(|e| corrupt(e.to_string()))).collect()
    }

    pub fn save(&self, selectors: &[&Selector]) -> Result<(), SelectorFileError> {
        let body = SelectorFileBody { version: 1, selectors: selectors.iter().map(|s| s.expr.clone()).collect() };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(".selectors.json.tmp");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| SelectorFileError::Io { what, path, source }
        };
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("writing", &tmp))?;
            let text = serde_json::to_vec_pretty(&body).expect("plain data");
            f.write_all(&text).and_then(|_| f.sync_all()).map_err(io("writing", &tmp))?;
            fs::rename(&tmp, &self.path).map_err(io("renaming", &tmp))
        })();
        if written.is_err() {
            // A half-written temp file (a full disk) is not left to hold the space.
            let _ = fs::remove_file(&tmp);
        }
        written?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The node's name, for the `node` label: `$NODE_NAME` (the DaemonSet sets it from the pod's
/// `spec.nodeName`), else the host name.
pub fn node_name() -> String {
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() && n.len() <= 253 {
            return n;
        }
    }
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::ContainerIdentity;

    fn k8s(ns: &str, pod: &str, name: &str, id: &str) -> ProcessInfo {
        ProcessInfo {
            pid: 10,
            comm: "srv".into(),
            exe: "/usr/bin/srv".into(),
            cgroup: format!("/kubepods.slice/x/cri-containerd-{id}.scope"),
            container: Some(ContainerIdentity {
                id: Some(id.into()),
                runtime: "containerd".into(),
                pod_uid: Some("u".into()),
                name: Some(name.into()),
                pod: Some(pod.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            }),
        }
    }

    /// A restarted container (new pid, new container id) keeps its id; another container or
    /// pod does not; a plain process is keyed by selector, executable and cgroup.
    #[test]
    fn ids_outlive_pids() {
        let sel = Selector::parse("pod=shop/web-*").unwrap();
        let a = identify(&sel, &k8s("shop", "web-0", "app", "aaaa"), "n1");
        let b = identify(&sel, &k8s("shop", "web-0", "app", "bbbb"), "n1");
        assert_eq!(a.id, b.id);
        assert!(a.id.starts_with("app-") && valid_id(&a.id), "{}", a.id);
        assert_eq!(a.labels["container_id"], "aaaa");
        assert_eq!(b.labels["container_id"], "bbbb");
        // The same pod and container on another node is the same workload.
        assert_eq!(a.id, identify(&sel, &k8s("shop", "web-0", "app", "aaaa"), "n2").id);
        assert_ne!(a.id, identify(&sel, &k8s("shop", "web-1", "app", "aaaa"), "n1").id);
        assert_ne!(a.id, identify(&sel, &k8s("shop", "web-0", "sidecar", "aaaa"), "n1").id);

        let sel = Selector::parse("comm=leaky").unwrap();
        let p = ProcessInfo { pid: 1, comm: "leaky".into(), exe: "/opt/Leaky App".into(), cgroup: "/app.service".into(), container: None };
        let q = ProcessInfo { pid: 2, ..p.clone() };
        let id = identify(&sel, &p, "n").id;
        assert_eq!(id, identify(&sel, &q, "n").id);
        assert!(id.starts_with("leaky-app-") && valid_id(&id), "{id}");
        let other_cgroup = ProcessInfo { cgroup: "/other.service".into(), ..p };
        assert_ne!(id, identify(&sel, &other_cgroup, "n").id);
        assert!(!valid_id("../etc") && !valid_id("A-1") && !valid_id("x"));
    }

    /// Restarts count new processes after the first; past pids are bounded.
    #[test]
    fn restarts_and_pids() {
        let sel = Selector::parse("comm=x").unwrap();
        let id = identify(&sel, &ProcessInfo { exe: "/x".into(), ..Default::default() }, "n");
        let mut w = Workload::new(&id, "s1", 0);
        w.attached(5, id.labels.clone(), 1);
        assert_eq!((w.restarts, w.pid, w.attached), (0, Some(5), true));
        w.gone(2);
        w.attached(6, id.labels.clone(), 2);
        assert_eq!((w.restarts, w.pids.clone()), (1, vec![5, 6]));
        for p in 0..100 {
            w.attached(100 + p, id.labels.clone(), 3);
        }
        assert_eq!(w.pids.len(), MAX_PAST_PIDS);
        assert_eq!(*w.pids.last().unwrap(), 199);
    }

    /// Worker ids: one per slot of a parent, stable, valid, labelled, even under a long name.
    #[test]
    fn worker_ids() {
        let sel = Selector::parse("comm=x").unwrap();
        let p = ProcessInfo { exe: "/usr/sbin/a-very-long-server-name-indeed-longer-than-32".into(), ..Default::default() };
        let parent = identify(&sel, &p, "n");
        let w0 = worker(&parent, 0);
        let w1 = worker(&parent, 1);
        assert_ne!(w0.id, w1.id);
        assert_eq!(w0, worker(&parent, 0));
        for w in [&w0, &w1, &worker(&parent, 4095)] {
            assert!(valid_id(&w.id), "{}", w.id);
        }
        assert!(w1.id.contains("-w1-"), "{}", w1.id);
        assert_eq!((w1.labels["worker"].as_str(), w1.labels["parent_workload"].as_str()), ("1", parent.id.as_str()));
        let wl = Workload::new(&w1, "s1", 0);
        assert_eq!((wl.parent.as_deref(), wl.worker), (Some(parent.id.as_str()), Some(1)));
        assert_eq!(Workload::new(&parent, "s1", 0).parent, None);
        // A worker's worker nests.
        assert!(valid_id(&worker(&w1, 2).id));
    }

    /// The selectors file round-trips and refuses a corrupt file with its path in the error.
    #[test]
    fn selector_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = SelectorFile::in_dir(dir.path());
        assert!(f.load().unwrap().is_empty());
        let a = Selector::parse("comm=a*,every=30s").unwrap();
        let b = Selector::parse("pod=ns/web-*").unwrap();
        f.save(&[&a, &b]).unwrap();
        assert_eq!(f.load().unwrap(), vec![a, b]);
        fs::write(f.path(), "{\"version\":1,\"selectors\":[\"bogus\"]}").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("selectors.json"));
    }
}
