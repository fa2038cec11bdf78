//! `ferry dashboard runs/` (finished runs' folders) and `ferry simulate --dashboard ADDR` (a
//! simulation while it runs): the dashboard served on its own.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use ferry_core::model::sha256_hex;
use ferry_dashboard::{Access, Dashboard, Source, folder::FolderRuns, live::LiveRun};
use ferry_engine::{federation::RoundObserver, record::RoundRecord};

/// Options of `ferry dashboard`.
#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// Folder holding runs' output folders (each with a history.json), or one run's folder.
    #[arg(default_value = "runs")]
    pub runs: PathBuf,
    /// Address to serve the pages on; a non-loopback address prints a viewer token to use.
    #[arg(long, default_value = "127.0.0.1:8470", value_name = "HOST:PORT")]
    pub listen: SocketAddr,
}

/// Runs `ferry dashboard`: serves the runs under a folder until interrupted.
pub fn run(args: DashboardArgs) -> Result<()> {
    let source = FolderRuns::new(args.runs.clone())?;
    let runs = source.runs().len();
    tokio::runtime::Runtime::new()?.block_on(async {
        let (listener, router) = bind(args.listen, Arc::new(source)).await?;
        println!(
            "dashboard of {runs} run(s) under {} on http://{}/ (Ctrl-C stops it)",
            args.runs.display(),
            listener.local_addr()?
        );
        let interrupted = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        ferry_dashboard::serve(listener, router, interrupted)
            .await
            .context("the dashboard stopped")
    })
}

/// Binds `addr` for `source`'s pages. A loopback address lets this machine look; any other
/// gets a fresh viewer token, printed.
async fn bind(
    addr: SocketAddr,
    source: Arc<dyn Source>,
) -> Result<(tokio::net::TcpListener, axum::Router)> {
    let viewer = if addr.ip().is_loopback() {
        None
    } else {
        let token = format!("ferry-viewer-{}", ferry_server::auth::new_secret());
        println!("viewer token for other machines (enter it on the page): {token}");
        Some(sha256_hex(token.as_bytes()))
    };
    let router = Dashboard::new(source, Access::new(viewer, None)).router();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the dashboard; is it in use?"))?;
    Ok((listener, router))
}

/// Serves `run` on `addr` from a thread of its own while the simulation goes on, and says
/// where.
pub fn serve_simulation(addr: SocketAddr, run: Arc<LiveRun>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (listener, router) = runtime.block_on(bind(addr, run))?;
    println!(
        "dashboard on http://{}/ while the simulation runs",
        listener.local_addr()?
    );
    std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || {
            let served = runtime.block_on(ferry_dashboard::serve(
                listener,
                router,
                std::future::pending(),
            ));
            if let Err(e) = served {
                eprintln!("warning: the dashboard stopped: {e}");
            }
        })
        .context("cannot start the dashboard's thread")?;
    Ok(())
}

/// Tells a simulation's dashboard, if it has one, how the run goes.
pub struct LiveObserver(pub Option<Arc<LiveRun>>);

impl RoundObserver for LiveObserver {
    fn round_started(&mut self, round: u32, selected: usize) {
        if let Some(run) = &self.0 {
            run.round_started(round, selected);
        }
    }

    fn node_returned(&mut self, _round: u32) {
        if let Some(run) = &self.0 {
            run.node_returned();
        }
    }

    fn evaluating(&mut self, _round: u32) {
        if let Some(run) = &self.0 {
            run.evaluating();
        }
    }

    fn round_finished(&mut self, record: &RoundRecord) {
        if let Some(run) = &self.0 {
            run.round_finished(serde_json::to_value(record).unwrap_or_default());
        }
    }
}
