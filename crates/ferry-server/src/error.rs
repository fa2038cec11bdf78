//! The one error type of ferry-server, with what kind of failure each is and whether trying
//! again may succeed.

/// What can go wrong running the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database refused or failed a statement.
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    /// The blob store failed.
    #[error("blob store: {0}")]
    Blobs(#[from] object_store::Error),
    /// A local file (staged upload) could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The settings or the stored run cannot work together.
    #[error("{0}")]
    Settings(String),
    /// The round engine failed.
    #[error(transparent)]
    Engine(#[from] ferry_engine::EngineError),
    /// Model or update data is invalid.
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
    /// This server's lease (its epoch) is no longer the store's: another server took over, so
    /// this one may write nothing more.
    #[error(
        "this server no longer holds the coordinator lease (epoch {epoch} was taken over); it \
         writes nothing more and rejoins as a standby"
    )]
    Fenced {
        /// The epoch this server held.
        epoch: i64,
    },
}

/// What kind of failure an error is: what an operator (or a retry loop) does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database or blob store could not be reached, or was busy: the same call may
    /// succeed later.
    Unavailable,
    /// Another server holds the lease: this one must stop writing.
    Fenced,
    /// Stored data failed a check (a blob whose hash differs, an invalid update).
    Corrupt,
    /// The settings or the stored run are wrong: a person must fix them.
    Settings,
    /// Anything else the coordinator cannot go on from.
    Internal,
}

impl ServerError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// The kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(e) if store_unavailable(e) => ErrorKind::Unavailable,
            Self::Blobs(e) if blobs_unavailable(e) => ErrorKind::Unavailable,
            Self::Fenced { .. } => ErrorKind::Fenced,
            Self::Core(_) => ErrorKind::Corrupt,
            Self::Settings(_) => ErrorKind::Settings,
            _ => ErrorKind::Internal,
        }
    }

    /// Whether the same call may succeed if made again later (the database restarting, the
    /// network to the blob store down for a moment).
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }
}

/// Whether a database error means the database was out of reach or busy rather than that the
/// statement was wrong: lost connections, a pool that found no live connection in time, and
/// PostgreSQL's connection (08), shutdown (57P0x) and serialization (40001, 40P01) classes.
fn store_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => {
            e.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("57P0")
                    || code == "40001"
                    || code == "40P01"
                    || code == "53300"
            }) || e.message().contains("database is locked")
        }
        _ => false,
    }
}

/// Whether a blob store error is the service or the network failing rather than a missing or
/// refused object.
fn blobs_unavailable(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::Generic { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_say_what_to_do() {
        assert!(ServerError::Store(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!ServerError::Store(sqlx::Error::RowNotFound).is_retryable());
        assert_eq!(ServerError::Fenced { epoch: 3 }.kind(), ErrorKind::Fenced);
        assert!(!ServerError::Fenced { epoch: 3 }.is_retryable());
        assert_eq!(
            ServerError::Settings("bad".into()).kind(),
            ErrorKind::Settings
        );
    }
}
