//! An in-process virtual node: a share of the training set, the local trainer, and the state
//! a strategy keeps on the node (SCAFFOLD's control variate).

use std::sync::{Arc, Mutex};

use ferry_core::{
    Update,
    privacy::{
        node::privatize,
        noise::{NoiseSeed, NoiseSource},
    },
    seed::mix_seed,
};
use ferry_engine::node::{NodeError, NodeHandle, NodeId, RoundTask};
use ferry_ml::{
    client::{ClientTask, train_update},
    data::Dataset,
    models::ModelKind,
    train::LocalData,
};

/// A simulated node holding the indices of its examples in the shared training set.
pub struct VirtualNode {
    id: NodeId,
    model: ModelKind,
    dataset: Arc<Dataset>,
    indices: Vec<usize>,
    noise_std: f32,
    /// SCAFFOLD's `c_i`, kept across rounds (empty until the node first runs SCAFFOLD).
    control: Mutex<Vec<f32>>,
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
            noise_std,
            control: Mutex::new(Vec::new()),
        }
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
        Ok(update)
    }
}
