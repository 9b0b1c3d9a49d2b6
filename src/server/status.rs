//! The one mapping from the server side's error to a gRPC status.

use crate::broker::throttle::Throttle;
use crate::error::Error;
use std::time::Duration;
use tonic::{Code, Status};

/// Refusals are logged at most once a second for each reason, with how many were not.
static REFUSALS: Throttle = Throttle::new(Duration::from_secs(1));

/// The one mapping from a domain error to a gRPC status; counted in `tapeline_refusals_total` by
/// code and reason, and logged (a flood of one kind of refusal is one line a second).
pub fn status(err: &Error) -> Status {
    let (code, reason) = classify(err);
    metrics::counter!("tapeline_refusals_total", "code" => format!("{code:?}"), "reason" => reason)
        .increment(1);
    let message = err.to_string();
    if let Some(unlogged) = REFUSALS.due(reason) {
        tracing::info!(?code, reason, unlogged, "refused: {message}");
    }
    Status::new(code, message)
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
