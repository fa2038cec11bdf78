//! q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020, "Fair Resource Allocation in Federated
//! Learning"): an aggregation that gives more weight to the nodes the global model serves
//! worst, so that accuracy is spread more evenly across sites.
//!
//! Each node reports `F_k`, the loss of the global model on its training data before it trains
//! ([`LOSS_BEFORE`]), and its delta `d_k = w_k - w`. With `L` the Lipschitz estimate (the
//! inverse of the step size) and `g_k = -L d_k`, the paper's step is
//! `w+ = w - sum_k F_k^q g_k / sum_k h_k` with
//! `h_k = q F_k^(q-1) ||g_k||^2 + L F_k^q`. In the delta convention the aggregate is
//! `sum_k L F_k^q d_k / sum_k h_k`. With `q = 0` it is the uniform mean of the deltas; larger
//! `q` leans towards the nodes with the highest loss.
//!
//! The rule is linear in the deltas, so it folds each update as it arrives; it needs each
//! node's own loss, so relays pass its updates through and secure aggregation refuses it.

use crate::{
    CoreError, Update,
    aggregate::{Aggregate, Aggregator, MemoryUse, Part, UpdateSource, fold_into, refuse_partial},
    algebra,
};

/// The metric a node reports for q-FedAvg: the loss of the received global model on the
/// node's training data, before local training.
pub const LOSS_BEFORE: &str = "loss_before";

/// Added to every loss before it is raised to a power, as the paper's code does, so that a
/// node with zero loss still has a finite, positive weight.
const LOSS_FLOOR: f64 = 1e-10;

/// q-FedAvg's two settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FairParams {
    /// Fairness exponent `q >= 0`; 0 is the uniform mean.
    pub q: f64,
    /// The Lipschitz estimate `L`, the inverse of q-FedAvg's step size.
    pub lipschitz: f64,
}

impl FairParams {
    /// Checks that `q` is a number >= 0 and `L` a positive number.
    pub fn checked(q: f64, lipschitz: f64) -> Result<Self, CoreError> {
        if !(q.is_finite() && q >= 0.0) {
            return Err(CoreError::Settings(format!(
                "q-FedAvg's q must be a number >= 0, got {q}"
            )));
        }
        if !(lipschitz.is_finite() && lipschitz > 0.0) {
            return Err(CoreError::Settings(format!(
                "q-FedAvg's step size (--q-lr) must be a positive number, got {}",
                1.0 / lipschitz
            )));
        }
        Ok(Self { q, lipschitz })
    }

    /// A node's weight `L F^q` and its share of the denominator without the norm term.
    fn weight(&self, loss: f64) -> f64 {
        self.lipschitz * (loss + LOSS_FLOOR).powf(self.q)
    }

    /// `h_k` for a node with loss `loss` whose delta has squared norm `delta_norm2`.
    fn h(&self, loss: f64, delta_norm2: f64) -> f64 {
        let f = loss + LOSS_FLOOR;
        let gradient_norm2 = self.lipschitz * self.lipschitz * delta_norm2;
        let curvature = if self.q == 0.0 {
            0.0
        } else {
            self.q * f.powf(self.q - 1.0) * gradient_norm2
        };
        curvature + self.weight(loss)
    }
}

/// Reads a node's [`LOSS_BEFORE`] from its metrics, refusing a missing or negative one.
pub fn loss_before(metrics: &std::collections::BTreeMap<String, f64>) -> Result<f64, CoreError> {
    match metrics.get(LOSS_BEFORE) {
        Some(&loss) if loss.is_finite() && loss >= 0.0 => Ok(loss),
        _ => Err(CoreError::MissingExtra(
            "metrics.loss_before (the loss of the received model on the node's training data, \
             a finite number >= 0)",
        )),
    }
}

/// q-FedAvg's running sums: `sum_k L F_k^q d_k` and `sum_k h_k`.
#[derive(Debug)]
pub struct FairMean {
    params: FairParams,
    sum: Vec<f32>,
    h_sum: f64,
    examples: u64,
    accepted: usize,
}

impl FairMean {
    /// An empty accumulator for a model of `dim` parameters.
    pub fn new(dim: usize, params: FairParams) -> Self {
        Self {
            params,
            sum: vec![0.0; dim],
            h_sum: 0.0,
            examples: 0,
            accepted: 0,
        }
    }

    fn count(&mut self, loss: f64, delta_norm2: f64, examples: u64) {
        self.h_sum += self.params.h(loss, delta_norm2);
        self.examples += examples;
        self.accepted += 1;
    }
}

impl Aggregator for FairMean {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        refuse_partial(update.partial.as_ref())?;
        crate::aggregate::validate_update(update, self.sum.len())?;
        let loss = loss_before(&update.metrics)?;
        algebra::weighted_accumulate(&mut self.sum, &update.delta, self.params.weight(loss));
        let norm = algebra::l2_norm(&update.delta);
        self.count(loss, norm * norm, update.num_examples);
        Ok(())
    }

    fn accept_source(&mut self, source: &mut dyn UpdateSource) -> Result<(), CoreError> {
        refuse_partial(source.meta().partial.as_ref())?;
        source.check()?;
        let meta = source.meta().clone();
        let loss = loss_before(&meta.metrics)?;
        let weight = self.params.weight(loss);
        let mut norm2 = 0.0f64;
        {
            let mut fold = fold_into(&mut self.sum, weight);
            source.visit(Part::Delta, &mut |at, values| {
                norm2 += algebra::l2_norm(values).powi(2);
                fold(at, values)
            })?;
        }
        self.count(loss, norm2, meta.num_examples);
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse::Streaming
    }

    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError> {
        Aggregate::divided(self.sum, self.h_sum, self.accepted, self.examples)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::aggregate::{WeightedMean, Weighting};

    fn update(delta: Vec<f32>, examples: u64, loss: f64) -> Update {
        let mut update = Update::new(delta, examples);
        update.metrics.insert(LOSS_BEFORE.into(), loss);
        update
    }

    fn fair(q: f64, lipschitz: f64) -> Box<FairMean> {
        Box::new(FairMean::new(
            2,
            FairParams::checked(q, lipschitz).expect("valid"),
        ))
    }

    #[test]
    fn the_paper_step_for_two_nodes() {
        // q = 1, L = 10: weights L F = 10 and 30; h = ||L d||^2 + L F = 25 + 10 and 100 + 30.
        let mut agg = fair(1.0, 10.0);
        agg.accept(&update(vec![0.3, 0.4], 5, 1.0)).expect("valid");
        agg.accept(&update(vec![0.0, -1.0], 7, 3.0)).expect("valid");
        let out = agg.finish().expect("two");
        let h = 35.0 + 130.0;
        let expected = [10.0 * 0.3 / h, (10.0 * 0.4 - 30.0) / h];
        for (got, want) in out.delta.iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(out.num_examples, 12);
        assert_eq!(out.participants, 2);
    }

    #[test]
    fn the_node_with_the_higher_loss_pulls_harder_as_q_grows() {
        let pull = |q: f64| {
            let mut agg = fair(q, 100.0);
            agg.accept(&update(vec![1.0, 0.0], 1, 0.5)).expect("valid");
            agg.accept(&update(vec![0.0, 1.0], 1, 2.0)).expect("valid");
            let delta = agg.finish().expect("two").delta;
            delta[1] / delta[0]
        };
        assert!((pull(0.0) - 1.0).abs() < 1e-6);
        assert!(pull(1.0) > 3.9 && pull(2.0) > 15.9);
    }

    #[test]
    fn an_update_without_its_loss_is_refused_and_changes_nothing() {
        let mut agg = fair(1.0, 10.0);
        assert!(matches!(
            agg.accept(&Update::new(vec![1.0, 1.0], 3)),
            Err(CoreError::MissingExtra(_))
        ));
        assert!(agg.accept(&update(vec![1.0, 1.0], 3, -1.0)).is_err());
        assert_eq!(agg.accepted(), 0);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(FairParams::checked(-0.5, 10.0).is_err());
        assert!(FairParams::checked(1.0, 0.0).is_err());
        assert!(FairParams::checked(f64::NAN, 10.0).is_err());
    }

    #[test]
    fn an_update_folded_from_its_file_counts_as_the_update_itself() {
        let layout =
            crate::ModelLayout::new(vec![crate::TensorSpec::f32("w", vec![2])]).expect("layout");
        let mut whole = fair(2.0, 20.0);
        let mut streamed = fair(2.0, 20.0);
        for u in [
            update(vec![0.5, -0.25], 4, 0.7),
            update(vec![1.5, 2.0], 9, 1.9),
        ] {
            whole.accept(&u).expect("valid");
            let bytes = crate::wire::encode_update(&u, &layout).expect("encode");
            let mut file =
                crate::update_file::UpdateFile::open(std::io::Cursor::new(bytes), &layout)
                    .expect("open");
            streamed.accept_source(&mut file).expect("valid");
        }
        assert_eq!(
            streamed.finish().expect("two"),
            whole.finish().expect("two")
        );
    }

    proptest! {
        /// With q = 0 every node counts once and h_k = L, so q-FedAvg is the uniform mean of
        /// the deltas whatever the losses and the step size.
        #[test]
        fn q_zero_is_the_uniform_mean(
            nodes in prop::collection::vec(
                (prop::collection::vec(-5.0f32..5.0, 2), 1u64..50, 0.0f64..4.0), 1..8),
            lipschitz in 0.1f64..100.0,
        ) {
            let mut fair = fair(0.0, lipschitz);
            let mut mean = Box::new(WeightedMean::new(2, Weighting::Uniform));
            for (delta, examples, loss) in &nodes {
                fair.accept(&update(delta.clone(), *examples, *loss)).expect("valid");
                mean.accept(&Update::new(delta.clone(), *examples)).expect("valid");
            }
            let fair = fair.finish().expect("some");
            let mean = mean.finish().expect("some");
            for (a, b) in fair.delta.iter().zip(&mean.delta) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }

        /// The step never exceeds the loss-weighted mean of the deltas: the norm term in h
        /// only shrinks it.
        #[test]
        fn the_step_is_a_shrunk_loss_weighted_mean(
            nodes in prop::collection::vec(
                (prop::collection::vec(-5.0f32..5.0, 2), 0.01f64..4.0), 1..8),
            q in 0.0f64..5.0,
        ) {
            let mut agg = fair(q, 10.0);
            let mut weighted = [0.0f64; 2];
            let mut weights = 0.0;
            for (delta, loss) in &nodes {
                agg.accept(&update(delta.clone(), 1, *loss)).expect("valid");
                let w = (loss + LOSS_FLOOR).powf(q);
                weights += w;
                for (acc, d) in weighted.iter_mut().zip(delta) {
                    *acc += w * f64::from(*d);
                }
            }
            let step = agg.finish().expect("some").delta;
            for (s, m) in step.iter().zip(weighted) {
                let mean = m / weights;
                prop_assert!(f64::from(*s).abs() <= mean.abs() * (1.0 + 1e-4) + 1e-6);
                prop_assert!(f64::from(*s) * mean >= -1e-9, "same sign: {s} vs {mean}");
            }
        }
    }
}
