//! Why the coordinator turned a node's upload, report or SecAgg step away: the one answer
//! both the round bookkeeping and the secure-aggregation stages give, mapped to a gRPC status
//! by the service.

/// Why an upload or report was refused, for the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The round is not open for this node (closed, not started, or not in its cohort).
    NotOpen(String),
    /// The update's content is invalid.
    Invalid(String),
    /// Asynchronous runs: the update is wanted, but the version it would join is being
    /// committed; the node sends it again in a moment (a retryable status).
    NotYet(String),
}
