//! `ferry`: the one command of the Ferry federated learning platform.

mod allocator;
mod bench;
mod certs;
mod chart;
mod client;
mod cross_site;
mod dashboard;
mod demo;
mod evaluate;
mod folder_split;
mod node_share;
mod options;
mod own_code;
mod privacy;
mod progress;
mod relay;
mod report;
mod server;
mod simulate;
mod starting_point;
mod token;

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
    Simulate(Box<simulate::SimulateCommand>),
    /// Score a saved model on a dataset's test set, overall and class by class.
    Evaluate(evaluate::EvaluateArgs),
    /// The cross-site validation matrix of a finished run: which model works on which site.
    CrossSite(cross_site::CrossSiteArgs),
    /// Run a whole deployment on this machine: TLS server, client processes, fresh credentials.
    Demo(demo::DemoArgs),
    /// Coordinate a deployed federation: nodes on other machines dial in over gRPC + TLS.
    Server(server::ServerArgs),
    /// Run a node: train on local data for a server, send back only model updates.
    Client(Box<client::ClientArgs>),
    /// Run an aggregation relay between nodes and the server.
    Relay(relay::RelayArgs),
    /// Browse finished runs (their output folders) in the web dashboard.
    Dashboard(dashboard::DashboardArgs),
    /// Create or revoke enrolment tokens for nodes and relays.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Generate a CA, a server certificate and client certificates.
    Certs(certs::CertsArgs),
    /// Differential-privacy accounting: epsilon of a planned run, or the noise a budget needs.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
    /// Measure training and aggregation speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    allocator::commit_memory_as_used();
    let cli = Cli::parse();
    // Logs (refusals, enrolments) go to stderr; FERRY_LOG=debug|info|warn|off adjusts them.
    // The database driver's own notices (PostgreSQL's "relation ... already exists, skipping"
    // at every start) are left out unless asked for.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Simulate(args) => simulate::run(*args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::CrossSite(args) => cross_site::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Server(args) => server::run(args),
        Command::Client(args) => client::run(*args),
        Command::Relay(args) => relay::run(args),
        Command::Dashboard(args) => dashboard::run(args),
        Command::Token(cmd) => token::run(cmd),
        Command::Certs(args) => certs::run(args),
        Command::Privacy(cmd) => privacy::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
