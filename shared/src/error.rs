//! Every error in haul knows what should happen next: that decision is its
//! [`ErrorClass`], and the worker decides requeue vs. dead-letter from it, nowhere else.
//! Errors cross gRPC as a [`tonic::Status`] made in one place, [`to_status`], from the
//! class (or the more precise code an error names).

/// What kind of failure this is, which decides what happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The user must change something (bad table name, unsupported type, bad DSN).
    /// Retrying cannot help: fail the job and say what to fix.
    User,
    /// An external system hiccupped (connection reset, broker restart). Retry with backoff.
    Transient,
    /// A bug or broken invariant. Fail loudly.
    Internal,
}

impl ErrorClass {
    /// Whether redoing the same work may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Transient)
    }

    /// The gRPC code an error of this class travels as.
    pub fn code(self) -> tonic::Code {
        match self {
            ErrorClass::User => tonic::Code::FailedPrecondition,
            ErrorClass::Transient => tonic::Code::Unavailable,
            ErrorClass::Internal => tonic::Code::Internal,
        }
    }
}

/// Implemented by every library error type.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    /// The gRPC code: the class's, unless the error names a more precise one (not found,
    /// already exists, invalid argument, aborted).
    fn code(&self) -> tonic::Code {
        self.class().code()
    }
}

/// What a client is told to do about a transient failure.
pub const RETRY_HINT: &str = "this is transient: retry shortly";

/// The one conversion of an error into a gRPC status: its code, and its message (a
/// transient one with [`RETRY_HINT`]).
pub fn to_status<E: Classify + std::fmt::Display + ?Sized>(e: &E) -> tonic::Status {
    let code = e.code();
    if code == tonic::Code::Unavailable {
        tonic::Status::new(code, format!("{e} ({RETRY_HINT})"))
    } else {
        tonic::Status::new(code, e.to_string())
    }
}
