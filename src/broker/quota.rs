//! Byte-rate quotas, averaged over a smoothing window: bytes go out evenly at the rate, with a
//! burst of at most a sixteenth of a window's worth (after a pause, or at the start), so any
//! window holds at most about `rate × window` bytes (1/16 more for the burst) and a long transfer
//! runs at the rate without the bunching a thin link suffers from. One message larger than the
//! burst goes alone and the next ones wait for it.
//!
//! Used by subscriptions (`max_bytes_per_second`, the server's default and ceiling) and by publish
//! calls (per client connection). A quota never drops anything: the sender waits, and a publisher
//! waiting here stops reading its connection, so gRPC flow control slows the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A rate and the window it is averaged over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub bytes_per_second: u64,
    pub window: Duration,
}

impl Rate {
    /// Bytes a window may hold.
    pub fn budget(&self) -> u64 {
        (self.bytes_per_second as f64 * self.window.as_secs_f64()).max(1.0) as u64
    }
}

/// A quota's state: when the bytes sent so far are paid for (the theoretical arrival time of
/// the generic cell rate algorithm).
#[derive(Debug)]
pub struct Window {
    rate: Rate,
    paid_until: Option<Instant>,
}

impl Window {
    /// A quota with nothing sent yet.
    pub fn new(rate: Rate) -> Window {
        Window { rate, paid_until: None }
    }

    /// The burst: how far ahead of the rate sending may run.
    fn burst(&self) -> Duration {
        self.rate.window / 16
    }

    /// When the next bytes may go out: `now` unless sending ran ahead of the rate by more than
    /// the burst.
    pub fn due(&self, now: Instant) -> Instant {
        match self.paid_until {
            Some(paid) => now.max(paid.checked_sub(self.burst()).unwrap_or(now)),
            None => now,
        }
    }

    /// Counts `bytes` as sent at `now`.
    pub fn record(&mut self, bytes: u64, now: Instant) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate.bytes_per_second.max(1) as f64);
        let from = self.paid_until.map_or(now, |paid| paid.max(now));
        self.paid_until = Some(from + cost);
    }

    /// Waits until `bytes` may go, then counts them.
    pub async fn take(&mut self, bytes: u64) {
        let due = self.due(Instant::now());
        tokio::time::sleep_until(due).await;
        self.record(bytes, Instant::now());
    }
}

/// A window shared by the calls of one connection.
pub type Shared = Arc<tokio::sync::Mutex<Window>>;

/// One [`Window`] per client connection, shared by every call on that connection. A window
/// unused for longer than its length holds nothing any more, so it is forgotten then.
#[derive(Debug, Default)]
pub struct PerConnection {
    windows: Mutex<HashMap<SocketAddr, (Shared, Instant)>>,
}

impl PerConnection {
    /// The window of the connection from `peer`.
    pub fn window(&self, peer: SocketAddr, rate: Rate) -> Shared {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !windows.contains_key(&peer) {
            // A new connection: a good moment to forget idle ones (not on every call).
            windows.retain(|_, (window, used)| {
                Arc::strong_count(window) > 1 || now.duration_since(*used) < rate.window
            });
        }
        let (window, used) = windows
            .entry(peer)
            .or_insert_with(|| (Arc::new(tokio::sync::Mutex::new(Window::new(rate))), now));
        *used = now;
        window.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_runs_at_the_rate_after_a_burst_of_a_sixteenth_of_the_window() {
        let rate = Rate { bytes_per_second: 1000, window: Duration::from_secs(16) };
        let mut w = Window::new(rate);
        let t0 = Instant::now();
        // The burst is 1 s worth: 1000 bytes go at once, paid until t0 + 1 s.
        assert_eq!(w.due(t0), t0);
        w.record(500, t0);
        assert_eq!(w.due(t0), t0);
        w.record(500, t0);
        // Now 1 s ahead of the rate: the next waits until only the burst is left unpaid.
        assert_eq!(w.due(t0), t0);
        w.record(500, t0);
        assert_eq!(w.due(t0), t0 + Duration::from_millis(500));
        // After a long pause, only the burst may go at once again.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(w.due(later), later);
        w.record(3000, later);
        assert_eq!(w.due(later), later + Duration::from_secs(2));
    }
}
