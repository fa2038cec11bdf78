//! Starting a run, or resuming the one the store holds: its model, strategy state and privacy
//! spent are read back, the round that was open is reopened with its stored updates folded
//! again, and a committed round whose federated evaluation had not closed is scored again.

use std::{collections::HashMap, sync::Arc};

use ferry_core::{
    Model, aggregate::UpdateSource, strategy::Strategy, update_file::UpdateFile, wire,
};
use ferry_engine::{fedbuff::FedBuff, floor::RoundFloor, node::Evaluator, record::RoundRecord};
use tokio::sync::{Mutex, mpsc, watch};

use crate::{
    ServerError,
    blobs::Blobs,
    coordinator::{
        BlobRef, Coordinator, Event, RunSpec, State, parse_records, put_control, put_download,
        put_model,
    },
    store::{RunRow, Store},
};

impl Coordinator {
    /// Starts a new run from `initial`, or resumes the one in `store` (which must have been
    /// started with the same configuration). Rounds are scored by `evaluator`, or not at all
    /// centrally when there is none. Events go to the returned receiver.
    pub async fn start(
        mut spec: RunSpec,
        mut strategy: Strategy,
        initial: Model,
        evaluator: Option<Arc<dyn Evaluator>>,
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
                    model_sha: put_model(&blobs, &initial).await?.id,
                    state_sha: String::new(),
                    finished: String::new(),
                };
                store.start_run(&run).await?;
                run
            }
        };
        let layout = initial.layout().clone();
        drop(initial);
        let global = Model::read_safetensors(
            std::io::BufReader::new(blobs.open(&run.model_sha).await?),
            &spec.personal,
        )?;
        layout.check_same(global.layout())?;
        if !run.state_sha.is_empty() {
            strategy
                .optimizer
                .restore(wire::decode_vectors(&blobs.get(&run.state_sha).await?)?)?;
        }
        if let Some(privacy) = strategy.privacy.as_mut() {
            // The privacy spent and the adaptive clip norm follow from the committed rounds.
            let history: Vec<RoundRecord> = parse_records(&store.round_records().await?)?;
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
            id: run.model_sha.clone(),
        };
        let download_blob = put_download(&blobs, &global, spec.compress).await?;
        let control_blob = put_control(&blobs, strategy.optimizer.broadcast()).await?;
        let (events, receiver) = mpsc::unbounded_channel();
        let floor = RoundFloor::of(&strategy, spec.secure.as_ref());
        for notice in raise_to_floor(&mut spec, &floor) {
            // The receiver is returned below; the notice waits in the channel until then.
            let _ = events.send(Event::Notice(notice));
        }
        let coordinator = Arc::new(Self {
            run_id: run.run_id.clone(),
            layout,
            spec,
            store,
            blobs,
            evaluator,
            floor,
            state: Mutex::new(State {
                strategy,
                global: Some(Arc::new(global)),
                model_blob,
                download_blob,
                control_blob,
                round: run.round,
                training: None,
                evaluating: None,
                cross_site: None,
                closing: None,
                finished: (!run.finished.is_empty()).then(|| run.finished.clone()),
                online: HashMap::new(),
                relays: HashMap::new(),
                in_flight: HashMap::new(),
                failures: 0,
                last_failure: None,
                retry_at: None,
                waiting_noted: false,
                fleet_check: None,
                stop_requested: false,
            }),
            changed: watch::channel(0).0,
            work: watch::channel(0).0,
            events,
        });
        coordinator.resume_open_round().await?;
        coordinator.resume_evaluation().await?;
        Ok((coordinator, receiver))
    }

    /// After a restart: if the latest committed round's model was due a federated evaluation
    /// that had not closed, it is evaluated again before the next round; a run whose last
    /// round is committed and evaluated is marked finished.
    async fn resume_evaluation(&self) -> Result<(), ServerError> {
        let mut state = self.state.lock().await;
        if state.finished.is_some() || state.training.is_some() {
            return Ok(());
        }
        let Some(last) = self.history().await?.pop() else {
            return Ok(());
        };
        let finish = self.finish_reason(&last);
        if self.evaluation_due(&last) {
            self.emit(Event::Notice(format!(
                "round {} is committed; its federated evaluation starts again",
                last.round
            )));
            self.open_evaluation(&mut state, last, finish);
        } else if let Some(reason) = finish.clone().filter(|r| self.ends_with_site_models(r)) {
            self.open_site_models(&mut state, last, reason).await?;
        } else if let Some(reason) = finish {
            self.store.finish_run(&reason).await?;
            state.finished = Some(reason);
        }
        Ok(())
    }

    /// After a restart: reopens the stored cohort's round and re-folds its stored updates.
    async fn resume_open_round(&self) -> Result<(), ServerError> {
        let mut state = self.state.lock().await;
        if state.finished.is_some() {
            return Ok(());
        }
        if let Some(buffer) = self.buffered().copied() {
            return self.resume_version(&mut state, &buffer).await;
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
        let plan = self.plan_round(&mut state, population).await?;
        let mut training = self.open_training(&mut state, plan, cohort.into_iter().collect());
        // A relay's partial aggregate is one blob counted for each of its contributors: it
        // is folded once.
        // (Two nodes' own updates may be the same bytes, so only partials are folded once.)
        let mut partials = std::collections::HashSet::new();
        for (node, sha) in self.store.accepted(state.round).await? {
            if !partials.contains(&sha) {
                let file = std::io::BufReader::new(self.blobs.open(&sha).await?);
                let mut update = UpdateFile::open(file, &self.layout)?;
                if update.meta().partial.is_some() {
                    partials.insert(sha.clone());
                }
                training.open.accept_source(&node, &mut update)?;
            }
            training.answered.insert(node.clone());
            training.delivered.insert(node);
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
}

impl Coordinator {
    /// After a restart of an asynchronous run: reopens the open version and re-folds its
    /// stored updates, each with the staleness weight of the round it was trained on.
    async fn resume_version(&self, state: &mut State, buffer: &FedBuff) -> Result<(), ServerError> {
        let accepted = self.store.accepted_trained_on(state.round).await?;
        if accepted.is_empty() {
            return Ok(());
        }
        let plan = self.plan_round(state, accepted.len()).await?;
        let mut training = self.open_training(state, plan, Default::default());
        for (node, sha, trained_on) in accepted {
            let file = std::io::BufReader::new(self.blobs.open(&sha).await?);
            let mut update = UpdateFile::open(file, &self.layout)?;
            let tau = u64::from(state.round.saturating_sub(trained_on));
            let staleness = Some((tau, buffer.staleness.weight(tau)));
            Self::fold_weighted(&mut training, &node, &mut update, staleness)?;
            training.answered.insert(node.clone());
            training.delivered.insert(node);
        }
        self.emit(Event::Notice(format!(
            "resumed version {} with {} of its {} updates already in",
            state.round,
            training.delivered.len(),
            buffer.buffer_size
        )));
        state.training = Some(training);
        Ok(())
    }
}

/// Raises `spec`'s `min_clients` and `min_results` to `floor`, returning a notice for each
/// setting raised: a round started or closed with fewer could never be aggregated.
fn raise_to_floor(spec: &mut RunSpec, floor: &RoundFloor) -> Vec<String> {
    let Some(reason) = &floor.reason else {
        return Vec::new();
    };
    let mut notices = Vec::new();
    let mut raise = |setting: &mut usize, name: &str| {
        if *setting < floor.updates {
            notices.push(format!(
                "{name} raised from {setting} to {}: {reason}",
                floor.updates
            ));
            *setting = floor.updates;
        }
    };
    raise(&mut spec.cohort.min_clients, "min_clients");
    raise(&mut spec.min_results, "min_results");
    notices
}
