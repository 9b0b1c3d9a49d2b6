//! tapeline: a persistent-log store-and-forward broker.
//!
//! Producers publish timestamped records into named streams; every record is appended to a log
//! of record in chunk files, indexed by sled; a subscriber gets one stream that replays an
//! interval of the past and then follows the live tail, with no gap and no duplicate.
//!
//! # Layers
//! Each layer imports only the layers listed before it (`tests/it/layers.rs` checks every
//! `crate::` path). The map of every module:
//! - [`types`]: plain data: `record` (ticks, records, stream info), `names` (names, patterns),
//!   `policy` (retention), `upstream` (a link's status), `invalid` (its error).
//! - [`protocol`]: `pb` (the generated code, included nowhere else), versions and sizes,
//!   `convert` (`From` to and from the types), `codec` (prost's, screening publishes), `wire`
//!   (the server's hand-encoded subscription batches).
//! - [`client`]: `subscriber` (resuming, failing over), `publisher` (pipelined, retrying), its
//!   own `error`. With `--no-default-features` the library is these three layers alone.
//! - [`error`]: the error of the layers below (settings, store, broker, relay, server).
//! - [`config`]: settings as data and their checks; `file` (TOML), `mirror`, `retention`.
//! - [`store`]: the log of record and its index, one concern per private file (`commit`,
//!   `walk`, `files`, `chunk`, `index`, `view`, `applier`, `recovery`, `writer`, `producers`,
//!   `read`, `tail_cache`, `retention`, `trimmer`, `space`, `integrity`, `upgrade`, `le`).
//! - `broker` (crate-private): the rules of publish and subscribe, the catalog; `subscription`
//!   (replay then live), `quota`, `link` (upstream link state).
//! - `relay` (crate-private): relay mode's copy task, through the client library.
//! - [`server`]: `service` (translation only), `status`, `publish` (the `PublishStream`
//!   driver), `connections`, `memory`; the one shutdown path.
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
