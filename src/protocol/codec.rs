//! The gRPC codec of the tapeline service: prost's, plus a screen that looks at a
//! `PublishRequest`'s raw bytes before they are decoded, and an encoder that reserves a
//! message's length before writing it.
//!
//! Why: a record on the wire can be 2 bytes (`0a 00`, an empty record) but decodes into a struct
//! of more than a hundred bytes, and a header entry likewise. Checked only after decoding, the
//! largest accepted message (about 50 MiB) of empty records would make the server allocate
//! gigabytes before `max_batch_records` could refuse it. The screen counts records and header
//! entries in the raw bytes and refuses the batch first, so what one request can make the server
//! allocate stays within a small multiple of its size on the wire.
//!
//! The codec is built by the generated code with `Default`, so it cannot be handed the broker's
//! limits; they are registered process-wide by [`admit`] when a service is built. A process that
//! serves several brokers (the tests do) screens at the largest of their limits, which bounds
//! memory all the same; each broker still enforces its own limits exactly after decoding.

use super::pb;
use std::any::TypeId;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Memory a decoded `Record` takes besides its strings' bytes: the struct, the map's table, the
/// allocations of its name and payload handle. Measured about 125 bytes; rounded up.
const RECORD_COST: usize = 160;
/// Memory one decoded header entry takes besides its key and value bytes: two `String`s in the
/// map's table plus two allocations.
const ENTRY_COST: usize = 96;

/// The largest request of the small methods (`Hello`, `ListStreams`, `DescribeStream`,
/// `CreateStream`, `DeleteStream`, `SealStream`): their fields are names and metadata of a few
/// KiB at most, so no client may make the server take a publish-sized message for them.
pub const MAX_SMALL_REQUEST: usize = 64 << 10;

static MAX_RECORDS: AtomicUsize = AtomicUsize::new(0);
static MAX_DECODED: AtomicUsize = AtomicUsize::new(0);

/// A batch over a size limit: refused by the screen before decoding, or by the broker after.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    /// A batch holds too many records or bytes.
    #[error("batch of {value} {what} is over the limit of {limit} {what} ({setting})")]
    Count { what: &'static str, value: usize, limit: usize, setting: &'static str },

    /// A batch would take too much memory once decoded (found before decoding it): many records or
    /// header entries that are tiny on the wire.
    #[error("batch of {records} records with {entries} header entries would take about {decoded} bytes of memory once decoded, over the limit of {limit} bytes (max_message_bytes, from max_batch_bytes and max_batch_records): send fewer records or fewer headers per batch")]
    Heavy { records: usize, entries: usize, decoded: usize, limit: usize },
}

/// Registers a broker's limits with the screen (keeping the largest seen in this process): records
/// per batch, and bytes a decoded publish may take.
pub fn admit(max_records: usize, max_decoded: usize) {
    MAX_RECORDS.fetch_max(max_records, Ordering::Relaxed);
    MAX_DECODED.fetch_max(max_decoded, Ordering::Relaxed);
}

/// Prost's codec with the publish screen on the decoding side; used by the generated code.
#[derive(Debug, Clone, Default)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Reserving<T>;
    type Decoder = Screened<U>;

    fn encoder(&mut self) -> Self::Encoder {
        Reserving(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Screened(self.0.decoder())
    }
}

/// Prost's encoder, with room for the whole message reserved first.
///
/// Why: a message is written field by field into tonic's buffer, which otherwise grows (and is
/// copied) again and again: a batch of records is written by up to thousands of small writes.
#[derive(Debug)]
pub struct Reserving<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for Reserving<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    /// tonic encodes the messages a call has ready into one buffer until it holds this much, and
    /// that buffer keeps its largest size for the call's life: with 8 KiB instead of tonic's
    /// 32 KiB, it holds at most one batch and a few small live messages.
    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(8 << 10, 8 << 10)
    }
}

/// Whether `U` is the request of a method whose requests are small (see [`MAX_SMALL_REQUEST`]).
fn is_small_request<U: 'static>() -> bool {
    [
        TypeId::of::<pb::HelloRequest>(),
        TypeId::of::<pb::ListStreamsRequest>(),
        TypeId::of::<pb::DescribeStreamRequest>(),
        TypeId::of::<pb::CreateStreamRequest>(),
        TypeId::of::<pb::DeleteStreamRequest>(),
        TypeId::of::<pb::SealStreamRequest>(),
    ]
    .contains(&TypeId::of::<U>())
}

/// Whether `U` is the request of one of the service's methods (the server decodes it).
fn is_request<U: 'static>() -> bool {
    is_small_request::<U>()
        || [TypeId::of::<pb::PublishRequest>(), TypeId::of::<pb::SubscribeRequest>()]
            .contains(&TypeId::of::<U>())
}

/// Prost's decoder, preceded by [`screen`] when the message is a `PublishRequest`, and refusing a
/// small method's request over [`MAX_SMALL_REQUEST`].
#[derive(Debug)]
pub struct Screened<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + 'static> Decoder for Screened<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if is_small_request::<U>() {
            use bytes::Buf;
            let size = buf.remaining();
            if size > MAX_SMALL_REQUEST {
                let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or_default();
                return Err(Status::resource_exhausted(format!(
                    "{name} of {size} bytes is over the limit of {MAX_SMALL_REQUEST} bytes for this method (only Publish, PublishStream and Subscribe take larger messages)"
                )));
            }
        }
        // Only a publish carries an unbounded number of small nested messages; every other
        // request decodes into memory proportional to its size.
        if TypeId::of::<U>() == TypeId::of::<pb::PublishRequest>() {
            use bytes::Buf;
            let max_records = MAX_RECORDS.load(Ordering::Relaxed);
            let max_decoded = MAX_DECODED.load(Ordering::Relaxed);
            if max_records > 0 {
                screen(buf.chunk(), max_records, max_decoded)
                    .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            }
        }
        let decoded = self.0.decode(buf);
        // tonic answers bytes that do not parse with INTERNAL; for a request they are the
        // client's mistake. (A response that does not parse stays INTERNAL on the client.)
        decoded.map_err(|status| match status.code() {
            tonic::Code::Internal if is_request::<U>() => {
                let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or_default();
                Status::invalid_argument(format!("the request is not a valid {name}: {}", status.message()))
            }
            _ => status,
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// Counts the records (field 1) of an encoded `PublishRequest` and the header entries (field 4) of
/// each, and refuses the batch when there are more than `max_records` records or when decoding it
/// would allocate more than `max_decoded` bytes besides the message itself. Malformed bytes are
/// let through: prost's decoder refuses them with its own precise error.
pub fn screen(message: &[u8], max_records: usize, max_decoded: usize) -> Result<(), TooLarge> {
    let (mut records, mut entries) = (0usize, 0usize);
    let mut fields = Fields(message);
    while let Some(Some((number, value))) = fields.next_field() {
        if number != 1 {
            continue;
        }
        let Value::Bytes(record) = value else { continue };
        records += 1;
        let mut inner = Fields(record);
        while let Some(Some((number, value))) = inner.next_field() {
            if number == 4 && matches!(value, Value::Bytes(_)) {
                entries += 1;
            }
        }
    }
    if records > max_records {
        return Err(TooLarge::Count {
            what: "records",
            value: records,
            limit: max_records,
            setting: "max_batch_records",
        });
    }
    let decoded = records.saturating_mul(RECORD_COST).saturating_add(entries.saturating_mul(ENTRY_COST));
    if decoded > max_decoded {
        return Err(TooLarge::Heavy { records, entries, decoded, limit: max_decoded });
    }
    Ok(())
}

/// A field's value as far as the screen cares: a length-delimited slice, or anything else.
enum Value<'a> {
    Bytes(&'a [u8]),
    Scalar,
}

/// A walk over the top-level fields of an encoded protobuf message. (prost's own wire helpers are
/// `#[doc(hidden)]`, not a stable API, and the walk needs only this much of the wire format.)
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The next field's number and value; `Some(None)` when the bytes are malformed, `None` at the end.
    fn next_field(&mut self) -> Option<Option<(u64, Value<'a>)>> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.field())
    }

    fn field(&mut self) -> Option<(u64, Value<'a>)> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.take(8)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Scalar
            }
            // Groups (3, 4) are not used by this protocol; anything else is malformed.
            _ => return None,
        };
        Some((key >> 3, value))
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn request(records: usize, headers: usize) -> Vec<u8> {
        let record = pb::Record {
            stream: "s".into(),
            headers: (0..headers).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Default::default()
        };
        pb::PublishRequest {
            records: vec![record; records],
            batch_id: 7,
            producer_id: "p".into(),
            sequence: 3,
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_records_and_header_entries_exactly() {
        let bytes = request(10, 3);
        assert!(screen(&bytes, 10, 10 * RECORD_COST + 30 * ENTRY_COST).is_ok());
        let err = screen(&bytes, 9, usize::MAX).unwrap_err().to_string();
        assert!(err.contains("batch of 10 records") && err.contains("max_batch_records"), "{err}");
        let err = screen(&bytes, 10, 10 * RECORD_COST + 30 * ENTRY_COST - 1).unwrap_err().to_string();
        assert!(err.contains("10 records") && err.contains("30 header entries"), "{err}");
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        // A record claiming more bytes than follow, an 11-byte varint, a group, a lone key: the
        // walk stops without counting (a limit of 0 would otherwise refuse), and prost decides.
        for bytes in [&[0x0a, 0x05, 0x01][..], &[0xff; 11], &[0x0b], &[0x0a]] {
            assert!(screen(bytes, 0, 0).is_ok(), "{bytes:?}");
        }
        // A truncated tail still counts the records before it.
        let mut bytes = request(5, 0);
        bytes.push(0x0a);
        assert!(screen(&bytes, 4, usize::MAX).is_err());
    }

    proptest::proptest! {
        /// On any valid request the screen's count is the decoded count: it refuses exactly the
        /// batches over the record limit, whatever the other fields hold.
        #[test]
        fn the_count_is_the_decoded_count(
            records in 0usize..40,
            headers in 0usize..4,
            limit in 0usize..40,
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut bytes = request(records, headers);
            // Unknown trailing fields (number 15, length-delimited) are skipped, not counted.
            bytes.push(0x7a);
            bytes.push(noise.len() as u8);
            bytes.extend_from_slice(&noise);
            let decoded = pb::PublishRequest::decode(&bytes[..]).unwrap();
            proptest::prop_assert_eq!(decoded.records.len(), records);
            proptest::prop_assert_eq!(screen(&bytes, limit, usize::MAX).is_ok(), records <= limit);
        }

        /// Arbitrary bytes never panic the walk.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = screen(&bytes, 1, 1);
        }
    }
}
