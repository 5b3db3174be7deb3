//! Folded stacks (Brendan Gregg's `stackcollapse` format), the input of `flamegraph.pl`,
//! inferno, speedscope and friends: one line per stack, frames outermost first joined by `;`,
//! a space, then the value in bytes.
//!
//! Owns the frame-name sanitizing shared by every folded-based output (flamegraphs and the
//! differential `stack before after` form in [`super::json::diff_folded`]): a `;` inside a name
//! becomes `:`, whitespace runs (newlines, tabs) become one space, and a space in front of a
//! digit becomes `_`, so that no name can end in what a parser would take for a count.
//! Stacks whose sanitized names are equal are merged (their values summed); lines with a zero
//! value are left out; lines are sorted bytewise so the output is deterministic.
use std::collections::{BTreeMap, HashMap};

use crate::aggregate::{Frame, FrameInfo, HeapProfile, Measure, StackSample};

/// The name of `f` as it appears in folded stacks: [`FrameInfo::display_name`], sanitized so the
/// line still parses (see the module doc). Never empty.
pub fn folded_name(f: &Frame) -> String {
    let raw = f.display_name();
    let mut out = String::with_capacity(raw.len());
    let mut pending_space = false;
    for c in raw.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(if c.is_ascii_digit() { '_' } else { ' ' });
            pending_space = false;
        }
        out.push(if c == ';' { ':' } else { c });
    }
    if out.is_empty() {
        out.push_str("[unknown]");
    }
    out
}

/// Folds stacks, sanitizing each shared frame once (50k stacks of a profile are made of a few
/// thousand frames).
#[derive(Default)]
pub struct Folder {
    names: HashMap<*const FrameInfo, String>,
}

impl Folder {
    /// The folded stack of a sample: sanitized names, outermost frame first, joined by `;`.
    /// A sample without frames folds to `[no stack]`.
    pub fn stack_key(&mut self, s: &StackSample) -> String {
        if s.frames.is_empty() {
            return "[no stack]".to_string();
        }
        let mut key = String::new();
        for f in s.frames.iter().rev() {
            if !key.is_empty() {
                key.push(';');
            }
            key.push_str(self.names.entry(std::ptr::from_ref::<FrameInfo>(f)).or_insert_with(|| folded_name(f)));
        }
        key
    }
}

/// Folded stacks of `p`, valued by `m` (bytes), merged and sorted; ends with a newline unless
/// empty.
pub fn folded(p: &HeapProfile, m: Measure) -> String {
    let mut folder = Folder::default();
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for s in &p.stacks {
        let v = m.of(s);
        if v > 0 {
            *merged.entry(folder.stack_key(s)).or_default() += v;
        }
    }
    let mut out = String::new();
    for (stack, v) in merged {
        out.push_str(&stack);
        out.push(' ');
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FrameInfo;

    fn named(n: &str) -> Frame {
        FrameInfo { function: Some(n.into()), ..FrameInfo::default() }.into()
    }

    #[test]
    fn names_that_would_break_parsing_are_sanitized() {
        assert_eq!(folded_name(&named("core::ptr::drop<[u8; 8]>")), "core::ptr::drop<[u8:_8]>");
        assert_eq!(folded_name(&named("a\nb\t c")), "a b c");
        assert_eq!(folded_name(&named("handler 42")), "handler_42");
        assert_eq!(folded_name(&named("<impl Foo for Bar>::f")), "<impl Foo for Bar>::f");
        assert_eq!(folded_name(&named("  ")), "[unknown]");
    }

    #[test]
    fn merges_skips_zero_and_sorts() {
        let s = |names: &[&str], live: u64| StackSample {
            frames: names.iter().map(|n| named(n)).collect(),
            live_bytes: live,
            ..StackSample::default()
        };
        let p = HeapProfile {
            stacks: vec![s(&["b", "main"], 5), s(&["a", "main"], 7), s(&["b", "main"], 1), s(&["c"], 0)],
            ..HeapProfile::default()
        };
        assert_eq!(folded(&p, Measure::Inuse), "main;a 7\nmain;b 6\n");
        assert_eq!(folded(&p, Measure::Alloc), "");
    }
}
