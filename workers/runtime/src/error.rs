//! How a handler failure is classified, which decides what the consume loop does with it.

use std::fmt;

/// A handler failure. The class decides the message's fate: a transient failure is retried
/// with backoff while the partition waits; a permanent one sends the message to its
/// dead-letter topic at once.
#[derive(Debug)]
pub enum HandlerError {
    /// The database or broker is unavailable, a lock or serialization conflict, a timeout:
    /// the same message may well succeed later.
    Transient(anyhow::Error),
    /// Retrying cannot help (a protocol violation, a message no handler accepts).
    Permanent(anyhow::Error),
}

impl HandlerError {
    pub fn permanent(message: impl fmt::Display) -> HandlerError {
        HandlerError::Permanent(anyhow::anyhow!("{message}"))
    }

    pub fn class(&self) -> &'static str {
        match self {
            HandlerError::Transient(_) => "transient",
            HandlerError::Permanent(_) => "permanent",
        }
    }

    pub fn cause(&self) -> &anyhow::Error {
        match self {
            HandlerError::Transient(e) | HandlerError::Permanent(e) => e,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {:#}", self.class(), self.cause())
    }
}

impl std::error::Error for HandlerError {}

impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> HandlerError {
        if crate::db::is_transient(&error) {
            HandlerError::Transient(error.into())
        } else {
            HandlerError::Permanent(error.into())
        }
    }
}
