//! One error type for the core and backends, and its mapping to gRPC codes.
//!
//! Every variant carries a message written for an operator: what went wrong
//! and, where there is one, what to do about it.

use tonic::{Code, Status};

use crate::runner::RunError;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Error {
        match e {
            RunError::Timeout { .. } => Error::DeadlineExceeded(e.to_string()),
            _ => Error::Internal(e.to_string()),
        }
    }
}

/// Shorthand constructors: `invalid!("x {y}")` and so on.
#[macro_export]
macro_rules! invalid {
    ($($t:tt)*) => { $crate::error::Error::InvalidArgument(format!($($t)*)) };
}
#[macro_export]
macro_rules! not_found {
    ($($t:tt)*) => { $crate::error::Error::NotFound(format!($($t)*)) };
}
#[macro_export]
macro_rules! internal {
    ($($t:tt)*) => { $crate::error::Error::Internal(format!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_keeps_messages() {
        let s: Status = Error::OutOfRange("too big".into()).into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(s.message(), "too big");
        let e: Error = RunError::Timeout {
            command: "lvm".into(),
            seconds: 3,
        }
        .into();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        assert_eq!(
            Status::from(invalid!("x {}", 1)).code(),
            Code::InvalidArgument
        );
    }
}
