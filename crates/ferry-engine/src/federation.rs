//! The round loop.

use std::sync::Arc;

use ferry_core::{
    Model, Update,
    compress::Compression,
    evaluation::{EvaluationSchedule, FederatedEvaluation},
    strategy::Strategy,
    task::LocalTraining,
};

use crate::{
    EngineError,
    devices::{Devices, Timeline},
    dispatch,
    fedbuff::{self, FedBuff},
    node::{Adversary, EvaluateTask, Evaluator, NodeError, NodeHandle, NodeId},
    record::RoundRecord,
    round::{self, AppliedRound, CohortRule, OpenRound, RoundPlan},
    secure::{self, SecureAggregation},
    selection,
};

/// How the server turns updates into new models.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Rounds: a cohort trains on the same model and the round waits for it, or, on
    /// simulated devices, until `deadline_s` simulated seconds have passed (stragglers then
    /// count as failures).
    Synchronous {
        /// Simulated seconds a round waits for its cohort; `None` waits for every node that
        /// stays online.
        deadline_s: Option<f64>,
    },
    /// Asynchronous buffered aggregation (FedBuff): nodes train whenever free, and every
    /// `buffer_size` updates make a new version.
    Buffered(FedBuff),
}

impl Default for Mode {
    /// Rounds that wait for their whole cohort.
    fn default() -> Self {
        Self::Synchronous { deadline_s: None }
    }
}

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
    /// Federated evaluation: after which rounds, and on what share of the nodes.
    pub evaluation: EvaluationSchedule,
    /// Rounds, or asynchronous versions.
    pub mode: Mode,
    /// Simulated devices: speeds, links and online windows on a simulated clock; `None`
    /// measures a run in rounds only.
    pub devices: Option<Arc<Devices>>,
    /// How updates (and, where sound, model downloads) are encoded on the wire.
    pub compress: Compression,
}

/// Hooks for showing progress; every method is called on the engine's thread.
pub trait RoundObserver {
    /// A round begins with `selected` nodes.
    fn round_started(&mut self, _round: u32, _selected: usize) {}
    /// One selected node returned (successfully or not).
    fn node_returned(&mut self, _round: u32) {}
    /// Aggregation is done; the new model is being evaluated.
    fn evaluating(&mut self, _round: u32) {}
    /// Nodes asked to evaluate the round's model could not; `reasons` holds each one's.
    fn evaluation_failed(&mut self, _round: u32, _reasons: &[String]) {}
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
    /// The operator stopped a deployed run from the dashboard.
    Stopped,
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
    /// The highest accuracy any round reached (central, or federated without a test set).
    pub fn best_accuracy(&self) -> f64 {
        self.rounds
            .iter()
            .map(RoundRecord::headline_accuracy)
            .fold(0.0, f64::max)
    }
}

/// A federated run: a strategy, a fleet of nodes, an evaluator and the global model.
pub struct Federation {
    pub(crate) settings: RunSettings,
    pub(crate) strategy: Strategy,
    pub(crate) nodes: Vec<Arc<dyn NodeHandle>>,
    evaluator: Box<dyn Evaluator>,
    pub(crate) global: Arc<Model>,
    adversary: Option<Box<dyn Adversary>>,
    /// The simulated clock, with simulated devices.
    clock: f64,
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
        if let Some(devices) = &settings.devices
            && devices.len() != nodes.len()
        {
            return Err(EngineError::Settings(format!(
                "the simulated devices describe {} nodes but the run has {}",
                devices.len(),
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
            global: Arc::new(initial),
            adversary: None,
            clock: 0.0,
        })
    }

    /// Lets `adversary` rewrite its nodes' updates each round (attack simulation). The round
    /// then holds every update until the adversary has seen them all.
    pub fn with_adversary(mut self, adversary: Box<dyn Adversary>) -> Self {
        self.adversary = Some(adversary);
        self
    }

    /// Runs rounds (or asynchronous versions) until the limit or the target accuracy.
    pub fn run(mut self, observer: &mut dyn RoundObserver) -> Result<RunOutcome, EngineError> {
        if let Mode::Buffered(buffer) = self.settings.mode.clone() {
            if self.adversary.is_some() {
                return Err(EngineError::Settings(
                    "model-poisoning attacks rewrite a round's updates together; asynchronous \
                     aggregation has no round, so simulate them in synchronous mode (label-flip \
                     and backdoor attacks work in both)"
                        .into(),
                ));
            }
            return fedbuff::run(self, &buffer, observer);
        }
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
            if self.keep(record, observer, &mut rounds) {
                stop = StopReason::TargetReached;
                break;
            }
        }
        Ok(RunOutcome {
            rounds,
            model: Arc::unwrap_or_clone(self.global),
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
        let available = self.available_nodes()?;
        let mut plan = round::plan(round, &rule, &self.strategy, &self.global, available.len())?
            .compressed(self.settings.compress);
        for position in &mut plan.selected {
            *position = available[*position];
        }
        observer.round_started(round, plan.selected.len());
        let mut open = OpenRound::new(&plan, &self.strategy);
        let (plan, ended) = self.on_the_clock(plan, &mut open, observer);
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
        // The plan shared the global model with the nodes; with it gone the model is stepped
        // in place.
        drop(plan);
        let applied = open.apply(&mut self.strategy, Arc::make_mut(&mut self.global))?;
        let mut record = self.record(applied, round, observer)?;
        record.sim_time_s = ended;
        Ok(record)
    }

    /// The nodes a round may select: all of them, or on simulated devices those online
    /// once at least `min_clients` are (the clock waits until then).
    fn available_nodes(&mut self) -> Result<Vec<usize>, EngineError> {
        let Some(devices) = &self.settings.devices else {
            return Ok((0..self.nodes.len()).collect());
        };
        let wanted = self.settings.min_clients.max(1);
        self.clock = devices.when_online(wanted, self.clock).ok_or_else(|| {
            EngineError::Settings(format!(
                "fewer than {wanted} nodes are ever online together again after {:.0} simulated \
                 seconds; lower min-clients or give the devices longer online windows",
                self.clock
            ))
        })?;
        Ok(devices.online_at(self.clock))
    }

    /// On simulated devices: the cohort members that deliver in time, the others counted
    /// as failures in `open`, and the simulated moment the round ends (the clock moves
    /// there). Without devices the plan is unchanged.
    fn on_the_clock(
        &mut self,
        mut plan: RoundPlan,
        open: &mut OpenRound,
        observer: &mut dyn RoundObserver,
    ) -> (RoundPlan, Option<f64>) {
        let Some(devices) = self.settings.devices.clone() else {
            return (plan, None);
        };
        let deadline = match self.settings.mode {
            Mode::Synchronous {
                deadline_s: Some(d),
            } => self.clock + d,
            _ => f64::INFINITY,
        };
        let (down, up) = round::transfer_bytes(&plan.task);
        let mut ended = self.clock;
        let mut delivering = Vec::with_capacity(plan.selected.len());
        for &node in &plan.selected {
            let steps = self.nodes[node].steps(&plan.task.training);
            let timeline = devices.timeline(node, self.clock, steps, down, up);
            let id = self.nodes[node].id().to_string();
            match lost(&timeline, deadline) {
                Some((at, reason)) => {
                    ended = ended.max(at);
                    open.fail(&id, reason);
                    observer.node_returned(plan.task.round);
                }
                None => {
                    ended = ended.max(timeline.done_at);
                    delivering.push(node);
                }
            }
        }
        plan.selected = delivering;
        self.clock = ended;
        (plan, Some(ended))
    }

    /// Shows `record` and adds it to `records`; says whether it reached the target accuracy.
    pub(crate) fn keep(
        &self,
        record: RoundRecord,
        observer: &mut dyn RoundObserver,
        records: &mut Vec<RoundRecord>,
    ) -> bool {
        observer.round_finished(&record);
        let reached = self
            .settings
            .target_accuracy
            .is_some_and(|target| record.reached(target));
        records.push(record);
        reached
    }

    /// Evaluates the model `applied` produced and writes the round (or version) down.
    pub(crate) fn record(
        &mut self,
        applied: AppliedRound,
        round: u32,
        observer: &mut dyn RoundObserver,
    ) -> Result<RoundRecord, EngineError> {
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
        if self.settings.evaluation.due(round, self.settings.rounds) {
            let (federated, failures) = self.evaluate_federated(round);
            if !failures.is_empty() {
                observer.evaluation_failed(round, &failures);
            }
            record.federated = federated;
        }
        Ok(record)
    }

    /// Asks a seeded share of the nodes to score the global model on their held-out data;
    /// a node that fails counts in the result's failures, and its reason is returned.
    fn evaluate_federated(&self, round: u32) -> (Option<FederatedEvaluation>, Vec<String>) {
        let (chosen, seed) = selection::evaluators(
            self.nodes.len(),
            &self.settings.evaluation,
            self.settings.seed,
            round,
        );
        let task = EvaluateTask {
            round,
            model: self.global.clone(),
            seed,
        };
        let nodes = &self.nodes;
        let mut results = Vec::with_capacity(chosen.len());
        let mut failures = Vec::new();
        dispatch::run_ordered(
            chosen.len(),
            self.settings.parallelism,
            |i| {
                let node = &nodes[chosen[i]];
                node.evaluate(&task).and_then(|e| {
                    e.validate().map(|()| e).map_err(|reason| NodeError {
                        node: node.id(),
                        reason,
                    })
                })
            },
            |_| {},
            |i, result| match result {
                Ok(evaluation) => results.push((nodes[chosen[i]].id().to_string(), evaluation)),
                Err(e) => failures.push(e.to_string()),
            },
        );
        (
            FederatedEvaluation::combine_named(&results, failures.len()),
            failures,
        )
    }
}

/// When and why a task on `timeline` fails to deliver by `deadline`, if it does.
fn lost(timeline: &Timeline, deadline: f64) -> Option<(f64, String)> {
    match timeline.lost_at {
        Some(at) if at < deadline => Some((
            at,
            format!("went offline at {at:.0} simulated seconds, before its update arrived"),
        )),
        _ if timeline.done_at > deadline => Some((
            deadline,
            format!("still working at the round deadline ({deadline:.0} simulated seconds)"),
        )),
        _ => None,
    }
}

/// Folds one node's result into the round: a refused update or a failure is counted in the
/// round's failures, and the round goes on.
pub(crate) fn fold(open: &mut OpenRound, node: NodeId, result: Result<Update, NodeError>) {
    match result {
        Ok(update) => open.accept(&node.to_string(), &update).unwrap_or(()),
        Err(e) => open.fail(&e.node.to_string(), e.reason),
    }
}
