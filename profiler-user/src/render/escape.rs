//! Terminal-safe text: the one escaping function every human-readable printer applies to
//! strings a traced process controls (its comm and executable path, function and file names
//! from its symbols and perf map, V8 constructor names, library paths).
//!
//! Why: such a string may carry escape sequences (clear the screen, set the window title,
//! rewrite the clipboard through OSC 52), carriage returns and newlines (fake table rows, a
//! report line that looks like memscope's own), or bidirectional overrides (text that reads
//! differently than it sorts). JSON output is already safe (serde escapes control characters),
//! binary formats are not for terminals; tables, the text report (`report.txt`, `?format=text`)
//! and the client's messages go through [`term`], whole text documents printed to a terminal
//! through [`term_document`] as a last line of defence.
//!
//! What is escaped: every Unicode control character (C0 including newline and tab, DEL, C1)
//! and the bidirectional formatting characters (U+061C, U+200E, U+200F, U+202A..U+202E,
//! U+2066..U+2069). They become `\n`, `\r`, `\t`, `\e` or `\u{XX}`: visible, one line, and
//! unambiguous enough for a person. Everything else, including non-ASCII letters, is kept.
use std::borrow::Cow;

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{1b}' => out.push_str("\\e"),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

/// `s` with its control and bidi characters escaped (see the module doc): safe to print on a
/// terminal and one line. Borrowed when there is nothing to escape.
pub fn term(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A whole text document (a report, folded stacks) made safe for a terminal: as [`term`] but
/// its own line structure is kept (newlines stay, and so do tabs); bytes that are not UTF-8
/// become U+FFFD. For text whose fields were already escaped this changes nothing.
pub fn term_document(bytes: &[u8]) -> Cow<'_, [u8]> {
    let text = String::from_utf8_lossy(bytes);
    if !text
        .chars()
        .any(|c| c != '\n' && c != '\t' && needs_escape(c))
    {
        return match text {
            Cow::Borrowed(_) => Cow::Borrowed(bytes),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        };
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c != '\n' && c != '\t' && needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out.into_bytes())
}

/// Whether `bytes` hold a byte a terminal would act on: a C0 control other than newline and
/// tab, DEL, or (in UTF-8) a C1 control. For tests.
pub fn has_raw_control(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .any(|c| c != '\n' && c != '\t' && needs_escape(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Escape sequences, newlines, C1 controls and bidi overrides become visible text; plain and
    /// non-ASCII text is kept as is (borrowed).
    #[test]
    fn escapes_controls_and_keeps_text() {
        assert!(matches!(term("leakyHandler (übung.js)"), Cow::Borrowed(_)));
        assert_eq!(term("a\u{1b}]0;pwned\u{7}b"), "a\\e]0;pwned\\u{7}b");
        assert_eq!(term("x\ny\rz\t"), "x\\ny\\rz\\t");
        assert_eq!(term("\u{9b}2J\u{7f}"), "\\u{9b}2J\\u{7f}");
        assert_eq!(term("abc\u{202e}fed"), "abc\\u{202e}fed");
        let doc = term_document(b"row 1\tok\nrow\x1b[2J 2\n\xff");
        assert_eq!(&*doc, "row 1\tok\nrow\\e[2J 2\n\u{fffd}".as_bytes());
        assert!(matches!(term_document(b"plain\n"), Cow::Borrowed(_)));
        assert!(
            has_raw_control(b"a\x1bb")
                && has_raw_control("\u{85}".as_bytes())
                && !has_raw_control(b"a\nb\t")
        );
        assert!(!has_raw_control(term("\u{1b}[31m\n").as_bytes()));
    }
}
