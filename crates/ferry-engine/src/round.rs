//! One round's bookkeeping, shared by every coordinator: the simulated one in
//! [`crate::federation`] and the deployed gRPC server.
//!
//! A round is planned ([`plan`]: the cohort and the task), opened ([`OpenRound`]: updates are
//! folded into the strategy's streaming aggregator as they arrive, refusals are counted), and
//! applied ([`OpenRound::apply`]: the server optimizer moves the global model), after which the
//! caller evaluates the model and [`AppliedRound::record`] writes the round down.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_core::{
    CoreError, Model, Update,
    aggregate::{Aggregator, UpdateSource, UpdateSum},
    compress::Compression,
    privacy::{DpRoundRecord, aggregate::DpSum, round::RoundPrivacy},
    strategy::{ClientProcedure, Strategy},
    task::LocalTraining,
};

use crate::{
    EngineError,
    node::{RoundTask, Score},
    record::{NodeFailure, RoundRecord},
    selection,
};

/// How rounds choose their cohort and what they ask nodes to do.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortRule {
    /// Fraction of the available nodes selected each round, in `(0, 1]`.
    pub fraction: f64,
    /// Fewest nodes a round may select.
    pub min_clients: usize,
    /// Seed for selection and the nodes' own randomness.
    pub seed: u64,
    /// Local training settings sent to nodes.
    pub training: LocalTraining,
}

/// The cohort and task of one round.
#[derive(Debug, Clone)]
pub struct RoundPlan {
    /// Positions (in the caller's list of available nodes) of the selected nodes, ascending.
    pub selected: Vec<usize>,
    /// What every selected node receives.
    pub task: RoundTask,
    /// Differential privacy: the round's clip norm and noise.
    pub privacy: Option<RoundPrivacy>,
}

impl RoundPlan {
    /// The plan with its updates encoded by `compress`, and its model rounded as nodes
    /// receive it where the compression covers downloads (the server keeps its own
    /// full-precision model and applies the nodes' changes to it).
    pub fn compressed(mut self, compress: Compression) -> Self {
        if let Some(half) = compress.download_dtype() {
            self.task.model = Arc::new(ferry_core::download::as_downloaded(&self.task.model, half));
        }
        self.task.compress = compress;
        self
    }
}

/// Bytes one node moves for `task`: the download (the model in its own dtypes, or as the
/// task's compression sends it, and whatever the strategy broadcasts, in f32) and the upload
/// (the delta in its wire dtypes or as the compression encodes it, and SCAFFOLD's control
/// change in f32).
pub fn transfer_bytes(task: &RoundTask) -> (u64, u64) {
    let dim = task.model.num_params();
    let f32s = |n: usize| Compression::None.wire_bytes(n);
    let download = if task.compress.compresses_downloads() {
        task.compress.wire_bytes(dim)
    } else {
        task.model.layout().param_bytes()
    };
    let broadcast = task.server_control.as_ref().map_or(0, |c| f32s(c.len()));
    let control = if task.procedure == ClientProcedure::Scaffold {
        f32s(dim)
    } else {
        0
    };
    (download + broadcast, delta_bytes(task) + control)
}

/// Bytes of one update's delta for `task`.
fn delta_bytes(task: &RoundTask) -> u64 {
    match task.compress {
        Compression::None => task.model.layout().delta_bytes(),
        compress => compress.wire_bytes(task.model.num_params()),
    }
}

/// Selects the round's cohort from `available` nodes and builds its task from the current
/// global model and strategy state. Private runs sample each node independently with
/// probability `fraction` (Poisson sampling, as the accountant assumes); others take a fixed
/// `fraction` of the nodes, at least `min_clients`.
pub fn plan(
    round: u32,
    rule: &CohortRule,
    strategy: &Strategy,
    global: &Arc<Model>,
    available: usize,
) -> Result<RoundPlan, EngineError> {
    let seed = ferry_core::seed::mix_seed(rule.seed, u64::from(round));
    let privacy = strategy
        .privacy
        .as_ref()
        .map(|p| p.plan_round(round, available))
        .transpose()?;
    let selected = match &privacy {
        Some(_) => selection::poisson(available, rule.fraction, seed),
        None => {
            let count = selection::cohort_size(available, rule.fraction, rule.min_clients);
            selection::sample(available, count, seed)
        }
    };
    Ok(RoundPlan {
        selected,
        task: RoundTask {
            round,
            model: global.clone(),
            training: rule.training.clone(),
            procedure: strategy.client,
            seed,
            server_control: strategy.optimizer.broadcast(),
            privacy: privacy.as_ref().and_then(RoundPrivacy::node_instructions),
            compress: Compression::None,
        },
        privacy,
    })
}

/// A round collecting updates.
pub struct OpenRound {
    round: u32,
    started: Instant,
    selected: usize,
    downloads: usize,
    /// Bytes each download and each update's delta move (see [`transfer_bytes`]).
    download_bytes: u64,
    delta_bytes: u64,
    aggregator: Box<dyn Aggregator>,
    accepted_nodes: Vec<String>,
    accepted_examples: Vec<u64>,
    aggregating: Duration,
    privacy: Option<RoundPrivacy>,
    bytes_up: u64,
    train_loss_sum: f64,
    train_losses: usize,
    failures: Vec<NodeFailure>,
    protocol_bytes_down: u64,
    aborted: Option<String>,
}

impl OpenRound {
    /// Opens `plan`'s round with a fresh aggregator: the strategy's rule, or the noisy sum of
    /// a private run.
    pub fn new(plan: &RoundPlan, strategy: &Strategy) -> Self {
        let dim = plan.task.model.num_params();
        let aggregator: Box<dyn Aggregator> = match &plan.privacy {
            Some(privacy) => Box::new(DpSum::for_round(privacy.clone(), plan.task.model.layout())),
            None => strategy.start_aggregator(dim),
        };
        Self {
            round: plan.task.round,
            started: Instant::now(),
            selected: plan.selected.len(),
            // Every selected node receives the model and whatever the strategy broadcasts.
            downloads: plan.selected.len(),
            download_bytes: transfer_bytes(&plan.task).0,
            delta_bytes: delta_bytes(&plan.task),
            aggregator,
            accepted_nodes: Vec::new(),
            accepted_examples: Vec::new(),
            aggregating: Duration::ZERO,
            privacy: plan.privacy.clone(),
            bytes_up: 0,
            train_loss_sum: 0.0,
            train_losses: 0,
            failures: Vec::new(),
            protocol_bytes_down: 0,
            aborted: None,
        }
    }

    /// Folds `node`'s update into the round, or counts it as refused and says why.
    pub fn accept(&mut self, node: &str, update: &Update) -> Result<(), ferry_core::CoreError> {
        let started = Instant::now();
        let accepted = self.aggregator.accept(update);
        let control = update.control_delta.as_ref().map_or(0, Vec::len);
        let bytes = self.delta_bytes + Compression::None.wire_bytes(control);
        self.count(
            node,
            accepted,
            bytes,
            update.num_examples,
            &update.metrics,
            started,
        )
    }

    /// [`OpenRound::accept`] for an update read a piece at a time from `source` (an upload
    /// in its file), so that a linear rule never holds it whole. A relay's partial aggregate
    /// (sent by the relay `node`) counts each of its contributors.
    pub fn accept_source(
        &mut self,
        node: &str,
        source: &mut dyn UpdateSource,
    ) -> Result<(), ferry_core::CoreError> {
        let started = Instant::now();
        let accepted = self.aggregator.accept_source(source);
        let meta = source.meta();
        let bytes = meta.value_bytes;
        if let (Some(partial), Ok(())) = (&meta.partial, &accepted) {
            self.bytes_up += bytes;
            self.aggregating += started.elapsed();
            self.train_loss_sum += partial.train_loss_sum;
            self.train_losses += partial.train_losses;
            for (contributor, examples) in &partial.contributors {
                self.accepted_nodes.push(contributor.clone());
                self.accepted_examples.push(*examples);
            }
            return Ok(());
        }
        let (examples, metrics) = (meta.num_examples, meta.metrics.clone());
        self.count(node, accepted, bytes, examples, &metrics, started)
    }

    fn count(
        &mut self,
        node: &str,
        accepted: Result<(), ferry_core::CoreError>,
        payload_bytes: u64,
        examples: u64,
        metrics: &std::collections::BTreeMap<String, f64>,
        started: Instant,
    ) -> Result<(), ferry_core::CoreError> {
        self.bytes_up += payload_bytes;
        self.aggregating += started.elapsed();
        match accepted {
            Ok(()) => {
                self.train_loss_sum += metrics.get("train_loss").copied().unwrap_or(0.0);
                self.train_losses += 1;
                self.accepted_nodes.push(node.to_string());
                self.accepted_examples.push(examples);
                Ok(())
            }
            Err(e) => {
                self.fail(node, e.to_string());
                Err(e)
            }
        }
    }

    /// Secure aggregation: notes that `node`'s masked input is in the round, with its
    /// training loss where the node shares it (its delta reaches the aggregator only inside
    /// the unmasked sum).
    pub fn note_secure_update(&mut self, node: &str, train_loss: Option<f64>) {
        if let Some(loss) = train_loss {
            self.train_loss_sum += loss;
            self.train_losses += 1;
        }
        self.accepted_nodes.push(node.to_string());
        // Secure aggregation hides each node's examples.
        self.accepted_examples.push(0);
    }

    /// Secure aggregation: folds the round's unmasked sum into the aggregator.
    pub fn accept_sum(&mut self, sum: &UpdateSum) -> Result<(), CoreError> {
        let started = Instant::now();
        let accepted = self.aggregator.accept_sum(sum);
        self.aggregating += started.elapsed();
        accepted
    }

    /// Secure aggregation: counts the protocol's messages (keys, shares, masked inputs) in the
    /// round's traffic.
    pub fn add_protocol_bytes(&mut self, up: u64, down: u64) {
        self.bytes_up += up;
        self.protocol_bytes_down += down;
    }

    /// Secure aggregation: the protocol could not finish (too many nodes dropped), so the
    /// round ends without moving the global model and the run goes on.
    pub fn abort(&mut self, reason: String) {
        self.accepted_nodes.clear();
        self.accepted_examples.clear();
        self.train_loss_sum = 0.0;
        self.train_losses = 0;
        self.aborted = Some(reason);
    }

    /// Asynchronous aggregation: `count` more nodes received the model while this buffer
    /// filled.
    pub fn add_downloads(&mut self, count: usize) {
        self.downloads += count;
    }

    /// Counts `node`, selected, as having returned no usable update, for `reason`.
    pub fn fail(&mut self, node: &str, reason: String) {
        self.failures.push(NodeFailure {
            node: node.to_string(),
            reason,
        });
    }

    /// Updates folded in so far.
    pub fn accepted(&self) -> usize {
        self.aggregator.accepted()
    }

    /// Aggregates the accepted updates and applies the server optimizer to `global`; a private
    /// round is then charged to the run's privacy account.
    pub fn apply(
        self,
        strategy: &mut Strategy,
        global: &mut Model,
    ) -> Result<AppliedRound, EngineError> {
        let bytes_down = self.downloads as u64 * self.download_bytes + self.protocol_bytes_down;
        let train_loss = self.train_loss_sum / self.train_losses.max(1) as f64;
        let (round, started, bytes_up) = (self.round, self.started, self.bytes_up);
        let failed = self.failures.clone();
        let contributors = self.accepted_nodes.clone();
        let contributor_examples = self.accepted_examples.clone();
        let aborted = self.aborted.clone();
        let stepped = match aborted {
            // An aborted secure round has nothing to aggregate: the model stays.
            Some(_) => Stepped {
                participants: 0,
                dp: None,
                excluded: Vec::new(),
                aggregation_s: self.aggregating.as_secs_f64(),
            },
            None => self.step_model(strategy, global)?,
        };
        Ok(AppliedRound {
            round,
            started,
            participants: stepped.participants,
            failed,
            contributors,
            contributor_examples,
            bytes_up,
            bytes_down,
            train_loss,
            strategy_state_bytes: strategy.optimizer.state_bytes(),
            dp: stepped.dp,
            excluded: stepped.excluded,
            aggregation_s: stepped.aggregation_s,
            aborted,
        })
    }

    /// Finishes the aggregator and applies the server step; a private round is charged.
    fn step_model(
        self,
        strategy: &mut Strategy,
        global: &mut Model,
    ) -> Result<Stepped, EngineError> {
        let participants = self.aggregator.accepted();
        let finishing = Instant::now();
        let finished = self.aggregator.finish();
        let aggregation_s = (self.aggregating + finishing.elapsed()).as_secs_f64();
        let aggregate = match finished {
            Ok(aggregate) => aggregate,
            Err(CoreError::NoUpdates) => {
                return Err(EngineError::EmptyRound {
                    round: self.round,
                    selected: self.selected,
                    reasons: self
                        .failures
                        .iter()
                        .take(3)
                        .map(NodeFailure::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            Err(e) => return Err(e.into()),
        };
        strategy.optimizer.apply(global.values_mut(), &aggregate)?;
        let excluded = aggregate
            .excluded
            .iter()
            .filter_map(|&i| self.accepted_nodes.get(i).cloned())
            .collect();
        let dp = match (&self.privacy, strategy.privacy.as_mut()) {
            (Some(round), Some(privacy)) => {
                Some(privacy.finish_round(round, participants, aggregate.unclipped_fraction))
            }
            _ => None,
        };
        Ok(Stepped {
            participants,
            dp,
            excluded,
            aggregation_s,
        })
    }
}

/// What aggregating and stepping the model produced.
struct Stepped {
    participants: usize,
    dp: Option<DpRoundRecord>,
    excluded: Vec<String>,
    aggregation_s: f64,
}

/// A round whose aggregate has moved the global model, waiting for its evaluation.
#[derive(Debug, Clone)]
pub struct AppliedRound {
    round: u32,
    started: Instant,
    participants: usize,
    failed: Vec<NodeFailure>,
    contributors: Vec<String>,
    contributor_examples: Vec<u64>,
    bytes_up: u64,
    bytes_down: u64,
    train_loss: f64,
    strategy_state_bytes: usize,
    dp: Option<DpRoundRecord>,
    excluded: Vec<String>,
    aggregation_s: f64,
    aborted: Option<String>,
}

impl AppliedRound {
    /// The round's record, given how the new global model scored.
    pub fn record(self, score: Score) -> RoundRecord {
        RoundRecord {
            round: self.round,
            accuracy: score.accuracy,
            loss: score.loss,
            class_accuracy: score.class_accuracy,
            participants: self.participants,
            failures: self.failed.len(),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            wall_s: self.started.elapsed().as_secs_f64(),
            train_loss: self.train_loss,
            strategy_state_bytes: self.strategy_state_bytes,
            epsilon: self.dp.map(|dp| dp.epsilon),
            dp: self.dp,
            excluded: self.excluded,
            attack_success_rate: None,
            aggregation_s: self.aggregation_s,
            aborted: self.aborted,
            federated: None,
            contributors: self.contributors,
            contributor_examples: self.contributor_examples,
            failed: self.failed,
            sim_time_s: None,
            staleness: None,
            cross_site: None,
        }
    }
}
