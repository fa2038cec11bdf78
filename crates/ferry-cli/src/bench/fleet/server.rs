//! The server half of `ferry bench fleet`: a real coordinator and fleet service over loopback
//! TLS, reporting its memory, CPU, sockets and store after every round, and each RPC's
//! latency at the end.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use clap::Args;
use ferry_engine::round::CohortRule;
use ferry_server::{
    coordinator::{Event, RunSpec},
    counter_totals::CounterTotals,
    store::now_ms,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use super::{RoundSample, RpcLatency, ServerSummary, process};
use crate::bench::round::{bench_spec, start_server};

/// The server half of `ferry bench fleet` (started by it).
#[derive(Args, Debug)]
pub struct FleetServerArgs {
    /// Working folder prepared by the parent (certificates, store with the tokens).
    #[arg(long)]
    pub dir: PathBuf,
    /// Loopback port to listen on.
    #[arg(long)]
    pub port: u16,
    /// Nodes enrolled; the first round waits until all are online (or 99% of them, once no
    /// more has come online for a minute).
    #[arg(long)]
    pub nodes: usize,
    /// Nodes asked per round.
    #[arg(long)]
    pub per_round: usize,
    /// Model parameters.
    #[arg(long)]
    pub params: usize,
    /// Rounds.
    #[arg(long)]
    pub rounds: u32,
    /// Seconds a round waits for its cohort.
    #[arg(long)]
    pub round_timeout: u64,
}

/// How long the online count must have stopped rising before rounds start short of the
/// whole fleet (with 99% of it online).
const STALLED_FOR: Duration = Duration::from_secs(60);

fn spec(args: &FleetServerArgs) -> RunSpec {
    let cohort = CohortRule {
        fraction: args.per_round as f64 / args.nodes as f64,
        min_clients: args.per_round,
        seed: 0,
        training: crate::bench::no_training(),
    };
    let timeout = Duration::from_secs(args.round_timeout);
    bench_spec("bench-fleet", args.rounds, cohort, timeout, 1 << 20)
}

/// What the server's metrics recorded so far: every RPC duration by method, and every
/// counter by name and labels. Drained from the recorder after each round: it keeps raw
/// samples until then, so quantiles are exact, and a snapshot resets its counters, so they
/// are added up here.
#[derive(Default)]
struct Recorded {
    rpc: BTreeMap<String, Vec<f64>>,
    counters: CounterTotals,
    /// Bytes received and sent as of the previous round's end.
    bytes_before: (u64, u64),
}

impl Recorded {
    fn drain(&mut self, recorder: &Snapshotter) {
        for (key, _, _, value) in recorder.snapshot().into_vec() {
            let key = key.key();
            match value {
                DebugValue::Histogram(values) if key.name() == "ferry_rpc_seconds" => {
                    let method = key
                        .labels()
                        .find(|l| l.key() == "method")
                        .map_or_else(|| "?".to_string(), |l| l.value().to_string());
                    self.rpc
                        .entry(method)
                        .or_default()
                        .extend(values.into_iter().map(|v| v.into_inner()));
                }
                DebugValue::Counter(count) => self.counters.add(key, count),
                _ => {}
            }
        }
    }

    fn latencies(&mut self) -> BTreeMap<String, RpcLatency> {
        self.rpc
            .iter_mut()
            .map(|(method, values)| {
                values.sort_by(f64::total_cmp);
                let latency = RpcLatency {
                    p50_s: super::quantile(values, 0.5),
                    p99_s: super::quantile(values, 0.99),
                    count: values.len() as u64,
                };
                (method.clone(), latency)
            })
            .collect()
    }

    /// The counters of refused calls and uploads, keyed `limit=...` or `reason=...`.
    fn refusals(&self) -> BTreeMap<String, u64> {
        ["ferry_limit_refusals_total", "ferry_updates_rejected_total"]
            .into_iter()
            .filter_map(|name| self.counters.by_labels(name))
            .flatten()
            .map(|(labels, &count)| (labels.clone(), count))
            .collect()
    }

    /// The counter `name`'s total over its labels (0 when nothing has counted it).
    fn counter(&self, name: &str) -> u64 {
        self.counters.total(name)
    }

    /// Bytes received and sent since the previous call.
    fn bytes_since_last(&mut self) -> (u64, u64) {
        let now = (
            self.counter("ferry_bytes_in_total"),
            self.counter("ferry_bytes_out_total"),
        );
        let moved = (now.0 - self.bytes_before.0, now.1 - self.bytes_before.1);
        self.bytes_before = now;
        moved
    }
}

/// Runs the server half and prints a JSON line per round and a summary.
pub fn run(args: FleetServerArgs) -> Result<()> {
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    recorder
        .install()
        .map_err(|_| anyhow::anyhow!("cannot start the metrics recorder"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (coordinator, mut events, store, listener) = start_server(
            &args.dir,
            args.port,
            spec(&args),
            args.nodes,
            args.params,
            None,
        )
        .await?;
        // The peak resident memory since the previous round, sampled every 50 ms.
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(process::rss_bytes().unwrap_or(0), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let driver = {
            let coordinator = coordinator.clone();
            let nodes = args.nodes;
            tokio::spawn(async move {
                // The fleet enrols first: rounds draw from every node, as a standing fleet's do
                // (or from 99% of it, once no more has come online for a minute).
                let mut changed = coordinator.subscribe();
                let (mut online, mut rising) = (0, std::time::Instant::now());
                while online < nodes {
                    let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
                    let now_online = coordinator.status().await.nodes_online;
                    if now_online > online {
                        (online, rising) = (now_online, std::time::Instant::now());
                    }
                    if online * 100 >= nodes * 99 && rising.elapsed() >= STALLED_FOR {
                        break;
                    }
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "fleet_online_unix_ms": now_ms() as u64,
                        "online": online,
                    })
                );
                coordinator.drive().await
            })
        };
        let recorded = Arc::new(std::sync::Mutex::new(Recorded::default()));
        let reporter = {
            let (dir, metrics, recorded) = (args.dir.clone(), metrics.clone(), recorded.clone());
            tokio::spawn(async move {
                let mut opened = BTreeMap::new();
                while let Some(event) = events.recv().await {
                    match event {
                        Event::RoundStarted { round, .. } => {
                            opened.insert(round, now_ms() as u64);
                        }
                        Event::RoundFinished(record) => {
                            let moved = {
                                let mut recorded =
                                    recorded.lock().unwrap_or_else(|e| e.into_inner());
                                recorded.drain(&metrics);
                                recorded.bytes_since_last()
                            };
                            let sample = RoundSample {
                                round: record.round,
                                opened_unix_ms: opened.get(&record.round).copied().unwrap_or(0),
                                wall_s: record.wall_s,
                                participants: record.participants,
                                rss_mb: process::rss_bytes().unwrap_or(0) as f64 / 1e6,
                                peak_rss_mb: peak
                                    .swap(0, Ordering::Relaxed)
                                    .max(process::rss_bytes().unwrap_or(0))
                                    as f64
                                    / 1e6,
                                cpu_s: process::cpu_seconds().unwrap_or(f64::NAN),
                                sockets: process::open_sockets().unwrap_or(0),
                                store_mb: process::folder_bytes(&dir.join("ferry.db"))
                                    .saturating_add(process::folder_bytes(
                                        &dir.join("ferry.db-wal"),
                                    ))
                                    .saturating_add(process::folder_bytes(&dir.join("blobs")))
                                    as f64
                                    / 1e6,
                                bytes_in_mb: moved.0 as f64 / 1e6,
                                bytes_out_mb: moved.1 as f64 / 1e6,
                            };
                            println!("{}", serde_json::to_string(&sample).unwrap_or_default());
                        }
                        _ => {}
                    }
                }
            })
        };
        println!("ready");
        let shutdown = {
            let coordinator = coordinator.clone();
            async move {
                coordinator.until_finished().await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        };
        ferry_server::serve(listener, coordinator.clone(), store, shutdown).await?;
        driver.await??;
        sampler.abort();
        drop(coordinator);
        // The last round's line is printed once the coordinator's events end.
        let _ = tokio::time::timeout(Duration::from_secs(5), reporter).await;
        let mut recorded = std::mem::take(&mut *recorded.lock().unwrap_or_else(|e| e.into_inner()));
        recorded.drain(&metrics);
        let summary = ServerSummary {
            rpc: recorded.latencies(),
            refusals: recorded.refusals(),
            connections_opened: recorded.counter("ferry_connections_opened_total"),
            cpu_s: process::cpu_seconds().unwrap_or(f64::NAN),
        };
        println!("{}", serde_json::to_string(&summary)?);
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_over_drains_and_refusals_are_the_refusal_counters_by_label() {
        let recorder = DebuggingRecorder::new();
        let snapshots = recorder.snapshotter();
        let mut recorded = Recorded::default();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("ferry_limit_refusals_total", "limit" => "node_calls").increment(3);
            metrics::counter!("ferry_connections_opened_total").increment(4);
        });
        recorded.drain(&snapshots);
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("ferry_limit_refusals_total", "limit" => "node_calls").increment(1);
            metrics::counter!("ferry_updates_rejected_total", "reason" => "disk_full").increment(1);
            metrics::counter!("ferry_updates_accepted_total").increment(9);
            metrics::counter!("ferry_connections_opened_total").increment(2);
            metrics::histogram!("ferry_rpc_seconds", "method" => "PullTask").record(0.5);
        });
        recorded.drain(&snapshots);
        let expected = BTreeMap::from([
            ("limit=node_calls".to_string(), 4),
            ("reason=disk_full".to_string(), 1),
        ]);
        assert_eq!(recorded.refusals(), expected);
        assert_eq!(recorded.counter("ferry_connections_opened_total"), 6);
        assert_eq!(recorded.counter("ferry_limit_refusals_total"), 4);
        assert_eq!(recorded.counter("ferry_never_counted_total"), 0);
        assert_eq!(recorded.latencies()["PullTask"].count, 1);
    }
}
