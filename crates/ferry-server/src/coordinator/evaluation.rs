//! Federated evaluation in a deployed run: after a committed round (on the run's schedule), a
//! seeded share of the online nodes scores the new global model on their own held-out data;
//! the next round starts once they have answered or the evaluation's deadline has passed. The
//! combined result is written into the committed round's record, and a run without a central
//! test set reaches its `target_accuracy` by it.

use std::{collections::BTreeSet, time::Instant};

use ferry_core::evaluation::{FederatedEvaluation, NodeEvaluation};
use ferry_engine::{record::RoundRecord, selection};

use crate::{
    ServerError,
    coordinator::{Coordinator, EvaluationTask, Event, Refusal, State, unix_ms},
};

/// Reasons a run ends when a round completes it.
pub(super) const ROUNDS_COMPLETED: &str = "rounds_completed";
/// The run reached its target accuracy.
pub(super) const TARGET_REACHED: &str = "target_reached";

/// A committed round's federated evaluation, while nodes score its model.
pub(super) struct Evaluating {
    /// The committed round's record, completed when the evaluation closes.
    record: RoundRecord,
    /// The nodes asked; `None` until a node is online to ask.
    asked: Option<BTreeSet<String>>,
    answered: BTreeSet<String>,
    results: Vec<(String, NodeEvaluation)>,
    failures: usize,
    seed: u64,
    opened: Instant,
    deadline: Instant,
    /// Why the run ends once the evaluation closes, if the round already ended it.
    then_finish: Option<String>,
}

impl Evaluating {
    /// Whether `node` is asked to score round `round` and has not answered.
    fn expects(&self, node: &str, round: u32) -> bool {
        self.record.round == round
            && self.asked.as_ref().is_some_and(|a| a.contains(node))
            && !self.answered.contains(node)
    }

    /// Nodes asked and evaluations in, for the status API.
    pub(super) fn progress(&self) -> (usize, usize) {
        (
            self.asked.as_ref().map_or(0, BTreeSet::len),
            self.results.len(),
        )
    }
}

impl Coordinator {
    /// Why a run whose latest committed round is `record` ends now, if it does: its last
    /// round is done, or its model reached the target (by the central test set, else by
    /// federated evaluation).
    pub(super) fn finish_reason(&self, record: &RoundRecord) -> Option<String> {
        if self.spec.target_accuracy.is_some_and(|t| record.reached(t)) {
            Some(TARGET_REACHED.to_string())
        } else if record.round >= self.spec.rounds {
            Some(ROUNDS_COMPLETED.to_string())
        } else {
            None
        }
    }

    /// Whether the model committed with `record` is to be evaluated by the nodes.
    /// A run with a cross-site matrix always has its final model scored, however it ends.
    pub(super) fn evaluation_due(&self, record: &RoundRecord) -> bool {
        let final_matrix = self.spec.cross_site.is_some() && self.finish_reason(record).is_some();
        record.federated.is_none()
            && (final_matrix || self.spec.evaluation.due(record.round, self.spec.rounds))
    }

    /// Opens the federated evaluation of committed `record`; the run ends after it for
    /// `then_finish`, if given.
    pub(super) fn open_evaluation(
        &self,
        state: &mut State,
        record: RoundRecord,
        then_finish: Option<String>,
    ) {
        state.evaluating = Some(Evaluating {
            record,
            asked: None,
            answered: BTreeSet::new(),
            results: Vec::new(),
            failures: 0,
            seed: 0,
            opened: Instant::now(),
            deadline: Instant::now() + self.spec.round_timeout,
            then_finish,
        });
        self.ask_evaluators(state);
    }

    /// Draws the evaluation's nodes from those online, once a round's worth of nodes is
    /// online (`min_clients`), or any is after a node's liveness window (`offline_after`): a
    /// restarted server hears from its nodes one by one, and the first to reconnect should not
    /// be the only one asked.
    fn ask_evaluators(&self, state: &mut State) {
        let Some(e) = state.evaluating.as_mut() else {
            return;
        };
        let waited = e.opened.elapsed() >= self.spec.offline_after;
        let enough = state.online.len() >= self.spec.cohort.min_clients
            || waited && !state.online.is_empty();
        if e.asked.is_some() || !enough {
            return;
        }
        let mut online: Vec<&String> = state.online.keys().collect();
        online.sort();
        let (chosen, seed) = selection::evaluators(
            online.len(),
            &self.spec.evaluation,
            self.spec.cohort.seed,
            e.record.round,
        );
        e.seed = seed;
        e.asked = Some(chosen.iter().map(|&i| online[i].clone()).collect());
        self.emit(Event::Notice(format!(
            "round {}: {} node(s) evaluate the new model on their own data",
            e.record.round,
            chosen.len()
        )));
    }

    /// While evaluating: asks nodes once some are online, and closes the evaluation when every
    /// node asked has answered or its deadline has passed. Returns whether anything changed.
    pub(super) async fn step_evaluation(
        &self,
        state: &mut State,
        now: Instant,
    ) -> Result<bool, ServerError> {
        let was_asked = state.evaluating.as_ref().is_some_and(|e| e.asked.is_some());
        self.ask_evaluators(state);
        let Some(e) = state.evaluating.as_ref() else {
            return Ok(false);
        };
        let all_answered = e
            .asked
            .as_ref()
            .is_some_and(|asked| e.answered.len() >= asked.len());
        if !all_answered && now < e.deadline {
            return Ok(!was_asked && e.asked.is_some());
        }
        self.close_evaluation(state).await?;
        Ok(true)
    }

    /// Writes the evaluation into its round's record, ends the run if the round or the
    /// evaluation ended it, and lets the next round start.
    async fn close_evaluation(&self, state: &mut State) -> Result<(), ServerError> {
        let Some(e) = state.evaluating.take() else {
            return Ok(());
        };
        let silent = e.asked.as_ref().map_or(0, |a| a.len() - e.answered.len());
        let mut record = e.record;
        record.federated = FederatedEvaluation::combine_named(&e.results, e.failures + silent);
        let mut finished = e.then_finish.or_else(|| self.finish_reason(&record));
        let site_models = finished
            .take_if(|reason| self.ends_with_site_models(reason))
            .map(|reason| (record.clone(), reason));
        let json = serde_json::to_string(&record)
            .map_err(|e| ServerError::Settings(format!("round record: {e}")))?;
        self.store
            .amend_round(record.round, &json, finished.as_deref())
            .await?;
        match &record.federated {
            Some(f) => {
                metrics::gauge!("ferry_federated_accuracy").set(f.accuracy);
                metrics::gauge!("ferry_federated_loss").set(f.loss);
                metrics::gauge!("ferry_federated_accuracy_min").set(f.accuracy_min);
                metrics::gauge!("ferry_federated_accuracy_max").set(f.accuracy_max);
                metrics::gauge!("ferry_federated_nodes").set(f.nodes as f64);
            }
            None => self.emit(Event::Notice(format!(
                "round {}: no node's evaluation arrived by the deadline",
                record.round
            ))),
        }
        metrics::counter!("ferry_evaluations_total").increment(1);
        self.emit(Event::RoundEvaluated(Box::new(record)));
        if let Some((record, reason)) = site_models {
            self.open_site_models(state, record, reason).await?;
        }
        if let Some(reason) = finished {
            state.finished = Some(reason.clone());
            self.emit(Event::Finished(reason));
        }
        Ok(())
    }

    /// The evaluation task for `node`, if it is asked to score a model now.
    pub(super) fn evaluation_for(&self, state: &State, node: &str) -> Option<EvaluationTask> {
        let e = state.evaluating.as_ref()?;
        e.expects(node, e.record.round).then(|| EvaluationTask {
            run_id: self.run_id.clone(),
            round: e.record.round,
            model: state.model_blob.clone(),
            seed: e.seed,
            deadline_unix_ms: unix_ms(e.deadline),
            site_model: None,
        })
    }

    /// Whether `node` is still expected to score `round`'s model.
    pub(super) fn evaluation_expects(state: &State, node: &str, round: u32) -> bool {
        state
            .evaluating
            .as_ref()
            .is_some_and(|e| e.expects(node, round))
    }

    /// Takes `node`'s score of `round`'s model (or of `site_model`'s own model, for the
    /// cross-site matrix). Figures that would corrupt the result are refused and count as the
    /// node's failure.
    pub async fn report_evaluation(
        &self,
        node: &str,
        round: u32,
        site_model: Option<&str>,
        evaluation: NodeEvaluation,
    ) -> Result<(), Refusal> {
        if let Some(site) = site_model {
            return self
                .report_site_model_score(node, round, site, evaluation)
                .await;
        }
        let mut state = self.state.lock().await;
        let current = state.round;
        let Some(e) = state.evaluating.as_mut().filter(|e| e.expects(node, round)) else {
            return Err(Refusal::NotOpen(format!(
                "no evaluation of round {round} is waiting for this node (the server is at \
                 round {current})"
            )));
        };
        e.answered.insert(node.to_string());
        let outcome = match evaluation.validate() {
            Ok(()) => {
                e.results.push((node.to_string(), evaluation));
                Ok(())
            }
            Err(reason) => {
                e.failures += 1;
                self.emit(Event::Notice(format!(
                    "refused node {node}'s evaluation of round {round}: {reason}"
                )));
                Err(Refusal::Invalid(reason))
            }
        };
        drop(state);
        self.notify();
        outcome
    }

    /// Records that `node` cannot score `round`'s model; returns whether it was asked to.
    pub(super) fn evaluation_failed(
        &self,
        state: &mut State,
        node: &str,
        round: u32,
        reason: &str,
    ) -> bool {
        let Some(e) = state.evaluating.as_mut().filter(|e| e.expects(node, round)) else {
            return false;
        };
        e.answered.insert(node.to_string());
        e.failures += 1;
        self.emit(Event::Notice(format!(
            "node {node} could not evaluate round {round}: {reason}"
        )));
        true
    }
}
