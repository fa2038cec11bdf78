//! `ferry bench train`: local-training throughput of each built-in model.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use ferry_core::task::LocalTraining;
use ferry_ml::{
    data::{Dataset, NUM_CLASSES, PIXELS},
    models::ModelKind,
    params::init_model,
    train::{LocalData, LocalProcedure, train_local},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Options of `ferry bench train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Model to measure (default: all of lenet, cnn, mlp, logreg).
    #[arg(long)]
    model: Option<String>,
    /// Examples per SGD step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Seconds to measure each model for, per configuration.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Trainers running at once in the parallel measurement [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

fn synthetic(examples: usize) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    Dataset {
        images: (0..examples * PIXELS)
            .map(|_| rng.random::<f32>())
            .collect(),
        labels: (0..examples)
            .map(|_| rng.random_range(0..NUM_CLASSES) as u8)
            .collect(),
    }
}

/// Trains for about `seconds` and returns images per second.
fn throughput(kind: ModelKind, data: &Dataset, cfg: &LocalTraining, seconds: f64) -> Result<f64> {
    let start = init_model(kind, 0)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let local = LocalData {
        dataset: data,
        indices: &indices,
        noise_std: 0.0,
    };
    train_local(kind, &start, local, cfg, LocalProcedure::Plain, 0)?; // warm-up
    let began = Instant::now();
    let mut images = 0usize;
    let mut seed = 1;
    while began.elapsed() < Duration::from_secs_f64(seconds) {
        train_local(kind, &start, local, cfg, LocalProcedure::Plain, seed)?;
        images += data.len() * cfg.epochs as usize;
        seed += 1;
    }
    Ok(images as f64 / began.elapsed().as_secs_f64())
}

/// Runs the benchmark.
pub fn run(args: TrainArgs) -> Result<()> {
    let kinds = match &args.model {
        Some(m) => vec![m.parse::<ModelKind>()?],
        None => ModelKind::ALL.to_vec(),
    };
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let cfg = LocalTraining {
        epochs: 1,
        batch_size: args.batch_size,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-5,
    };
    let data = synthetic(args.batch_size * 8);
    println!(
        "forward + backward + SGD step (momentum 0.9, weight decay 1e-5), batch {}, burn flex backend",
        args.batch_size
    );
    println!(
        "{:<8} {:>11} {:>18} {:>22}",
        "model",
        "parameters",
        "1 thread img/s",
        format!("{threads} trainers img/s")
    );
    for kind in kinds {
        let single = throughput(kind, &data, &cfg, args.seconds)?;
        let parallel: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| throughput(kind, &data, &cfg, args.seconds)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a trainer thread panicked"))?
                })
                .collect::<Result<_>>()
        })?;
        println!(
            "{:<8} {:>11} {:>18.0} {:>22.0}",
            kind.to_string(),
            init_model(kind, 0)?.num_params(),
            single,
            parallel.iter().sum::<f64>()
        );
    }
    Ok(())
}
