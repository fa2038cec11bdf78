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
use ferry_core::{model::sha256_hex, privacy::noise::NoiseSeed};
use ferry_engine::federation::{RoundObserver, StopReason};
use ferry_server::{
    blobs::Blobs,
    coordinator::{Coordinator, Event, is_failure},
    error::ErrorKind,
    store::Store,
};

use crate::{
    progress::{ConsoleProgress, federated_summary, figure},
    report::{self, FinalRecord, History},
};

mod config;
#[cfg(test)]
mod config_fuzz;
mod dashboard;
mod leadership;

use crate::starting_point::StartingPoint;
use config::{ApiFile, DeployedConfig, ServerSetup, load, spec};
pub use config::{DEFAULT_STORE, ServerArgs, store_url};

/// The token in `path`, created (readable by its owner only, starting `ferry-{kind}-`) when
/// missing.
fn token_file(path: &Path, kind: &str) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let token = format!("ferry-{kind}-{}", ferry_server::auth::new_secret());
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
        .with_context(|| format!("cannot write the {kind} token to {}", path.display()))?;
    Ok(token)
}

fn start_api(
    api: &ApiFile,
    config: &DeployedConfig,
    coordinator: Arc<Coordinator>,
    store: Store,
) -> Result<()> {
    let addr: SocketAddr = api
        .listen
        .parse()
        .with_context(|| format!("[api] listen = '{}' is not HOST:PORT", api.listen))?;
    let admin_hash = sha256_hex(token_file(&api.admin_token_file, "admin")?.as_bytes());
    let viewer_hash = match &api.viewer_token_file {
        Some(path) => Some(sha256_hex(token_file(path, "viewer")?.as_bytes())),
        None => None,
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot start the metrics recorder")?;
    let rest = ferry_server::api::Api::new(
        coordinator.clone(),
        store.clone(),
        admin_hash.clone(),
        metrics,
    );
    let source = dashboard::ServerDashboard::new(
        coordinator.clone(),
        store,
        serde_json::to_value(config).context("describing the run for the dashboard")?,
    );
    let pages = ferry_dashboard::Dashboard::new(
        Arc::new(source),
        ferry_dashboard::Access::new(viewer_hash, Some(admin_hash)),
    );
    println!(
        "dashboard on http://{addr}/ ({}); REST API on http://{addr}/api/v1/status (admin token in {}), metrics on http://{addr}/metrics",
        match &api.viewer_token_file {
            Some(path) => format!(
                "from other machines with the viewer token in {}",
                path.display()
            ),
            None => "from this machine; set [api] viewer-token-file to view it from others".into(),
        },
        api.admin_token_file.display()
    );
    let router = rest.router().merge(pages.router());
    tokio::spawn(async move {
        let shutdown = async move { coordinator.until_finished().await };
        let served = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => ferry_dashboard::serve(listener, router, shutdown).await,
            Err(e) => Err(e),
        };
        if let Err(e) = served {
            eprintln!("warning: the REST API and dashboard on {addr} stopped: {e}");
        }
    });
    Ok(())
}

/// Runs `ferry server`.
pub fn run(args: ServerArgs) -> Result<()> {
    let setup = load(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(setup))
}

async fn serve(setup: ServerSetup) -> Result<()> {
    let run = &setup.config.run;
    let start = StartingPoint::of(run)?;
    let initial = start.model;
    // A deployment draws its DP noise from the operating system, never from the run seed.
    let strategy = run.strategy(run.clients, NoiseSeed::Os)?;
    // A database restarting is waited out, at start and on every call, for up to 15 minutes.
    let store = Store::open_waiting(&setup.file.store, Duration::from_secs(15 * 60)).await?;
    let lease = if store.is_shared() {
        let terms = leadership::Terms::of(&setup);
        let api =
            match &setup.file.api {
                Some(api) => Some(api.listen.parse().with_context(|| {
                    format!("[api] listen = '{}' is not HOST:PORT", api.listen)
                })?),
                None => None,
            };
        let Some(epoch) = leadership::become_active(&store, &terms, &setup.listener, api).await?
        else {
            println!("stopped while a standby");
            return Ok(());
        };
        println!(
            "ferry server: active coordinator as {} (lease epoch {epoch})",
            terms.name
        );
        Some(leadership::Held::renew(store.clone(), epoch, terms.ttl))
    } else {
        None
    };
    let store = match &lease {
        Some(lease) => store.fenced(lease.epoch),
        None => store,
    };
    let blobs = Blobs::at(&setup.file.blobs, &setup.file.s3, &setup.file.uploads)?;
    let started = Coordinator::start(
        spec(&setup.config, &strategy, start.evaluator.is_some())?,
        strategy,
        initial,
        start.evaluator.map(Arc::from),
        store.clone(),
        blobs,
    )
    .await;
    let (coordinator, events) = match started {
        Err(e) if e.kind() == ErrorKind::Fenced => return Err(leadership::rejoin_as_standby()),
        started => started?,
    };
    println!(
        "ferry server: run {} — {} with {}, {} rounds, at least {} nodes per round; listening on {} ({})",
        coordinator.run_id(),
        run.strategy,
        start.description,
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
        start_api(api, &setup.config, coordinator.clone(), store.clone())?;
    }
    let linger = Duration::from_secs_f64((2.0 * setup.config.deployment.heartbeat).max(3.0));
    let finished = {
        let coordinator = coordinator.clone();
        let lease = lease.as_ref();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    coordinator.until_finished().await;
                    // Give polling nodes time to hear that the run is over.
                    tokio::time::sleep(linger).await;
                } => {}
                () = async {
                    match lease {
                        Some(lease) => lease.lost().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    };
    ferry_server::serve(setup.listener.clone(), coordinator.clone(), store, finished).await?;
    if let Some(lease) = &lease
        && !lease.still_held().await
    {
        driver.abort();
        return Err(leadership::rejoin_as_standby());
    }
    let Some(reason) = coordinator.finished().await else {
        driver.abort();
        if let Some(lease) = lease {
            lease.resign().await;
        }
        println!(
            "stopped; the run's state is saved, and `ferry server` with the same config resumes it"
        );
        return Ok(());
    };
    // The run ended here: a standby that takes the lease now finds it ended too.
    if let Some(lease) = lease {
        lease.resign().await;
    }
    let driven = driver.await.context("the round driver stopped")?;
    printer.abort();
    if is_failure(&reason) {
        return stopped_as_failed(&setup, &coordinator, driven).await;
    }
    driven?;
    let rounds = coordinator.history().await?;
    let failed = coordinator.failed_rounds().await?;
    let last = rounds.last().context("the run finished no round")?;
    let model = coordinator.global().await?;
    let (model_bytes, sha) = report::model_bytes(&model)?;
    let final_record = FinalRecord::of(
        &rounds,
        sha.clone(),
        // The coordinator ends runs with the stop reasons' names.
        serde_json::from_value(serde_json::Value::String(reason.clone()))
            .unwrap_or(StopReason::RoundsCompleted),
        started.elapsed().as_secs_f64(),
    )?
    .with_global_matrix(run.cross_site);
    if let Some(matrix) = &final_record.cross_site {
        crate::cross_site::write_csv(&setup.file.out, matrix)?;
        crate::cross_site::write_site_models(&setup.file.out, &coordinator.site_models().await?)?;
        crate::cross_site::print_summary(matrix);
    }
    let history = History {
        config: &setup.config,
        rounds: &rounds,
        final_record: Some(final_record),
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
        "done: {} rounds ({reason}); final accuracy {}, loss {}{}; model_sha256 {sha}; outputs in {}",
        last.round,
        figure(last.accuracy),
        figure(last.loss),
        federated_summary(last.federated.as_ref()),
        setup.file.out.display()
    );
    crate::progress::print_fairness(
        history
            .final_record
            .as_ref()
            .and_then(|f| f.fairness.as_ref()),
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
            Event::RoundEvaluated(record) => {
                console.round_evaluated(&record);
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
    driven: Result<String, ferry_server::ServerError>,
) -> Result<()> {
    write_progress(&setup.config, &setup.file.out, coordinator).await;
    driven.context("the coordinator stopped on an error; start `ferry server` with the same configuration to resume the run")?;
    let status = coordinator.status().await;
    bail!(
        "the run stopped at round {} of {} after {} failed attempt(s) in a row ({} rounds \
         applied); last failure: {}. Bring more nodes online or relax what the round needs, then \
         start `ferry server` with the same configuration to resume",
        status.round,
        status.rounds,
        status.failed_attempts,
        status.round - 1,
        status.last_failure.as_deref().unwrap_or("unknown")
    )
}
