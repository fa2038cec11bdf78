//! What a run records about each round.

use ferry_core::privacy::DpRoundRecord;
use serde::{Deserialize, Serialize};

/// One round, as shown on screen and written to `history.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round, from 1.
    pub round: u32,
    /// Accuracy of the new global model on the test set, in `[0, 1]`.
    pub accuracy: f64,
    /// Mean test loss of the new global model.
    pub loss: f64,
    /// Accuracy of the new global model on each class's test examples, indexed by label
    /// (`null` for a class with no test examples); empty when the evaluator does not score
    /// by class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_accuracy: Vec<Option<f64>>,
    /// Nodes whose updates were aggregated.
    pub participants: usize,
    /// Selected nodes that failed or whose update was refused.
    pub failures: usize,
    /// Update bytes received from nodes.
    pub bytes_up: u64,
    /// Model bytes sent to nodes.
    pub bytes_down: u64,
    /// Wall-clock seconds for the whole round, evaluation included.
    pub wall_s: f64,
    /// Seconds spent in the aggregation rule (folding updates in and finishing).
    #[serde(default)]
    pub aggregation_s: f64,
    /// Mean local training loss reported by the participants.
    pub train_loss: f64,
    /// Bytes of state the server strategy keeps between rounds.
    pub strategy_state_bytes: usize,
    /// Differential privacy: epsilon spent by the run so far, at the run's delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Differential privacy: the round's clip norm, noise and accounting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpRoundRecord>,
    /// Backdoor simulation: share of triggered test images classified as the target label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack_success_rate: Option<f64>,
    /// Robust aggregation: the nodes whose updates the rule left out (Krum, Bulyan).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// Secure aggregation: why the round ended without a new model (too many nodes dropped
    /// for the masks to be removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
}
