//! The types layer: plain data every other layer speaks (ticks, stream names and patterns,
//! records, stream metadata, retention policies, upstream status, permissions' actions, sizes and durations for people). It imports nothing of the
//! crate.

mod action;
mod invalid;
mod names;
mod policy;
mod record;
mod units;
mod upstream;

pub use action::Action;
pub use invalid::Invalid;
pub use names::{Pattern, StreamName, MAX_NAME_BYTES};
pub use policy::Policy;
pub use record::{
    nanos, Incoming, NewRecord, Recent, Record, Stored, StreamId, StreamInfo, StreamMeta, Tick, Trimmed,
};
pub use units::{human_bytes, human_duration, parse_size};
pub use upstream::UpstreamStatus;
