//! Nodes' connections: the TCP listener, the TLS handshake and the HTTP/2 settings the fleet
//! service is served with.
//!
//! The server runs its own accept loop, not tonic's, for two HTTP/2 settings tonic's builder
//! does not expose. A connection's HPACK tables (the header compression state each side keeps
//! per connection) took every new header value, a new `date` header each second among them,
//! and each stored value held on to the read buffer it was cut from: a server's memory grew
//! with its history until the tables were full (1,000 nodes each round: 86 to 101 MB over 25
//! rounds; docs/benchmarks/fleet.md). Here the server sends no `date` header and keeps no
//! HPACK table of its own; nodes' request headers cost a few hundred bytes more each.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

use crate::{ServerError, TlsPem};

/// How long a new connection may take to finish its TLS handshake: a peer that stalls it is
/// dropped rather than kept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The fleet service as every connection serves it: tonic's routes, each call timed.
pub(crate) type FleetHttp = crate::rpc_timing::Timed<tonic::service::Routes>;

/// The server's TLS settings from its PEM files: its certificate and key, and the CA nodes'
/// certificates must be signed by when it asks for mutual TLS. Public so that `ferry bench
/// tls` measures its loopback ceiling with the very settings the fleet service uses.
pub fn tls_config(tls: &TlsPem) -> Result<ServerConfig, ServerError> {
    let settings = |what: &str, e: &dyn std::fmt::Display| {
        ServerError::Settings(format!(
            "TLS {what}: {e} (give PEM files such as `ferry certs` writes)"
        ))
    };
    let chain = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| settings("certificate", &e))?;
    if chain.is_empty() {
        return Err(settings("certificate", &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key).map_err(|e| settings("key", &e))?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| settings("protocol versions", &e))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| settings("client CA", &e))?;
                roots.add(cert).map_err(|e| settings("client CA", &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| settings("client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| settings("certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The largest DATA frame nodes may send (HTTP/2's SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME_BYTES: u32 = 64 * 1024;

/// HTTP/2 as the fleet service speaks it.
fn http2_settings() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // Windows sized to the link (hyper's bandwidth-delay estimate): wide where the round
        // trip is long, narrow on a short one, so that the server never buffers more of an
        // upload than the link keeps in flight. Fixed 8 MiB windows let every node's upload
        // sit in the server's buffers: a 1M-parameter round's coordinator grew by 4 MB per node.
        .adaptive_window(true)
        // No cap on a connection's concurrent calls (hyper's default is 200): nodes behind one
        // connection (a gRPC proxy, a fleet simulator) each hold a long-poll and may wait on a
        // transfer turn at once. What one node may ask is bounded by the abuse limits.
        .max_concurrent_streams(None)
        // Nodes may send DATA frames of up to 64 KiB rather than HTTP/2's 16 KiB. Frames a
        // busy server has not yet handed to a call wait in a queue that each connection keeps
        // for its life at the longest it ever was; a quarter as many frames for the same bytes
        // keep it short. At 10,000 nodes that queue grew by 7.8 MB over rounds 3-15 instead of
        // 30.5 MB, as nodes made their first uploads (docs/benchmarks/fleet.md).
        .max_frame_size(MAX_FRAME_BYTES)
        // Nodes may not index headers into a table the server would keep per connection.
        .header_table_size(0)
        // gRPC has no use for a `date` header, and each new one took a slot in the node's
        // table and the server's copy of it.
        .auto_date_header(false);
    builder
}

/// Serves `service` on `addr` until `shutdown` completes, then lets open calls finish.
pub(crate) async fn serve(
    addr: SocketAddr,
    tls: Option<&TlsPem>,
    service: FleetHttp,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    if tls.is_none() && !addr.ip().is_loopback() {
        return Err(ServerError::Settings(format!(
            "refusing to serve without TLS on {addr}: --insecure binds loopback addresses only"
        )));
    }
    let acceptor = tls
        .map(|tls| tls_config(tls).map(|config| TlsAcceptor::from(Arc::new(config))))
        .transpose()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(ServerError::io(format!("cannot listen on {addr}")))?;
    let http = http2_settings();
    // Each connection holds a receiver; closing the sender asks them to finish, and the
    // sender's `closed` tells when they all have.
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    // More than one per node over a run: nodes reconnecting after a broken link.
                    metrics::counter!("ferry_connections_opened_total").increment(1);
                    let connection = Connection {
                        acceptor: acceptor.clone(),
                        http: http.clone(),
                        service: service.clone(),
                        stop: stopped.clone(),
                    };
                    tokio::spawn(connection.run(stream, remote));
                }
                // Out of file descriptors or a connection reset before it was taken: the
                // listener itself still works.
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    drop(stopped);
    let _ = stop.send(true);
    stop.closed().await;
    Ok(())
}

/// One accepted connection and what it needs to serve calls.
struct Connection {
    acceptor: Option<TlsAcceptor>,
    http: http2::Builder<TokioExecutor>,
    service: FleetHttp,
    stop: watch::Receiver<bool>,
}

impl Connection {
    /// Completes the TLS handshake, then serves the connection's calls until the node closes
    /// it or the server stops.
    async fn run(self, stream: TcpStream, remote: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(remote),
        };
        match &self.acceptor {
            None => self.serve(stream, info).await,
            Some(acceptor) => {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => self.serve(stream, info).await,
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve<IO>(mut self, io: IO, info: TcpConnectInfo)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Request::remote_addr reads the address from here (per-address enrolment limits).
        let service = self
            .service
            .map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(info.clone());
                request
            });
        let connection = self
            .http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = self.stop.wait_for(|stop| *stop) => {}
        }
        connection.as_mut().graceful_shutdown();
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error while closing");
        }
    }
}
