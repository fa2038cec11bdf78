//! `ferry bench aggregate`: one round's aggregation of N synthetic updates, by streaming FedAvg
//! or by a robust rule.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use ferry_core::{
    Update,
    aggregate::{Aggregator, MemoryUse, WeightedMean, Weighting},
    robust::{AggregatorName, RobustAggregator},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::peak_rss_bytes;

/// Options of `ferry bench aggregate`.
#[derive(Args)]
pub struct AggregateArgs {
    /// Updates to aggregate.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Parameters per update.
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// Also print the figures as one JSON line, for scripts (benchmarks/peers/flower).
    #[arg(long)]
    json: bool,
    /// Rule: mean, median, trimmed-mean, krum, multi-krum or bulyan.
    #[arg(long, default_value = "mean")]
    aggregator: String,
    /// Trimmed mean's beta.
    #[arg(long, default_value_t = 0.2)]
    trim_beta: f64,
    /// Krum, Multi-Krum, Bulyan: Byzantine updates tolerated (f).
    #[arg(long, default_value_t = 1)]
    byzantine: usize,
    /// Multi-Krum: updates averaged [default: n - f].
    #[arg(long)]
    krum_keep: Option<usize>,
}

/// Bytes the aggregation streams per parameter per update: the f32 update read, the f32
/// accumulator read and written.
const TRAFFIC_PER_PARAM: f64 = 4.0 + 4.0 + 4.0;

/// An update of `params` small random values drawn from `seed`.
pub(super) fn synthetic_update(params: usize, seed: u64) -> Update {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let delta = (0..params)
        .map(|_| rng.random_range(-0.01f32..0.01))
        .collect();
    Update::new(delta, 1)
}

/// Read bandwidth of this machine: a parallel sum over a buffer far larger than any cache.
fn read_bandwidth_gbs() -> f64 {
    let buffer = vec![1.0f32; 64 << 20];
    let mut best = 0.0f64;
    for _ in 0..3 {
        let began = Instant::now();
        let sum: f32 = buffer
            .par_chunks(1 << 16)
            .map(|c| c.iter().sum::<f32>())
            .sum();
        let secs = began.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(buffer.len() as f64 * 4.0 / secs / 1e9);
    }
    best
}

/// Runs the benchmark.
pub fn run(args: AggregateArgs) -> Result<()> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(args.params >= 1, "--params must be at least 1");
    let model_bytes = args.params as f64 * 4.0;
    let name: AggregatorName = args.aggregator.parse()?;
    let rule = name.with(args.trim_beta, args.byzantine, args.krum_keep);
    let mut aggregator: Box<dyn Aggregator> = match rule {
        Some(rule) => {
            rule.check(args.clients)?;
            Box::new(RobustAggregator::new(rule, args.params))
        }
        None => Box::new(WeightedMean::new(args.params, Weighting::Examples)),
    };
    let label = match rule {
        Some(rule) => format!("{rule} (buffers every update)"),
        None => "FedAvg (streaming, one model-sized accumulator)".to_string(),
    };
    // Updates arrive one at a time, as on a server; making each one is not timed.
    let mut busy = Duration::ZERO;
    for i in 0..args.clients {
        let mut update = synthetic_update(args.params, i as u64);
        update.num_examples = 100 + i as u64;
        let began = Instant::now();
        aggregator.accept(&update)?;
        busy += began.elapsed();
    }
    let streaming = aggregator.memory() == MemoryUse::Streaming;
    let began = Instant::now();
    let aggregate = aggregator.finish()?;
    let secs = (busy + began.elapsed()).as_secs_f64();
    std::hint::black_box(&aggregate);
    let peak = peak_rss_bytes();
    drop(aggregate);
    let bandwidth = read_bandwidth_gbs();
    let update_gbs = args.clients as f64 * model_bytes / secs / 1e9;
    let traffic_gbs = args.clients as f64 * args.params as f64 * TRAFFIC_PER_PARAM / secs / 1e9;
    println!(
        "{label}, {} updates x {} parameters ({:.1} MB each)",
        args.clients,
        args.params,
        model_bytes / 1e6
    );
    println!("time               {secs:.3} s");
    println!("updates/s          {:.1}", args.clients as f64 / secs);
    println!("update data        {update_gbs:.2} GB/s");
    if streaming {
        println!(
            "memory traffic     {traffic_gbs:.2} GB/s ({TRAFFIC_PER_PARAM} bytes per parameter per update) = {:.0}% of this machine's read bandwidth {bandwidth:.1} GB/s",
            100.0 * traffic_gbs / bandwidth
        );
    }
    match peak {
        Some(p) => println!(
            "peak RSS           {:.1} MB = {:.1} model sizes (all {} updates would be {:.1} MB)",
            p as f64 / 1e6,
            p as f64 / model_bytes,
            args.clients,
            args.clients as f64 * model_bytes / 1e6
        ),
        None => println!("peak RSS           unknown (no /proc/self/status)"),
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "ferry",
                "updates": args.clients,
                "params": args.params,
                "seconds": secs,
                "peak_rss_mb": peak.map(|b| b as f64 / 1e6),
            })
        );
    }
    Ok(())
}
