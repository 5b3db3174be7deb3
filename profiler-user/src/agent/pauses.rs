//! The agent's side of [`crate::pause`]: every V8 operation the agent runs on a target it
//! traces (heap snapshot, summary, GC) runs inside a pause window of that target, opened here
//! from the outside of the V8 code (the inspector session and the routes stay as they are).
use std::sync::Arc;

use super::State;
use crate::{pause::PauseGuard, target::TracedTarget};

/// The traced target whose process is `pid`, if the agent traces it.
pub(crate) fn target_of(state: &State, pid: u32) -> Option<Arc<dyn TracedTarget>> {
    state.targets.read().unwrap().values().find(|e| e.target.pid() == pid).map(|e| e.target.clone())
}

/// Opens a pause window on the traced target `pid` (its allocator probes leave the process
/// until the guard drops); `None` when the agent does not trace it.
pub(crate) fn begin(state: &State, pid: u32) -> Option<PauseGuard> {
    PauseGuard::begin(target_of(state, pid)?)
}
