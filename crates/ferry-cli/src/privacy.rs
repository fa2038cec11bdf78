//! `ferry privacy epsilon|noise`: the RDP accountant on its own, for planning a private run
//! before spending any of the budget.

use anyhow::{Result, ensure};
use clap::{Args, Subcommand};
use ferry_core::privacy::accountant::{
    DEFAULT_ORDERS_TEXT, default_orders, epsilon_for, noise_for_epsilon,
};

/// Privacy-accounting commands.
#[derive(Subcommand, Debug)]
pub enum PrivacyCommand {
    /// Epsilon spent by T rounds of DP-FedAvg with Poisson sampling rate Q and noise
    /// multiplier Z; prints `epsilon=<value> order=<alpha>`.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier whose T rounds at rate Q stay within epsilon E; prints
    /// `noise_multiplier=<value>`.
    Noise(NoiseArgs),
}

/// The run shape both commands share.
#[derive(Args, Debug)]
pub struct RunShape {
    /// Probability that each node is sampled in a round (the run's --fraction).
    #[arg(long)]
    pub sampling_rate: f64,
    /// Rounds.
    #[arg(long)]
    pub steps: u64,
    /// The delta of the (epsilon, delta) guarantee.
    #[arg(long)]
    pub delta: f64,
}

/// `ferry privacy epsilon` options.
#[derive(Args, Debug)]
pub struct EpsilonArgs {
    #[command(flatten)]
    shape: RunShape,
    /// Noise multiplier z.
    #[arg(long)]
    noise_multiplier: f64,
}

/// `ferry privacy noise` options.
#[derive(Args, Debug)]
pub struct NoiseArgs {
    #[command(flatten)]
    shape: RunShape,
    /// The epsilon to stay within.
    #[arg(long)]
    epsilon: f64,
}

fn check(shape: &RunShape, name: &str, value: f64) -> Result<()> {
    ensure!(
        shape.sampling_rate > 0.0 && shape.sampling_rate <= 1.0,
        "--sampling-rate must be in (0, 1], got {}",
        shape.sampling_rate
    );
    ensure!(shape.steps >= 1, "--steps must be at least 1");
    ensure!(
        shape.delta > 0.0 && shape.delta < 1.0,
        "--delta must be in (0, 1), got {}",
        shape.delta
    );
    ensure!(
        value > 0.0 && value.is_finite(),
        "--{name} must be positive, got {value}"
    );
    Ok(())
}

/// Runs a privacy command.
pub fn run(command: PrivacyCommand) -> Result<()> {
    let orders = default_orders();
    match command {
        PrivacyCommand::Epsilon(EpsilonArgs {
            shape: s,
            noise_multiplier: z,
        }) => {
            check(&s, "noise-multiplier", z)?;
            let eps = epsilon_for(s.sampling_rate, z, s.steps, s.delta, &orders);
            println!("epsilon={} order={}", eps.epsilon, eps.order);
        }
        PrivacyCommand::Noise(NoiseArgs { shape: s, epsilon }) => {
            check(&s, "epsilon", epsilon)?;
            let z = noise_for_epsilon(s.sampling_rate, s.steps, s.delta, epsilon, &orders)?;
            println!("noise_multiplier={z}");
        }
    }
    eprintln!("(RDP orders searched: {DEFAULT_ORDERS_TEXT})");
    Ok(())
}
