//! Sizes and durations as people read and write them (`1.5 MiB`, `4 min 10 s`, `256MiB`): the
//! status page, the CLI's tables and its flags. Scripts get exact numbers elsewhere (JSON,
//! `/metrics`).

use std::time::Duration;

/// `bytes` in the largest binary unit that keeps at least 1 of it: `512 B`, `1.5 KiB`, `12 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

/// A size as people write it: `1048576`, `256MiB`, `1.5 GiB`, `64 KiB`, `10MB` (KiB, MiB, GiB,
/// TiB are powers of 1024; kB, MB, GB, TB of 1000; B or nothing is bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{text:?} is not a size: give bytes (1048576) or a number and a unit (256MiB, 1.5GiB, 10MB)"
            ))
        }
    };
    let not_whole = || format!("{text:?} is not a size in whole bytes (at most {})", u64::MAX);
    // Whole numbers exactly; a fraction only where it names whole bytes (1.5GiB, not 0.1KiB).
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(not_whole);
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: it must start with a number (256MiB)"))?;
    let bytes = value * multiplier as f64;
    if bytes.is_nan() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(not_whole());
    }
    Ok(bytes as u64)
}

/// `d` in its two largest units: `850 ms`, `2.3 s`, `4 min 10 s`, `3 h 2 min`, `2 d 3 h`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{} ms", d.as_millis()),
        1..60 => format!("{:.1} s", d.as_secs_f64()),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        3600..86400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_say_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 << 20), "12 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
        assert_eq!(human_duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(human_duration(Duration::from_millis(2300)), "2.3 s");
        assert_eq!(human_duration(Duration::from_secs(250)), "4 min 10 s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 120)), "3 h 2 min");
        assert_eq!(human_duration(Duration::from_secs(2 * 86400 + 3 * 3600)), "2 d 3 h");
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("64kib"), Ok(64 << 10));
        assert!(parse_size("12 parsecs").unwrap_err().contains("256MiB"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("0.1KiB").is_err(), "102.4 bytes");
        assert!(parse_size("16777216TiB").is_err(), "2^64: over u64");
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
    }
}
