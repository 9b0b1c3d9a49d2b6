//! The server's `SubscribeResponse`, encoded by hand.
//!
//! Why: a subscription sends most of what the broker sends, and prost's generated message would
//! first copy each record into a `pb::Record` (a `String` for its stream name, a map for its
//! headers), encode it, then drop it, for every subscriber. Here a batch of records is encoded straight from the broker's [`Record`]s, with each record's
//! length computed once. The bytes are the protocol's `SubscribeResponse`: clients decode them
//! with the generated message (the tests compare the two encodings). Every other event is
//! prost's own message.

use crate::protocol::pb;
use crate::types::Record;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, DecodeContext, WireType};
use prost::DecodeError;

/// What the server sends on a subscription (the protocol's `SubscribeResponse`).
#[derive(Debug, Clone, PartialEq)]
pub enum SubscribeResponse {
    /// A `RecordBatch`, encoded from the records themselves.
    Records(RecordBatch),
    /// Any other event, as the generated message.
    Other(Box<pb::SubscribeResponse>),
}

/// A `RecordBatch` and the encoded length of each of its records.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordBatch {
    records: Vec<Record>,
    complete_to: u64,
    lengths: Vec<usize>,
    /// The encoded length of the `RecordBatch` message.
    len: usize,
}

impl RecordBatch {
    /// The batch, with the lengths its encoding needs.
    pub fn new(records: Vec<Record>, complete_to: u64) -> Self {
        let lengths: Vec<usize> = records.iter().map(record_len).collect();
        let len = lengths.iter().map(|&l| field_len(l)).sum::<usize>() + varint_field_len(complete_to);
        RecordBatch { records, complete_to, lengths, len }
    }
}

impl Default for SubscribeResponse {
    fn default() -> Self {
        SubscribeResponse::Other(Box::default())
    }
}

// Field numbers, from `proto/tapeline/v1/tapeline.proto`.
const RESPONSE_RECORDS: u32 = 1;
const BATCH_RECORDS: u32 = 1;
const BATCH_COMPLETE_TO: u32 = 2;
const RECORD_STREAM: u32 = 1;
const RECORD_TICK: u32 = 2;
const RECORD_ORIGIN_TIME: u32 = 3;
const RECORD_HEADERS: u32 = 4;
const RECORD_PAYLOAD: u32 = 5;
const RECORD_CRC32: u32 = 6;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;

/// A length-delimited field of `len` bytes, with its one-byte key (every field number here is
/// below 16).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A proto3 scalar field: absent when 0.
fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

/// A proto3 string or bytes field: absent when empty.
fn bytes_field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        field_len(len)
    }
}

fn entry_len(key: &str, value: &str) -> usize {
    bytes_field_len(key.len()) + bytes_field_len(value.len())
}

/// The encoded length of a `Record` message, as prost encodes it: proto3 fields at their default
/// are left out, `crc32` (an `optional`) is always there.
fn record_len(r: &Record) -> usize {
    bytes_field_len(r.stream.len())
        + varint_field_len(r.tick.0)
        + varint_field_len(r.origin_time.unwrap_or(0))
        + r.headers.iter().map(|(k, v)| field_len(entry_len(k, v))).sum::<usize>()
        + bytes_field_len(r.payload.len())
        + 1
        + encoded_len_varint(u64::from(r.crc32))
}

fn put_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn put_bytes_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

fn put_record(r: &Record, buf: &mut impl BufMut) {
    put_bytes_field(RECORD_STREAM, r.stream.as_bytes(), buf);
    put_varint_field(RECORD_TICK, r.tick.0, buf);
    put_varint_field(RECORD_ORIGIN_TIME, r.origin_time.unwrap_or(0), buf);
    for (k, v) in &r.headers {
        encode_key(RECORD_HEADERS, WireType::LengthDelimited, buf);
        encode_varint(entry_len(k, v) as u64, buf);
        put_bytes_field(ENTRY_KEY, k.as_bytes(), buf);
        put_bytes_field(ENTRY_VALUE, v.as_bytes(), buf);
    }
    put_bytes_field(RECORD_PAYLOAD, &r.payload, buf);
    encode_key(RECORD_CRC32, WireType::Varint, buf);
    encode_varint(u64::from(r.crc32), buf);
}

impl prost::Message for SubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            SubscribeResponse::Records(batch) => {
                encode_key(RESPONSE_RECORDS, WireType::LengthDelimited, buf);
                encode_varint(batch.len as u64, buf);
                for (record, &len) in batch.records.iter().zip(&batch.lengths) {
                    encode_key(BATCH_RECORDS, WireType::LengthDelimited, buf);
                    encode_varint(len as u64, buf);
                    put_record(record, buf);
                }
                put_varint_field(BATCH_COMPLETE_TO, batch.complete_to, buf);
            }
            SubscribeResponse::Other(message) => message.encode_raw(buf),
        }
    }

    /// Never used by the server, which only sends this message; decodes as the generated one.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match self {
            SubscribeResponse::Other(message) => message.merge_field(tag, wire_type, buf, ctx),
            SubscribeResponse::Records(_) => {
                *self = SubscribeResponse::default();
                self.merge_field(tag, wire_type, buf, ctx)
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            SubscribeResponse::Records(batch) => field_len(batch.len),
            SubscribeResponse::Other(message) => message.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = SubscribeResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Tick;
    use bytes::Bytes;
    use prost::Message;
    use std::sync::Arc;

    fn record(
        stream: &str,
        tick: u64,
        origin: Option<u64>,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Record {
        Record {
            stream: Arc::from(stream),
            tick: Tick(tick),
            origin_time: origin,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            payload: Bytes::copy_from_slice(payload),
            crc32: crc32fast::hash(payload),
        }
    }

    #[test]
    fn a_batch_decodes_as_the_protocol_message_with_every_field() {
        let long = vec![7u8; 300];
        let records = vec![
            record("a", 1, None, &[], b""),
            record(
                "sensors/imu",
                1 << 62,
                Some(5),
                &[("k", "v"), ("", "empty key"), ("empty value", "")],
                b"x",
            ),
            record("b", 300, Some(0), &[("unit", "m/s")], &long),
        ];
        for complete_to in [0, 1, u64::MAX >> 1] {
            let ours = SubscribeResponse::Records(RecordBatch::new(records.clone(), complete_to));
            let bytes = ours.encode_to_vec();
            assert_eq!(bytes.len(), ours.encoded_len(), "encoded_len matches what is written");
            let decoded = pb::SubscribeResponse::decode(bytes.as_slice()).expect("decodes");
            let expected = pb::SubscribeResponse {
                event: Some(pb::subscribe_response::Event::Records(pb::RecordBatch {
                    records: records
                        .iter()
                        .map(|r| pb::Record {
                            stream: r.stream.to_string(),
                            tick: r.tick.0,
                            origin_time: r.origin_time.unwrap_or(0),
                            headers: r.headers.iter().cloned().collect(),
                            payload: r.payload.clone(),
                            crc32: Some(r.crc32),
                        })
                        .collect(),
                    complete_to,
                })),
            };
            assert_eq!(decoded, expected);
            // Byte for byte what prost writes when the map order agrees (at most one header).
            let single = RecordBatch::new(records[2..].to_vec(), complete_to);
            let prost_bytes = match &expected.event {
                Some(pb::subscribe_response::Event::Records(batch)) => pb::SubscribeResponse {
                    event: Some(pb::subscribe_response::Event::Records(pb::RecordBatch {
                        records: batch.records[2..].to_vec(),
                        complete_to,
                    })),
                }
                .encode_to_vec(),
                _ => unreachable!(),
            };
            assert_eq!(SubscribeResponse::Records(single).encode_to_vec(), prost_bytes);
        }
    }

    #[test]
    fn an_empty_batch_is_still_a_records_event() {
        let bytes = SubscribeResponse::Records(RecordBatch::new(Vec::new(), 0)).encode_to_vec();
        let decoded = pb::SubscribeResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded.event, Some(pb::subscribe_response::Event::Records(pb::RecordBatch::default())));
    }
}
