//! The deployed coordinator: the same round bookkeeping as `ferry simulate`
//! ([`ferry_engine::round`]), driven by network events and made durable.
//!
//! Rounds start when at least `min_clients` nodes are online; the cohort is drawn from them by
//! the run seed. A round closes when every cohort node has answered, or at its deadline once
//! `min_results` updates are in; short of that the deadline is extended and idle online nodes
//! join the cohort, so an accepted update is never thrown away. Every accepted update is stored
//! (blob, then its row) before it is acknowledged and folded; a restart re-folds the open round's
//! stored updates, so none is lost or counted twice.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ferry_core::{
    Model, ModelLayout, Update, aggregate::validate_update, strategy::Strategy, wire,
};
use ferry_engine::{
    node::{Evaluator, RoundTask},
    record::RoundRecord,
    round::{self, CohortRule, OpenRound, RoundPlan},
    secure::{SecureAggregation, round_context},
};
use ferry_secagg::SecAggParams;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, watch};

use crate::{
    ServerError,
    blobs::Blobs,
    secure::{Progress, SecAggReply, SecAggStep, SecureStages},
    store::{RoundCommit, RunRow, Store},
};

/// How the deployed run proceeds.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Hash of the run configuration; a stored run with another hash is not resumed.
    pub config_hash: String,
    /// Rounds to run.
    pub rounds: u32,
    /// Cohort selection and local training.
    pub cohort: CohortRule,
    /// Updates needed to close a round at its deadline.
    pub min_results: usize,
    /// Time a round waits for its cohort.
    pub round_timeout: Duration,
    /// Stop once the global model reaches this accuracy.
    pub target_accuracy: Option<f64>,
    /// How often nodes heartbeat while training.
    pub heartbeat_interval: Duration,
    /// Silence after which a node counts as offline.
    pub offline_after: Duration,
    /// Largest chunk accepted in an upload, and sent in a download.
    pub max_chunk_bytes: usize,
    /// Secure aggregation: rounds run SecAgg+ and the server sees only their sums.
    pub secure: Option<SecureAggregation>,
    /// Secure aggregation: how long each key stage (advertise, share, unmask) waits for the
    /// cohort before closing with whoever acted.
    pub secagg_stage_timeout: Duration,
}

/// A reference to a stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Content hash.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// A snapshot of the run for the REST API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStatus {
    /// The run's identifier.
    pub run_id: String,
    /// The open (or next) round.
    pub round: u32,
    /// Rounds configured.
    pub rounds: u32,
    /// `waiting_for_nodes`, `training` or `finished`.
    pub phase: String,
    /// Nodes heard from recently.
    pub nodes_online: usize,
    /// Nodes in the open round's cohort.
    pub cohort: usize,
    /// Updates accepted so far in the open round.
    pub updates_in: usize,
    /// Why the run ended, once it has.
    pub finished: Option<String>,
    /// Content hash of the current global model.
    pub model_sha256: String,
    /// Differential privacy: epsilon spent so far, at `delta`.
    pub epsilon: Option<f64>,
    /// Differential privacy: the delta of the guarantee.
    pub delta: Option<f64>,
}

/// What the coordinator tells its operator.
#[derive(Debug, Clone)]
pub enum Event {
    /// A round started with this many nodes.
    RoundStarted {
        /// The round.
        round: u32,
        /// Cohort size.
        cohort: usize,
    },
    /// A node's update was accepted into the open round.
    UpdateAccepted {
        /// The round.
        round: u32,
    },
    /// A round was committed.
    RoundFinished(Box<RoundRecord>),
    /// Something the operator should know (a refusal, an extended deadline).
    Notice(String),
    /// The run ended.
    Finished(String),
}

/// What a node gets when it asks for work.
#[derive(Debug, Clone)]
pub enum Work {
    /// Train this.
    Task(Box<NodeTask>),
    /// Nothing now.
    Idle(String),
    /// The run is over.
    Finished(String),
}

/// One node's task for a round.
#[derive(Debug, Clone)]
pub struct NodeTask {
    /// The run.
    pub run_id: String,
    /// The round's task (model, training, procedure, seed, server control).
    pub task: RoundTask,
    /// The model blob.
    pub model: BlobRef,
    /// The server-control blob, when the strategy broadcasts state.
    pub server_control: Option<BlobRef>,
    /// When the round may close without this node.
    pub deadline_unix_ms: u64,
    /// Secure aggregation: the protocol's parameters and the FedAvg weight cap.
    pub secagg: Option<(SecAggParams, Option<u64>)>,
}

/// The outcome of a completed upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// Counted in its round.
    Accepted,
    /// Already counted earlier; not counted again.
    Duplicate,
}

/// Why an upload or report was refused, for the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The round is not open for this node (closed, not started, or not in its cohort).
    NotOpen(String),
    /// The update's content is invalid.
    Invalid(String),
}

struct Training {
    plan_task: RoundTask,
    cohort: BTreeSet<String>,
    answered: BTreeSet<String>,
    open: OpenRound,
    deadline: Instant,
    deadline_unix_ms: u64,
    secure: Option<SecureStages>,
}

struct State {
    strategy: Strategy,
    global: Model,
    model_blob: BlobRef,
    control_blob: Option<BlobRef>,
    round: u32,
    training: Option<Training>,
    finished: Option<String>,
    online: HashMap<String, Instant>,
}

/// The coordinator of one deployed run.
pub struct Coordinator {
    spec: RunSpec,
    run_id: String,
    layout: Arc<ModelLayout>,
    store: Store,
    blobs: Blobs,
    evaluator: Arc<dyn Evaluator>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    events: mpsc::UnboundedSender<Event>,
}

fn unix_ms(at: Instant) -> u64 {
    let from_now = at.saturating_duration_since(Instant::now());
    (SystemTime::now() + from_now)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    /// Starts a new run from `initial`, or resumes the one in `store` (which must have been
    /// started with the same configuration). Events go to the returned receiver.
    pub async fn start(
        spec: RunSpec,
        mut strategy: Strategy,
        initial: Model,
        evaluator: Arc<dyn Evaluator>,
        store: Store,
        blobs: Blobs,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Event>), ServerError> {
        let run = match store.run().await? {
            Some(run) if run.config_hash != spec.config_hash => {
                return Err(ServerError::Settings(format!(
                    "the store holds run {} started with another configuration; restart with \
                     that configuration, or point `store` at a new database to start a new run",
                    run.run_id
                )));
            }
            Some(run) => run,
            None => {
                let run = RunRow {
                    run_id: crate::auth::new_secret()[..12].to_string(),
                    config_hash: spec.config_hash.clone(),
                    round: 1,
                    model_sha: blobs.put(initial.to_safetensors()?).await?,
                    state_sha: String::new(),
                    finished: String::new(),
                };
                store.start_run(&run).await?;
                run
            }
        };
        let global = Model::from_safetensors(&blobs.get(&run.model_sha).await?)?;
        initial.check_same_layout(global.layout())?;
        if !run.state_sha.is_empty() {
            strategy
                .optimizer
                .restore(wire::decode_vectors(&blobs.get(&run.state_sha).await?)?)?;
        }
        if let Some(privacy) = strategy.privacy.as_mut() {
            // The privacy spent and the adaptive clip norm follow from the committed rounds.
            let history = parse_records(&store.round_records().await?)?;
            for dp in history.iter().filter_map(|r| r.dp) {
                privacy.replay(&dp);
            }
            if let Some(epsilon) = privacy.spent().map(|s| s.epsilon) {
                metrics::gauge!("ferry_dp_epsilon").set(epsilon);
            }
            privacy.check_first_round_fits_budget()?;
        }
        let model_blob = BlobRef {
            size: blobs.size(&run.model_sha).await?,
            sha256: run.model_sha.clone(),
        };
        let control_blob = put_control(&blobs, strategy.optimizer.broadcast()).await?;
        let (events, receiver) = mpsc::unbounded_channel();
        let coordinator = Arc::new(Self {
            run_id: run.run_id.clone(),
            layout: initial.layout().clone(),
            spec,
            store,
            blobs,
            evaluator,
            state: Mutex::new(State {
                strategy,
                global,
                model_blob,
                control_blob,
                round: run.round,
                training: None,
                finished: (!run.finished.is_empty()).then(|| run.finished.clone()),
                online: HashMap::new(),
            }),
            changed: watch::channel(0).0,
            events,
        });
        coordinator.resume_open_round().await?;
        Ok((coordinator, receiver))
    }

    /// The run's identifier.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The records of the rounds finished so far.
    pub async fn history(&self) -> Result<Vec<RoundRecord>, ServerError> {
        parse_records(&self.store.round_records().await?)
    }

    /// The current global model.
    pub async fn global(&self) -> Model {
        self.state.lock().await.global.clone()
    }

    /// Why the run ended, once it has.
    pub async fn finished(&self) -> Option<String> {
        self.state.lock().await.finished.clone()
    }

    /// Where the run stands now, for operators.
    pub async fn status(&self) -> RunStatus {
        let state = self.state.lock().await;
        let (phase, cohort, updates_in) = match (&state.finished, &state.training) {
            (Some(_), _) => ("finished", 0, 0),
            (None, Some(t)) => ("training", t.cohort.len(), t.open.accepted()),
            (None, None) => ("waiting_for_nodes", 0, 0),
        };
        RunStatus {
            run_id: self.run_id.clone(),
            round: state.round,
            rounds: self.spec.rounds,
            phase: phase.to_string(),
            nodes_online: state.online.len(),
            cohort,
            updates_in,
            finished: state.finished.clone(),
            model_sha256: state.model_blob.sha256.clone(),
            epsilon: state
                .strategy
                .privacy
                .as_ref()
                .and_then(|p| p.spent())
                .map(|s| s.epsilon),
            delta: state.strategy.privacy.as_ref().map(|p| p.settings().delta),
        }
    }

    /// Seconds since each online node was last heard from.
    pub async fn online(&self) -> HashMap<String, f64> {
        let state = self.state.lock().await;
        state
            .online
            .iter()
            .map(|(node, seen)| (node.clone(), seen.elapsed().as_secs_f64()))
            .collect()
    }

    /// Returns once the run has ended (or the coordinator is gone).
    pub async fn until_finished(&self) {
        let mut changed = self.subscribe();
        while self.finished().await.is_none() {
            if changed.changed().await.is_err() {
                break;
            }
        }
    }

    /// A receiver that changes whenever the run's state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn emit(&self, event: Event) {
        // The operator may have stopped listening; the run goes on.
        let _ = self.events.send(event);
    }

    /// After a restart: reopens the stored cohort's round and re-folds its stored updates.
    async fn resume_open_round(&self) -> Result<(), ServerError> {
        let mut state = self.state.lock().await;
        if state.finished.is_some() {
            return Ok(());
        }
        let cohort = self.store.cohort(state.round).await?;
        if cohort.is_empty() {
            return Ok(());
        }
        if self.spec.secure.is_some() {
            // A secure round's keys lived in the old process; nothing of it was folded, so
            // the round starts again with whoever is online.
            self.emit(Event::Notice(format!(
                "round {} starts again: a secure round cannot outlive its coordinator",
                state.round
            )));
            return Ok(());
        }
        let population = self
            .store
            .population(state.round)
            .await?
            .unwrap_or(cohort.len());
        let plan = round::plan(
            state.round,
            &self.spec.cohort,
            &state.strategy,
            &state.global,
            population,
        )?;
        let mut training = self.open_training(&state, plan, cohort.into_iter().collect());
        for (node, sha) in self.store.accepted(state.round).await? {
            let update = wire::decode_update(&self.blobs.get(&sha).await?, &self.layout)?;
            training.open.accept(&node, &update)?;
            training.answered.insert(node);
        }
        self.emit(Event::Notice(format!(
            "resumed round {} with {} of {} updates already in",
            state.round,
            training.answered.len(),
            training.cohort.len()
        )));
        state.training = Some(training);
        Ok(())
    }

    fn open_training(&self, state: &State, plan: RoundPlan, cohort: BTreeSet<String>) -> Training {
        let deadline = Instant::now() + self.spec.round_timeout;
        let secure = self.spec.secure.as_ref().map(|secure| {
            // The graph seed only needs to be unpredictable to nodes before the roster.
            let graph_seed: [u8; 32] = Sha256::digest(crate::auth::new_secret()).into();
            SecureStages::new(
                plan.task.round,
                secure.params,
                round_context(&self.run_id, plan.task.round),
                graph_seed,
                self.layout.num_params(),
                self.spec.secagg_stage_timeout,
            )
        });
        Training {
            secure,
            open: OpenRound::new(&plan, &state.strategy),
            plan_task: plan.task,
            cohort,
            answered: BTreeSet::new(),
            deadline,
            deadline_unix_ms: unix_ms(deadline),
        }
    }

    /// Marks `node` as alive now.
    pub async fn seen(&self, node: &str) {
        let mut state = self.state.lock().await;
        let newly = state
            .online
            .insert(node.to_string(), Instant::now())
            .is_none();
        drop(state);
        if newly {
            self.notify();
        }
    }

    /// What `node` should do now.
    pub async fn work_for(&self, node: &str) -> Work {
        let state = self.state.lock().await;
        if let Some(reason) = &state.finished {
            return Work::Finished(reason.clone());
        }
        match &state.training {
            Some(t) if t.cohort.contains(node) && !t.answered.contains(node) => {
                Work::Task(Box::new(NodeTask {
                    run_id: self.run_id.clone(),
                    task: t.plan_task.clone(),
                    model: state.model_blob.clone(),
                    server_control: state.control_blob.clone(),
                    deadline_unix_ms: t.deadline_unix_ms,
                    secagg: self.spec.secure.as_ref().map(|s| (s.params, s.weight_cap)),
                }))
            }
            Some(t) => Work::Idle(format!(
                "round {} is running without this node; it can join the next one",
                t.plan_task.round
            )),
            None => Work::Idle(format!(
                "waiting for at least {} nodes to be online",
                self.spec.cohort.min_clients
            )),
        }
    }

    /// Whether `node` is still expected to deliver `round`, and the current round.
    pub async fn keep_working(&self, node: &str, round: u32) -> (bool, u32) {
        let state = self.state.lock().await;
        let keep = state.training.as_ref().is_some_and(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        });
        (keep, state.round)
    }

    /// The blob `sha256` if a node may download it now (the current model or server control).
    pub async fn downloadable(&self, sha256: &str) -> Option<BlobRef> {
        let state = self.state.lock().await;
        std::iter::once(&state.model_blob)
            .chain(state.control_blob.as_ref())
            .find(|b| b.sha256 == sha256)
            .cloned()
    }

    /// The blob store, for streaming downloads.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// The run's spec.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The largest upload a node may send: an update with every extra, plus header room.
    pub fn max_update_bytes(&self) -> u64 {
        let tensors = self.layout.specs().len() as u64;
        2 * 4 * self.layout.num_params() as u64 + 256 * tensors * 2 + 64 * 1024
    }

    /// Checks that `node` may upload for `round`; `Ok(Some(Duplicate))` if that update was
    /// already counted.
    pub async fn may_upload(&self, node: &str, round: u32) -> Result<Option<Submission>, Refusal> {
        let (open_for_node, answered, current) = {
            let state = self.state.lock().await;
            let t = state
                .training
                .as_ref()
                .filter(|t| t.plan_task.round == round && t.cohort.contains(node));
            (
                t.is_some(),
                t.is_some_and(|t| t.answered.contains(node)),
                state.round,
            )
        };
        if open_for_node && !answered {
            return Ok(None);
        }
        match self.replayed(node, round).await {
            Ok(Some(dup)) => Ok(Some(dup)),
            Err(refusal) if open_for_node => Err(refusal),
            _ => Err(Refusal::NotOpen(format!(
                "round {round} is not open for this node (the server is at round {current}); \
                 pull a new task"
            ))),
        }
    }

    async fn replayed(&self, node: &str, round: u32) -> Result<Option<Submission>, Refusal> {
        let accepted = self
            .store
            .accepted(round)
            .await
            .map_err(|e| Refusal::NotOpen(format!("store unavailable: {e}")))?;
        if accepted.iter().any(|(n, _)| n == node) {
            Ok(Some(Submission::Duplicate))
        } else {
            Err(Refusal::NotOpen(format!(
                "this node already answered round {round} without an update"
            )))
        }
    }

    /// Takes a complete upload whose content hash `sha256` the caller has verified: decodes and
    /// validates it, stores it, and folds it into the open round.
    pub async fn submit(
        &self,
        node: &str,
        round: u32,
        sha256: &str,
        bytes: Vec<u8>,
    ) -> Result<Submission, Refusal> {
        if self.spec.secure.is_some() {
            return self.submit_masked(node, round, &bytes).await;
        }
        let update = wire::decode_update(&bytes, &self.layout)
            .and_then(|u| validate_update(&u, self.layout.num_params()).map(|()| u))
            .map_err(|e| Refusal::Invalid(e.to_string()));
        let mut state = self.state.lock().await;
        let still_open = state.training.as_ref().is_some_and(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        });
        if !still_open {
            drop(state);
            return self.may_upload(node, round).await.and_then(|dup| {
                dup.ok_or_else(|| Refusal::NotOpen(format!("round {round} closed")))
            });
        }
        let update: Update = match update {
            Ok(update) => update,
            Err(refusal) => {
                self.refuse(&mut state, node, &refusal);
                return Err(refusal);
            }
        };
        let stored = async {
            self.blobs.put_hashed(sha256, bytes).await?;
            self.store.accept(round, node, sha256).await
        }
        .await;
        match stored {
            Ok(true) => {}
            Ok(false) => return Ok(Submission::Duplicate),
            Err(e) => return Err(Refusal::NotOpen(format!("could not store the update: {e}"))),
        }
        let Some(training) = state.training.as_mut() else {
            return Err(Refusal::NotOpen("round closed".into()));
        };
        training.answered.insert(node.to_string());
        if let Err(e) = training.open.accept(node, &update) {
            // Refused by the strategy (for example a missing SCAFFOLD extra): not counted.
            let _ = self.store.unaccept(round, node).await;
            let refusal = Refusal::Invalid(e.to_string());
            self.emit(Event::Notice(format!(
                "refused node {node}'s update for round {round}: {e}"
            )));
            return Err(refusal);
        }
        drop(state);
        metrics::counter!("ferry_updates_accepted_total").increment(1);
        self.emit(Event::UpdateAccepted { round });
        self.notify();
        Ok(Submission::Accepted)
    }

    /// A secure round's upload: a masked input, folded into the masked sum and not stored
    /// (alone it reveals nothing, and the round cannot outlive this process anyway).
    async fn submit_masked(
        &self,
        node: &str,
        round: u32,
        bytes: &[u8],
    ) -> Result<Submission, Refusal> {
        let mut state = self.state.lock().await;
        let Some(training) = state.training.as_mut().filter(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        }) else {
            drop(state);
            return self.may_upload(node, round).await.and_then(|dup| {
                dup.ok_or_else(|| Refusal::NotOpen(format!("round {round} closed")))
            });
        };
        let Some(secure) = training.secure.as_mut() else {
            return Err(Refusal::NotOpen("the open round is not secure".into()));
        };
        secure.take_masked(node, bytes)?;
        training.answered.insert(node.to_string());
        training.open.note_secure_update(node, None);
        training.open.add_protocol_bytes(bytes.len() as u64, 0);
        drop(state);
        metrics::counter!("ferry_updates_accepted_total").increment(1);
        self.emit(Event::UpdateAccepted { round });
        self.notify();
        Ok(Submission::Accepted)
    }

    /// One step of `node` in the open secure round `round`.
    pub async fn secagg(
        &self,
        node: &str,
        round: u32,
        step: SecAggStep,
    ) -> Result<SecAggReply, Refusal> {
        let mut state = self.state.lock().await;
        let current = state.round;
        let Some(secure) = state
            .training
            .as_mut()
            .filter(|t| t.plan_task.round == round && t.cohort.contains(node))
            .and_then(|t| t.secure.as_mut())
        else {
            return Err(Refusal::NotOpen(format!(
                "no secure round {round} is open for this node (the server is at round \
                 {current}); pull a new task"
            )));
        };
        let reply = secure.handle(node, step)?;
        drop(state);
        if matches!(reply, SecAggReply::Ack) {
            self.notify();
        }
        Ok(reply)
    }

    fn refuse(&self, state: &mut State, node: &str, refusal: &Refusal) {
        if let (Some(t), Refusal::Invalid(reason)) = (state.training.as_mut(), refusal) {
            t.answered.insert(node.to_string());
            t.open.fail(format!("node {node}: {reason}"));
            self.emit(Event::Notice(format!(
                "refused node {node}'s update for round {}: {reason}",
                t.plan_task.round
            )));
            self.notify();
        }
    }

    /// Records that `node` cannot deliver `round`.
    pub async fn report_failure(&self, node: &str, round: u32, reason: &str) {
        let mut state = self.state.lock().await;
        if let Some(t) = state.training.as_mut().filter(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        }) {
            t.answered.insert(node.to_string());
            t.open.fail(format!("node {node}: {reason}"));
            self.emit(Event::Notice(format!(
                "node {node} gave up round {round}: {reason}"
            )));
            drop(state);
            self.notify();
        }
    }

    /// Drives the run: starts rounds, closes them, commits them; returns when the run ends.
    pub async fn drive(self: Arc<Self>) -> Result<String, ServerError> {
        let mut changed = self.subscribe();
        loop {
            if let Some(reason) = self.step().await? {
                return Ok(reason);
            }
            // Wake on any change, or soon anyway to check deadlines and liveness.
            let _ = tokio::time::timeout(Duration::from_millis(250), changed.changed()).await;
        }
    }

    /// One look at the run; returns why it ended once it has.
    async fn step(&self) -> Result<Option<String>, ServerError> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        if let Some(reason) = &state.finished {
            return Ok(Some(reason.clone()));
        }
        let now = Instant::now();
        let offline_after = self.spec.offline_after;
        state
            .online
            .retain(|_, seen| now.duration_since(*seen) < offline_after);
        match state.training.as_mut() {
            None => {
                let mut online: Vec<String> = state.online.keys().cloned().collect();
                online.sort();
                if online.len() < self.spec.cohort.min_clients {
                    return Ok(None);
                }
                if let Some(epsilon) = state
                    .strategy
                    .privacy
                    .as_ref()
                    .and_then(|p| p.next_round_exceeds_budget())
                {
                    let reason = "budget_exhausted".to_string();
                    self.store.finish_run(&reason).await?;
                    state.finished = Some(reason.clone());
                    drop(guard);
                    self.emit(Event::Notice(format!(
                        "stopping before the next round: it would take epsilon to {epsilon:.3}, \
                         over the budget"
                    )));
                    self.emit(Event::Finished(reason.clone()));
                    self.notify();
                    return Ok(Some(reason));
                }
                let plan = round::plan(
                    state.round,
                    &self.spec.cohort,
                    &state.strategy,
                    &state.global,
                    online.len(),
                )?;
                let cohort: Vec<String> =
                    plan.selected.iter().map(|&i| online[i].clone()).collect();
                self.store.set_population(state.round, online.len()).await?;
                self.store.set_cohort(state.round, &cohort).await?;
                let training = self.open_training(state, plan, cohort.into_iter().collect());
                self.emit(Event::RoundStarted {
                    round: state.round,
                    cohort: training.cohort.len(),
                });
                state.training = Some(training);
                drop(guard);
                self.notify();
                Ok(None)
            }
            Some(t) if t.secure.is_some() => {
                let progress = match t.secure.as_mut() {
                    Some(secure) => secure.advance(&t.cohort, &t.answered, t.deadline, now),
                    None => Progress::Waiting,
                };
                match progress {
                    Progress::Waiting => return Ok(None),
                    Progress::Advanced { notice, training } => {
                        if training {
                            t.deadline = now + self.spec.round_timeout;
                            t.deadline_unix_ms = unix_ms(t.deadline);
                        }
                        drop(guard);
                        self.emit(Event::Notice(notice));
                        self.notify();
                        return Ok(None);
                    }
                    Progress::Finished(sum) => {
                        let accepted = match &self.spec.secure {
                            Some(secure) => t.open.accept_sum(&secure.update_sum(&sum)),
                            None => Ok(()),
                        };
                        if let Err(e) = accepted {
                            t.open.abort(e.to_string());
                        }
                    }
                    Progress::Aborted(reason) => {
                        self.emit(Event::Notice(format!(
                            "secure round {} aborted: {reason}",
                            t.plan_task.round
                        )));
                        t.open.abort(reason);
                    }
                }
                self.close_round(state).await?;
                let finished = state.finished.clone();
                drop(guard);
                self.notify();
                Ok(finished)
            }
            Some(t) => {
                let all_answered = t.answered.len() >= t.cohort.len();
                if !all_answered && now < t.deadline {
                    return Ok(None);
                }
                // A private round closes with whoever answered by the deadline: widening its
                // Poisson-sampled cohort would break the accountant's assumption, and its noise
                // makes an empty round a valid (data-free) release.
                let private = state.strategy.privacy.is_some();
                if !private
                    && (all_answered && t.open.accepted() == 0
                        || !all_answered && t.open.accepted() < self.spec.min_results)
                {
                    // Not enough to close: widen the cohort with idle online nodes and wait on.
                    let idle: Vec<String> = state
                        .online
                        .keys()
                        .filter(|n| !t.cohort.contains(*n))
                        .cloned()
                        .collect();
                    self.store.set_cohort(t.plan_task.round, &idle).await?;
                    t.cohort.extend(idle.iter().cloned());
                    if all_answered {
                        // Everyone answered without a usable update: ask them again.
                        t.answered.clear();
                    }
                    t.deadline = now + self.spec.round_timeout;
                    t.deadline_unix_ms = unix_ms(t.deadline);
                    let message = format!(
                        "round {}: {} of {} updates needed are in; deadline extended, {} node(s) added",
                        t.plan_task.round,
                        t.open.accepted(),
                        self.spec.min_results,
                        idle.len()
                    );
                    drop(guard);
                    self.emit(Event::Notice(message));
                    self.notify();
                    return Ok(None);
                }
                self.close_round(state).await?;
                let finished = state.finished.clone();
                drop(guard);
                self.notify();
                Ok(finished)
            }
        }
    }

    async fn close_round(&self, state: &mut State) -> Result<(), ServerError> {
        let Some(training) = state.training.take() else {
            return Ok(());
        };
        let round = training.plan_task.round;
        let State {
            strategy, global, ..
        } = state;
        let applied = training.open.apply(strategy, global)?;
        let evaluator = self.evaluator.clone();
        let model = global.clone();
        let evaluation = tokio::task::spawn_blocking(move || evaluator.evaluate(&model))
            .await
            .map_err(|e| ServerError::Settings(format!("evaluation task failed: {e}")))?
            .map_err(|e| ServerError::Engine(ferry_engine::EngineError::Evaluation(e)))?;
        let record = applied.record(evaluation);
        let model_bytes = state.global.to_safetensors()?;
        let model_size = model_bytes.len() as u64;
        let model_sha = self.blobs.put(model_bytes).await?;
        let saved = state.strategy.optimizer.save();
        let state_sha = if saved.is_empty() {
            String::new()
        } else {
            let named: Vec<(&str, &[f32])> = saved
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            self.blobs.put(wire::encode_vectors(&named)?).await?
        };
        let finished = if self
            .spec
            .target_accuracy
            .is_some_and(|t| record.accuracy >= t)
        {
            Some("target_reached".to_string())
        } else if round >= self.spec.rounds {
            Some("rounds_completed".to_string())
        } else {
            None
        };
        self.store
            .commit_round(&RoundCommit {
                round,
                record_json: serde_json::to_string(&record)
                    .map_err(|e| ServerError::Settings(e.to_string()))?,
                model_sha: model_sha.clone(),
                state_sha,
                finished: finished.clone(),
            })
            .await?;
        state.model_blob = BlobRef {
            sha256: model_sha,
            size: model_size,
        };
        state.control_blob = put_control(&self.blobs, state.strategy.optimizer.broadcast()).await?;
        if let Some(epsilon) = record.epsilon {
            metrics::gauge!("ferry_dp_epsilon").set(epsilon);
        }
        state.round = round + 1;
        metrics::counter!("ferry_rounds_total").increment(1);
        metrics::histogram!("ferry_round_duration_seconds").record(record.wall_s);
        self.emit(Event::RoundFinished(Box::new(record)));
        if let Some(reason) = &finished {
            state.finished = Some(reason.clone());
            self.emit(Event::Finished(reason.clone()));
        }
        Ok(())
    }
}

/// Stores the state a strategy broadcasts to nodes (SCAFFOLD's `c`), if any.
async fn put_control(
    blobs: &Blobs,
    control: Option<Arc<Vec<f32>>>,
) -> Result<Option<BlobRef>, ServerError> {
    let Some(control) = control else {
        return Ok(None);
    };
    let bytes = wire::encode_vectors(&[("control", &control)])?;
    let size = bytes.len() as u64;
    Ok(Some(BlobRef {
        sha256: blobs.put(bytes).await?,
        size,
    }))
}

/// Round records as the store holds them (JSON).
fn parse_records(jsons: &[String]) -> Result<Vec<RoundRecord>, ServerError> {
    jsons
        .iter()
        .map(|json| {
            serde_json::from_str(json)
                .map_err(|e| ServerError::Settings(format!("stored round record: {e}")))
        })
        .collect()
}
