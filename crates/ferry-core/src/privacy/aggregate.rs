//! The DP-FedAvg server sum: every update counts once (its influence bounded by the clip norm,
//! not weighted by its example count), Gaussian noise goes on the sum, and the sum is divided by
//! the expected cohort size rather than the number that arrived, so the average's sensitivity
//! does not depend on who took part.

use crate::{
    CoreError, ModelLayout, Update,
    aggregate::{
        Aggregate, Aggregator, MemoryUse, UpdateSource, UpdateSum, Weighting, validate_sum,
        validate_update,
    },
    algebra,
    partial::PartialMeta,
    privacy::{Placement, clip::ClipScope, noise::NoiseSource, round::RoundPrivacy},
};

/// A streaming noisy sum for one round.
#[derive(Debug)]
pub struct DpSum {
    round: RoundPrivacy,
    scope: ClipScope,
    sum: Vec<f32>,
    unclipped: f64,
    accepted: usize,
    examples: u64,
}

impl DpSum {
    /// The server's aggregator for `round` of a model laid out as `layout`.
    pub fn for_round(round: RoundPrivacy, layout: &ModelLayout) -> Self {
        let scope = ClipScope::for_layout(layout, round.per_layer);
        Self::new(round, scope)
    }

    /// An empty sum for `round`, clipping over `scope`.
    pub fn new(round: RoundPrivacy, scope: ClipScope) -> Self {
        let dim = scope.dim();
        Self {
            round,
            scope,
            sum: vec![0.0; dim],
            unclipped: 0.0,
            accepted: 0,
            examples: 0,
        }
    }
}

impl DpSum {
    /// Folds a relay's partial aggregate of distributed-DP updates: their plain sum and the
    /// sum of their clip indicators.
    fn accept_partial(&mut self, update: &Update, partial: &PartialMeta) -> Result<(), CoreError> {
        if self.round.placement == Placement::Central {
            return Err(CoreError::PartialNotFoldable(
                "central differential privacy clips each update at the server".into(),
            ));
        }
        if partial.weighting != Weighting::Uniform || update.control_delta.is_some() {
            return Err(CoreError::PartialNotFoldable(
                "a private round sums plain, unweighted updates".into(),
            ));
        }
        algebra::weighted_accumulate(&mut self.sum, &update.delta, 1.0);
        self.unclipped += partial.unclipped;
        self.accepted += partial.contributors.len();
        self.examples += partial.examples();
        Ok(())
    }
}

impl Aggregator for DpSum {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        validate_update(update, self.sum.len())?;
        if let Some(partial) = &update.partial {
            return self.accept_partial(update, partial);
        }
        if update.control_delta.is_some() {
            return Err(CoreError::Privacy(
                "an update with control variates cannot be privatised; SCAFFOLD does not run \
                 with differential privacy"
                    .into(),
            ));
        }
        let unclipped = match self.round.placement {
            Placement::Central => {
                let within =
                    self.scope
                        .accumulate_clipped(&mut self.sum, &update.delta, self.round.clip);
                f64::from(u8::from(within))
            }
            Placement::Distributed => {
                // The node clipped and noised its delta; the server cannot check either.
                let share = update.unclipped.ok_or(CoreError::MissingExtra(
                    "the node's noised clip indicator (distributed differential privacy)",
                ))?;
                if !share.is_finite() {
                    return Err(CoreError::NonFinite { index: 0 });
                }
                algebra::weighted_accumulate(&mut self.sum, &update.delta, 1.0);
                share
            }
        };
        self.unclipped += unclipped;
        self.accepted += 1;
        self.examples += update.num_examples;
        Ok(())
    }

    fn accept_source(&mut self, source: &mut dyn UpdateSource) -> Result<(), CoreError> {
        let update = source.read_whole()?;
        self.accept(&update)
    }

    fn accept_sum(&mut self, sum: &UpdateSum) -> Result<(), CoreError> {
        // Central noise needs each update clipped by the server, and adaptive clipping needs
        // each node's clip indicator: neither is in a sum.
        if self.round.placement == Placement::Central || self.round.count_stddev > 0.0 {
            return Err(CoreError::NeedsIndividualUpdates);
        }
        validate_sum(sum, self.sum.len())?;
        algebra::weighted_accumulate(&mut self.sum, &sum.weighted_delta, 1.0);
        self.accepted += sum.participants;
        self.examples += sum.num_examples;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse::Streaming
    }

    /// Finishes even with nothing accepted: the noise alone is then the round's release.
    fn finish(mut self: Box<Self>) -> Result<Aggregate, CoreError> {
        let adaptive = self.round.count_stddev > 0.0;
        if self.round.placement == Placement::Central {
            let mut noise = NoiseSource::new(self.round.noise, u64::from(self.round.round));
            let std = self.round.update_noise_multiplier * self.round.clip;
            noise.add_to_f32(&mut self.sum, std);
            if adaptive {
                self.unclipped += noise.gaussian(self.round.count_stddev);
            }
        }
        let mut delta = self.sum;
        algebra::divide(&mut delta, self.round.expected_count);
        Ok(Aggregate {
            delta,
            participants: self.accepted,
            num_examples: self.examples,
            control_delta_sum: None,
            unclipped_fraction: adaptive.then(|| self.unclipped / self.round.expected_count),
            excluded: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::noise::NoiseSeed;

    fn round(placement: Placement, z: f64, count_stddev: f64) -> RoundPrivacy {
        RoundPrivacy {
            round: 1,
            placement,
            expected_count: 4.0,
            clip: 1.0,
            update_noise_multiplier: z,
            count_stddev,
            per_layer: false,
            noise: NoiseSeed::Run(9),
        }
    }

    #[test]
    fn noiseless_central_sum_clips_and_divides_by_the_expected_count() {
        let mut agg = Box::new(DpSum::new(
            round(Placement::Central, 0.0, 0.0),
            ClipScope::whole(2),
        ));
        agg.accept(&Update::new(vec![3.0, 4.0], 1)).expect("valid"); // clipped to [0.6, 0.8]
        agg.accept(&Update::new(vec![0.2, 0.0], 500))
            .expect("valid"); // weight 1, not 500
        let out = agg.finish().expect("finish");
        assert!((out.delta[0] - 0.2).abs() < 1e-6, "{:?}", out.delta);
        assert!((out.delta[1] - 0.2).abs() < 1e-6, "{:?}", out.delta);
        assert_eq!(out.participants, 2);
        assert_eq!(out.unclipped_fraction, None);
    }

    #[test]
    fn central_noise_has_std_z_times_clip_over_expected_count() {
        let dim = 100_000;
        let agg = Box::new(DpSum::new(
            round(Placement::Central, 2.0, 0.0),
            ClipScope::whole(dim),
        ));
        let out = agg.finish().expect("noise-only round");
        let var = out.delta.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / dim as f64;
        // std = 2 * 1 / 4 = 0.5, variance 0.25; standard error 0.25 * sqrt(2 / dim) = 0.0011.
        assert!((var - 0.25).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn adaptive_rounds_report_the_noisy_unclipped_fraction() {
        let mut agg = Box::new(DpSum::new(
            round(Placement::Central, 0.0, 1e-9),
            ClipScope::whole(1),
        ));
        agg.accept(&Update::new(vec![0.5], 1)).expect("valid");
        agg.accept(&Update::new(vec![5.0], 1)).expect("valid");
        let fraction = agg
            .finish()
            .expect("finish")
            .unclipped_fraction
            .expect("adaptive");
        assert!((fraction - 0.25).abs() < 1e-6, "{fraction}");
    }

    #[test]
    fn distributed_sum_takes_updates_as_sent_and_needs_the_indicator() {
        let mut agg = Box::new(DpSum::new(
            round(Placement::Distributed, 1.0, 0.0),
            ClipScope::whole(1),
        ));
        let mut plain = Update::new(vec![8.0], 1);
        assert!(matches!(
            agg.accept(&plain),
            Err(CoreError::MissingExtra(_))
        ));
        plain.unclipped = Some(1.0);
        agg.accept(&plain).expect("valid");
        // No clipping and no server noise: 8 / 4.
        assert_eq!(agg.finish().expect("finish").delta, [2.0]);
    }

    #[test]
    fn only_a_fixed_clip_distributed_sum_takes_a_secure_sum() {
        let sum = UpdateSum {
            weighted_delta: vec![6.0],
            weight: 3.0,
            participants: 3,
            num_examples: 30,
        };
        let mut distributed = Box::new(DpSum::new(
            round(Placement::Distributed, 1.0, 0.0),
            ClipScope::whole(1),
        ));
        distributed.accept_sum(&sum).expect("valid");
        let out = distributed.finish().expect("finish");
        // The fixed denominator: 6 / 4 expected nodes.
        assert_eq!(out.delta, [1.5]);
        assert_eq!(out.participants, 3);
        for refusing in [
            round(Placement::Central, 1.0, 0.0),
            round(Placement::Distributed, 1.0, 0.5),
        ] {
            let mut agg = Box::new(DpSum::new(refusing, ClipScope::whole(1)));
            assert!(matches!(
                agg.accept_sum(&sum),
                Err(CoreError::NeedsIndividualUpdates)
            ));
        }
    }
}
