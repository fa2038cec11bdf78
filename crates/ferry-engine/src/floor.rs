//! The smallest round a run can finish: how many updates its aggregation rule and its secure
//! aggregation need. A coordinator that starts a round with fewer nodes dooms it, so the
//! deployed coordinator waits for this many online nodes and closes no round with fewer.

use ferry_core::strategy::{AggregationRule, Strategy};

use crate::secure::SecureAggregation;

/// The fewest updates a round of a run can be aggregated from, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundFloor {
    /// Updates (masked inputs under secure aggregation) a round needs; at least 1.
    pub updates: usize,
    /// The rule that sets the floor, in an operator's words; `None` when nothing beyond one
    /// update is needed.
    pub reason: Option<String>,
}

impl RoundFloor {
    /// The floor of a run with `strategy` and, when set, `secure` aggregation: the largest
    /// of what the robust rule and SecAgg+ need.
    pub fn of(strategy: &Strategy, secure: Option<&SecureAggregation>) -> Self {
        let mut floor = Self {
            updates: 1,
            reason: None,
        };
        if let AggregationRule::Robust(rule) = strategy.aggregation {
            floor.raise(rule.min_updates(), rule.min_updates_reason());
        }
        if let Some(secure) = secure {
            let needed = secure.min_participants();
            let reason = if secure.automatic_threshold {
                format!(
                    "SecAgg+ needs at least {needed} masked inputs (its threshold follows each \
                     round's cohort)"
                )
            } else {
                format!(
                    "SecAgg+ with threshold {} needs at least {needed} masked inputs",
                    secure.params.threshold
                )
            };
            floor.raise(needed, reason);
        }
        floor
    }

    fn raise(&mut self, updates: usize, reason: String) {
        if updates > self.updates {
            self.updates = updates;
            self.reason = Some(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::{
        robust::RobustRule,
        strategy::{StrategyName, StrategyParams},
    };
    use ferry_secagg::SecAggParams;

    use super::*;

    fn fedavg() -> Strategy {
        Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 10)
    }

    #[test]
    fn a_plain_mean_needs_one_update() {
        assert_eq!(
            RoundFloor::of(&fedavg(), None),
            RoundFloor {
                updates: 1,
                reason: None
            }
        );
    }

    #[test]
    fn krum_and_secagg_raise_the_floor_and_say_why() {
        let krum = fedavg()
            .with_robust_rule(RobustRule::MultiKrum {
                byzantine: 1,
                keep: None,
            })
            .expect("multi-krum composes with fedavg");
        let floor = RoundFloor::of(&krum, None);
        assert_eq!(floor.updates, 5);
        assert_eq!(
            floor.reason.as_deref(),
            Some("multi-krum with byzantine 1 needs more than 4 updates")
        );
        let secure = SecureAggregation::for_strategy(
            SecAggParams {
                threshold: 5,
                ..SecAggParams::default()
            },
            &fedavg(),
            100,
        )
        .expect("secure fedavg");
        let floor = RoundFloor::of(&fedavg(), Some(&secure));
        assert_eq!(floor.updates, 6);
        assert!(
            floor
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("threshold 5")),
            "{floor:?}"
        );
        // A threshold that follows each round's cohort serves rounds down to 3 nodes.
        let automatic = SecureAggregation {
            automatic_threshold: true,
            ..secure
        };
        let floor = RoundFloor::of(&fedavg(), Some(&automatic));
        assert_eq!(floor.updates, 3);
        assert!(
            floor
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("follows each round's cohort")),
            "{floor:?}"
        );
    }
}
