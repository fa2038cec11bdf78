//! Uploads and reports from nodes: whether a node may upload, taking a complete update (or a
//! secure round's masked input) into the open round, the secure round's steps, and failures.

use ferry_core::aggregate::UpdateSource;

use crate::{
    coordinator::{Coordinator, Event, Refusal, State, Submission},
    secure::{SecAggReply, SecAggStep},
    staged::Verified,
    store::Acceptance,
};

impl Coordinator {
    /// Checks that `node` may upload for `round`; `Ok(Some(Duplicate))` if that update was
    /// already counted.
    pub async fn may_upload(&self, node: &str, round: u32) -> Result<Option<Submission>, Refusal> {
        let (open_for_node, answered, current) = {
            let state = self.state.lock().await;
            if self.destination(&state, node, round).is_some()
                || Self::tuning_upload_open(&state, node, round)
            {
                return Ok(None);
            }
            if let Some(refusal) = Self::send_again(&state, node, round) {
                return Err(refusal);
            }
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

    /// Takes a complete, hash-checked upload: checks it against the model, stores it (moving
    /// the staged file into the blob store), and folds it into the open round a piece at a
    /// time from that file.
    pub async fn submit(
        &self,
        node: &str,
        round: u32,
        upload: Verified,
    ) -> Result<Submission, Refusal> {
        if self.spec.secure.is_some() {
            let bytes = upload
                .read()
                .await
                .map_err(|e| Refusal::NotOpen(e.to_string()))?;
            return self.submit_masked(node, round, &bytes).await;
        }
        if Self::tuning_upload_open(&*self.state.lock().await, node, round) {
            return self.submit_site_model(node, round, upload).await;
        }
        let checked = upload.open_update(&self.layout).and_then(|mut file| {
            self.spec.accepts(file.meta().compression)?;
            file.check()?;
            Ok(file)
        });
        // Decide under the lock; store outside it (blob store and database may be remote);
        // then check again under the lock before folding.
        let destination = {
            let mut state = self.state.lock().await;
            let Some(destination) = self.destination(&state, node, round) else {
                drop(state);
                return self.may_upload(node, round).await.and_then(|dup| {
                    dup.ok_or_else(|| Refusal::NotOpen(format!("round {round} closed")))
                });
            };
            if let Err(e) = &checked {
                let refusal = Refusal::Invalid(e.to_string());
                self.refuse(&mut state, node, &refusal);
                return Err(refusal);
            }
            destination
        };
        let counted_in = destination.round;
        let mut file = checked.map_err(|e| Refusal::Invalid(e.to_string()))?;
        let stored = async {
            upload.keep(&self.blobs).await?;
            self.store
                .accept_trained_on(counted_in, round, node, upload.id())
                .await
        }
        .await;
        drop(upload);
        match stored {
            Ok(Acceptance::Accepted) => {}
            Ok(Acceptance::Duplicate) => return Ok(Submission::Duplicate),
            Ok(Acceptance::RoundClosed) => {
                return Err(Refusal::NotOpen(format!("round {round} closed")));
            }
            Err(e) => return Err(Refusal::NotOpen(format!("could not store the update: {e}"))),
        }
        let mut state = self.state.lock().await;
        if self
            .destination(&state, node, round)
            .is_none_or(|d| d.round != counted_in)
        {
            // The round closed while the update was stored: it was not folded, so it does
            // not count (the round's commit forgets it too, should this fail). An asynchronous
            // task still in flight sends it again, into the next version.
            let again = Self::send_again(&state, node, round);
            drop(state);
            let _ = self.store.unaccept(counted_in, node).await;
            if let Some(refusal) = again {
                return Err(refusal);
            }
            return Err(Refusal::NotOpen(format!(
                "round {round} closed while the update was stored"
            )));
        }
        let Some(training) = state.training.as_mut() else {
            return Err(Refusal::NotOpen("round closed".into()));
        };
        training.answered.insert(node.to_string());
        let folded = Self::fold_weighted(training, node, &mut file, destination.staleness);
        state.in_flight.remove(node);
        if let Err(e) = folded {
            // Refused by the strategy (for example a missing SCAFFOLD extra): not counted.
            let _ = self.store.unaccept(counted_in, node).await;
            let refusal = Refusal::Invalid(e.to_string());
            self.emit(Event::Notice(format!(
                "refused node {node}'s update for round {round}: {e}"
            )));
            return Err(refusal);
        }
        if let Some(t) = state.training.as_mut() {
            t.delivered.insert(node.to_string());
        }
        drop(state);
        metrics::counter!("ferry_updates_accepted_total").increment(1);
        self.emit(Event::UpdateAccepted { round: counted_in });
        if destination.staleness.is_some() {
            // A slot is free: a waiting node may be handed a task.
            self.notify_work();
        } else {
            self.notify();
        }
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
        training.delivered.insert(node.to_string());
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
        let Some(training) = state
            .training
            .as_mut()
            .filter(|t| t.plan_task.round == round && t.cohort.contains(node))
        else {
            return Err(Refusal::NotOpen(format!(
                "no secure round {round} is open for this node (the server is at round \
                 {current}); pull a new task"
            )));
        };
        let Some(secure) = training.secure.as_mut() else {
            return Err(Refusal::NotOpen("the open round is not secure".into()));
        };
        let reply = match secure.handle(node, step) {
            Ok(reply) => reply,
            Err(refusal @ Refusal::NotOpen(_)) => {
                // The round went on without this node (it missed a stage): it is done with
                // the round, so it is not handed the task again and does not spin.
                training.answered.insert(node.to_string());
                return Err(refusal);
            }
            Err(refusal) => return Err(refusal),
        };
        drop(state);
        if matches!(reply, SecAggReply::Ack) {
            self.notify();
        }
        Ok(reply)
    }

    fn refuse(&self, state: &mut State, node: &str, refusal: &Refusal) {
        if let (Some(t), Refusal::Invalid(reason)) = (state.training.as_mut(), refusal) {
            t.answered.insert(node.to_string());
            t.open.fail(node, reason.to_string());
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
        if self.evaluation_failed(&mut state, node, round, reason)
            || self.site_models_failed(&mut state, node, reason)
        {
            drop(state);
            self.notify();
            return;
        }
        if self.buffered().is_some() && self.destination(&state, node, round).is_some() {
            state.in_flight.remove(node);
            if let Some(t) = state.training.as_mut() {
                t.open.fail(node, reason.to_string());
            }
            self.emit(Event::Notice(format!(
                "node {node} gave up its task on round {round}'s model: {reason}"
            )));
            drop(state);
            self.notify_work();
            return;
        }
        if let Some(t) = state.training.as_mut().filter(|t| {
            t.plan_task.round == round && t.cohort.contains(node) && !t.answered.contains(node)
        }) {
            t.answered.insert(node.to_string());
            t.open.fail(node, reason.to_string());
            self.emit(Event::Notice(format!(
                "node {node} gave up round {round}: {reason}"
            )));
            drop(state);
            self.notify();
        }
    }
}
