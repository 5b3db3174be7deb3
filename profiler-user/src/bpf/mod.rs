//! Kernel side plumbing: find allocator symbols, choose probe sites, load and attach the eBPF
//! object, read its maps.
pub mod elf_symbols;
pub mod families;
pub mod forwarding;
pub mod go_runtime;
pub mod probe_site;
pub mod attach;
pub mod batch;
pub mod contract;
pub mod load;
pub mod reader;
pub mod session_link;
pub mod stripped;
pub mod target_view;
