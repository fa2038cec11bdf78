//! Aggregation of node updates into one delta.
//!
//! An [`Aggregator`] accepts updates one at a time as they arrive and is finished once into
//! an [`Aggregate`]. Linear rules (FedAvg, DP sums, secure-aggregation sums) fold each update
//! into one accumulator, so the server holds O(model) memory whatever the number of nodes.
//! Rules that need every update at once (median, Krum) implement the same trait, buffering
//! what they need, and say so through [`Aggregator::memory`].

use crate::{
    CoreError, Update, algebra, partial::PartialMeta, tensor_file::Visit, update::UpdateMeta,
};

/// The result of one round's aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The aggregated delta that the server optimizer applies.
    pub delta: Vec<f32>,
    /// Updates that went into it.
    pub participants: usize,
    /// Sum of the participants' `num_examples`.
    pub num_examples: u64,
    /// SCAFFOLD: the sum of the participants' control-variate changes.
    pub control_delta_sum: Option<Vec<f32>>,
    /// Adaptive DP clipping: the noisy fraction of updates that were within the clip norm.
    pub unclipped_fraction: Option<f64>,
    /// Positions (in acceptance order) of the accepted updates a robust rule left out.
    pub excluded: Vec<usize>,
}

/// How an aggregator's memory grows with the number of updates it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryUse {
    /// One accumulator, whatever the number of updates.
    Streaming,
    /// Holds every accepted update (robust rules); bounded by the round's participants.
    BuffersUpdates,
}

/// The sum of several nodes' updates, formed without the server seeing any one of them
/// (secure aggregation): each node's delta was multiplied by its weight factor before summing.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateSum {
    /// `sum_i w_i * delta_i`.
    pub weighted_delta: Vec<f32>,
    /// `sum_i w_i`.
    pub weight: f64,
    /// Updates in the sum.
    pub participants: usize,
    /// Examples behind them, as far as the weights tell.
    pub num_examples: u64,
}

/// Which of an update's vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The model delta.
    Delta,
    /// SCAFFOLD's control-variate change.
    Control,
}

/// An update whose values are read a piece at a time (an upload in its file), so that a linear
/// rule folds it without holding it whole.
pub trait UpdateSource {
    /// The update's scalars.
    fn meta(&self) -> &UpdateMeta;

    /// Checks that the update has examples and only finite values (once; later calls are
    /// free).
    fn check(&mut self) -> Result<(), CoreError>;

    /// Calls `visit(first_index, values)` for each piece of `part`, in order (nothing for a
    /// control part the update lacks).
    fn visit(&mut self, part: Part, visit: &mut Visit<'_>) -> Result<(), CoreError>;

    /// The whole update, for rules that need it at once.
    fn read_whole(&mut self) -> Result<Update, CoreError>;
}

/// A rule that folds node updates, one at a time, into an aggregate.
pub trait Aggregator: Send {
    /// Validates `update` and folds it in. A refused update leaves the state unchanged.
    fn accept(&mut self, update: &Update) -> Result<(), CoreError>;

    /// [`Aggregator::accept`] for an update read from `source`; rules that fold each update
    /// into one accumulator read it a piece at a time, the others read it whole.
    fn accept_source(&mut self, source: &mut dyn UpdateSource) -> Result<(), CoreError> {
        refuse_partial(source.meta().partial.as_ref())?;
        let update = source.read_whole()?;
        self.accept(&update)
    }

    /// Folds in a sum of updates whose weights were applied by the nodes. Only linear rules
    /// can; the rest refuse, since they need each update on its own.
    fn accept_sum(&mut self, _sum: &UpdateSum) -> Result<(), CoreError> {
        Err(CoreError::NeedsIndividualUpdates)
    }

    /// Number of updates accepted so far.
    fn accepted(&self) -> usize;

    /// How memory grows with accepted updates.
    fn memory(&self) -> MemoryUse;

    /// Produces the aggregate; fails when nothing was accepted.
    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError>;
}

/// Refuses a relay's partial aggregate, for a rule that needs each update on its own (one
/// that reads each update whole, or weighs it by its own node's figures).
pub fn refuse_partial(partial: Option<&PartialMeta>) -> Result<(), CoreError> {
    match partial {
        Some(_) => Err(CoreError::PartialNotFoldable(
            "this rule needs each node's update on its own; relays pass such updates through"
                .into(),
        )),
        None => Ok(()),
    }
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

/// Checks that a sum of updates fits a model of `dim` parameters, holds finite values and
/// has positive weight.
pub fn validate_sum(sum: &UpdateSum, dim: usize) -> Result<(), CoreError> {
    if sum.weighted_delta.len() != dim {
        return Err(CoreError::LengthMismatch {
            expected: dim,
            got: sum.weighted_delta.len(),
        });
    }
    if !(sum.weight.is_finite() && sum.weight > 0.0) || sum.participants == 0 {
        return Err(CoreError::ZeroExamples);
    }
    if let Some(index) = algebra::first_non_finite(&sum.weighted_delta) {
        return Err(CoreError::NonFinite { index });
    }
    Ok(())
}

/// How a linear aggregator weights each update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weighting {
    /// FedAvg (McMahan et al., 2017): weight `n_i`, the node's example count.
    Examples,
    /// SCAFFOLD's server step: every participant counts once.
    Uniform,
    /// FedNova (Wang et al., 2020): average the normalised deltas `delta_i / a_i` with weights
    /// `p_i = n_i / sum n`, then scale by `sum p_i a_i`.
    Normalized,
}

/// A weighted mean of the deltas, accumulated one update at a time in a vector the size of the
/// model; also sums SCAFFOLD's control-variate changes when updates carry them.
#[derive(Debug)]
pub struct WeightedMean {
    weighting: Weighting,
    sum: Vec<f32>,
    control_sum: Option<Vec<f32>>,
    weight_sum: f64,
    examples: u64,
    normalizer_sum: f64,
    unclipped: f64,
    accepted: usize,
}

/// A linear rule's running sums, which a relay sends upstream as its partial aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialSums {
    /// `sum_i w_i * delta_i`.
    pub delta: Vec<f32>,
    /// The sum of the SCAFFOLD control changes, when updates carried them.
    pub control: Option<Vec<f32>>,
    /// `sum_i w_i`.
    pub weight: f64,
    /// `sum_i n_i`.
    pub examples: u64,
    /// `sum_i n_i * a_i`.
    pub normalized_examples: f64,
    /// Sum of the distributed-DP clip indicators.
    pub unclipped: f64,
    /// Updates folded.
    pub accepted: usize,
}

impl WeightedMean {
    /// An empty accumulator for a model of `dim` parameters.
    pub fn new(dim: usize, weighting: Weighting) -> Self {
        Self {
            weighting,
            sum: vec![0.0; dim],
            control_sum: None,
            weight_sum: 0.0,
            examples: 0,
            normalizer_sum: 0.0,
            unclipped: 0.0,
            accepted: 0,
        }
    }

    /// How this mean weights updates.
    pub fn weighting(&self) -> Weighting {
        self.weighting
    }

    /// The running sums, for a relay to send on in place of the updates.
    pub fn into_sums(self) -> PartialSums {
        PartialSums {
            delta: self.sum,
            control: self.control_sum,
            weight: self.weight_sum,
            examples: self.examples,
            normalized_examples: self.normalizer_sum,
            unclipped: self.unclipped,
            accepted: self.accepted,
        }
    }

    fn check_partial(&self, partial: &PartialMeta) -> Result<(), CoreError> {
        if partial.weighting == self.weighting {
            return Ok(());
        }
        Err(CoreError::PartialNotFoldable(format!(
            "it was weighted {:?}, this round weights {:?}",
            partial.weighting, self.weighting
        )))
    }

    fn count_partial(&mut self, partial: &PartialMeta) {
        self.weight_sum += partial.weight;
        self.examples += partial.examples();
        self.normalizer_sum += partial.normalized_examples;
        self.unclipped += partial.unclipped;
        self.accepted += partial.contributors.len();
    }

    fn weight_of(&self, num_examples: u64, normalizer: Option<f64>) -> Result<f64, CoreError> {
        let n = num_examples as f64;
        Ok(match self.weighting {
            Weighting::Examples => n,
            Weighting::Uniform => 1.0,
            Weighting::Normalized => match normalizer {
                Some(a) if a > 0.0 && a.is_finite() => n / a,
                _ => return Err(CoreError::MissingExtra("a positive FedNova normaliser a_i")),
            },
        })
    }
}

impl Aggregator for WeightedMean {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        validate_update(update, self.sum.len())?;
        let weight = match &update.partial {
            Some(partial) => {
                self.check_partial(partial)?;
                1.0
            }
            None => self.weight_of(update.num_examples, update.normalizer)?,
        };
        if let Some(control) = &update.control_delta {
            if control.len() != self.sum.len() {
                return Err(CoreError::LengthMismatch {
                    expected: self.sum.len(),
                    got: control.len(),
                });
            }
            if let Some(index) = algebra::first_non_finite(control) {
                return Err(CoreError::NonFinite { index });
            }
            let sum = self
                .control_sum
                .get_or_insert_with(|| vec![0.0; control.len()]);
            algebra::weighted_accumulate(sum, control, 1.0);
        }
        algebra::weighted_accumulate(&mut self.sum, &update.delta, weight);
        match &update.partial {
            Some(partial) => self.count_partial(partial),
            None => self.count(update, weight),
        }
        Ok(())
    }

    fn accept_source(&mut self, source: &mut dyn UpdateSource) -> Result<(), CoreError> {
        source.check()?;
        let meta = source.meta().clone();
        let weight = match &meta.partial {
            Some(partial) => {
                self.check_partial(partial)?;
                1.0
            }
            None => self.weight_of(meta.num_examples, meta.normalizer)?,
        };
        if meta.has_control {
            let dim = self.sum.len();
            let control = self.control_sum.get_or_insert_with(|| vec![0.0; dim]);
            source.visit(Part::Control, &mut fold_into(control, 1.0))?;
        }
        source.visit(Part::Delta, &mut fold_into(&mut self.sum, weight))?;
        match &meta.partial {
            Some(partial) => self.count_partial(partial),
            None => self.count(&meta, weight),
        }
        Ok(())
    }

    fn accept_sum(&mut self, sum: &UpdateSum) -> Result<(), CoreError> {
        if self.weighting == Weighting::Normalized {
            return Err(CoreError::NeedsIndividualUpdates);
        }
        validate_sum(sum, self.sum.len())?;
        algebra::weighted_accumulate(&mut self.sum, &sum.weighted_delta, 1.0);
        self.weight_sum += sum.weight;
        self.examples += sum.num_examples;
        self.normalizer_sum += sum.num_examples as f64;
        self.accepted += sum.participants;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse::Streaming
    }

    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError> {
        let divisor = match self.weighting {
            Weighting::Examples | Weighting::Uniform => self.weight_sum,
            // sum_i p_i d_i * sum_i p_i a_i, with p_i = n_i / N and d_i = delta_i / a_i.
            Weighting::Normalized => {
                self.examples as f64 * self.examples as f64 / self.normalizer_sum
            }
        };
        let mut aggregate = Aggregate::divided(self.sum, divisor, self.accepted, self.examples)?;
        aggregate.control_delta_sum = self.control_sum;
        Ok(aggregate)
    }
}

impl Aggregate {
    /// A linear rule's aggregate: its running `sum` divided by `divisor`, over `participants`
    /// updates of `num_examples` examples; refuses an empty round.
    pub(crate) fn divided(
        mut sum: Vec<f32>,
        divisor: f64,
        participants: usize,
        num_examples: u64,
    ) -> Result<Self, CoreError> {
        if participants == 0 {
            return Err(CoreError::NoUpdates);
        }
        algebra::divide(&mut sum, divisor);
        Ok(Self {
            delta: sum,
            participants,
            num_examples,
            control_delta_sum: None,
            unclipped_fraction: None,
            excluded: Vec::new(),
        })
    }
}

/// Adds each visited piece, times `weight`, to its place in `sum`.
pub(crate) fn fold_into(
    sum: &mut [f32],
    weight: f64,
) -> impl FnMut(usize, &[f32]) -> Result<(), CoreError> + '_ {
    let dim = sum.len();
    move |at, values| {
        let end = at + values.len();
        let target = sum.get_mut(at..end).ok_or(CoreError::LengthMismatch {
            expected: dim,
            got: end,
        })?;
        algebra::weighted_accumulate(target, values, weight);
        Ok(())
    }
}

impl WeightedMean {
    fn count(&mut self, update: &impl Counted, weight: f64) {
        let (num_examples, normalizer, unclipped) = update.scalars();
        self.weight_sum += weight;
        self.examples += num_examples;
        self.normalizer_sum += num_examples as f64 * normalizer.unwrap_or(1.0);
        self.unclipped += unclipped.unwrap_or(0.0);
        self.accepted += 1;
    }
}

/// The scalars a linear rule counts, of a whole update or of one read from a file.
trait Counted {
    /// Examples, FedNova's normaliser, the distributed-DP clip indicator.
    fn scalars(&self) -> (u64, Option<f64>, Option<f64>);
}

impl Counted for Update {
    fn scalars(&self) -> (u64, Option<f64>, Option<f64>) {
        (self.num_examples, self.normalizer, self.unclipped)
    }
}

impl Counted for UpdateMeta {
    fn scalars(&self) -> (u64, Option<f64>, Option<f64>) {
        (self.num_examples, self.normalizer, self.unclipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn update(delta: Vec<f32>, num_examples: u64) -> Update {
        Update::new(delta, num_examples)
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let mut agg = Box::new(WeightedMean::new(2, Weighting::Examples));
        agg.accept(&update(vec![1.0, 0.0], 1)).expect("valid");
        agg.accept(&update(vec![4.0, 2.0], 3)).expect("valid");
        let out = agg.finish().expect("non-empty");
        assert_eq!(out.delta, [3.25, 1.5]);
        assert_eq!(out.participants, 2);
        assert_eq!(out.num_examples, 4);
    }

    #[test]
    fn refuses_bad_updates_without_changing_state() {
        let mut agg = Box::new(WeightedMean::new(2, Weighting::Examples));
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
    fn an_update_folded_from_its_file_counts_as_the_update_itself() {
        let layout = crate::ModelLayout::new(vec![
            crate::TensorSpec::f32("a", vec![3]),
            crate::TensorSpec::f32("b", vec![2]),
        ])
        .expect("layout");
        let mut first = update(vec![1.0, -2.0, 3.0, 0.5, 4.0], 3);
        first.control_delta = Some(vec![0.1, 0.2, 0.3, 0.4, 0.5]);
        let mut second = update(vec![2.0, 2.0, -1.0, 1.5, 0.0], 5);
        second.control_delta = Some(vec![1.0; 5]);
        let mut whole = Box::new(WeightedMean::new(5, Weighting::Examples));
        let mut streamed = Box::new(WeightedMean::new(5, Weighting::Examples));
        for u in [&first, &second] {
            whole.accept(u).expect("valid");
            let bytes = crate::wire::encode_update(u, &layout).expect("encode");
            let mut file =
                crate::update_file::UpdateFile::open(std::io::Cursor::new(bytes), &layout)
                    .expect("open");
            streamed.accept_source(&mut file).expect("valid");
        }
        let mut bad = update(vec![1.0, f32::INFINITY, 0.0, 0.0, 0.0], 1);
        bad.control_delta = Some(vec![0.0; 5]);
        let bytes = crate::wire::encode_update(&bad, &layout).expect("encode");
        let mut file = crate::update_file::UpdateFile::open(std::io::Cursor::new(bytes), &layout)
            .expect("open");
        assert!(matches!(
            streamed.accept_source(&mut file),
            Err(CoreError::NonFinite { index: 1 })
        ));
        assert_eq!(streamed.accepted(), 2, "a refused file changes nothing");
        assert_eq!(
            streamed.finish().expect("two"),
            whole.finish().expect("two")
        );
    }

    #[test]
    fn finishing_empty_is_an_error() {
        assert!(matches!(
            Box::new(WeightedMean::new(3, Weighting::Examples)).finish(),
            Err(CoreError::NoUpdates)
        ));
    }

    #[test]
    fn uniform_weighting_ignores_example_counts_and_sums_controls() {
        let mut agg = Box::new(WeightedMean::new(2, Weighting::Uniform));
        let mut a = update(vec![1.0, 0.0], 1);
        a.control_delta = Some(vec![0.5, 0.5]);
        let mut b = update(vec![3.0, 2.0], 99);
        b.control_delta = Some(vec![1.0, -1.0]);
        agg.accept(&a).expect("valid");
        agg.accept(&b).expect("valid");
        let out = agg.finish().expect("non-empty");
        assert_eq!(out.delta, [2.0, 1.0]);
        assert_eq!(out.control_delta_sum, Some(vec![1.5, -0.5]));
    }

    #[test]
    fn fednova_normalises_by_local_steps() {
        // Node 1: 10 examples, a = 2, delta [2]; node 2: 30 examples, a = 6, delta [12].
        // p = [0.25, 0.75]; sum p d = 0.25 * 1 + 0.75 * 2 = 1.75; sum p a = 0.5 + 4.5 = 5.
        let mut agg = Box::new(WeightedMean::new(1, Weighting::Normalized));
        let mut a = update(vec![2.0], 10);
        a.normalizer = Some(2.0);
        let mut b = update(vec![12.0], 30);
        b.normalizer = Some(6.0);
        agg.accept(&a).expect("valid");
        agg.accept(&b).expect("valid");
        let out = agg.finish().expect("non-empty");
        assert!((out.delta[0] - 8.75).abs() < 1e-6, "{:?}", out.delta);
        let mut missing = Box::new(WeightedMean::new(1, Weighting::Normalized));
        assert!(matches!(
            missing.accept(&update(vec![1.0], 1)),
            Err(CoreError::MissingExtra(_))
        ));
    }

    #[test]
    fn fednova_and_robust_rules_refuse_a_sum() {
        let sum = UpdateSum {
            weighted_delta: vec![1.0],
            weight: 1.0,
            participants: 1,
            num_examples: 1,
        };
        let mut nova = Box::new(WeightedMean::new(1, Weighting::Normalized));
        assert!(matches!(
            nova.accept_sum(&sum),
            Err(CoreError::NeedsIndividualUpdates)
        ));
        let mut mean = Box::new(WeightedMean::new(1, Weighting::Examples));
        let empty = UpdateSum { weight: 0.0, ..sum };
        assert!(mean.accept_sum(&empty).is_err());
        assert_eq!(mean.accepted(), 0);
    }

    proptest! {
        #[test]
        fn a_sum_weighted_by_scaled_counts_gives_the_fedavg_mean(
            rows in prop::collection::vec((prop::collection::vec(-5f32..5.0, 3), 1u64..500), 1..8),
            cap in 500u64..5000,
        ) {
            let mut each = Box::new(WeightedMean::new(3, Weighting::Examples));
            let mut weighted = vec![0.0f32; 3];
            let mut weight = 0.0;
            for (d, n) in &rows {
                each.accept(&update(d.clone(), *n)).expect("valid");
                let w = *n as f64 / cap as f64;
                for (s, x) in weighted.iter_mut().zip(d) {
                    *s += (w * f64::from(*x)) as f32;
                }
                weight += w;
            }
            let mut summed = Box::new(WeightedMean::new(3, Weighting::Examples));
            summed.accept_sum(&UpdateSum {
                weighted_delta: weighted,
                weight,
                participants: rows.len(),
                num_examples: rows.iter().map(|r| r.1).sum(),
            }).expect("valid");
            let (a, b) = (each.finish().expect("a"), summed.finish().expect("b"));
            prop_assert_eq!(a.participants, b.participants);
            for (x, y) in a.delta.iter().zip(&b.delta) {
                prop_assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0));
            }
        }

        #[test]
        fn fednova_with_equal_steps_equals_fedavg(
            rows in prop::collection::vec((prop::collection::vec(-5f32..5.0, 3), 1u64..500), 1..8),
            steps in 1.0f64..50.0,
        ) {
            let mut avg = Box::new(WeightedMean::new(3, Weighting::Examples));
            let mut nova = Box::new(WeightedMean::new(3, Weighting::Normalized));
            for (d, n) in &rows {
                let mut u = update(d.clone(), *n);
                avg.accept(&u).expect("valid");
                u.normalizer = Some(steps);
                nova.accept(&u).expect("valid");
            }
            let (a, b) = (avg.finish().expect("a").delta, nova.finish().expect("b").delta);
            for (x, y) in a.iter().zip(&b) {
                prop_assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0));
            }
        }

        #[test]
        fn mean_of_identical_updates_is_that_update(
            delta in prop::collection::vec(-1e3f32..1e3, 1..100),
            weights in prop::collection::vec(1u64..10_000, 1..12),
        ) {
            let mut agg = Box::new(WeightedMean::new(delta.len(), Weighting::Examples));
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
            let mut agg = Box::new(WeightedMean::new(4, Weighting::Examples));
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
