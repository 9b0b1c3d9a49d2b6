//! tapeline: a persistent-log store-and-forward broker.
//!
//! Producers publish timestamped records into named streams; every record is appended to a
//! sled-backed log; a subscriber gets one stream that replays an interval of the past and then
//! follows the live tail, with no gap and no duplicate.
//!
//! # Layout
//! - [`record`]: ticks, stream ids and records, the values crossing module borders.
//! - [`names`]: the stream naming rule and subscription patterns.
//! - [`chunk`]: the codec packing many records of one stream into one stored value, with CRCs.
//! - [`producers`]: what is remembered of idempotent producers, to acknowledge retries again.
//! - [`guard`]: detects a log that sled rolled back while opening a damaged data dir.
//! - [`storage`]: the sled log: keys, catalog, group commit, recovery, reads.
//! - [`space`]: the disk budget that refuses a write before it could fill the disk.
//! - [`subscription`]: replay, then live, for one subscriber.
//! - [`integrity`]: offline `verify` and `recover` of a data dir.
//! - [`broker`]: the domain: publish, subscribe, catalog, and every rule a request must follow.
//! - [`relay`]: relay mode: copies an upstream's streams, keeping their ticks, and tracks the link.
//! - [`grpc`]: translation between protobuf and the domain; the generated client and server.
//! - [`codec`]: the gRPC codec, which screens a publish's record count before decoding it.
//! - [`server`]: wires it all together and owns shutdown.
//! - [`config`]: settings and defaults; [`error`]: the one error enum.
//! - [`client`]: the client library: a resuming, failing-over `Subscriber` and a retrying `Publisher`.
//! - [`cli`]: the `tapeline` command line, including the client commands.

pub mod broker;
pub mod chunk;
pub mod chunk_files;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod connections;
pub mod error;
pub mod grpc;
pub mod guard;
pub mod integrity;
pub mod memory;
pub mod names;
pub mod producers;
pub mod quota;
pub mod record;
pub mod relay;
pub mod retention;
pub mod server;
pub mod space;
pub mod storage;
pub mod subscription;
pub mod tail_cache;
pub mod wire;

pub use error::{Error, Result};
