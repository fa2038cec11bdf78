//! The round driver: starts a round once enough nodes are online, closes it when its cohort
//! has answered or its deadline has passed, commits it, and fails and retries a round that
//! cannot close.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_core::{Model, server_opt::OptimizerState, wire};
use ferry_engine::{node::Score, round::AppliedRound};

use crate::{
    ServerError,
    coordinator::{
        COORDINATOR_ERROR, Coordinator, Event, FAILED_ROUNDS, FailedRound, FleetCheck, State,
        Training, put_control, put_download, put_model, unix_ms,
    },
    secure::Progress,
    store::RoundCommit,
};

/// The longest wait between attempts at a failing round (unless the configured backoff is
/// longer).
/// Why a run ends when its operator stopped it.
pub const STOPPED: &str = "stopped";

const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

impl Coordinator {
    /// Drives the run: starts rounds, closes them, commits them; returns when the run ends.
    /// An error of the coordinator's own (its store, blob store or evaluator) stops the run:
    /// it is logged, counted in `/metrics` (`ferry_coordinator_errors_total`) and shown by the
    /// status API, and since the store still holds the open round, a restart resumes it.
    pub async fn drive(self: Arc<Self>) -> Result<String, ServerError> {
        let mut changed = self.subscribe();
        loop {
            match self.step().await {
                Ok(Some(reason)) => return Ok(reason),
                Ok(None) => {}
                Err(error) => {
                    self.stop_on_error(&error).await;
                    return Err(error);
                }
            }
            // Wake on any change, or soon anyway to check deadlines and liveness.
            let _ = tokio::time::timeout(Duration::from_millis(250), changed.changed()).await;
        }
    }

    async fn stop_on_error(&self, error: &ServerError) {
        metrics::counter!("ferry_coordinator_errors_total").increment(1);
        let mut state = self.state.lock().await;
        let message = format!(
            "the coordinator stopped on an error in round {}: {error}; the store keeps the \
             round's accepted updates, so `ferry server` with the same configuration resumes it",
            state.round
        );
        state.last_failure = Some(message.clone());
        state.finished = Some(COORDINATOR_ERROR.to_string());
        drop(state);
        self.emit(Event::Notice(message));
        self.emit(Event::Finished(COORDINATOR_ERROR.to_string()));
        self.notify_work();
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
        let (open, secure) = state
            .training
            .as_ref()
            .map_or((false, false), |t| (true, t.secure.is_some()));
        let changed = match (open, secure) {
            (false, _) if state.cross_site.is_some() => self.step_site_models(state, now).await?,
            (false, _) if state.evaluating.is_some() => self.step_evaluation(state, now).await?,
            (false, _) => self.start_round(state, now).await?,
            (true, true) => self.step_secure(state, now).await?,
            (true, false) => match self.buffered().copied() {
                Some(buffer) => self.step_buffered(state, &buffer, now).await?,
                None => self.step_plain(state, now).await?,
            },
        };
        let closing = state.closing.take();
        let finished = state.finished.clone();
        drop(guard);
        if let Some(closing) = closing {
            let finished = self.commit_closing(closing).await?;
            self.notify_work();
            return Ok(finished);
        }
        if changed {
            // Rounds and evaluations open, deadlines extend and runs end only here.
            self.notify_work();
        }
        Ok(finished)
    }

    /// Starts the next round if its backoff is over and enough nodes are online; says once
    /// what it waits for otherwise.
    async fn start_round(&self, state: &mut State, now: Instant) -> Result<bool, ServerError> {
        if state.stop_requested {
            let reason = STOPPED.to_string();
            self.store.finish_run(&reason).await?;
            state.finished = Some(reason.clone());
            self.emit(Event::Finished(reason));
            return Ok(true);
        }
        if state.retry_at.is_some_and(|at| now < at) {
            return Ok(false);
        }
        let mut online: Vec<String> = state.online.keys().cloned().collect();
        online.sort();
        if online.len() < self.spec.cohort.min_clients {
            let changed = self.check_fleet(state).await?;
            if !state.waiting_noted || changed {
                state.waiting_noted = true;
                if let Some(waiting) = self.waiting(state) {
                    self.emit(Event::Notice(waiting));
                }
            }
            return Ok(false);
        }
        state.fleet_check = None;
        if let Some(epsilon) = state
            .strategy
            .privacy
            .as_ref()
            .and_then(|p| p.next_round_exceeds_budget())
        {
            let reason = "budget_exhausted".to_string();
            self.store.finish_run(&reason).await?;
            state.finished = Some(reason.clone());
            self.emit(Event::Notice(format!(
                "stopping before the next round: it would take epsilon to {epsilon:.3}, over \
                 the budget"
            )));
            self.emit(Event::Finished(reason));
            return Ok(true);
        }
        let plan = self.plan_round(state, online.len()).await?;
        // An asynchronous version's cohort is whoever is handed its model.
        let cohort: Vec<String> = match self.buffered() {
            Some(_) => Vec::new(),
            None => plan.selected.iter().map(|&i| online[i].clone()).collect(),
        };
        self.store.set_population(state.round, online.len()).await?;
        self.store.set_cohort(state.round, &cohort).await?;
        let training = self.open_training(state, plan, cohort.into_iter().collect());
        self.emit(Event::RoundStarted {
            round: state.round,
            cohort: training.cohort.len(),
        });
        state.training = Some(training);
        state.retry_at = None;
        state.waiting_noted = false;
        Ok(true)
    }

    /// While the run waits for nodes: asks the store (whenever the online count changes)
    /// whether enrolled nodes and unused tokens could still fill a round. Returns whether that
    /// answer changed.
    async fn check_fleet(&self, state: &mut State) -> Result<bool, ServerError> {
        let online = state.online.len();
        if state
            .fleet_check
            .as_ref()
            .is_some_and(|c| c.online == online)
        {
            return Ok(false);
        }
        let needed = self.spec.cohort.min_clients;
        let (enrolled, unused) = self.store.fleet_capacity().await?;
        let short = (enrolled + unused < needed).then(|| {
            format!(
                "only {enrolled} node(s) are enrolled and {unused} enrolment token(s) unused: \
                 create tokens for more nodes (`ferry token create`), or lower what the rule \
                 needs"
            )
        });
        let changed = state.fleet_check.as_ref().is_some_and(|c| c.short != short)
            || state.fleet_check.is_none() && short.is_some();
        state.fleet_check = Some(FleetCheck { online, short });
        Ok(changed)
    }

    /// A secure round: advances its stages; closes it once its sum is unmasked, fails it if
    /// the protocol aborts.
    async fn step_secure(&self, state: &mut State, now: Instant) -> Result<bool, ServerError> {
        let Some(t) = state.training.as_mut() else {
            return Ok(false);
        };
        let Some(secure) = t.secure.as_mut() else {
            return Ok(false);
        };
        match secure.advance(&t.cohort, &t.answered, t.deadline, now) {
            Progress::Waiting => Ok(false),
            Progress::Advanced { notice, training } => {
                if training {
                    t.deadline = now + self.spec.round_timeout;
                    t.deadline_unix_ms = unix_ms(t.deadline);
                }
                self.emit(Event::Notice(notice));
                Ok(true)
            }
            Progress::Finished(sum) => {
                let accepted = match &self.spec.secure {
                    Some(secure) => t.open.accept_sum(&secure.update_sum(&sum)),
                    None => Ok(()),
                };
                match accepted {
                    Ok(()) => self.close_round(state).await?,
                    Err(e) => self.fail_round(state, e.to_string()).await?,
                }
                Ok(true)
            }
            Progress::Aborted(reason) => {
                self.fail_round(state, format!("secure aggregation aborted: {reason}"))
                    .await?;
                Ok(true)
            }
        }
    }

    /// A round of plain updates: closes it when it can be aggregated, extends its deadline
    /// once when it falls short, and fails it when the extension falls short too.
    async fn step_plain(&self, state: &mut State, now: Instant) -> Result<bool, ServerError> {
        let private = state.strategy.privacy.is_some();
        let Some(t) = state.training.as_mut() else {
            return Ok(false);
        };
        let accepted = t.open.accepted();
        let all_answered = t.answered.len() >= t.cohort.len();
        let past_deadline = now >= t.deadline;
        // A private round closes with whoever answered by the deadline: widening its
        // Poisson-sampled cohort would break the accountant's assumption, and its noise makes
        // an empty round a valid (data-free) release.
        let ready = if private {
            all_answered || past_deadline
        } else {
            all_answered && accepted >= self.floor.updates
                || past_deadline && accepted >= self.spec.min_results
        };
        if ready {
            self.close_round(state).await?;
            return Ok(true);
        }
        if !all_answered && !past_deadline && !t.extended {
            return Ok(false);
        }
        if t.extended && past_deadline {
            let reason = format!(
                "{accepted} update(s) arrived by the extended deadline; {}",
                self.needs(all_answered)
            );
            self.fail_round(state, reason).await?;
            return Ok(true);
        }
        // Short of updates: idle online nodes join the cohort (during the extension, as soon
        // as they come online).
        let added = self.widen_cohort(state).await?;
        let Some(t) = state.training.as_mut() else {
            return Ok(false);
        };
        if t.extended {
            return Ok(added > 0);
        }
        t.extended = true;
        // Nodes that answered without an update are asked again.
        let delivered = &t.delivered;
        t.answered.retain(|node| delivered.contains(node));
        t.deadline = now + self.spec.round_timeout;
        t.deadline_unix_ms = unix_ms(t.deadline);
        self.emit(Event::Notice(format!(
            "round {}: {accepted} update(s) in; {}; deadline extended once by {:.0} s, {added} \
             node(s) added",
            t.plan_task.round,
            self.needs(all_answered),
            self.spec.round_timeout.as_secs_f64()
        )));
        Ok(true)
    }

    /// What a round that fell short needed: the rule's floor once everyone answered,
    /// `min_results` at the deadline (named by the rule when the rule set it).
    fn needs(&self, all_answered: bool) -> String {
        let rule_sets_it = all_answered || self.floor.updates >= self.spec.min_results;
        match &self.floor.reason {
            Some(reason) if rule_sets_it => reason.clone(),
            None if all_answered => "at least 1 update is needed".to_string(),
            _ => format!("min_results is {}", self.spec.min_results),
        }
    }

    /// Adds the online nodes outside the open round's cohort to it; returns how many.
    async fn widen_cohort(&self, state: &mut State) -> Result<usize, ServerError> {
        let Some(t) = state.training.as_mut() else {
            return Ok(0);
        };
        let idle: Vec<String> = state
            .online
            .keys()
            .filter(|n| !t.cohort.contains(*n))
            .cloned()
            .collect();
        if idle.is_empty() {
            return Ok(0);
        }
        self.store.set_cohort(t.plan_task.round, &idle).await?;
        t.cohort.extend(idle.iter().cloned());
        Ok(idle.len())
    }

    /// Ends the open round's attempt without touching the model: records it, forgets its
    /// updates, and schedules the retry, or stops the run after too many failures in a row.
    async fn fail_round(&self, state: &mut State, reason: String) -> Result<(), ServerError> {
        let Some(training) = state.training.take() else {
            return Ok(());
        };
        let attempt = Attempt::of(&training);
        drop(training);
        self.record_failure(state, attempt, reason).await
    }

    /// Records `attempt` as failed for `reason` (the store numbers it) and schedules the retry,
    /// or stops the run after too many failures in a row.
    async fn record_failure(
        &self,
        state: &mut State,
        attempt: Attempt,
        reason: String,
    ) -> Result<(), ServerError> {
        let failure = FailedRound {
            round: attempt.round,
            attempt: self.store.failed_attempts(attempt.round).await? + 1,
            reason,
            cohort: attempt.cohort,
            updates: attempt.updates,
            wall_s: attempt.started.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_string(&failure)
            .map_err(|e| ServerError::Settings(format!("failed round record: {e}")))?;
        self.store
            .fail_round(failure.round, failure.attempt, &json)
            .await?;
        metrics::counter!("ferry_rounds_failed_total").increment(1);
        state.failures += 1;
        state.last_failure = Some(failure.reason.clone());
        state.waiting_noted = false;
        let max = self.spec.max_round_failures;
        if state.failures >= max {
            let round = failure.round;
            let message = format!(
                "stopping: round {round} failed {} time(s) in a row (max-round-failures = \
                 {max}); last: {}. Bring more nodes online, or relax what the rule needs, and \
                 start `ferry server` again with the same configuration to resume from round \
                 {round}",
                state.failures, failure.reason
            );
            state.finished = Some(FAILED_ROUNDS.to_string());
            self.emit(Event::RoundFailed {
                failure,
                retry_in: None,
            });
            self.emit(Event::Notice(message));
            self.emit(Event::Finished(FAILED_ROUNDS.to_string()));
            return Ok(());
        }
        let doublings = (state.failures - 1).min(16);
        let backoff = (self.spec.retry_backoff * 2u32.pow(doublings))
            .min(MAX_RETRY_BACKOFF.max(self.spec.retry_backoff));
        state.retry_at = Some(Instant::now() + backoff);
        self.emit(Event::RoundFailed {
            failure,
            retry_in: Some(backoff),
        });
        Ok(())
    }

    /// Aggregates the open round under the lock and leaves it in `state.closing`, for
    /// [`Coordinator::commit_closing`] to evaluate, store and commit once the lock is released.
    /// A round whose aggregate cannot be formed fails (the model has not moved).
    pub(super) async fn close_round(&self, state: &mut State) -> Result<(), ServerError> {
        let Some(training) = state.training.take() else {
            return Ok(());
        };
        let attempt = Attempt::of(&training);
        let contributors: Vec<String> = training.delivered.iter().cloned().collect();
        let staleness = self.buffered().map(|_| training.staleness);
        let open = training.into_open();
        // Read back from its blob: the coordinator did not hold it while the round ran.
        let mut global = self.resident_global(state).await?;
        state.global = None;
        let applied = open.apply(&mut state.strategy, Arc::make_mut(&mut global));
        state.global = Some(global.clone());
        let applied = match applied {
            Ok(applied) => applied,
            Err(e) => {
                let reason = format!("the round could not be aggregated: {e}");
                return self.record_failure(state, attempt, reason).await;
            }
        };
        state.closing = Some(Closing {
            round: attempt.round,
            contributors,
            global,
            applied,
            optimizer: state.strategy.optimizer.save(),
            broadcast: state.strategy.optimizer.broadcast(),
            staleness,
        });
        Ok(())
    }

    /// Evaluates, stores and commits a round that [`Coordinator::close_round`] aggregated,
    /// with the state lock released (heartbeats, task pulls and the status API go on), then
    /// takes the lock to make the committed round current. Returns why the run ended, once it
    /// has. An error here is the coordinator's own (the model moved) and stops the run, which
    /// a restart resumes from the store.
    pub(super) async fn commit_closing(
        &self,
        closing: Closing,
    ) -> Result<Option<String>, ServerError> {
        let Closing {
            round,
            contributors,
            global,
            applied,
            optimizer,
            broadcast,
            staleness,
        } = closing;
        let evaluation = match self.evaluator.clone() {
            Some(evaluator) => {
                let model = global.clone();
                tokio::task::spawn_blocking(move || evaluator.evaluate(&model))
                    .await
                    .map_err(|e| ServerError::Settings(format!("evaluation task failed: {e}")))?
                    .map_err(|e| ServerError::Engine(ferry_engine::EngineError::Evaluation(e)))?
            }
            None => Score::unevaluated(),
        };
        let mut record = applied.record(evaluation);
        record.staleness = staleness;
        let model_blob = put_model(&self.blobs, &global).await?;
        let download_blob = put_download(&self.blobs, &global, self.spec.compress).await?;
        drop(global);
        let state_sha = if optimizer.is_empty() {
            String::new()
        } else {
            let named: Vec<(&str, &[f32])> = optimizer
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            self.blobs.put(wire::encode_vectors(&named)?).await?
        };
        let mut finished = self.finish_reason(&record);
        // A model due a federated evaluation is scored before the run may end.
        let evaluate = self.evaluation_due(&record);
        let ends_after_evaluation = if evaluate { finished.take() } else { None };
        let control_blob = put_control(&self.blobs, broadcast).await?;
        let written = [
            Some(&model_blob),
            download_blob.as_ref(),
            control_blob.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|blob| blob.id.clone())
        .chain((!state_sha.is_empty()).then(|| state_sha.clone()))
        .collect();
        self.store
            .commit_round(&RoundCommit {
                round,
                record_json: serde_json::to_string(&record)
                    .map_err(|e| ServerError::Settings(e.to_string()))?,
                model_sha: model_blob.id.clone(),
                state_sha,
                blobs: written,
                finished: finished.clone(),
                contributors,
            })
            .await?;
        self.prune(round).await;
        let mut state = self.state.lock().await;
        state.model_blob = model_blob;
        state.download_blob = download_blob;
        state.control_blob = control_blob;
        if let Some(epsilon) = record.epsilon {
            metrics::gauge!("ferry_dp_epsilon").set(epsilon);
        }
        state.round = round + 1;
        state.failures = 0;
        state.last_failure = None;
        metrics::counter!("ferry_rounds_total").increment(1);
        metrics::histogram!("ferry_round_duration_seconds").record(record.wall_s);
        self.emit(Event::RoundFinished(Box::new(record.clone())));
        if evaluate {
            self.open_evaluation(&mut state, record, ends_after_evaluation);
        }
        if let Some(reason) = &finished {
            state.finished = Some(reason.clone());
            self.emit(Event::Finished(reason.clone()));
        }
        Ok(state.finished.clone())
    }
}

/// A round aggregated under the state lock, on its way to being stored and committed outside
/// it.
pub(super) struct Closing {
    round: u32,
    /// The nodes whose updates it folded.
    contributors: Vec<String>,
    /// The new global model.
    global: Arc<Model>,
    applied: AppliedRound,
    /// The server optimizer's state after the step.
    optimizer: OptimizerState,
    /// What the strategy sends nodes with the next model (SCAFFOLD's control).
    broadcast: Option<Arc<Vec<f32>>>,
    /// Asynchronous runs: how stale the version's updates were.
    staleness: Option<ferry_engine::record::StalenessStats>,
}

/// What a failed attempt's record says of its round, taken before the round is consumed.
struct Attempt {
    round: u32,
    cohort: usize,
    updates: usize,
    started: Instant,
}

impl Attempt {
    fn of(training: &Training) -> Self {
        Self {
            round: training.plan_task.round,
            cohort: training.cohort.len(),
            updates: training.delivered.len(),
            started: training.started,
        }
    }
}
