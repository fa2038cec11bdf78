//! What a node sends back after local training.

use std::collections::BTreeMap;

use crate::partial::PartialMeta;

/// A node's contribution to one round: the change it made to the global model, how much data
/// that change stands for, and what its strategy's client procedure adds.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// `local - global`, flat, in the run's model layout order.
    pub delta: Vec<f32>,
    /// Training examples behind the delta; FedAvg weights by it.
    pub num_examples: u64,
    /// Node-reported training metrics (for example `train_loss`), for the round record.
    pub metrics: BTreeMap<String, f64>,
    /// SCAFFOLD: the change of the node's control variate, `c_i+ - c_i`.
    pub control_delta: Option<Vec<f32>>,
    /// FedNova: the node's normalising factor `a_i` (effective local steps).
    pub normalizer: Option<f64>,
    /// Distributed differential privacy: 1 if the delta was within the clip norm before
    /// clipping, 0 if not, plus the node's noise share (adaptive clipping counts these).
    pub unclipped: Option<f64>,
    /// Set when this is a relay's partial aggregate (several updates' weighted sum), not one
    /// node's update.
    pub partial: Option<PartialMeta>,
}

impl Update {
    /// A plain update: a delta and its example count, nothing else.
    pub fn new(delta: Vec<f32>, num_examples: u64) -> Self {
        Self {
            delta,
            num_examples,
            metrics: BTreeMap::new(),
            control_delta: None,
            normalizer: None,
            unclipped: None,
            partial: None,
        }
    }
}

/// Most metrics one node may report with an update or an evaluation: the round record keeps
/// every name any node sent, so a node must not be able to fill it.
pub const MAX_METRICS: usize = 64;

/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME: usize = 64;

/// Refuses a node's metrics when there are too many or a name is too long, naming the fault.
pub fn check_metric_names<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Result<(), String> {
    if names.len() > MAX_METRICS {
        return Err(format!(
            "{} metrics reported; at most {MAX_METRICS} are kept",
            names.len()
        ));
    }
    for name in names {
        if name.len() > MAX_METRIC_NAME {
            return Err(format!(
                "metric name '{}...' is longer than {MAX_METRIC_NAME} bytes",
                name.chars().take(20).collect::<String>()
            ));
        }
    }
    Ok(())
}

/// An update's scalars, known before its values are read (an update read from a file).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMeta {
    /// Training examples behind the delta.
    pub num_examples: u64,
    /// Node-reported training metrics.
    pub metrics: BTreeMap<String, f64>,
    /// FedNova's normalising factor.
    pub normalizer: Option<f64>,
    /// Distributed DP's clip indicator.
    pub unclipped: Option<f64>,
    /// Whether the update carries SCAFFOLD's control-variate change.
    pub has_control: bool,
    /// Set for a relay's partial aggregate.
    pub partial: Option<PartialMeta>,
    /// Bytes the file's tensor values occupy, in the dtypes they were sent in.
    pub value_bytes: u64,
    /// How the delta was compressed on the wire (`None` for tensors of values), so that a
    /// server can refuse an encoding its run did not ask for.
    pub compression: crate::compress::Compression,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_bounded_in_number_and_length() {
        let many: Vec<String> = (0..=MAX_METRICS).map(|i| format!("m{i}")).collect();
        assert!(check_metric_names(many[1..].iter().map(String::as_str)).is_ok());
        assert!(check_metric_names(many.iter().map(String::as_str)).is_err());
        let long = "x".repeat(MAX_METRIC_NAME + 1);
        assert!(check_metric_names([long.as_str()].into_iter()).is_err());
    }
}
