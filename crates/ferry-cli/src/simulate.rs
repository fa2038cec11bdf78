//! `ferry simulate`: run a simulated federation and write its outputs.

use std::{sync::Arc, time::Instant};

use anyhow::{Context, Result};
use ferry_dashboard::live::LiveRun;
use ferry_engine::federation::StopReason;
use ferry_sim::{SimConfig, Simulation, baselines};

use crate::{
    cross_site,
    dashboard::{self, LiveObserver},
    folder_split,
    options::SimulateArgs,
    own_code::{self, OwnCodeArgs},
    progress::{self, Both, ConsoleProgress, human_bytes, progress_bar},
    report::{self, HistoryFiles},
};

/// Options of `ferry simulate`: the run, and optionally the user's own training program.
#[derive(clap::Args, Debug)]
pub struct SimulateCommand {
    /// The run.
    #[command(flatten)]
    pub run: SimulateArgs,
    /// The user's own code as every node's trainer.
    #[command(flatten)]
    pub own: OwnCodeArgs,
    /// Serve the live dashboard on this address while the run goes on (loopback: viewable
    /// from this machine; any other address prints a viewer token).
    #[arg(long, value_name = "HOST:PORT")]
    pub dashboard: Option<std::net::SocketAddr>,
}

/// Runs `ferry simulate` with the given options.
pub fn run(command: SimulateCommand) -> Result<()> {
    let args = command.run.merge_config_file()?;
    if let Some((trainer, folders)) = command.own.wanted()? {
        let serving = command.own.serving()?;
        return run_own_code(&args, trainer, serving, &folders, command.dashboard);
    }
    let config = args.resolve()?;
    let out = args.out_dir();
    println!(
        "ferry simulate: {} on {} split {} across {} clients, {} rounds, strategy {}, seed {}",
        config.model,
        config.dataset,
        config.partition,
        config.clients,
        config.rounds,
        config.strategy,
        config.seed
    );
    report::prepare_dir(&out)?;
    let settings = toml::to_string(&args).context("describing the run's settings")?;
    report::put(&out, cross_site::RUN_SETTINGS, settings.as_bytes())?;
    let sim = Simulation::prepare(config.clone())?;
    let classes = sim.node_classes();
    let sizes: Vec<usize> = classes.iter().map(|c| c.iter().sum()).collect();
    println!(
        "{} parameters; node sizes {}..{} examples; {} threads",
        sim.initial_model().num_params(),
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        config.threads
    );
    progress::print_split(&classes);
    let live = live_dashboard(command.dashboard, &out, &config)?;
    let started = Instant::now();
    let mut observer = Both(
        Both(
            ConsoleProgress::new(config.rounds),
            HistoryFiles::new(&out, &config, sim.attackers()),
        ),
        LiveObserver(live.clone()),
    );
    let outcome = sim.run(&mut observer)?;
    if let Some(live) = &live {
        live.finished(&stop_name(outcome.stop));
    }
    let wall_s = started.elapsed().as_secs_f64();
    let last = outcome.rounds.last().context("the run finished no round")?;
    let baselines = if args.baselines {
        let epochs = config.epochs_per_node(last.round);
        println!(
            "training baselines: central on pooled data and each node alone, {epochs} epochs each"
        );
        let bar = progress_bar(
            config.clients as u64 + 1,
            "baselines [{bar:30}] {pos}/{len} models  {elapsed}",
        );
        let result = baselines::run(&sim, epochs, || bar.inc(1));
        bar.finish_and_clear();
        Some(result?)
    } else {
        None
    };
    let matrix = config
        .cross_site
        .map(|models| cross_site::for_simulation(&sim, &outcome.model, models, &out))
        .transpose()?;
    let f = report::write_simulation(
        &out,
        &config,
        &outcome,
        wall_s,
        baselines.as_ref(),
        matrix,
        sim.attackers(),
    )?;
    let best = outcome.best_accuracy();
    println!(
        "done: {} rounds in {:.1} s ({:?}); final accuracy {:.4}, loss {:.4}, best accuracy {:.4}; moved up {} down {}",
        f.rounds_run,
        f.wall_s,
        f.stop,
        f.accuracy,
        f.loss,
        best,
        human_bytes(f.bytes_up),
        human_bytes(f.bytes_down)
    );
    println!("model_sha256 {}", f.model_sha256);
    progress::print_fairness(f.fairness.as_ref());
    if let Some(b) = &baselines {
        println!(
            "is federated learning worth it here? test accuracy, same {} epochs per node:",
            b.epochs
        );
        println!("  federated ({})        {:.4}", config.strategy, f.accuracy);
        println!("  central (pooled data)   {:.4}", b.central_accuracy);
        println!("  local only, mean node   {:.4}", b.local_mean_accuracy);
        println!("  local only, worst node  {:.4}", b.local_worst_accuracy);
    }
    progress::print_local_gain(f.gain_over_local.as_ref());
    println!("outputs in {}", out.display());
    Ok(())
}

/// The dashboard of a simulation of `config` writing to `out`, served on `addr` if asked for.
fn live_dashboard(
    addr: Option<std::net::SocketAddr>,
    out: &std::path::Path,
    config: &SimConfig,
) -> Result<Option<Arc<LiveRun>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let run = Arc::new(LiveRun::new(
        out.display().to_string(),
        serde_json::to_value(config).context("describing the run for the dashboard")?,
        config.rounds,
        (0..config.clients).map(|id| id.to_string()).collect(),
    ));
    dashboard::serve_simulation(addr, run.clone())?;
    Ok(Some(run))
}

/// A stop reason as the records and the dashboard name it.
fn stop_name(stop: StopReason) -> String {
    match serde_json::to_value(stop) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{stop:?}"),
    }
}

/// `ferry simulate --trainer-cmd`: the user's program trains every virtual node.
fn run_own_code(
    args: &SimulateArgs,
    trainer: &str,
    serving: own_code::Serving,
    folders: &[std::path::PathBuf],
    dashboard: Option<std::net::SocketAddr>,
) -> Result<()> {
    if args.baselines {
        anyhow::bail!(
            "--baselines trains the built-in networks centrally; it does not apply with --trainer-cmd"
        );
    }
    let mut config = args.resolve()?;
    let out = args.out_dir();
    report::prepare_dir(&out)?;
    let folders = match (folders, args.clients) {
        ([one], Some(n)) if n > 1 => {
            let split =
                folder_split::split(one, n, &config.partition, config.seed, &out.join("data"))?;
            println!(
                "split {} into {n} nodes ({}) under {}",
                one.display(),
                config.partition,
                out.join("data").display()
            );
            split
        }
        (_, Some(n)) if n != folders.len() => anyhow::bail!(
            "--clients {n}, but --node-data matched {} folders: give one folder per node, or one \
             folder with a train.csv to split into --clients nodes",
            folders.len()
        ),
        _ => folders.to_vec(),
    };
    config.clients = folders.len();
    println!(
        "ferry simulate: your trainer, {} rounds, strategy {}, seed {}",
        config.rounds, config.strategy, config.seed
    );
    let live = live_dashboard(dashboard, &out, &config)?;
    let started = Instant::now();
    let mut observer = Both(
        Both(
            ConsoleProgress::new(config.rounds),
            HistoryFiles::new(&out, &config, &[]),
        ),
        LiveObserver(live.clone()),
    );
    let (outcome, site_models) =
        own_code::run(trainer, serving, &folders, &config, &out, &mut observer)?;
    if let Some(live) = &live {
        live.finished(&stop_name(outcome.stop));
    }
    let matrix = site_models
        .map(|site_models| cross_site::for_own_code(&outcome, site_models, &out))
        .transpose()?
        .flatten();
    let f = report::write_simulation(
        &out,
        &config,
        &outcome,
        started.elapsed().as_secs_f64(),
        None,
        matrix,
        &[],
    )?;
    println!(
        "done: {} rounds in {:.1} s ({:?}); final accuracy {}; outputs in {}",
        f.rounds_run,
        f.wall_s,
        f.stop,
        progress::figure(f.accuracy),
        out.display()
    );
    progress::print_fairness(f.fairness.as_ref());
    Ok(())
}
