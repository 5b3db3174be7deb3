//! Renderers: text report, folded stacks, flamegraph SVG, pprof, JSON. Pure functions of a
//! [`crate::aggregate::HeapProfile`], deterministic so they can be golden-tested.
//!
//! Each output lives in its own module: [`text`] (the human leak report), [`folded`] (Brendan
//! Gregg folded stacks), [`flamegraph`] (SVG through inferno), [`pprof`] (gzip-compressed
//! `perftools.profiles.Profile`, like a Go heap profile) and [`json`] (the documented leak
//! schema, the whole profile, and diffs). This module holds what they share: [`RenderError`],
//! [`human_bytes`] and the [`Format`] switch used by the CLI and the HTTP API.
//!
//! Limits: nothing here reads the clock, the environment or random state; the same profile
//! always renders to the same bytes (with the same inferno and flate2 versions).

pub mod escape;
pub mod flamegraph;
pub mod folded;
pub mod json;
pub mod pprof;
pub mod text;

use crate::aggregate::{HeapProfile, Measure};

/// What can go wrong while rendering (or decoding our own pprof output).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("rendering the flamegraph")]
    Flamegraph(#[source] std::io::Error),
    #[error("gzip-compressing the pprof profile")]
    Compress(#[source] std::io::Error),
    #[error("gunzipping the pprof profile")]
    Decompress(#[source] std::io::Error),
    #[error("decoding the pprof protobuf")]
    Decode(#[source] prost::DecodeError),
    #[error("encoding JSON")]
    Json(#[source] serde_json::Error),
}

/// `1023 B`, `1.5 KiB`, `12.0 MiB`, `3.2 GiB` (binary units, one decimal above bytes; GiB is
/// the largest unit).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the value would print as 1024.0 or more (1048575 B is "1.0 MiB", not
    // "1024.0 KiB").
    while unit + 1 < UNITS.len() && value >= 1023.95 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An output format, as named on the command line and in the HTTP API (`?format=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The whole [`HeapProfile`] as JSON ([`json::heap_json`]).
    Json,
    /// gzip-compressed pprof protobuf ([`pprof::pprof_gz`]).
    Pprof,
    /// Folded stacks ([`folded::folded`]).
    Folded,
    /// Flamegraph SVG ([`flamegraph::flamegraph_svg`]).
    Svg,
    /// The human leak report ([`text::leak_report`]).
    Text,
}

impl Format {
    /// Every format, in a stable order (for help texts and tests).
    pub const ALL: [Format; 5] = [Format::Json, Format::Pprof, Format::Folded, Format::Svg, Format::Text];

    /// Parses a format name: `json`, `pprof` (or `pb.gz`), `folded` (or `collapsed`), `svg` (or
    /// `flamegraph`), `text` (or `txt`). Case-sensitive, like [`Measure::parse`].
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "pprof" | "pb.gz" => Some(Format::Pprof),
            "folded" | "collapsed" => Some(Format::Folded),
            "svg" | "flamegraph" => Some(Format::Svg),
            "text" | "txt" => Some(Format::Text),
            _ => None,
        }
    }

    /// The canonical name accepted by [`Format::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Pprof => "pprof",
            Format::Folded => "folded",
            Format::Svg => "svg",
            Format::Text => "text",
        }
    }

    /// HTTP `Content-Type` of the rendered bytes.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            // What Go's net/http/pprof serves; the bytes are gzip, not a gzip transfer encoding.
            Format::Pprof => "application/octet-stream",
            Format::Folded | Format::Text => "text/plain; charset=utf-8",
            Format::Svg => "image/svg+xml",
        }
    }

    /// File name extension, without the leading dot.
    pub fn file_extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Pprof => "pb.gz",
            Format::Folded => "folded",
            Format::Svg => "svg",
            Format::Text => "txt",
        }
    }
}

/// Number of leaks listed by [`render`] for [`Format::Text`].
pub const DEFAULT_TOP: usize = 20;

/// Renders `p` in `format`. `m` picks the quantity for folded stacks and flamegraphs; JSON is
/// the whole profile, pprof carries every quantity, text is the leak report (top
/// [`DEFAULT_TOP`]).
pub fn render(p: &HeapProfile, format: Format, m: Measure) -> Result<Vec<u8>, RenderError> {
    match format {
        Format::Json => serde_json::to_vec_pretty(&json::heap_json(p)).map_err(RenderError::Json),
        Format::Pprof => pprof::pprof_gz(p),
        Format::Folded => Ok(folded::folded(p, m).into_bytes()),
        Format::Svg => flamegraph::flamegraph_svg(p, m, &flamegraph::default_title(p, m)),
        Format::Text => Ok(text::leak_report(p, DEFAULT_TOP).into_bytes()),
    }
}

/// Words for a measure, used in titles and headers.
pub(crate) fn measure_words(m: Measure) -> &'static str {
    match m {
        Measure::Inuse => "live bytes",
        Measure::Alloc => "allocated bytes",
        Measure::Leaks => "leaked bytes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units_and_boundaries() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(2048 << 30), "2048.0 GiB");
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(Format::parse(f.name()), Some(f));
            assert!(!f.content_type().is_empty());
            assert!(!f.file_extension().starts_with('.'));
        }
        assert_eq!(Format::parse("flamegraph"), Some(Format::Svg));
        assert_eq!(Format::parse("xml"), None);
    }
}
