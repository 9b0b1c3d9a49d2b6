//! The error of the server side: settings, store, broker, server and relay. (The types layer
//! and the client have their own.)
//!
//! Every variant carries the values a user needs to fix the problem, and its message names the rule
//! that was broken. `server/status.rs` maps each variant to exactly one gRPC status code.

use crate::types::Tick;

/// Everything that can go wrong inside tapeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stream name or pattern broke its rule.
    #[error(transparent)]
    Invalid(#[from] crate::types::Invalid),

    /// The settings file is not valid TOML of the expected shape.
    #[error("settings file {path:?}: {detail}")]
    ConfigFile { path: std::path::PathBuf, detail: String },

    /// A request was malformed in a way not covered by a more specific variant.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// One record is larger than the configured limit.
    #[error("record of stream {stream:?} has a {size}-byte payload, over the limit of {limit} bytes (max_record_bytes)")]
    RecordTooLarge { stream: String, size: usize, limit: usize },

    /// The headers of one record are over the limit.
    #[error("record of stream {stream:?} has {count} headers of {size} bytes, over the limit of {limit} bytes (max_header_bytes)")]
    HeadersTooLarge { stream: String, count: usize, size: usize, limit: usize },

    /// A batch holds too many records or bytes, or would take too much memory once decoded.
    #[error(transparent)]
    Batch(#[from] crate::protocol::codec::TooLarge),

    /// A record was published to a relay, which only copies its upstream.
    #[error("stream {stream:?} cannot be published here: this broker is a relay of {upstream} and is read-only; publish to the upstream")]
    Mirrored { stream: String, upstream: String },

    /// An explicit tick is not after the stream's last tick.
    #[error("explicit tick {tick} for stream {stream:?} is not after the stream's last tick {last}: explicit ticks must increase")]
    TickNotAfter { stream: String, tick: Tick, last: Tick },

    /// An explicit tick for a stream subscribers see is not after the broker's clock: everything up
    /// to the clock may already have been promised as delivered.
    #[error("explicit tick {tick} for stream {stream:?} is not after the broker's newest tick {clock}: subscribers may already have been told that everything up to it was delivered; import older records into a stream created with `import` and seal it when done (CreateStream.import, SealStream)")]
    TickNotAfterClock { stream: String, tick: Tick, clock: Tick },

    /// `import` asked for a stream that exists already.
    #[error(
        "stream {stream:?} exists and is not being imported: only a new stream can be created with `import`"
    )]
    NotImportable { stream: String },

    /// An explicit tick is too far ahead of the broker's clock.
    #[error("explicit tick {tick} for stream {stream:?} is more than 60 s ahead of the broker's clock (at most {limit}): explicit ticks import recorded sessions and must not move the clock into the future")]
    TickAhead { stream: String, tick: Tick, limit: Tick },

    /// An idempotent producer reused a sequence number for a different batch.
    #[error("sequence {sequence} of producer {producer:?} was already appended with different content: a retried batch must be identical, new records need a new sequence")]
    SequenceReused { producer: String, sequence: u64 },

    /// An idempotent producer's sequence number is neither new nor a remembered batch.
    #[error("sequence {sequence} of producer {producer:?} is not after its last appended sequence {last} and is not one of its last {window} batches: a producer's sequence numbers must increase from batch to batch")]
    SequenceNotAfter { producer: String, sequence: u64, last: u64, window: usize },

    /// A retried batch was appended, but its ticks were too scattered to remember.
    #[error("sequence {sequence} of producer {producer:?} was already appended, but its explicit ticks were too scattered for the broker to remember them: it is not appended again; read the stream to find its records")]
    TicksForgotten { producer: String, sequence: u64 },

    /// A batch would fill the disk or pass the data dir's configured maximum.
    #[error("the disk budget is exhausted: {rule}; the data dir takes {used} bytes, {free} bytes are free and the batch needs about {needed}: free space or raise the limit, then retry (nothing acknowledged is affected)")]
    DiskFull { used: u64, free: u64, needed: u64, rule: String },

    /// A write met a full disk; it was undone.
    #[error("the disk is full: writing to the log failed ({cause}) and the write was undone, so nothing of the request was stored: free space, then retry")]
    NoRoom { cause: String },

    /// A subscriber under `slow_consumer = disconnect` fell too far behind the live tail.
    #[error("the subscriber fell {lag:?} behind the live tail, more than its max_lag of {max_lag:?} (slow_consumer = disconnect): resume after tick {last}, the last one delivered")]
    SlowConsumer { lag: std::time::Duration, max_lag: std::time::Duration, last: Tick },

    /// A server-wide limit on how many of something may exist at once.
    #[error("this server takes at most {limit} {what} ({setting}); {hint}")]
    TooMany { what: &'static str, limit: usize, setting: &'static str, hint: &'static str },

    /// A write or flush failed; the log refuses writes until the broker is restarted.
    #[error("the log takes no more writes since a write or flush failed ({cause}); nothing acknowledged is affected: restart the broker")]
    LogFailed { cause: String },

    /// The client's protocol version is not spoken by this server.
    #[error("protocol version {version} is not supported; this server speaks {supported:?}")]
    UnsupportedProtocol { version: u32, supported: Vec<u32> },

    /// `CreateStream` named a stream that exists with other metadata.
    #[error("stream {stream:?} already exists with other metadata: set `update` to change it (tapeline create --update)")]
    StreamExists { stream: String },

    /// The named stream does not exist.
    #[error("stream {0:?} does not exist")]
    UnknownStream(String),

    /// Stored data failed its CRC check or could not be decoded.
    #[error("stored data of stream {stream:?} is corrupt in ticks {from}..={to}: {detail}")]
    DataLoss { stream: String, from: Tick, to: Tick, detail: String },

    /// The index holds a pointer that fails its check: the chunk it names cannot be found.
    #[error("the index's pointer to the chunk of stream #{stream} at tick {tick} is damaged ({detail}): that chunk is unreadable until the index is rebuilt (delete DATA_DIR/index with the broker stopped)")]
    DamagedPointer { stream: u32, tick: Tick, detail: String },

    /// The storage engine could not open the data dir.
    #[error("cannot open the data dir {path:?}: {cause}")]
    Open { path: std::path::PathBuf, cause: String },

    /// The storage engine failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),

    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A setting has a value that cannot be used.
    #[error("setting {key} = {value:?} is invalid: expected {expected}")]
    Config { key: &'static str, value: String, expected: &'static str },

    /// A call to a remote tapeline failed (client side); `code` is the status it answered, if any.
    #[error("{action} failed: {detail}")]
    Remote { action: &'static str, detail: String, code: Option<tonic::Code> },

    /// A bug or a failed task; never caused by the request.
    #[error("internal error: {0}")]
    Internal(String),

    /// A call came without a credential the server accepts (token or client certificate).
    #[error("unauthenticated: {detail}")]
    Unauthenticated { detail: String },

    /// The principal may not do this to this stream.
    #[error("permission denied: principal {principal:?} may not {action} stream {stream:?} (grant it with a `{action}` pattern in its [[auth.principal]] table)")]
    PermissionDenied { principal: String, action: crate::types::Action, stream: String },

    /// Settings that would expose the broker, or a secret, to anyone.
    #[error("refusing to start: {0}")]
    Unsafe(String),

    /// The broker is shutting down; the client should reconnect and resume.
    #[error("the broker is shutting down: reconnect and resume from your last tick")]
    ShuttingDown,
}

impl From<crate::client::Error> for Error {
    fn from(err: crate::client::Error) -> Error {
        match err {
            crate::client::Error::InvalidArgument(detail) => Error::InvalidArgument(detail),
            crate::client::Error::Remote { action, detail, code } => Error::Remote { action, detail, code },
        }
    }
}

/// The server side's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
