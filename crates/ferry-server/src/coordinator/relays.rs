//! What relays ask of the coordinator: their subtree's work in one answer, their nodes marked
//! alive in one step, and their partial aggregates counted for every contributor at once.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use ferry_core::aggregate::{UpdateSource, Weighting};

use crate::{
    coordinator::{
        COORDINATOR_ERROR, Coordinator, EvaluationTask, Event, NodeTask, Refusal, Submission,
        unix_ms,
    },
    staged::Verified,
    store::PartialAcceptance,
};

/// How long before the round's deadline a relay sends what it holds: a fifth of the round's
/// time, between 1 and 30 seconds, so that the partial reaches the server before it closes.
fn relay_margin(round_timeout: Duration) -> Duration {
    (round_timeout / 5).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// How a relay may fold its nodes' training updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayFold {
    /// Not at all: each update goes on as it came (robust rules, central DP).
    #[default]
    PassThrough,
    /// Into one weighted sum (the linear rules).
    Weighted(Weighting),
    /// SecAgg+: the masked inputs added modulo 2^k, masks still on.
    MaskedSum,
}

/// A relay's subtree's work, as one answer.
#[derive(Debug, Clone, Default)]
pub struct RelayView {
    /// The open round's task and the subtree's cohort nodes that have not answered.
    pub train: Option<(NodeTask, Vec<String>)>,
    /// The open evaluation's task and the subtree's nodes that are asked to score it.
    pub evaluate: Option<(EvaluationTask, Vec<String>)>,
    /// Why the other nodes have nothing to do.
    pub idle: String,
    /// Why the run ended, once it has.
    pub finished: Option<String>,
    /// How the relay may fold updates.
    pub fold: RelayFold,
    /// When the relay sends what it holds of the open round.
    pub relay_deadline_unix_ms: u64,
}

impl Coordinator {
    /// Marks `relays` (a relay and those below it it heard from) and every one of `nodes`
    /// (their online nodes) alive now.
    pub async fn seen_all<'a>(
        &self,
        relays: impl Iterator<Item = &'a str>,
        nodes: impl Iterator<Item = &'a str>,
    ) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        for relay in relays {
            state.relays.insert(relay.to_string(), now);
        }
        let mut newly = false;
        for node in nodes {
            newly |= state.online.insert(node.to_string(), now).is_none();
        }
        drop(state);
        if newly {
            self.notify();
        }
    }

    /// What the nodes in `members` (a relay's subtree) are to do now.
    pub async fn relay_view(&self, members: &HashSet<String>) -> RelayView {
        let state = self.state.lock().await;
        let mut view = RelayView {
            fold: if self.spec.secure.is_some() {
                RelayFold::MaskedSum
            } else {
                state
                    .strategy
                    .relay_fold()
                    .map_or(RelayFold::PassThrough, RelayFold::Weighted)
            },
            ..RelayView::default()
        };
        view.idle = self.idle_reason(&state);
        match state.finished.as_deref() {
            // As for a node of its own: the server is about to restart; the subtree waits.
            Some(COORDINATOR_ERROR) => return view,
            Some(reason) => {
                view.finished = Some(reason.to_string());
                return view;
            }
            None => {}
        }
        if let Some(t) = &state.training {
            // Once a secure round's keys are shared, only the nodes that shared them owe an
            // input. Both sets are sorted, so the subtree's part comes sorted.
            let owing = t.secure.as_ref().and_then(|s| s.masking_nodes());
            let waiting: Vec<String> = owing
                .map_or(&t.cohort, |nodes| nodes)
                .iter()
                .filter(|n| members.contains(*n) && !t.answered.contains(*n))
                .cloned()
                .collect();
            view.relay_deadline_unix_ms = unix_ms(
                t.deadline
                    .checked_sub(relay_margin(self.spec.round_timeout))
                    .unwrap_or(t.started),
            );
            view.train = Some((self.node_task(&state, t), waiting));
        }
        let mut asked = members
            .iter()
            .filter_map(|node| Some((node, self.evaluation_for(&state, node)?)));
        if let Some((first, task)) = asked.next() {
            let mut nodes: Vec<String> = std::iter::once(first.clone())
                .chain(asked.map(|(node, _)| node.clone()))
                .collect();
            nodes.sort();
            view.evaluate = Some((task, nodes));
        }
        view
    }

    /// Takes a relay's complete, hash-checked partial aggregate for `round`: every contributor
    /// must be in `members` (the relay's subtree) and still owe the round its update; then
    /// it is stored, counted for each contributor in one transaction, and folded once.
    pub async fn submit_partial(
        &self,
        relay: &str,
        members: &HashSet<String>,
        round: u32,
        upload: Verified,
    ) -> Result<Submission, Refusal> {
        if self.spec.secure.is_some() {
            return self.submit_masked_sum(relay, members, round, upload).await;
        }
        let mut file = upload
            .open_update(&self.layout)
            .and_then(|mut file| {
                self.spec.accepts(file.meta().compression)?;
                file.check()?;
                Ok(file)
            })
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let Some(partial) = file.meta().partial.clone() else {
            return Err(Refusal::Invalid(
                "a relay uploads partial aggregates as itself; a node's own update travels on \
                 its behalf"
                    .into(),
            ));
        };
        let contributors: Vec<String> = partial
            .contributors
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let outsiders = {
            let state = self.state.lock().await;
            let Some(t) = state
                .training
                .as_ref()
                .filter(|t| t.plan_task.round == round)
            else {
                return Err(Refusal::NotOpen(format!("round {round} is not open")));
            };
            if self.spec.secure.is_some() || state.strategy.relay_fold() != Some(partial.weighting)
            {
                return Err(Refusal::Invalid(
                    "this run's rule does not fold updates at relays; a relay passes each \
                     update through"
                        .into(),
                ));
            }
            contributors
                .iter()
                .filter(|n| {
                    !members.contains(*n) || !t.cohort.contains(*n) || t.answered.contains(*n)
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        if !outsiders.is_empty() {
            return self.not_counted(round, upload.id(), outsiders).await;
        }
        let stored = async {
            upload.keep(&self.blobs).await?;
            self.store
                .accept_partial(round, &contributors, upload.id())
                .await
        }
        .await;
        let id = upload.id().to_string();
        drop(upload);
        match stored {
            Ok(PartialAcceptance::Accepted) => {}
            Ok(PartialAcceptance::Duplicate) => return Ok(Submission::Duplicate),
            Ok(PartialAcceptance::CountedElsewhere(nodes)) => {
                return Ok(Submission::NotCounted(nodes));
            }
            Ok(PartialAcceptance::RoundClosed) => {
                return Err(Refusal::NotOpen(format!("round {round} closed")));
            }
            Err(e) => {
                return Err(Refusal::NotOpen(format!(
                    "could not store the partial aggregate: {e}"
                )));
            }
        }
        let mut state = self.state.lock().await;
        let Some(training) = state.training.as_mut().filter(|t| {
            t.plan_task.round == round && contributors.iter().all(|n| !t.answered.contains(n))
        }) else {
            drop(state);
            let _ = self.store.unaccept_partial(round, &id).await;
            return Err(Refusal::NotOpen(format!(
                "round {round} closed while the partial aggregate was stored"
            )));
        };
        if let Err(e) = training.open.accept_source(relay, &mut file) {
            let _ = self.store.unaccept_partial(round, &id).await;
            self.emit(Event::Notice(format!(
                "refused relay {relay}'s partial aggregate for round {round}: {e}"
            )));
            return Err(Refusal::Invalid(e.to_string()));
        }
        for node in &contributors {
            training.answered.insert(node.clone());
            training.delivered.insert(node.clone());
        }
        drop(state);
        metrics::counter!("ferry_updates_accepted_total").increment(contributors.len() as u64);
        metrics::counter!("ferry_partials_accepted_total").increment(1);
        self.emit(Event::UpdateAccepted { round });
        self.notify();
        Ok(Submission::Accepted)
    }

    /// Takes a relay's sum of its nodes' masked inputs for the secure round `round`: every
    /// contributor must be in `members` and owe the round its input; then the sum folds into
    /// the round's masked sum, counted for each contributor.
    async fn submit_masked_sum(
        &self,
        relay: &str,
        members: &HashSet<String>,
        round: u32,
        upload: Verified,
    ) -> Result<Submission, Refusal> {
        let bytes = upload
            .read()
            .await
            .map_err(|e| Refusal::NotOpen(e.to_string()))?;
        drop(upload);
        let Some(secure) = &self.spec.secure else {
            return Err(Refusal::NotOpen("the run is not secure".into()));
        };
        // Read whole here, outside the lock: only the decision and the fold happen under it.
        let sum = ferry_proto::secagg::masked_sum_from_bytes(
            &bytes,
            self.layout.num_params() + 1,
            &secure.params,
        )
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let contributors = &sum.contributors;
        let mut state = self.state.lock().await;
        let Some(training) = state
            .training
            .as_mut()
            .filter(|t| t.plan_task.round == round)
        else {
            return Err(Refusal::NotOpen(format!("round {round} is not open")));
        };
        let owing = training.secure.as_ref().and_then(|s| s.masking_nodes());
        let outsiders: Vec<String> = contributors
            .iter()
            .filter(|n| {
                !members.contains(*n)
                    || training.answered.contains(*n)
                    || owing.is_some_and(|owing| !owing.contains(*n))
            })
            .cloned()
            .collect();
        if !outsiders.is_empty() {
            // The masked sum is not stored, so a retried one is told the same: its nodes
            // are counted (by this very sum, the relay learns, or through another path).
            return Ok(Submission::NotCounted(outsiders));
        }
        let Some(secure) = training.secure.as_mut() else {
            return Err(Refusal::NotOpen("the open round is not secure".into()));
        };
        secure.take_masked_sum(&sum)?;
        for node in contributors {
            training.answered.insert(node.clone());
            training.delivered.insert(node.clone());
            training.open.note_secure_update(node, None);
        }
        training.open.add_protocol_bytes(bytes.len() as u64, 0);
        drop(state);
        metrics::counter!("ferry_updates_accepted_total").increment(contributors.len() as u64);
        metrics::counter!("ferry_partials_accepted_total").increment(1);
        tracing::debug!(
            "relay {relay}'s masked sum of {} inputs",
            contributors.len()
        );
        self.emit(Event::UpdateAccepted { round });
        self.notify();
        Ok(Submission::Accepted)
    }

    /// The answer to a partial some of whose contributors cannot count through it: a
    /// duplicate if this very partial was counted before (its receipt was lost), else the
    /// contributors to leave out.
    async fn not_counted(
        &self,
        round: u32,
        id: &str,
        outsiders: Vec<String>,
    ) -> Result<Submission, Refusal> {
        let counted = self
            .store
            .accepted(round)
            .await
            .map_err(|e| Refusal::NotOpen(format!("store unavailable: {e}")))?;
        let this: HashSet<&str> = counted
            .iter()
            .filter(|(_, blob)| blob == id)
            .map(|(node, _)| node.as_str())
            .collect();
        if !this.is_empty() && outsiders.iter().all(|n| this.contains(n.as_str())) {
            return Ok(Submission::Duplicate);
        }
        Ok(Submission::NotCounted(outsiders))
    }
}
