//! The node agent's loop: enrol once, then pull a task, fetch the model, train while sending
//! heartbeats, upload the update; reconnect with backoff whenever the server is away, and stop
//! when the run is over.

use std::{path::PathBuf, sync::Arc, time::Duration};

use ferry_core::{
    Model, Update,
    evaluation::NodeEvaluation,
    personal::TensorRoles,
    privacy::{
        node::{NodePrivacy, privatize},
        noise::{NoiseSeed, NoiseSource},
    },
    strategy::ClientProcedure,
    task::LocalTraining,
    wire,
};
use ferry_proto::v1::{
    EvaluationReport, FailureReport, HeartbeatRequest, PullTaskRequest, Task, TaskKind,
    fleet_client::FleetClient, pull_task_response::Outcome,
};
use tonic::Status;

pub use crate::link::{AgentEvent, AgentSettings};
use crate::{
    ClientError,
    backoff::Backoff,
    connection::{self, StoredCredential},
    failover::Servers,
    feedback::Compressor,
    link::{Link, retry, round_gone},
    secure::SecureSession,
    transfer::{self, UploadBody},
};

/// What a trainer receives for one round.
#[derive(Debug, Clone)]
pub struct TrainTask {
    /// The round.
    pub round: u32,
    /// The global model.
    pub model: Model,
    /// Local training settings.
    pub training: LocalTraining,
    /// The strategy's client procedure.
    pub procedure: ClientProcedure,
    /// Server state sent with the model (SCAFFOLD's `c`).
    pub server_control: Option<Vec<f32>>,
    /// The round's seed, already mixed with this node's own stream.
    pub seed: u64,
    /// When the round may close without this node; a trainer may stop work past it.
    pub deadline: Option<std::time::SystemTime>,
    /// The run's personal tensors (carried in `model`: the node keeps its own values) and
    /// frozen tensors (carried, to come back unchanged).
    pub personal: TensorRoles,
}

/// What a trainer receives to score a round's global model (federated evaluation).
#[derive(Debug, Clone)]
pub struct EvalTask {
    /// The round whose model is scored.
    pub round: u32,
    /// The global model after that round.
    pub model: Model,
    /// The evaluation's seed, mixed with this node's own stream.
    pub seed: u64,
    /// When the server stops waiting for this node's score.
    pub deadline: Option<std::time::SystemTime>,
    /// The run's personal tensors (carried in `model`): the node scores with its own values.
    pub personal: TensorRoles,
}

/// Local training on the node's own data: the built-in burn trainer, or an external command.
pub trait Trainer: Send + Sync {
    /// Trains from `task.model` and returns the update. Runs on a blocking thread.
    fn train(&self, task: &TrainTask) -> Result<Update, String>;

    /// Scores `task.model` on the node's own held-out data. Runs on a blocking thread.
    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String>;
}

/// Runs the agent until the server says the run is over; returns its reason.
pub async fn run(
    settings: AgentSettings,
    trainer: Arc<dyn Trainer>,
    on_event: impl Fn(AgentEvent) + Send + Sync,
) -> Result<String, ClientError> {
    let channel = connection::channel(&settings.server)?;
    run_on(channel, settings, trainer, on_event).await
}

/// [`run`] over `channel`, which other agents in the process may share (a fleet simulator
/// multiplexes many nodes over one connection: each call carries its own node's credential).
pub async fn run_on(
    channel: Servers,
    settings: AgentSettings,
    trainer: Arc<dyn Trainer>,
    on_event: impl Fn(AgentEvent) + Send + Sync,
) -> Result<String, ClientError> {
    let mut client = FleetClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut backoff = Backoff::new(Duration::from_millis(250), settings.max_backoff);
    let credential = credential(&settings, &mut client, &mut backoff, &on_event).await?;
    on_event(AgentEvent::Ready {
        node_id: credential.node_id.clone(),
        name: credential.name.clone(),
    });
    loop {
        let request = credential.authorize(tonic::Request::new(PullTaskRequest {
            wait_ms: 20_000,
            share_local_model: settings.share_local_model,
        }));
        let outcome = match client.pull_task(request).await {
            Ok(response) => {
                backoff.reset();
                response.into_inner().outcome
            }
            Err(status) => {
                retry(&status, &settings, &mut backoff, &on_event).await?;
                continue;
            }
        };
        match outcome {
            Some(Outcome::Task(task)) if task.kind == TaskKind::Evaluate as i32 => {
                evaluate(
                    &settings,
                    &mut client,
                    &credential,
                    task,
                    trainer.clone(),
                    &mut backoff,
                    &on_event,
                )
                .await?;
            }
            Some(Outcome::Task(task))
                if task.kind == TaskKind::Tune as i32 && !settings.share_local_model =>
            {
                let reason = "this node does not share its own model; start it with \
                              --share-local-model to send one for the cross-site matrix";
                report_failure(&mut client, &credential, task.round, reason).await;
            }
            Some(Outcome::Task(task)) => {
                if task.kind == TaskKind::Tune as i32 {
                    on_event(AgentEvent::Tuning);
                }
                work(
                    &settings,
                    &mut client,
                    &credential,
                    task,
                    trainer.clone(),
                    &mut backoff,
                    &on_event,
                )
                .await?;
            }
            Some(Outcome::Finished(finished)) => return Ok(finished.reason),
            Some(Outcome::Idle(_)) | None => {}
        }
    }
}

/// Loads the stored credential or enrols with the token.
async fn credential(
    settings: &AgentSettings,
    client: &mut FleetClient<Servers>,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<StoredCredential, ClientError> {
    if let Some(stored) = StoredCredential::load(&settings.state_dir, &settings.server.url)? {
        return Ok(stored);
    }
    let token = settings.token.as_deref().ok_or_else(|| {
        ClientError::Settings(format!(
            "no credential in {} for {}; pass --token with a token from `ferry token create`",
            settings.state_dir.display(),
            settings.server.url
        ))
    })?;
    let secret = connection::enrolment_secret(&settings.state_dir)?;
    loop {
        match connection::enrol(client, &settings.server.url, token, &secret).await {
            Ok(credential) => {
                credential.save(&settings.state_dir)?;
                return Ok(credential);
            }
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

fn procedure(task: &Task) -> Result<ClientProcedure, String> {
    use ferry_proto::v1::Procedure;
    match Procedure::try_from(task.procedure) {
        Ok(Procedure::LocalSgd) => Ok(ClientProcedure::LocalSgd),
        Ok(Procedure::Proximal) => Ok(ClientProcedure::Proximal { mu: task.mu }),
        Ok(Procedure::Scaffold) => Ok(ClientProcedure::Scaffold),
        Ok(Procedure::Normalized) => Ok(ClientProcedure::Normalized),
        Ok(Procedure::LossReporting) => Ok(ClientProcedure::LossReporting),
        _ => Err(format!(
            "unknown client procedure {}; upgrade this node",
            task.procedure
        )),
    }
}

/// Fetches one blob into a file under the state folder, resuming across failures (and across
/// restarts of the agent); returns the verified file's path.
async fn fetch(
    settings: &AgentSettings,
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    blob: &ferry_proto::v1::BlobRef,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<Result<Downloaded, Status>, ClientError> {
    let dir = settings.state_dir.join("downloads");
    std::fs::create_dir_all(&dir).map_err(|e| {
        ClientError::Settings(format!(
            "cannot create {} for downloads: {e}; check the state folder's permissions",
            dir.display()
        ))
    })?;
    let path = transfer::download_path(&dir, &blob.hash);
    loop {
        match transfer::download(client, credential, &blob.hash, blob.size_bytes, &path).await {
            Ok(()) => return Ok(Ok(Downloaded(path))),
            Err(status) if round_gone(&status) => return Ok(Err(status)),
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// A verified download, removed once read.
struct Downloaded(PathBuf);

impl Downloaded {
    fn open(&self) -> Result<std::io::BufReader<std::fs::File>, String> {
        std::fs::File::open(&self.0)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("reading the downloaded blob {}: {e}", self.0.display()))
    }
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Downloads and reads the task's global model, with the run's personal tensors carried;
/// `None` when the task is gone or unusable (said through `on_event`, and reported to the
/// server when the node cannot read what it got).
async fn global_model(
    settings: &AgentSettings,
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    task: &Task,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<Option<(Model, TensorRoles)>, ClientError> {
    let round = task.round;
    let abandon = |reason: String| AgentEvent::Abandoned { round, reason };
    let Some(model_ref) = &task.model else {
        on_event(abandon("task lacks a model".into()));
        return Ok(None);
    };
    let file = match fetch(settings, client, credential, model_ref, backoff, on_event).await? {
        Ok(file) => file,
        Err(status) => {
            on_event(abandon(status.message().to_string()));
            return Ok(None);
        }
    };
    let read = file.open().and_then(|source| {
        let personal = TensorRoles::of(task.personal.clone(), task.frozen.clone())
            .map_err(|e| e.to_string())?;
        let model = Model::read_safetensors(source, &personal).map_err(|e| e.to_string())?;
        Ok((model, personal))
    });
    match read {
        Ok(read) => Ok(Some(read)),
        Err(e) => {
            report_failure(client, credential, round, &e).await;
            on_event(abandon(e));
            Ok(None)
        }
    }
}

/// Does one task: download, train with heartbeats, upload.
async fn work(
    settings: &AgentSettings,
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    task: Task,
    trainer: Arc<dyn Trainer>,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<(), ClientError> {
    let round = task.round;
    on_event(AgentEvent::Assigned(round));
    let abandon = |reason: String| AgentEvent::Abandoned { round, reason };
    let Some(training) = task.training else {
        on_event(abandon("task lacks training settings".into()));
        return Ok(());
    };
    let Some((model, personal)) =
        global_model(settings, client, credential, &task, backoff, on_event).await?
    else {
        return Ok(());
    };
    let server_control = match &task.server_control {
        Some(blob) => match fetch(settings, client, credential, blob, backoff, on_event).await? {
            Ok(file) => std::fs::read(&file.0)
                .ok()
                .and_then(|bytes| wire::decode_vectors(&bytes).ok())
                .and_then(|mut v| v.remove("control")),
            Err(status) => {
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
        },
        None => None,
    };
    let procedure = match procedure(&task) {
        Ok(procedure) => procedure,
        Err(reason) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
    let compressor = Compressor::load(
        &settings.state_dir,
        &task.run_id,
        &task.compress,
        model.num_params(),
    );
    let mut compressor = match compressor {
        Ok(compressor) => compressor,
        Err(reason) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
    let seed = ferry_core::seed::mix_seed(task.seed, settings.seed_stream);
    let train_task = TrainTask {
        round,
        model,
        training: LocalTraining {
            epochs: training.epochs,
            batch_size: training.batch_size as usize,
            lr: training.lr,
            momentum: training.momentum,
            weight_decay: training.weight_decay,
        },
        procedure,
        server_control,
        seed,
        deadline: deadline(&task),
        personal,
    };
    // Secure aggregation: keys are advertised and shared before training, so a node that
    // dies while training can still be unmasked around.
    let mut secure = match &task.secagg {
        Some(secagg) => {
            let mut link = Link {
                settings,
                client: &mut *client,
                credential,
                backoff: &mut *backoff,
                on_event,
            };
            match SecureSession::join(&mut link, round, secagg).await? {
                Ok(session) => Some(session),
                Err(reason) => {
                    on_event(abandon(format!("secure aggregation: {reason}")));
                    return Ok(());
                }
            }
        }
        None => None,
    };
    on_event(AgentEvent::Training(round));
    let layout = train_task.model.layout().clone();
    let job = tokio::task::spawn_blocking(move || trainer.train(&train_task));
    let interval = heartbeat_interval(&task);
    let mut update = match with_heartbeats(client, credential, round, interval, job).await {
        Some(Ok(update)) => update,
        Some(Err(reason)) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
        None => {
            on_event(abandon("the round closed while training".into()));
            return Ok(());
        }
    };
    if let Some(p) = task.privacy {
        // Whatever the trainer, the update is clipped and noised before it leaves the node,
        // with noise from this machine's entropy so the server cannot reproduce it.
        let instructions = NodePrivacy {
            clip: p.clip,
            noise_std: p.noise_std,
            count_noise_std: p.count_noise_std,
            per_layer: p.per_layer,
        };
        privatize(
            &mut update,
            &instructions,
            &layout,
            &mut NoiseSource::new(NoiseSeed::Os, 0),
        );
    }
    // The update itself is the upload's source: its bytes are read from it chunk by chunk.
    let encoded: Result<Arc<dyn UploadBody>, String> = match secure.as_mut() {
        Some(session) => session
            .mask(&update, layout.num_params())
            .map(|masked| Arc::new(bytes::Bytes::from(masked)) as Arc<dyn UploadBody>),
        None => compressor
            .encode(update, &layout, seed)
            .map(|encoded| Arc::new(encoded) as Arc<dyn UploadBody>),
    };
    let body = match encoded {
        Ok(body) => body,
        Err(reason) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
    let chunk = (task.max_chunk_bytes as usize).max(1024);
    let id = body.content_id();
    loop {
        match transfer::upload(client, credential, round, &body, &id, chunk).await {
            Ok(receipt) => {
                backoff.reset();
                compressor.delivered()?;
                on_event(AgentEvent::Delivered {
                    round,
                    duplicate: receipt.duplicate,
                });
                if let Some(session) = secure {
                    let mut link = Link {
                        settings,
                        client,
                        credential,
                        backoff,
                        on_event,
                    };
                    if let Err(reason) = session.unmask(&mut link).await? {
                        on_event(abandon(format!("secure aggregation, unmasking: {reason}")));
                    }
                }
                return Ok(());
            }
            Err(status) if round_gone(&status) => {
                compressor.lost()?;
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// Scores a round's global model on the node's held-out data and reports the figures (or
/// why it could not).
async fn evaluate(
    settings: &AgentSettings,
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    task: Task,
    trainer: Arc<dyn Trainer>,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<(), ClientError> {
    let round = task.round;
    let abandon = |reason: String| AgentEvent::Abandoned { round, reason };
    let Some((model, personal)) =
        global_model(settings, client, credential, &task, backoff, on_event).await?
    else {
        return Ok(());
    };
    let eval_task = EvalTask {
        round,
        model,
        seed: ferry_core::seed::mix_seed(task.seed, settings.seed_stream),
        deadline: deadline(&task),
        personal,
    };
    on_event(AgentEvent::Evaluating(round));
    let job = tokio::task::spawn_blocking(move || trainer.evaluate(&eval_task));
    let interval = heartbeat_interval(&task);
    let scored = match with_heartbeats(client, credential, round, interval, job).await {
        Some(scored) => scored.and_then(|e| e.validate().map(|()| e)),
        None => {
            on_event(abandon("the evaluation closed while scoring".into()));
            return Ok(());
        }
    };
    let evaluation = match scored {
        Ok(evaluation) => evaluation,
        Err(reason) => {
            let reason = format!("evaluation: {reason}");
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
    let report = EvaluationReport {
        round,
        site_model: task.site_model.clone(),
        num_examples: evaluation.num_examples,
        loss: evaluation.loss,
        accuracy: evaluation.accuracy,
        metrics: evaluation.metrics.into_iter().collect(),
    };
    loop {
        let request = credential.authorize(tonic::Request::new(report.clone()));
        match client.report_evaluation(request).await {
            Ok(_) => {
                on_event(AgentEvent::Evaluated {
                    round,
                    site_model: (!report.site_model.is_empty()).then(|| report.site_model.clone()),
                    accuracy: evaluation.accuracy,
                });
                return Ok(());
            }
            Err(status) if round_gone(&status) => {
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// How often to heartbeat while working on `task` (at most five times a second).
fn heartbeat_interval(task: &Task) -> Duration {
    Duration::from_millis(u64::from(task.heartbeat_interval_ms.max(200)))
}

/// When the server stops waiting for this node's answer to `task`.
fn deadline(task: &Task) -> Option<std::time::SystemTime> {
    (task.deadline_unix_ms > 0)
        .then(|| std::time::UNIX_EPOCH + Duration::from_millis(task.deadline_unix_ms))
}

/// Waits for the trainer to finish while heartbeating; `None` if the server says the round no
/// longer wants this node.
async fn with_heartbeats<T>(
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    round: u32,
    interval: Duration,
    mut job: tokio::task::JoinHandle<Result<T, String>>,
) -> Option<Result<T, String>> {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            done = &mut job => {
                return Some(done.unwrap_or_else(|e| Err(format!("trainer crashed: {e}"))));
            }
            _ = ticker.tick() => {
                let request = credential.authorize(tonic::Request::new(HeartbeatRequest { round }));
                // A missed heartbeat is fine: the server may be restarting; training goes on.
                if let Ok(response) = client.heartbeat(request).await
                    && !response.into_inner().keep_working
                {
                    return None;
                }
            }
        }
    }
}

async fn report_failure(
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    round: u32,
    reason: &str,
) {
    let request = credential.authorize(tonic::Request::new(FailureReport {
        round,
        reason: reason.to_string(),
    }));
    // Best effort: if the report is lost, the round's deadline covers this node.
    let _ = client.report_failure(request).await;
}
