//! Ferry's coordinator for deployment: the gRPC fleet service nodes dial into, node identity,
//! durable run state (SQLite or Postgres) and content-addressed model blobs.
//!
//! - [`coordinator`]: the run, driven by network events through the same round bookkeeping as
//!   simulation, with every accepted update stored before it is acknowledged.
//! - [`service`]: the `ferry.v1.Fleet` gRPC service.
//! - [`store`] and [`blobs`]: where state and models live; the store's lease says which of
//!   several servers sharing them is active, and [`standby`] is what the others answer.
//! - [`auth`]: enrolment tokens and node credentials.
//! - [`limits`]: what one address or one node may ask of the server.
//! - [`api`]: the operator's REST API and Prometheus metrics; [`counter_totals`]: counters
//!   added up over reads of a debugging recorder (benchmarks, tests).
//!
//! This crate never links the ML engine: the caller supplies the initial model, the strategy
//! and the evaluator.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod blobs;
pub mod coordinator;
pub mod counter_totals;
pub mod error;
pub mod limits;
mod refusal;
pub mod rpc_timing;
pub mod secure;
pub mod service;
pub mod staged;
pub mod standby;
pub mod store;
mod transport;
pub mod turns;

use std::{future::Future, net::SocketAddr, sync::Arc};

pub use error::ServerError;
use ferry_proto::v1::{fleet_server::FleetServer, relay_server::RelayServer};
pub use transport::tls_config;

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsPem {
    /// The server's certificate chain.
    pub cert: Vec<u8>,
    /// The server's private key.
    pub key: Vec<u8>,
    /// When set, nodes must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
}

/// Where and how the fleet service listens.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Address to bind.
    pub addr: SocketAddr,
    /// TLS material; `None` only for loopback addresses.
    pub tls: Option<TlsPem>,
    /// What one address or one node may ask of the service.
    pub limits: limits::AbuseLimits,
}

/// Serves the fleet service for `coordinator` until `shutdown` completes.
pub async fn serve(
    listener: Listener,
    coordinator: Arc<coordinator::Coordinator>,
    store: store::Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let limit = coordinator.spec().max_chunk_bytes + 64 * 1024;
    let service = Arc::new(service::FleetService::new(
        coordinator,
        store,
        listener.limits.clone(),
    ));
    let fleet = FleetServer::from_arc(service.clone())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let relay = RelayServer::from_arc(service);
    serve_routes(
        listener.addr,
        listener.tls.as_ref(),
        tonic::service::Routes::new(fleet).add_service(relay),
        shutdown,
    )
    .await
}

/// Serves gRPC `routes` on `addr` the way the fleet service is served (each call timed, the
/// same TLS and HTTP/2 settings) until `shutdown` completes: a relay serves its nodes so.
pub async fn serve_routes(
    addr: SocketAddr,
    tls: Option<&TlsPem>,
    routes: tonic::service::Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let routes = tower::ServiceBuilder::new()
        .layer(rpc_timing::RpcTiming)
        .service(routes.prepare());
    transport::serve(addr, tls, routes, shutdown).await?;
    Ok(())
}
