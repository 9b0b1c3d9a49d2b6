//! What a relay knows of each of its upstream links: whether it is up, up to which tick the
//! upstream confirmed this relay holds everything, and how fresh the copy is. The relay's copy task
//! updates it through the broker; subscriptions read it for heartbeats and to cap the tail.

use crate::types::{Tick, UpstreamStatus};
use std::time::Duration;

/// What a relay knows of one link; its status is computed from it at any moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub upstream: String,
    /// This relay's subscription to the upstream is up.
    pub connected: bool,
    /// Why it is not.
    pub detail: String,
    /// Everything the upstream holds up to this tick is stored here: the last stored record's
    /// tick, or the tail of an upstream heartbeat or `CaughtUp` that arrived after everything
    /// before it was stored. A relay's clock may be advanced this far and no further.
    pub confirmed: Option<Tick>,
    /// This relay's copy was current as of this time (by the origin's clock): a stored record's
    /// tick, or an upstream heartbeat's time less the upstream's own lag.
    pub fresh: Option<Tick>,
    /// The upstream's own links, as it last reported them (empty for an origin).
    pub beyond: Vec<UpstreamStatus>,
}

impl Link {
    /// A link not connected yet.
    pub fn new(upstream: &str) -> Link {
        Link {
            upstream: upstream.to_string(),
            connected: false,
            detail: "not connected yet".into(),
            confirmed: None,
            fresh: None,
            beyond: Vec::new(),
        }
    }

    /// The link's status at `now`: the lag is the time since the copy was last known current; a
    /// link is connected only if every link up to the origin is.
    pub fn status(&self, now: Tick) -> UpstreamStatus {
        let lag = match self.fresh {
            Some(fresh) => Duration::from_nanos(now.0.saturating_sub(fresh.0)),
            // Never confirmed: as stale as can be told.
            None => Duration::from_nanos(now.0),
        };
        let broken = self.beyond.iter().find(|b| !b.connected);
        let detail = if !self.connected {
            self.detail.clone()
        } else if let Some(b) = broken {
            format!("{} reports its upstream {} down: {}", self.upstream, b.upstream, b.detail)
        } else {
            String::new()
        };
        UpstreamStatus {
            upstream: self.upstream.clone(),
            connected: self.connected && broken.is_none(),
            lag,
            detail,
        }
    }

    /// Something arrived: the link is up (only now, not at connection time, so a relay that
    /// cannot store what it receives does not flap between up and down).
    pub fn heard(&mut self) {
        self.connected = true;
        self.detail.clear();
    }

    pub fn confirm(&mut self, tick: Tick) {
        self.confirmed = Some(self.confirmed.map_or(tick, |c| c.max(tick)));
    }

    pub fn fresh_at(&mut self, tick: Tick) {
        self.fresh = Some(self.fresh.map_or(tick, |f| f.max(tick)));
    }
}

/// The tick every link confirmed: how far a relay's tail may go (`None` before all confirmed).
pub fn confirmed(links: &[Link]) -> Option<Tick> {
    links.iter().map(|l| l.confirmed).min().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_lag_travel_down() {
        let mut link = Link::new("http://a");
        link.connected = true;
        link.fresh = Some(Tick(500));
        link.beyond = vec![UpstreamStatus {
            upstream: "http://origin".into(),
            connected: false,
            lag: Duration::from_nanos(500),
            detail: "refused".into(),
        }];
        let status = link.status(Tick(3_000));
        assert!(!status.connected);
        assert_eq!(status.lag, Duration::from_nanos(2_500));
        assert!(
            status.detail.contains("http://origin") && status.detail.contains("refused"),
            "{}",
            status.detail
        );
        link.beyond[0].connected = true;
        assert!(link.status(Tick(3_000)).connected);
    }
}
