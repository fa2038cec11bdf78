//! What the dashboard shows, and the trait each kind of run implements to supply it: a
//! deployment's coordinator, a simulation in progress, or finished runs' output folders.

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;

/// Why the dashboard could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The run asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid (a bad token name, an action the run cannot take).
    #[error("{0}")]
    Invalid(String),
    /// The run's data could not be read.
    #[error("{0}")]
    Unavailable(String),
}

/// One run as the pages draw it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// `deployment`, `simulation` or `finished`.
    pub kind: &'static str,
    /// A short name for the run (its id or its folder).
    pub title: String,
    /// The run's history document, shaped like `history.json`: `config`, `rounds` (one
    /// record per committed round), `final` and `failed_rounds`.
    pub history: serde_json::Value,
    /// Where a running run stands (phase, round, online nodes, ...); `null` for a finished
    /// run read from its folder.
    pub live: serde_json::Value,
    /// The nodes the run knows, with their connectivity where it is known.
    pub nodes: Vec<NodeView>,
    /// Whether operator actions (tokens, stopping) exist for this run.
    pub actions: bool,
    /// Finished-run browsing: every run that can be chosen or compared.
    pub runs: Vec<String>,
}

/// A node, as the nodes page lists it; the page joins it with the rounds' records.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// The identifier the round records use.
    pub id: String,
    /// The name an operator gave it (its enrolment token's name).
    pub name: String,
    /// Whether it was heard from recently; `None` where connectivity does not apply
    /// (virtual nodes, finished runs).
    pub online: Option<bool>,
    /// Seconds since it was last heard from, while online.
    pub last_seen_s: Option<f64>,
    /// Whether its credential was revoked.
    pub revoked: bool,
    /// Whether it is an aggregation relay rather than a node that trains.
    pub relay: bool,
    /// The relay the node joined through, if any.
    pub via: Option<String>,
}

impl NodeView {
    /// A node known only by its identifier (a virtual node, or one a finished run's records
    /// name): its name is the identifier and its connectivity does not apply.
    pub fn named(id: String) -> Self {
        Self {
            name: id.clone(),
            id,
            online: None,
            last_seen_s: None,
            revoked: false,
            relay: false,
            via: None,
        }
    }
}

/// An enrolment token, as the operator page lists it (never the secret itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    /// The name nodes enrolled with it take.
    pub name: String,
    /// Whether a node has enrolled with it.
    pub used: bool,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// One run's accuracy per round, for the comparison chart.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyCurve {
    /// The run's name.
    pub name: String,
    /// `(round, accuracy)`: central accuracy, or federated where the run has no test set.
    pub points: Vec<(u32, f64)>,
}

/// A run the dashboard can show. Implementations are cheap to ask often: the pages ask again
/// after every change they are told of, and at least every two seconds.
pub trait Source: Send + Sync + 'static {
    /// The run named `run` (finished-run browsing), or the run (`None`).
    fn view(&self, run: Option<String>) -> BoxFuture<'_, Result<RunView, DashboardError>>;

    /// A receiver that changes whenever the run does (a round committed, a node came online).
    fn changes(&self) -> watch::Receiver<u64>;

    /// Every run's accuracy curve, for comparison; empty where there is one run.
    fn curves(&self) -> BoxFuture<'_, Result<Vec<AccuracyCurve>, DashboardError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The operator's actions, where the run has them.
    fn operator(&self) -> Option<&dyn Operator> {
        None
    }
}

/// What an operator may do from the dashboard (behind the admin token).
pub trait Operator: Send + Sync {
    /// The enrolment tokens.
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<TokenView>, DashboardError>>;
    /// Creates a one-time enrolment token named `name` and returns its secret (shown once).
    fn create_token(&self, name: String) -> BoxFuture<'_, Result<String, DashboardError>>;
    /// Revokes the token `name` and the nodes enrolled with it; false if there is none.
    fn revoke_token(&self, name: String) -> BoxFuture<'_, Result<bool, DashboardError>>;
    /// Ends the run once the current round has committed (at once if none is open).
    fn stop_after_round(&self) -> BoxFuture<'_, Result<(), DashboardError>>;
}

/// The headline accuracy of each record in a history document's `rounds`: central, or
/// federated where the round was not evaluated centrally.
pub fn accuracy_points(history: &serde_json::Value) -> Vec<(u32, f64)> {
    let Some(rounds) = history.get("rounds").and_then(|r| r.as_array()) else {
        return Vec::new();
    };
    rounds
        .iter()
        .filter_map(|record| {
            let round = record.get("round")?.as_u64()? as u32;
            let accuracy = record
                .get("accuracy")
                .and_then(|a| a.as_f64())
                .or_else(|| {
                    record
                        .get("federated")
                        .and_then(|f| f.get("accuracy"))
                        .and_then(|a| a.as_f64())
                })?;
            Some((round, accuracy))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_points_fall_back_to_the_federated_figure_and_skip_unscored_rounds() {
        let history = serde_json::json!({"rounds": [
            {"round": 1, "accuracy": 0.5},
            {"round": 2, "accuracy": null, "federated": {"accuracy": 0.6}},
            {"round": 3, "accuracy": null},
        ]});
        assert_eq!(accuracy_points(&history), vec![(1, 0.5), (2, 0.6)]);
        assert!(accuracy_points(&serde_json::json!({})).is_empty());
    }
}
