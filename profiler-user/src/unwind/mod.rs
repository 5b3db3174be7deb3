//! Unwinding: whole stacks for code built without frame pointers (almost every production
//! binary). The probes unwind each recorded allocation themselves, table-driven (as the Parca
//! agent, the OpenTelemetry eBPF profiler and lightswitch do for CPU profiles), so stacks are
//! still hashed, stored and counted in the kernel and `--sampling full` stays exact:
//!
//! - [`table`] compiles a file's CFI (`.eh_frame`, `.debug_frame`, a separate debug file) into
//!   8-byte rows, once per file ([`cache`]: keyed by device and inode, shared by every target
//!   of the process while one of them maps the file);
//! - [`target`] places the tables of the files a target maps in `UNWIND_ROWS` and keeps its
//!   slot's `UNWIND_MAPPINGS` (address range -> file rows, or frame pointers for code with no
//!   CFI such as JIT code) in step with `/proc/PID/maps`, so `dlopen`ed libraries are picked up;
//! - [`shared`] hands out ranges of the one row map of all targets.
//!
//! Why in the probes rather than copying the stack out and unwinding here (perf's
//! `--call-graph=dwarf`, framehop): the copy would cost every recorded allocation a stack
//! read and an event to this process, and stacks could no longer be aggregated in the kernel.
//! Measured costs are in docs/performance.md.
pub mod cache;
pub mod shared;
pub mod table;
pub mod target;

pub use shared::SharedRows;
pub use target::{TargetUnwinder, UnwindHandle, UnwindStats};
