//! The safety settings of `ferry simulate`'s options: secure aggregation, the robust
//! aggregation rule, the simulated attack and differential privacy, each checked for flags
//! that make no sense without the others.

use anyhow::{Context, Result, bail};
use ferry_core::{
    privacy::{AdaptiveClip, ClipRule, DpSettings},
    robust::{AggregatorName, RobustRule},
};
use ferry_engine::secure::SecAggSettings;
use ferry_sim::attack::AttackSettings;

use super::{SimulateArgs, check};

impl SimulateArgs {
    /// Secure-aggregation settings, when `--secagg` asks for it.
    pub(super) fn resolve_secagg(&self) -> Result<Option<SecAggSettings>> {
        let stray = [
            ("--secagg-neighbours", self.secagg_neighbours.is_some()),
            ("--secagg-threshold", self.secagg_threshold.is_some()),
            ("--secagg-clip", self.secagg_clip.is_some()),
            (
                "--secagg-quantization-bits",
                self.secagg_quantization_bits.is_some(),
            ),
            ("--secagg-modulus-bits", self.secagg_modulus_bits.is_some()),
            ("--secagg-weight-cap", self.secagg_weight_cap.is_some()),
        ];
        if !self.secagg {
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                bail!("{flag} needs --secagg, which turns secure aggregation on");
            }
            return Ok(None);
        }
        let defaults = SecAggSettings::default();
        Ok(Some(SecAggSettings {
            neighbours: self.secagg_neighbours.unwrap_or(defaults.neighbours),
            threshold: self.secagg_threshold,
            clip: self.secagg_clip.unwrap_or(defaults.clip),
            quantization_bits: self
                .secagg_quantization_bits
                .unwrap_or(defaults.quantization_bits),
            modulus_bits: self.secagg_modulus_bits.unwrap_or(defaults.modulus_bits),
            weight_cap: self.secagg_weight_cap,
        }))
    }

    /// The robust rule, checked against the cohort it will see each round.
    pub(super) fn resolve_aggregator(
        &self,
        clients: usize,
        fraction: f64,
        min_clients: usize,
    ) -> Result<Option<RobustRule>> {
        let name: AggregatorName = self.aggregator.as_deref().unwrap_or("mean").parse()?;
        let rule = name.with(
            self.trim_beta.unwrap_or(0.2),
            self.byzantine.unwrap_or(1),
            self.krum_keep,
        );
        if let Some(rule) = rule {
            let cohort = ferry_engine::selection::cohort_size(clients, fraction, min_clients);
            rule.check(cohort)?;
        }
        Ok(rule)
    }

    /// The simulated attack, when `--attack` names one.
    pub(super) fn resolve_attack(&self) -> Result<Option<AttackSettings>> {
        let Some(kind) = &self.attack else {
            if self.attackers.is_some() {
                bail!("--attackers needs --attack to say what they do");
            }
            return Ok(None);
        };
        let attackers = self
            .attackers
            .as_deref()
            .context("--attack needs --attackers: a fraction (0.2) or a count (4)")?
            .parse()?;
        let poison_fraction = self.poison_fraction.unwrap_or(0.5);
        check((0.0..=1.0).contains(&poison_fraction), || {
            format!("--poison-fraction must be in [0, 1], got {poison_fraction}")
        })?;
        let (scale, std) = (
            self.attack_scale.unwrap_or(10.0),
            self.attack_std.unwrap_or(1.0),
        );
        check(scale.is_finite() && scale > 0.0, || {
            format!("--attack-scale must be a positive number, got {scale}")
        })?;
        check(std.is_finite() && std > 0.0, || {
            format!("--attack-std must be a positive number, got {std}")
        })?;
        let target = self.backdoor_target.unwrap_or(0);
        check(usize::from(target) < ferry_ml::data::NUM_CLASSES, || {
            format!("--backdoor-target must be a class label 0-9, got {target}")
        })?;
        Ok(Some(AttackSettings {
            kind: kind.parse()?,
            attackers,
            scale,
            std,
            z: self.attack_z,
            target,
            poison_fraction,
        }))
    }

    /// The differential-privacy settings, when `--dp-noise-multiplier` makes the run private.
    pub(super) fn resolve_dp(&self, sampling_rate: f64) -> Result<Option<DpSettings>> {
        let Some(noise_multiplier) = self.dp_noise_multiplier else {
            let stray = [
                ("--dp-clip", self.dp_clip.is_some()),
                ("--dp-adaptive-clip", self.dp_adaptive_clip),
                ("--dp-target-quantile", self.dp_target_quantile.is_some()),
                ("--dp-clip-lr", self.dp_clip_lr.is_some()),
                ("--dp-count-stddev", self.dp_count_stddev.is_some()),
                ("--dp-per-layer", self.dp_per_layer),
                ("--dp-delta", self.dp_delta.is_some()),
                ("--dp-placement", self.dp_placement.is_some()),
                ("--dp-epsilon-budget", self.dp_epsilon_budget.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                bail!("{flag} needs --dp-noise-multiplier, which makes the run private");
            }
            return Ok(None);
        };
        let adaptive_only = [
            ("--dp-target-quantile", self.dp_target_quantile.is_some()),
            ("--dp-clip-lr", self.dp_clip_lr.is_some()),
            ("--dp-count-stddev", self.dp_count_stddev.is_some()),
        ];
        let clip = if self.dp_adaptive_clip {
            ClipRule::Adaptive(AdaptiveClip {
                initial: self.dp_clip.unwrap_or(0.1),
                target_quantile: self.dp_target_quantile.unwrap_or(0.5),
                lr: self.dp_clip_lr.unwrap_or(0.2),
                count_stddev: self.dp_count_stddev,
            })
        } else if let Some((flag, _)) = adaptive_only.iter().find(|(_, set)| *set) {
            bail!("{flag} applies to adaptive clipping; add --dp-adaptive-clip");
        } else {
            ClipRule::Fixed(self.dp_clip.context(
                "a private run needs a clip norm: set --dp-clip S, or --dp-adaptive-clip",
            )?)
        };
        let settings = DpSettings {
            noise_multiplier,
            clip,
            per_layer: self.dp_per_layer,
            delta: self.dp_delta.unwrap_or(1e-5),
            placement: self.dp_placement.as_deref().unwrap_or("central").parse()?,
            epsilon_budget: self.dp_epsilon_budget,
            sampling_rate,
        };
        settings.validate()?;
        Ok(Some(settings))
    }
}
