//! What the engine sees of a node, wherever it runs.

use std::sync::Arc;

use ferry_core::{
    Model, Update, compress::Compression, evaluation::NodeEvaluation, privacy::node::NodePrivacy,
    strategy::ClientProcedure, task::LocalTraining,
};

/// A node's identifier within a run.
pub type NodeId = u32;

/// One round's work for one node.
#[derive(Debug, Clone)]
pub struct RoundTask {
    /// The round, from 1.
    pub round: u32,
    /// The global model to start from.
    pub model: Arc<Model>,
    /// How to train locally.
    pub training: LocalTraining,
    /// The strategy's client procedure.
    pub procedure: ClientProcedure,
    /// The round's seed; a node mixes in its id for its own randomness.
    pub seed: u64,
    /// Server state the strategy sends to every node (SCAFFOLD's control variate `c`; empty
    /// until the first round has updated it).
    pub server_control: Option<Arc<Vec<f32>>>,
    /// Distributed differential privacy: how the node clips and noises its update.
    pub privacy: Option<NodePrivacy>,
    /// How the node encodes its update on the wire.
    pub compress: Compression,
}

/// A federated evaluation's work for one node: score the global model on held-out data.
#[derive(Debug, Clone)]
pub struct EvaluateTask {
    /// The round whose model is scored.
    pub round: u32,
    /// The global model after that round.
    pub model: Arc<Model>,
    /// The evaluation's seed; a node mixes in its id for its own randomness.
    pub seed: u64,
}

/// Why a node returned no update.
#[derive(Debug, Clone, thiserror::Error)]
#[error("node {node}: {reason}")]
pub struct NodeError {
    /// The node.
    pub node: NodeId,
    /// What went wrong.
    pub reason: String,
}

/// A node the engine can hand a round to: an in-process virtual node or a remote one.
pub trait NodeHandle: Send + Sync {
    /// The node's identifier.
    fn id(&self) -> NodeId;

    /// Trains on the node's data starting from `task.model` and returns the update.
    fn train(&self, task: &RoundTask) -> Result<Update, NodeError>;

    /// Local SGD steps a task with these settings takes on this node: what its compute time
    /// on a simulated device is made of. Without knowledge of the node's data, one per epoch.
    fn steps(&self, training: &LocalTraining) -> u64 {
        u64::from(training.epochs)
    }

    /// Scores `task.model` on the node's own held-out data (federated evaluation).
    fn evaluate(&self, task: &EvaluateTask) -> Result<NodeEvaluation, NodeError>;
}

/// What an in-process node keeps for its update's compression between rounds (top-k's
/// error-feedback residual), and the step that turns its update into what the server decodes
/// from the wire, as the task's compression says.
#[derive(Debug, Default)]
pub struct WireEncoder {
    residual: std::sync::Mutex<Vec<f32>>,
}

impl WireEncoder {
    /// Replaces `update`'s delta by its decoded encoding for `task` (nothing without
    /// compression), keeping what top-k did not send; `seed` drives int8's rounding.
    pub fn encode(
        &self,
        node: NodeId,
        task: &RoundTask,
        update: &mut Update,
        seed: u64,
    ) -> Result<(), NodeError> {
        let mut residual = self.residual.lock().unwrap_or_else(|p| p.into_inner());
        task.compress
            .round_trip(&mut update.delta, &mut residual, seed)
            .map(drop)
            .map_err(|e| NodeError {
                node,
                reason: e.to_string(),
            })
    }
}

/// How a global model scored on held-out data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// Mean loss over the held-out examples.
    pub loss: f64,
    /// Share of held-out examples classified correctly, in `[0, 1]`.
    pub accuracy: f64,
    /// Accuracy on each class's examples, indexed by label (`None` for a class with no
    /// examples), so that a non-IID run shows which classes the federation fails to learn;
    /// empty when the evaluator does not score by class.
    pub class_accuracy: Vec<Option<f64>>,
}

impl Score {
    /// The score of a round nobody evaluated centrally (a run without a central test set):
    /// NaN figures, written as `null`.
    pub fn unevaluated() -> Self {
        Self {
            loss: f64::NAN,
            accuracy: f64::NAN,
            class_accuracy: Vec::new(),
        }
    }
}

/// Scores a global model on held-out data (the central test set in simulation).
pub trait Evaluator: Send + Sync {
    /// Scores `model`.
    fn evaluate(&self, model: &Model) -> Result<Score, String>;

    /// Under a simulated backdoor attack: the share of triggered test images the model sends
    /// to the attacker's target label; `None` when no backdoor is being measured.
    fn attack_success_rate(&self, _model: &Model) -> Result<Option<f64>, String> {
        Ok(None)
    }
}

/// A simulated adversary that rewrites the updates of the nodes it controls after they have
/// trained (model poisoning); it sees the whole round's updates, as the strongest published
/// attacks assume.
pub trait Adversary: Send + Sync {
    /// Rewrites, in place, the updates of the attacking nodes among `updates`.
    fn tamper(&self, round: u32, updates: &mut [(NodeId, Update)]);
}
