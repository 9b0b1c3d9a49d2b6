//! The types layer: plain data every other layer speaks (ticks, stream names and patterns,
//! records, stream metadata, retention policies, upstream status). It imports nothing of the
//! crate.

mod invalid;
mod names;
mod policy;
mod record;
mod upstream;

pub use invalid::Invalid;
pub use names::{Pattern, StreamName, MAX_NAME_BYTES};
pub use policy::Policy;
pub use record::{
    nanos, Incoming, NewRecord, Recent, Record, Stored, StreamId, StreamInfo, StreamMeta, Tick, Trimmed,
};
pub use upstream::UpstreamStatus;
