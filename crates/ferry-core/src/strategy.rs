//! A federated strategy as a composition: what nodes do locally, how the server combines their
//! updates, and how the combination moves the global model.
//!
//! New strategies add a client procedure, an aggregation rule or a server optimizer and name
//! the combination here; none is a modified copy of FedAvg.

use std::{fmt, str::FromStr};

use crate::{
    CoreError,
    aggregate::{Aggregator, WeightedMean},
    server_opt::{AdaptiveParams, AdaptiveRule, AdaptiveServer, ServerOptimizer, ServerSgd},
};

/// What a node does with the global model in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProcedure {
    /// Local SGD on the node's data, starting from the global model.
    LocalSgd,
}

/// How the server combines the round's updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregationRule {
    /// Mean weighted by `num_examples` (streaming).
    WeightedMean,
}

impl AggregationRule {
    /// A fresh aggregator for one round over a model of `dim` parameters.
    pub fn start(self, dim: usize) -> Box<dyn Aggregator> {
        match self {
            Self::WeightedMean => Box::new(WeightedMean::new(dim)),
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
    /// FedAdagrad (Reddi et al., 2021).
    FedAdagrad,
    /// FedAdam (Reddi et al., 2021).
    FedAdam,
    /// FedYogi (Reddi et al., 2021).
    FedYogi,
}

impl StrategyName {
    /// Every strategy, in the order help texts list them.
    pub const ALL: [StrategyName; 5] = [
        Self::FedAvg,
        Self::FedAvgM,
        Self::FedAdagrad,
        Self::FedAdam,
        Self::FedYogi,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedAvgM => "fedavgm",
            Self::FedAdagrad => "fedadagrad",
            Self::FedAdam => "fedadam",
            Self::FedYogi => "fedyogi",
        }
    }

    /// The server learning rate used when the run does not set one: 1 for the SGD family
    /// (FedAvg applies the mean delta as is), 0.01 for the adaptive optimizers.
    pub fn default_server_lr(self) -> f64 {
        match self {
            Self::FedAvg | Self::FedAvgM => 1.0,
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

/// Server-side hyper-parameters; each strategy reads the ones it uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ServerParams {
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
}

impl Default for ServerParams {
    /// Reddi et al.'s suggested starting point (b1 0.9, b2 0.99, tau 1e-3) and FedAvgM
    /// momentum 0.9.
    fn default() -> Self {
        Self {
            server_lr: None,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
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
}

impl Strategy {
    /// Builds the named strategy from its components.
    pub fn new(name: StrategyName, params: &ServerParams) -> Self {
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
        let optimizer: Box<dyn ServerOptimizer> = match name {
            StrategyName::FedAvg => Box::new(ServerSgd::new(lr, 0.0)),
            StrategyName::FedAvgM => Box::new(ServerSgd::new(lr, params.server_momentum as f32)),
            StrategyName::FedAdagrad => adaptive(AdaptiveRule::Adagrad),
            StrategyName::FedAdam => adaptive(AdaptiveRule::Adam),
            StrategyName::FedYogi => adaptive(AdaptiveRule::Yogi),
        };
        Self {
            name,
            client: ClientProcedure::LocalSgd,
            aggregation: AggregationRule::WeightedMean,
            optimizer,
        }
    }
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Strategy")
            .field("name", &self.name)
            .field("client", &self.client)
            .field("aggregation", &self.aggregation)
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
        let strategy = Strategy::new(StrategyName::FedAvg, &ServerParams::default());
        assert_eq!(strategy.aggregation, AggregationRule::WeightedMean);
        assert_eq!(strategy.optimizer.state_bytes(), 0);
        assert_eq!(strategy.name.to_string(), "fedavg");
    }

    #[test]
    fn every_name_round_trips_through_text() {
        for name in StrategyName::ALL {
            assert_eq!(name.to_string().parse::<StrategyName>().ok(), Some(name));
        }
    }
}
