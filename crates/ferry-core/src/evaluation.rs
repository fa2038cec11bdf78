//! Federated evaluation: nodes score the global model on their own held-out data, and the
//! run records the example-weighted result with its spread across nodes (how the worst site
//! fares is what a cross-organisation federation asks first).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How one node scored a global model on its own held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEvaluation {
    /// Held-out examples scored (the node's weight in the federated result).
    pub num_examples: u64,
    /// Mean loss over those examples.
    pub loss: f64,
    /// Share of those examples predicted correctly, in `[0, 1]`.
    pub accuracy: f64,
    /// Any further named figures (for example `f1`), weighted by examples like the loss.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

impl NodeEvaluation {
    /// Refuses figures that would corrupt the federated result, naming the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_examples == 0 {
            return Err("the evaluation scored 0 examples; the node needs held-out data".into());
        }
        if !self.loss.is_finite() {
            return Err(format!("the evaluation's loss is {}", self.loss));
        }
        if !(0.0..=1.0).contains(&self.accuracy) {
            return Err(format!(
                "the evaluation's accuracy is {}; it must be a share in [0, 1]",
                self.accuracy
            ));
        }
        crate::update::check_metric_names(self.metrics.keys().map(String::as_str))?;
        match self.metrics.iter().find(|(_, v)| !v.is_finite()) {
            Some((name, value)) => Err(format!("the evaluation's metric '{name}' is {value}")),
            None => Ok(()),
        }
    }
}

/// The federated result of one round's evaluation, as the round record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederatedEvaluation {
    /// Nodes whose evaluation counted.
    pub nodes: usize,
    /// Nodes asked that reported no evaluation (failed, refused, or late).
    pub failures: usize,
    /// Held-out examples scored in all.
    pub num_examples: u64,
    /// Example-weighted mean loss.
    pub loss: f64,
    /// Example-weighted accuracy: the share of all held-out examples predicted correctly.
    pub accuracy: f64,
    /// The lowest node accuracy.
    pub accuracy_min: f64,
    /// The median node accuracy (the mean of the middle two for an even count).
    pub accuracy_median: f64,
    /// The highest node accuracy.
    pub accuracy_max: f64,
    /// Example-weighted mean of each named metric, over the nodes that reported it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Each counted node's own accuracy, by node (what a dashboard shows per node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_accuracy: BTreeMap<String, f64>,
    /// Each counted node's held-out examples, by node (the cross-site matrix's counts).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_examples: BTreeMap<String, u64>,
}

impl FederatedEvaluation {
    /// [`FederatedEvaluation::combine`] over each named node's evaluation, keeping every
    /// node's accuracy under its name.
    pub fn combine_named(results: &[(String, NodeEvaluation)], failures: usize) -> Option<Self> {
        let evaluations: Vec<NodeEvaluation> = results.iter().map(|(_, e)| e.clone()).collect();
        let mut combined = Self::combine(&evaluations, failures)?;
        combined.node_accuracy = results
            .iter()
            .map(|(node, e)| (node.clone(), e.accuracy))
            .collect();
        combined.node_examples = results
            .iter()
            .map(|(node, e)| (node.clone(), e.num_examples))
            .collect();
        Some(combined)
    }

    /// Combines the nodes' evaluations; `None` when none arrived.
    pub fn combine(results: &[NodeEvaluation], failures: usize) -> Option<Self> {
        if results.is_empty() {
            return None;
        }
        let examples: u64 = results.iter().map(|r| r.num_examples).sum();
        let weighted = |figure: fn(&NodeEvaluation) -> f64| {
            results
                .iter()
                .map(|r| r.num_examples as f64 * figure(r))
                .sum::<f64>()
                / examples as f64
        };
        let mut accuracies: Vec<f64> = results.iter().map(|r| r.accuracy).collect();
        accuracies.sort_by(f64::total_cmp);
        let n = accuracies.len();
        let median = if n % 2 == 1 {
            accuracies[n / 2]
        } else {
            (accuracies[n / 2 - 1] + accuracies[n / 2]) / 2.0
        };
        let mut sums: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for result in results {
            for (name, value) in &result.metrics {
                let (sum, count) = sums.entry(name.clone()).or_default();
                *sum += result.num_examples as f64 * value;
                *count += result.num_examples;
            }
        }
        Some(Self {
            nodes: n,
            failures,
            num_examples: examples,
            loss: weighted(|r| r.loss),
            accuracy: weighted(|r| r.accuracy),
            accuracy_min: accuracies[0],
            accuracy_median: median,
            accuracy_max: accuracies[n - 1],
            metrics: sums
                .into_iter()
                .map(|(name, (sum, count))| (name, sum / count as f64))
                .collect(),
            node_accuracy: BTreeMap::new(),
            node_examples: BTreeMap::new(),
        })
    }
}

/// When and where a run evaluates federatedly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvaluationSchedule {
    /// Evaluate after every this many rounds (and after the last round); 0 never.
    pub every: u32,
    /// Share of the available nodes asked each time, in `(0, 1]`.
    pub fraction: f64,
}

impl EvaluationSchedule {
    /// No federated evaluation.
    pub const OFF: Self = Self {
        every: 0,
        fraction: 1.0,
    };

    /// Refuses a fraction outside `(0, 1]`.
    pub fn checked(every: u32, fraction: f64) -> Result<Self, String> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!(
                "evaluate-fraction must be in (0, 1], got {fraction}"
            ));
        }
        Ok(Self { every, fraction })
    }

    /// Whether the model after `round` (of `rounds`) is evaluated.
    pub fn due(&self, round: u32, rounds: u32) -> bool {
        self.every > 0 && (round.is_multiple_of(self.every) || round == rounds)
    }

    /// How many of `available` nodes are asked: `ceil(fraction · available)`, at least one
    /// when any is available.
    pub fn nodes(&self, available: usize) -> usize {
        ((self.fraction * available as f64).ceil() as usize).clamp(available.min(1), available)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node(num_examples: u64, loss: f64, accuracy: f64) -> NodeEvaluation {
        NodeEvaluation {
            num_examples,
            loss,
            accuracy,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn the_result_weights_nodes_by_examples_and_keeps_the_spread() {
        let mut a = node(100, 1.0, 0.5);
        a.metrics.insert("f1".into(), 0.4);
        let b = node(300, 0.2, 0.9);
        let c = node(100, 0.6, 0.7);
        let result = FederatedEvaluation::combine(&[a, b, c], 1).expect("some");
        assert_eq!(
            (result.nodes, result.failures, result.num_examples),
            (3, 1, 500)
        );
        assert!((result.accuracy - (50.0 + 270.0 + 70.0) / 500.0).abs() < 1e-12);
        assert!((result.loss - (100.0 + 60.0 + 60.0) / 500.0).abs() < 1e-12);
        assert_eq!(
            (
                result.accuracy_min,
                result.accuracy_median,
                result.accuracy_max
            ),
            (0.5, 0.7, 0.9)
        );
        // Only the node that reported f1 weighs in it.
        assert_eq!(result.metrics["f1"], 0.4);
        let even =
            FederatedEvaluation::combine(&[node(1, 0.0, 0.2), node(1, 0.0, 0.6)], 0).expect("some");
        assert!((even.accuracy_median - 0.4).abs() < 1e-12);
        assert!(FederatedEvaluation::combine(&[], 2).is_none());
    }

    #[test]
    fn figures_that_would_corrupt_the_result_are_refused_by_name() {
        assert!(
            node(0, 0.1, 0.5)
                .validate()
                .unwrap_err()
                .contains("0 examples")
        );
        assert!(
            node(5, f64::NAN, 0.5)
                .validate()
                .unwrap_err()
                .contains("loss")
        );
        assert!(node(5, 0.1, 1.5).validate().unwrap_err().contains("[0, 1]"));
        let mut bad = node(5, 0.1, 0.5);
        bad.metrics.insert("auc".into(), f64::INFINITY);
        assert!(bad.validate().unwrap_err().contains("'auc'"));
        assert!(node(5, 0.1, 0.5).validate().is_ok());
    }

    #[test]
    fn the_schedule_includes_the_last_round_and_asks_at_least_one_node() {
        let every_3 = EvaluationSchedule::checked(3, 0.5).expect("valid");
        let due: Vec<u32> = (1..=7).filter(|&r| every_3.due(r, 7)).collect();
        assert_eq!(due, [3, 6, 7]);
        assert!(!EvaluationSchedule::OFF.due(7, 7));
        assert_eq!((every_3.nodes(5), every_3.nodes(1)), (3, 1));
        assert!(EvaluationSchedule::checked(1, 0.0).is_err());
        assert!(EvaluationSchedule::checked(1, 1.5).is_err());
    }

    proptest! {
        /// The weighted accuracy is the pooled share correct, so it lies within the spread.
        #[test]
        fn the_weighted_accuracy_lies_between_the_worst_and_best_node(
            nodes in proptest::collection::vec((1u64..10_000, 0.0f64..=1.0), 1..40)
        ) {
            let results: Vec<NodeEvaluation> =
                nodes.iter().map(|&(n, acc)| node(n, 0.0, acc)).collect();
            let r = FederatedEvaluation::combine(&results, 0).expect("some");
            prop_assert!(r.accuracy_min - 1e-12 <= r.accuracy && r.accuracy <= r.accuracy_max + 1e-12);
            prop_assert!(r.accuracy_min <= r.accuracy_median && r.accuracy_median <= r.accuracy_max);
            prop_assert_eq!(r.num_examples, nodes.iter().map(|n| n.0).sum::<u64>());
        }
    }
}
