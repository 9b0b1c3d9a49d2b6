//! What a principal does to a stream: the unit of permissions.

use std::fmt;

/// What a principal does to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Append records.
    Publish,
    /// Read records, and see the stream in lists.
    Subscribe,
    /// Create, update, seal, delete; see the stream in lists.
    Admin,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Admin => "admin",
        })
    }
}
