//! The broker's error type and the one place where errors become gRPC statuses.

use std::path::Path;
use tonic::{Code, Status};

/// Everything that can go wrong in the broker's domain code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The caller sent something malformed; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not do this; the message names the rule.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's certificate is not acceptable (no certificate, unreadable subject).
    #[error("{0}")]
    Unauthenticated(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state does not allow it now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit or quota is spent.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A dependency (disk, next hop) is not available now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a storage fault; logged in full, answered generically.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
    /// Shorthand for [`BrokerError::PermissionDenied`].
    pub fn denied(msg: impl Into<String>) -> Self {
        Self::PermissionDenied(msg.into())
    }
    /// Shorthand for [`BrokerError::NotFound`].
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
    /// Shorthand for [`BrokerError::FailedPrecondition`].
    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }
    /// Shorthand for [`BrokerError::Internal`].
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Self::Internal(msg.to_string())
    }
}

impl From<crate::kv::Error> for BrokerError {
    fn from(e: crate::kv::Error) -> Self {
        use crate::kv::Error as E;
        match e {
            // A full or failing disk is the operator's to fix; callers should retry later.
            E::Io { .. } | E::Failed(_) | E::Locked(_) | E::Corrupt { .. } => {
                Self::Unavailable(storage_failed(&e, Path::new("the database")))
            }
            E::TooLarge(m) => Self::InvalidArgument(m),
            E::Reentrant => Self::Internal(format!("storage: {e}")),
        }
    }
}

/// The message for a storage failure at `path`: what broke, in words an operator acts on, and
/// that the broker needs a restart (it takes no more work after a failed write or flush).
pub fn storage_failed(e: &crate::kv::Error, path: &Path) -> String {
    use crate::kv::Error as E;
    let path = path.display();
    match e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => format!(
            "storage failed: no space left on the disk holding {path} (ENOSPC); \
             restart the broker once space is free"
        ),
        E::Io { path: file, source } => format!(
            "storage failed: I/O error on {}: {source}; restart the broker once the disk is fixed",
            file.display()
        ),
        other => format!("storage failed: {path}: {other}; restart the broker"),
    }
}

impl From<prost::DecodeError> for BrokerError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Internal(format!("stored record does not decode: {e}"))
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::InvalidArgument(m) => Status::new(Code::InvalidArgument, m),
            BrokerError::PermissionDenied(m) => Status::new(Code::PermissionDenied, m),
            BrokerError::Unauthenticated(m) => Status::new(Code::Unauthenticated, m),
            BrokerError::NotFound(m) => Status::new(Code::NotFound, m),
            BrokerError::AlreadyExists(m) => Status::new(Code::AlreadyExists, m),
            BrokerError::FailedPrecondition(m) => Status::new(Code::FailedPrecondition, m),
            BrokerError::ResourceExhausted(m) => Status::new(Code::ResourceExhausted, m),
            BrokerError::DeadlineExceeded(m) => Status::new(Code::DeadlineExceeded, m),
            BrokerError::Unavailable(m) => Status::new(Code::Unavailable, m),
            BrokerError::Internal(m) => {
                // Details stay in the log; callers learn only that it was our fault.
                tracing::error!(error = %m, "internal error");
                Status::new(Code::Internal, "internal error; see the broker's log")
            }
        }
    }
}

/// Result alias for domain code.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
