//! Human quantities in specs: memory (`64Mi`), cpu (`100m`), durations (`30s`).
//! Parsed once at validation time into plain integers so nothing downstream
//! handles strings.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{input:?} is not a valid {what}: {hint}")]
pub struct QuantityError {
    pub input: String,
    pub what: &'static str,
    pub hint: &'static str,
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Parses a memory size into bytes: `1048576`, `512Ki`, `64Mi`, `1Gi`, `2Ti`, `64M`, `1G`, as
/// Kubernetes' quantities up to peta.
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        input: s.to_string(),
        what: "memory size",
        hint: "use a number of bytes or a suffix Ki, Mi, Gi, Ti, Pi (or k, M, G, T, P), e.g. \"64Mi\"",
    };
    let (num, unit) = split_number(s.trim());
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Parses cpu into millicores: `100m`, `0.5`, `2`.
pub fn parse_cpu(s: &str) -> Result<u32, QuantityError> {
    let err = || QuantityError {
        input: s.to_string(),
        what: "cpu quantity",
        hint: "use millicores like \"100m\" or cores like \"0.5\" or \"2\"",
    };
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u32>().map_err(|_| err());
    }
    let cores: f64 = s.parse().map_err(|_| err())?;
    if !(0.0..=100_000.0).contains(&cores) {
        return Err(err());
    }
    Ok((cores * 1000.0).round() as u32)
}

/// Parses a duration into milliseconds: `250ms`, `30s`, `5m`, `1h`, and combinations such as
/// `1m30s` or `1h 15m` (humantime's syntax, as Kubernetes and Nomad users write them).
pub fn parse_duration_ms(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        input: s.to_string(),
        what: "duration",
        hint: "use numbers with units ms, s, m, h or d, e.g. \"30s\" or \"1m30s\"",
    };
    let d = humantime::parse_duration(s.trim()).map_err(|_| err())?;
    u64::try_from(d.as_millis()).map_err(|_| err())
}

/// Formats a span of time the way specs write it, in whole days, hours, minutes, seconds and
/// milliseconds (`999d`, `1m 30s`, `1s 500ms`), what [`parse_duration_ms`] reads back. Not
/// humantime's own format, which counts months of 30.44 days (`60d` as `1month 29days 13h…`).
pub fn format_duration_ms(ms: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let mut left = ms;
    let mut parts = Vec::new();
    for (unit, size) in UNITS {
        if left >= size {
            parts.push(format!("{}{unit}", left / size));
            left %= size;
        }
    }
    if parts.is_empty() {
        return "0s".into();
    }
    parts.join(" ")
}

/// Formats bytes the way specs write them, for tables and `describe`: in the largest unit that
/// fits, whole if exact, else to one decimal, so a column reads in one scale (`640Mi/23.5Gi`).
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back_as_written() {
        for (ms, text) in [
            (0, "0s"),
            (250, "250ms"),
            (1_500, "1s 500ms"),
            (90_000, "1m 30s"),
            (999 * 86_400_000, "999d"),
            (60 * 86_400_000 + 3_600_000, "60d 1h"),
        ] {
            assert_eq!(format_duration_ms(ms), text);
            assert_eq!(parse_duration_ms(text), Ok(ms), "{text}");
        }
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("2Ti"), Ok(2 << 40));
        assert_eq!(parse_memory("1P"), Ok(1_000_000_000_000_000));
        assert_eq!(format_memory(3 << 40), "3Ti");
        assert_eq!(parse_memory("512Ki"), Ok(512 << 10));
        assert_eq!(parse_memory("1000"), Ok(1000));
        assert_eq!(parse_memory("2M"), Ok(2_000_000));
        for bad in ["", "Mi", "64 MB", "-1Mi", "1.5Gi", "99999999999999999999Gi"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(format_memory(64 << 20), "64Mi");
        assert_eq!(format_memory(3 << 30), "3Gi");
        assert_eq!(format_memory(24_684_092 << 10), "23.5Gi");
        assert_eq!(format_memory(1536), "1.5Ki");
        assert_eq!(format_memory(100), "100");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("100m"), Ok(100));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        for bad in ["", "m", "abc", "-1", "1.5m"] {
            assert!(parse_cpu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1h 15m"), Ok(4_500_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        for bad in ["", "30", "s", "-1s", "1x"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
