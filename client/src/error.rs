//! The SDK's one error type, and the canonical names of gRPC status codes.

use std::error::Error as _;
use std::path::PathBuf;

/// Everything a [`Client`](crate::Client) call or an [`Identity`](crate::Identity) load can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// An identity file is missing, unreadable or does not hold what it should.
    #[error("identity: {}: {reason}", path.display())]
    Identity {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// The client configuration is unusable (for example a malformed broker URL).
    #[error("configuration: {reason}")]
    Config {
        /// What is wrong and what to do.
        reason: String,
    },
    /// The broker could not be reached or the TLS handshake failed.
    #[error("cannot connect to broker at {url}: {reason}")]
    Connect {
        /// The broker URL dialled.
        url: String,
        /// The transport error, with its causes.
        reason: String,
    },
    /// The broker (or the transport under a call) answered with a gRPC status.
    #[error("{}: {}", code_name(.0.code()), status_message(.0))]
    Status(#[from] tonic::Status),
    /// The broker answered something the SDK cannot use (for example a missing field).
    #[error("unexpected answer from broker: {reason}")]
    Protocol {
        /// What was wrong with the answer.
        reason: String,
    },
}

impl ClientError {
    /// The gRPC code of a `Status` error, `UNAVAILABLE` for a connect failure, `None` otherwise.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            ClientError::Connect { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }

    /// The gRPC status, when the error is one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        ClientError::Protocol {
            reason: reason.into(),
        }
    }
}

/// A shorthand for results of SDK calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The canonical upper-case name of a gRPC code, e.g. `PERMISSION_DENIED`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The canonical name of a gRPC code given as a number (as in `ErrorStatus.code`).
pub fn code_name_i32(code: i32) -> &'static str {
    code_name(tonic::Code::from_i32(code))
}

/// A status's message, followed by its transport causes when tonic attached any
/// (a failed connection otherwise reads only "transport error").
pub fn status_message(status: &tonic::Status) -> String {
    let mut msg = status.message().to_string();
    let mut source = status.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            if msg.is_empty() {
                msg = text;
            } else {
                msg.push_str(": ");
                msg.push_str(&text);
            }
        }
        source = err.source();
    }
    if msg.is_empty() {
        msg = "(no message)".to_string();
    }
    msg
}

/// An error and its causes on one line, joined by `: `.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = e.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_error_prints_code_name_and_message() {
        let e = ClientError::from(tonic::Status::permission_denied("not yours"));
        assert_eq!(e.to_string(), "PERMISSION_DENIED: not yours");
        assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
        assert_eq!(code_name_i32(5), "NOT_FOUND");
    }
}
