//! Log lines that a client can cause, throttled: at most one a period for each kind, carrying how
//! many were left out, so a flood of bad calls or bad upstream records is one line a second.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttle {
    every: Duration,
    /// Per kind: when a line was last let through, and how many were held back since.
    kinds: Mutex<BTreeMap<&'static str, (Instant, u64)>>,
}

impl Throttle {
    /// At most one line every `every` for each kind.
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, kinds: Mutex::new(BTreeMap::new()) }
    }

    /// Whether a line of `kind` is logged now; if so, how many were not since the last one.
    pub fn due(&self, kind: &'static str) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let Some((last, held)) = kinds.get_mut(kind) else {
            kinds.insert(kind, (now, 0));
            return Some(0);
        };
        if now.duration_since(*last) < self.every {
            *held += 1;
            return None;
        }
        *last = now;
        Some(std::mem::take(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_kind_is_one_line_a_period_with_the_count() {
        let throttle = Throttle::new(Duration::from_millis(50));
        assert_eq!(throttle.due("flood"), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.due("flood"), None);
        }
        assert_eq!(throttle.due("other"), Some(0), "each kind has its own line");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.due("flood"), Some(1000));
        assert_eq!(throttle.due("flood"), None);
    }
}
