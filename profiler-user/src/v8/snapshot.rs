//! V8 heap snapshots (`.heapsnapshot`, the JSON Chrome DevTools loads), streamed: each
//! `HeapProfiler.addHeapSnapshotChunk` goes to a sink as it arrives, so the caller's memory is
//! O(chunk), whatever the heap's size. V8 pauses the target while it walks the heap (see
//! docs/node.md for measured pauses), then serializes. V8 writes chunks of ~100 KB; a chunk
//! over [`MAX_CHUNK_BYTES`] is refused ([`V8Error::TooLarge`]), which bounds what the buffers
//! downstream (8 chunks per HTTP client, 16 in a summary's pipe) can hold.
//!
//! [`take_keeping_ids`] is what the agent uses: through the target's snapshot channel
//! ([`super::channel`]), so that the ids of objects that survive are the same from one snapshot
//! to the next (an inspector session of its own, [`take`], renumbers every object).
use std::{cell::RefCell, time::Duration};

use serde_json::{json, Value};

use super::{channel, Protocol, V8Error};

/// Takes a heap snapshot of `pid` through its snapshot channel (installed first if needed, an
/// inspector session audited with `purpose`), passing its text to `sink` chunk by chunk; object
/// ids stay the same across such snapshots. `gc`: a full garbage collection first (V8 collects
/// garbage for a snapshot anyway). Falls back to [`take`] through the inspector when the channel
/// cannot be installed. Returns the bytes written.
pub fn take_keeping_ids(
    process: &std::sync::Arc<crate::process::Process>,
    purpose: &str,
    gc: bool,
    budget: super::Budget,
    sink: impl FnMut(&str) -> Result<(), V8Error>,
) -> Result<u64, V8Error> {
    let sink = RefCell::new(sink);
    let timeout = budget.left();
    channel::with_channel(
        process,
        purpose,
        budget,
        |ch| {
            if gc {
                Protocol::call(ch, "HeapProfiler.collectGarbage", json!({}), timeout)?;
            }
            ch.snapshot(timeout, &mut |c| (sink.borrow_mut())(c))
        },
        |insp| take(insp, gc, timeout, |c| (sink.borrow_mut())(c)),
    )
}

/// Largest snapshot chunk accepted (V8's are ~100 KB).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Takes a heap snapshot, passing its text to `sink` chunk by chunk (a sink error stops the
/// transfer: the client went away). `gc`: a full garbage collection first, so that only live
/// objects are in it. Returns the bytes written.
pub fn take(
    insp: &mut impl Protocol,
    gc: bool,
    timeout: Duration,
    mut sink: impl FnMut(&str) -> Result<(), V8Error>,
) -> Result<u64, V8Error> {
    insp.call("HeapProfiler.enable", json!({}), timeout)?;
    if gc {
        insp.collect_garbage()?;
    }
    let mut bytes = 0u64;
    insp.call_with_events(
        "HeapProfiler.takeHeapSnapshot",
        json!({ "reportProgress": false, "captureNumericValue": false }),
        timeout,
        |method, params: &Value| {
            if method == "HeapProfiler.addHeapSnapshotChunk" {
                let chunk = params.get("chunk").and_then(Value::as_str).unwrap_or("");
                if chunk.len() > MAX_CHUNK_BYTES {
                    return Err(V8Error::TooLarge(format!("the inspector sent a heap snapshot chunk larger than {} MiB", MAX_CHUNK_BYTES >> 20)));
                }
                bytes += chunk.len() as u64;
                sink(chunk)?;
            }
            Ok(())
        },
    )?;
    let _ = insp.call("HeapProfiler.disable", json!({}), Duration::from_secs(10));
    Ok(bytes)
}
