//! Cgroup v2 helpers of the agent tests that place processes in cgroups of their own: where
//! the hierarchy is mounted, and groups made by a test and removed after it.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ").then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .expect("cgroup v2 is mounted")
}

/// The cgroups a test made, removed (deepest first) when dropped.
pub struct Cgroups(pub Vec<PathBuf>);

impl Cgroups {
    /// Makes `root/rel` and each missing group on the way, remembering those it made.
    pub fn make(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut p = root.to_path_buf();
        for comp in rel.split('/') {
            p.push(comp);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.0.push(p.clone());
            }
        }
        p
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(p).is_ok() || !p.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
