//! What went wrong in the LVM backend, said as what happened (not as a gRPC
//! code), and the one place it becomes the CSI-level [`Error`].
//!
//! Failures of `lvm` commands are classified once, in [`classify`]: by exit
//! code first, by message second. Everything else in the backend builds the
//! variant that says what it found. The agent API carries the variant over
//! the wire (see `rpc`), so a controller on another node matches the same
//! variant a controller in the node's own process would.

use crate::error::Error;
use crate::runner::RunError;

/// Every variant but [`LvmError::CommandFailed`] and [`LvmError::Host`]
/// carries a message written for an operator.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    /// The node does not serve the device class named.
    #[error("{0}")]
    NoSuchClass(String),
    /// The logical volume (or the VG it was in) is not there.
    #[error("{0}")]
    LvMissing(String),
    /// The LV is mounted or open on the node.
    #[error("{0}")]
    InUse(String),
    /// Other work on the LV is under way (a zeroing, a copy); retry later.
    #[error("{0}")]
    Busy(String),
    /// The VG or thin pool cannot hold what was asked.
    #[error("{0}")]
    NoSpace(String),
    /// An LV of that name exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request was refused as given (by the agent API, or by lvm's own
    /// argument check).
    #[error("{0}")]
    BadRequest(String),
    /// The node cannot do this until someone changes something there (a
    /// thin pool that cannot be made safe, a copy whose point in time is
    /// lost): retrying alone does not help.
    #[error("{0}")]
    Blocked(String),
    /// The VG, pool or agent cannot be reached or is not there yet.
    #[error("{0}")]
    Unavailable(String),
    /// The agent API acts only on Lodestone's own LVs.
    #[error("{0}")]
    PermissionDenied(String),
    /// A command (or a remote agent) did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// An lvm command failed in a way none of the above describes.
    #[error("{message}")]
    CommandFailed {
        message: String,
        #[source]
        source: RunError,
    },
    /// A host operation (mount table, block device) failed; it already says
    /// what happened in the core's terms.
    #[error(transparent)]
    Host(#[from] Error),
    /// A bug or an impossible state.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = LvmError> = std::result::Result<T, E>;

/// lvm2's exit code for a command line it refused (`EINVALID_CMD_LINE`).
/// Nearly every other failure exits with `ECMD_FAILED` (5), so past this
/// code only the message tells what happened.
pub const EXIT_INVALID_CMD_LINE: i32 = 3;

/// Classifies a failed lvm command: exit code first, message second. The
/// only place that reads lvm's words; unit tests below hold recorded stderr.
pub fn classify(e: RunError) -> LvmError {
    let code = match &e {
        RunError::Timeout { .. } => return LvmError::Timeout(e.to_string()),
        RunError::Failed { code, .. } => *code,
        RunError::Spawn { .. } | RunError::Parse { .. } => return command_failed(e),
    };
    let stderr = e.stderr().trim().to_string();
    if code == EXIT_INVALID_CMD_LINE {
        return LvmError::BadRequest(format!("lvm refused the arguments: {stderr}"));
    }
    let lower = stderr.to_lowercase();
    let has = |s: &str| lower.contains(s);
    if has("insufficient free space")
        || has("insufficient suitable")
        || has("free space in thin pool")
        || has("cannot create new thin volume")
    {
        LvmError::NoSpace(format!("not enough space: {stderr}"))
    } else if has("already exists") {
        LvmError::AlreadyExists(stderr)
    } else if has("in use") || has("is open") || has("is used by") {
        LvmError::InUse(format!(
            "the volume is in use (mounted or open); unpublish and unstage it first: {stderr}"
        ))
    } else if has("not found") || has("failed to find logical volume") {
        // "Volume group ... not found" too: the LV is gone with its VG.
        LvmError::LvMissing(stderr)
    } else {
        command_failed(e)
    }
}

fn command_failed(e: RunError) -> LvmError {
    LvmError::CommandFailed {
        message: e.to_string(),
        source: e,
    }
}

impl From<RunError> for LvmError {
    fn from(e: RunError) -> Self {
        classify(e)
    }
}

impl LvmError {
    /// Whether a remote agent could not be asked at all (as opposed to
    /// answering with a failure).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LvmError::Unavailable(_) | LvmError::Timeout(_))
    }

    /// A short stable name of the variant, for the agent API's wire.
    pub fn wire_name(&self) -> &'static str {
        match self {
            LvmError::NoSuchClass(_) => "no-such-class",
            LvmError::LvMissing(_) => "lv-missing",
            LvmError::InUse(_) => "in-use",
            LvmError::Busy(_) => "busy",
            LvmError::NoSpace(_) => "no-space",
            LvmError::AlreadyExists(_) => "already-exists",
            LvmError::BadRequest(_) => "bad-request",
            LvmError::Blocked(_) => "blocked",
            LvmError::Unavailable(_) => "unavailable",
            LvmError::PermissionDenied(_) => "permission-denied",
            LvmError::Timeout(_) => "timeout",
            LvmError::CommandFailed { .. } => "command-failed",
            LvmError::Host(_) => "host",
            LvmError::Internal(_) => "internal",
        }
    }

    /// The variant `name` (see [`LvmError::wire_name`]) with `message`, as a
    /// remote agent sent it: `exit` is a failed command's exit code, `host`
    /// makes the core error a "host" one was. None for a name this build does
    /// not know.
    pub fn from_wire(
        name: &str,
        message: String,
        exit: Option<i32>,
        host: impl FnOnce(String) -> Error,
    ) -> Option<Self> {
        Some(match name {
            "no-such-class" => LvmError::NoSuchClass(message),
            "lv-missing" => LvmError::LvMissing(message),
            "in-use" => LvmError::InUse(message),
            "busy" => LvmError::Busy(message),
            "no-space" => LvmError::NoSpace(message),
            "already-exists" => LvmError::AlreadyExists(message),
            "bad-request" => LvmError::BadRequest(message),
            "blocked" => LvmError::Blocked(message),
            "unavailable" => LvmError::Unavailable(message),
            "permission-denied" => LvmError::PermissionDenied(message),
            "timeout" => LvmError::Timeout(message),
            "command-failed" => LvmError::CommandFailed {
                source: RunError::Failed {
                    command: "lvm (on the node)".into(),
                    code: exit.unwrap_or(-1),
                    stderr: message.clone(),
                    stdout: String::new(),
                },
                message,
            },
            "host" => LvmError::Host(host(message)),
            "internal" => LvmError::Internal(message),
            _ => return None,
        })
    }
}

/// The one conversion from the LVM backend's outcome to the CSI-level one.
///
/// | LVM outcome        | CSI code            | why                                              |
/// |--------------------|---------------------|--------------------------------------------------|
/// | NoSuchClass        | NOT_FOUND           | the node lacks the class; callers that care match the variant first |
/// | LvMissing          | NOT_FOUND           | the volume or its source is gone                 |
/// | InUse              | FAILED_PRECONDITION | the CO must unpublish/unstage first              |
/// | Busy               | ABORTED             | other work on the LV is under way: retry later   |
/// | NoSpace            | RESOURCE_EXHAUSTED  | the CO may place elsewhere or wait               |
/// | AlreadyExists      | ALREADY_EXISTS      | a name clash                                     |
/// | BadRequest         | INVALID_ARGUMENT    | retrying the same request cannot succeed         |
/// | Blocked            | FAILED_PRECONDITION | an operator must change the node first           |
/// | Unavailable        | UNAVAILABLE         | the node, VG or pool may come back: retry        |
/// | PermissionDenied   | UNAVAILABLE         | that agent will not serve this call, as when it refuses the controller's certificate |
/// | Timeout            | DEADLINE_EXCEEDED   | the outcome is unknown: retry (calls are idempotent) |
/// | CommandFailed      | INTERNAL            | lvm failed in a way nobody classified            |
/// | Host(e)            | e's own code        | already a core outcome                           |
/// | Internal           | INTERNAL            | a bug or an impossible state                     |
impl From<LvmError> for Error {
    fn from(e: LvmError) -> Error {
        match e {
            LvmError::NoSuchClass(m) | LvmError::LvMissing(m) => Error::NotFound(m),
            LvmError::InUse(m) | LvmError::Blocked(m) => Error::FailedPrecondition(m),
            LvmError::Busy(m) => Error::Aborted(m),
            LvmError::NoSpace(m) => Error::ResourceExhausted(m),
            LvmError::AlreadyExists(m) => Error::AlreadyExists(m),
            LvmError::BadRequest(m) => Error::InvalidArgument(m),
            LvmError::Unavailable(m) | LvmError::PermissionDenied(m) => Error::Unavailable(m),
            LvmError::Timeout(m) => Error::DeadlineExceeded(m),
            LvmError::CommandFailed { message, .. } => Error::Internal(message),
            LvmError::Host(e) => e,
            LvmError::Internal(m) => Error::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn failed(code: i32, stderr: &str) -> RunError {
        RunError::Failed {
            command: "lvm lvcreate".into(),
            code,
            stderr: stderr.into(),
            stdout: String::new(),
        }
    }

    /// stderr as lvm2 prints it, with the exit code it exits with (the
    /// first group recorded in the test guest, Debian's lvm2).
    #[test]
    fn classifies_recorded_lvm_failures() {
        let cases = [
            (
                5,
                "  Logical Volume \"probe-x\" already exists in volume group \"lodestone-thick\"\n",
                "already-exists",
            ),
            (
                5,
                "  Failed to find logical volume \"lodestone-thick/probe-missing\"\n",
                "lv-missing",
            ),
            (
                5,
                "  Volume group \"no-such-vg\" not found\n  Cannot process volume group \
                 no-such-vg\n",
                "lv-missing",
            ),
            (
                3,
                "  Can't parse size argument.\n  Invalid argument for --size: 12q\n  Error \
                 during parsing of command line.\n",
                "bad-request",
            ),
            (
                5,
                "  Volume group \"lodestone-thick\" has insufficient free space (381 extents): \
                 25600 required.\n",
                "no-space",
            ),
            (
                5,
                "  Insufficient free space: 25598 extents needed, but only 381 available\n",
                "no-space",
            ),
            (
                5,
                "File descriptor 3 (/dev/mapper/lodestone--thick-probe--x) leaked on lvm \
                 invocation. Parent PID 224: bash\n  Logical volume lodestone-thick/probe-x in \
                 use.\n",
                "in-use",
            ),
            (
                3,
                "lvcreate: unrecognized option '--bogusflag'\n  Error during parsing of command \
                 line.\n",
                "bad-request",
            ),
            // Further messages of lvm2 the classifier reads.
            (
                5,
                "  Insufficient suitable allocatable extents for logical volume lds-x: 25 more \
                 required\n",
                "no-space",
            ),
            (
                5,
                "  Cannot create new thin volume, free space in thin pool vg0/pool0 reached \
                 threshold.\n",
                "no-space",
            ),
            (
                5,
                "  Logical volume vg0/lds-x contains a filesystem in use.\n",
                "in-use",
            ),
            // The exit code comes first: a refused command line is refused
            // whatever words it contains.
            (
                3,
                "  Volume group name \"vg0/x\" not found\n",
                "bad-request",
            ),
            (5, "  Something odd\n", "command-failed"),
            (4, "  Failed to initialize\n", "command-failed"),
        ];
        for (code, stderr, want) in cases {
            let got = classify(failed(code, stderr));
            assert_eq!(got.wire_name(), want, "{code} {stderr}");
        }
    }

    #[test]
    fn keeps_the_command_failure_as_source() {
        use std::error::Error as _;
        let e = classify(failed(5, "  Something odd"));
        let source = e.source().expect("no source");
        assert!(source.to_string().contains("exit code 5"), "{source}");
        assert!(e.to_string().contains("Something odd"), "{e}");
        let timeout = classify(RunError::Timeout {
            command: "lvm".into(),
            seconds: 3,
        });
        assert!(matches!(timeout, LvmError::Timeout(_)), "{timeout:?}");
        assert!(timeout.is_unreachable());
    }

    #[test]
    fn converts_to_the_csi_codes_of_the_table() {
        let m = || "m".to_string();
        let cases = [
            (LvmError::NoSuchClass(m()), Code::NotFound),
            (LvmError::LvMissing(m()), Code::NotFound),
            (LvmError::InUse(m()), Code::FailedPrecondition),
            (LvmError::Busy(m()), Code::Aborted),
            (LvmError::NoSpace(m()), Code::ResourceExhausted),
            (LvmError::AlreadyExists(m()), Code::AlreadyExists),
            (LvmError::BadRequest(m()), Code::InvalidArgument),
            (LvmError::Blocked(m()), Code::FailedPrecondition),
            (LvmError::Unavailable(m()), Code::Unavailable),
            (LvmError::PermissionDenied(m()), Code::Unavailable),
            (LvmError::Timeout(m()), Code::DeadlineExceeded),
            (classify(failed(5, "odd")), Code::Internal),
            (LvmError::Host(Error::OutOfRange(m())), Code::OutOfRange),
            (LvmError::Internal(m()), Code::Internal),
        ];
        for (e, code) in cases {
            let name = e.wire_name();
            assert_eq!(Error::from(e).code(), code, "{name}");
        }
    }
}
