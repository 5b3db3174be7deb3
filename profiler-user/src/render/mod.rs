//! Renderers: text report, folded stacks, flamegraph SVG, pprof, JSON. Pure functions of a
//! [`crate::aggregate::HeapProfile`], deterministic so they can be golden-tested.
