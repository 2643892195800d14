//! Typed errors of librados / librbd calls, and their mapping to the crate's
//! [`Error`] (and so to gRPC codes).

use nix::errno::Errno;

use crate::error::Error;

/// A failed librados / librbd call. `what` names the call and its object
/// (`rbd_open rbd/vol-1`); it never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbdError {
    /// -ENOENT
    #[error("{what}: not found")]
    NotFound { what: String },
    /// -EEXIST
    #[error("{what}: already exists")]
    Exists { what: String },
    /// -EBUSY: watchers (mapped or open elsewhere), a held lock, an
    /// operation in progress.
    #[error("{what}: busy (in use)")]
    Busy { what: String },
    /// -ENOTEMPTY: an image with snapshots, a snapshot with children.
    #[error("{what}: not empty (has snapshots or children)")]
    NotEmpty { what: String },
    /// -EPERM / -EACCES: cephx caps or authentication.
    #[error("{what}: permission denied (check the cephx user's key and caps)")]
    PermissionDenied { what: String, errno: i32 },
    /// -ENOSPC / -EDQUOT: the cluster or the pool's quota is full.
    #[error("{what}: no space left (cluster full or pool quota reached)")]
    NoSpace { what: String, errno: i32 },
    /// -EINVAL, or an argument refused before any call (e.g. a NUL byte).
    #[error("{what}: invalid argument")]
    InvalidArgument { what: String },
    /// -ETIMEDOUT (e.g. `rados_connect` past `client_mount_timeout`).
    #[error("{what}: timed out")]
    TimedOut { what: String },
    /// The cluster cannot be reached: -ENOTCONN, -ECONNREFUSED, -ESHUTDOWN,
    /// -EHOSTUNREACH, -ENETUNREACH, -ECONNRESET.
    #[error("{what}: cluster unreachable: {}", errno_text(*.errno))]
    Unavailable { what: String, errno: i32 },
    /// Anything else.
    #[error("{what}: {} (errno {errno})", errno_text(*.errno))]
    Other { errno: i32, what: String },
}

pub type RbdResult<T> = std::result::Result<T, RbdError>;

// errno values, as nix (libc) defines them for the target.
pub(crate) const EPERM: i32 = Errno::EPERM as i32;
pub(crate) const ENOENT: i32 = Errno::ENOENT as i32;
pub(crate) const EIO: i32 = Errno::EIO as i32;
pub(crate) const EACCES: i32 = Errno::EACCES as i32;
pub(crate) const EBUSY: i32 = Errno::EBUSY as i32;
pub(crate) const EEXIST: i32 = Errno::EEXIST as i32;
pub(crate) const EINVAL: i32 = Errno::EINVAL as i32;
pub(crate) const ENOSPC: i32 = Errno::ENOSPC as i32;
pub(crate) const ERANGE: i32 = Errno::ERANGE as i32;
pub(crate) const ENOTEMPTY: i32 = Errno::ENOTEMPTY as i32;
pub(crate) const ELOOP: i32 = Errno::ELOOP as i32;
pub(crate) const ECONNRESET: i32 = Errno::ECONNRESET as i32;
pub(crate) const ENOTCONN: i32 = Errno::ENOTCONN as i32;
pub(crate) const ESHUTDOWN: i32 = Errno::ESHUTDOWN as i32;
pub(crate) const ETIMEDOUT: i32 = Errno::ETIMEDOUT as i32;
pub(crate) const ECONNREFUSED: i32 = Errno::ECONNREFUSED as i32;
pub(crate) const EHOSTUNREACH: i32 = Errno::EHOSTUNREACH as i32;
pub(crate) const ENETUNREACH: i32 = Errno::ENETUNREACH as i32;
pub(crate) const EDQUOT: i32 = Errno::EDQUOT as i32;
pub(crate) const ECANCELED: i32 = Errno::ECANCELED as i32;

/// strerror text, without std's " (os error N)" suffix.
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

impl RbdError {
    /// Maps a C return value (`-errno`, or a positive errno) for `what`.
    pub fn from_errno(ret: i64, what: impl Into<String>) -> RbdError {
        let errno = ret.unsigned_abs().min(i32::MAX as u64) as i32;
        let what = what.into();
        match errno {
            ENOENT => RbdError::NotFound { what },
            EEXIST => RbdError::Exists { what },
            EBUSY => RbdError::Busy { what },
            ENOTEMPTY => RbdError::NotEmpty { what },
            EPERM | EACCES => RbdError::PermissionDenied { what, errno },
            ENOSPC | EDQUOT => RbdError::NoSpace { what, errno },
            EINVAL => RbdError::InvalidArgument { what },
            ETIMEDOUT => RbdError::TimedOut { what },
            ENOTCONN | ECONNREFUSED | ESHUTDOWN | EHOSTUNREACH | ENETUNREACH | ECONNRESET => {
                RbdError::Unavailable { what, errno }
            }
            _ => RbdError::Other { errno, what },
        }
    }

    /// The errno this error stands for (EINVAL for arguments refused before
    /// any call).
    pub fn errno(&self) -> i32 {
        match self {
            RbdError::NotFound { .. } => ENOENT,
            RbdError::Exists { .. } => EEXIST,
            RbdError::Busy { .. } => EBUSY,
            RbdError::NotEmpty { .. } => ENOTEMPTY,
            RbdError::InvalidArgument { .. } => EINVAL,
            RbdError::TimedOut { .. } => ETIMEDOUT,
            RbdError::PermissionDenied { errno, .. }
            | RbdError::NoSpace { errno, .. }
            | RbdError::Unavailable { errno, .. }
            | RbdError::Other { errno, .. } => *errno,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, RbdError::NotFound { .. })
    }
}

/// `Ok(v)` for `ret >= 0`, else the typed error for `what` (built lazily).
pub(crate) fn check<F: FnOnce() -> String>(ret: i64, what: F) -> RbdResult<i64> {
    if ret >= 0 {
        Ok(ret)
    } else {
        Err(RbdError::from_errno(ret, what()))
    }
}

impl From<RbdError> for Error {
    fn from(e: RbdError) -> Error {
        let msg = e.to_string();
        match e {
            RbdError::NotFound { .. } => Error::NotFound(msg),
            RbdError::Exists { .. } => Error::AlreadyExists(msg),
            // CSI: "volume in use" / "has snapshots" are FAILED_PRECONDITION
            RbdError::Busy { .. } | RbdError::NotEmpty { .. } => Error::FailedPrecondition(msg),
            // The crate's Error has no PERMISSION_DENIED (CSI lists none for
            // the controller calls): a caps problem is a misconfiguration
            // the operator must fix, reported as INTERNAL with the reason.
            RbdError::PermissionDenied { .. } => Error::Internal(msg),
            RbdError::NoSpace { .. } => Error::ResourceExhausted(msg),
            RbdError::InvalidArgument { .. } => Error::InvalidArgument(msg),
            RbdError::TimedOut { .. } => Error::DeadlineExceeded(msg),
            RbdError::Unavailable { .. } => Error::Unavailable(msg),
            RbdError::Other { .. } => Error::Internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_errnos_and_codes() {
        let cases = [
            (-ENOENT, Code::NotFound),
            (-EEXIST, Code::AlreadyExists),
            (-EBUSY, Code::FailedPrecondition),
            (-ENOTEMPTY, Code::FailedPrecondition),
            (-EPERM, Code::Internal),
            (-EACCES, Code::Internal),
            (-ENOSPC, Code::ResourceExhausted),
            (-EDQUOT, Code::ResourceExhausted),
            (-EINVAL, Code::InvalidArgument),
            (-ETIMEDOUT, Code::DeadlineExceeded),
            (-ENOTCONN, Code::Unavailable),
            (-12, Code::Internal),
        ];
        for (ret, code) in cases {
            let e = RbdError::from_errno(ret.into(), "rbd_x rbd/v");
            assert_eq!(e.errno(), -ret, "{e}");
            let err: Error = e.clone().into();
            assert_eq!(err.code(), code, "{e}");
            assert!(err.to_string().starts_with("rbd_x rbd/v: "), "{err}");
        }
        assert_eq!(
            RbdError::from_errno(-5, "rbd_y").to_string(),
            "rbd_y: Input/output error (errno 5)"
        );
        assert!(check(3, || unreachable!()).is_ok());
        assert!(check(-(ENOENT as i64), || "z".into())
            .unwrap_err()
            .is_not_found());
    }
}
