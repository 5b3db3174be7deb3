//! Who a process is: its name, executable and cgroup, and, when it runs in a Kubernetes pod or
//! a container, the container's id and name and the pod's namespace, name and UID.
//!
//! What each source on the node gives (all read as root on the node, under `--node-root`):
//! - **the cgroup path** (`/proc/PID/cgroup`): the pod UID and QoS class, the container id
//!   and the runtime. systemd driver: `kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<UID>.slice/cri-containerd-<ID>.scope` (CRI-O: `crio-<ID>.scope`,
//!   Docker: `docker-<ID>.scope`); cgroupfs driver: `kubepods/burstable/pod<UID>/<ID>`.
//!   Written by the kubelet and the runtime: the process cannot change it (it could only
//!   move itself to another cgroup it may write to, which a container cannot).
//! - **the runtime's bundle** (`config.json` of the OCI bundle, annotations): containerd
//!   (`run/containerd/io.containerd.runtime.v2.task/k8s.io/<ID>/config.json`:
//!   `io.kubernetes.cri.container-name`, `sandbox-name`, `sandbox-namespace`) and CRI-O
//!   (`run/containers/storage/overlay-containers/<ID>/userdata/config.json`:
//!   `io.kubernetes.container.name`, `io.kubernetes.pod.name`, `io.kubernetes.pod.namespace`):
//!   container name, pod name and namespace. Not visible to the container: the best source.
//! - **kubelet's pod directory** (`var/lib/kubelet/pods/<UID>/`): `etc-hosts` (its last line is
//!   the pod's IP and hostname, which is the pod name unless the pod sets `spec.hostname`),
//!   the `namespace` file of the service-account volume
//!   (`volumes/kubernetes.io~projected/kube-api-access-*/namespace`, absent when the pod does
//!   not mount a token) and `containers/<NAME>/` (the names of the pod's containers; a
//!   container's name is known from it only when the pod has one). `etc-hosts` is mounted
//!   into the containers, which may write it: it is used only when the bundle is unreadable,
//!   and every name is checked to be a DNS name before it is used.
//! - The CRI socket is not used: everything it would give is in the two files above.
//!
//! Every file is opened without following symbolic links, only when regular, and read up to a
//! bound; a value that is not a Kubernetes name is dropped.
use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::procfs;

/// A process as selectors see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    /// The executable's path as the process sees it (inside its mount namespace).
    pub exe: String,
    /// The cgroup v2 path (`0::` line), else the first v1 path that names a container.
    pub cgroup: String,
    pub container: Option<ContainerIdentity>,
}

/// A container and its pod, as far as the node can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContainerIdentity {
    /// Container id (hex), from the cgroup path.
    pub id: Option<String>,
    /// `containerd`, `crio`, `docker` or `unknown`.
    pub runtime: String,
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort` (from the cgroup path).
    pub qos: Option<String>,
    pub name: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// Where the names came from: `bundle`, `kubelet` or nothing.
    pub names_from: Option<String>,
}

impl ContainerIdentity {
    /// `namespace`, `pod`, `container`, `pod_uid`, `container_id` when known.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v.clone());
            }
        };
        put("namespace", &self.namespace);
        put("pod", &self.pod);
        put("container", &self.name);
        put("pod_uid", &self.pod_uid);
        put("container_id", &self.id);
        m
    }
}

/// Where the node's kubelet and runtime directories are (`--node-root`, `/` on the node,
/// `/host` in the DaemonSet).
#[derive(Clone, Debug)]
pub struct NodePaths {
    pub root: PathBuf,
}

impl Default for NodePaths {
    fn default() -> Self {
        NodePaths { root: PathBuf::from("/") }
    }
}

impl NodePaths {
    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// Reads what selectors need of `pid`. `None` when the process is gone.
pub fn process_info(pid: u32, node: &NodePaths) -> Option<ProcessInfo> {
    let comm = procfs::comm(pid).ok()?;
    // Kernel threads have no executable; they are never targets.
    let exe = procfs::exe(pid).ok()?;
    let cgroup_file = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let cgroup = cgroup_path(&cgroup_file);
    let container = parse_cgroup(&cgroup).map(|c| enrich(c, node));
    Some(ProcessInfo { pid, comm, exe, cgroup, container })
}

/// The id of the cgroup v2 group `pid` is in now (the inode of its directory, what
/// `bpf_get_current_cgroup_id` gives the exec event), or `None` when it cannot be told (no
/// cgroup v2, a group outside the agent's cgroup namespace, the process gone).
pub fn cgroup_v2_id(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
        mounts.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split(' ').nth(4)?;
            post.starts_with("cgroup2 ").then(|| PathBuf::from(mount))
        })
    });
    let file = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = file.lines().find_map(|l| l.strip_prefix("0::"))?;
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    fs::metadata(root.as_ref()?.join(path.trim_start_matches('/'))).ok().map(|m| m.ino())
}

/// The v2 path, unless a v1 line names a container and the v2 one does not (hybrid hosts).
pub fn cgroup_path(file: &str) -> String {
    let mut v2 = None;
    let mut v1_container = None;
    for line in file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" {
            v2 = Some(path.to_string());
        } else if v1_container.is_none() && parse_cgroup(path).is_some() {
            v1_container = Some(path.to_string());
        }
    }
    match (v2, v1_container) {
        (Some(v2), _) if parse_cgroup(&v2).is_some() => v2,
        (_, Some(v1)) => v1,
        (Some(v2), None) => v2,
        (None, None) => "/".to_string(),
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_uid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The container and pod a cgroup path names, if any (see the module doc for the forms).
pub fn parse_cgroup(path: &str) -> Option<ContainerIdentity> {
    let mut c = ContainerIdentity { runtime: "unknown".into(), ..Default::default() };
    let mut in_kubepods = false;
    for comp in path.split('/') {
        if comp == "kubepods" || comp.starts_with("kubepods") {
            in_kubepods = true;
        }
        let base = comp.strip_suffix(".slice").unwrap_or(comp);
        // Pod: `kubepods-burstable-pod<UID>.slice` or `pod<UID>`.
        let pod_part = base.rsplit_once("-pod").map(|(_, u)| u).or_else(|| base.strip_prefix("pod"));
        if let Some(uid) = pod_part {
            let uid = uid.replace('_', "-");
            if valid_uid(&uid) {
                c.pod_uid = Some(uid);
                continue;
            }
        }
        if in_kubepods && c.pod_uid.is_none() {
            for q in ["burstable", "besteffort"] {
                if base == q || base.ends_with(&format!("-{q}")) {
                    c.qos = Some(q.to_string());
                }
            }
        }
        let scope = comp.strip_suffix(".scope").unwrap_or(comp);
        let (runtime, id) = if let Some(id) = scope.strip_prefix("cri-containerd-") {
            ("containerd", id)
        } else if scope.starts_with("crio-conmon-") {
            continue;
        } else if let Some(id) = scope.strip_prefix("crio-") {
            ("crio", id)
        } else if let Some(id) = scope.strip_prefix("docker-") {
            ("docker", id)
        } else if let Some(id) = scope.strip_prefix("containerd-") {
            ("containerd", id)
        } else {
            ("unknown", scope)
        };
        if id.len() >= 12 && id.len() <= 128 && is_hex(id) && (runtime != "unknown" || c.pod_uid.is_some()) {
            c.id = Some(id.to_ascii_lowercase());
            c.runtime = runtime.to_string();
        }
    }
    if c.pod_uid.is_some() && c.qos.is_none() {
        c.qos = Some("guaranteed".into());
    }
    (c.id.is_some() || c.pod_uid.is_some()).then_some(c)
}

/// A DNS subdomain or label, as Kubernetes names are (at most 253 characters).
fn k8s_name(s: &str) -> Option<String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.']);
    ok.then(|| s.to_string())
}

/// At most `max` bytes of a regular file, never through a symbolic link or a FIFO.
fn read_capped(path: &Path, max: u64) -> Option<String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(max).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Adds names from the runtime's bundle, else from kubelet's pod directory.
pub fn enrich(mut c: ContainerIdentity, node: &NodePaths) -> ContainerIdentity {
    if let Some(id) = c.id.clone() {
        let bundles = [
            (
                node.at("run/containerd/io.containerd.runtime.v2.task/k8s.io").join(&id).join("config.json"),
                ["io.kubernetes.cri.container-name", "io.kubernetes.cri.sandbox-name", "io.kubernetes.cri.sandbox-namespace"],
            ),
            (
                node.at("run/containers/storage/overlay-containers").join(&id).join("userdata/config.json"),
                ["io.kubernetes.container.name", "io.kubernetes.pod.name", "io.kubernetes.pod.namespace"],
            ),
        ];
        for (path, [name, pod, ns]) in bundles {
            let Some(text) = read_capped(&path, 4 << 20) else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            let a = &v["annotations"];
            let get = |k: &str| a[k].as_str().and_then(k8s_name);
            c.name = get(name);
            c.pod = get(pod);
            c.namespace = get(ns);
            c.names_from = Some("bundle".into());
            break;
        }
    }
    if let Some(uid) = c.pod_uid.clone() {
        let dir = node.at("var/lib/kubelet/pods").join(&uid);
        if let Some(hosts) = read_capped(&dir.join("etc-hosts"), 64 << 10) {
            c.pod = c.pod.or_else(|| pod_name_from_hosts(&hosts));
        }
        if c.namespace.is_none() {
            c.namespace = namespace_from_volumes(&dir);
        }
        if c.name.is_none() {
            let names: Vec<String> = fs::read_dir(dir.join("containers"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().to_str().and_then(k8s_name))
                .take(2)
                .collect();
            if names.len() == 1 {
                c.name = names.into_iter().next();
            }
        }
        if c.pod.is_some() || c.namespace.is_some() || c.name.is_some() {
            c.names_from.get_or_insert_with(|| "kubelet".into());
        }
    }
    c
}

/// The pod name from kubelet's `etc-hosts`: the last entry's last name.
fn pod_name_from_hosts(hosts: &str) -> Option<String> {
    let line = hosts.lines().map(str::trim).rfind(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut fields = line.split_whitespace();
    let ip = fields.next()?;
    if ip.starts_with("127.") || ip == "::1" || ip.starts_with("fe00") || ip.starts_with("ff0") {
        return None;
    }
    fields.last().and_then(k8s_name)
}

fn namespace_from_volumes(pod_dir: &Path) -> Option<String> {
    let projected = pod_dir.join("volumes/kubernetes.io~projected");
    for e in fs::read_dir(projected).ok()?.flatten().take(64) {
        let name = e.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with("kube-api-access-")) {
            continue;
        }
        if let Some(ns) = read_capped(&e.path().join("namespace"), 256).as_deref().and_then(k8s_name) {
            return Some(ns);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f8a2c1e-6d3b-4b8e-9a77-2f1c3d4e5a6b";
    const ID: &str = "4f3c2b1a00112233445566778899aabbccddeeff00112233445566778899aabb";

    /// The cgroup forms of kubelet + containerd / CRI-O (systemd and cgroupfs drivers) and of
    /// Docker give the pod UID, QoS, runtime and container id.
    #[test]
    fn cgroup_forms() {
        let u = UID.replace('-', "_");
        let c = parse_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
        ))
        .unwrap();
        assert_eq!((c.pod_uid.as_deref(), c.id.as_deref(), c.runtime.as_str()), (Some(UID), Some(ID), "containerd"));
        assert_eq!(c.qos.as_deref(), Some("burstable"));
        let c = parse_cgroup(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope")).unwrap();
        assert_eq!((c.runtime.as_str(), c.qos.as_deref()), ("crio", Some("guaranteed")));
        assert!(parse_cgroup(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope")).unwrap().id.is_none());
        let c = parse_cgroup(&format!("/kubepods/besteffort/pod{UID}/{ID}")).unwrap();
        assert_eq!((c.pod_uid.as_deref(), c.id.as_deref(), c.qos.as_deref()), (Some(UID), Some(ID), Some("besteffort")));
        let c = parse_cgroup(&format!("/system.slice/docker-{ID}.scope")).unwrap();
        assert_eq!((c.runtime.as_str(), c.pod_uid.as_deref()), ("docker", None));
        // Relative to the agent's own cgroup namespace (a DaemonSet pod).
        assert!(parse_cgroup(&format!("/../../kubepods-pod{u}.slice/cri-containerd-{ID}.scope")).is_some());
        assert!(parse_cgroup("/user.slice/user-0.slice/session-3.scope").is_none());
        assert!(parse_cgroup("/").is_none());
        assert!(parse_cgroup("/system.slice/deadbeefdeadbeef.scope").is_none());
    }

    /// Hybrid hosts: the v2 line wins unless only a v1 line names a container.
    #[test]
    fn cgroup_lines() {
        assert_eq!(cgroup_path("0::/a.slice/b.scope\n"), "/a.slice/b.scope");
        let f = format!("4:memory:/kubepods/pod{UID}/{ID}\n0::/\n");
        assert_eq!(cgroup_path(&f), format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(cgroup_path(""), "/");
    }

    /// Names come from the containerd bundle first, else from kubelet's pod directory; values
    /// that are not Kubernetes names are dropped.
    #[test]
    fn names_from_node_files() {
        let root = tempfile::tempdir().unwrap();
        let node = NodePaths { root: root.path().to_owned() };
        let pod = root.path().join("var/lib/kubelet/pods").join(UID);
        fs::create_dir_all(pod.join("containers/app/1a2b")).unwrap();
        fs::create_dir_all(pod.join("volumes/kubernetes.io~projected/kube-api-access-x7k2q")).unwrap();
        fs::write(pod.join("volumes/kubernetes.io~projected/kube-api-access-x7k2q/namespace"), "shop").unwrap();
        fs::write(pod.join("etc-hosts"), "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost\n10.1.2.3\tweb-7d9f\n").unwrap();
        let base = parse_cgroup(&format!("/kubepods/pod{UID}/{ID}")).unwrap();
        let c = enrich(base.clone(), &node);
        assert_eq!((c.namespace.as_deref(), c.pod.as_deref(), c.name.as_deref()), (Some("shop"), Some("web-7d9f"), Some("app")));
        assert_eq!(c.names_from.as_deref(), Some("kubelet"));

        // Two containers: the name is not guessed.
        fs::create_dir_all(pod.join("containers/sidecar")).unwrap();
        assert_eq!(enrich(base.clone(), &node).name, None);

        let bundle = root.path().join("run/containerd/io.containerd.runtime.v2.task/k8s.io").join(ID);
        fs::create_dir_all(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            r#"{"annotations": {"io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-name": "web-0",
                "io.kubernetes.cri.sandbox-namespace": "Bad Name!"}}"#,
        )
        .unwrap();
        let c = enrich(base, &node);
        assert_eq!((c.name.as_deref(), c.pod.as_deref()), (Some("app"), Some("web-0")));
        // The bundle's namespace is not a name; the service-account volume gives it.
        assert_eq!(c.namespace.as_deref(), Some("shop"));
        assert_eq!(c.names_from.as_deref(), Some("bundle"));

        // A symlinked etc-hosts is not followed.
        fs::remove_file(pod.join("etc-hosts")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", pod.join("etc-hosts")).unwrap();
        assert!(read_capped(&pod.join("etc-hosts"), 100).is_none());
    }
}
