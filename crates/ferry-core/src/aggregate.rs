//! Aggregation of node updates into one delta.
//!
//! An [`Aggregator`] accepts updates one at a time as they arrive and is finished once into
//! an [`Aggregate`]. Linear rules (FedAvg, DP sums, secure-aggregation sums) fold each update
//! into one accumulator, so the server holds O(model) memory whatever the number of nodes.
//! Rules that need every update at once (median, Krum) implement the same trait, buffering
//! what they need, and say so through [`Aggregator::memory`].

use crate::{CoreError, Update, algebra};

/// The result of one round's aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The aggregated delta that the server optimizer applies.
    pub delta: Vec<f32>,
    /// Updates that went into it.
    pub participants: usize,
    /// Sum of the participants' `num_examples`.
    pub num_examples: u64,
}

/// How an aggregator's memory grows with the number of updates it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryUse {
    /// One accumulator, whatever the number of updates.
    Streaming,
    /// Holds every accepted update (robust rules); bounded by the round's participants.
    BuffersUpdates,
}

/// A rule that folds node updates, one at a time, into an aggregate.
pub trait Aggregator: Send {
    /// Validates `update` and folds it in. A refused update leaves the state unchanged.
    fn accept(&mut self, update: &Update) -> Result<(), CoreError>;

    /// Number of updates accepted so far.
    fn accepted(&self) -> usize;

    /// How memory grows with accepted updates.
    fn memory(&self) -> MemoryUse;

    /// Produces the aggregate; fails when nothing was accepted.
    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError>;
}

/// Checks that an update fits a model of `dim` parameters and holds finite values.
pub fn validate_update(update: &Update, dim: usize) -> Result<(), CoreError> {
    if update.delta.len() != dim {
        return Err(CoreError::LengthMismatch {
            expected: dim,
            got: update.delta.len(),
        });
    }
    if update.num_examples == 0 {
        return Err(CoreError::ZeroExamples);
    }
    if let Some(index) = algebra::first_non_finite(&update.delta) {
        return Err(CoreError::NonFinite { index });
    }
    Ok(())
}

/// FedAvg (McMahan et al., 2017): the mean of the deltas weighted by `num_examples`,
/// accumulated in `f64`.
#[derive(Debug)]
pub struct WeightedMean {
    sum: Vec<f64>,
    total_weight: u64,
    accepted: usize,
}

impl WeightedMean {
    /// An empty accumulator for a model of `dim` parameters.
    pub fn new(dim: usize) -> Self {
        Self {
            sum: vec![0.0; dim],
            total_weight: 0,
            accepted: 0,
        }
    }
}

impl Aggregator for WeightedMean {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        validate_update(update, self.sum.len())?;
        algebra::weighted_accumulate(&mut self.sum, &update.delta, update.num_examples as f64);
        self.total_weight += update.num_examples;
        self.accepted += 1;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse::Streaming
    }

    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError> {
        if self.accepted == 0 {
            return Err(CoreError::NoUpdates);
        }
        let mut delta = vec![0.0f32; self.sum.len()];
        algebra::mean_into(&mut delta, &self.sum, self.total_weight as f64);
        Ok(Aggregate {
            delta,
            participants: self.accepted,
            num_examples: self.total_weight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn update(delta: Vec<f32>, num_examples: u64) -> Update {
        Update {
            delta,
            num_examples,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let mut agg = Box::new(WeightedMean::new(2));
        agg.accept(&update(vec![1.0, 0.0], 1)).expect("valid");
        agg.accept(&update(vec![4.0, 2.0], 3)).expect("valid");
        let out = agg.finish().expect("non-empty");
        assert_eq!(out.delta, [3.25, 1.5]);
        assert_eq!(out.participants, 2);
        assert_eq!(out.num_examples, 4);
    }

    #[test]
    fn refuses_bad_updates_without_changing_state() {
        let mut agg = Box::new(WeightedMean::new(2));
        assert!(matches!(
            agg.accept(&update(vec![1.0], 1)),
            Err(CoreError::LengthMismatch {
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            agg.accept(&update(vec![1.0, f32::NAN], 1)),
            Err(CoreError::NonFinite { index: 1 })
        ));
        assert!(matches!(
            agg.accept(&update(vec![1.0, 1.0], 0)),
            Err(CoreError::ZeroExamples)
        ));
        assert_eq!(agg.accepted(), 0);
        agg.accept(&update(vec![2.0, 2.0], 5)).expect("valid");
        assert_eq!(agg.finish().expect("one").delta, [2.0, 2.0]);
    }

    #[test]
    fn finishing_empty_is_an_error() {
        assert!(matches!(
            Box::new(WeightedMean::new(3)).finish(),
            Err(CoreError::NoUpdates)
        ));
    }

    proptest! {
        #[test]
        fn mean_of_identical_updates_is_that_update(
            delta in prop::collection::vec(-1e3f32..1e3, 1..100),
            weights in prop::collection::vec(1u64..10_000, 1..12),
        ) {
            let mut agg = Box::new(WeightedMean::new(delta.len()));
            for w in &weights {
                agg.accept(&update(delta.clone(), *w)).expect("valid");
            }
            let out = agg.finish().expect("non-empty");
            for (a, b) in out.delta.iter().zip(&delta) {
                prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0));
            }
        }

        #[test]
        fn mean_lies_within_coordinate_range(
            rows in prop::collection::vec((prop::collection::vec(-50f32..50.0, 4), 1u64..100), 1..10),
        ) {
            let mut agg = Box::new(WeightedMean::new(4));
            for (d, w) in &rows {
                agg.accept(&update(d.clone(), *w)).expect("valid");
            }
            let out = agg.finish().expect("non-empty");
            for j in 0..4 {
                let lo = rows.iter().map(|r| r.0[j]).fold(f32::INFINITY, f32::min);
                let hi = rows.iter().map(|r| r.0[j]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(out.delta[j] >= lo - 1e-4 && out.delta[j] <= hi + 1e-4);
            }
        }
    }
}
