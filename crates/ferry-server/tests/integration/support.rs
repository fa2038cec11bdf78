//! What the fleet-protocol tests share: a toy model and evaluator, a coordinator served on
//! loopback, and a node's side of the protocol (enrol, pull, upload).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ferry_core::{
    Model, ModelLayout, TensorSpec, Update,
    content::content_id,
    privacy::{DpSettings, mechanism::Privacy, noise::NoiseSeed},
    strategy::{Strategy, StrategyName, StrategyParams},
    task::LocalTraining,
    wire,
};
use ferry_engine::{
    node::{Evaluator, Score},
    round::CohortRule,
};
use ferry_proto::v1::{
    EnrolRequest, PullTaskRequest, Task, UploadChunk, fleet_client::FleetClient,
    pull_task_response::Outcome,
};
use ferry_server::{
    Listener,
    blobs::Blobs,
    coordinator::{Coordinator, RunSpec},
    limits::AbuseLimits,
    store::Store,
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// Accuracy = 1 / (1 + squared distance to all-ones): rises as updates pull the model there.
pub struct DistanceToOnes;

impl Evaluator for DistanceToOnes {
    fn evaluate(&self, model: &Model) -> Result<Score, String> {
        let d: f64 = model
            .values()
            .iter()
            .map(|v| f64::from(v - 1.0).powi(2))
            .sum();
        Ok(Score {
            loss: d,
            accuracy: 1.0 / (1.0 + d),
            ..Score::default()
        })
    }
}

pub fn initial() -> Model {
    let layout = ModelLayout::new(vec![
        TensorSpec {
            name: "w".into(),
            shape: vec![2, 2],
            dtype: ferry_core::TensorDtype::F32,
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![2],
            dtype: ferry_core::TensorDtype::F32,
        },
    ])
    .expect("layout");
    Model::new(Arc::new(layout), vec![0.0; 6]).expect("model")
}

pub fn spec(rounds: u32, min_clients: usize) -> RunSpec {
    RunSpec {
        config_hash: "test".into(),
        rounds,
        cohort: CohortRule {
            fraction: 1.0,
            min_clients,
            seed: 7,
            training: LocalTraining {
                epochs: 1,
                batch_size: 8,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
        },
        min_results: min_clients,
        round_timeout: Duration::from_secs(60),
        target_accuracy: None,
        heartbeat_interval: Duration::from_secs(1),
        offline_after: Duration::from_secs(30),
        max_chunk_bytes: 1024,
        secure: None,
        secagg_stage_timeout: Duration::from_secs(60),
        retry_backoff: Duration::from_millis(200),
        max_round_failures: 3,
        keep_rounds: None,
        evaluation: ferry_core::evaluation::EvaluationSchedule::OFF,
        personal: Default::default(),
        asynchronous: None,
        compress: Default::default(),
        cross_site: None,
    }
}

pub struct Running {
    pub coordinator: Arc<Coordinator>,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub server: tokio::task::JoinHandle<()>,
    pub driver: tokio::task::JoinHandle<()>,
    pub url: String,
}

pub async fn start(dir: &std::path::Path, rounds: u32, min_clients: usize) -> Running {
    start_with(dir, spec(rounds, min_clients), None).await
}

pub async fn start_private(
    dir: &std::path::Path,
    rounds: u32,
    min_clients: usize,
    dp: Option<DpSettings>,
) -> Running {
    start_with(dir, spec(rounds, min_clients), dp).await
}

pub async fn start_with(dir: &std::path::Path, spec: RunSpec, dp: Option<DpSettings>) -> Running {
    let mut strategy = fedavg(spec.cohort.min_clients);
    if let Some(dp) = dp {
        strategy = strategy
            .with_privacy(Privacy::new(dp, NoiseSeed::Run(3)).expect("valid"))
            .expect("fedavg takes DP");
    }
    start_with_strategy(dir, spec, strategy).await
}

/// Serves a coordinator of `strategy` on a free loopback port, with its driver running.
pub async fn start_with_strategy(
    dir: &std::path::Path,
    spec: RunSpec,
    strategy: Strategy,
) -> Running {
    start_with_evaluator(dir, spec, strategy, central_test()).await
}

/// Plain FedAvg over rounds of at least `min_clients`.
fn fedavg(min_clients: usize) -> Strategy {
    Strategy::new(
        StrategyName::FedAvg,
        &StrategyParams::default(),
        min_clients,
    )
}

/// The central test the runs here are scored by: distance to a model of ones.
fn central_test() -> Option<Arc<dyn Evaluator>> {
    Some(Arc::new(DistanceToOnes))
}

/// [`start_with_strategy`] with `evaluator` scoring rounds centrally (none: no central test
/// set).
pub async fn start_with_evaluator(
    dir: &std::path::Path,
    spec: RunSpec,
    strategy: Strategy,
    evaluator: Option<Arc<dyn Evaluator>>,
) -> Running {
    start_from(dir, spec, strategy, evaluator, initial()).await
}

/// [`start_with_evaluator`] from the model `initial`.
pub async fn start_from(
    dir: &std::path::Path,
    spec: RunSpec,
    strategy: Strategy,
    evaluator: Option<Arc<dyn Evaluator>>,
    initial: Model,
) -> Running {
    start_guarded(
        dir,
        spec,
        strategy,
        evaluator,
        initial,
        AbuseLimits::default(),
    )
    .await
}

/// A FedAvg run of `rounds` rounds of `min_clients` whose service enforces `limits`.
pub async fn start_limited(
    dir: &std::path::Path,
    rounds: u32,
    min_clients: usize,
    limits: AbuseLimits,
) -> Running {
    let (spec, strategy) = (spec(rounds, min_clients), fedavg(min_clients));
    start_guarded(dir, spec, strategy, central_test(), initial(), limits).await
}

async fn start_guarded(
    dir: &std::path::Path,
    spec: RunSpec,
    strategy: Strategy,
    evaluator: Option<Arc<dyn Evaluator>>,
    initial: Model,
    limits: AbuseLimits,
) -> Running {
    let store = Store::open(&format!("sqlite:{}", dir.join("ferry.db").display()))
        .await
        .expect("store");
    let blobs = Blobs::local(&dir.join("blobs")).expect("blobs");
    let (coordinator, _events) =
        Coordinator::start(spec, strategy, initial, evaluator, store.clone(), blobs)
            .await
            .expect("coordinator");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let coordinator = coordinator.clone();
        async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            let listener = Listener {
                addr,
                tls: None,
                limits,
            };
            ferry_server::serve(listener, coordinator, store, shutdown)
                .await
                .expect("serve");
        }
    });
    let driver = tokio::spawn({
        let coordinator = coordinator.clone();
        async move {
            let _ = coordinator.drive().await;
        }
    });
    until_listening(addr).await;
    Running {
        coordinator,
        stop,
        server,
        driver,
        url: format!("http://{addr}"),
    }
}

/// Waits (at most 30 s) until the fleet service accepts connections on `addr`.
async fn until_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fleet service did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.driver.abort();
    }
}

pub async fn client(url: &str) -> FleetClient<Channel> {
    FleetClient::connect(url.to_string())
        .await
        .expect("connect")
}

pub fn authed<T>(credential: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {credential}")).expect("ascii"),
    );
    request
}

pub async fn add_token(dir: &std::path::Path, name: &str) -> String {
    let store = Store::open(&format!("sqlite:{}", dir.join("ferry.db").display()))
        .await
        .expect("store");
    store.create_token(name).await.expect("token")
}

pub async fn enrol(client: &mut FleetClient<Channel>, token: &str) -> String {
    let r = client
        .enrol(EnrolRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .expect("enrol")
        .into_inner();
    format!("{}.{}", r.node_id, r.secret)
}

pub async fn pull(client: &mut FleetClient<Channel>, credential: &str) -> Task {
    for _ in 0..20 {
        let response = client
            .pull_task(authed(
                credential,
                PullTaskRequest {
                    wait_ms: 2000,
                    ..Default::default()
                },
            ))
            .await
            .expect("pull")
            .into_inner();
        if let Some(Outcome::Task(task)) = response.outcome {
            return task;
        }
    }
    panic!("no task within 40 s");
}

pub fn chunks(round: u32, bytes: &[u8], from: usize, size: usize) -> Vec<UploadChunk> {
    let sha = content_id(bytes);
    bytes[from..]
        .chunks(size)
        .enumerate()
        .map(|(i, data)| UploadChunk {
            round,
            offset: (from + i * size) as u64,
            data: bytes::Bytes::copy_from_slice(data),
            total_bytes: bytes.len() as u64,
            hash: sha.clone(),
        })
        .collect()
}

pub async fn upload(
    client: &mut FleetClient<Channel>,
    credential: &str,
    parts: Vec<UploadChunk>,
) -> Result<ferry_proto::v1::UploadReceipt, tonic::Status> {
    client
        .upload(authed(credential, futures::stream::iter(parts)))
        .await
        .map(|r| r.into_inner())
}

pub fn update_bytes(delta: Vec<f32>, examples: u64) -> Vec<u8> {
    wire::encode_update(&Update::new(delta, examples), initial().layout()).expect("encode")
}

pub async fn wait_rounds(
    coordinator: &Coordinator,
    rounds: usize,
) -> Vec<ferry_engine::record::RoundRecord> {
    for _ in 0..100 {
        let history = coordinator.history().await.expect("history");
        if history.len() >= rounds {
            return history;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("round {rounds} did not close within 10 s");
}

/// Waits (at most 10 s) for the run's status to show `phase`.
pub async fn wait_phase(coordinator: &Coordinator, phase: &str) {
    for _ in 0..200 {
        if coordinator.status().await.phase == phase {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "phase {phase} not reached: {:?}",
        coordinator.status().await
    );
}
