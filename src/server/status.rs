//! The one mapping from the server side's error to a gRPC status.

use crate::error::Error;
use tonic::{Code, Status};

/// The one mapping from a domain error to a gRPC status.
pub fn status(err: &Error) -> Status {
    let code = match err {
        Error::Invalid(_) | Error::InvalidArgument(_) | Error::EndBeforeStart { .. } => Code::InvalidArgument,
        Error::RecordTooLarge { .. }
        | Error::HeadersTooLarge { .. }
        | Error::Batch(_)
        | Error::SlowConsumer { .. }
        | Error::TooMany { .. }
        | Error::DiskFull { .. }
        | Error::NoRoom { .. } => Code::ResourceExhausted,
        Error::TickNotAfter { .. }
        | Error::TickNotAfterClock { .. }
        | Error::NotImportable { .. }
        | Error::TickAhead { .. }
        | Error::UnsupportedProtocol { .. }
        | Error::SequenceNotAfter { .. }
        | Error::Mirrored { .. } => Code::FailedPrecondition,
        Error::SequenceReused { .. } | Error::StreamExists { .. } | Error::TicksForgotten { .. } => {
            Code::AlreadyExists
        }
        Error::UnknownStream(_) => Code::NotFound,
        Error::DataLoss { .. } | Error::DamagedPointer { .. } => Code::DataLoss,
        Error::Unauthenticated { .. } => Code::Unauthenticated,
        Error::PermissionDenied { .. } => Code::PermissionDenied,
        Error::ShuttingDown | Error::LogFailed { .. } => Code::Unavailable,
        Error::Storage(_)
        | Error::Open { .. }
        | Error::Io { .. }
        | Error::Config { .. }
        | Error::Unsafe(_)
        | Error::ConfigFile { .. }
        | Error::Remote { .. }
        | Error::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}
