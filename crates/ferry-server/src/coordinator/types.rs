//! What the coordinator's callers see: the run's settings, its status, the events it
//! reports, the work it hands nodes, and how uploads and failed rounds are answered.

use std::{sync::Arc, time::Duration};

use ferry_core::{
    CoreError, compress::Compression, cross_site::CrossSiteModels, evaluation::EvaluationSchedule,
    personal::TensorRoles, privacy::node::NodePrivacy, strategy::ClientProcedure,
    task::LocalTraining,
};
use ferry_engine::{
    node::RoundTask, record::RoundRecord, round::CohortRule, secure::SecureAggregation,
};
use ferry_secagg::SecAggParams;

/// How the deployed run proceeds.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Hash of the run configuration; a stored run with another hash is not resumed.
    pub config_hash: String,
    /// Rounds to run.
    pub rounds: u32,
    /// Cohort selection and local training.
    pub cohort: CohortRule,
    /// Updates needed to close a round at its deadline.
    pub min_results: usize,
    /// Time a round waits for its cohort.
    pub round_timeout: Duration,
    /// Stop once the global model reaches this accuracy.
    pub target_accuracy: Option<f64>,
    /// How often nodes heartbeat while training.
    pub heartbeat_interval: Duration,
    /// Silence after which a node counts as offline.
    pub offline_after: Duration,
    /// Largest chunk accepted in an upload, and sent in a download.
    pub max_chunk_bytes: usize,
    /// Secure aggregation: rounds run SecAgg+ and the server sees only their sums.
    pub secure: Option<SecureAggregation>,
    /// Secure aggregation: how long each key stage (advertise, share, unmask) waits for the
    /// cohort before closing with whoever acted.
    pub secagg_stage_timeout: Duration,
    /// Wait before a failed round is tried again; doubled after each further failure of the
    /// same round, up to a minute.
    pub retry_backoff: Duration,
    /// Consecutive failed attempts at a round after which the run stops as failed.
    pub max_round_failures: u32,
    /// Retention: the blobs (models, optimizer and broadcast state, accepted updates) of how
    /// many of the latest committed rounds to keep; `None` keeps every round's, for audits
    /// and replays.
    pub keep_rounds: Option<u32>,
    /// Personalisation: the model's tensors that stay on each node (nodes are told, and
    /// replace them with their own).
    pub personal: TensorRoles,
    /// Federated evaluation: after which rounds nodes score the new model on their own
    /// held-out data, and what share of the online nodes is asked (each evaluation waits at
    /// most `round_timeout`).
    pub evaluation: EvaluationSchedule,
    /// Asynchronous buffered aggregation (FedBuff): rounds are versions, closed every
    /// `buffer_size` updates from whichever nodes deliver; `None` for synchronous rounds.
    pub asynchronous: Option<ferry_engine::fedbuff::FedBuff>,
    /// How nodes compress their updates' deltas (their tasks say so); uncompressed updates
    /// are accepted too.
    pub compress: Compression,
    /// The cross-site validation matrix asked for: with `Local`, nodes that opt in fine-tune
    /// the final model and every node scores each site's own model before the run ends.
    pub cross_site: Option<CrossSiteModels>,
}

impl RunSpec {
    /// Refuses an update compressed otherwise than the run asks (an uncompressed one is
    /// always taken): the run's refusals (SecAgg+, distributed DP) were decided for its own
    /// encoding.
    pub fn accepts(&self, compression: Compression) -> Result<(), CoreError> {
        if compression == Compression::None || compression == self.compress {
            Ok(())
        } else {
            Err(CoreError::Compression(format!(
                "the update is {compression}-compressed but this run's compression is {}; \
                 the node should follow its task's compress field",
                self.compress
            )))
        }
    }
}

/// A reference to a stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Content id (see `ferry_core::content`).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// A snapshot of the run for the REST API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStatus {
    /// The run's identifier.
    pub run_id: String,
    /// The open (or next) round.
    pub round: u32,
    /// Rounds configured.
    pub rounds: u32,
    /// `waiting_for_nodes`, `training`, `evaluating` (nodes score the round's model),
    /// `cross_site` (after the last round: sites' own models fine-tuned and scored),
    /// `retrying` (after a failed attempt), `finished` or `failed`.
    pub phase: String,
    /// Online nodes a round needs before it starts.
    pub nodes_needed: usize,
    /// While the run waits: what for and why ("waiting for 5 online nodes: ...").
    pub waiting: Option<String>,
    /// Consecutive failed attempts at the current round.
    pub failed_attempts: u32,
    /// Why the latest attempt failed, while the round has not succeeded since.
    pub last_failure: Option<String>,
    /// Nodes heard from recently.
    pub nodes_online: usize,
    /// Nodes in the open round's cohort (while evaluating: nodes asked to evaluate; in the
    /// cross-site phase: nodes fine-tuning and site models in, then site models).
    pub cohort: usize,
    /// Updates accepted so far in the open round (while evaluating: evaluations in; in the
    /// cross-site phase: site models in, then scores in).
    pub updates_in: usize,
    /// Why the run ended, once it has.
    pub finished: Option<String>,
    /// Content id of the current global model.
    pub model_id: String,
    /// Differential privacy: epsilon spent so far, at `delta`.
    pub epsilon: Option<f64>,
    /// Differential privacy: the delta of the guarantee.
    pub delta: Option<f64>,
    /// Secure aggregation: the open round's stage.
    pub secagg_stage: Option<String>,
    /// Whether the operator asked the run to stop after the current round.
    pub stop_requested: bool,
}

/// What the coordinator tells its operator.
#[derive(Debug, Clone)]
pub enum Event {
    /// A round started with this many nodes.
    RoundStarted {
        /// The round.
        round: u32,
        /// Cohort size.
        cohort: usize,
    },
    /// A node's update was accepted into the open round.
    UpdateAccepted {
        /// The round.
        round: u32,
    },
    /// A round was committed.
    RoundFinished(Box<RoundRecord>),
    /// A committed round's federated evaluation closed; the record now carries it (its
    /// `federated` is `None` when no node's evaluation arrived).
    RoundEvaluated(Box<RoundRecord>),
    /// A round attempt failed; the model stays.
    RoundFailed {
        /// The attempt.
        failure: FailedRound,
        /// When the round is tried again; `None` when the run stops instead.
        retry_in: Option<Duration>,
    },
    /// Something the operator should know (a refusal, an extended deadline).
    Notice(String),
    /// The run ended.
    Finished(String),
}

/// What a node gets when it asks for work.
#[derive(Debug, Clone)]
pub enum Work {
    /// Train this.
    Task(Box<NodeTask>),
    /// Score this round's model (or a site's own model) on the node's held-out data.
    Evaluate(EvaluationTask),
    /// Fine-tune the final model on the node's data and send the update: the site's own
    /// model for the cross-site matrix.
    Tune(Box<NodeTask>),
    /// Nothing now.
    Idle(String),
    /// The run is over.
    Finished(String),
}

/// One node's task for a round.
#[derive(Debug, Clone)]
pub struct NodeTask {
    /// The run.
    pub run_id: String,
    /// What the round asks of its nodes (the model is `model`, a blob).
    pub task: RoundOrders,
    /// The model blob.
    pub model: BlobRef,
    /// The server-control blob, when the strategy broadcasts state.
    pub server_control: Option<BlobRef>,
    /// When the round may close without this node.
    pub deadline_unix_ms: u64,
    /// Secure aggregation: the protocol's parameters and the FedAvg weight cap.
    pub secagg: Option<(SecAggParams, Option<u64>)>,
}

/// A round's task as the coordinator keeps it while the round runs: everything a node is told
/// except the model itself, which nodes download from the blob store, so the coordinator
/// need not hold the global model until the round closes.
#[derive(Debug, Clone)]
pub struct RoundOrders {
    /// The round, from 1.
    pub round: u32,
    /// How to train locally.
    pub training: LocalTraining,
    /// The strategy's client procedure.
    pub procedure: ClientProcedure,
    /// The round's seed.
    pub seed: u64,
    /// Server state sent to every node (SCAFFOLD's `c`).
    pub server_control: Option<Arc<Vec<f32>>>,
    /// Distributed differential privacy: how the node clips and noises its update.
    pub privacy: Option<NodePrivacy>,
}

impl From<RoundTask> for RoundOrders {
    fn from(task: RoundTask) -> Self {
        Self {
            round: task.round,
            training: task.training,
            procedure: task.procedure,
            seed: task.seed,
            server_control: task.server_control,
            privacy: task.privacy,
        }
    }
}

/// One node's federated-evaluation task.
#[derive(Debug, Clone)]
pub struct EvaluationTask {
    /// The run.
    pub run_id: String,
    /// The round whose model is scored.
    pub round: u32,
    /// The model blob.
    pub model: BlobRef,
    /// The evaluation's seed.
    pub seed: u64,
    /// When the evaluation may close without this node.
    pub deadline_unix_ms: u64,
    /// The site whose own fine-tuned model `model` is, for the cross-site matrix; `None` for
    /// the global model.
    pub site_model: Option<String>,
}

/// The outcome of a completed upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submission {
    /// Counted in its round.
    Accepted,
    /// Already counted earlier; not counted again.
    Duplicate,
    /// A relay's partial aggregate, not counted because these of its contributors cannot
    /// count through it; the relay sends it again without them.
    NotCounted(Vec<String>),
}

/// A round attempt that ended without moving the global model, as `history.json` and the
/// store record it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FailedRound {
    /// The round.
    pub round: u32,
    /// Which attempt at the round this was (1 for the first).
    pub attempt: u32,
    /// Why it failed.
    pub reason: String,
    /// Nodes the attempt asked.
    pub cohort: usize,
    /// Updates (or masked inputs) it had accepted.
    pub updates: usize,
    /// Seconds from its start to its failure.
    pub wall_s: f64,
}

/// Reasons a run ends without finishing its rounds.
pub const FAILED_ROUNDS: &str = "rounds_failed";
/// The run stopped on an error of the coordinator itself (its store, its blob store, the
/// evaluator); restarting with the same configuration resumes it.
pub const COORDINATOR_ERROR: &str = "coordinator_error";

/// Whether a run that ended for `reason` failed.
pub fn is_failure(reason: &str) -> bool {
    reason == FAILED_ROUNDS || reason == COORDINATOR_ERROR
}
