//! A relay's partial aggregate: several nodes' updates folded into one weighted sum, sent
//! upstream in place of the updates themselves.
//!
//! A linear rule's aggregate is a weighted sum divided by a total weight, so a relay can fold
//! its nodes' updates into the sum and the weights, and the server can fold that sum in as if
//! it had folded each update: the same arithmetic, grouped differently (equal within f32
//! rounding). The file is an update file (`crate::update_file`) whose `delta/` tensors hold
//! `sum_i w_i * delta_i`, whose `control/` tensors hold the sum of the control changes, and
//! whose metadata adds the `partial.*` scalars below and the contributors, so that the round
//! record still names every node and its examples.

use std::collections::HashMap;

use crate::{
    CoreError, Update,
    aggregate::{PartialSums, Weighting},
};

const WEIGHTING: &str = "partial.weighting";
const WEIGHT: &str = "partial.weight";
const NORMALIZED_EXAMPLES: &str = "partial.normalized_examples";
const UNCLIPPED: &str = "partial.unclipped";
const TRAIN_LOSS_SUM: &str = "partial.train_loss_sum";
const TRAIN_LOSSES: &str = "partial.train_losses";
const CONTRIBUTORS: &str = "partial.contributors";

/// What a partial aggregate's sums stand for.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialMeta {
    /// How each update was weighted in the sum; the server folds it only into a rule that
    /// weights the same way.
    pub weighting: Weighting,
    /// `sum_i w_i`.
    pub weight: f64,
    /// `sum_i n_i * a_i` (FedNova's normalisers; `sum_i n_i` without them).
    pub normalized_examples: f64,
    /// Distributed DP: the sum of the nodes' noisy clip indicators.
    pub unclipped: f64,
    /// Sum of the contributors' reported training losses, and how many reported one.
    pub train_loss_sum: f64,
    /// Contributors that reported a training loss.
    pub train_losses: usize,
    /// Every node folded in, with its examples, in node order.
    pub contributors: Vec<(String, u64)>,
}

impl PartialMeta {
    /// Total examples behind the sum.
    pub fn examples(&self) -> u64 {
        self.contributors.iter().map(|(_, n)| n).sum()
    }

    /// Writes the partial's scalars into an update file's metadata.
    pub fn write(&self, metadata: &mut HashMap<String, String>) {
        metadata.insert(WEIGHTING.into(), weighting_name(self.weighting).into());
        metadata.insert(WEIGHT.into(), self.weight.to_string());
        metadata.insert(
            NORMALIZED_EXAMPLES.into(),
            self.normalized_examples.to_string(),
        );
        metadata.insert(UNCLIPPED.into(), self.unclipped.to_string());
        metadata.insert(TRAIN_LOSS_SUM.into(), self.train_loss_sum.to_string());
        metadata.insert(TRAIN_LOSSES.into(), self.train_losses.to_string());
        let contributors: Vec<String> = self
            .contributors
            .iter()
            .map(|(node, n)| format!("{node}={n}"))
            .collect();
        metadata.insert(CONTRIBUTORS.into(), contributors.join(","));
    }

    /// Reads a partial's scalars from an update file's metadata: `None` for a node's own
    /// update, an error for a partial that is not whole or not consistent with
    /// `num_examples`.
    pub fn read(
        metadata: &HashMap<String, String>,
        num_examples: u64,
    ) -> Result<Option<Self>, CoreError> {
        let Some(weighting) = metadata.get(WEIGHTING) else {
            return Ok(None);
        };
        let field = |key: &str| {
            metadata
                .get(key)
                .ok_or_else(|| bad(format!("it lacks '{key}'")))
        };
        let number = |key: &str| {
            field(key)?
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("'{key}' is not a finite number")))
        };
        let contributors = field(CONTRIBUTORS)?
            .split(',')
            .map(|pair| {
                let (node, n) = pair
                    .split_once('=')
                    .ok_or_else(|| bad(format!("contributor '{pair}' is not node=examples")))?;
                let n: u64 = n
                    .parse()
                    .map_err(|_| bad(format!("contributor '{pair}' has no example count")))?;
                if node.is_empty() || n == 0 {
                    return Err(bad(format!("contributor '{pair}' is empty")));
                }
                Ok((node.to_string(), n))
            })
            .collect::<Result<Vec<_>, CoreError>>()?;
        let mut names: Vec<&str> = contributors.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != contributors.len() {
            return Err(bad("a contributor is named twice".into()));
        }
        let meta = Self {
            weighting: parse_weighting(weighting)?,
            weight: number(WEIGHT)?,
            normalized_examples: number(NORMALIZED_EXAMPLES)?,
            unclipped: number(UNCLIPPED)?,
            train_loss_sum: number(TRAIN_LOSS_SUM)?,
            train_losses: field(TRAIN_LOSSES)?
                .parse()
                .map_err(|_| bad(format!("'{TRAIN_LOSSES}' is not a count")))?,
            contributors,
        };
        if meta.examples() != num_examples {
            return Err(bad(format!(
                "its contributors' examples add up to {}, its num_examples is {num_examples}",
                meta.examples()
            )));
        }
        if meta.weight <= 0.0 {
            return Err(bad("its total weight is not positive".into()));
        }
        Ok(Some(meta))
    }
}

/// A relay's partial aggregate: the running `sums` of a linear rule weighting updates by
/// `weighting`, naming each contributor with its examples (in node order) and carrying the
/// sum and count of their training losses.
pub fn partial_update(
    sums: PartialSums,
    weighting: Weighting,
    mut contributors: Vec<(String, u64)>,
    train_losses: (f64, usize),
) -> Update {
    contributors.sort();
    let mut update = Update::new(sums.delta, sums.examples);
    update.control_delta = sums.control;
    update.partial = Some(PartialMeta {
        weighting,
        weight: sums.weight,
        normalized_examples: sums.normalized_examples,
        unclipped: sums.unclipped,
        train_loss_sum: train_losses.0,
        train_losses: train_losses.1,
        contributors,
    });
    update
}

fn bad(why: String) -> CoreError {
    CoreError::Safetensors(format!("malformed partial aggregate: {why}"))
}

fn weighting_name(weighting: Weighting) -> &'static str {
    match weighting {
        Weighting::Examples => "examples",
        Weighting::Uniform => "uniform",
        Weighting::Normalized => "normalized",
    }
}

fn parse_weighting(name: &str) -> Result<Weighting, CoreError> {
    match name {
        "examples" => Ok(Weighting::Examples),
        "uniform" => Ok(Weighting::Uniform),
        "normalized" => Ok(Weighting::Normalized),
        other => Err(bad(format!("unknown weighting '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::aggregate::{Aggregator, WeightedMean};

    fn meta() -> PartialMeta {
        PartialMeta {
            weighting: Weighting::Normalized,
            weight: 2.5,
            normalized_examples: 70.0,
            unclipped: 1.25,
            train_loss_sum: 0.75,
            train_losses: 2,
            contributors: vec![("a1".into(), 3), ("b2".into(), 4)],
        }
    }

    #[test]
    fn partial_scalars_round_trip_through_metadata() {
        let mut metadata = HashMap::new();
        meta().write(&mut metadata);
        assert_eq!(
            PartialMeta::read(&metadata, 7).expect("valid"),
            Some(meta())
        );
        assert_eq!(PartialMeta::read(&HashMap::new(), 7).expect("plain"), None);
    }

    #[test]
    fn inconsistent_or_repeated_contributors_are_refused() {
        let mut metadata = HashMap::new();
        meta().write(&mut metadata);
        assert!(
            PartialMeta::read(&metadata, 8).is_err(),
            "examples disagree"
        );
        let mut twice = meta();
        twice.contributors = vec![("a1".into(), 3), ("a1".into(), 4)];
        let mut metadata = HashMap::new();
        twice.write(&mut metadata);
        assert!(
            PartialMeta::read(&metadata, 7).is_err(),
            "a node named twice"
        );
    }

    fn node_update(values: &[f32], n: u64, a: f64, with_control: bool) -> Update {
        let mut update = Update::new(values.to_vec(), n);
        update.normalizer = Some(a);
        if with_control {
            update.control_delta = Some(values.iter().map(|v| v * 0.5).collect());
        }
        update
    }

    proptest! {
        /// Folding some updates at a relay and sending their partial gives the server the
        /// aggregate it would have formed from every update itself, for every linear weighting.
        #[test]
        fn a_partial_folds_like_its_updates(
            updates in prop::collection::vec(
                (prop::collection::vec(-10.0f32..10.0, 4), 1u64..500, 0.5f64..20.0),
                2..12,
            ),
            split in 0usize..12,
            weighting in prop::sample::select(vec![
                Weighting::Examples, Weighting::Uniform, Weighting::Normalized,
            ]),
        ) {
            let split = split.min(updates.len() - 1).max(1);
            let control = weighting == Weighting::Uniform;
            let all: Vec<Update> = updates
                .iter()
                .map(|(v, n, a)| node_update(v, *n, *a, control))
                .collect();
            let mut direct = Box::new(WeightedMean::new(4, weighting));
            for u in &all {
                direct.accept(u).expect("valid");
            }
            let mut relay = Box::new(WeightedMean::new(4, weighting));
            for u in &all[..split] {
                relay.accept(u).expect("valid");
            }
            let contributors = (0..split).map(|i| (format!("n{i:02}"), all[i].num_examples));
            let partial = partial_update(relay.into_sums(), weighting, contributors.collect(), (0.0, 0));
            let mut server = Box::new(WeightedMean::new(4, weighting));
            server.accept(&partial).expect("a partial of the same weighting");
            for u in &all[split..] {
                server.accept(u).expect("valid");
            }
            let (want, got) = (direct.finish().expect("some"), server.finish().expect("some"));
            prop_assert_eq!(want.participants, got.participants);
            prop_assert_eq!(want.num_examples, got.num_examples);
            for (a, b) in want.delta.iter().zip(&got.delta) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
            prop_assert_eq!(want.control_delta_sum.is_some(), got.control_delta_sum.is_some());
            for (a, b) in want.control_delta_sum.unwrap_or_default().iter().zip(&got.control_delta_sum.unwrap_or_default()) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_partial_is_refused_by_a_rule_of_another_weighting() {
        let mut relay = Box::new(WeightedMean::new(2, Weighting::Examples));
        relay
            .accept(&Update::new(vec![1.0, 2.0], 3))
            .expect("valid");
        let partial = partial_update(
            relay.into_sums(),
            Weighting::Examples,
            vec![("a".into(), 3)],
            (0.0, 0),
        );
        let mut server = Box::new(WeightedMean::new(2, Weighting::Uniform));
        assert!(matches!(
            server.accept(&partial),
            Err(CoreError::PartialNotFoldable(_))
        ));
        assert_eq!(server.accepted(), 0);
    }
}
