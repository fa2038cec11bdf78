//! A federated strategy as a composition: what nodes do locally, how the server combines their
//! updates, and how the combination moves the global model.
//!
//! New strategies add a client procedure, an aggregation rule or a server optimizer and name
//! the combination here; none is a modified copy of FedAvg.

use std::{fmt, str::FromStr};

use crate::{
    CoreError,
    aggregate::{Aggregator, WeightedMean},
    server_opt::{ServerOptimizer, ServerSgd},
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
}

impl FromStr for StrategyName {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fedavg" => Ok(Self::FedAvg),
            _ => Err(CoreError::UnknownStrategy(s.to_string())),
        }
    }
}

impl fmt::Display for StrategyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FedAvg => "fedavg",
        })
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
    /// Builds the named strategy with its standard components.
    pub fn new(name: StrategyName) -> Self {
        match name {
            StrategyName::FedAvg => Self {
                name,
                client: ClientProcedure::LocalSgd,
                aggregation: AggregationRule::WeightedMean,
                optimizer: Box::new(ServerSgd::new(1.0)),
            },
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
        let strategy = Strategy::new(StrategyName::FedAvg);
        assert_eq!(strategy.aggregation, AggregationRule::WeightedMean);
        assert_eq!(strategy.optimizer.state_bytes(), 0);
        assert_eq!(strategy.name.to_string(), "fedavg");
    }
}
