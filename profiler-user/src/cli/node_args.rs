//! The node-level flags of `memscope agent`: selectors (`--select`, repeatable) and where the
//! node's kubelet and runtime directories are (`--node-root`), and `--push` with its options.
//! See [`crate::discover`] and [`crate::export::push`].
use std::path::PathBuf;

use clap::Args;

use crate::{
    agent::workloads::NodeConfig,
    discover::{NodePaths, Selector},
    export::push::{self, PushAuth, PushConfig},
};

#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Trace every process that matches, now and whenever one starts: terms joined with `,`,
    /// all of which must match: `comm=GLOB`, `exe=GLOB`, `cgroup=GLOB`, `container=GLOB`
    /// (id or name), `pod=NAMESPACE/NAME-GLOB`; trigger terms (`every=5m`, `growth=20%`,
    /// `exit`, ...) are attached to what it finds. Repeatable; more with POST /v1/selectors.
    #[arg(long = "select", value_name = "EXPR", value_parser = parse_selector, help_heading = "Node")]
    pub selectors: Vec<Selector>,
    /// Selectors, one per line (`#` starts a comment), as --select takes them: e.g. a
    /// ConfigMap mounted into the DaemonSet. Watched: when it changes, selectors it no longer
    /// has are removed (their workloads detached), new ones added; the others keep their
    /// targets attached. A changed file that does not parse is refused, logged and counted,
    /// and the selectors in force stay.
    #[arg(long, value_name = "FILE", help_heading = "Node")]
    pub select_file: Option<PathBuf>,
    /// A child forked by a process traced under a `forks=true` selector is attached once it
    /// lived this long; children that exit sooner (a connection backend of a
    /// fork-per-connection server) are counted, not attached. 0 attaches every child.
    #[arg(long, default_value = "250ms", value_parser = super::units::parse_duration, value_name = "DURATION", help_heading = "Node")]
    pub fork_min_lifetime: std::time::Duration,
    /// Where the node's /var/lib/kubelet and /run of the container runtime are found
    /// (`/host` when the node's root is mounted there, as in the DaemonSet).
    #[arg(long, default_value = "/", value_name = "DIR", help_heading = "Node")]
    pub node_root: PathBuf,
    /// Send each workload's heap profile (pprof) to this Pyroscope-compatible endpoint
    /// (`POST URL/ingest?name=APP{node=,namespace=,pod=,container=,executable=}...`).
    /// https://, or http:// to loopback (elsewhere with --allow-insecure-remote).
    #[arg(long, value_name = "URL", help_heading = "Push")]
    pub push: Option<String>,
    /// How often each workload's profile is sent.
    #[arg(long, default_value = "60s", value_parser = super::units::parse_duration, value_name = "DURATION", help_heading = "Push")]
    pub push_interval: std::time::Duration,
    /// File (mode 0600) holding the bearer token for --push.
    #[arg(long, value_name = "FILE", conflicts_with = "push_basic_auth_file", help_heading = "Push")]
    pub push_token_file: Option<PathBuf>,
    /// File (mode 0600) holding `USER:PASSWORD` for basic auth to --push.
    #[arg(long, value_name = "FILE", help_heading = "Push")]
    pub push_basic_auth_file: Option<PathBuf>,
    /// PEM CA certificate(s) the --push endpoint's certificate must chain to.
    #[arg(long, value_name = "FILE", help_heading = "Push")]
    pub push_ca_cert: Option<PathBuf>,
    /// Profiles waiting to be sent at most; more are dropped (counted in /metrics).
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = "Push")]
    pub push_queue: usize,
    /// Retries of a refused or failed post (0.5 s backoff, doubling).
    #[arg(long, default_value_t = 3, value_name = "N", help_heading = "Push")]
    pub push_retries: u32,
}

/// Selectors of a `--select-file`: one per line, blank lines and `#` comments skipped.
pub fn read_select_file(path: &std::path::Path) -> anyhow::Result<Vec<Selector>> {
    crate::workload::parse_select_file(path, &crate::workload::read_select_text(path)?)
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| e.to_string())
}

impl NodeArgs {
    /// The node configuration; refuses a bad --push URL or an unsafe secret file.
    pub fn config(&self, allow_insecure_remote: bool) -> anyhow::Result<NodeConfig> {
        let push = match &self.push {
            None => {
                if self.push_token_file.is_some() || self.push_basic_auth_file.is_some() || self.push_ca_cert.is_some() {
                    anyhow::bail!("--push-token-file, --push-basic-auth-file and --push-ca-cert need --push URL");
                }
                None
            }
            Some(url) => {
                push::check_url(url, allow_insecure_remote)?;
                anyhow::ensure!(self.push_interval >= std::time::Duration::from_secs(1), "--push-interval must be at least 1s");
                let auth = match (&self.push_token_file, &self.push_basic_auth_file) {
                    (Some(f), _) => PushAuth::Bearer(push::read_secret(f)?),
                    (None, Some(f)) => {
                        let up = push::read_secret(f)?;
                        anyhow::ensure!(up.contains(':'), "{}: expected USER:PASSWORD", f.display());
                        PushAuth::Basic(up)
                    }
                    (None, None) => PushAuth::None,
                };
                Some(PushConfig {
                    url: url.clone(),
                    interval: self.push_interval,
                    auth,
                    ca_cert: self.push_ca_cert.clone(),
                    queue: self.push_queue.max(1),
                    retries: self.push_retries.min(10),
                    timeout: std::time::Duration::from_secs(30),
                })
            }
        };
        let file_selectors = match &self.select_file {
            Some(f) => read_select_file(f)?,
            None => Vec::new(),
        };
        Ok(NodeConfig {
            selectors: self.selectors.clone(),
            select_file: self.select_file.clone(),
            file_selectors,
            node_paths: NodePaths { root: self.node_root.clone() },
            push,
            fork_min_lifetime: self.fork_min_lifetime,
            ..NodeConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A selectors file: comments and blank lines skipped; a bad line named by number.
    #[test]
    fn select_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("selectors");
        std::fs::write(&f, "# shop\npod=shop/web-*,container=app,every=5m  # the web tier\n\ncomm=redis-server\n").unwrap();
        let s = read_select_file(&f).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].expr, "pod=shop/web-*,container=app,every=5m");
        std::fs::write(&f, "comm=a\nbogus\n").unwrap();
        assert!(read_select_file(&f).unwrap_err().to_string().contains(":2:"));
    }
}
