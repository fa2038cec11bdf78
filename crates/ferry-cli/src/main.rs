//! `ferry`: the one command of the Ferry federated learning platform.

mod bench;
mod chart;
mod options;
mod progress;
mod report;
mod simulate;

use clap::{Parser, Subcommand};

/// Federated learning: train models where the data lives, move only model updates.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a federation of virtual nodes on this machine.
    Simulate(Box<options::SimulateArgs>),
    /// Measure training and aggregation speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(args) => simulate::run(*args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
