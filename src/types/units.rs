//! Sizes and durations as people read them (`1.5 MiB`, `4 min 10 s`): the status page and the
//! CLI's tables. Scripts get exact numbers elsewhere (JSON, `/metrics`).

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
    }
}
