//! The round loop.

use std::sync::Arc;

use ferry_core::{Model, Update, strategy::Strategy, task::LocalTraining};

use crate::{
    EngineError, dispatch,
    node::{Adversary, Evaluator, NodeError, NodeHandle, NodeId},
    record::RoundRecord,
    round::{self, CohortRule, OpenRound},
    secure::{self, SecureAggregation},
};

/// How a run proceeds.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// Rounds to run at most.
    pub rounds: u32,
    /// Fraction of the nodes selected each round, in `(0, 1]`.
    pub fraction: f64,
    /// Fewest nodes a round may select.
    pub min_clients: usize,
    /// Stop as soon as the global model reaches this test accuracy.
    pub target_accuracy: Option<f64>,
    /// Local training settings sent to nodes.
    pub training: LocalTraining,
    /// Seed for node selection and the nodes' own randomness.
    pub seed: u64,
    /// Nodes trained at the same time (in-process nodes: threads).
    pub parallelism: usize,
    /// Secure aggregation: the server sees only the sum of the round's updates.
    pub secure: Option<SecureAggregation>,
}

/// Hooks for showing progress; every method is called on the engine's thread.
pub trait RoundObserver {
    /// A round begins with `selected` nodes.
    fn round_started(&mut self, _round: u32, _selected: usize) {}
    /// One selected node returned (successfully or not).
    fn node_returned(&mut self, _round: u32) {}
    /// Aggregation is done; the new model is being evaluated.
    fn evaluating(&mut self, _round: u32) {}
    /// A round is complete.
    fn round_finished(&mut self, _record: &RoundRecord) {}
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All configured rounds ran.
    RoundsCompleted,
    /// The target accuracy was reached.
    TargetReached,
    /// The next round would have spent more privacy than the run's epsilon budget.
    BudgetExhausted,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// One record per round run.
    pub rounds: Vec<RoundRecord>,
    /// The final global model.
    pub model: Model,
    /// Why the run stopped.
    pub stop: StopReason,
}

impl RunOutcome {
    /// The highest test accuracy any round reached.
    pub fn best_accuracy(&self) -> f64 {
        self.rounds.iter().map(|r| r.accuracy).fold(0.0, f64::max)
    }
}

/// A federated run: a strategy, a fleet of nodes, an evaluator and the global model.
pub struct Federation {
    settings: RunSettings,
    strategy: Strategy,
    nodes: Vec<Arc<dyn NodeHandle>>,
    evaluator: Box<dyn Evaluator>,
    global: Model,
    adversary: Option<Box<dyn Adversary>>,
}

impl Federation {
    /// Checks the settings against the fleet and prepares the run.
    pub fn new(
        settings: RunSettings,
        strategy: Strategy,
        nodes: Vec<Arc<dyn NodeHandle>>,
        evaluator: Box<dyn Evaluator>,
        initial: Model,
    ) -> Result<Self, EngineError> {
        if nodes.is_empty() {
            return Err(EngineError::Settings("the run has no nodes".into()));
        }
        if !(settings.fraction > 0.0 && settings.fraction <= 1.0) {
            return Err(EngineError::Settings(format!(
                "fraction must be in (0, 1], got {}",
                settings.fraction
            )));
        }
        if settings.min_clients > nodes.len() {
            return Err(EngineError::Settings(format!(
                "min-clients is {} but there are only {} nodes",
                settings.min_clients,
                nodes.len()
            )));
        }
        if let Some(privacy) = &strategy.privacy {
            // Settings that only fail once a round is planned (adaptive clipping's count noise)
            // are refused now.
            privacy.plan_round(1, nodes.len())?;
            privacy.check_first_round_fits_budget()?;
        }
        Ok(Self {
            settings,
            strategy,
            nodes,
            evaluator,
            global: initial,
            adversary: None,
        })
    }

    /// Lets `adversary` rewrite its nodes' updates each round (attack simulation). The round
    /// then holds every update until the adversary has seen them all.
    pub fn with_adversary(mut self, adversary: Box<dyn Adversary>) -> Self {
        self.adversary = Some(adversary);
        self
    }

    /// Runs rounds until the round limit or the target accuracy.
    pub fn run(mut self, observer: &mut dyn RoundObserver) -> Result<RunOutcome, EngineError> {
        if self.settings.secure.is_some() && self.adversary.is_some() {
            return Err(EngineError::Settings(
                "model-poisoning attacks rewrite updates that secure aggregation hides from the \
                 server; simulate them without --secagg (label-flip and backdoor attacks work)"
                    .into(),
            ));
        }
        let mut rounds = Vec::new();
        let mut stop = StopReason::RoundsCompleted;
        for round in 1..=self.settings.rounds {
            if let Some(privacy) = &self.strategy.privacy
                && privacy.next_round_exceeds_budget().is_some()
            {
                stop = StopReason::BudgetExhausted;
                break;
            }
            let record = self.run_round(round, observer)?;
            observer.round_finished(&record);
            let reached = self
                .settings
                .target_accuracy
                .is_some_and(|target| record.accuracy >= target);
            rounds.push(record);
            if reached {
                stop = StopReason::TargetReached;
                break;
            }
        }
        Ok(RunOutcome {
            rounds,
            model: self.global,
            stop,
        })
    }

    fn run_round(
        &mut self,
        round: u32,
        observer: &mut dyn RoundObserver,
    ) -> Result<RoundRecord, EngineError> {
        let rule = CohortRule {
            fraction: self.settings.fraction,
            min_clients: self.settings.min_clients,
            seed: self.settings.seed,
            training: self.settings.training.clone(),
        };
        let plan = round::plan(round, &rule, &self.strategy, &self.global, self.nodes.len())?;
        observer.round_started(round, plan.selected.len());
        let mut open = OpenRound::new(&plan, &self.strategy);
        let node_id = |i: usize| self.nodes[plan.selected[i]].id();
        let train = |i: usize| self.nodes[plan.selected[i]].train(&plan.task);
        match (&self.settings.secure, &self.adversary) {
            (Some(secure), _) => secure::run_round(
                secure,
                &plan,
                &self.nodes,
                self.settings.parallelism,
                &mut open,
                || observer.node_returned(round),
            ),
            (None, None) => dispatch::run_ordered(
                plan.selected.len(),
                self.settings.parallelism,
                train,
                |_| observer.node_returned(round),
                |i, result| fold(&mut open, node_id(i), result),
            ),
            (None, Some(adversary)) => {
                let mut results = Vec::with_capacity(plan.selected.len());
                dispatch::run_ordered(
                    plan.selected.len(),
                    self.settings.parallelism,
                    train,
                    |_| observer.node_returned(round),
                    |i, result| results.push((node_id(i), result)),
                );
                let mut updates: Vec<(NodeId, Update)> = Vec::new();
                let mut failed = Vec::new();
                for (id, result) in results {
                    match result {
                        Ok(update) => updates.push((id, update)),
                        Err(e) => failed.push((id, Err(e))),
                    }
                }
                adversary.tamper(round, &mut updates);
                for (id, update) in updates {
                    fold(&mut open, id, Ok(update));
                }
                for (id, result) in failed {
                    fold(&mut open, id, result);
                }
            }
        }
        let applied = open.apply(&mut self.strategy, &mut self.global)?;
        observer.evaluating(round);
        let evaluation = self
            .evaluator
            .evaluate(&self.global)
            .map_err(EngineError::Evaluation)?;
        let mut record = applied.record(evaluation);
        record.attack_success_rate = self
            .evaluator
            .attack_success_rate(&self.global)
            .map_err(EngineError::Evaluation)?;
        Ok(record)
    }
}

/// Folds one node's result into the round: a refused update or a failure is counted in the
/// round's failures, and the round goes on.
fn fold(open: &mut OpenRound, node: NodeId, result: Result<Update, NodeError>) {
    match result {
        Ok(update) => open.accept(&node.to_string(), &update).unwrap_or(()),
        Err(e) => open.fail(e.to_string()),
    }
}
