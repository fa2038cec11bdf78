//! Ferry's aggregation relay: a middle tier between nodes and the server.
//!
//! To the nodes below it, a relay is the `ferry.v1` fleet service itself (`ferry client
//! --server https://relay:7443` works unchanged). Upstream it is one identity, enrolled with a
//! relay token, holding one connection: it learns its subtree's work through one long-poll
//! (`Relay.Sync`), fetches each model once and serves it from its own cache, and sends its
//! nodes' updates on as one partial aggregate per round where the run's rule is linear, as
//! one masked sum where the round is secure (SecAgg+), or each as it came (on the node's
//! behalf) where the server needs each one. A relay's upstream may be another relay (a
//! chain): to the relays below it, a relay serves the relay service too.
//!
//! - [`view`]: the latest answer of the server, and what a node is to do by it.
//! - [`upstream`]: enrolment, the sync loop and model fetches.
//! - [`relay`]: the relay's state, and who its nodes are.
//! - [`service`]: the fleet service to nodes (and to relays below this one).
//! - [`intake`]: checking and holding what arrives: nodes' updates, lower relays' partials.
//! - [`downstream`]: the relay service to relays below this one (a chain).
//! - [`flush`]: sending accepted updates upstream, folded, summed or passed through.
//! - [`fold`]: folding held updates into one partial aggregate (the linear rules).
//! - [`masked`]: adding held masked inputs into one masked sum (SecAgg+).
//! - [`store`]: the relay's own durable state.

#![warn(missing_docs)]

pub mod downstream;
pub mod flush;
pub mod fold;
pub mod intake;
pub mod masked;
pub mod relay;
pub mod service;
pub mod store;
pub mod upstream;
pub mod view;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use ferry_client::connection::ServerAddress;
use ferry_server::{TlsPem, blobs::Blobs};

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Where nodes dial the relay.
    pub listen: SocketAddr,
    /// The relay's TLS material; `None` only on loopback.
    pub tls: Option<TlsPem>,
    /// The server (or its standbys) above the relay.
    pub upstream: ServerAddress,
    /// One-time relay token, used while the data folder holds no credential.
    pub token: Option<String>,
    /// Where the relay keeps its credential, its store and its blobs.
    pub data_dir: PathBuf,
}

/// What can stop a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay's own store failed.
    #[error("relay store: {0}")]
    Store(String),
    /// The relay's blobs or the server's part failed.
    #[error(transparent)]
    Server(#[from] ferry_server::ServerError),
    /// The node side of the protocol failed (enrolment, the credential).
    #[error(transparent)]
    Client(#[from] ferry_client::ClientError),
    /// An update or model could not be read.
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
    /// The settings cannot work.
    #[error("{0}")]
    Settings(String),
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for RelayError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Store(e.to_string())
    }
}

/// Runs a relay until `shutdown` completes or the run above it has ended; returns why the
/// run ended, if it did.
pub async fn run(
    settings: RelaySettings,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<Option<String>, RelayError> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
        RelayError::Settings(format!(
            "cannot create the data folder {}: {e}",
            settings.data_dir.display()
        ))
    })?;
    let store = store::RelayStore::open(&settings.data_dir).await?;
    let blobs = Blobs::local(&settings.data_dir.join("blobs"))?;
    let upstream = upstream::Upstream::connect(&settings).await?;
    tracing::info!(
        "relay {} ('{}') serving nodes on {} for {}",
        upstream.relay_id(),
        upstream.relay_name(),
        settings.listen,
        settings.upstream.url
    );
    let downloads = settings.data_dir.join("downloads");
    std::fs::create_dir_all(&downloads)
        .map_err(|e| RelayError::Settings(format!("cannot create {}: {e}", downloads.display())))?;
    let relay = Arc::new(relay::Relay::new(upstream, store, blobs, downloads));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let syncing = tokio::spawn(upstream::sync_loop(relay.clone(), stopped.clone()));
    let flushing = tokio::spawn(flush::flush_loop(relay.clone(), stopped.clone()));
    let mut finished = relay.subscribe();
    let run_over = async move {
        while finished.borrow_and_update().finished.is_none() {
            if finished.changed().await.is_err() {
                return;
            }
        }
        // Nodes pulling for work learn the run ended before the relay goes.
        tokio::time::sleep(view::FINISHED_GRACE).await;
    };
    let routes =
        tonic::service::Routes::new(relay.fleet_server()).add_service(relay.relay_server());
    let serving =
        ferry_server::serve_routes(settings.listen, settings.tls.as_ref(), routes, async move {
            tokio::select! {
                () = shutdown => {}
                () = run_over => {}
            }
        });
    let served = serving.await;
    let _ = stop.send(true);
    let _ = syncing.await;
    let _ = flushing.await;
    served?;
    Ok(relay.subscribe().borrow().finished.clone())
}
