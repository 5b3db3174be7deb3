//! The node-level flags of `memscope agent`: selectors (`--select`, repeatable) and where the
//! node's kubelet and runtime directories are (`--node-root`). See [`crate::discover`].
use std::path::PathBuf;

use clap::Args;

use crate::{
    api::workloads::NodeConfig,
    discover::{NodePaths, Selector},
};

#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Trace every process that matches, now and whenever one starts: terms joined with `,`,
    /// all of which must match: `comm=GLOB`, `exe=GLOB`, `cgroup=GLOB`, `container=GLOB`
    /// (id or name), `pod=NAMESPACE/NAME-GLOB`; trigger terms (`every=5m`, `growth=20%`,
    /// `exit`, ...) are attached to what it finds. Repeatable; more with POST /v1/selectors.
    #[arg(long = "select", value_name = "EXPR", value_parser = parse_selector, help_heading = "Node")]
    pub selectors: Vec<Selector>,
    /// Where the node's /var/lib/kubelet and /run of the container runtime are found
    /// (`/host` when the node's root is mounted there, as in the DaemonSet).
    #[arg(long, default_value = "/", value_name = "DIR", help_heading = "Node")]
    pub node_root: PathBuf,
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| e.to_string())
}

impl NodeArgs {
    pub fn config(&self) -> NodeConfig {
        NodeConfig { selectors: self.selectors.clone(), node_paths: NodePaths { root: self.node_root.clone() } }
    }
}
