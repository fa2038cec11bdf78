//! An in-process virtual node: a share of the training set and the local trainer.

use std::{collections::BTreeMap, sync::Arc};

use ferry_core::{Update, algebra};
use ferry_engine::{
    node::{NodeError, NodeHandle, NodeId, RoundTask},
    selection::mix_seed,
};
use ferry_ml::{
    data::Dataset,
    models::ModelKind,
    train::{LocalData, train_local},
};

/// A simulated node holding the indices of its examples in the shared training set.
pub struct VirtualNode {
    id: NodeId,
    model: ModelKind,
    dataset: Arc<Dataset>,
    indices: Vec<usize>,
    noise_std: f32,
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
        let fail = |reason: String| NodeError {
            node: self.id,
            reason,
        };
        let seed = mix_seed(task.seed, u64::from(self.id));
        let outcome = train_local(self.model, &task.model, self.data(), &task.training, seed)
            .map_err(|e| fail(e.to_string()))?;
        let mut delta = vec![0.0; outcome.model.num_params()];
        algebra::delta_into(&mut delta, outcome.model.values(), task.model.values());
        Ok(Update {
            delta,
            num_examples: outcome.num_examples,
            metrics: BTreeMap::from([
                ("train_loss".to_string(), outcome.mean_loss),
                ("steps".to_string(), outcome.steps as f64),
            ]),
        })
    }
}
