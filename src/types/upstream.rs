//! The state of a relay's link to one upstream, as subscribers and `ListStreams` see it.

use std::time::Duration;

/// The state of one upstream link as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub upstream: String,
    /// This relay reaches the upstream, and the upstream reaches the origin.
    pub connected: bool,
    /// How far behind the origin this relay's copy may be.
    pub lag: Duration,
    /// Why the link is down; empty when connected.
    pub detail: String,
}
