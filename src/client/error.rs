//! The client library's own error: what a caller can act on, with no server internals in it.

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The caller asked for something that cannot work (no endpoint, a malformed URL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A call to a server failed, or the server refused it (`code`: the status it answered, when
    /// it answered one).
    #[error("{action} failed: {detail}")]
    Remote { action: &'static str, detail: String, code: Option<tonic::Code> },
}

/// The client library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
