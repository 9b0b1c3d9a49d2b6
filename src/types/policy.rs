//! A retention policy: what one stream keeps. Plain data; the settings layer checks it and the
//! store's trimmer applies it.

use std::time::Duration;

/// What one stream keeps; an unset limit does not limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Policy {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub max_records: Option<u64>,
}

impl Policy {
    /// This policy with every limit `over` sets taken from `over`.
    pub fn overridden_by(self, over: Policy) -> Policy {
        Policy {
            max_age: over.max_age.or(self.max_age),
            max_bytes: over.max_bytes.or(self.max_bytes),
            max_records: over.max_records.or(self.max_records),
        }
    }

    /// Whether it keeps everything.
    pub fn keeps_everything(&self) -> bool {
        *self == Policy::default()
    }
}
