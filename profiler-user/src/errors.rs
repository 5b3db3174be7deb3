//! Error helpers for every layer: how an error chain is shown on one line (CLI messages,
//! JSON error bodies, logs).

/// The whole error chain on one line: `outer: cause: root cause`.
/// Causes already quoted by the message above them are not repeated.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
