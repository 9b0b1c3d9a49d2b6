//! tapeline: a persistent-log store-and-forward broker.
//!
//! Producers publish timestamped records into named streams; every record is appended to a log
//! of record in chunk files, indexed by sled; a subscriber gets one stream that replays an
//! interval of the past and then follows the live tail, with no gap and no duplicate.
//!
//! # Layers
//! Each layer imports only the layers above it in this list (`tests/it/layers.rs` checks it):
//! - [`types`]: ticks, stream names and patterns, records, stream metadata, retention policies.
//! - [`protocol`]: the generated gRPC code (included nowhere else), protocol versions and sizes,
//!   conversions to and from the types, the codec.
//! - [`client`]: the client library: a resuming, failing-over `Subscriber` and a retrying
//!   `Publisher`, with its own error; it needs only the two layers above.
//! - [`error`]: the error of the server side (config, store, broker, server, relay).
//! - [`config`]: settings as data and their validation; the settings file; mirrors; retention.
//! - [`store`]: the log of record (commit records in chunk files, one writer, group commit), its
//!   index in sled, recovery, reads and their checks, retention's plans and trimmer, the disk
//!   budget, idempotent producers' memory, and the offline `verify` and `recover`.
//! - [`broker`]: publish, subscribe (replay then live), the catalog, quotas, upstream link state:
//!   every rule a request must follow.
//! - [`relay`]: relay mode's copy task, which reaches the broker the way a client's records do.
//! - [`server`]: the tonic service (it only translates), the `PublishStream` driver, connections,
//!   and the one shutdown path.
//!
//! The `tapeline` binary (`src/main.rs`, `src/cli/`) is not part of the library.

pub mod types;

pub mod protocol;

pub mod client;

#[cfg(feature = "server")]
pub mod error;

#[cfg(feature = "server")]
pub mod config;

#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
mod broker;

#[cfg(feature = "server")]
mod relay;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "server")]
pub use error::{Error, Result};
