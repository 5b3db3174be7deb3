//! memscope's user side, in the order the data flows:
//! [`procfs`] finds the target and its allocator, [`bpf`] loads the probes once and gives each
//! target a view over them ([`bpf::target_view`]), attaches and reads them, [`governor`] keeps
//! their cost within a budget, [`unwind`] gives the probes each mapped file's CFI as tables, [`aggregate`] builds heap profiles, [`symbolize`] names frames, [`render`] writes reports,
//! [`store`] keeps snapshots, [`agent`] is the long-running agent (targets, workloads, triggers,
//! push), [`api`] serves it over HTTP, [`cli`] is the command line.
//! [`target_fs`] opens files a target controls without leaving its root; [`target`] is the
//! seam between the tracing half and the serving half; [`discover`] picks the processes to trace
//! and [`workload`] keeps them across restarts; [`trigger`] decides when to take snapshots
//! without being asked; [`pause`] takes the probes out of a target while V8 walks its heap
//! and keeps the time memscope pauses it within a budget.
pub mod agent;
pub mod aggregate;
pub mod api;
pub mod bpf;
pub mod budget;
pub mod cli;
pub mod discover;
pub mod export;
pub mod errors;
pub mod fuzzing;
pub mod governor;
pub mod pause;
pub mod process;
pub mod procfs;
pub mod render;
pub mod session;
pub mod store;
pub mod symbolize;
pub mod target;
pub mod target_fs;
pub mod target_mem;
pub mod trigger;
pub mod truncation_guard;
pub mod unwind;
pub mod v8;
pub mod workload;
pub mod units;
