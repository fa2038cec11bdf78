//! Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): every node's update is
//! clipped to an L2 bound, Gaussian noise calibrated to that bound is added to their sum, the sum
//! is divided by the expected cohort size, and an RDP accountant tracks the privacy spent.
//!
//! - [`accountant`]: RDP of the Poisson-subsampled Gaussian, composition, conversion to epsilon.
//! - [`clip`]: whole-model and per-layer L2 clipping.
//! - [`noise`]: Gaussian noise from ChaCha20, OS-seeded or run-seeded.
//! - [`mechanism`]: a run's privacy state (clip norm, adaptive clipping, spent budget) and what
//!   each round does with it.
//! - [`round`]: one round's parameters, as planned.
//! - [`aggregate`]: the server's noisy fixed-denominator sum.
//! - [`node`]: the node's share of the work in the distributed placement.

pub mod accountant;
pub mod aggregate;
pub mod clip;
pub mod mechanism;
pub mod node;
pub mod noise;
pub mod round;

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Who adds the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// The server clips each update and adds all the noise to the sum (a trusted server).
    Central,
    /// Each node clips its own update and adds its share of the noise, so that the sum of the
    /// expected cohort carries the full noise; pairs with secure aggregation.
    Distributed,
}

impl FromStr for Placement {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "central" => Ok(Self::Central),
            "distributed" => Ok(Self::Distributed),
            _ => Err(CoreError::Privacy(format!(
                "unknown DP placement '{s}': expected central or distributed"
            ))),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Central => "central",
            Self::Distributed => "distributed",
        })
    }
}

/// Adaptive clipping (Andrew et al., 2021): the clip norm follows a target quantile of the
/// update norms, estimated privately each round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// The clip norm of the first round.
    pub initial: f64,
    /// Fraction of updates that should fall under the clip norm (gamma).
    pub target_quantile: f64,
    /// Geometric learning rate of the clip norm (eta_C).
    pub lr: f64,
    /// Standard deviation of the noise on the count of unclipped updates (sigma_b); `None`
    /// takes the paper's default of a twentieth of the expected cohort.
    pub count_stddev: Option<f64>,
}

/// How updates are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipRule {
    /// A fixed L2 bound.
    Fixed(f64),
    /// A bound that adapts each round.
    Adaptive(AdaptiveClip),
}

/// A run's differential-privacy configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpSettings {
    /// Noise standard deviation as a multiple of the clip norm (z).
    pub noise_multiplier: f64,
    /// How updates are bounded.
    pub clip: ClipRule,
    /// Clip each tensor separately instead of the whole model.
    pub per_layer: bool,
    /// The delta of the reported (epsilon, delta) guarantee.
    pub delta: f64,
    /// Who adds the noise.
    pub placement: Placement,
    /// Stop before a round that would take epsilon above this.
    pub epsilon_budget: Option<f64>,
    /// Probability that each node is sampled into a round (q).
    pub sampling_rate: f64,
}

impl DpSettings {
    /// Checks every value's range; the error names the setting and what it accepts.
    pub fn validate(&self) -> Result<(), CoreError> {
        let fail = |msg: String| Err(CoreError::Privacy(msg));
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return fail(format!(
                "the noise multiplier must be positive, got {}",
                self.noise_multiplier
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return fail(format!("delta must be in (0, 1), got {}", self.delta));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return fail(format!(
                "the sampling rate (--fraction) must be in (0, 1], got {}",
                self.sampling_rate
            ));
        }
        if let Some(budget) = self.epsilon_budget
            && (budget.is_nan() || budget <= 0.0)
        {
            return fail(format!("the epsilon budget must be positive, got {budget}"));
        }
        match self.clip {
            ClipRule::Fixed(s) if !(s.is_finite() && s > 0.0) => {
                fail(format!("the clip norm must be positive, got {s}"))
            }
            ClipRule::Adaptive(a) if !(a.initial.is_finite() && a.initial > 0.0) => fail(format!(
                "the initial clip norm must be positive, got {}",
                a.initial
            )),
            ClipRule::Adaptive(a) if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) => {
                fail(format!(
                    "the target quantile must be in (0, 1), got {}",
                    a.target_quantile
                ))
            }
            ClipRule::Adaptive(a) if !(a.lr.is_finite() && a.lr > 0.0) => fail(format!(
                "the clip learning rate must be positive, got {}",
                a.lr
            )),
            ClipRule::Adaptive(AdaptiveClip {
                count_stddev: Some(s),
                ..
            }) if !(s.is_finite() && s > 0.0) => fail(format!(
                "the count noise standard deviation must be positive, got {s}"
            )),
            _ => Ok(()),
        }
    }
}

/// What one round's privacy was, as the run history records it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpRoundRecord {
    /// Epsilon spent by the run up to and including this round, at `delta`.
    pub epsilon: f64,
    /// The RDP order that gave `epsilon`.
    pub order: f64,
    /// The delta of the guarantee.
    pub delta: f64,
    /// The clip norm used this round.
    pub clip_norm: f64,
    /// The noise multiplier the accountant charged for this round; `None` when nothing that
    /// depends on the nodes' data was released (distributed placement, no update arrived).
    pub noise_multiplier: Option<f64>,
    /// The sampling rate the accountant charged.
    pub sampling_rate: f64,
    /// The expected cohort size (the fixed denominator).
    pub expected_count: f64,
    /// Adaptive clipping: the noisy fraction of updates that were under the clip norm.
    pub unclipped_fraction: Option<f64>,
}
