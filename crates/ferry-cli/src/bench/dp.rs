//! `ferry bench dp`: the privacy-utility trade-off of DP-FedAvg. Runs the same simulation once
//! without privacy and once per noise multiplier, and writes final accuracy against epsilon as
//! a CSV file and a chart.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::{options::SimulateArgs, report};

/// Options of `ferry bench dp`: the simulation (every `ferry simulate` flag) and the noise
/// multipliers to compare.
#[derive(Args)]
pub struct DpArgs {
    /// Comma-separated noise multipliers; 0 is the non-private reference (plain FedAvg with
    /// the same sampling fraction, no clipping, no noise).
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,0.7,1.0,1.5")]
    noise_multipliers: Vec<f64>,
    #[command(flatten)]
    run: SimulateArgs,
}

/// One run of the study.
struct Point {
    noise_multiplier: f64,
    epsilon: Option<f64>,
    final_accuracy: f64,
    best_accuracy: f64,
    rounds: u32,
    wall_s: f64,
}

/// Runs every noise multiplier and writes `results.csv` and `accuracy-vs-epsilon.svg` in the
/// output folder.
pub fn run(args: DpArgs) -> Result<()> {
    let base = args.run.merge_config_file()?;
    ensure!(
        !args.noise_multipliers.is_empty() && args.noise_multipliers.iter().all(|z| *z >= 0.0),
        "--noise-multipliers must list numbers >= 0 (0 for the non-private reference)"
    );
    let out = base.out_dir();
    report::prepare_dir(&out)?;
    let mut points = Vec::new();
    for &z in &args.noise_multipliers {
        let mut run = base.clone();
        if z == 0.0 {
            run = SimulateArgs {
                dp_noise_multiplier: None,
                dp_clip: None,
                dp_adaptive_clip: false,
                dp_target_quantile: None,
                dp_clip_lr: None,
                dp_count_stddev: None,
                dp_per_layer: false,
                dp_delta: None,
                dp_placement: None,
                dp_epsilon_budget: None,
                ..run
            };
        } else {
            run.dp_noise_multiplier = Some(z);
        }
        let config = run.resolve()?;
        let run_dir = out.join(format!("z{z}"));
        println!(
            "noise multiplier {z}: {} clients, sampling rate {}, {} rounds{}",
            config.clients,
            config.fraction,
            config.rounds,
            if z == 0.0 { " (no privacy)" } else { "" }
        );
        let (outcome, final_record) = super::simulate_in(&config, &run_dir, false)?;
        let last = outcome.rounds.last().context("the run finished no round")?;
        points.push(Point {
            noise_multiplier: z,
            epsilon: last.epsilon,
            final_accuracy: last.accuracy,
            best_accuracy: outcome.best_accuracy(),
            rounds: last.round,
            wall_s: final_record.wall_s,
        });
    }
    let mut csv =
        String::from("noise_multiplier,epsilon,delta,rounds,final_accuracy,best_accuracy,wall_s\n");
    let delta = base.dp_delta.unwrap_or(1e-5);
    for p in &points {
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.4},{:.4},{:.1}",
            p.noise_multiplier,
            p.epsilon.map_or(String::from("inf"), |e| format!("{e:.3}")),
            delta,
            p.rounds,
            p.final_accuracy,
            p.best_accuracy,
            p.wall_s
        );
    }
    std::fs::write(out.join("results.csv"), &csv)
        .with_context(|| format!("cannot write {}", out.join("results.csv").display()))?;
    let private: Vec<(f64, f64, f64)> = points
        .iter()
        .filter_map(|p| p.epsilon.map(|e| (p.noise_multiplier, e, p.final_accuracy)))
        .collect();
    let reference = points
        .iter()
        .find(|p| p.epsilon.is_none())
        .map(|p| p.final_accuracy);
    let chart: PathBuf = out.join("accuracy-vs-epsilon.svg");
    crate::chart::draw_privacy_utility(
        &chart,
        &private,
        reference,
        &format!("DP-FedAvg: final test accuracy against epsilon (delta {delta:e})"),
    )?;
    print!("{csv}");
    println!(
        "results in {} and {}",
        out.join("results.csv").display(),
        chart.display()
    );
    Ok(())
}
