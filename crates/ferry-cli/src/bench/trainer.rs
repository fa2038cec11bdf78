//! `ferry bench trainer`: what the external-command trainer costs per round when its program
//! starts every round, against one long-lived process that takes every round's task as a JSON
//! line. The same node-side code runs as in `ferry client` (the task folder, the program, the
//! read-back and the update), without a server.

use std::{sync::Arc, time::Instant};

use anyhow::{Result, bail};
use clap::Args;
use ferry_client::{
    agent::{TrainTask, Trainer},
    exec::{ExecTrainer, long_lived::LongLivedTrainer},
};
use ferry_core::{Model, ModelLayout, TensorSpec, strategy::ClientProcedure, task::LocalTraining};

/// Options of `ferry bench trainer`.
#[derive(Args, Debug)]
pub struct TrainerArgs {
    /// The trainer command; it must serve both modes (see docs/exec-trainer.md), as
    /// examples/exec-trainer/train.py does.
    #[arg(long, value_name = "COMMAND")]
    pub trainer_cmd: String,
    /// The node's data folder, passed on to the trainer.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Rounds per mode (the first is reported apart: it includes the long-lived start-up).
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// Parameters of the model: one weight [784, classes] and one bias [classes], as the
    /// logistic regression of the example expects.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Where the round folders go.
    #[arg(long, value_name = "DIR", default_value = "runs/bench-trainer")]
    pub work_dir: std::path::PathBuf,
}

/// Runs the benchmark and prints one line per mode.
pub fn run(args: TrainerArgs) -> Result<()> {
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (the first round is reported apart)");
    }
    let layout = Arc::new(ModelLayout::new(vec![
        TensorSpec::f32("fc.weight", vec![784, args.classes]),
        TensorSpec::f32("fc.bias", vec![args.classes]),
    ])?);
    let model = Model::new(layout.clone(), vec![0.0; layout.num_params()])?;
    let per_round = ExecTrainer::new(
        &args.trainer_cmd,
        args.data_dir.clone(),
        args.work_dir.join("per-round"),
    )
    .map_err(anyhow::Error::msg)?;
    let long_lived = LongLivedTrainer::new(
        &args.trainer_cmd,
        args.data_dir.clone(),
        args.work_dir.join("long-lived"),
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "trainer `{}`, {} rounds per mode, model of {} parameters",
        args.trainer_cmd,
        args.rounds,
        layout.num_params()
    );
    let per_round_s = time_rounds("per-round", &per_round, &model, args.rounds)?;
    let long_lived_s = time_rounds("long-lived", &long_lived, &model, args.rounds)?;
    println!(
        "overhead saved by the long-lived mode: {:.3} s per round ({:.1}x faster rounds)",
        per_round_s - long_lived_s,
        per_round_s / long_lived_s
    );
    Ok(())
}

/// Trains `rounds` rounds with `trainer`; prints and returns the mean seconds of the rounds
/// after the first.
fn time_rounds(mode: &str, trainer: &dyn Trainer, model: &Model, rounds: u32) -> Result<f64> {
    let mut seconds = Vec::new();
    for round in 1..=rounds {
        let task = TrainTask {
            round,
            model: model.clone(),
            training: LocalTraining {
                epochs: 1,
                batch_size: 64,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            procedure: ClientProcedure::LocalSgd,
            server_control: None,
            seed: u64::from(round),
            deadline: None,
            personal: Default::default(),
        };
        let start = Instant::now();
        trainer
            .train(&task)
            .map_err(|e| anyhow::anyhow!("{mode} round {round}: {e}"))?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    let rest = &seconds[1..];
    let mean = rest.iter().sum::<f64>() / rest.len() as f64;
    println!(
        "{mode:>10}: first round {:.3} s, then {:.3} s per round (min {:.3}, max {:.3})",
        seconds[0],
        mean,
        rest.iter().copied().fold(f64::INFINITY, f64::min),
        rest.iter().copied().fold(0.0, f64::max)
    );
    Ok(mean)
}
