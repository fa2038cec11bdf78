//! Sites' own models in a deployed run's cross-site validation matrix (`cross-site =
//! "local"`).
//!
//! Once the last round is committed and scored, the run does not end yet. Nodes that let their
//! own model leave the site (`ferry client --share-local-model`) fine-tune the final global
//! model on their own data and upload the update as in a round; the global model plus that
//! update is the site's own model. Then every node scores every site's model on its held-out
//! data, and the run ends with the matrix in the final round's record. The fine-tuned updates
//! are stored as accepted updates of the run's next round (which never opens), so a restarted
//! coordinator keeps them and only asks again for the scores.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use ferry_core::{
    Model,
    aggregate::UpdateSource,
    cross_site::{CrossSiteMatrix, CrossSiteModels, SiteScores},
    evaluation::NodeEvaluation,
    seed::mix_seed,
    strategy::ClientProcedure,
    update_file::decode_update,
};
use ferry_engine::{cross_site::own_model, record::RoundRecord};

use crate::{
    ServerError,
    coordinator::{
        BlobRef, Coordinator, EvaluationTask, Event, NodeTask, Refusal, RoundOrders, State,
        evaluation::{ROUNDS_COMPLETED, TARGET_REACHED},
        put_model, unix_ms,
    },
    staged::Verified,
    store::Acceptance,
};

/// Mixed into the run seed for the fine-tuning tasks' seed.
const TUNING_STREAM: u64 = 0x7E57_517E;

/// The run's last phase while sites' own models are fine-tuned and scored.
pub(super) struct CrossSitePhase {
    /// The final round's record (with its federated evaluation: the global row); the matrix
    /// is written into it.
    record: RoundRecord,
    /// Why the run ends once the matrix is written.
    then_finish: String,
    /// The round the fine-tuned updates are counted under: the run's next, never opened.
    round: u32,
    /// Whether fine-tuning is over and the sites' models are being scored.
    scoring: bool,
    /// When the phase opened (in this process).
    opened: Instant,
    deadline: Instant,
    /// Nodes handed the fine-tuning task that have not answered.
    tuning: BTreeSet<String>,
    /// Nodes that will send no model: they pulled without opting in, or failed to tune.
    declined: BTreeSet<String>,
    /// Each site's own model, stored.
    site_models: BTreeMap<String, BlobRef>,
    /// Each site model's scores so far, by the site that scored it.
    scores: BTreeMap<String, SiteScores>,
    /// `(site model, scorer)` pairs answered, whether with a score or a refusal.
    answered: BTreeSet<(String, String)>,
    /// Nodes that could not score and are asked nothing more.
    given_up: BTreeSet<String>,
}

impl CrossSitePhase {
    /// Nodes asked and answers in, for the status API: while fine-tuning, the nodes tuning
    /// and models in; while scoring, site models and cells scored.
    pub(super) fn progress(&self) -> (usize, usize) {
        if self.scoring {
            (self.site_models.len(), self.answered.len())
        } else {
            (
                self.tuning.len() + self.site_models.len(),
                self.site_models.len(),
            )
        }
    }

    /// The site model `node` is to score next, if any.
    fn next_for(&self, node: &str) -> Option<(&String, &BlobRef)> {
        if !self.scoring || self.given_up.contains(node) {
            return None;
        }
        self.site_models
            .iter()
            .find(|(site, _)| !self.answered.contains(&((*site).clone(), node.to_string())))
    }

    /// The matrix: the final federated evaluation's global row, then each site model's row.
    fn matrix(&self) -> Option<CrossSiteMatrix> {
        CrossSiteMatrix::of_evaluation(self.record.federated.as_ref()?)
            .map(|global| global.with_local_rows(&self.scores))
    }
}

impl Coordinator {
    /// Whether a run ending for `reason` first fine-tunes and scores its sites' own models.
    pub(super) fn ends_with_site_models(&self, reason: &str) -> bool {
        self.spec.cross_site == Some(CrossSiteModels::Local)
            && (reason == ROUNDS_COMPLETED || reason == TARGET_REACHED)
    }

    /// Opens the sites' own models' phase after the final round `record`; the run ends for
    /// `reason` once the matrix is written. Site models already fine-tuned (before a restart)
    /// are taken from the store.
    pub(super) async fn open_site_models(
        &self,
        state: &mut State,
        record: RoundRecord,
        reason: String,
    ) -> Result<(), ServerError> {
        let round = record.round + 1;
        let global = self.resident_global(state).await?;
        let mut site_models = BTreeMap::new();
        for (node, model) in self.stored_site_models(&global, round).await? {
            site_models.insert(node, put_model(&self.blobs, &model).await?);
        }
        self.emit(Event::Notice(format!(
            "round {} ended the training; nodes that share their own model fine-tune the final \
             model now, for the cross-site matrix ({} already in)",
            record.round,
            site_models.len()
        )));
        state.cross_site = Some(CrossSitePhase {
            record,
            then_finish: reason,
            round,
            scoring: false,
            opened: Instant::now(),
            deadline: Instant::now() + self.spec.round_timeout,
            tuning: BTreeSet::new(),
            declined: BTreeSet::new(),
            site_models,
            scores: BTreeMap::new(),
            answered: BTreeSet::new(),
            given_up: BTreeSet::new(),
        });
        Ok(())
    }

    /// The site model of node update blob `id`: the final global model plus the update.
    async fn site_model(&self, global: &Model, id: &str) -> Result<Model, ServerError> {
        let bytes = self.blobs.get(id).await?;
        let update = decode_update(&bytes, &self.layout)?;
        Ok(own_model(global, &update.delta))
    }

    /// The site models of the updates stored under `round` (the one after the last), by site.
    async fn stored_site_models(
        &self,
        global: &Model,
        round: u32,
    ) -> Result<BTreeMap<String, Model>, ServerError> {
        let mut models = BTreeMap::new();
        for (node, id) in self.store.accepted(round).await? {
            models.insert(node, self.site_model(global, &id).await?);
        }
        Ok(models)
    }

    /// The sites' own models of the finished run, by site, rebuilt from the stored updates
    /// (empty unless it ran with `cross-site = "local"`).
    pub async fn site_models(&self) -> Result<BTreeMap<String, Model>, ServerError> {
        if self.spec.cross_site != Some(CrossSiteModels::Local) {
            return Ok(BTreeMap::new());
        }
        let Some(last) = self.history().await?.pop() else {
            return Ok(BTreeMap::new());
        };
        let global = {
            let mut state = self.state.lock().await;
            self.resident_global(&mut state).await?
        };
        self.stored_site_models(&global, last.round + 1).await
    }

    /// What `node` does in the phase: fine-tune if it shares its model and has not yet,
    /// score the next site model, or wait.
    pub(super) fn site_model_work(
        &self,
        state: &mut State,
        node: &str,
        shares: bool,
    ) -> Option<super::Work> {
        let model = state.model_blob.clone();
        let training = self.spec.cohort.training.clone();
        let seed = mix_seed(self.spec.cohort.seed, TUNING_STREAM);
        let run_id = self.run_id.clone();
        let p = state.cross_site.as_mut()?;
        if !p.scoring {
            if p.site_models.contains_key(node) || p.declined.contains(node) {
                return None;
            }
            if !shares {
                p.declined.insert(node.to_string());
                return None;
            }
            p.tuning.insert(node.to_string());
            return Some(super::Work::Tune(Box::new(NodeTask {
                run_id,
                task: RoundOrders {
                    round: p.round,
                    training,
                    procedure: ClientProcedure::LocalSgd,
                    seed,
                    server_control: None,
                    privacy: None,
                },
                model,
                server_control: None,
                deadline_unix_ms: unix_ms(p.deadline),
                secagg: None,
            })));
        }
        let (site, blob) = p.next_for(node)?;
        Some(super::Work::Evaluate(EvaluationTask {
            run_id,
            round: p.round,
            model: blob.clone(),
            seed,
            deadline_unix_ms: unix_ms(p.deadline),
            site_model: Some(site.clone()),
        }))
    }

    /// Whether `node` is still expected to fine-tune or score in the phase of `round`.
    pub(super) fn site_models_expect(state: &State, node: &str, round: u32) -> bool {
        state.cross_site.as_ref().is_some_and(|p| {
            p.round == round
                && if p.scoring {
                    p.next_for(node).is_some()
                } else {
                    p.tuning.contains(node)
                }
        })
    }

    /// The blob `id` if it is a site model being scored.
    pub(super) fn site_model_blob(state: &State, id: &str) -> Option<BlobRef> {
        let p = state.cross_site.as_ref().filter(|p| p.scoring)?;
        p.site_models.values().find(|b| b.id == id).cloned()
    }

    /// Whether `node` may upload its fine-tuned update for `round` now.
    pub(super) fn tuning_upload_open(state: &State, node: &str, round: u32) -> bool {
        state
            .cross_site
            .as_ref()
            .is_some_and(|p| !p.scoring && p.round == round && p.tuning.contains(node))
    }

    /// Takes `node`'s fine-tuned update: stores it (durably, as the never-opened round's
    /// accepted update), and its site model beside it.
    pub(super) async fn submit_site_model(
        &self,
        node: &str,
        round: u32,
        upload: Verified,
    ) -> Result<super::Submission, Refusal> {
        // Checked against the model before it is kept: its site model is made from it.
        upload
            .open_update(&self.layout)
            .and_then(|mut file| file.check())
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let stored = async {
            upload.keep(&self.blobs).await?;
            self.store.accept(round, node, upload.id()).await
        }
        .await;
        let id = upload.id().to_string();
        drop(upload);
        match stored {
            Ok(Acceptance::Accepted) => {}
            Ok(Acceptance::Duplicate) => return Ok(super::Submission::Duplicate),
            Ok(Acceptance::RoundClosed) => {
                return Err(Refusal::NotOpen(format!(
                    "the run is no longer at round {round}"
                )));
            }
            Err(e) => {
                return Err(Refusal::NotOpen(format!("could not store the update: {e}")));
            }
        }
        let global = {
            let mut state = self.state.lock().await;
            self.resident_global(&mut state)
                .await
                .map_err(|e| Refusal::NotOpen(e.to_string()))?
        };
        let site_model = async {
            let model = self.site_model(&global, &id).await?;
            put_model(&self.blobs, &model).await
        }
        .await;
        let blob = match site_model {
            Ok(blob) => blob,
            Err(e) => {
                let _ = self.store.unaccept(round, node).await;
                return Err(Refusal::Invalid(format!(
                    "the fine-tuned update is not a model change: {e}"
                )));
            }
        };
        let mut state = self.state.lock().await;
        let Some(p) = state.cross_site.as_mut().filter(|p| p.round == round) else {
            return Err(Refusal::NotOpen("the cross-site phase ended".into()));
        };
        p.tuning.remove(node);
        p.site_models.insert(node.to_string(), blob);
        drop(state);
        self.emit(Event::Notice(format!(
            "node {node} sent its own fine-tuned model for the cross-site matrix"
        )));
        self.notify();
        Ok(super::Submission::Accepted)
    }

    /// Takes `node`'s score of `site`'s own model.
    pub(super) async fn report_site_model_score(
        &self,
        node: &str,
        round: u32,
        site: &str,
        evaluation: NodeEvaluation,
    ) -> Result<(), Refusal> {
        let mut state = self.state.lock().await;
        let Some(p) = state
            .cross_site
            .as_mut()
            .filter(|p| p.scoring && p.round == round && p.site_models.contains_key(site))
        else {
            return Err(Refusal::NotOpen(format!(
                "no scoring of site {site}'s model is waiting for this node"
            )));
        };
        if !p.answered.insert((site.to_string(), node.to_string())) {
            return Err(Refusal::NotOpen(format!(
                "this node already scored site {site}'s model"
            )));
        }
        let outcome = match evaluation.validate() {
            Ok(()) => {
                p.scores.entry(site.to_string()).or_default().insert(
                    node.to_string(),
                    (evaluation.accuracy, evaluation.num_examples),
                );
                Ok(())
            }
            Err(reason) => Err(Refusal::Invalid(reason)),
        };
        drop(state);
        self.notify();
        outcome
    }

    /// Records that `node` cannot fine-tune or score in the phase; returns whether it was
    /// asked to.
    pub(super) fn site_models_failed(&self, state: &mut State, node: &str, reason: &str) -> bool {
        let Some(p) = state.cross_site.as_mut() else {
            return false;
        };
        let asked = if p.scoring {
            p.next_for(node).is_some() && p.given_up.insert(node.to_string())
        } else {
            p.tuning.remove(node) && p.declined.insert(node.to_string())
        };
        if asked {
            self.emit(Event::Notice(format!(
                "node {node} gave up its part in the cross-site matrix: {reason}"
            )));
        }
        asked
    }

    /// Moves the phase on: from fine-tuning to scoring once every online node has sent its
    /// model or declined (or the deadline passed), and to the run's end once every online
    /// node has scored every site model (or the deadline passed). As for a federated
    /// evaluation, "every online node" counts only once a round's worth of nodes is online
    /// or a node's liveness window has passed: a restarted server hears from its nodes one
    /// by one. Returns whether anything changed.
    pub(super) async fn step_site_models(
        &self,
        state: &mut State,
        now: Instant,
    ) -> Result<bool, ServerError> {
        let online: Vec<String> = state.online.keys().cloned().collect();
        let Some(p) = state.cross_site.as_mut() else {
            return Ok(false);
        };
        let heard_enough = !online.is_empty()
            && (online.len() >= self.spec.cohort.min_clients
                || now.duration_since(p.opened) >= self.spec.offline_after);
        if !p.scoring {
            let all_answered = heard_enough
                && p.tuning.is_empty()
                && online
                    .iter()
                    .all(|n| p.site_models.contains_key(n) || p.declined.contains(n));
            if !all_answered && now < p.deadline {
                return Ok(false);
            }
            p.scoring = true;
            p.deadline = now + self.spec.round_timeout;
            let sites = p.site_models.len();
            if sites > 0 {
                self.emit(Event::Notice(format!(
                    "{sites} site(s) sent their own model; every node scores them now"
                )));
                return Ok(true);
            }
        }
        let all_scored = heard_enough && online.iter().all(|n| p.next_for(n).is_none());
        if !all_scored && now < p.deadline {
            return Ok(false);
        }
        self.close_site_models(state).await?;
        Ok(true)
    }

    /// Writes the matrix into the final round's record and ends the run.
    async fn close_site_models(&self, state: &mut State) -> Result<(), ServerError> {
        let Some(p) = state.cross_site.take() else {
            return Ok(());
        };
        let matrix = p.matrix();
        let mut record = p.record;
        record.cross_site = matrix;
        let json = serde_json::to_string(&record)
            .map_err(|e| ServerError::Settings(format!("round record: {e}")))?;
        self.store
            .amend_round(record.round, &json, Some(&p.then_finish))
            .await?;
        self.emit(Event::Notice(format!(
            "cross-site matrix: the global model and {} site model(s), scored by {} node(s)",
            p.scores.len(),
            p.answered
                .iter()
                .map(|(_, n)| n)
                .collect::<BTreeSet<_>>()
                .len()
        )));
        state.finished = Some(p.then_finish.clone());
        self.emit(Event::Finished(p.then_finish));
        Ok(())
    }
}
