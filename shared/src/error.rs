//! Every error in haul knows what should happen next: that decision is its
//! [`ErrorClass`], and the worker decides requeue vs. dead-letter from it, nowhere else.

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
}

/// Implemented by every library error type.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}
