//! Parsing of human units on the command line and in queries: durations (`500ms`, `30s`,
//! `2m`, `1h`) and sizes (`4096`, `512KiB`, `64MiB`, `1GiB`, also `KB`/`MB`/`GB` as powers of
//! 1024, as SREs mean them for memory).
use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 2m"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 512KiB, 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?} (use KiB, MiB or GiB)")),
    };
    value.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// `full` (0: record every allocation) or a mean number of bytes between samples.
pub fn parse_sampling(s: &str) -> Result<u64, String> {
    if s == "full" {
        return Ok(0);
    }
    let bytes = parse_size(s).map_err(|e| format!("{e}; or `full`"))?;
    if bytes == 0 {
        return Err("invalid sampling 0: use `full` to record every allocation".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted and rejected durations, sizes and sampling rates.
    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_sampling("full").unwrap(), 0);
        assert_eq!(parse_sampling("1MiB").unwrap(), 1 << 20);
        assert!(parse_sampling("0").is_err());
    }
}
