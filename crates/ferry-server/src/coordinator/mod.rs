//! The deployed coordinator: the same round bookkeeping as `ferry simulate`
//! ([`ferry_engine::round`]), driven by network events and made durable.
//!
//! Rounds start when at least `min_clients` nodes are online, and never with fewer than the
//! run's [`RoundFloor`] (what its robust rule or SecAgg+ needs: `min_clients` and `min_results`
//! below it are raised at start, with a notice). The cohort is drawn from the online nodes by
//! the run seed. A round closes when every cohort node has answered with enough updates, or at
//! its deadline once `min_results` updates are in; short of that the deadline is extended once
//! and idle online nodes join the cohort. A round that still falls short, or whose secure
//! protocol aborts, fails: it is recorded with its reason, the model stays, and the same round
//! is tried again after a backoff, until `max_round_failures` consecutive failures stop the
//! run. Every accepted update is stored (blob, then its row) before it is acknowledged and
//! folded; a restart re-folds the open round's stored updates, so none is lost or counted
//! twice.

mod buffered;
mod cross_site;
mod evaluation;
mod relays;
mod retention;
mod rounds;
mod startup;
mod types;
mod uploads;

pub use crate::refusal::Refusal;
pub use relays::{RelayFold, RelayView};
pub use types::{
    BlobRef, COORDINATOR_ERROR, EvaluationTask, Event, FAILED_ROUNDS, FailedRound, NodeTask,
    RunSpec, RunStatus, Submission, Work, is_failure,
};

use evaluation::Evaluating;

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use ferry_core::{Model, ModelLayout, compress::Compression, strategy::Strategy, wire};
use ferry_engine::{
    floor::RoundFloor,
    node::Evaluator,
    record::{RoundRecord, StalenessStats},
    round::{OpenRound, RoundPlan},
    secure::round_context,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, watch};

use crate::{
    ServerError, blobs::Blobs, coordinator::types::RoundOrders, secure::SecureStages, store::Store,
};

struct Training {
    plan_task: RoundOrders,
    cohort: BTreeSet<String>,
    answered: BTreeSet<String>,
    delivered: BTreeSet<String>,
    extended: bool,
    started: Instant,
    open: OpenRound,
    deadline: Instant,
    deadline_unix_ms: u64,
    secure: Option<SecureStages>,
    /// Asynchronous runs: how stale the open version's updates were so far.
    staleness: StalenessStats,
}

impl Training {
    /// The round's aggregation, with the rest (the task's share of the global model
    /// included) let go.
    fn into_open(self) -> OpenRound {
        self.open
    }
}

struct State {
    strategy: Strategy,
    /// The global model while no round runs; `None` while one does (nodes download it from
    /// the blob store, and the coordinator reads it back to step it when the round closes).
    global: Option<Arc<Model>>,
    model_blob: BlobRef,
    /// The global model as training tasks send it where the run compresses downloads (half
    /// precision); `None` where they send `model_blob`.
    download_blob: Option<BlobRef>,
    control_blob: Option<BlobRef>,
    round: u32,
    training: Option<Training>,
    /// The latest committed round's federated evaluation, while nodes score its model.
    evaluating: Option<Evaluating>,
    /// After the final round, with `cross-site = "local"`: sites' own models fine-tuned and
    /// scored before the run ends.
    cross_site: Option<cross_site::CrossSitePhase>,
    finished: Option<String>,
    online: HashMap<String, Instant>,
    /// Relays, by when each last synced (they are never in a cohort).
    relays: HashMap<String, Instant>,
    /// Asynchronous runs: each node's task in flight, whatever version it was given in.
    in_flight: HashMap<String, buffered::InFlight>,
    failures: u32,
    last_failure: Option<String>,
    retry_at: Option<Instant>,
    waiting_noted: bool,
    fleet_check: Option<FleetCheck>,
    /// The operator asked the run to end once no round is open.
    stop_requested: bool,
    /// A round aggregated under the lock, which the driver commits once it lets the lock go.
    closing: Option<rounds::Closing>,
}

/// What the store said, while the run waits for nodes, about the fleet it could still have.
struct FleetCheck {
    /// Online nodes when the store was asked.
    online: usize,
    /// Why the fleet cannot reach the round's needs, if it cannot.
    short: Option<String>,
}

/// The coordinator of one deployed run.
pub struct Coordinator {
    spec: RunSpec,
    run_id: String,
    layout: Arc<ModelLayout>,
    store: Store,
    blobs: Blobs,
    evaluator: Option<Arc<dyn Evaluator>>,
    floor: RoundFloor,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    work: watch::Sender<u64>,
    events: mpsc::UnboundedSender<Event>,
}

fn unix_ms(at: Instant) -> u64 {
    let from_now = at.saturating_duration_since(Instant::now());
    (SystemTime::now() + from_now)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    /// The run's identifier.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The records of the rounds finished so far.
    pub async fn history(&self) -> Result<Vec<RoundRecord>, ServerError> {
        parse_records(&self.store.round_records().await?)
    }

    /// The round attempts that failed so far (each retried, or the run stopped).
    pub async fn failed_rounds(&self) -> Result<Vec<FailedRound>, ServerError> {
        parse_records(&self.store.failed_round_records().await?)
    }

    /// The current global model.
    pub async fn global(&self) -> Result<Model, ServerError> {
        let mut state = self.state.lock().await;
        Ok(self.resident_global(&mut state).await?.as_ref().clone())
    }

    /// The global model, read back from its blob if a round let it go.
    async fn resident_global(&self, state: &mut State) -> Result<Arc<Model>, ServerError> {
        if let Some(global) = &state.global {
            return Ok(global.clone());
        }
        let file = std::io::BufReader::new(self.blobs.open(&state.model_blob.id).await?);
        let global = Arc::new(Model::read_safetensors(file, &self.spec.personal)?);
        state.global = Some(global.clone());
        Ok(global)
    }

    /// The open round's plan from the current global model, drawn from `available` nodes.
    async fn plan_round(
        &self,
        state: &mut State,
        available: usize,
    ) -> Result<RoundPlan, ServerError> {
        let global = self.resident_global(state).await?;
        let mut plan = ferry_engine::round::plan(
            state.round,
            &self.spec.cohort,
            &state.strategy,
            &global,
            available,
        )?;
        // The ledger charges downloads and updates as the run's compression sends them.
        plan.task.compress = self.spec.compress;
        Ok(plan)
    }

    /// Why the run ended, once it has.
    pub async fn finished(&self) -> Option<String> {
        self.state.lock().await.finished.clone()
    }

    /// Where the run stands now, for operators.
    pub async fn status(&self) -> RunStatus {
        let state = self.state.lock().await;
        let (phase, cohort, updates_in) = match (&state.finished, &state.training) {
            (Some(reason), _) if is_failure(reason) => ("failed", 0, 0),
            (Some(_), _) => ("finished", 0, 0),
            (None, Some(t)) => ("training", t.cohort.len(), t.open.accepted()),
            (None, None) if state.cross_site.is_some() => {
                let (asked, done) = state.cross_site.as_ref().map_or((0, 0), |p| p.progress());
                ("cross_site", asked, done)
            }
            (None, None) if state.evaluating.is_some() => {
                let (asked, done) = state.evaluating.as_ref().map_or((0, 0), |e| e.progress());
                ("evaluating", asked, done)
            }
            (None, None) if state.retry_at.is_some_and(|at| at > Instant::now()) => {
                ("retrying", 0, 0)
            }
            (None, None) => ("waiting_for_nodes", 0, 0),
        };
        RunStatus {
            run_id: self.run_id.clone(),
            round: state.round,
            rounds: self.spec.rounds,
            phase: phase.to_string(),
            nodes_needed: self.spec.cohort.min_clients,
            waiting: self.waiting(&state),
            failed_attempts: state.failures,
            last_failure: state.last_failure.clone(),
            nodes_online: state.online.len(),
            cohort,
            updates_in,
            finished: state.finished.clone(),
            model_id: state.model_blob.id.clone(),
            epsilon: state
                .strategy
                .privacy
                .as_ref()
                .and_then(|p| p.spent())
                .map(|s| s.epsilon),
            delta: state.strategy.privacy.as_ref().map(|p| p.settings().delta),
            secagg_stage: state
                .training
                .as_ref()
                .and_then(|t| t.secure.as_ref())
                .map(|s| s.stage_name().to_string()),
            stop_requested: state.stop_requested,
        }
    }

    /// Ends the run once the open round (and its federated evaluation) has committed, or at
    /// once if none is open; the run ends as `stopped`.
    pub async fn stop_after_round(&self) {
        let mut state = self.state.lock().await;
        if state.finished.is_some() || state.stop_requested {
            return;
        }
        state.stop_requested = true;
        let round = state.round;
        drop(state);
        self.emit(Event::Notice(format!(
            "the operator asked to stop; the run ends once round {round} is no longer open"
        )));
        self.notify();
    }

    /// Seconds since each online node (or relay) was last heard from.
    pub async fn online(&self) -> HashMap<String, f64> {
        let state = self.state.lock().await;
        let relays = state
            .relays
            .iter()
            .filter(|(_, seen)| seen.elapsed() < self.spec.offline_after);
        state
            .online
            .iter()
            .chain(relays)
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

    /// A receiver that changes only when a waiting node may have been given work: a round or
    /// an evaluation opened, a deadline was extended, or the run ended. Nodes long-polling for
    /// a task wait on this, so a thousand accepted updates do not wake ten thousand waiting
    /// nodes a thousand times each.
    pub fn subscribe_work(&self) -> watch::Receiver<u64> {
        self.work.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// [`Coordinator::notify`], for a change that may give waiting nodes work.
    fn notify_work(&self) {
        self.notify();
        self.work.send_modify(|v| *v += 1);
    }

    fn emit(&self, event: Event) {
        // The operator may have stopped listening; the run goes on.
        let _ = self.events.send(event);
    }

    /// The open round of `plan`; the global model is let go until the round closes.
    fn open_training(
        &self,
        state: &mut State,
        plan: RoundPlan,
        cohort: BTreeSet<String>,
    ) -> Training {
        let started = Instant::now();
        let deadline = started + self.spec.round_timeout;
        let secure = self.spec.secure.as_ref().map(|secure| {
            // The graph seed only needs to be unpredictable to nodes before the roster.
            let graph_seed: [u8; 32] = Sha256::digest(crate::auth::new_secret()).into();
            SecureStages::new(
                plan.task.round,
                secure.params_for(cohort.len()),
                round_context(&self.run_id, plan.task.round),
                graph_seed,
                self.layout.num_params(),
                self.spec.secagg_stage_timeout,
            )
        });
        state.global = None;
        Training {
            secure,
            open: OpenRound::new(&plan, &state.strategy),
            plan_task: plan.task.into(),
            cohort,
            answered: BTreeSet::new(),
            delivered: BTreeSet::new(),
            extended: false,
            started,
            deadline,
            deadline_unix_ms: unix_ms(deadline),
            staleness: StalenessStats::default(),
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

    /// What `node` should do now; `shares` says whether it lets its own fine-tuned model
    /// leave the site for the cross-site matrix.
    pub async fn work_for(&self, node: &str, shares: bool) -> Work {
        let mut state = self.state.lock().await;
        match state.finished.as_deref() {
            // The server is about to exit and be restarted: nodes wait for it, reconnecting.
            Some(COORDINATOR_ERROR) => return Work::Idle(self.idle_reason(&state)),
            Some(reason) => return Work::Finished(reason.to_string()),
            None => {}
        }
        if state.cross_site.is_some() {
            return self
                .site_model_work(&mut state, node, shares)
                .unwrap_or_else(|| Work::Idle(self.idle_reason(&state)));
        }
        if let Some(task) = self.evaluation_for(&state, node) {
            return Work::Evaluate(task);
        }
        if let Some(buffer) = self.buffered().copied() {
            return match self.buffered_task(&mut state, &buffer, node) {
                Some(task) => Work::Task(Box::new(task)),
                None => Work::Idle(self.idle_reason(&state)),
            };
        }
        match &state.training {
            Some(t) if t.cohort.contains(node) && !t.answered.contains(node) => {
                Work::Task(Box::new(self.node_task(&state, t)))
            }
            _ => Work::Idle(self.idle_reason(&state)),
        }
    }

    /// The task of the open round `t` for a node of its cohort.
    fn node_task(&self, state: &State, t: &Training) -> NodeTask {
        NodeTask {
            run_id: self.run_id.clone(),
            task: t.plan_task.clone(),
            model: state
                .download_blob
                .clone()
                .unwrap_or_else(|| state.model_blob.clone()),
            server_control: state.control_blob.clone(),
            deadline_unix_ms: t.deadline_unix_ms,
            secagg: self
                .spec
                .secure
                .as_ref()
                .zip(t.secure.as_ref())
                .map(|(s, stages)| (stages.params(), s.weight_cap)),
        }
    }

    /// Why a node with no task waits, while the run goes on.
    fn idle_reason(&self, state: &State) -> String {
        if state.finished.as_deref() == Some(COORDINATOR_ERROR) {
            return "the coordinator stopped on an error; waiting for it".into();
        }
        if state.cross_site.is_some() {
            return "the rounds are done; sites' own models are being fine-tuned and scored \
                    for the cross-site matrix"
                .into();
        }
        match (&state.training, &state.evaluating) {
            (Some(t), _) => format!(
                "round {} is running without this node; it can join the next one",
                t.plan_task.round
            ),
            (None, Some(_)) => format!(
                "round {}'s model is being evaluated without this node",
                state.round - 1
            ),
            (None, None) => self.waiting(state).unwrap_or_default(),
        }
    }

    /// What a run with no open round waits for, in an operator's words.
    fn waiting(&self, state: &State) -> Option<String> {
        if state.finished.is_some()
            || state.training.is_some()
            || state.evaluating.is_some()
            || state.cross_site.is_some()
        {
            return None;
        }
        let now = Instant::now();
        if let Some(at) = state.retry_at.filter(|at| *at > now) {
            return Some(format!(
                "round {} failed ({}); trying again in {:.0} s",
                state.round,
                state.last_failure.as_deref().unwrap_or("unknown reason"),
                at.duration_since(now).as_secs_f64().ceil()
            ));
        }
        let needed = self.spec.cohort.min_clients;
        let why = match &self.floor.reason {
            Some(reason) if self.floor.updates >= needed => reason.clone(),
            _ => format!("min_clients is {needed}"),
        };
        let short = state
            .fleet_check
            .as_ref()
            .and_then(|check| check.short.as_deref())
            .map_or(String::new(), |short| format!("; {short}"));
        Some(format!(
            "waiting for {needed} online nodes: {why}; {} online{short}",
            state.online.len()
        ))
    }

    /// Whether `node` is still expected to deliver `round`, and the current round.
    pub async fn keep_working(&self, node: &str, round: u32) -> (bool, u32) {
        let state = self.state.lock().await;
        let keep = state.training.as_ref().is_some_and(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        }) || Self::evaluation_expects(&state, node, round)
            || Self::site_models_expect(&state, node, round)
            || Self::in_flight_for(&state, node, round);
        (keep, state.round)
    }

    /// The blob `sha256` if a node may download it now (the current model or server control).
    pub async fn downloadable(&self, id: &str) -> Option<BlobRef> {
        let state = self.state.lock().await;
        // An asynchronous task may still be downloading an earlier version's model.
        let in_flight = state
            .in_flight
            .values()
            .flat_map(|f| std::iter::once(&f.task.model).chain(f.task.server_control.as_ref()));
        std::iter::once(&state.model_blob)
            .chain(state.download_blob.as_ref())
            .chain(state.control_blob.as_ref())
            .chain(in_flight)
            .find(|b| b.id == id)
            .cloned()
            .or_else(|| Self::site_model_blob(&state, id))
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
        crate::staged::max_update_bytes(&self.layout)
    }
}

/// Stores `model` a tensor at a time (no second copy in memory) and refers to it.
pub(crate) async fn put_model(blobs: &Blobs, model: &Model) -> Result<BlobRef, ServerError> {
    let (id, size) = blobs
        .put_written(|out| {
            model.write_safetensors(out)?;
            Ok(())
        })
        .await?;
    Ok(BlobRef { id, size })
}

/// Stores the copy of `model` that training tasks send where `compress` covers downloads
/// (half precision, see [`ferry_core::download`]); `None` where tasks send the model itself.
pub(crate) async fn put_download(
    blobs: &Blobs,
    model: &Model,
    compress: Compression,
) -> Result<Option<BlobRef>, ServerError> {
    let Some(half) = compress.download_dtype() else {
        return Ok(None);
    };
    let (id, size) = blobs
        .put_written(|out| {
            ferry_core::download::write_rounded(model, out, half)?;
            Ok(())
        })
        .await?;
    Ok(Some(BlobRef { id, size }))
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
        id: blobs.put(bytes).await?,
        size,
    }))
}

/// Round records as the store holds them (JSON).
fn parse_records<T: serde::de::DeserializeOwned>(jsons: &[String]) -> Result<Vec<T>, ServerError> {
    jsons
        .iter()
        .map(|json| {
            serde_json::from_str(json)
                .map_err(|e| ServerError::Settings(format!("stored round record: {e}")))
        })
        .collect()
}
