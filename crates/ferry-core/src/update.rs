//! What a node sends back after local training.

use std::collections::BTreeMap;

/// A node's contribution to one round: the change it made to the global model, and how much
/// data that change stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// `local - global`, flat, in the run's model layout order.
    pub delta: Vec<f32>,
    /// Training examples behind the delta; FedAvg weights by it.
    pub num_examples: u64,
    /// Node-reported training metrics (for example `train_loss`), for the round record.
    pub metrics: BTreeMap<String, f64>,
}

impl Update {
    /// Bytes this update occupies on the wire: its `f32` values (metrics are negligible).
    pub fn payload_bytes(&self) -> u64 {
        (self.delta.len() * std::mem::size_of::<f32>()) as u64
    }
}
