//! What a run records about each round.

use ferry_core::{evaluation::FederatedEvaluation, privacy::DpRoundRecord};
use serde::{Deserialize, Serialize};

/// One round, as shown on screen and written to `history.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round, from 1.
    pub round: u32,
    /// Accuracy of the new global model on the test set, in `[0, 1]`; NaN (`null` in JSON)
    /// when the run has no central test set.
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    /// Mean test loss of the new global model; NaN (`null`) when not evaluated centrally.
    #[serde(with = "nan_as_null")]
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
    /// Federated evaluation of the new global model on the nodes' own held-out data, when the
    /// run evaluated after this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedEvaluation>,
    /// The nodes whose updates reached the aggregator, in the order they arrived (what a
    /// dashboard counts as a node's contributed rounds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributors: Vec<String>,
    /// Each contributor's training examples, in the order of `contributors` (0 where secure
    /// aggregation hides them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributor_examples: Vec<u64>,
    /// Each selected node that returned no usable update, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<NodeFailure>,
    /// Simulated devices: the simulated clock when the round (or version) ended, in seconds
    /// from the start of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim_time_s: Option<f64>,
    /// Asynchronous aggregation: how stale the version's updates were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<StalenessStats>,
    /// Deployed runs with sites' own models (`cross-site = "local"`): the final round's
    /// cross-site validation matrix, written once every site has scored every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_site: Option<ferry_core::cross_site::CrossSiteMatrix>,
}

/// How stale the updates of one asynchronous version were: versions between the model a
/// node trained on and the one its update was folded into.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StalenessStats {
    /// Mean staleness.
    pub mean: f64,
    /// Largest staleness.
    pub max: u64,
    /// Mean staleness weight the updates were folded with.
    pub mean_weight: f64,
    /// Updates noted so far (what the means are over).
    #[serde(skip)]
    updates: usize,
}

impl StalenessStats {
    /// Notes one update of staleness `tau` folded with `weight`.
    pub fn add(&mut self, tau: u64, weight: f64) {
        let n = self.updates as f64;
        self.updates += 1;
        self.mean = (self.mean * n + tau as f64) / (n + 1.0);
        self.mean_weight = (self.mean_weight * n + weight) / (n + 1.0);
        self.max = self.max.max(tau);
    }
}

/// A selected node's failure in a round: what it reported, or why its update was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFailure {
    /// The node.
    pub node: String,
    /// What went wrong, in the node's or the server's words.
    pub reason: String,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}: {}", self.node, self.reason)
    }
}

impl RoundRecord {
    /// Whether the round's model reached `target`: by the central test set when the run has
    /// one, otherwise by federated evaluation.
    pub fn reached(&self, target: f64) -> bool {
        if self.accuracy.is_nan() {
            self.federated
                .as_ref()
                .is_some_and(|f| f.accuracy >= target)
        } else {
            self.accuracy >= target
        }
    }

    /// The accuracy the run reports for the round: central when evaluated, else federated
    /// (NaN when neither).
    pub fn headline_accuracy(&self) -> f64 {
        match &self.federated {
            Some(f) if self.accuracy.is_nan() => f.accuracy,
            _ => self.accuracy,
        }
    }
}

/// A figure that may be missing, kept as NaN in memory (comparisons with it are false, so
/// a missing accuracy never reaches a target) and written as `null`.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes NaN as `null`.
    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_nan() {
            serializer.serialize_none()
        } else {
            serializer.serialize_f64(*value)
        }
    }

    /// Reads `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}
