//! The server's configuration file: where to listen and keep state, TLS, the operator API,
//! and the `[run]` section (the keys of `ferry simulate` plus the deployment's own), checked
//! and turned into the coordinator's [`RunSpec`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_core::{model::sha256_hex, strategy::Strategy};
use ferry_engine::{floor::RoundFloor, round::CohortRule};
use ferry_server::{
    Listener, TlsPem, blobs::s3::S3Settings, coordinator::RunSpec, limits::AbuseLimits,
};
use ferry_sim::SimConfig;
use serde::{Deserialize, Serialize};

use crate::options::{SimulateArgs, read_toml};

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
    /// Listen here instead of the file's `listen` (several servers sharing one configuration
    /// on one host).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve the REST API here instead of the file's `[api] listen`.
    #[arg(long, value_name = "HOST:PORT")]
    pub api_listen: Option<String>,
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
    /// File holding the dashboard's viewer token (created when missing); without it, the
    /// dashboard's pages are readable from this machine (or with the admin token) only.
    #[serde(default, alias = "viewer_token_file")]
    pub viewer_token_file: Option<PathBuf>,
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
    /// Where model blobs live: a local folder, or `s3://BUCKET/PREFIX` (see `[s3]`).
    #[serde(default = "default_blobs")]
    pub blobs: String,
    /// Local folder where uploads grow until verified, when `blobs` is remote (a local blob
    /// folder keeps them beside it).
    #[serde(default = "default_uploads")]
    pub uploads: PathBuf,
    /// How to reach an S3 blob store; what is left out comes from the `AWS_*` variables.
    #[serde(default)]
    pub s3: S3Settings,
    /// The coordinator lease that servers sharing a PostgreSQL store take turns on.
    #[serde(default)]
    pub lease: LeaseFile,
    /// Folder for `history.json`, `model.safetensors` and the chart.
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// The run: `ferry simulate`'s keys plus the deployment's.
    #[serde(default)]
    pub run: toml::Table,
    /// The REST API and metrics; off unless configured.
    pub api: Option<ApiFile>,
    /// What one address or one node may ask of the server (`[limits]`; every refusal is
    /// counted in `/metrics` as `ferry_limit_refusals_total{limit}`).
    #[serde(default)]
    pub limits: AbuseLimits,
}

fn default_listen() -> String {
    "127.0.0.1:7443".into()
}
fn default_store() -> String {
    DEFAULT_STORE.into()
}
fn default_blobs() -> String {
    "ferry-data/blobs".into()
}
fn default_uploads() -> PathBuf {
    PathBuf::from("ferry-data/uploads")
}

/// `[lease]`: how servers sharing a PostgreSQL store agree which one is active.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LeaseFile {
    /// Seconds a lease lasts unless renewed: how long a standby waits before it takes over
    /// from an active server that vanished. The holder renews it every quarter of that.
    #[serde(default = "default_lease_seconds")]
    pub seconds: f64,
    /// The address nodes reach this server at, which standbys send them to (default: the
    /// listen address, https:// unless --insecure).
    pub advertise: Option<String>,
    /// This server's name in the lease (default: its advertised address).
    pub name: Option<String>,
}

impl Default for LeaseFile {
    fn default() -> Self {
        Self {
            seconds: default_lease_seconds(),
            advertise: None,
            name: None,
        }
    }
}

fn default_lease_seconds() -> f64 {
    10.0
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
    /// Rounds whose blobs (models, state, accepted updates) the blob store keeps; 0 keeps
    /// every round's. Left out of the run's description when 0, so the configuration hash
    /// of runs started before the setting existed is unchanged.
    #[serde(alias = "keep_rounds", default, skip_serializing_if = "is_zero")]
    pub keep_rounds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
            keep_rounds: 0,
        }
    }
}

const DEPLOYMENT_KEYS: [&str; 17] = [
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
    "keep-rounds",
    "keep_rounds",
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
pub fn load(args: &ServerArgs) -> Result<ServerSetup> {
    let mut file: ServerFile = read_toml(&args.config)?;
    if let Some(listen) = &args.listen {
        file.listen = listen.clone();
    }
    if let Some(listen) = &args.api_listen {
        let api = file.api.as_mut().with_context(|| {
            format!(
                "--api-listen needs an [api] section in {}",
                args.config.display()
            )
        })?;
        api.listen = listen.clone();
    }
    check(file, &args.config, args.insecure)
}

/// Checks `file`, read from `path`, and reads the TLS files it names.
pub(crate) fn check(file: ServerFile, path: &Path, insecure: bool) -> Result<ServerSetup> {
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
    for simulated in [
        "speed",
        "availability",
        "bandwidth",
        "step-time",
        "trace",
        "round-deadline",
    ] {
        if run.contains_key(simulated) || run.contains_key(&simulated.replace('-', "_")) {
            bail!(
                "config file {}: run.{simulated} describes simulated devices; a server's nodes \
                 are real devices, so remove it (round-timeout bounds a deployed round)",
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
    let limits = file.limits.clone();
    limits
        .check()
        .map_err(|e| anyhow::anyhow!("config file {}: [limits] {e}", path.display()))?;
    anyhow::ensure!(
        limits.node_calls_per_second * deployment.heartbeat >= 2.0,
        "config file {}: [limits] node-calls-per-second = {} would refuse the heartbeats of \
         nodes that beat every {} s; raise it to at least {}",
        path.display(),
        limits.node_calls_per_second,
        deployment.heartbeat,
        2.0 / deployment.heartbeat
    );
    anyhow::ensure!(
        file.lease.seconds >= 1.0,
        "config file {}: [lease] seconds = {} is too short to renew in time; give at least 1",
        path.display(),
        file.lease.seconds
    );
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
        listener: Listener { addr, tls, limits },
    })
}

/// Examples a node's FedAvg weight reflects at most under secure aggregation, unless the run
/// sets `secagg-weight-cap` (a server does not know its nodes' sizes in advance).
const DEPLOYED_WEIGHT_CAP: u64 = 10_000;

/// The coordinator's settings for `config`; `central` says whether the run scores its models
/// on a central test set (without one, nodes evaluate every round unless configured).
pub(super) fn spec(config: &DeployedConfig, strategy: &Strategy, central: bool) -> Result<RunSpec> {
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
        keep_rounds: (d.keep_rounds > 0).then_some(d.keep_rounds),
        evaluation: run.evaluation(central),
        personal: run.personal_tensors()?,
        asynchronous: run.fleet.fedbuff,
        compress: run.fleet.compress,
        cross_site: run.cross_site,
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
