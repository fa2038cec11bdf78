//! The node agent's loop: enrol once, then pull a task, fetch the model, train while sending
//! heartbeats, upload the update; reconnect with backoff whenever the server is away, and stop
//! when the run is over.

use std::{path::PathBuf, sync::Arc, time::Duration};

use ferry_core::{
    Model, Update,
    privacy::{
        node::{NodePrivacy, privatize},
        noise::{NoiseSeed, NoiseSource},
    },
    strategy::ClientProcedure,
    task::LocalTraining,
    wire,
};
use ferry_proto::v1::{
    FailureReport, HeartbeatRequest, PullTaskRequest, Task, fleet_client::FleetClient,
    pull_task_response::Outcome,
};
use tonic::{Code, Status, transport::Channel};

use crate::{
    ClientError,
    backoff::Backoff,
    connection::{self, ServerAddress, StoredCredential},
    secure::{Link, SecureSession},
    transfer,
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
}

/// Local training on the node's own data: the built-in burn trainer, or an external command.
pub trait Trainer: Send + Sync {
    /// Trains from `task.model` and returns the update. Runs on a blocking thread.
    fn train(&self, task: &TrainTask) -> Result<Update, String>;
}

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The server.
    pub server: ServerAddress,
    /// One-time enrolment token, used when the state folder holds no credential.
    pub token: Option<String>,
    /// Where the node keeps its credential (and trainer state).
    pub state_dir: PathBuf,
    /// Mixed into every round's seed so nodes draw different randomness.
    pub seed_stream: u64,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Give up after the server has been unreachable this long.
    pub give_up_after: Duration,
}

/// Something the agent reports while it works.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Enrolled (or reloaded the credential) as this node.
    Ready {
        /// The node's identifier.
        node_id: String,
        /// Its token name.
        name: String,
    },
    /// Training for a round.
    Training(u32),
    /// The round's update was accepted (or was already counted).
    Delivered {
        /// The round.
        round: u32,
        /// True when the server had already counted it.
        duplicate: bool,
    },
    /// The round went on without this node.
    Abandoned {
        /// The round.
        round: u32,
        /// Why.
        reason: String,
    },
    /// The server could not be reached; retrying.
    Retrying(String),
}

/// Runs the agent until the server says the run is over; returns its reason.
pub async fn run(
    settings: AgentSettings,
    trainer: Arc<dyn Trainer>,
    on_event: impl Fn(AgentEvent) + Send + Sync,
) -> Result<String, ClientError> {
    let mut client = FleetClient::new(connection::channel(&settings.server)?)
        .max_decoding_message_size(64 * 1024 * 1024);
    let mut backoff = Backoff::new(Duration::from_millis(250), settings.max_backoff);
    let credential = credential(&settings, &mut client, &mut backoff, &on_event).await?;
    on_event(AgentEvent::Ready {
        node_id: credential.node_id.clone(),
        name: credential.name.clone(),
    });
    loop {
        let request =
            credential.authorize(tonic::Request::new(PullTaskRequest { wait_ms: 20_000 }));
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
            Some(Outcome::Task(task)) => {
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
    client: &mut FleetClient<Channel>,
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
    loop {
        match connection::enrol(client, &settings.server.url, token).await {
            Ok(credential) => {
                credential.save(&settings.state_dir)?;
                return Ok(credential);
            }
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// Waits before the next attempt, or fails for errors that retrying cannot fix.
pub(crate) async fn retry(
    status: &Status,
    settings: &AgentSettings,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<(), ClientError> {
    if status.code() == Code::Unauthenticated {
        return Err(ClientError::Unauthenticated(status.message().to_string()));
    }
    if backoff.failing_for() > settings.give_up_after {
        return Err(ClientError::Unreachable {
            seconds: backoff.failing_for().as_secs_f64(),
            last: status.message().to_string(),
        });
    }
    let delay = backoff.next_delay();
    on_event(AgentEvent::Retrying(format!(
        "{} ({:?}); retrying in {:.1} s",
        status.message(),
        status.code(),
        delay.as_secs_f64()
    )));
    tokio::time::sleep(delay).await;
    Ok(())
}

/// Whether a failed call means the round is gone for this node (rather than a network blip).
pub(crate) fn round_gone(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::ResourceExhausted
    )
}

fn procedure(task: &Task) -> Result<ClientProcedure, String> {
    use ferry_proto::v1::Procedure;
    match Procedure::try_from(task.procedure) {
        Ok(Procedure::LocalSgd) => Ok(ClientProcedure::LocalSgd),
        Ok(Procedure::Proximal) => Ok(ClientProcedure::Proximal { mu: task.mu }),
        Ok(Procedure::Scaffold) => Ok(ClientProcedure::Scaffold),
        Ok(Procedure::Normalized) => Ok(ClientProcedure::Normalized),
        _ => Err(format!(
            "unknown client procedure {}; upgrade this node",
            task.procedure
        )),
    }
}

/// Fetches one blob, resuming across failures.
async fn fetch(
    settings: &AgentSettings,
    client: &mut FleetClient<Channel>,
    credential: &StoredCredential,
    blob: &ferry_proto::v1::BlobRef,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<Result<Vec<u8>, Status>, ClientError> {
    let mut buffer = Vec::with_capacity(blob.size_bytes as usize);
    loop {
        match transfer::download(
            client,
            credential,
            &blob.sha256,
            blob.size_bytes,
            &mut buffer,
        )
        .await
        {
            Ok(()) => return Ok(Ok(buffer)),
            Err(status) if round_gone(&status) => return Ok(Err(status)),
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// Does one task: download, train with heartbeats, upload.
async fn work(
    settings: &AgentSettings,
    client: &mut FleetClient<Channel>,
    credential: &StoredCredential,
    task: Task,
    trainer: Arc<dyn Trainer>,
    backoff: &mut Backoff,
    on_event: &(impl Fn(AgentEvent) + Send + Sync),
) -> Result<(), ClientError> {
    let round = task.round;
    let abandon = |reason: String| AgentEvent::Abandoned { round, reason };
    let (Some(model_ref), Some(training)) = (task.model.clone(), task.training) else {
        on_event(abandon("task lacks a model or training settings".into()));
        return Ok(());
    };
    let model_bytes =
        match fetch(settings, client, credential, &model_ref, backoff, on_event).await? {
            Ok(bytes) => bytes,
            Err(status) => {
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
        };
    let server_control = match &task.server_control {
        Some(blob) => match fetch(settings, client, credential, blob, backoff, on_event).await? {
            Ok(bytes) => wire::decode_vectors(&bytes)
                .ok()
                .and_then(|mut v| v.remove("control")),
            Err(status) => {
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
        },
        None => None,
    };
    let prepared = Model::from_safetensors(&model_bytes)
        .map_err(|e| e.to_string())
        .and_then(|model| Ok((model, procedure(&task)?)));
    let (model, procedure) = match prepared {
        Ok(prepared) => prepared,
        Err(reason) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
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
        seed: ferry_core::seed::mix_seed(task.seed, settings.seed_stream),
        deadline: (task.deadline_unix_ms > 0)
            .then(|| std::time::UNIX_EPOCH + Duration::from_millis(task.deadline_unix_ms)),
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
    let interval = Duration::from_millis(u64::from(task.heartbeat_interval_ms.max(200)));
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
    let encoded = match secure.as_mut() {
        Some(session) => session.mask(&update, layout.num_params()),
        None => wire::encode_update(&update, &layout).map_err(|e| e.to_string()),
    };
    let bytes = match encoded {
        Ok(bytes) => bytes::Bytes::from(bytes),
        Err(reason) => {
            report_failure(client, credential, round, &reason).await;
            on_event(abandon(reason));
            return Ok(());
        }
    };
    let chunk = (task.max_chunk_bytes as usize).max(1024);
    loop {
        match transfer::upload(client, credential, round, &bytes, chunk).await {
            Ok(receipt) => {
                backoff.reset();
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
                on_event(abandon(status.message().to_string()));
                return Ok(());
            }
            Err(status) => retry(&status, settings, backoff, on_event).await?,
        }
    }
}

/// Waits for training to finish while heartbeating; `None` if the server says the round no
/// longer wants this node.
async fn with_heartbeats(
    client: &mut FleetClient<Channel>,
    credential: &StoredCredential,
    round: u32,
    interval: Duration,
    mut job: tokio::task::JoinHandle<Result<Update, String>>,
) -> Option<Result<Update, String>> {
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
    client: &mut FleetClient<Channel>,
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
