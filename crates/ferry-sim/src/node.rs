//! An in-process virtual node: a share of the training set, the local trainer, and the state
//! a strategy keeps on the node (SCAFFOLD's control variate).

use std::sync::{Arc, Mutex};

use ferry_core::evaluation::NodeEvaluation;
use ferry_core::{
    Update,
    privacy::{
        node::privatize,
        noise::{NoiseSeed, NoiseSource},
    },
    seed::mix_seed,
    task::LocalTraining,
};
use ferry_engine::node::{EvaluateTask, NodeError, NodeHandle, NodeId, RoundTask, WireEncoder};
use ferry_ml::{
    client::{ClientTask, train_update},
    data::Dataset,
    models::ModelKind,
    train::{self, LocalData},
};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

/// A simulated node holding the indices of its examples in the shared training set.
pub struct VirtualNode {
    id: NodeId,
    model: ModelKind,
    dataset: Arc<Dataset>,
    indices: Vec<usize>,
    /// Examples held out of training for federated evaluation (empty without it).
    held_out: Vec<usize>,
    noise_std: f32,
    /// SCAFFOLD's `c_i`, kept across rounds (empty until the node first runs SCAFFOLD).
    control: Mutex<Vec<f32>>,
    /// How its updates are encoded, with top-k's error feedback.
    wire: WireEncoder,
}

impl VirtualNode {
    /// A node that trains `model` on `dataset[indices]`, adding pixel noise of `noise_std`.
    pub fn new(
        id: NodeId,
        model: ModelKind,
        dataset: Arc<Dataset>,
        indices: Vec<usize>,
        noise_std: f32,
    ) -> Self {
        Self {
            id,
            model,
            dataset,
            indices,
            held_out: Vec::new(),
            noise_std,
            control: Mutex::new(Vec::new()),
            wire: WireEncoder::default(),
        }
    }

    /// Holds a random `share` of the node's examples (at least one, never all), drawn from
    /// `seed`, out of training, to score global models on in federated evaluation.
    pub fn holding_out(mut self, share: f64, seed: u64) -> Self {
        let n = self.indices.len();
        let held = ((share * n as f64).ceil() as usize).clamp(n.min(1), n.saturating_sub(1));
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, u64::from(self.id)));
        self.indices.shuffle(&mut rng);
        self.held_out = self.indices.split_off(n - held);
        self.indices.sort_unstable();
        self.held_out.sort_unstable();
        self
    }

    /// `model` scored on the node's held-out examples, read as its federated evaluation reads
    /// them; `None` when it holds none out.
    pub fn score_held_out(
        &self,
        model: &ferry_core::Model,
        seed: u64,
    ) -> Option<Result<train::Evaluation, ferry_ml::MlError>> {
        if self.held_out.is_empty() {
            return None;
        }
        let seed = mix_seed(seed, u64::from(self.id));
        Some(train::evaluate_examples(
            self.model,
            model,
            &self.dataset,
            &self.held_out,
            &[self.noise_std],
            seed,
        ))
    }

    /// The node's data, for baselines.
    pub fn data(&self) -> LocalData<'_> {
        LocalData {
            dataset: &self.dataset,
            indices: &self.indices,
            noise_std: self.noise_std,
        }
    }
}

impl NodeHandle for VirtualNode {
    fn id(&self) -> NodeId {
        self.id
    }

    fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let seed = mix_seed(task.seed, u64::from(self.id));
        let client_task = ClientTask {
            model: &task.model,
            training: &task.training,
            procedure: task.procedure,
            server_control: task.server_control.as_deref().map(Vec::as_slice),
            seed,
        };
        let mut update =
            train_update(self.model, self.data(), client_task, &mut control).map_err(|e| {
                NodeError {
                    node: self.id,
                    reason: e.to_string(),
                }
            })?;
        if let Some(instructions) = &task.privacy {
            let mut noise = NoiseSource::new(NoiseSeed::Run(seed), u64::from(task.round));
            privatize(&mut update, instructions, task.model.layout(), &mut noise);
        }
        self.wire.encode(self.id, task, &mut update, seed)?;
        Ok(update)
    }

    fn steps(&self, training: &LocalTraining) -> u64 {
        let batches = self.indices.len().div_ceil(training.batch_size.max(1)) as u64;
        u64::from(training.epochs) * batches
    }

    fn evaluate(&self, task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
        let fail = |reason: String| NodeError {
            node: self.id,
            reason,
        };
        match self.score_held_out(&task.model, task.seed) {
            None => Err(fail("the node holds no examples out of training".into())),
            Some(scored) => scored
                .map(|e| e.to_node_evaluation())
                .map_err(|e| fail(e.to_string())),
        }
    }
}
