//! `ferry bench round`: one deployed round over loopback gRPC + TLS with N clients that upload
//! synthetic updates (no training). The server runs in its own process, so its peak memory is
//! measured apart from the clients'.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_client::{
    agent::{self, AgentSettings, EvalTask, TrainTask, Trainer},
    connection::ServerAddress,
};
use ferry_core::{
    Model, ModelLayout, TensorSpec, Update,
    evaluation::{EvaluationSchedule, NodeEvaluation},
    strategy::{Strategy, StrategyName, StrategyParams},
};
use ferry_engine::round::CohortRule;
use ferry_server::{
    Listener, TlsPem,
    blobs::{Blobs, s3::S3Settings},
    coordinator::{Coordinator, Event, RunSpec},
    limits::AbuseLimits,
    store::Store,
};
use serde::{Deserialize, Serialize};

use super::peak_rss_bytes;

/// Options of `ferry bench round`.
#[derive(Args, Debug)]
pub struct RoundArgs {
    /// Clients taking part.
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Model parameters (one f32 tensor).
    #[arg(long, default_value_t = 10_000_000)]
    pub params: usize,
    /// Transfer chunk size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// Also print the figures as one JSON line, for scripts (benchmarks/peers/flower).
    #[arg(long)]
    pub json: bool,
    /// Where the server keeps blobs: `s3://BUCKET/PREFIX` (reached with the `AWS_*`
    /// variables, for example those `ferry-garage` prints), or a folder in the benchmark's
    /// own temporary folder when left out.
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub blobs: Option<String>,
}

/// The server half, run by `ferry bench round` in a child process.
#[derive(Args, Debug)]
pub struct RoundServerArgs {
    /// Working folder prepared by the parent (certificates, store).
    #[arg(long)]
    pub dir: PathBuf,
    /// Loopback port to listen on.
    #[arg(long)]
    pub port: u16,
    /// Clients expected.
    #[arg(long)]
    pub clients: usize,
    /// Model parameters.
    #[arg(long)]
    pub params: usize,
    /// Transfer chunk size.
    #[arg(long)]
    pub chunk_bytes: usize,
    /// The blob store, when not the working folder's.
    #[arg(long)]
    pub blobs: Option<String>,
}

/// One node of `ferry bench round`, run by it in a process of its own so that a node's memory
/// is measured apart.
#[derive(Args, Debug)]
pub struct RoundClientArgs {
    /// Working folder prepared by the parent (certificates).
    #[arg(long)]
    pub dir: PathBuf,
    /// The server's loopback port.
    #[arg(long)]
    pub port: u16,
    /// Enrolment token.
    #[arg(long)]
    pub token: String,
    /// The node's position, for its state folder and seed stream.
    #[arg(long)]
    pub index: usize,
    /// Model parameters.
    #[arg(long)]
    pub params: usize,
}

/// What a node process reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
struct ClientReport {
    peak_rss_bytes: Option<u64>,
}

/// Runs one node of the benchmark until the server ends the run; reports its peak memory.
pub fn run_client(args: RoundClientArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let settings = AgentSettings {
        server: ServerAddress {
            url: format!("https://localhost:{}", args.port),
            ca_pem: Some(std::fs::read(args.dir.join("certs/ca.pem"))?),
            identity: None,
        },
        token: Some(args.token),
        state_dir: args.dir.join(format!("node-{}", args.index)),
        seed_stream: args.index as u64,
        max_backoff: Duration::from_secs(1),
        give_up_after: Duration::from_secs(60),
        share_local_model: false,
    };
    let trainer = Arc::new(SyntheticTrainer(args.params));
    runtime.block_on(agent::run(settings, trainer, |_| {}))?;
    let report = ClientReport {
        peak_rss_bytes: peak_rss_bytes(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What the server process reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
struct ServerReport {
    round_wall_s: f64,
    bytes_up: u64,
    bytes_down: u64,
    peak_rss_bytes: Option<u64>,
}

/// Returns a synthetic update of the model's size instead of training, so that the clients
/// spend their time on the protocol; like a no-op trainer, it holds nothing between rounds.
pub(super) struct SyntheticTrainer(pub(super) usize);

/// A small value that varies along the vector (an update of all zeros would compress).
fn synthetic_value(i: usize) -> f32 {
    let mixed = (i as u32).wrapping_mul(2_654_435_761) >> 8;
    mixed as f32 * 1e-9 - 0.008
}

impl Trainer for SyntheticTrainer {
    fn train(&self, task: &TrainTask) -> Result<Update, String> {
        if task.model.num_params() != self.0 {
            return Err("the server's model is not the benchmark's".into());
        }
        Ok(Update::new((0..self.0).map(synthetic_value).collect(), 1))
    }

    fn evaluate(&self, _task: &EvalTask) -> Result<NodeEvaluation, String> {
        Err("the round benchmark measures transport; its runs do not evaluate".into())
    }
}

pub(super) fn synthetic_model(params: usize) -> Result<Model> {
    let layout = ModelLayout::new(vec![TensorSpec {
        name: "weights".into(),
        shape: vec![params],
        dtype: ferry_core::TensorDtype::F32,
    }])?;
    Ok(Model::new(Arc::new(layout), vec![0.0; params])?)
}

/// A benchmark's coordinator over a fresh FedAvg run of `spec` for `nodes` nodes on a
/// synthetic model of `params` values (nothing is evaluated: the figures are the
/// transport's), with the store and certificates its parent prepared in `dir`, and the TLS
/// listener on loopback `port`.
pub(super) async fn start_server(
    dir: &Path,
    port: u16,
    spec: RunSpec,
    nodes: usize,
    params: usize,
    blobs: Option<&str>,
) -> Result<(
    Arc<Coordinator>,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
    Store,
    Listener,
)> {
    let store = Store::open(&store_url(dir)).await?;
    let blobs = match blobs {
        Some(location) => Blobs::at(location, &S3Settings::default(), &dir.join("uploads"))?,
        None => Blobs::local(&dir.join("blobs"))?,
    };
    let strategy = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), nodes);
    let model = synthetic_model(params)?;
    let (coordinator, events) =
        Coordinator::start(spec, strategy, model, None, store.clone(), blobs).await?;
    let listener = Listener {
        addr: ([127, 0, 0, 1], port).into(),
        tls: Some(TlsPem {
            cert: std::fs::read(dir.join("certs/server.pem"))?,
            key: std::fs::read(dir.join("certs/server.key"))?,
            client_ca: None,
        }),
        limits: AbuseLimits::default(),
    };
    Ok((coordinator, events, store, listener))
}

/// A benchmark run's settings: `rounds` rounds of `cohort`, every cohort node's update
/// needed, no evaluation, default liveness, the blobs of the last two rounds kept.
pub(super) fn bench_spec(
    name: &str,
    rounds: u32,
    cohort: CohortRule,
    round_timeout: Duration,
    max_chunk_bytes: usize,
) -> RunSpec {
    RunSpec {
        config_hash: name.into(),
        rounds,
        min_results: cohort.min_clients,
        cohort,
        round_timeout,
        target_accuracy: None,
        heartbeat_interval: Duration::from_secs(5),
        offline_after: Duration::from_secs(60),
        max_chunk_bytes,
        secure: None,
        secagg_stage_timeout: Duration::from_secs(60),
        retry_backoff: Duration::from_secs(1),
        max_round_failures: 3,
        // A benchmark's store needs no history: the blob store holds two rounds' worth.
        keep_rounds: Some(2),
        evaluation: EvaluationSchedule::OFF,
        personal: Default::default(),
        asynchronous: None,
        compress: Default::default(),
        cross_site: None,
    }
}

pub(super) fn store_url(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("ferry.db").display())
}

/// Runs the server half and prints its report.
pub fn run_server(args: RoundServerArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let spec = bench_spec(
            "bench-round",
            1,
            CohortRule {
                fraction: 1.0,
                min_clients: args.clients,
                seed: 0,
                training: super::no_training(),
            },
            Duration::from_secs(600),
            args.chunk_bytes,
        );
        let (coordinator, mut events, store, listener) = start_server(
            &args.dir,
            args.port,
            spec,
            args.clients,
            args.params,
            args.blobs.as_deref(),
        )
        .await?;
        let driver = tokio::spawn(coordinator.clone().drive());
        let shutdown = {
            let coordinator = coordinator.clone();
            async move {
                coordinator.until_finished().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        };
        println!("ready");
        ferry_server::serve(listener, coordinator, store, shutdown).await?;
        driver.await??;
        let mut report = None;
        while let Ok(event) = events.try_recv() {
            if let Event::RoundFinished(record) = event {
                report = Some(ServerReport {
                    round_wall_s: record.wall_s,
                    bytes_up: record.bytes_up,
                    bytes_down: record.bytes_down,
                    peak_rss_bytes: peak_rss_bytes(),
                });
            }
        }
        let report = report.context("the round did not finish")?;
        println!("{}", serde_json::to_string(&report)?);
        anyhow::Ok(())
    })
}

/// Runs the benchmark.
pub fn run(args: RoundArgs) -> Result<()> {
    anyhow::ensure!(
        args.clients >= 1 && args.params >= 1,
        "--clients and --params must be at least 1"
    );
    anyhow::ensure!(
        args.chunk_bytes >= 1024,
        "--chunk-bytes must be at least 1024"
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    crate::certs::generate(&dir.join("certs"), &["localhost".into()], &[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tokens = runtime.block_on(async {
        let store = Store::open(&store_url(dir)).await?;
        let mut tokens = Vec::new();
        for i in 0..args.clients {
            tokens.push(store.create_token(&format!("bench-{i}")).await?);
        }
        anyhow::Ok(tokens)
    })?;
    let port = crate::demo::free_port()?;
    let mut server = Command::new(std::env::current_exe()?)
        .args(["bench", "round-server", "--dir"])
        .arg(dir)
        .args([
            "--port",
            &port.to_string(),
            "--clients",
            &args.clients.to_string(),
        ])
        .args([
            "--params",
            &args.params.to_string(),
            "--chunk-bytes",
            &args.chunk_bytes.to_string(),
        ])
        .args(args.blobs.iter().flat_map(|b| ["--blobs", b.as_str()]))
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the server process")?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    if !first.contains("ready") {
        bail!("the server process did not start: {first}");
    }
    let model_mb = args.params as f64 * 4.0 / 1e6;
    println!(
        "one FedAvg round, {} clients x {} parameters ({model_mb:.1} MB), gRPC + TLS on loopback, {} kB chunks",
        args.clients,
        args.params,
        args.chunk_bytes / 1024
    );
    let began = Instant::now();
    // Each node is a process of its own, as deployed nodes are.
    let nodes = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            Command::new(std::env::current_exe()?)
                .args(["bench", "round-client", "--dir"])
                .arg(dir)
                .args(["--port", &port.to_string(), "--token", token])
                .args([
                    "--index",
                    &i.to_string(),
                    "--params",
                    &args.params.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot start a node process")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut node_peaks = Vec::new();
    for node in nodes {
        let out = node.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "a node process failed: {}",
            out.status
        );
        let report: ClientReport = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| serde_json::from_str(line).ok())
            .context("a node process reported nothing")?;
        node_peaks.extend(report.peak_rss_bytes);
    }
    let total_s = began.elapsed().as_secs_f64();
    let report: ServerReport = lines
        .map_while(Result::ok)
        .find_map(|line| serde_json::from_str(&line).ok())
        .context("the server process reported nothing")?;
    let status = server.wait()?;
    anyhow::ensure!(status.success(), "the server process failed: {status}");
    let moved = report.bytes_up + report.bytes_down;
    println!(
        "round wall time     {:.2} s (server: round open to committed)",
        report.round_wall_s
    );
    println!(
        "clients wall time   {total_s:.2} s (enrol, pull, download, upload, until told the run is over)"
    );
    println!(
        "bytes moved         {:.1} MB up + {:.1} MB down = {:.2} GB/s over the round",
        report.bytes_up as f64 / 1e6,
        report.bytes_down as f64 / 1e6,
        moved as f64 / report.round_wall_s / 1e9
    );
    match report.peak_rss_bytes {
        Some(p) => println!(
            "server peak RSS     {:.1} MB = {:.1} model sizes (one per client would be {:.1} MB)",
            p as f64 / 1e6,
            p as f64 / (model_mb * 1e6),
            args.clients as f64 * model_mb
        ),
        None => println!("server peak RSS     unknown (no /proc/self/status)"),
    }
    let node_peak = node_peaks.iter().copied().max();
    if let Some(peak) = node_peak {
        println!(
            "node peak RSS       {:.1} MB = {:.1} model sizes (the largest of {} node processes; \
             all nodes {:.1} MB)",
            peak as f64 / 1e6,
            peak as f64 / (model_mb * 1e6),
            node_peaks.len(),
            node_peaks.iter().sum::<u64>() as f64 / 1e6
        );
    }
    // The ceiling: the same bytes per stream through bare loopback TLS, one stream per client.
    let ceiling = runtime.block_on(super::tls::Loopback::new(&dir.join("certs"))?.throughput(
        args.clients,
        (args.params * 4).min(400_000_000),
        args.chunk_bytes,
    ))?;
    let round_gbps = moved as f64 / report.round_wall_s / 1e9;
    println!(
        "loopback TLS limit  {ceiling:.2} GB/s over {} streams (`ferry bench tls`); the round \
         moved {:.0}% of it",
        args.clients,
        100.0 * round_gbps / ceiling
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "ferry",
                "nodes": args.clients,
                "params": args.params,
                "round_s": report.round_wall_s,
                "throughput_gbps": round_gbps,
                "tls_ceiling_gbps": ceiling,
                "peak_rss_coordinator_mb": report.peak_rss_bytes.map(|b| b as f64 / 1e6),
                "peak_rss_node_mb": node_peak.map(|b| b as f64 / 1e6),
                "peak_rss_nodes_mb": node_peaks.iter().sum::<u64>() as f64 / 1e6,
            })
        );
    }
    Ok(())
}
