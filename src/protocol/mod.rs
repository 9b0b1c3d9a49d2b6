//! The protocol layer: the generated code of `proto/tapeline/v1/tapeline.proto` (included here and
//! nowhere else), the protocol's versions and sizes, conversions between its messages and the
//! types layer, and the gRPC codec both sides use. It imports only the types layer.

pub mod codec;
mod convert;
#[cfg(feature = "server")]
pub(crate) mod wire;

/// The generated protocol types and client.
pub mod pb {
    tonic::include_proto!("tapeline.v1");

    /// The encoded descriptors of the protocol, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tapeline_descriptor");
}

#[cfg(feature = "server")]
/// The generated server: the messages of [`pb`], except that it sends
/// [`wire::SubscribeResponse`] (see `build.rs`).
pub(crate) mod serve {
    include!(concat!(env!("OUT_DIR"), "/server/tapeline.v1.rs"));
}

/// Protocol versions this server speaks; the last is the current one.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];

/// The protocol version clients of this crate speak.
pub const PROTOCOL_VERSION: u32 = PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1];

/// Largest message a client sends or accepts: a batch can carry a record of any size the server
/// allows.
pub const MAX_MESSAGE: usize = 256 << 20;

/// HTTP/2 flow-control window of one call, in bytes, on both sides: room for a whole batch of
/// records (a subscription sends about 64 KiB at once, or one larger record) instead of h2's
/// default 64 KiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window of a whole connection, in bytes: several calls at full speed.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame each side accepts: fewer frames per batch than h2's default 16 KiB.
pub const FRAME_SIZE: u32 = 1 << 20;

/// Batches of one `PublishStream` the server lets wait for their ack at once; past this it stops
/// reading the client's stream, and HTTP/2 flow control slows the client.
pub const PUBLISH_WINDOW: usize = 64;

/// Batches remembered per producer: twice the window of batches a `PublishStream` keeps in
/// flight, so that a client retrying everything it had in flight is answered for all of it.
pub const PRODUCER_WINDOW: usize = 2 * PUBLISH_WINDOW;

/// The most header bytes (names, values and HPACK's 32 bytes per field) the server takes with one
/// request: gRPC's own headers and a bearer token need well under 1 KiB.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
