//! Robust aggregation: rules that limit what faulty or malicious updates can do to the global
//! model, at the price of buffering the round's updates (they need all of them at once).
//!
//! - [`coordinate`]: coordinate-wise median and trimmed mean, by selection.
//! - [`krum`]: pairwise distances, Krum / Multi-Krum and Bulyan's selection.
//! - [`NormBounded`]: clips each update to a norm bound before any rule (streaming or not).
//!
//! Every rule here counts each update once, whatever its example count: weighting by a number
//! the node reports would hand an attacker a lever.

pub mod coordinate;
pub mod krum;

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    CoreError, Update,
    aggregate::{Aggregate, Aggregator, MemoryUse, validate_update},
    algebra,
};

/// A robust aggregation rule and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "rule")]
pub enum RobustRule {
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean without the `floor(beta * n)` smallest and largest values.
    TrimmedMean {
        /// Share trimmed from each end; must be at least the attackers' share.
        beta: f64,
    },
    /// The update with the lowest Krum score.
    Krum {
        /// Byzantine updates tolerated (f).
        byzantine: usize,
    },
    /// The mean of the `keep` updates with the lowest Krum scores.
    MultiKrum {
        /// Byzantine updates tolerated (f).
        byzantine: usize,
        /// Updates averaged (m); `None` takes `n - f`.
        keep: Option<usize>,
    },
    /// Bulyan: `n - 2f` successive Krum picks, then per coordinate the mean of the `n - 4f`
    /// picked values closest to their median.
    Bulyan {
        /// Byzantine updates tolerated (f).
        byzantine: usize,
    },
}

impl RobustRule {
    /// The rule's name as `--aggregator` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Median => "median",
            Self::TrimmedMean { .. } => "trimmed-mean",
            Self::Krum { .. } => "krum",
            Self::MultiKrum { .. } => "multi-krum",
            Self::Bulyan { .. } => "bulyan",
        }
    }

    /// Checks that the rule can aggregate `n` updates; the error names the rule's condition.
    pub fn check(&self, n: usize) -> Result<(), CoreError> {
        let fail = |msg: String| Err(CoreError::Robust(msg));
        match *self {
            Self::Median if n == 0 => fail("the median needs at least one update".into()),
            Self::TrimmedMean { beta } => {
                let trim = (beta * n as f64).floor() as usize;
                if !(0.0..0.5).contains(&beta) {
                    fail(format!("--trim-beta must be in [0, 0.5), got {beta}"))
                } else if n == 0 || 2 * trim >= n {
                    fail(format!(
                        "trimming {trim} values from each end of {n} leaves none; lower \
                         --trim-beta or select more nodes"
                    ))
                } else {
                    Ok(())
                }
            }
            Self::Krum { byzantine: f } | Self::MultiKrum { byzantine: f, .. }
                if n <= 2 * f + 2 =>
            {
                fail(format!(
                    "{} with --byzantine {f} needs more than 2f + 2 = {} updates, got {n}",
                    self.name(),
                    2 * f + 2
                ))
            }
            Self::MultiKrum { keep: Some(m), .. } if m == 0 || m > n => fail(format!(
                "multi-krum --krum-keep {m} must be between 1 and the {n} updates"
            )),
            Self::Bulyan { byzantine: f } if n < 4 * f + 3 => fail(format!(
                "bulyan with --byzantine {f} needs at least 4f + 3 = {} updates, got {n}",
                4 * f + 3
            )),
            _ => Ok(()),
        }
    }
}

impl RobustRule {
    /// The fewest updates a round must deliver for the rule to do its job: what [`Self::check`]
    /// demands, and for the trimmed mean enough to trim at least one value from each end (with
    /// fewer it is a plain mean). Coordinators wait for this many nodes before a round starts.
    pub fn min_updates(&self) -> usize {
        match *self {
            Self::Median => 1,
            Self::TrimmedMean { beta } if beta > 0.0 && beta < 0.5 => {
                let mut n = (1.0 / beta).ceil().max(1.0) as usize;
                while (beta * n as f64).floor() < 1.0 || self.check(n).is_err() {
                    n += 1;
                }
                n
            }
            Self::TrimmedMean { .. } => 1,
            Self::Krum { byzantine: f } => 2 * f + 3,
            Self::MultiKrum { byzantine: f, keep } => (2 * f + 3).max(keep.unwrap_or(0)),
            Self::Bulyan { byzantine: f } => 4 * f + 3,
        }
    }

    /// Why the rule needs [`Self::min_updates`] updates, in an operator's words.
    pub fn min_updates_reason(&self) -> String {
        match *self {
            Self::Median => "the median needs at least 1 update".into(),
            Self::TrimmedMean { beta } => format!(
                "trimmed-mean with trim-beta {beta} needs {} updates to trim one from each end",
                self.min_updates()
            ),
            Self::Krum { byzantine: f }
            | Self::MultiKrum {
                byzantine: f,
                keep: None,
            } => format!(
                "{} with byzantine {f} needs more than {} updates",
                self.name(),
                2 * f + 2
            ),
            Self::MultiKrum {
                byzantine: f,
                keep: Some(m),
            } => format!(
                "multi-krum with byzantine {f} and krum-keep {m} needs more than {} updates and \
                 at least {m}",
                2 * f + 2
            ),
            Self::Bulyan { byzantine: f } => format!(
                "bulyan with byzantine {f} needs at least {} updates",
                4 * f + 3
            ),
        }
    }
}

impl fmt::Display for RobustRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The aggregator a run names: `mean` (the weighted mean FedAvg uses) or a robust rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregatorName {
    /// The strategy's own (weighted-mean) aggregation.
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Krum.
    Krum,
    /// Multi-Krum.
    MultiKrum,
    /// Bulyan.
    Bulyan,
}

impl FromStr for AggregatorName {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "mean" => Self::Mean,
            "median" => Self::Median,
            "trimmed-mean" => Self::TrimmedMean,
            "krum" => Self::Krum,
            "multi-krum" => Self::MultiKrum,
            "bulyan" => Self::Bulyan,
            _ => {
                return Err(CoreError::Robust(format!(
                    "unknown aggregator '{s}': expected mean, median, trimmed-mean, krum, \
                     multi-krum or bulyan"
                )));
            }
        })
    }
}

impl AggregatorName {
    /// The rule with its parameters (`None` for the mean).
    pub fn with(self, trim_beta: f64, byzantine: usize, keep: Option<usize>) -> Option<RobustRule> {
        match self {
            Self::Mean => None,
            Self::Median => Some(RobustRule::Median),
            Self::TrimmedMean => Some(RobustRule::TrimmedMean { beta: trim_beta }),
            Self::Krum => Some(RobustRule::Krum { byzantine }),
            Self::MultiKrum => Some(RobustRule::MultiKrum { byzantine, keep }),
            Self::Bulyan => Some(RobustRule::Bulyan { byzantine }),
        }
    }
}

/// A robust rule over the round's buffered updates.
#[derive(Debug)]
pub struct RobustAggregator {
    rule: RobustRule,
    dim: usize,
    updates: Vec<Vec<f32>>,
    examples: u64,
}

impl RobustAggregator {
    /// An empty buffer for a model of `dim` parameters.
    pub fn new(rule: RobustRule, dim: usize) -> Self {
        Self {
            rule,
            dim,
            updates: Vec::new(),
            examples: 0,
        }
    }
}

impl Aggregator for RobustAggregator {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        validate_update(update, self.dim)?;
        if update.control_delta.is_some() {
            return Err(CoreError::Robust(
                "robust rules aggregate plain deltas; SCAFFOLD's control variates are not \
                 supported"
                    .into(),
            ));
        }
        self.updates.push(update.delta.clone());
        self.examples += update.num_examples;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.updates.len()
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse::BuffersUpdates
    }

    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError> {
        let n = self.updates.len();
        if n == 0 {
            return Err(CoreError::NoUpdates);
        }
        self.rule.check(n)?;
        let rows: Vec<&[f32]> = self.updates.iter().map(Vec::as_slice).collect();
        let mut delta = vec![0.0f32; self.dim];
        let used: Vec<usize> = match self.rule {
            RobustRule::Median => {
                coordinate::coordinate_median(&mut delta, &rows);
                (0..n).collect()
            }
            RobustRule::TrimmedMean { beta } => {
                let trim = (beta * n as f64).floor() as usize;
                coordinate::coordinate_trimmed_mean(&mut delta, &rows, trim);
                (0..n).collect()
            }
            RobustRule::Krum { byzantine } | RobustRule::MultiKrum { byzantine, .. } => {
                let keep = match self.rule {
                    RobustRule::MultiKrum { keep, .. } => keep.unwrap_or(n - byzantine),
                    _ => 1,
                };
                let d = krum::pairwise_sq_distances(&rows);
                let picked = krum::krum_select(&d, n, byzantine, keep);
                for &i in &picked {
                    algebra::weighted_accumulate(&mut delta, rows[i], 1.0);
                }
                algebra::divide(&mut delta, picked.len() as f64);
                picked
            }
            RobustRule::Bulyan { byzantine } => {
                let d = krum::pairwise_sq_distances(&rows);
                let picked = krum::bulyan_select(&d, n, byzantine);
                let chosen: Vec<&[f32]> = picked.iter().map(|&i| rows[i]).collect();
                let keep = picked.len() - 2 * byzantine;
                coordinate::coordinate_mean_around_median(&mut delta, &chosen, keep);
                picked
            }
        };
        let excluded = (0..n).filter(|i| !used.contains(i)).collect();
        Ok(Aggregate {
            delta,
            participants: n,
            num_examples: self.examples,
            control_delta_sum: None,
            unclipped_fraction: None,
            excluded,
        })
    }
}

/// Clips every update to L2 norm `bound` before handing it to `inner` (norm bounding; composes
/// with any rule, streaming or buffering).
pub struct NormBounded {
    inner: Box<dyn Aggregator>,
    bound: f64,
}

impl NormBounded {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Aggregator>, bound: f64) -> Self {
        Self { inner, bound }
    }
}

impl Aggregator for NormBounded {
    fn accept(&mut self, update: &Update) -> Result<(), CoreError> {
        let norm = algebra::l2_norm(&update.delta);
        if norm.is_finite() && norm > self.bound {
            let mut bounded = update.clone();
            algebra::scale(&mut bounded.delta, (self.bound / norm) as f32);
            self.inner.accept(&bounded)
        } else {
            self.inner.accept(update)
        }
    }

    fn accepted(&self) -> usize {
        self.inner.accepted()
    }

    fn memory(&self) -> MemoryUse {
        self.inner.memory()
    }

    fn finish(self: Box<Self>) -> Result<Aggregate, CoreError> {
        self.inner.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{WeightedMean, Weighting};

    fn aggregate(rule: RobustRule, rows: &[Vec<f32>]) -> Result<Aggregate, CoreError> {
        let mut agg = Box::new(RobustAggregator::new(rule, rows[0].len()));
        for r in rows {
            agg.accept(&Update::new(r.clone(), 100))?;
        }
        agg.finish()
    }

    fn honest_and_flipped() -> Vec<Vec<f32>> {
        // Eight honest updates near [1, 1], two attackers sending [-50, -50].
        let mut rows: Vec<Vec<f32>> = (0..8)
            .map(|i| vec![1.0 + 0.01 * i as f32, 1.0 - 0.01 * i as f32])
            .collect();
        rows.extend([vec![-50.0, -50.0], vec![-50.0, -50.0]]);
        rows
    }

    #[test]
    fn min_updates_is_the_smallest_round_each_rule_accepts() {
        for f in 0..4 {
            for rule in [
                RobustRule::Krum { byzantine: f },
                RobustRule::MultiKrum {
                    byzantine: f,
                    keep: None,
                },
                RobustRule::Bulyan { byzantine: f },
            ] {
                let n = rule.min_updates();
                assert!(rule.check(n).is_ok(), "{rule} with {n}");
                assert!(rule.check(n - 1).is_err(), "{rule} with {}", n - 1);
            }
        }
        assert_eq!(RobustRule::Krum { byzantine: 1 }.min_updates(), 5);
        assert_eq!(RobustRule::Bulyan { byzantine: 1 }.min_updates(), 7);
        assert_eq!(RobustRule::Median.min_updates(), 1);
        let keep = RobustRule::MultiKrum {
            byzantine: 1,
            keep: Some(8),
        };
        assert_eq!(keep.min_updates(), 8);
        assert!(
            RobustRule::Krum { byzantine: 1 }
                .min_updates_reason()
                .contains("more than 4 updates")
        );
    }

    proptest::proptest! {
        #[test]
        fn trimmed_mean_floor_trims_one_from_each_end(beta in 0.01f64..0.49) {
            let rule = RobustRule::TrimmedMean { beta };
            let n = rule.min_updates();
            proptest::prop_assert!(rule.check(n).is_ok());
            proptest::prop_assert!((beta * n as f64).floor() >= 1.0);
            proptest::prop_assert!((beta * (n - 1) as f64).floor() < 1.0 || rule.check(n - 1).is_err());
        }
    }

    #[test]
    fn every_rule_resists_two_attackers_in_ten() {
        let rows = honest_and_flipped();
        for rule in [
            RobustRule::Median,
            RobustRule::TrimmedMean { beta: 0.2 },
            RobustRule::Krum { byzantine: 2 },
            RobustRule::MultiKrum {
                byzantine: 2,
                keep: None,
            },
            RobustRule::Bulyan { byzantine: 1 },
        ] {
            let out = aggregate(rule, &rows).expect("enough updates");
            assert!(
                out.delta.iter().all(|v| (0.9..=1.1).contains(v)),
                "{rule}: {:?}",
                out.delta
            );
        }
        // The plain mean is dragged far away.
        let mut mean = Box::new(WeightedMean::new(2, Weighting::Examples));
        for r in &rows {
            mean.accept(&Update::new(r.clone(), 100)).expect("valid");
        }
        assert!(mean.finish().expect("mean").delta[0] < -5.0);
    }

    #[test]
    fn krum_and_bulyan_report_who_they_left_out() {
        let rows = honest_and_flipped();
        let krum = aggregate(
            RobustRule::MultiKrum {
                byzantine: 2,
                keep: Some(8),
            },
            &rows,
        )
        .expect("multi-krum");
        assert_eq!(krum.excluded, [8, 9]);
        // Bulyan with f = 1 picks n - 2f = 8 of 10 by repeated Krum; as its candidate set
        // shrinks, the two identical attackers score 0 against each other and one can be
        // picked, but the per-coordinate step keeps only the 6 values nearest the median.
        let bulyan = aggregate(RobustRule::Bulyan { byzantine: 1 }, &rows).expect("bulyan");
        assert_eq!(bulyan.excluded.len(), 2);
        assert!(bulyan.delta.iter().all(|v| (0.9..=1.1).contains(v)));
        let median = aggregate(RobustRule::Median, &rows).expect("median");
        assert!(median.excluded.is_empty());
    }

    #[test]
    fn preconditions_are_checked_with_the_rule_named() {
        let rows = vec![vec![0.0f32]; 6];
        let err = aggregate(RobustRule::Krum { byzantine: 2 }, &rows).expect_err("n = 6 = 2f+2");
        assert!(err.to_string().contains("2f + 2 = 6"), "{err}");
        let err = aggregate(RobustRule::Bulyan { byzantine: 1 }, &rows[..4]).expect_err("n < 7");
        assert!(err.to_string().contains("4f + 3 = 7"), "{err}");
        assert!(aggregate(RobustRule::TrimmedMean { beta: 0.5 }, &rows).is_err());
        assert!("krumm".parse::<AggregatorName>().is_err());
        assert_eq!(
            "Multi-Krum".parse::<AggregatorName>().ok(),
            Some(AggregatorName::MultiKrum)
        );
    }

    #[test]
    fn norm_bound_clips_before_the_inner_rule() {
        let mut agg = NormBounded::new(Box::new(WeightedMean::new(2, Weighting::Examples)), 1.0);
        agg.accept(&Update::new(vec![30.0, 40.0], 1))
            .expect("valid");
        agg.accept(&Update::new(vec![0.0, 0.5], 1)).expect("valid");
        assert_eq!(agg.memory(), MemoryUse::Streaming);
        let out = Box::new(agg).finish().expect("finish");
        assert!((out.delta[0] - 0.3).abs() < 1e-6 && (out.delta[1] - 0.65).abs() < 1e-6);
    }
}
