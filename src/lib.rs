//! tapeline: a persistent-log store-and-forward broker.
//!
//! Producers publish timestamped records into named streams; every record is appended to a log
//! of record in chunk files, indexed by sled; a subscriber gets one stream that replays an
//! interval of the past and then follows the live tail, with no gap and no duplicate.
//!
//! # Layout
//! - [`record`]: ticks, stream ids and records, the values crossing module borders.
//! - [`names`]: the stream naming rule and subscription patterns.
//! - [`store`]: the log of record (commit records in chunk files, one writer, group commit), its
//!   index in sled, recovery, reads and their checks, retention's plans, the disk budget,
//!   idempotent producers' memory, and the offline `verify` and `recover`.
//! - [`subscription`]: replay, then live, for one subscriber.
//! - [`broker`]: the domain: publish, subscribe, catalog, and every rule a request must follow.
//! - [`relay`]: relay mode: copies an upstream's streams, keeping their ticks, and tracks the link.
//! - [`grpc`]: translation between protobuf and the domain; the generated client and server.
//! - [`codec`]: the gRPC codec, which screens a publish's record count before decoding it.
//! - [`server`]: wires it all together and owns shutdown.
//! - [`config`]: settings and defaults; [`error`]: the one error enum.
//! - [`client`]: the client library: a resuming, failing-over `Subscriber` and a retrying `Publisher`.
//! - [`cli`]: the `tapeline` command line, including the client commands.

pub mod broker;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod connections;
pub mod error;
pub mod grpc;
pub mod memory;
pub mod names;
pub mod quota;
pub mod record;
pub mod relay;
pub mod retention;
pub mod server;
pub mod store;
pub mod subscription;
pub mod wire;

pub use error::{Error, Result};
