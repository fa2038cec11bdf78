//! `ferry bench`: speed measurements, printed with the machine they ran on.

mod aggregate;
mod dp;
mod fleet;
mod fleet_learning;
mod niid;
mod robust;
mod round;
mod secagg;
mod sim_round;
mod tls;
mod train;
mod trainer;

use std::{path::Path, time::Instant};

use anyhow::Result;
use clap::Subcommand;
use ferry_engine::federation::RunOutcome;
use ferry_sim::{SimConfig, Simulation};

use crate::{
    progress::{Both, ConsoleProgress},
    report::{self, FinalRecord, HistoryFiles},
};

/// The benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images/second of forward + backward + SGD step at batch 64, per model.
    Train(train::TrainArgs),
    /// FedAvg aggregation of N synthetic updates: updates/s, GB/s, peak memory.
    Aggregate(aggregate::AggregateArgs),
    /// Privacy-utility trade-off: one simulation per DP noise multiplier, accuracy against
    /// epsilon.
    Dp(Box<dp::DpArgs>),
    /// The NIID-Bench Fashion-MNIST protocol for one strategy and partition.
    Niid(niid::NiidArgs),
    /// Synchronous FedAvg against FedBuff and each update compression against none, on one
    /// simulated fleet of mixed speed and availability: time and bytes to target accuracy.
    FleetLearning(fleet_learning::FleetLearningArgs),
    /// Robust aggregation under attack: one simulation per rule and attack, as a table.
    Robust(Box<robust::RobustArgs>),
    /// One deployed round over loopback gRPC + TLS with synthetic updates: time, GB/s, server
    /// memory.
    Round(round::RoundArgs),
    /// Simulated FedAvg rounds of N in-process nodes without training: the engine's own cost
    /// per round and the whole simulation's memory.
    SimRound(sim_round::SimRoundArgs),
    /// One SecAgg+ round: node and server time per stage, bytes per node against a plain
    /// upload.
    Secagg(secagg::SecAggArgs),
    /// What loopback TLS can move with Ferry's TLS stack and no Ferry logic, over one stream
    /// and N in parallel: the ceiling a deployed round's throughput is measured against.
    Tls(tls::TlsArgs),
    /// The external-command trainer's cost per round: a process per round against one
    /// long-lived process.
    Trainer(trainer::TrainerArgs),
    /// A fleet of node agents (many per process) against a real server over loopback TLS for
    /// R rounds: round time, task dispatch latency, server memory, CPU, sockets, store size
    /// and RPC latency, as a table and CSV.
    Fleet(fleet::FleetArgs),
    /// The server half of `bench fleet` (started by it).
    #[command(hide = true)]
    FleetServer(fleet::FleetServerArgs),
    /// The nodes of `bench fleet` (started by it).
    #[command(hide = true)]
    FleetNodes(fleet::FleetNodesArgs),
    /// The server half of `bench round` (started by it).
    #[command(hide = true)]
    RoundServer(round::RoundServerArgs),
    /// One node of `bench round` (started by it).
    #[command(hide = true)]
    RoundClient(round::RoundClientArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    let cmd = match cmd {
        BenchCommand::RoundServer(args) => return round::run_server(args),
        BenchCommand::RoundClient(args) => return round::run_client(args),
        BenchCommand::FleetServer(args) => return fleet::run_server(args),
        BenchCommand::FleetNodes(args) => return fleet::run_nodes(args),
        other => other,
    };
    println!("machine: {}", machine());
    match cmd {
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::Aggregate(args) => aggregate::run(args),
        BenchCommand::Dp(args) => dp::run(*args),
        BenchCommand::Niid(args) => niid::run(args),
        BenchCommand::FleetLearning(args) => fleet_learning::run(args),
        BenchCommand::Robust(args) => robust::run(*args),
        BenchCommand::Round(args) => round::run(args),
        BenchCommand::Fleet(args) => fleet::run(args),
        BenchCommand::Trainer(args) => trainer::run(args),
        BenchCommand::Secagg(args) => secagg::run(args),
        BenchCommand::SimRound(args) => sim_round::run(args),
        BenchCommand::Tls(args) => tls::run(args),
        BenchCommand::RoundServer(args) => round::run_server(args),
        BenchCommand::RoundClient(args) => round::run_client(args),
        BenchCommand::FleetServer(args) => fleet::run_server(args),
        BenchCommand::FleetNodes(args) => fleet::run_nodes(args),
    }
}

/// Runs one simulation of `config` with round lines on screen (printing the nodes' classes
/// first when `show_split`) and writes its outputs into `dir`: history after every round, then
/// chart and final model; returns the outcome and the final record.
fn simulate_in(
    config: &SimConfig,
    dir: &Path,
    show_split: bool,
) -> Result<(RunOutcome, FinalRecord)> {
    report::prepare_dir(dir)?;
    let started = Instant::now();
    let sim = Simulation::prepare(config.clone())?;
    if show_split {
        crate::progress::print_split(&sim.node_classes());
    }
    let mut observer = Both(
        ConsoleProgress::new(config.rounds),
        HistoryFiles::new(dir, config, sim.attackers()),
    );
    let outcome = sim.run(&mut observer)?;
    let wall_s = started.elapsed().as_secs_f64();
    let final_record =
        report::write_simulation(dir, config, &outcome, wall_s, None, None, sim.attackers())?;
    Ok((outcome, final_record))
}

/// The local-training settings sent with a benchmark's no-op rounds (its nodes do not train).
fn no_training() -> ferry_core::task::LocalTraining {
    ferry_core::task::LocalTraining {
        epochs: 1,
        batch_size: 1,
        lr: 0.01,
        momentum: 0.0,
        weight_decay: 0.0,
    }
}

/// CPU model and core count, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{cpu}, {cores} cores")
}

/// The process's peak resident memory in bytes (Linux `VmHWM`), if known.
fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM:` the peak resident
/// memory, `VmRSS:` the resident memory now), in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    proc_status_bytes_of("self", field)
}

/// [`proc_status_bytes`] of the process `pid` ("self" for this one).
pub fn proc_status_bytes_of(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Appends `rows` to the results file at `path`, creating it (and its folder) with `header`
/// first.
fn append_rows(path: &Path, header: &str, rows: &str) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let fresh = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open results file {}", path.display()))?;
    if fresh {
        file.write_all(header.as_bytes())?;
    }
    file.write_all(rows.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))
}
