//! Export to fleet engines that already exist: [`push`] sends each workload's heap profile to
//! a Pyroscope-compatible ingest endpoint. (Prometheus scrapes `/metrics` itself.)
pub mod push;
