//! Durations and sizes as users write them: `"250ms"`, `"1m 30s"`, `2.5` (seconds),
//! `"64MiB"`.

use std::time::Duration;

/// Parses a humantime duration (`"1m 30s"`) or a plain number of seconds (`"2.5"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds);
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("invalid duration {text:?}: {err} (use e.g. \"250ms\", \"1m 30s\" or seconds)"))
}

/// Converts a number of seconds, refusing negative and non-finite values.
pub fn seconds_to_duration(seconds: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("invalid duration {seconds}: expected a non-negative number of seconds"))
}

/// Parses a byte size: a plain number of bytes or a number with a `K`, `M`, `G`
/// (powers of 1024, optionally written `KiB`, `MB`, ...) suffix.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize =
        digits.parse().map_err(|_| format!("invalid size {text:?}: expected bytes, e.g. 67108864 or \"64MiB\""))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {text:?}: use KiB, MiB or GiB")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_humantime_and_seconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }

    #[test]
    fn sizes_accept_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2 G"), Ok(2 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("lots").is_err());
    }
}
