//! A run's privacy state and what each round does with it: the round's clip norm and noise,
//! the accountant's charge after the round, and the adaptive clip norm's move.
//!
//! The state after any round follows from the rounds' [`DpRoundRecord`]s alone, so a
//! coordinator that restarts rebuilds it by [`Privacy::replay`]ing its stored history.

use crate::{
    CoreError,
    privacy::{
        ClipRule, DpRoundRecord, DpSettings, Placement,
        accountant::{EpsilonAt, RdpAccountant},
        noise::NoiseSeed,
        round::RoundPrivacy,
    },
};

/// A run's differential-privacy mechanism: settings, current clip norm and privacy spent.
#[derive(Debug, Clone)]
pub struct Privacy {
    settings: DpSettings,
    noise: NoiseSeed,
    accountant: RdpAccountant,
    clip: f64,
    spent: Option<EpsilonAt>,
}

impl Privacy {
    /// Starts a run's mechanism; `noise` says where the server's noise comes from.
    pub fn new(settings: DpSettings, noise: NoiseSeed) -> Result<Self, CoreError> {
        settings.validate()?;
        let clip = match settings.clip {
            ClipRule::Fixed(s) => s,
            ClipRule::Adaptive(a) => a.initial,
        };
        Ok(Self {
            settings,
            noise,
            accountant: RdpAccountant::default(),
            clip,
            spent: None,
        })
    }

    /// The run's settings.
    pub fn settings(&self) -> &DpSettings {
        &self.settings
    }

    /// The privacy spent so far; `None` before the first round.
    pub fn spent(&self) -> Option<EpsilonAt> {
        self.spent
    }

    /// Epsilon after one more round at full noise.
    pub fn epsilon_after_next_round(&self) -> f64 {
        let mut next = self.accountant.clone();
        next.compose(
            self.settings.sampling_rate,
            self.settings.noise_multiplier,
            1,
        );
        next.epsilon(self.settings.delta).epsilon
    }

    /// `Some(epsilon)` when one more round would take the run past its budget.
    pub fn next_round_exceeds_budget(&self) -> Option<f64> {
        let budget = self.settings.epsilon_budget?;
        let next = self.epsilon_after_next_round();
        (next > budget).then_some(next)
    }

    /// Refuses a run that has spent nothing yet and whose first round alone would exceed its
    /// budget; the error names the settings to change.
    pub fn check_first_round_fits_budget(&self) -> Result<(), CoreError> {
        match self.next_round_exceeds_budget() {
            Some(epsilon) if self.spent.is_none() => Err(CoreError::Privacy(format!(
                "the first round alone would spend epsilon {epsilon:.3}, over the budget; raise \
                 the noise multiplier or the epsilon budget, or lower the sampling rate (fraction)"
            ))),
            _ => Ok(()),
        }
    }

    /// Fixes round `round`'s parameters for a population of `population` nodes.
    pub fn plan_round(&self, round: u32, population: usize) -> Result<RoundPrivacy, CoreError> {
        let expected_count = self.settings.sampling_rate * population as f64;
        if expected_count <= 0.0 {
            return Err(CoreError::Privacy(
                "no nodes to sample from: the expected cohort is empty".into(),
            ));
        }
        let z = self.settings.noise_multiplier;
        let (update_noise_multiplier, count_stddev) = match self.settings.clip {
            ClipRule::Fixed(_) => (z, 0.0),
            ClipRule::Adaptive(a) => {
                let sigma_b = a.count_stddev.unwrap_or(expected_count / 20.0);
                // z^-2 = z_delta^-2 + (2 sigma_b)^-2: the count takes its part of the budget.
                let rest = z.powi(-2) - (2.0 * sigma_b).powi(-2);
                if rest <= 0.0 {
                    return Err(CoreError::Privacy(format!(
                        "adaptive clipping cannot pay for its count noise (sigma_b = {sigma_b:.3}) \
                         out of noise multiplier {z}: z must be below 2 * sigma_b = {:.3}; lower \
                         the noise multiplier, raise --dp-count-stddev, or sample more nodes",
                        2.0 * sigma_b
                    )));
                }
                (rest.powf(-0.5), sigma_b)
            }
        };
        Ok(RoundPrivacy {
            round,
            placement: self.settings.placement,
            expected_count,
            clip: self.clip,
            update_noise_multiplier,
            count_stddev,
            per_layer: self.settings.per_layer,
            noise: self.noise,
        })
    }

    /// Charges a finished round to the accountant and moves the adaptive clip norm; `accepted`
    /// updates went into the sum.
    pub fn finish_round(
        &mut self,
        round: &RoundPrivacy,
        accepted: usize,
        unclipped_fraction: Option<f64>,
    ) -> DpRoundRecord {
        let z = self.settings.noise_multiplier;
        let charged = match round.placement {
            // The server's noise protects the sum however many nodes reported.
            Placement::Central => Some(z),
            // The noise present is the reporters' shares: less than planned if fewer reported.
            Placement::Distributed if accepted == 0 => None,
            Placement::Distributed => {
                Some(z * (accepted as f64 / round.expected_count).min(1.0).sqrt())
            }
        };
        let mut record = DpRoundRecord {
            epsilon: 0.0,
            order: f64::NAN,
            delta: self.settings.delta,
            clip_norm: round.clip,
            noise_multiplier: charged,
            sampling_rate: self.settings.sampling_rate,
            expected_count: round.expected_count,
            unclipped_fraction,
        };
        self.replay(&record);
        if let Some(spent) = self.spent {
            record.epsilon = spent.epsilon;
            record.order = spent.order;
        }
        record
    }

    /// Applies a recorded round: its charge to the accountant and its clip-norm move.
    pub fn replay(&mut self, record: &DpRoundRecord) {
        if let Some(z) = record.noise_multiplier {
            self.accountant.compose(record.sampling_rate, z, 1);
        }
        self.spent = Some(self.accountant.epsilon(self.settings.delta));
        if let (ClipRule::Adaptive(a), Some(fraction)) =
            (self.settings.clip, record.unclipped_fraction)
        {
            self.clip = record.clip_norm * (-a.lr * (fraction - a.target_quantile)).exp();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::{AdaptiveClip, accountant::default_orders, accountant::epsilon_for};

    fn settings(clip: ClipRule, placement: Placement) -> DpSettings {
        DpSettings {
            noise_multiplier: 1.0,
            clip,
            per_layer: false,
            delta: 1e-5,
            placement,
            epsilon_budget: None,
            sampling_rate: 0.1,
        }
    }

    fn adaptive() -> ClipRule {
        ClipRule::Adaptive(AdaptiveClip {
            initial: 0.1,
            target_quantile: 0.5,
            lr: 0.2,
            count_stddev: None,
        })
    }

    #[test]
    fn central_rounds_charge_the_full_multiplier() {
        let mut p = Privacy::new(
            settings(ClipRule::Fixed(1.0), Placement::Central),
            NoiseSeed::Run(0),
        )
        .expect("valid");
        for r in 1..=3 {
            let round = p.plan_round(r, 100).expect("plan");
            assert_eq!(round.expected_count, 10.0);
            assert_eq!(round.node_instructions(), None);
            p.finish_round(&round, 0, None);
        }
        let want = epsilon_for(0.1, 1.0, 3, 1e-5, &default_orders()).epsilon;
        assert!((p.spent().expect("spent").epsilon - want).abs() < 1e-12);
    }

    #[test]
    fn distributed_shares_sum_to_the_full_noise_and_dropouts_are_charged() {
        let mut p = Privacy::new(
            settings(ClipRule::Fixed(2.0), Placement::Distributed),
            NoiseSeed::Run(0),
        )
        .expect("valid");
        let round = p.plan_round(1, 100).expect("plan");
        let node = round.node_instructions().expect("distributed");
        // Ten shares of variance (z S)^2 / 10 sum to (z S)^2.
        assert!((10.0 * node.noise_std.powi(2) - 4.0).abs() < 1e-12);
        let record = p.finish_round(&round, 5, None);
        assert_eq!(record.noise_multiplier, Some(0.5f64.sqrt()));
        let nothing = p.finish_round(&round, 0, None);
        assert_eq!(nothing.noise_multiplier, None);
        assert_eq!(nothing.epsilon, record.epsilon);
    }

    #[test]
    fn adaptive_clip_moves_towards_the_target_quantile() {
        let mut p = Privacy::new(settings(adaptive(), Placement::Central), NoiseSeed::Run(0))
            .expect("valid");
        // 100 nodes at q = 0.1: sigma_b = 0.5, so z_delta = (1 - 1)^(-1/2) is impossible.
        assert!(p.plan_round(1, 100).is_err());
        let round = p.plan_round(1, 1000).expect("sigma_b = 5");
        // z_delta = (1 - 1/100)^(-1/2).
        assert!((round.update_noise_multiplier - 0.99f64.powf(-0.5)).abs() < 1e-12);
        // Every update was under the clip: the clip shrinks by exp(-0.2 * 0.5).
        p.finish_round(&round, 100, Some(1.0));
        let next = p.plan_round(2, 1000).expect("plan");
        assert!((next.clip - 0.1 * (-0.1f64).exp()).abs() < 1e-12);
        // None under the clip: it grows.
        p.finish_round(&next, 100, Some(0.0));
        assert!(p.plan_round(3, 1000).expect("plan").clip > next.clip);
    }

    #[test]
    fn replaying_records_rebuilds_the_state() {
        let mut live = Privacy::new(settings(adaptive(), Placement::Central), NoiseSeed::Run(0))
            .expect("valid");
        let mut records = Vec::new();
        for (r, fraction) in [(1, 0.9), (2, 0.2), (3, 0.6)] {
            let round = live.plan_round(r, 1000).expect("plan");
            records.push(live.finish_round(&round, 90, Some(fraction)));
        }
        let mut rebuilt =
            Privacy::new(settings(adaptive(), Placement::Central), NoiseSeed::Os).expect("valid");
        for record in &records {
            rebuilt.replay(record);
        }
        assert_eq!(rebuilt.spent(), live.spent());
        assert_eq!(
            rebuilt.plan_round(4, 1000).expect("plan").clip,
            live.plan_round(4, 1000).expect("plan").clip
        );
    }

    #[test]
    fn budget_is_checked_before_the_round() {
        let mut s = settings(ClipRule::Fixed(1.0), Placement::Central);
        s.epsilon_budget = Some(1e-3);
        let p = Privacy::new(s, NoiseSeed::Run(0)).expect("valid");
        assert!(p.next_round_exceeds_budget().is_some());
        s.epsilon_budget = Some(100.0);
        let p = Privacy::new(s, NoiseSeed::Run(0)).expect("valid");
        assert_eq!(p.next_round_exceeds_budget(), None);
    }

    #[test]
    fn bad_settings_are_refused_with_the_setting_named() {
        let mut s = settings(ClipRule::Fixed(-1.0), Placement::Central);
        let err = Privacy::new(s, NoiseSeed::Os).expect_err("negative clip");
        assert!(err.to_string().contains("clip norm"), "{err}");
        s.clip = ClipRule::Fixed(1.0);
        s.delta = 2.0;
        assert!(
            Privacy::new(s, NoiseSeed::Os)
                .expect_err("delta")
                .to_string()
                .contains("delta")
        );
    }
}
