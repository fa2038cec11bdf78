//! The load half of `ferry bench fleet`: many real node agents in one process, sharing a few
//! TLS connections (each call carries its own node's credential), with synthetic updates.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use ferry_client::{
    agent::{self, AgentEvent, AgentSettings},
    connection::{self, ServerAddress},
};

use ferry_server::store::now_ms;

use super::NodesReport;
use crate::bench::round::SyntheticTrainer;

/// The nodes of `ferry bench fleet` (started by it).
#[derive(Args, Debug)]
pub struct FleetNodesArgs {
    /// Working folder prepared by the parent (certificates, `tokens.txt`).
    #[arg(long)]
    pub dir: PathBuf,
    /// The loopback ports nodes dial: the server's, or each relay's (node i dials the
    /// (i mod count)-th).
    #[arg(long, value_delimiter = ',', required = true)]
    pub ports: Vec<u16>,
    /// Model parameters.
    #[arg(long)]
    pub params: usize,
    /// Nodes sharing one TLS connection.
    #[arg(long)]
    pub per_connection: usize,
    /// Nodes started per second (0: all at once), as a fleet that comes online over time.
    #[arg(long, default_value_t = 0)]
    pub start_per_second: u32,
}

/// When nodes reached a point of a round, as `(round, unix ms)`.
type Arrivals = Arc<Mutex<Vec<(u32, u64)>>>;

/// Runs every node until the server ends the run, then prints a [`NodesReport`].
pub fn run(args: FleetNodesArgs) -> Result<()> {
    let tokens = std::fs::read_to_string(args.dir.join("tokens.txt"))
        .context("the parent writes tokens.txt")?;
    let tokens: Vec<String> = tokens.lines().map(str::to_string).collect();
    let ca = std::fs::read(args.dir.join("certs/ca.pem"))?;
    let servers: Vec<ServerAddress> = args
        .ports
        .iter()
        .map(|port| ServerAddress {
            url: format!("https://localhost:{port}"),
            ca_pem: Some(ca.clone()),
            identity: None,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (arrivals, model_ready): (Arrivals, Arrivals) = (Arc::default(), Arc::default());
    let trainer = Arc::new(SyntheticTrainer(args.params));
    // The agents are polled together on one task; their connections' TLS and HTTP/2 work
    // runs on the runtime's worker threads.
    let failed = runtime.block_on(async {
        // Each address's nodes share its connections, `per_connection` to one.
        let mut channels: Vec<Vec<_>> = vec![Vec::new(); servers.len()];
        let mut nodes = futures::stream::FuturesUnordered::new();
        for (i, token) in tokens.into_iter().enumerate() {
            let (at, nth) = (i % servers.len(), i / servers.len());
            let server = &servers[at];
            if nth % args.per_connection.max(1) == 0 {
                channels[at].push(connection::channel(server)?);
            }
            let settings = AgentSettings {
                server: server.clone(),
                token: Some(token),
                state_dir: args.dir.join("nodes").join(i.to_string()),
                seed_stream: i as u64,
                max_backoff: Duration::from_secs(2),
                // A large fleet takes minutes to enrol on one machine: an agent keeps trying.
                give_up_after: Duration::from_secs(600),
                share_local_model: false,
            };
            let (arrivals, model_ready) = (arrivals.clone(), model_ready.clone());
            let on_event = move |event| {
                let (list, round) = match event {
                    AgentEvent::Assigned(round) => (&arrivals, round),
                    AgentEvent::Training(round) => (&model_ready, round),
                    _ => return,
                };
                let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
                list.push((round, now_ms() as u64));
            };
            let channel = channels[at][channels[at].len() - 1].clone();
            let start = match args.start_per_second {
                0 => Duration::ZERO,
                rate => Duration::from_secs_f64(i as f64 / f64::from(rate)),
            };
            let agent = agent::run_on(channel, settings, trainer.clone(), on_event);
            nodes.push(Box::pin(async move {
                tokio::time::sleep(start).await;
                agent.await
            }));
        }
        let mut failed = Vec::new();
        while let Some(ended) = futures::StreamExt::next(&mut nodes).await {
            if let Err(e) = ended {
                failed.push(e.to_string());
            }
        }
        anyhow::Ok(failed)
    })?;
    let taken =
        |list: &Arrivals| std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner()));
    let report = NodesReport {
        peak_rss_mb: crate::bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
        arrivals: taken(&arrivals),
        model_ready: taken(&model_ready),
        failed: failed.len(),
        first_failure: failed.into_iter().next(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
