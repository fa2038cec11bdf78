//! `ferry bench fleet`: a fleet of real node agents (many per process, a few TLS connections
//! shared) against a real `ferry` coordinator in a process of its own, for R rounds of a
//! fraction of the fleet. Prints each round's wall time, task dispatch latency, the server's
//! memory, CPU, sockets and store, and each RPC's latency; writes them as CSV.

mod nodes;
mod process;
mod relays;
mod server;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use ferry_server::store::Store;
use serde::{Deserialize, Serialize};

pub use nodes::{FleetNodesArgs, run as run_nodes};
pub use server::{FleetServerArgs, run as run_server};

/// Options of `ferry bench fleet`.
#[derive(Args, Debug)]
pub struct FleetArgs {
    /// Nodes enrolled.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,
    /// Nodes asked to train in each round.
    #[arg(long, default_value_t = 1_000)]
    pub per_round: usize,
    /// Model parameters (one f32 tensor).
    #[arg(long, default_value_t = 100_000)]
    pub params: usize,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Nodes sharing one TLS connection in the load generator (deployed nodes each have
    /// their own).
    #[arg(long, default_value_t = 1)]
    pub per_connection: usize,
    /// Aggregation relays between the nodes and the server (real `ferry relay` processes,
    /// each serving an equal share of the nodes); 0: nodes dial the server.
    #[arg(long, default_value_t = 0)]
    pub relays: usize,
    /// Seconds a round waits for its cohort before closing with whoever answered.
    #[arg(long, default_value_t = 300)]
    pub round_timeout: u64,
    /// Nodes the load generator starts per second (0: all at once); a fleet of 100,000
    /// enrolling at once queues every enrolment on the server's store.
    #[arg(long, default_value_t = 0)]
    pub start_per_second: u32,
    /// Folder to write `rounds.csv` and `rpc.csv` into.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The server's figures after one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSample {
    round: u32,
    opened_unix_ms: u64,
    wall_s: f64,
    participants: usize,
    rss_mb: f64,
    peak_rss_mb: f64,
    cpu_s: f64,
    sockets: usize,
    store_mb: f64,
    /// Update and partial-aggregate bytes the server received during the round.
    bytes_in_mb: f64,
    /// Model bytes the server sent during the round.
    bytes_out_mb: f64,
}

/// One RPC method's server-side latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RpcLatency {
    p50_s: f64,
    p99_s: f64,
    count: u64,
}

/// The server's figures at the end.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerSummary {
    rpc: BTreeMap<String, RpcLatency>,
    /// Calls and uploads the server refused, by counter and label (`limit=node_calls`):
    /// whether the abuse limits or the upload checks turned any node away.
    refusals: BTreeMap<String, u64>,
    /// Connections the server accepted over the run: more than the fleet's when nodes had
    /// to reconnect.
    connections_opened: u64,
    cpu_s: f64,
}

/// The load generator's figures at the end.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodesReport {
    peak_rss_mb: f64,
    /// `(round, unix ms)` at which a node received its task for the round.
    arrivals: Vec<(u32, u64)>,
    /// `(round, unix ms)` at which a node held the round's model and began training.
    model_ready: Vec<(u32, u64)>,
    failed: usize,
    first_failure: Option<String>,
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Each round's task dispatch delays (seconds from the round opening to a node holding its
/// task), sorted.
fn dispatch_delays(samples: &[RoundSample], arrivals: &[(u32, u64)]) -> BTreeMap<u32, Vec<f64>> {
    let opened: BTreeMap<u32, u64> = samples
        .iter()
        .map(|s| (s.round, s.opened_unix_ms))
        .collect();
    let mut delays: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for &(round, at) in arrivals {
        if let Some(&open) = opened.get(&round) {
            delays
                .entry(round)
                .or_default()
                .push(at.saturating_sub(open) as f64 / 1e3);
        }
    }
    for values in delays.values_mut() {
        values.sort_by(f64::total_cmp);
    }
    delays
}

/// A round's dispatch figures: task pulled and model in hand, p50 and p99 (seconds).
struct RoundDelays([f64; 4]);

impl RoundDelays {
    fn of(round: u32, pulled: &BTreeMap<u32, Vec<f64>>, ready: &BTreeMap<u32, Vec<f64>>) -> Self {
        let at = |delays: &BTreeMap<u32, Vec<f64>>| {
            delays.get(&round).map_or(&[][..], Vec::as_slice).to_vec()
        };
        let (d, r) = (at(pulled), at(ready));
        Self([
            quantile(&d, 0.5),
            quantile(&d, 0.99),
            quantile(&r, 0.5),
            quantile(&r, 0.99),
        ])
    }
}

/// Creates `nodes` enrolment tokens in the store under `dir` and writes them to `tokens.txt`.
fn enrolment_tokens(dir: &std::path::Path, nodes: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tokens = runtime.block_on(async {
        let store = Store::open(&crate::bench::round::store_url(dir)).await?;
        let mut tokens = Vec::with_capacity(nodes);
        for i in 0..nodes {
            tokens.push(store.create_token(&format!("fleet-{i}")).await?);
        }
        anyhow::Ok(tokens)
    })?;
    std::fs::write(dir.join("tokens.txt"), tokens.join("\n"))?;
    Ok(())
}

fn child(args: &[String]) -> Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .args(args)
        .env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start a benchmark process")
}

/// Runs the benchmark.
pub fn run(args: FleetArgs) -> Result<()> {
    ensure!(
        args.nodes >= 1 && args.per_round >= 1 && args.per_round <= args.nodes,
        "need 1 <= --per-round <= --nodes"
    );
    ensure!(
        args.params >= 1 && args.rounds >= 1,
        "--params and --rounds must be at least 1"
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    crate::certs::generate(&dir.join("certs"), &["localhost".into()], &[])?;
    let began = Instant::now();
    enrolment_tokens(dir, args.nodes)?;
    println!(
        "fleet: {} nodes ({} per TLS connection), {} per round, {} parameters ({:.1} MB), {} \
         rounds; server, {} relays and nodes in processes of their own on loopback ({} tokens \
         made in {:.1} s)",
        args.nodes,
        args.per_connection,
        args.per_round,
        args.params,
        args.params as f64 * 4e-6,
        args.rounds,
        args.relays,
        args.nodes,
        began.elapsed().as_secs_f64()
    );
    let port = crate::demo::free_port()?;
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut server = child(&[
        "bench".into(),
        "fleet-server".into(),
        "--dir".into(),
        dir_arg.clone(),
        "--port".into(),
        port.to_string(),
        "--nodes".into(),
        args.nodes.to_string(),
        "--per-round".into(),
        args.per_round.to_string(),
        "--params".into(),
        args.params.to_string(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--round-timeout".into(),
        args.round_timeout.to_string(),
    ])?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    if !lines
        .next()
        .transpose()?
        .unwrap_or_default()
        .contains("ready")
    {
        bail!("the server process did not start");
    }
    let relays = match args.relays {
        0 => None,
        count => Some(relays::Relays::start(dir, count, port)?),
    };
    let ports = relays
        .as_ref()
        .map_or_else(|| vec![port], |r| r.ports.clone());
    let started = Instant::now();
    let nodes = child(&[
        "bench".into(),
        "fleet-nodes".into(),
        "--dir".into(),
        dir_arg,
        "--ports".into(),
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--params".into(),
        args.params.to_string(),
        "--per-connection".into(),
        args.per_connection.to_string(),
        "--start-per-second".into(),
        args.start_per_second.to_string(),
    ])?;
    let mut samples: Vec<RoundSample> = Vec::new();
    let mut summary: Option<ServerSummary> = None;
    for line in lines.map_while(Result::ok) {
        if line.contains("fleet_online_unix_ms") {
            let online = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["online"].as_u64())
                .unwrap_or(0);
            println!(
                "{online} of {} nodes enrolled and online after {:.1} s; rounds start",
                args.nodes,
                started.elapsed().as_secs_f64()
            );
        } else if let Ok(sample) = serde_json::from_str::<RoundSample>(&line) {
            println!(
                "round {:>3}/{}: {:.2} s, {} updates, server {:.0} MB (peak {:.0}), CPU {:.1} s, \
                 in {:.1} MB, out {:.1} MB, {} sockets",
                sample.round,
                args.rounds,
                sample.wall_s,
                sample.participants,
                sample.rss_mb,
                sample.peak_rss_mb,
                sample.cpu_s,
                sample.bytes_in_mb,
                sample.bytes_out_mb,
                sample.sockets
            );
            samples.push(sample);
        } else if let Ok(s) = serde_json::from_str::<ServerSummary>(&line) {
            summary = Some(s);
        }
    }
    let relay_peaks = relays.as_ref().map(relays::Relays::peak_mb);
    let server_status = server.wait()?;
    let out = nodes.wait_with_output()?;
    if let Some(relays) = relays {
        relays.wait()?;
    }
    ensure!(
        server_status.success(),
        "the server process failed: {server_status}"
    );
    ensure!(
        out.status.success(),
        "the nodes process failed: {}",
        out.status
    );
    let report: NodesReport = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| serde_json::from_str(line).ok())
        .context("the nodes process reported nothing")?;
    let summary = summary.context("the server process reported no summary")?;
    print_report(
        &args,
        &samples,
        &summary,
        &report,
        started.elapsed().as_secs_f64(),
    );
    if let Some(peaks) = relay_peaks {
        let listed: Vec<String> = peaks.iter().map(|mb| format!("{mb:.0}")).collect();
        println!("relays' peak memory, MB: {}", listed.join(", "));
    }
    if let Some(out) = &args.out {
        write_csv(out, &samples, &summary, &report)?;
        println!("CSV in {}", out.display());
    }
    Ok(())
}

fn print_report(
    args: &FleetArgs,
    samples: &[RoundSample],
    summary: &ServerSummary,
    report: &NodesReport,
    total_s: f64,
) {
    let delays = dispatch_delays(samples, &report.arrivals);
    let ready = dispatch_delays(samples, &report.model_ready);
    println!(
        "\nround  wall s  task pull p50 / p99 s  model in hand p50 / p99 s  server MB now (peak)  \
         CPU s  sockets  store MB  in MB  out MB"
    );
    for s in samples {
        let [p50, p99, r50, r99] = RoundDelays::of(s.round, &delays, &ready).0;
        println!(
            "{:>5}  {:>6.2}  {p50:>9.3} / {p99:<8.3}  {r50:>12.3} / {r99:<10.3}  {:>9.1} ({:>6.1})  \
             {:>6.1}  {:>7}  {:>8.1}  {:>5.1}  {:>6.1}",
            s.round,
            s.wall_s,
            s.rss_mb,
            s.peak_rss_mb,
            s.cpu_s,
            s.sockets,
            s.store_mb,
            s.bytes_in_mb,
            s.bytes_out_mb
        );
    }
    let overall = |delays: &BTreeMap<u32, Vec<f64>>| {
        let mut all: Vec<f64> = delays.values().flatten().copied().collect();
        all.sort_by(f64::total_cmp);
        (quantile(&all, 0.5), quantile(&all, 0.99))
    };
    let ((pull50, pull99), (ready50, ready99)) = (overall(&delays), overall(&ready));
    println!(
        "rounds completed {} of {}; over all rounds, from a round opening: task pulled p50 \
         {pull50:.3} s, p99 {pull99:.3} s; model in hand p50 {ready50:.3} s, p99 {ready99:.3} s",
        samples.len(),
        args.rounds,
    );
    if let (Some(second), Some(last)) = (samples.get(1), samples.last()) {
        println!(
            "server memory after round 2: {:.1} MB, after the last: {:.1} MB ({:+.1} MB); \
             peak {:.1} MB",
            second.rss_mb,
            last.rss_mb,
            last.rss_mb - second.rss_mb,
            samples.iter().map(|s| s.peak_rss_mb).fold(0.0, f64::max)
        );
    }
    println!(
        "RPC latency at the server (p50 / p99 / calls; PullTask includes its long-poll wait):"
    );
    for (method, l) in &summary.rpc {
        println!(
            "  {method:<16} {:>8.4} s / {:>8.4} s / {}",
            l.p50_s, l.p99_s, l.count
        );
    }
    let refused = summary
        .refusals
        .iter()
        .map(|(what, count)| format!("{what} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "refused by the server: {}",
        if refused.is_empty() {
            "nothing"
        } else {
            &refused
        }
    );
    println!(
        "connections accepted by the server: {}",
        summary.connections_opened
    );
    println!(
        "server CPU {:.1} s over {:.1} s; nodes process peak {:.0} MB; agents that failed: {}{}",
        summary.cpu_s,
        total_s,
        report.peak_rss_mb,
        report.failed,
        report
            .first_failure
            .as_ref()
            .map_or(String::new(), |f| format!(" (first: {f})"))
    );
}

fn write_csv(
    out: &std::path::Path,
    samples: &[RoundSample],
    summary: &ServerSummary,
    report: &NodesReport,
) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let delays = dispatch_delays(samples, &report.arrivals);
    let ready = dispatch_delays(samples, &report.model_ready);
    let mut rounds = std::fs::File::create(out.join("rounds.csv"))?;
    writeln!(
        rounds,
        "round,wall_s,updates,task_pull_p50_s,task_pull_p99_s,model_in_hand_p50_s,\
         model_in_hand_p99_s,server_rss_mb,server_peak_rss_mb,server_cpu_s,sockets,store_mb,\
         server_in_mb,server_out_mb"
    )?;
    for s in samples {
        let [p50, p99, r50, r99] = RoundDelays::of(s.round, &delays, &ready).0;
        writeln!(
            rounds,
            "{},{:.4},{},{p50:.4},{p99:.4},{r50:.4},{r99:.4},{:.2},{:.2},{:.2},{},{:.2},{:.3},{:.3}",
            s.round,
            s.wall_s,
            s.participants,
            s.rss_mb,
            s.peak_rss_mb,
            s.cpu_s,
            s.sockets,
            s.store_mb,
            s.bytes_in_mb,
            s.bytes_out_mb
        )?;
    }
    let mut rpc = std::fs::File::create(out.join("rpc.csv"))?;
    writeln!(rpc, "method,p50_s,p99_s,calls")?;
    for (method, l) in &summary.rpc {
        writeln!(rpc, "{method},{:.6},{:.6},{}", l.p50_s, l.p99_s, l.count)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values[..1], 0.99), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn dispatch_delays_are_measured_from_each_rounds_opening() {
        let sample = |round, opened_unix_ms| RoundSample {
            round,
            opened_unix_ms,
            wall_s: 1.0,
            participants: 2,
            rss_mb: 1.0,
            peak_rss_mb: 1.0,
            cpu_s: 1.0,
            sockets: 1,
            store_mb: 1.0,
            bytes_in_mb: 1.0,
            bytes_out_mb: 1.0,
        };
        let delays = dispatch_delays(
            &[sample(1, 1_000), sample(2, 5_000)],
            &[(1, 1_250), (1, 1_100), (2, 5_500), (3, 9_000)],
        );
        assert_eq!(delays[&1], vec![0.1, 0.25]);
        assert_eq!(delays[&2], vec![0.5]);
        assert!(
            !delays.contains_key(&3),
            "a round the server did not report is left out"
        );
    }
}
