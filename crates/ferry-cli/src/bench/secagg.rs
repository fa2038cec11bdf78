//! `ferry bench secagg`: one SecAgg+ round over synthetic updates, every node and the server
//! in this process on one thread, timed stage by stage, with the bytes each message carries.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::secure::{seed_bytes, wire_bytes};
use ferry_secagg::{SecAggClient, SecAggParams, SecAggServer, max_sum_error};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use super::{aggregate::synthetic_update, peak_rss_bytes};

/// Options of `ferry bench secagg`.
#[derive(Args)]
pub struct SecAggArgs {
    /// Nodes in the round.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Parameters per update.
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// Fraction of the nodes that drop after sharing keys, before sending their masked input
    /// (the costliest case for the server, which must rebuild their masks).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Neighbours per node (at least clients - 1 gives classic SecAgg).
    #[arg(long, default_value_t = 16)]
    neighbours: usize,
    /// Shamir threshold [default: a majority of the neighbours].
    #[arg(long)]
    threshold: Option<usize>,
    /// Quantisation bits.
    #[arg(long, default_value_t = 22)]
    quantization_bits: u32,
    /// Modulus bits.
    #[arg(long, default_value_t = 32)]
    modulus_bits: u32,
    /// Seed of the updates and of who drops.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Time spent by all nodes and by the server in one stage.
#[derive(Default)]
struct StageTime {
    clients: Duration,
    server: Duration,
    nodes: usize,
}

impl StageTime {
    fn client(&mut self, began: Instant) {
        self.clients += began.elapsed();
        self.nodes += 1;
    }
    fn server(&mut self, began: Instant) {
        self.server += began.elapsed();
    }
    fn row(&self, name: &str) {
        println!(
            "{name:<16} {:>14.4} {:>14.4}",
            self.clients.as_secs_f64() / self.nodes.max(1) as f64,
            self.server.as_secs_f64()
        );
    }
}

/// Bytes one node sends and receives.
#[derive(Default)]
struct NodeBytes {
    keys: u64,
    shares: u64,
    masked: u64,
    revealed: u64,
    down: u64,
}

/// Runs the benchmark.
pub fn run(args: SecAggArgs) -> Result<()> {
    anyhow::ensure!(args.clients >= 3, "--clients must be at least 3");
    anyhow::ensure!(args.params >= 1, "--params must be at least 1");
    anyhow::ensure!(
        (0.0..1.0).contains(&args.dropout),
        "--dropout is a fraction in [0, 1), got {}",
        args.dropout
    );
    let probe = SecAggParams {
        neighbours: args.neighbours,
        ..SecAggParams::default()
    };
    let params = SecAggParams {
        neighbours: args.neighbours,
        threshold: args
            .threshold
            .unwrap_or(probe.majority_threshold(args.clients)),
        quantization_bits: args.quantization_bits,
        modulus_bits: args.modulus_bits,
        ..SecAggParams::default()
    };
    params.validate(args.clients)?;
    let mut order: Vec<usize> = (0..args.clients).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(args.seed));
    let dropping = (args.dropout * args.clients as f64).round() as usize;
    let dropped: Vec<usize> = order[..dropping].to_vec();
    println!(
        "SecAgg+ round: {} nodes, {} parameters, {} neighbours each, threshold {}, {}-bit \
         quantisation modulo 2^{}, {} nodes drop before their masked input",
        args.clients,
        args.params,
        params.neighbourhood(args.clients),
        params.threshold,
        params.quantization_bits,
        params.modulus_bits,
        dropped.len()
    );

    let mut server =
        SecAggServer::new(params, b"ferry bench secagg".to_vec(), [7; 32], args.params);
    let mut bytes: Vec<NodeBytes> = (0..args.clients).map(|_| NodeBytes::default()).collect();
    let mut advertise = StageTime::default();
    let mut share = StageTime::default();
    let mut mask = StageTime::default();
    let mut unmask = StageTime::default();

    let mut clients = Vec::with_capacity(args.clients);
    for (i, node) in bytes.iter_mut().enumerate() {
        let began = Instant::now();
        let client = SecAggClient::new(params, seed_bytes(args.seed ^ i as u64));
        let keys = client.public_keys();
        advertise.client(began);
        node.keys = wire_bytes::keys(&keys);
        let began = Instant::now();
        server.receive_keys(keys)?;
        advertise.server(began);
        clients.push(client);
    }
    let began = Instant::now();
    let roster = server.close_advertising()?;
    advertise.server(began);

    for (i, client) in clients.iter_mut().enumerate() {
        bytes[i].down += wire_bytes::roster(&roster);
        let began = Instant::now();
        let sealed = client.share_keys(&roster)?;
        share.client(began);
        bytes[i].shares = wire_bytes::shares(&sealed);
        let began = Instant::now();
        server.receive_shares(i as u32, sealed)?;
        share.server(began);
    }
    let began = Instant::now();
    server.close_sharing()?;
    share.server(began);

    // The plain weighted sum, to check the unmasked one against.
    let mut plain = vec![0.0f64; args.params];
    for (i, client) in clients.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let update = synthetic_update(args.params, args.seed ^ (i as u64) << 20);
        let weight = 0.5 + 0.5 * (i % 2) as f64;
        for (p, v) in plain.iter_mut().zip(&update.delta) {
            *p += weight * f64::from(*v);
        }
        let inbox = server.inbox(i as u32)?.to_vec();
        bytes[i].down += wire_bytes::shares(&inbox);
        let began = Instant::now();
        let masked = client.mask(&inbox, &update.delta, weight)?;
        mask.client(began);
        bytes[i].masked = wire_bytes::masked(&masked, &params);
        let began = Instant::now();
        server.receive_masked(i as u32, &masked)?;
        mask.server(began);
    }
    let began = Instant::now();
    let request = server.close_masking()?;
    unmask.server(began);

    for (i, client) in clients.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        bytes[i].down += wire_bytes::request(&request);
        let began = Instant::now();
        let shares = client.unmask(&request)?;
        unmask.client(began);
        bytes[i].revealed = wire_bytes::revealed(&shares);
        let began = Instant::now();
        server.receive_unmask(i as u32, &shares)?;
        unmask.server(began);
    }
    let began = Instant::now();
    let sum = server.finish()?;
    unmask.server(began);

    let error = sum
        .weighted_sum
        .iter()
        .zip(&plain)
        .map(|(s, p)| (f64::from(*s) - p).abs())
        .fold(0.0, f64::max);
    let bound = max_sum_error(sum.contributors.len(), &params);
    anyhow::ensure!(
        error <= bound + 1e-5 * sum.contributors.len() as f64,
        "the unmasked sum is off by {error}, more than the quantisation bound {bound}"
    );

    println!(
        "{:<16} {:>14} {:>14}",
        "stage", "node mean (s)", "server (s)"
    );
    advertise.row("advertise keys");
    share.row("share keys");
    mask.row("masked input");
    unmask.row("unmask");
    let server_total = advertise.server + share.server + mask.server + unmask.server;
    println!("server total     {:>29.4}", server_total.as_secs_f64());

    let survivor = bytes
        .iter()
        .enumerate()
        .find(|(i, _)| !dropped.contains(i))
        .map(|(_, b)| b)
        .context("every node dropped")?;
    let up = survivor.keys + survivor.shares + survivor.masked + survivor.revealed;
    let plain_upload = 4 * args.params as u64;
    println!(
        "bytes per node   up {} (keys {}, shares {}, masked input {}, revealed shares {}), down {} \
         besides the model",
        up, survivor.keys, survivor.shares, survivor.masked, survivor.revealed, survivor.down
    );
    println!(
        "expansion        {:.4}x the plain f32 upload of {} bytes ({:.4}x counting what the node \
         downloads besides the model)",
        up as f64 / plain_upload as f64,
        plain_upload,
        (up + survivor.down) as f64 / plain_upload as f64
    );
    println!(
        "sum check        {} contributors; largest error {error:.3e} (quantisation bound {bound:.3e})",
        sum.contributors.len()
    );
    if let Some(peak) = peak_rss_bytes() {
        println!("peak RSS         {:.1} MB", peak as f64 / 1e6);
    }
    Ok(())
}
