//! The service's messages: a coordinator's tasks, SecAgg steps and replies, and upload
//! receipts, to and from their `ferry.v1` wire form.

use ferry_core::{compress::Compression, strategy::ClientProcedure};
use ferry_proto::v1::{self, UploadReceipt, sec_agg_request, sec_agg_response};
use tonic::Status;

use crate::{
    coordinator::{BlobRef, EvaluationTask, NodeTask, RunSpec, Submission},
    secure::{SecAggReply, SecAggStep},
};

pub(super) fn procedure(p: ClientProcedure) -> (v1::Procedure, f64) {
    match p {
        ClientProcedure::LocalSgd => (v1::Procedure::LocalSgd, 0.0),
        ClientProcedure::Proximal { mu } => (v1::Procedure::Proximal, mu),
        ClientProcedure::Scaffold => (v1::Procedure::Scaffold, 0.0),
        ClientProcedure::Normalized => (v1::Procedure::Normalized, 0.0),
        ClientProcedure::LossReporting => (v1::Procedure::LossReporting, 0.0),
    }
}

pub(super) fn blob(b: &BlobRef) -> v1::BlobRef {
    v1::BlobRef {
        hash: b.id.clone(),
        size_bytes: b.size,
    }
}

/// An evaluation task on the wire: the model, seed and deadline; no training settings.
pub(super) fn evaluation_message(task: &EvaluationTask, spec: &RunSpec) -> v1::Task {
    v1::Task {
        run_id: task.run_id.clone(),
        round: task.round,
        model: Some(blob(&task.model)),
        seed: task.seed,
        deadline_unix_ms: task.deadline_unix_ms,
        heartbeat_interval_ms: spec.heartbeat_interval.as_millis() as u32,
        kind: v1::TaskKind::Evaluate.into(),
        personal: spec.personal.patterns().to_vec(),
        frozen: spec.personal.frozen_patterns().to_vec(),
        site_model: task.site_model.clone().unwrap_or_default(),
        ..v1::Task::default()
    }
}

/// The task of a node that fine-tunes the final model into its own, for the cross-site
/// matrix: a training task of its own kind, whose update is sent uncompressed (it becomes a
/// model that every site scores).
pub(super) fn tuning_message(node_task: &NodeTask, spec: &RunSpec) -> v1::Task {
    v1::Task {
        kind: v1::TaskKind::Tune.into(),
        compress: String::new(),
        ..task_message(node_task, spec)
    }
}

pub(super) fn task_message(node_task: &NodeTask, spec: &RunSpec) -> v1::Task {
    let task = &node_task.task;
    let (procedure, mu) = procedure(task.procedure);
    v1::Task {
        run_id: node_task.run_id.clone(),
        round: task.round,
        model: Some(blob(&node_task.model)),
        server_control: node_task.server_control.as_ref().map(blob),
        training: Some(v1::LocalTraining {
            epochs: task.training.epochs,
            batch_size: task.training.batch_size as u32,
            lr: task.training.lr,
            momentum: task.training.momentum,
            weight_decay: task.training.weight_decay,
        }),
        procedure: procedure.into(),
        mu,
        seed: task.seed,
        deadline_unix_ms: node_task.deadline_unix_ms,
        heartbeat_interval_ms: spec.heartbeat_interval.as_millis() as u32,
        max_chunk_bytes: spec.max_chunk_bytes as u32,
        privacy: task.privacy.map(|p| v1::NodePrivacy {
            clip: p.clip,
            noise_std: p.noise_std,
            count_noise_std: p.count_noise_std,
            per_layer: p.per_layer,
        }),
        secagg: node_task
            .secagg
            .as_ref()
            .map(|(params, cap)| ferry_proto::secagg::task_to_wire(params, *cap)),
        kind: v1::TaskKind::Train.into(),
        personal: spec.personal.patterns().to_vec(),
        frozen: spec.personal.frozen_patterns().to_vec(),
        compress: match spec.compress {
            Compression::None => String::new(),
            compress => compress.to_string(),
        },
        site_model: String::new(),
    }
}

/// A SecAgg step from the wire, or INVALID_ARGUMENT.
pub(super) fn secagg_step(step: Option<sec_agg_request::Step>) -> Result<SecAggStep, Status> {
    use ferry_proto::secagg as convert;
    use sec_agg_request::Step;
    let malformed = |e: ferry_secagg::SecAggError| Status::invalid_argument(e.to_string());
    Ok(match step {
        Some(Step::Advertise(keys)) => {
            SecAggStep::Advertise(convert::keys_from_wire(&keys).map_err(malformed)?)
        }
        Some(Step::GetRoster(_)) => SecAggStep::GetRoster,
        Some(Step::Share(shares)) => SecAggStep::Share(convert::shares_from_wire(&shares)),
        Some(Step::GetInbox(_)) => SecAggStep::GetInbox,
        Some(Step::GetUnmaskRequest(_)) => SecAggStep::GetUnmaskRequest,
        Some(Step::Reveal(shares)) => {
            SecAggStep::Reveal(convert::revealed_from_wire(&shares).map_err(malformed)?)
        }
        None => return Err(Status::invalid_argument("a SecAgg request needs a step")),
    })
}

/// A SecAgg reply on the wire.
pub(super) fn secagg_outcome(reply: SecAggReply) -> sec_agg_response::Outcome {
    use ferry_proto::secagg as convert;
    use sec_agg_response::Outcome;
    match reply {
        SecAggReply::Ack => Outcome::Ack(v1::SecAggEmpty {}),
        SecAggReply::Wait => Outcome::Wait(v1::SecAggEmpty {}),
        SecAggReply::Roster(roster) => Outcome::Roster(convert::roster_to_wire(&roster)),
        SecAggReply::Inbox(inbox) => Outcome::Inbox(convert::shares_to_wire(&inbox)),
        SecAggReply::UnmaskRequest(request) => {
            Outcome::UnmaskRequest(convert::request_to_wire(&request))
        }
    }
}

pub(super) fn receipt(received_bytes: u64, submission: Option<Submission>) -> UploadReceipt {
    match submission {
        Some(Submission::NotCounted(not_counted)) => UploadReceipt {
            received_bytes,
            accepted: false,
            duplicate: false,
            not_counted,
        },
        other => UploadReceipt {
            received_bytes,
            accepted: other.is_some(),
            duplicate: other == Some(Submission::Duplicate),
            not_counted: Vec::new(),
        },
    }
}
