//! Ferry's web dashboard: run overview, per-class accuracy, nodes, privacy and robustness,
//! comparison of finished runs, and operator actions, served by Ferry itself.
//!
//! The pages (`assets/`) are built into the binary and draw their charts as SVG; they read
//! one JSON document per run ([`RunView`]) and ask for it again whenever the live feed
//! ([`events`]) says the run changed. What a page shows comes from a [`Source`]: the
//! coordinator of `ferry server`, a simulation in progress ([`live::LiveRun`]), or finished
//! runs' output folders ([`folder::FolderRuns`]). Who may look and act is decided by
//! [`access::Access`].

pub mod access;
mod assets;
pub mod events;
pub mod folder;
pub mod live;
mod routes;
pub mod source;

use std::{future::Future, net::SocketAddr};

pub use access::Access;
pub use routes::Dashboard;
pub use source::{AccuracyCurve, DashboardError, NodeView, Operator, RunView, Source, TokenView};

/// Serves `router` on `listener` (with each request's peer address, which [`Access`] reads)
/// until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
