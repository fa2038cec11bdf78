//! What the service answers when it turns a call away: the gRPC status, a log line, and the
//! refusal counted in `/metrics` under its reason.

use tonic::Status;

use crate::{coordinator::Refusal, limits::Limit, staged::StageError};

/// Logs and counts a refused upload, and returns its status.
pub(super) fn rejected(node: &str, reason: &'static str, status: Status) -> Status {
    tracing::warn!(
        "node {node}: upload refused ({reason}): {}",
        status.message()
    );
    metrics::counter!("ferry_updates_rejected_total", "reason" => reason).increment(1);
    status
}

/// [`rejected`] for the coordinator's refusals.
pub(super) fn refused(node: &str, refusal: Refusal) -> Status {
    match refusal {
        Refusal::NotOpen(m) => rejected(node, "round_not_open", Status::failed_precondition(m)),
        Refusal::Invalid(m) => rejected(node, "invalid_update", Status::invalid_argument(m)),
        Refusal::NotYet(m) => rejected(node, "version_closing", Status::unavailable(m)),
    }
}

/// [`rejected`] for a staged upload's refusals.
pub(super) fn stage_refused(node: &str, error: StageError) -> Status {
    let message = error.to_string();
    match error {
        StageError::WrongOffset { .. } => {
            rejected(node, "wrong_offset", Status::failed_precondition(message))
        }
        StageError::PastTotal => rejected(node, "malformed", Status::invalid_argument(message)),
        StageError::HashMismatch => rejected(node, "hash_mismatch", Status::data_loss(message)),
        StageError::OverNodeCap { .. } => {
            Limit::StagedBytes.refuse(node, Status::resource_exhausted(message))
        }
        StageError::DiskFull => rejected(node, "disk_full", Status::unavailable(message)),
        StageError::Io(_) => Status::internal(message),
    }
}

/// Logs a refused request that is not an upload (a secure-aggregation step, an evaluation)
/// and returns its status; `what` names it in the log.
pub(super) fn refused_request(node: &str, what: &str, refusal: Refusal) -> Status {
    let status = match refusal {
        Refusal::NotOpen(m) => Status::failed_precondition(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::NotYet(m) => Status::unavailable(m),
    };
    tracing::warn!("node {node}: {what} refused: {}", status.message());
    status
}
