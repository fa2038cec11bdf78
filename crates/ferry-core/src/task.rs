//! The local-training settings a node receives with the global model.

use serde::{Deserialize, Serialize};

/// How a node trains on its data in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalTraining {
    /// Passes over the node's data per round.
    pub epochs: u32,
    /// Examples per SGD step.
    pub batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum (PyTorch convention, no dampening).
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}
