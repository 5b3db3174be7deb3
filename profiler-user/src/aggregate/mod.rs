//! Aggregation: turns what the probes recorded (per-stack totals and live allocations) into a
//! [`HeapProfile`], and compares profiles.

pub mod build;
pub mod growth;
pub mod profile;

pub use profile::{Frame, FrameInfo, HeapProfile, Measure, ModuleMapping, StackSample, Totals};
