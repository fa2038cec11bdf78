//! `ferry server --config server.toml`: the coordinator of a deployed federation.
//!
//! The file's top level says where to listen and keep state; its `[run]` section uses the same
//! keys as `ferry simulate` (model, dataset for server-side evaluation, strategy and its
//! parameters, rounds, local training, seed) plus the deployment's own: `round-timeout`
//! (seconds), `min-results`, `heartbeat` and `offline-after` (seconds), `max-chunk-bytes`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_core::{model::sha256_hex, privacy::noise::NoiseSeed, strategy::Strategy};
use ferry_engine::{
    federation::{RoundObserver, StopReason},
    floor::RoundFloor,
    round::CohortRule,
};
use ferry_ml::params;
use ferry_server::{
    Listener, TlsPem,
    blobs::Blobs,
    coordinator::{Coordinator, Event, FailedRound, RunSpec, is_failure},
    store::Store,
};
use ferry_sim::{SimConfig, evaluator::TestSetEvaluator};
use serde::{Deserialize, Serialize};

use crate::{
    options::{SimulateArgs, read_toml},
    progress::ConsoleProgress,
    report::{self, FinalRecord, History},
};

/// Where the store lives unless the configuration says otherwise.
pub const DEFAULT_STORE: &str = "sqlite:./ferry-data/ferry.db";

/// Options of `ferry server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The server configuration.
    #[arg(long, value_name = "FILE.toml")]
    pub config: PathBuf,
    /// Serve without TLS; only allowed on loopback addresses.
    #[arg(long)]
    pub insecure: bool,
}

/// TLS files of the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA whose client certificates are required (mutual TLS); none means token-only.
    #[serde(alias = "client_ca")]
    pub client_ca: Option<PathBuf>,
}

/// The operator API.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApiFile {
    /// Address of the REST API and `/metrics` (plain HTTP; keep it on a private interface).
    pub listen: String,
    /// File holding the admin token; created with a fresh token when missing.
    #[serde(default = "default_admin_token_file", alias = "admin_token_file")]
    pub admin_token_file: PathBuf,
}

fn default_admin_token_file() -> PathBuf {
    PathBuf::from("ferry-data/admin-token")
}

/// The server configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerFile {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// TLS certificate and key; required unless `--insecure`.
    pub tls: Option<TlsFiles>,
    /// `sqlite:PATH` or `postgres://...`.
    #[serde(default = "default_store")]
    pub store: String,
    /// Folder of model blobs.
    #[serde(default = "default_blobs")]
    pub blobs: PathBuf,
    /// Folder for `history.json`, `model.safetensors` and the chart.
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// The run: `ferry simulate`'s keys plus the deployment's.
    #[serde(default)]
    pub run: toml::Table,
    /// The REST API and metrics; off unless configured.
    pub api: Option<ApiFile>,
}

fn default_listen() -> String {
    "127.0.0.1:7443".into()
}
fn default_store() -> String {
    DEFAULT_STORE.into()
}
fn default_blobs() -> PathBuf {
    PathBuf::from("ferry-data/blobs")
}
fn default_out() -> PathBuf {
    PathBuf::from("ferry-data/run")
}

/// How the deployed run handles time, stragglers and transfers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Deployment {
    /// Seconds a round waits for its cohort.
    #[serde(alias = "round_timeout")]
    pub round_timeout: f64,
    /// Updates needed to close a round at its deadline.
    #[serde(alias = "min_results")]
    pub min_results: usize,
    /// Seconds between a training node's heartbeats.
    pub heartbeat: f64,
    /// Seconds of silence after which a node is offline.
    #[serde(alias = "offline_after")]
    pub offline_after: f64,
    /// Largest transfer chunk.
    #[serde(alias = "max_chunk_bytes")]
    pub max_chunk_bytes: usize,
    /// Secure aggregation: seconds each key stage waits for the cohort.
    #[serde(alias = "secagg_stage_timeout")]
    pub secagg_stage_timeout: f64,
    /// Seconds before a failed round is tried again (doubled per further failure, up to a
    /// minute).
    #[serde(alias = "retry_backoff")]
    pub retry_backoff: f64,
    /// Consecutive failed attempts at a round after which the run stops as failed.
    #[serde(alias = "max_round_failures")]
    pub max_round_failures: u32,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            round_timeout: 600.0,
            min_results: 1,
            heartbeat: 5.0,
            offline_after: 30.0,
            max_chunk_bytes: 1 << 20,
            secagg_stage_timeout: 60.0,
            retry_backoff: 5.0,
            max_round_failures: 5,
        }
    }
}

const DEPLOYMENT_KEYS: [&str; 15] = [
    "round-timeout",
    "round_timeout",
    "min-results",
    "min_results",
    "heartbeat",
    "offline-after",
    "offline_after",
    "max-chunk-bytes",
    "max_chunk_bytes",
    "secagg-stage-timeout",
    "secagg_stage_timeout",
    "retry-backoff",
    "retry_backoff",
    "max-round-failures",
    "max_round_failures",
];

/// The configuration recorded in the server's `history.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DeployedConfig {
    /// The run, as `ferry simulate` would describe it.
    pub run: SimConfig,
    /// The deployment's own settings.
    pub deployment: Deployment,
}

/// A fully checked server configuration.
#[derive(Debug, Clone)]
pub struct ServerSetup {
    /// The file as read.
    pub file: ServerFile,
    /// The run and deployment settings.
    pub config: DeployedConfig,
    /// Where to listen, with TLS material.
    pub listener: Listener,
}

/// The store URL of a server configuration file.
pub fn store_url(path: &Path) -> Result<String> {
    Ok(read_toml::<ServerFile>(path)?.store)
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read the {what} {}; `ferry certs --out DIR` makes one",
            path.display()
        )
    })
}

/// Reads and checks `path`.
pub fn load(path: &Path, insecure: bool) -> Result<ServerSetup> {
    let file: ServerFile = read_toml(path)?;
    let mut run = file.run.clone();
    let mut deployment_table = toml::Table::new();
    for key in DEPLOYMENT_KEYS {
        if let Some(value) = run.remove(key) {
            deployment_table.insert(key.to_string(), value);
        }
    }
    for unused in ["partition", "baselines", "threads", "out"] {
        if run.contains_key(unused) {
            bail!(
                "config file {}: run.{unused} does not apply to a server (each node holds its own data)",
                path.display()
            );
        }
    }
    let bad = |e: toml::de::Error| {
        anyhow::anyhow!("config file {}: [run] {}", path.display(), e.message())
    };
    let deployment: Deployment = if deployment_table.is_empty() {
        Deployment::default()
    } else {
        let mut merged = toml::Table::try_from(Deployment::default())?;
        for (key, value) in deployment_table {
            merged.insert(key.replace('_', "-"), value);
        }
        merged.try_into().map_err(bad)?
    };
    let args: SimulateArgs = run.try_into().map_err(bad)?;
    let mut sim = args.resolve()?;
    anyhow::ensure!(
        sim.attack.is_none(),
        "config file {}: attack and attackers simulate poisoned nodes in `ferry simulate`; a \
         deployment's nodes are real, so remove them from [run]",
        path.display()
    );
    // The server evaluates on one thread pool and partitions nothing.
    sim.threads = 1;
    anyhow::ensure!(
        deployment.round_timeout > 0.0
            && deployment.heartbeat > 0.0
            && deployment.offline_after > deployment.heartbeat,
        "config file {}: round-timeout and heartbeat must be positive, and offline-after longer than heartbeat",
        path.display()
    );
    anyhow::ensure!(
        deployment.min_results >= 1
            && deployment.max_chunk_bytes >= 1024
            && deployment.secagg_stage_timeout > 0.0,
        "config file {}: min-results must be at least 1, max-chunk-bytes at least 1024 and \
         secagg-stage-timeout positive",
        path.display()
    );
    anyhow::ensure!(
        deployment.retry_backoff > 0.0 && deployment.max_round_failures >= 1,
        "config file {}: retry-backoff must be positive and max-round-failures at least 1",
        path.display()
    );
    let addr: SocketAddr = file.listen.parse().with_context(|| {
        format!(
            "config file {}: listen = '{}' is not HOST:PORT (for example 0.0.0.0:7443)",
            path.display(),
            file.listen
        )
    })?;
    let tls = match (&file.tls, insecure) {
        (_, true) => None,
        (Some(tls), false) => Some(TlsPem {
            cert: read_pem(&tls.cert, "server certificate")?,
            key: read_pem(&tls.key, "server key")?,
            client_ca: tls
                .client_ca
                .as_deref()
                .map(|p| read_pem(p, "client CA"))
                .transpose()?,
        }),
        (None, false) => bail!(
            "config file {}: no [tls] section (cert, key); add one (`ferry certs` makes them) or pass --insecure on loopback",
            path.display()
        ),
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        bail!(
            "--insecure serves loopback only, but listen = '{}'; use 127.0.0.1 or configure [tls]",
            file.listen
        );
    }
    Ok(ServerSetup {
        file,
        config: DeployedConfig {
            run: sim,
            deployment,
        },
        listener: Listener { addr, tls },
    })
}

/// Examples a node's FedAvg weight reflects at most under secure aggregation, unless the run
/// sets `secagg-weight-cap` (a server does not know its nodes' sizes in advance).
const DEPLOYED_WEIGHT_CAP: u64 = 10_000;

fn spec(config: &DeployedConfig, strategy: &Strategy) -> Result<RunSpec> {
    let (run, d) = (&config.run, &config.deployment);
    let hashed = serde_json::to_vec(config)?;
    let secure = run.secure(strategy, DEPLOYED_WEIGHT_CAP)?;
    check_fleet_meets_floor(run, &RoundFloor::of(strategy, secure.as_ref()))?;
    Ok(RunSpec {
        config_hash: sha256_hex(&hashed),
        rounds: run.rounds,
        cohort: CohortRule {
            fraction: run.fraction,
            min_clients: run.min_clients,
            seed: run.seed,
            training: run.training.clone(),
        },
        min_results: d.min_results,
        round_timeout: Duration::from_secs_f64(d.round_timeout),
        target_accuracy: run.target_accuracy,
        heartbeat_interval: Duration::from_secs_f64(d.heartbeat),
        offline_after: Duration::from_secs_f64(d.offline_after),
        max_chunk_bytes: d.max_chunk_bytes,
        secure,
        secagg_stage_timeout: Duration::from_secs_f64(d.secagg_stage_timeout),
        retry_backoff: Duration::from_secs_f64(d.retry_backoff),
        max_round_failures: d.max_round_failures,
    })
}

/// Refuses a run whose declared fleet (`clients`) could never fill the smallest round its
/// rule needs: it would wait for nodes that do not exist.
fn check_fleet_meets_floor(run: &SimConfig, floor: &RoundFloor) -> Result<()> {
    if let Some(reason) = &floor.reason
        && floor.updates > run.clients
    {
        bail!(
            "{reason}, but [run] declares clients = {} nodes; set clients to the number of \
             nodes that will take part (at least {}), or lower what the rule needs (byzantine, \
             trim-beta, secagg-threshold)",
            run.clients,
            floor.updates
        );
    }
    Ok(())
}

/// The admin token in `path`, created (readable by its owner only) when missing.
fn admin_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let token = format!("ferry-admin-{}", ferry_server::auth::new_secret());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write as _;
    options
        .open(path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
    Ok(token)
}

fn start_api(api: &ApiFile, coordinator: Arc<Coordinator>, store: Store) -> Result<()> {
    let addr: SocketAddr = api
        .listen
        .parse()
        .with_context(|| format!("[api] listen = '{}' is not HOST:PORT", api.listen))?;
    let token = admin_token(&api.admin_token_file)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot start the metrics recorder")?;
    let handler = ferry_server::api::Api::new(
        coordinator.clone(),
        store,
        sha256_hex(token.as_bytes()),
        metrics,
    );
    println!(
        "REST API on http://{addr}/api/v1/status (admin token in {}), metrics on http://{addr}/metrics",
        api.admin_token_file.display()
    );
    tokio::spawn(async move {
        let shutdown = async move { coordinator.until_finished().await };
        if let Err(e) = ferry_server::api::serve(addr, handler, shutdown).await {
            eprintln!("warning: the REST API stopped: {e}");
        }
    });
    Ok(())
}

/// Runs `ferry server`.
pub fn run(args: ServerArgs) -> Result<()> {
    let setup = load(&args.config, args.insecure)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(setup))
}

async fn serve(setup: ServerSetup) -> Result<()> {
    let run = &setup.config.run;
    let data = run.dataset.load(run.data_dir.as_deref())?;
    if data.test.is_empty() {
        bail!(
            "the server evaluates every round, but {} has no test set (add test.csv to its folder)",
            run.dataset
        );
    }
    let evaluator = Arc::new(TestSetEvaluator::new(
        run.model,
        Arc::new(data.test),
        &[],
        run.seed,
    ));
    let initial = params::init_model(run.model, run.seed)?;
    // A deployment draws its DP noise from the operating system, never from the run seed.
    let strategy = run.strategy(run.clients, NoiseSeed::Os)?;
    let store = Store::open(&setup.file.store).await?;
    let blobs = Blobs::local(&setup.file.blobs)?;
    let (coordinator, events) = Coordinator::start(
        spec(&setup.config, &strategy)?,
        strategy,
        initial,
        evaluator,
        store.clone(),
        blobs,
    )
    .await?;
    println!(
        "ferry server: run {} — {} with {} on {}, {} rounds, at least {} nodes per round; listening on {} ({})",
        coordinator.run_id(),
        run.strategy,
        run.model,
        run.dataset,
        run.rounds,
        coordinator.spec().cohort.min_clients,
        setup.listener.addr,
        match &setup.listener.tls {
            Some(t) if t.client_ca.is_some() => "TLS, client certificates required",
            Some(_) => "TLS",
            None => "insecure, loopback only",
        }
    );
    report::prepare_dir(&setup.file.out)?;
    let started = Instant::now();
    let printer = tokio::spawn(print_events(
        events,
        setup.config.clone(),
        setup.file.out.clone(),
        coordinator.clone(),
    ));
    let driver = tokio::spawn(coordinator.clone().drive());
    if let Some(api) = &setup.file.api {
        start_api(api, coordinator.clone(), store.clone())?;
    }
    let linger = Duration::from_secs_f64((2.0 * setup.config.deployment.heartbeat).max(3.0));
    let finished = {
        let coordinator = coordinator.clone();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    coordinator.until_finished().await;
                    // Give polling nodes time to hear that the run is over.
                    tokio::time::sleep(linger).await;
                } => {}
            }
        }
    };
    ferry_server::serve(setup.listener.clone(), coordinator.clone(), store, finished).await?;
    let Some(reason) = coordinator.finished().await else {
        driver.abort();
        println!(
            "stopped; the run's state is saved, and `ferry server` with the same config resumes it"
        );
        return Ok(());
    };
    let driven = driver.await.context("the round driver stopped")?;
    printer.abort();
    let rounds = coordinator.history().await?;
    let failed = coordinator.failed_rounds().await?;
    if is_failure(&reason) {
        return stopped_as_failed(&setup, &coordinator, &rounds, &failed, driven).await;
    }
    driven?;
    let last = rounds.last().context("the run finished no round")?;
    let model = coordinator.global().await;
    let (model_bytes, sha) = report::model_bytes(&model)?;
    let history = History {
        config: &setup.config,
        rounds: &rounds,
        final_record: Some(FinalRecord {
            accuracy: last.accuracy,
            loss: last.loss,
            model_sha256: sha.clone(),
            rounds_run: last.round,
            // The coordinator ends runs with the stop reasons' names.
            stop: serde_json::from_value(serde_json::Value::String(reason.clone()))
                .unwrap_or(StopReason::RoundsCompleted),
            wall_s: started.elapsed().as_secs_f64(),
            bytes_up: rounds.iter().map(|r| r.bytes_up).sum(),
            bytes_down: rounds.iter().map(|r| r.bytes_down).sum(),
        }),
        baselines: None,
        attackers: &[],
        failed_rounds: &failed,
    };
    let title = format!(
        "{} on {} ({}, deployed)",
        run.strategy, run.dataset, run.model
    );
    report::write(&setup.file.out, &history, &model_bytes, &title)?;
    println!(
        "done: {} rounds ({reason}); final accuracy {:.4}, loss {:.4}; model_sha256 {sha}; outputs in {}",
        last.round,
        last.accuracy,
        last.loss,
        setup.file.out.display()
    );
    Ok(())
}

/// Prints the coordinator's events as they come and rewrites `history.json` after every
/// round, committed or failed.
async fn print_events(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    config: DeployedConfig,
    out: PathBuf,
    coordinator: Arc<Coordinator>,
) {
    let mut console = ConsoleProgress::new(config.run.rounds);
    while let Some(event) = events.recv().await {
        match event {
            Event::RoundStarted { round, cohort } => console.round_started(round, cohort),
            Event::UpdateAccepted { round } => console.node_returned(round),
            Event::RoundFinished(record) => {
                console.round_finished(&record);
                write_progress(&config, &out, &coordinator).await;
            }
            Event::RoundFailed { failure, retry_in } => {
                let next = match retry_in {
                    Some(wait) => format!("trying again in {:.0} s", wait.as_secs_f64()),
                    None => "not tried again".to_string(),
                };
                console.notice(&format!(
                    "round {} failed (attempt {}, {} of {} nodes delivered): {}; {next}",
                    failure.round, failure.attempt, failure.updates, failure.cohort, failure.reason
                ));
                write_progress(&config, &out, &coordinator).await;
            }
            Event::Notice(message) => console.notice(&message),
            Event::Finished(reason) => console.notice(&format!("run finished: {reason}")),
        }
    }
}

/// Rewrites `history.json` with the rounds committed and failed so far.
async fn write_progress(config: &DeployedConfig, out: &Path, coordinator: &Coordinator) {
    let (Ok(rounds), Ok(failed)) = (
        coordinator.history().await,
        coordinator.failed_rounds().await,
    ) else {
        return;
    };
    let history = History {
        config,
        rounds: &rounds,
        final_record: None,
        baselines: None,
        attackers: &[],
        failed_rounds: &failed,
    };
    if let Err(e) = report::write_history(out, &history) {
        eprintln!("warning: {e:#}");
    }
}

/// A run that stopped without finishing its rounds: its history is kept (with `final` null and
/// the failed attempts), and the command fails with what happened and what to do.
async fn stopped_as_failed(
    setup: &ServerSetup,
    coordinator: &Coordinator,
    rounds: &[ferry_engine::record::RoundRecord],
    failed: &[FailedRound],
    driven: Result<String, ferry_server::ServerError>,
) -> Result<()> {
    let history = History {
        config: &setup.config,
        rounds,
        final_record: None,
        baselines: None,
        attackers: &[],
        failed_rounds: failed,
    };
    if let Err(e) = report::write_history(&setup.file.out, &history) {
        eprintln!("warning: {e:#}");
    }
    driven.context("the coordinator stopped on an error; start `ferry server` with the same configuration to resume the run")?;
    let status = coordinator.status().await;
    bail!(
        "the run stopped at round {} of {} after {} failed attempt(s) in a row ({} rounds \
         applied); last failure: {}. Bring more nodes online or relax what the round needs, then \
         start `ferry server` with the same configuration to resume",
        status.round,
        status.rounds,
        status.failed_attempts,
        rounds.len(),
        status.last_failure.as_deref().unwrap_or("unknown")
    )
}
