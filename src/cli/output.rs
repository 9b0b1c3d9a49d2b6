//! How the client commands print records and streams.

use std::time::Duration;
use tapeline::client::Record;
use tapeline::protocol::pb;

/// One record as a JSON line: `{"stream":…,"tick":"…","payload":…}`, the payload as a string when
/// it is UTF-8 and as `payload_base64` otherwise; `origin_time` and `headers` when present. Ticks
/// and times are strings of digits, as in protobuf's JSON mapping: they pass 2^53, and jq 1.6 or
/// JavaScript would round them as numbers (and a client resuming after a rounded tick would skip
/// or repeat records).
pub fn json_line(record: &Record) -> String {
    use base64::Engine;
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let mut line = format!("{{\"stream\":{},\"tick\":\"{}\"", text(&record.stream), record.tick);
    if let Some(origin_time) = record.origin_time {
        line.push_str(&format!(",\"origin_time\":\"{origin_time}\""));
    }
    if !record.headers.is_empty() {
        let headers: std::collections::BTreeMap<_, _> = record.headers.iter().map(|(k, v)| (k, v)).collect();
        line.push_str(&format!(",\"headers\":{}", serde_json::to_string(&headers).unwrap_or_default()));
    }
    match std::str::from_utf8(&record.payload) {
        Ok(s) => line.push_str(&format!(",\"payload\":{}}}", text(s))),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(&record.payload);
            line.push_str(&format!(",\"payload_base64\":\"{encoded}\"}}"));
        }
    }
    line
}

/// A stream as `streams --output json`, `create` and `delete` print it (ticks as strings, see
/// [`json_line`]).
pub fn stream_json(s: &pb::StreamInfo) -> serde_json::Value {
    let retention = |r: &Option<pb::Retention>| {
        let r = r.unwrap_or_default();
        serde_json::json!({"max_age_ms": r.max_age_ms, "max_bytes": r.max_bytes, "max_records": r.max_records})
    };
    serde_json::json!({
        "stream": s.name,
        "records": s.records,
        "bytes": s.bytes,
        "first_tick": s.first_tick.to_string(),
        "last_tick": s.last_tick.to_string(),
        "created_tick": s.created_tick.to_string(),
        "content_type": s.content_type,
        "schema_version": s.schema_version,
        "description": s.description,
        "retention": retention(&s.retention),
        "effective_retention": retention(&s.effective_retention),
        "records_per_second": s.records_per_second,
        "bytes_per_second": s.bytes_per_second,
        "upstream": s.upstream,
        "importing": s.importing,
    })
}

/// Retention in a few characters: `7days/10 GiB/-` (age, bytes, records; `-` for no limit).
pub fn retention_text(r: &Option<pb::Retention>) -> String {
    let r = r.unwrap_or_default();
    let age = match r.max_age_ms {
        0 => "-".to_string(),
        ms => humantime::format_duration(Duration::from_millis(ms)).to_string(),
    };
    let number = |n: u64| if n == 0 { "-".to_string() } else { n.to_string() };
    let bytes = if r.max_bytes == 0 { "-".to_string() } else { tapeline::types::human_bytes(r.max_bytes) };
    format!("{age}/{bytes}/{}", number(r.max_records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        let record = Record::from(pb::Record {
            stream: "a/b".into(),
            tick: 7,
            payload: "hi \"x\"".into(),
            ..Default::default()
        });
        assert_eq!(json_line(&record), r#"{"stream":"a/b","tick":"7","payload":"hi \"x\""}"#);
        let record = Record::from(pb::Record {
            stream: "a".into(),
            tick: 1,
            payload: vec![0xff, 0].into(),
            ..Default::default()
        });
        assert_eq!(json_line(&record), r#"{"stream":"a","tick":"1","payload_base64":"/wA="}"#);
    }
}
