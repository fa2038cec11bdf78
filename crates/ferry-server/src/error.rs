//! The one error type of ferry-server.

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
}

impl ServerError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
