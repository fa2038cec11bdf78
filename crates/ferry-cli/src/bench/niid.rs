//! `ferry bench niid`: the NIID-Bench protocol (Li et al., ICDE 2022) on Fashion-MNIST, one row
//! per seed appended to a results file.
//!
//! Protocol: 10 parties, all sampled every round, 50 rounds, 10 local epochs, batch 64, SGD
//! lr 0.01, momentum 0.9, weight decay 1e-5, the `lenet` model, one initial model for all.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_core::{
    strategy::{StrategyName, StrategyParams},
    task::LocalTraining,
};
use ferry_ml::{
    data::{DatasetKind, partition::Partitioner},
    models::ModelKind,
};
use ferry_sim::SimConfig;

/// Options of `ferry bench niid`.
#[derive(Args)]
pub struct NiidArgs {
    /// Strategy to run.
    #[arg(long, default_value = "fedavg")]
    strategy: String,
    /// Partition: iid, dirichlet:B, labels:C, classes:A+B/C+D/..., quantity:B or noise:S.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Comma-separated seeds; one run each.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Rounds (the protocol's 50; fewer to shorten).
    #[arg(long, default_value_t = 50)]
    rounds: u32,
    /// Local epochs (the protocol's 10; fewer to shorten).
    #[arg(long, default_value_t = 10)]
    local_epochs: u32,
    /// FedProx proximal weight (NIID-Bench's grid: 0.001, 0.01, 0.1, 1).
    #[arg(long, default_value_t = 0.01)]
    mu: f64,
    /// Server learning rate [default: the strategy's].
    #[arg(long)]
    server_lr: Option<f64>,
    /// CSV file the results are appended to.
    #[arg(long, default_value = "docs/benchmarks/niid-results.csv")]
    results: PathBuf,
    /// Folder under which each run keeps its per-round history (`<strategy>-<partition>-s<seed>`).
    #[arg(long, default_value = "runs/niid")]
    out: PathBuf,
    /// Folder with the Fashion-MNIST files (searched first).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Nodes trained at once [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

const HEADER: &str = "date,command,strategy,partition,seed,rounds,local_epochs,mu,wall_s,final_accuracy,best_accuracy,per_round_accuracy\n";

/// Runs the protocol once per seed, appending a row after each run.
pub fn run(args: NiidArgs) -> Result<()> {
    let strategy: StrategyName = args.strategy.parse()?;
    let partition: Partitioner = args.partition.parse()?;
    anyhow::ensure!(
        args.rounds >= 1 && args.local_epochs >= 1,
        "--rounds and --local-epochs must be at least 1"
    );
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    for &seed in &args.seeds {
        let config = SimConfig {
            dataset: DatasetKind::FashionMnist,
            data_dir: args.data_dir.clone(),
            model: ModelKind::Lenet,
            initial_model: None,
            personal: Vec::new(),
            frozen: Vec::new(),
            clients: 10,
            fraction: 1.0,
            min_clients: 10,
            rounds: args.rounds,
            training: LocalTraining {
                epochs: args.local_epochs,
                batch_size: 64,
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 1e-5,
            },
            partition: partition.clone(),
            strategy,
            strategy_params: StrategyParams {
                mu: args.mu,
                server_lr: args.server_lr,
                ..StrategyParams::default()
            },
            seed,
            target_accuracy: None,
            evaluate_every: None,
            evaluate_fraction: 1.0,
            evaluate_holdout: 0.1,
            threads: args
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
                .max(1),
            dp: None,
            aggregator: None,
            norm_bound: None,
            attack: None,
            secagg: None,
            fleet: Default::default(),
            cross_site: None,
        };
        println!(
            "NIID-Bench: {strategy} on {partition}, seed {seed}, {} rounds x {} local epochs",
            args.rounds, args.local_epochs
        );
        let run_dir = args
            .out
            .join(format!("{strategy}-{}-s{seed}", folder_tag(&partition)));
        let (outcome, final_record) = super::simulate_in(&config, &run_dir, true)?;
        let wall_s = final_record.wall_s;
        let accuracies: Vec<String> = outcome
            .rounds
            .iter()
            .map(|r| format!("{:.4}", r.accuracy))
            .collect();
        let last = outcome.rounds.last().map_or(0.0, |r| r.accuracy);
        let best = outcome.best_accuracy();
        let row = format!(
            "{},\"{}\",{strategy},{partition},{seed},{},{},{},{wall_s:.1},{last:.4},{best:.4},{}\n",
            chrono::Local::now().format("%Y-%m-%d"),
            command.replace('"', "'"),
            args.rounds,
            args.local_epochs,
            args.mu,
            accuracies.join(";")
        );
        super::append_rows(&args.results, HEADER, &row)?;
        println!(
            "seed {seed}: final accuracy {last:.4} (best {best:.4}) in {wall_s:.0} s, model_sha256 {}; appended to {}",
            final_record.model_sha256,
            args.results.display()
        );
    }
    Ok(())
}

/// The partition as part of a folder name: `labels:3` -> `labels3`,
/// `classes:0+6/1+7` -> `classes06-17`.
fn folder_tag(partition: &Partitioner) -> String {
    partition
        .to_string()
        .replace([':', '+'], "")
        .replace('/', "-")
}
