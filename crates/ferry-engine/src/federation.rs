//! The round loop.

use std::{sync::Arc, time::Instant};

use ferry_core::{Model, strategy::Strategy, task::LocalTraining};

use crate::{
    EngineError, dispatch,
    node::{Evaluator, NodeHandle, RoundTask},
    record::RoundRecord,
    selection,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All configured rounds ran.
    RoundsCompleted,
    /// The target accuracy was reached.
    TargetReached,
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

/// A federated run: a strategy, a fleet of nodes, an evaluator and the global model.
pub struct Federation {
    settings: RunSettings,
    strategy: Strategy,
    nodes: Vec<Arc<dyn NodeHandle>>,
    evaluator: Box<dyn Evaluator>,
    global: Model,
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
        Ok(Self {
            settings,
            strategy,
            nodes,
            evaluator,
            global: initial,
        })
    }

    /// Runs rounds until the round limit or the target accuracy.
    pub fn run(mut self, observer: &mut dyn RoundObserver) -> Result<RunOutcome, EngineError> {
        let mut rounds = Vec::new();
        let mut stop = StopReason::RoundsCompleted;
        for round in 1..=self.settings.rounds {
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
        let started = Instant::now();
        let round_seed = selection::mix_seed(self.settings.seed, u64::from(round));
        let count = selection::cohort_size(
            self.nodes.len(),
            self.settings.fraction,
            self.settings.min_clients,
        );
        let selected: Vec<Arc<dyn NodeHandle>> =
            selection::sample(self.nodes.len(), count, round_seed)
                .into_iter()
                .map(|i| self.nodes[i].clone())
                .collect();
        observer.round_started(round, selected.len());
        let task = RoundTask {
            round,
            model: Arc::new(self.global.clone()),
            training: self.settings.training.clone(),
            procedure: self.strategy.client,
            seed: round_seed,
            server_control: self.strategy.optimizer.broadcast(),
        };
        // Every selected node receives the model and whatever the strategy broadcasts.
        let downloaded_values =
            self.global.num_params() + task.server_control.as_ref().map_or(0, |c| c.len());
        let mut aggregator = self.strategy.aggregation.start(self.global.num_params());
        let (mut bytes_up, mut train_loss_sum, mut failures) = (0u64, 0.0f64, Vec::new());
        dispatch::run_ordered(
            selected.len(),
            self.settings.parallelism,
            |i| selected[i].train(&task),
            |_| observer.node_returned(round),
            |_, result| match result {
                Ok(update) => {
                    bytes_up += update.payload_bytes();
                    match aggregator.accept(&update) {
                        Ok(()) => {
                            train_loss_sum +=
                                update.metrics.get("train_loss").copied().unwrap_or(0.0)
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                Err(e) => failures.push(e.to_string()),
            },
        );
        let participants = aggregator.accepted();
        if participants == 0 {
            return Err(EngineError::EmptyRound {
                round,
                selected: selected.len(),
                reasons: failures
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        let aggregate = aggregator.finish()?;
        self.strategy
            .optimizer
            .apply(self.global.values_mut(), &aggregate)?;
        observer.evaluating(round);
        let (loss, accuracy) = self
            .evaluator
            .evaluate(&self.global)
            .map_err(EngineError::Evaluation)?;
        Ok(RoundRecord {
            round,
            accuracy,
            loss,
            participants,
            failures: failures.len(),
            bytes_up,
            bytes_down: (selected.len() * downloaded_values * std::mem::size_of::<f32>()) as u64,
            wall_s: started.elapsed().as_secs_f64(),
            train_loss: train_loss_sum / participants as f64,
            strategy_state_bytes: self.strategy.optimizer.state_bytes(),
        })
    }
}
