//! The one error type of ferry-client.

/// Why the node agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the node's identity.
    #[error("the server refused this node: {0}")]
    Unauthenticated(String),
    /// The settings cannot work (bad URL, unreadable certificate, no token).
    #[error("{0}")]
    Settings(String),
    /// The server stayed unreachable for longer than the agent waits.
    #[error("gave up after {seconds:.0} s without reaching the server: {last}")]
    Unreachable {
        /// How long the agent tried.
        seconds: f64,
        /// The last error seen.
        last: String,
    },
    /// A local file (state, credential) could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}
