//! `ferry bench fleet-learning`: synchronous FedAvg against FedBuff, and each update
//! compression against none, on one simulated fleet of mixed speed and availability.
//!
//! Fashion-MNIST, `lenet`, 100 nodes (IID), the same seed and trace for every run. The
//! synchronous reference selects `--fraction` of the online nodes each round and waits for
//! them; its final accuracy is the target every run is timed to on the simulated clock.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::{
    devices::{Availability, Devices, SpeedDistribution},
    record::RoundRecord,
};

use crate::{options::SimulateArgs, progress::simulated_time};

/// Options of `ferry bench fleet-learning`.
#[derive(Args)]
pub struct FleetLearningArgs {
    /// Rounds of the synchronous runs.
    #[arg(long, default_value_t = 60)]
    rounds: u32,
    /// Most versions an asynchronous run (or rounds a run to within 2 points, topk-long) may
    /// take; it stops at its target before.
    #[arg(long, default_value_t = 200)]
    versions: u32,
    /// The fleet's trace; drawn from the documented distributions (30% of the nodes 10x
    /// slower, online sessions of 10 min on average with 5 min gaps, 2 Mbit/s up and 20 down)
    /// and written here if the file does not exist.
    #[arg(long, default_value = "docs/benchmarks/fleet-learning-trace.csv")]
    trace: PathBuf,
    /// Runs to do, by name (sync, sync-deadline, fedbuff, fp16, int8, topk, topk-long,
    /// fedbuff-int8).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sync,sync-deadline,fedbuff,fp16,int8,topk,topk-long,fedbuff-int8"
    )]
    runs: Vec<String>,
    /// Seed of the split, the initial model, selection and training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder under which each run keeps its history, and the charts.
    #[arg(long, default_value = "runs/fleet-learning")]
    out: PathBuf,
    /// CSV file the results are appended to.
    #[arg(long, default_value = "docs/benchmarks/fleet-learning-results.csv")]
    results: PathBuf,
    /// Nodes trained at once [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

/// Nodes in the fleet.
const NODES: usize = 100;

/// Simulated seconds the written trace covers (every run here ends within an hour); past
/// them each node stays online.
const TRACE_HORIZON_S: f64 = 6.0 * 3600.0;

const HEADER: &str = "date,run,seed,records,final_accuracy,sim_s_to_target,up_bytes_to_target,down_bytes_to_target,up_bytes_total\n";

/// FedBuff's settings in the benchmark: 10 updates a version, 20 nodes training at once.
const FEDBUFF: [&str; 6] = [
    "--mode",
    "async",
    "--buffer-size",
    "10",
    "--max-concurrency",
    "20",
];

/// When a run ends.
#[derive(Clone, Copy)]
enum Until {
    /// After the synchronous runs' rounds.
    Rounds,
    /// Once it is within `margin` of the target accuracy, or after `--versions` records.
    Target {
        /// Accuracy below the target that counts as reaching it.
        margin: f64,
    },
}

/// One run of the benchmark: the flags it adds to the shared ones, and when it ends.
fn variant(name: &str) -> Result<(Vec<&'static str>, Until)> {
    let rounds = Until::Rounds;
    let target = Until::Target { margin: 0.0 };
    Ok(match name {
        "sync" => (vec![], rounds),
        // A reference device's task and transfers take 1.8 s, a straggler's 10.8 s.
        "sync-deadline" => (vec!["--round-deadline", "3"], rounds),
        "fedbuff" => (FEDBUFF.to_vec(), target),
        "fp16" => (vec!["--compress", "fp16"], rounds),
        "int8" => (vec!["--compress", "int8"], rounds),
        "topk" => (vec!["--compress", "topk:0.01"], rounds),
        // Top-k's target: within 2 points, on however many rounds it takes.
        "topk-long" => (
            vec!["--compress", "topk:0.01"],
            Until::Target { margin: 0.02 },
        ),
        "fedbuff-int8" => ([&FEDBUFF[..], &["--compress", "int8"]].concat(), target),
        other => anyhow::bail!(
            "unknown run '{other}': expected sync, sync-deadline, fedbuff, fp16, int8, topk, \
             topk-long or fedbuff-int8"
        ),
    })
}

/// What one run reached.
struct Outcome {
    name: String,
    records: Vec<RoundRecord>,
}

impl Outcome {
    fn final_accuracy(&self) -> f64 {
        self.records.last().map_or(f64::NAN, |r| r.accuracy)
    }

    fn total(&self, pick: fn(&RoundRecord) -> u64) -> u64 {
        self.records.iter().map(pick).sum()
    }

    /// The first record at or above `target`, with the bytes up and down until then.
    fn to_target(&self, target: f64) -> Option<(f64, u64, u64)> {
        let mut up = 0;
        let mut down = 0;
        for r in &self.records {
            up += r.bytes_up;
            down += r.bytes_down;
            if r.accuracy >= target {
                return Some((r.sim_time_s.unwrap_or(f64::NAN), up, down));
            }
        }
        None
    }
}

/// Runs every variant on the same fleet and prints the comparison.
pub fn run(args: FleetLearningArgs) -> Result<()> {
    let variants = args
        .runs
        .iter()
        .map(|name| variant(name).map(|variant| (name.clone(), variant)))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(
        args.runs.first().map(String::as_str) == Some("sync"),
        "--runs must start with sync: its final accuracy is the target every run is timed to"
    );
    ensure_trace(&args.trace, args.seed)?;
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (name, (flags, until)) in variants {
        let target = outcomes.first().map(Outcome::final_accuracy);
        let config = config(&args, &flags, until, target)?;
        println!("fleet-learning: {name} ({})", flags.join(" "));
        let (outcome, _) = super::simulate_in(&config, &args.out.join(&name), false)?;
        outcomes.push(Outcome {
            name,
            records: outcome.rounds,
        });
    }
    report(&args, &outcomes)
}

/// The run's configuration: the shared settings, then the variant's flags; a run that goes
/// `until` the target stops there.
fn config(
    args: &FleetLearningArgs,
    flags: &[&str],
    until: Until,
    target: Option<f64>,
) -> Result<ferry_sim::SimConfig> {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        run: SimulateArgs,
    }
    let rounds = match until {
        Until::Rounds => args.rounds,
        Until::Target { .. } => args.versions,
    };
    let mut all: Vec<String> = [
        "ferry",
        "--clients",
        "100",
        "--fraction",
        "0.1",
        "--local-epochs",
        "2",
        "--lr",
        "0.05",
        "--trace",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push(args.trace.display().to_string());
    all.extend(["--seed".into(), args.seed.to_string()]);
    all.extend(["--rounds".into(), rounds.to_string()]);
    if let Some(threads) = args.threads {
        all.extend(["--threads".into(), threads.to_string()]);
    }
    if let (Some(target), Until::Target { margin }) = (target, until) {
        all.extend([
            "--target-accuracy".into(),
            format!("{:.4}", target - margin),
        ]);
    }
    all.extend(flags.iter().map(|s| s.to_string()));
    Flags::try_parse_from(all)?.run.resolve()
}

/// Draws the documented fleet into `path` unless a trace is already there.
fn ensure_trace(path: &std::path::Path, seed: u64) -> Result<()> {
    if path.exists() {
        println!("fleet: {}", path.display());
        return Ok(());
    }
    let devices = Devices::drawn(
        NODES,
        SpeedDistribution::Stragglers {
            share: 0.3,
            slowdown: 10.0,
        },
        Availability::Sessions {
            online_s: 600.0,
            offline_s: 300.0,
        },
        Some((2.0, 20.0)),
        ferry_sim::fleet::DEFAULT_STEP_S,
        seed,
    )?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, devices.to_trace(TRACE_HORIZON_S))
        .with_context(|| format!("cannot write the trace {}", path.display()))?;
    println!("fleet: drawn and written to {}", path.display());
    Ok(())
}

/// Prints the table, appends it to the results file and draws accuracy against simulated
/// time and against uplink bytes.
fn report(args: &FleetLearningArgs, outcomes: &[Outcome]) -> Result<()> {
    let target = outcomes[0].final_accuracy();
    let reference_up = outcomes[0].total(|r| r.bytes_up) as f64;
    let reference_time = outcomes[0]
        .to_target(target)
        .map_or(f64::NAN, |(t, _, _)| t);
    println!(
        "target: the synchronous run's final accuracy {target:.4}, reached at {}",
        simulated_time(reference_time)
    );
    println!(
        "| run | rounds / versions | final accuracy | simulated time to target | x sync | uplink to target | downlink to target | uplink, whole run | x sync uplink |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let date = chrono::Local::now().format("%Y-%m-%d");
    let mut rows = String::new();
    for o in outcomes {
        let up = o.total(|r| r.bytes_up);
        let reached = o.to_target(target);
        let (time, up_to, down_to) = match reached {
            Some((t, u, d)) => (
                simulated_time(t),
                format!("{:.1} MB", u as f64 / 1e6),
                format!("{:.1} MB", d as f64 / 1e6),
            ),
            None => ("not reached".into(), "-".into(), "-".into()),
        };
        let speedup = reached.map_or("-".into(), |(t, _, _)| format!("{:.2}", t / reference_time));
        println!(
            "| {} | {} | {:.4} | {time} | {speedup} | {up_to} | {down_to} | {:.1} MB | {:.3} |",
            o.name,
            o.records.len(),
            o.final_accuracy(),
            up as f64 / 1e6,
            up as f64 / reference_up
        );
        rows.push_str(&format!(
            "{date},{},{},{},{:.4},{},{},{},{}\n",
            o.name,
            args.seed,
            o.records.len(),
            o.final_accuracy(),
            reached.map_or(String::new(), |(t, _, _)| format!("{t:.1}")),
            reached.map_or(String::new(), |(_, u, _)| u.to_string()),
            reached.map_or(String::new(), |(_, _, d)| d.to_string()),
            up
        ));
    }
    super::append_rows(&args.results, HEADER, &rows)?;
    let over = |x: fn(&RoundRecord, u64) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        outcomes
            .iter()
            .map(|o| {
                let mut up = 0;
                let line = o
                    .records
                    .iter()
                    .map(|r| {
                        up += r.bytes_up;
                        (x(r, up), r.accuracy)
                    })
                    .collect();
                (o.name.clone(), line)
            })
            .collect()
    };
    let time_chart = args.out.join("accuracy-vs-time.svg");
    crate::chart::draw_lines(
        &time_chart,
        &over(|r, _| r.sim_time_s.unwrap_or(0.0) / 3600.0),
        "simulated hours",
        "Fashion-MNIST, 100 nodes of mixed speed and availability",
    )?;
    let bytes_chart = args.out.join("accuracy-vs-uplink.svg");
    crate::chart::draw_lines(
        &bytes_chart,
        &over(|_, up| up as f64 / 1e6),
        "uplink MB",
        "Fashion-MNIST, 100 nodes: accuracy against uplink bytes",
    )?;
    println!(
        "charts: {} and {}; rows appended to {}",
        time_chart.display(),
        bytes_chart.display(),
        args.results.display()
    );
    Ok(())
}
