//! Conversions between the protocol's messages and the types layer. Zero means "not set" on the
//! wire (the proto's rule); `None` means it in the types.

use super::pb;
use crate::types::{Incoming, Policy, Record, StreamInfo, StreamMeta, Tick, UpstreamStatus};
use std::sync::Arc;
use std::time::Duration;

impl From<pb::Record> for Incoming {
    fn from(r: pb::Record) -> Incoming {
        Incoming {
            stream: r.stream,
            tick: r.tick,
            origin_time: r.origin_time,
            headers: r.headers.into_iter().collect(),
            payload: r.payload,
            crc32: r.crc32,
        }
    }
}

impl From<Incoming> for pb::Record {
    fn from(r: Incoming) -> pb::Record {
        pb::Record {
            stream: r.stream,
            tick: r.tick,
            origin_time: r.origin_time,
            headers: r.headers.into_iter().collect(),
            payload: r.payload,
            crc32: r.crc32,
        }
    }
}

/// A delivered record; its headers sorted by key, as the broker keeps them.
impl From<pb::Record> for Record {
    fn from(r: pb::Record) -> Record {
        let mut headers: Vec<(String, String)> = r.headers.into_iter().collect();
        headers.sort_unstable();
        let crc32 = r.crc32.unwrap_or_else(|| crc32fast::hash(&r.payload));
        Record {
            stream: Arc::from(r.stream),
            tick: Tick(r.tick),
            origin_time: (r.origin_time != 0).then_some(r.origin_time),
            headers,
            payload: r.payload,
            crc32,
        }
    }
}

impl From<&Policy> for pb::Retention {
    fn from(p: &Policy) -> pb::Retention {
        pb::Retention {
            max_age_ms: p.max_age.map_or(0, |a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            max_bytes: p.max_bytes.unwrap_or(0),
            max_records: p.max_records.unwrap_or(0),
        }
    }
}

impl From<pb::Retention> for Policy {
    fn from(r: pb::Retention) -> Policy {
        Policy {
            max_age: (r.max_age_ms > 0).then(|| Duration::from_millis(r.max_age_ms)),
            max_bytes: (r.max_bytes > 0).then_some(r.max_bytes),
            max_records: (r.max_records > 0).then_some(r.max_records),
        }
    }
}

/// A stream's metadata and own retention, as the API shows them.
impl From<&pb::StreamInfo> for StreamMeta {
    fn from(s: &pb::StreamInfo) -> StreamMeta {
        StreamMeta {
            content_type: s.content_type.clone(),
            schema_version: s.schema_version.clone(),
            description: s.description.clone(),
            retention: s.retention.unwrap_or_default().into(),
            importing: s.importing,
        }
    }
}

impl From<UpstreamStatus> for pb::UpstreamStatus {
    fn from(u: UpstreamStatus) -> pb::UpstreamStatus {
        pb::UpstreamStatus {
            upstream: u.upstream,
            connected: u.connected,
            lag: crate::types::nanos(u.lag),
            detail: u.detail,
        }
    }
}

impl From<pb::UpstreamStatus> for UpstreamStatus {
    fn from(s: pb::UpstreamStatus) -> UpstreamStatus {
        UpstreamStatus {
            upstream: s.upstream,
            connected: s.connected,
            lag: Duration::from_nanos(s.lag),
            detail: s.detail,
        }
    }
}

impl pb::StreamInfo {
    /// A stream as the API shows it: `upstream` when a relay copies it, `effective` the retention
    /// that applies, when known.
    pub fn new(s: StreamInfo, upstream: Option<UpstreamStatus>, effective: Option<Policy>) -> pb::StreamInfo {
        let (records_per_second, bytes_per_second) = s.recent.at(Tick::now());
        pb::StreamInfo {
            content_type: s.meta.content_type.clone(),
            schema_version: s.meta.schema_version.clone(),
            description: s.meta.description.clone(),
            retention: Some((&s.meta.retention).into()),
            effective_retention: effective.as_ref().map(Into::into),
            records_per_second,
            bytes_per_second,
            name: s.name.to_string(),
            records: s.records,
            bytes: s.bytes,
            first_tick: s.first_tick.map_or(0, |t| t.0),
            last_tick: s.last_tick.map_or(0, |t| t.0),
            created_tick: s.created_tick.0,
            importing: s.meta.importing,
            upstream: upstream.as_ref().map(|u| u.upstream.clone()).unwrap_or_default(),
            upstream_status: upstream.map(Into::into),
        }
    }
}
