//! The one mapping from the server side's error to a gRPC status.

use crate::error::Error;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// Refusals are logged at most once per this long for each reason, with how many were not.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Per reason: when a refusal was last logged, and how many were not since.
static LOGGED: Mutex<Option<HashMap<&'static str, (Instant, u64)>>> = Mutex::new(None);

/// The one mapping from a domain error to a gRPC status; counted in `tapeline_refusals_total` by
/// code and reason, and logged (a flood of one kind of refusal is one line a second).
pub fn status(err: &Error) -> Status {
    let (code, reason) = classify(err);
    metrics::counter!("tapeline_refusals_total", "code" => format!("{code:?}"), "reason" => reason)
        .increment(1);
    let message = err.to_string();
    if let Some(unlogged) = due(reason) {
        tracing::info!(?code, reason, unlogged, "refused: {message}");
    }
    Status::new(code, message)
}

/// Whether a refusal for `reason` is logged now; if so, how many were not since the last one.
fn due(reason: &'static str) -> Option<u64> {
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let Some((last, unlogged)) = logged.get_or_insert_with(HashMap::new).get_mut(reason) else {
        logged.get_or_insert_with(HashMap::new).insert(reason, (now, 0));
        return Some(0);
    };
    if now.duration_since(*last) < LOG_EVERY {
        *unlogged += 1;
        return None;
    }
    *last = now;
    Some(std::mem::take(unlogged))
}

/// An error's gRPC code, and why in a word (a bounded set of metric label values).
fn classify(err: &Error) -> (Code, &'static str) {
    match err {
        Error::Invalid(_) | Error::InvalidArgument(_) => (Code::InvalidArgument, "invalid_argument"),
        Error::RecordTooLarge { .. } => (Code::ResourceExhausted, "record_too_large"),
        Error::HeadersTooLarge { .. } => (Code::ResourceExhausted, "headers_too_large"),
        Error::Batch(_) => (Code::ResourceExhausted, "batch_too_large"),
        Error::SlowConsumer { .. } => (Code::ResourceExhausted, "slow_consumer"),
        Error::TooMany { setting, .. } => (Code::ResourceExhausted, setting),
        Error::DiskFull { .. } | Error::NoRoom { .. } => (Code::ResourceExhausted, "disk_full"),
        Error::TickNotAfter { .. } | Error::TickNotAfterClock { .. } | Error::TickAhead { .. } => {
            (Code::FailedPrecondition, "tick_order")
        }
        Error::NotImportable { .. } => (Code::FailedPrecondition, "not_importable"),
        Error::UnsupportedProtocol { .. } => (Code::FailedPrecondition, "protocol_version"),
        Error::SequenceNotAfter { .. } => (Code::FailedPrecondition, "producer_sequence"),
        Error::Mirrored { .. } => (Code::FailedPrecondition, "mirrored_stream"),
        Error::SequenceReused { .. } | Error::TicksForgotten { .. } => {
            (Code::AlreadyExists, "producer_sequence")
        }
        Error::StreamExists { .. } => (Code::AlreadyExists, "stream_exists"),
        Error::UnknownStream(_) => (Code::NotFound, "unknown_stream"),
        Error::DataLoss { .. } | Error::DamagedPointer { .. } => (Code::DataLoss, "data_loss"),
        Error::Unauthenticated { .. } => (Code::Unauthenticated, "unauthenticated"),
        Error::PermissionDenied { .. } => (Code::PermissionDenied, "permission_denied"),
        Error::ShuttingDown => (Code::Unavailable, "shutting_down"),
        Error::LogFailed { .. } => (Code::Unavailable, "log_failed"),
        Error::Storage(_)
        | Error::Open { .. }
        | Error::Io { .. }
        | Error::Config { .. }
        | Error::Unsafe(_)
        | Error::ConfigFile { .. }
        | Error::Remote { .. }
        | Error::Internal(_) => (Code::Internal, "internal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_refusal_is_logged_once_a_second_with_the_count() {
        assert_eq!(due("test_flood"), Some(0));
        for _ in 0..1000 {
            assert_eq!(due("test_flood"), None);
        }
        assert_eq!(due("test_other"), Some(0), "each reason has its own line");
        {
            let mut logged = LOGGED.lock().unwrap();
            let entry = logged.as_mut().unwrap().get_mut("test_flood").unwrap();
            entry.0 -= LOG_EVERY;
        }
        assert_eq!(due("test_flood"), Some(1000));
    }
}
