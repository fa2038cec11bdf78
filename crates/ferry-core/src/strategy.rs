//! A federated strategy as a composition: what nodes do locally, how the server combines their
//! updates, and how the combination moves the global model.
//!
//! New strategies add a client procedure, an aggregation rule or a server optimizer and name
//! the combination here; none is a modified copy of FedAvg.

use std::{fmt, str::FromStr};

use crate::{
    CoreError,
    aggregate::{Aggregator, WeightedMean, Weighting},
    privacy::mechanism::Privacy,
    qfedavg::{FairMean, FairParams},
    robust::{NormBounded, RobustAggregator, RobustRule},
    server_opt::{
        AdaptiveParams, AdaptiveRule, AdaptiveServer, ScaffoldServer, ServerOptimizer, ServerSgd,
    },
};

/// What a node does with the global model in a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClientProcedure {
    /// Local SGD on the node's data, starting from the global model.
    LocalSgd,
    /// FedProx (Li et al., 2020): local loss + `(mu / 2) * ||w - w_global||^2`.
    Proximal {
        /// Proximal weight.
        mu: f64,
    },
    /// SCAFFOLD option II: local steps corrected by `c - c_i`; the node keeps `c_i` and
    /// returns its change.
    Scaffold,
    /// FedNova: plain local SGD, returning the normalising factor `a_i` of its local steps.
    Normalized,
    /// q-FedAvg: plain local SGD, also reporting the loss of the received model on the node's
    /// training data before training ([`crate::qfedavg::LOSS_BEFORE`]).
    LossReporting,
}

/// FedNova's normalising factor for `steps` local SGD steps with momentum `rho`:
/// `a = [steps - rho * (1 - rho^steps) / (1 - rho)] / (1 - rho)`, or `steps` without momentum.
pub fn fednova_normalizer(steps: u64, rho: f64) -> f64 {
    let tau = steps as f64;
    if rho == 0.0 {
        return tau;
    }
    (tau - rho * (1.0 - rho.powf(tau)) / (1.0 - rho)) / (1.0 - rho)
}

/// How the server combines the round's updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggregationRule {
    /// A streaming weighted mean of the deltas.
    WeightedMean(Weighting),
    /// A robust rule over the buffered deltas.
    Robust(RobustRule),
    /// q-FedAvg's loss-weighted step over the deltas.
    Fair(FairParams),
}

impl AggregationRule {
    /// A fresh aggregator for one round over a model of `dim` parameters.
    pub fn start(self, dim: usize) -> Box<dyn Aggregator> {
        match self {
            Self::WeightedMean(weighting) => Box::new(WeightedMean::new(dim, weighting)),
            Self::Robust(rule) => Box::new(RobustAggregator::new(rule, dim)),
            Self::Fair(params) => Box::new(FairMean::new(dim, params)),
        }
    }
}

/// The strategies a run can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    /// FedAvg (McMahan et al., 2017).
    FedAvg,
    /// FedAvg with server momentum (Hsu et al., 2019).
    FedAvgM,
    /// FedProx (Li et al., 2020).
    FedProx,
    /// SCAFFOLD, option II (Karimireddy et al., 2020).
    Scaffold,
    /// FedNova (Wang et al., 2020).
    FedNova,
    /// FedAdagrad (Reddi et al., 2021).
    FedAdagrad,
    /// FedAdam (Reddi et al., 2021).
    FedAdam,
    /// FedYogi (Reddi et al., 2021).
    FedYogi,
    /// q-FedAvg (Li et al., 2020): fair resource allocation across nodes.
    QFedAvg,
}

impl StrategyName {
    /// Every strategy, in the order help texts list them.
    pub const ALL: [StrategyName; 9] = [
        Self::FedAvg,
        Self::FedAvgM,
        Self::FedProx,
        Self::Scaffold,
        Self::FedNova,
        Self::FedAdagrad,
        Self::FedAdam,
        Self::FedYogi,
        Self::QFedAvg,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedAvgM => "fedavgm",
            Self::FedProx => "fedprox",
            Self::Scaffold => "scaffold",
            Self::FedNova => "fednova",
            Self::FedAdagrad => "fedadagrad",
            Self::FedAdam => "fedadam",
            Self::FedYogi => "fedyogi",
            Self::QFedAvg => "qfedavg",
        }
    }

    /// The server learning rate used when the run does not set one: 1 for the SGD family
    /// (FedAvg applies the mean delta as is; q-FedAvg's step is sized by its own `L`), 0.01
    /// for the adaptive optimizers.
    pub fn default_server_lr(self) -> f64 {
        match self {
            Self::FedAvg
            | Self::FedAvgM
            | Self::FedProx
            | Self::Scaffold
            | Self::FedNova
            | Self::QFedAvg => 1.0,
            Self::FedAdagrad | Self::FedAdam | Self::FedYogi => 0.01,
        }
    }
}

impl FromStr for StrategyName {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == lower)
            .ok_or_else(|| CoreError::UnknownStrategy(s.to_string()))
    }
}

impl fmt::Display for StrategyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Strategy hyper-parameters; each strategy reads the ones it uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StrategyParams {
    /// FedProx proximal weight.
    pub mu: f64,
    /// Server learning rate (eta); `None` takes the strategy's default.
    pub server_lr: Option<f64>,
    /// FedAvgM momentum.
    pub server_momentum: f64,
    /// Adaptive optimizers' first-moment decay.
    pub beta1: f64,
    /// Adaptive optimizers' second-moment decay.
    pub beta2: f64,
    /// Adaptive optimizers' adaptivity floor.
    pub tau: f64,
    /// q-FedAvg's fairness exponent (0 is the uniform mean).
    pub q: f64,
    /// q-FedAvg's step size `1 / L`.
    pub q_lr: f64,
}

impl Default for StrategyParams {
    /// Reddi et al.'s suggested starting point (b1 0.9, b2 0.99, tau 1e-3), FedAvgM
    /// momentum 0.9, FedProx mu 0.01 (from NIID-Bench's grid), and q-FedAvg's q 1 and step
    /// size 1 (the best of docs/benchmarks/fairness.md's grid; Flower's 0.2 and 0.1 slowed
    /// training there).
    fn default() -> Self {
        Self {
            mu: 0.01,
            server_lr: None,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            q: 1.0,
            q_lr: 1.0,
        }
    }
}

/// A strategy: client procedure + aggregation rule + server optimizer.
pub struct Strategy {
    /// The name the run was configured with.
    pub name: StrategyName,
    /// What nodes do locally.
    pub client: ClientProcedure,
    /// How updates are combined.
    pub aggregation: AggregationRule,
    /// How the combination moves the global model (holds the strategy's server state).
    pub optimizer: Box<dyn ServerOptimizer>,
    /// Differential privacy: when set, the round's sum is clipped and noised
    /// ([`crate::privacy`]) in place of the aggregation rule.
    pub privacy: Option<Privacy>,
    /// Norm bounding: every update is clipped to this L2 norm before the aggregation rule.
    pub norm_bound: Option<f64>,
}

impl Strategy {
    /// Builds the named strategy for a federation of `fleet_size` nodes.
    pub fn new(name: StrategyName, params: &StrategyParams, fleet_size: usize) -> Self {
        let lr = params.server_lr.unwrap_or(name.default_server_lr()) as f32;
        let adaptive = |rule| -> Box<dyn ServerOptimizer> {
            Box::new(AdaptiveServer::new(
                rule,
                AdaptiveParams {
                    lr,
                    beta1: params.beta1 as f32,
                    beta2: params.beta2 as f32,
                    tau: params.tau as f32,
                },
            ))
        };
        let sgd = |momentum: f64| -> Box<dyn ServerOptimizer> {
            Box::new(ServerSgd::new(lr, momentum as f32))
        };
        let by_examples = AggregationRule::WeightedMean(Weighting::Examples);
        let (client, aggregation, optimizer) = match name {
            StrategyName::FedAvg => (ClientProcedure::LocalSgd, by_examples, sgd(0.0)),
            StrategyName::FedAvgM => (
                ClientProcedure::LocalSgd,
                by_examples,
                sgd(params.server_momentum),
            ),
            StrategyName::FedProx => (
                ClientProcedure::Proximal { mu: params.mu },
                by_examples,
                sgd(0.0),
            ),
            StrategyName::Scaffold => (
                ClientProcedure::Scaffold,
                AggregationRule::WeightedMean(Weighting::Uniform),
                Box::new(ScaffoldServer::new(lr, fleet_size)) as Box<dyn ServerOptimizer>,
            ),
            StrategyName::FedNova => (
                ClientProcedure::Normalized,
                AggregationRule::WeightedMean(Weighting::Normalized),
                sgd(0.0),
            ),
            StrategyName::FedAdagrad => (
                ClientProcedure::LocalSgd,
                by_examples,
                adaptive(AdaptiveRule::Adagrad),
            ),
            StrategyName::FedAdam => (
                ClientProcedure::LocalSgd,
                by_examples,
                adaptive(AdaptiveRule::Adam),
            ),
            StrategyName::FedYogi => (
                ClientProcedure::LocalSgd,
                by_examples,
                adaptive(AdaptiveRule::Yogi),
            ),
            StrategyName::QFedAvg => (
                ClientProcedure::LossReporting,
                AggregationRule::Fair(FairParams {
                    q: params.q,
                    lipschitz: 1.0 / params.q_lr,
                }),
                sgd(0.0),
            ),
        };
        Self {
            name,
            client,
            aggregation,
            optimizer,
            privacy: None,
            norm_bound: None,
        }
    }

    /// A fresh aggregator for one round: the aggregation rule, behind the norm bound if any.
    pub fn start_aggregator(&self, dim: usize) -> Box<dyn Aggregator> {
        let rule = self.aggregation.start(dim);
        match self.norm_bound {
            Some(bound) => Box::new(NormBounded::new(rule, bound)),
            None => rule,
        }
    }

    /// How a relay may fold this strategy's updates before sending them on: the weighting of
    /// its linear rule, or `None` when the server needs each update (a robust rule, a norm
    /// bound, central differential privacy clipping each update).
    pub fn relay_fold(&self) -> Option<Weighting> {
        if let Some(privacy) = &self.privacy {
            return (privacy.settings().placement == crate::privacy::Placement::Distributed)
                .then_some(Weighting::Uniform);
        }
        match (&self.aggregation, self.norm_bound) {
            (AggregationRule::WeightedMean(weighting), None) => Some(*weighting),
            _ => None,
        }
    }

    /// Replaces the weighted mean by a robust rule (Krum + FedAdam is as valid as Krum +
    /// FedAvg). Strategies whose server step needs more than a mean delta are refused.
    pub fn with_robust_rule(mut self, rule: RobustRule) -> Result<Self, CoreError> {
        if self.aggregation != AggregationRule::WeightedMean(Weighting::Examples) {
            return Err(CoreError::Robust(format!(
                "{} cannot use --aggregator {rule}: its server step needs every update's \
                 extras; use fedavg, fedavgm, fedprox, fedadagrad, fedadam or fedyogi",
                self.name
            )));
        }
        if self.privacy.is_some() {
            return Err(privacy_and_robust(rule));
        }
        self.aggregation = AggregationRule::Robust(rule);
        Ok(self)
    }

    /// Clips every update to L2 norm `bound` before aggregating.
    pub fn with_norm_bound(mut self, bound: f64) -> Result<Self, CoreError> {
        if !(bound.is_finite() && bound > 0.0) {
            return Err(CoreError::Robust(format!(
                "--norm-bound must be a positive number, got {bound}"
            )));
        }
        if self.privacy.is_some() {
            return Err(CoreError::Robust(
                "--norm-bound is redundant with differential privacy, which clips every \
                 update to --dp-clip; drop one"
                    .into(),
            ));
        }
        self.norm_bound = Some(bound);
        Ok(self)
    }

    /// Adds differential privacy. Only strategies that average plain deltas can be privatised:
    /// SCAFFOLD's control variates and FedNova's step-normalised weights would leave the
    /// noise's sensitivity bound.
    pub fn with_privacy(mut self, privacy: Privacy) -> Result<Self, CoreError> {
        if let AggregationRule::Robust(rule) = self.aggregation {
            return Err(privacy_and_robust(rule));
        }
        if self.aggregation != AggregationRule::WeightedMean(Weighting::Examples) {
            return Err(CoreError::Privacy(format!(
                "{} cannot run with differential privacy: its updates carry more than a \
                 clipped delta; use fedavg, fedavgm, fedprox, fedadagrad, fedadam or fedyogi",
                self.name
            )));
        }
        self.privacy = Some(privacy);
        Ok(self)
    }
}

fn privacy_and_robust(rule: RobustRule) -> CoreError {
    CoreError::Robust(format!(
        "--aggregator {rule} needs each update, but differential privacy releases only their \
         noisy sum; use one or the other"
    ))
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Strategy")
            .field("name", &self.name)
            .field("client", &self.client)
            .field("aggregation", &self.aggregation)
            .field("privacy", &self.privacy)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_unknown_ones_are_listed() {
        assert_eq!(
            "FedAvg".parse::<StrategyName>().ok(),
            Some(StrategyName::FedAvg)
        );
        let err = "fedsgd".parse::<StrategyName>().expect_err("unknown");
        assert!(err.to_string().contains("fedavg"), "{err}");
    }

    #[test]
    fn fedavg_is_weighted_mean_plus_unit_server_sgd() {
        let strategy = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 10);
        assert_eq!(
            strategy.aggregation,
            AggregationRule::WeightedMean(Weighting::Examples)
        );
        assert_eq!(strategy.optimizer.state_bytes(), 0);
        assert_eq!(strategy.name.to_string(), "fedavg");
    }

    #[test]
    fn fednova_normalizer_matches_hand_values() {
        assert_eq!(fednova_normalizer(7, 0.0), 7.0);
        // rho 0.5, tau 2: [2 - 0.5 * 0.75 / 0.5] / 0.5 = (2 - 0.75) * 2 = 2.5
        assert!((fednova_normalizer(2, 0.5) - 2.5).abs() < 1e-12);
        // One step is one step whatever the momentum.
        assert!((fednova_normalizer(1, 0.9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn privacy_is_refused_for_strategies_with_extras() {
        use crate::privacy::{ClipRule, DpSettings, Placement, noise::NoiseSeed};
        let privacy = Privacy::new(
            DpSettings {
                noise_multiplier: 1.0,
                clip: ClipRule::Fixed(1.0),
                per_layer: false,
                delta: 1e-5,
                placement: Placement::Central,
                epsilon_budget: None,
                sampling_rate: 0.1,
            },
            NoiseSeed::Run(0),
        )
        .expect("valid");
        let params = StrategyParams::default();
        for name in [StrategyName::Scaffold, StrategyName::FedNova] {
            let err = Strategy::new(name, &params, 10)
                .with_privacy(privacy.clone())
                .expect_err("refused");
            assert!(err.to_string().contains(&name.to_string()), "{err}");
        }
        let fedadam = Strategy::new(StrategyName::FedAdam, &params, 10)
            .with_privacy(privacy)
            .expect("fedadam composes with DP");
        assert!(fedadam.privacy.is_some());
    }

    #[test]
    fn every_name_round_trips_through_text() {
        for name in StrategyName::ALL {
            assert_eq!(name.to_string().parse::<StrategyName>().ok(), Some(name));
        }
    }
}
