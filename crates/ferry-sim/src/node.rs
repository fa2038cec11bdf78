//! An in-process virtual node: a share of the training set, the local trainer, and the state
//! a strategy keeps on the node (SCAFFOLD's control variate).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ferry_core::{
    Update, algebra,
    strategy::{ClientProcedure, fednova_normalizer},
};
use ferry_engine::{
    node::{NodeError, NodeHandle, NodeId, RoundTask},
    selection::mix_seed,
};
use ferry_ml::{
    data::Dataset,
    models::ModelKind,
    train::{LocalData, LocalProcedure, train_local},
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
        let fail = |reason: String| NodeError {
            node: self.id,
            reason,
        };
        let dim = task.model.num_params();
        let seed = mix_seed(task.seed, u64::from(self.id));
        // SCAFFOLD: the correction c - c_i, with c and c_i zero until first set.
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let server_control = task.server_control.as_deref().filter(|c| !c.is_empty());
        let scaffold = task.procedure == ClientProcedure::Scaffold;
        if scaffold && control.is_empty() {
            control.resize(dim, 0.0);
        }
        let correction: Vec<f32> = if scaffold {
            match server_control {
                Some(c) => c.iter().zip(control.iter()).map(|(c, ci)| c - ci).collect(),
                None => control.iter().map(|ci| -ci).collect(),
            }
        } else {
            Vec::new()
        };
        let procedure = match task.procedure {
            ClientProcedure::LocalSgd | ClientProcedure::Normalized => LocalProcedure::Plain,
            ClientProcedure::Proximal { mu } => LocalProcedure::Proximal { mu },
            ClientProcedure::Scaffold => LocalProcedure::Corrected {
                correction: &correction,
            },
        };
        let outcome = train_local(
            self.model,
            &task.model,
            self.data(),
            &task.training,
            procedure,
            seed,
        )
        .map_err(|e| fail(e.to_string()))?;
        let mut delta = vec![0.0; dim];
        algebra::delta_into(&mut delta, outcome.model.values(), task.model.values());
        let mut update = Update::new(delta, outcome.num_examples);
        update.metrics = BTreeMap::from([
            ("train_loss".to_string(), outcome.mean_loss),
            ("steps".to_string(), outcome.steps as f64),
        ]);
        match task.procedure {
            ClientProcedure::Scaffold => {
                // c_i+ = c_i - c + (x - y) / (K * lr); the node sends dc = c_i+ - c_i.
                let scale = -1.0 / (outcome.steps.max(1) as f64 * task.training.lr) as f32;
                let dc: Vec<f32> = update
                    .delta
                    .iter()
                    .enumerate()
                    .map(|(j, d)| scale * d - server_control.map_or(0.0, |c| c[j]))
                    .collect();
                algebra::add_scaled(&mut control, &dc, 1.0);
                update.control_delta = Some(dc);
            }
            ClientProcedure::Normalized => {
                update.normalizer = Some(fednova_normalizer(outcome.steps, task.training.momentum));
            }
            ClientProcedure::LocalSgd | ClientProcedure::Proximal { .. } => {}
        }
        Ok(update)
    }
}
