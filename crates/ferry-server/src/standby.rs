//! What a standby server answers while another server holds the coordinator lease: every
//! fleet call gets `UNAVAILABLE` with the active server's address in
//! [`ferry_proto::ACTIVE_SERVER`], so that nodes knowing several addresses go there; the REST
//! API and dashboard answer 503 with the same address.

use std::future::Future;

use axum::{
    Router,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use tokio::sync::watch;

use crate::{Listener, ServerError, rpc_timing, store::Lease, transport};

/// What a standby says of where to go instead, and the active server's address.
fn redirect(active: &watch::Receiver<Option<Lease>>) -> (String, Option<String>) {
    match active.borrow().as_ref() {
        Some(lease) => (
            format!(
                "this server is a standby; the active coordinator is {} at {}",
                lease.holder, lease.address
            ),
            Some(lease.address.clone()),
        ),
        None => (
            "this server is a standby and no coordinator is active yet; try again shortly".into(),
            None,
        ),
    }
}

/// Serves the standby's answer on the fleet service's address until `shutdown` completes.
pub async fn serve(
    listener: &Listener,
    active: watch::Receiver<Option<Lease>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let answer = Router::new().fallback(move || {
        let (message, address) = redirect(&active);
        async move {
            let mut status = tonic::Status::unavailable(message);
            if let Some(value) = address.and_then(|a| a.parse().ok()) {
                status
                    .metadata_mut()
                    .insert(ferry_proto::ACTIVE_SERVER, value);
            }
            status.into_http::<axum::body::Body>()
        }
    });
    let routes = tower::ServiceBuilder::new()
        .layer(rpc_timing::RpcTiming)
        .service(tonic::service::Routes::from(answer).prepare());
    transport::serve(listener.addr, listener.tls.as_ref(), routes, shutdown).await
}

/// The REST API and dashboard of a standby: 503 for every path, naming the active server.
pub fn api(active: watch::Receiver<Option<Lease>>) -> Router {
    Router::new().fallback(move || {
        let (message, address) = redirect(&active);
        async move {
            let header = address
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok());
            let body = axum::Json(serde_json::json!({ "error": message, "active": address }));
            let mut response: Response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
            if let Some(header) = header {
                response
                    .headers_mut()
                    .insert(ferry_proto::ACTIVE_SERVER, header);
            }
            response
        }
    })
}
