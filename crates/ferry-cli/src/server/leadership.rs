//! Servers that share a PostgreSQL store take turns: the one holding the store's lease is the
//! active coordinator, the others are standbys that answer with its address and take over
//! when its lease lapses (see `ferry_server::store::Lease`).
//!
//! A server that loses the lease (paused past its term, cut off from the database) stops at
//! once and starts again as a standby: the same binary with the same arguments, with nothing
//! carried over from its time as the active server.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use ferry_server::{
    Listener, standby,
    store::{Campaign, Lease, Store},
};
use tokio::sync::watch;

use super::config::ServerSetup;

/// What this server bids for the lease with.
#[derive(Debug, Clone)]
pub struct Terms {
    /// Its name in the lease.
    pub name: String,
    /// Where nodes reach it.
    pub address: String,
    /// How long a lease lasts unless renewed.
    pub ttl: Duration,
}

impl Terms {
    /// The terms `setup` gives.
    pub fn of(setup: &ServerSetup) -> Self {
        let scheme = if setup.listener.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let address = setup
            .file
            .lease
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", setup.listener.addr));
        Self {
            name: setup.file.lease.name.clone().unwrap_or(address.clone()),
            address,
            ttl: Duration::from_secs_f64(setup.file.lease.seconds),
        }
    }

    /// How often a standby looks whether the lease lapsed.
    fn poll(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// Serves as a standby until this server wins the lease; returns its epoch, or `None` when
/// the operator stopped the server first (Ctrl-C).
pub async fn become_active(
    store: &Store,
    terms: &Terms,
    listener: &Listener,
    api: Option<SocketAddr>,
) -> Result<Option<i64>> {
    let (active_tx, active) = watch::channel::<Option<Lease>>(None);
    let (stop, stopped) = watch::channel(false);
    let mut serving = Vec::new();
    let mut reported = None;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        match store.campaign(&terms.name, &terms.address, terms.ttl).await {
            Ok(Campaign::Won { epoch }) => {
                let _ = stop.send(true);
                for task in serving {
                    let _ = task.await;
                }
                return Ok(Some(epoch));
            }
            Ok(Campaign::Held(lease)) => {
                if reported != Some(lease.epoch) {
                    println!(
                        "ferry server: standby; {} at {} is the active coordinator (lease epoch \
                         {}); this server takes over if its lease lapses ({:.0} s without renewal)",
                        lease.holder,
                        lease.address,
                        lease.epoch,
                        terms.ttl.as_secs_f64()
                    );
                    reported = Some(lease.epoch);
                }
                active_tx.send_replace(Some(lease));
                if serving.is_empty() {
                    serving = serve_standby(listener, api, &active, &stopped);
                }
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!("cannot reach the store to bid for the lease ({e}); trying again");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(terms.poll()) => {}
            _ = &mut ctrl_c => {
                let _ = stop.send(true);
                return Ok(None);
            }
        }
    }
}

/// Starts a standby's answers on the fleet address and, when configured, the API address.
fn serve_standby(
    listener: &Listener,
    api: Option<SocketAddr>,
    active: &watch::Receiver<Option<Lease>>,
    stopped: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let until = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut tasks = Vec::new();
    let (fleet, answers, done) = (listener.clone(), active.clone(), until(stopped.clone()));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = standby::serve(&fleet, answers, done).await {
            eprintln!(
                "warning: the standby's answers on {} stopped: {e}",
                fleet.addr
            );
        }
    }));
    if let Some(addr) = api {
        let (router, done) = (standby::api(active.clone()), until(stopped.clone()));
        tasks.push(tokio::spawn(async move {
            let served = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => ferry_dashboard::serve(listener, router, done).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                eprintln!("warning: the standby's REST API on {addr} stopped: {e}");
            }
        }));
    }
    tasks
}

/// The lease this server holds, renewed in the background every quarter of its term.
pub struct Held {
    /// The epoch it writes under.
    pub epoch: i64,
    store: Store,
    ttl: Duration,
    /// Turns true once the renewal finds the lease gone.
    lost: watch::Receiver<bool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Starts renewing lease `epoch` of `store`.
    pub fn renew(store: Store, epoch: i64, ttl: Duration) -> Self {
        let (lost_tx, lost) = watch::channel(false);
        let renewal = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut renewed = Instant::now();
                loop {
                    tokio::time::sleep(ttl / 4).await;
                    let why = match store.renew(epoch, ttl).await {
                        Ok(true) => {
                            renewed = Instant::now();
                            continue;
                        }
                        Ok(false) => "another server took the lease over".to_string(),
                        Err(e) if renewed.elapsed() < ttl => {
                            tracing::warn!(
                                "cannot renew the coordinator lease ({e}); trying again"
                            );
                            continue;
                        }
                        Err(e) => format!("the lease could not be renewed within its term ({e})"),
                    };
                    eprintln!("ferry server: {why}");
                    let _ = lost_tx.send(true);
                    return;
                }
            })
        };
        Self {
            epoch,
            store,
            ttl,
            lost,
            renewal,
        }
    }

    /// Completes once the lease is lost.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Whether this server still holds the lease, asked of the store now.
    pub async fn still_held(&self) -> bool {
        !*self.lost.borrow()
            && self
                .store
                .renew(self.epoch, self.ttl)
                .await
                .unwrap_or(false)
    }

    /// Stops renewing and gives the lease up, so that a standby takes over at once.
    pub async fn resign(self) {
        self.renewal.abort();
        if let Err(e) = self.store.resign(self.epoch).await {
            eprintln!(
                "warning: could not give up the coordinator lease ({e}); a standby takes over when it lapses"
            );
        }
    }
}

/// Starts this server again as a standby (the same program and arguments), after it lost the
/// lease; returns only if that fails.
pub fn rejoin_as_standby() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    eprintln!("ferry server: no longer the active coordinator; starting again as a standby");
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => return anyhow::anyhow!("cannot find this program to restart it: {e}"),
    };
    let failed = std::process::Command::new(program)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!("cannot restart as a standby: {failed}")
}
