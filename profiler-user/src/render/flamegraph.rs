//! Flamegraph SVGs, drawn by inferno from our folded stacks ([`super::folded`]): one of a
//! profile, and a differential one showing growth between two profiles of the same process.
//!
//! Colors come from inferno's memory palette and are chosen by a stable hash of the function
//! name (`Options::deterministic`), so the same profile always gives the same bytes. inferno
//! refuses empty input; for a profile with nothing to show we write a small valid SVG that says
//! "no allocations" instead of failing. Frames narrower than inferno's minimum width (0.1 % of
//! the total) are left out of the picture, as usual for flamegraphs.
use inferno::flamegraph::{self, color::BasicPalette, Options, Palette};

use super::{folded, json::diff_folded, measure_words, RenderError};
use crate::aggregate::{HeapProfile, Measure};

/// A title for a flamegraph of `p` valued by `m`, e.g. "memscope: live bytes of pid 42".
pub fn default_title(p: &HeapProfile, m: Measure) -> String {
    format!("memscope: {} of pid {}", measure_words(m), p.pid)
}

fn options(title: &str, subtitle: String) -> Options<'static> {
    // `Options` is non-exhaustive: no struct literal.
    let mut o = Options::default();
    o.colors = Palette::Basic(BasicPalette::Mem);
    o.deterministic = true;
    // Folded input comes sorted (see `folded`): inferno need not sort it again.
    o.no_sort = true;
    o.count_name = "bytes".to_string();
    o.title = title.to_string();
    o.subtitle = Some(subtitle);
    o
}

fn sampling(p: &HeapProfile) -> String {
    if let Some(note) = p.source_note() {
        format!("source {note}, values are estimates")
    } else if p.sample_bytes > 0 {
        format!("sampled every {} on average, values are estimates", super::human_bytes(p.sample_bytes))
    } else {
        "every allocation recorded".to_string()
    }
}

fn draw(mut opts: Options<'_>, folded: &str) -> Result<Vec<u8>, RenderError> {
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opts, folded.lines(), &mut svg).map_err(RenderError::Flamegraph)?;
    Ok(svg)
}

/// Flamegraph of `p` valued by `m`, in bytes. An empty profile gives a valid SVG saying
/// "no allocations".
pub fn flamegraph_svg(p: &HeapProfile, m: Measure, title: &str) -> Result<Vec<u8>, RenderError> {
    let lines = folded::folded(p, m);
    if lines.is_empty() {
        return Ok(empty_svg(title, &format!("no allocations: no {} to show", measure_words(m))));
    }
    let subtitle = format!("pid {}, {} after attach, {}", p.pid, secs(p.duration_s), sampling(p));
    draw(options(title, subtitle), &lines)
}

/// Differential flamegraph from `before` to `after` (inferno's `stack before after` input, see
/// [`diff_folded`]): frame widths are `after`'s values, red frames grew and blue ones shrank,
/// darker for larger changes. Stacks gone in `after` have no width, so their shrinkage is only
/// visible where they share frames with remaining stacks; use [`super::json::diff_json`] for
/// the full list.
pub fn diff_flamegraph_svg(
    before: &HeapProfile,
    after: &HeapProfile,
    m: Measure,
    title: &str,
) -> Result<Vec<u8>, RenderError> {
    let lines = diff_folded(before, after, m);
    let has_width = lines.lines().any(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"));
    if !has_width {
        return Ok(empty_svg(title, &format!("no allocations: no {} in the later profile", measure_words(m))));
    }
    let subtitle = format!(
        "{} from {} to {} after attach: red grew, blue shrank",
        measure_words(m),
        secs(before.duration_s),
        secs(after.duration_s)
    );
    draw(options(title, subtitle), &lines)
}

fn secs(s: f64) -> String {
    format!("{s:.1}s")
}

/// A minimal standalone SVG with a title and one line of text.
fn empty_svg(title: &str, message: &str) -> Vec<u8> {
    format!(
        concat!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n",
            "<svg version=\"1.1\" width=\"1200\" height=\"90\" viewBox=\"0 0 1200 90\" ",
            "xmlns=\"http://www.w3.org/2000/svg\">\n",
            "<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eef2ee\"/>\n",
            "<text x=\"600\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{}</text>\n",
            "<text x=\"600\" y=\"60\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">{}</text>\n",
            "</svg>\n"
        ),
        xml_escape(title),
        xml_escape(message)
    )
    .into_bytes()
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_profile_gives_an_svg_not_an_error() {
        let svg = flamegraph_svg(&HeapProfile::default(), Measure::Inuse, "a <b> & c").unwrap();
        let s = String::from_utf8(svg).unwrap();
        assert!(s.starts_with("<?xml"), "{s}");
        assert!(s.contains("no allocations"), "{s}");
        assert!(s.contains("a &lt;b&gt; &amp; c"), "{s}");
        assert!(s.trim_end().ends_with("</svg>"), "{s}");
    }
}
