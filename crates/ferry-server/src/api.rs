//! The operator's REST API (axum, on its own port) and the Prometheus `/metrics` page.
//!
//! `/api/v1/*` needs `Authorization: Bearer <admin token>`; `/metrics` is open, as scrapers
//! expect, and holds only counters.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use ferry_core::model::sha256_hex;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::{
    coordinator::Coordinator,
    store::{IdentityKind, Store},
};

/// What the API serves from.
#[derive(Clone)]
pub struct Api {
    coordinator: Arc<Coordinator>,
    store: Store,
    admin_token_hash: String,
    metrics: PrometheusHandle,
}

impl Api {
    /// An API over `coordinator`, accepting the admin token whose sha256 is `admin_token_hash`.
    pub fn new(
        coordinator: Arc<Coordinator>,
        store: Store,
        admin_token_hash: String,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            coordinator,
            store,
            admin_token_hash,
            metrics,
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/api/v1/status", get(status))
            .route("/api/v1/rounds", get(rounds))
            .route("/api/v1/nodes", get(nodes))
            .route("/metrics", get(metrics_page))
            .with_state(self)
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The refusal to send when the request lacks the admin token, if it does.
fn denied(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if sha256_hex(token.trim().as_bytes()) == api.admin_token_hash => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "send the admin token as 'Authorization: Bearer <token>' (the server printed where it is stored)",
        )),
    }
}

async fn status(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(denied) = denied(&api, &headers) {
        return denied;
    }
    Json(api.coordinator.status().await).into_response()
}

async fn rounds(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(denied) = denied(&api, &headers) {
        return denied;
    }
    match api.coordinator.history().await {
        Ok(rounds) => Json(rounds).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One enrolled node, as the API lists it.
#[derive(Debug, Serialize)]
struct NodeView {
    node_id: String,
    name: String,
    revoked: bool,
    online: bool,
    last_seen_s: Option<f64>,
    /// A node, or a relay.
    kind: IdentityKind,
    /// The relay the node joined through, if any.
    relay: Option<String>,
}

async fn nodes(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(denied) = denied(&api, &headers) {
        return denied;
    }
    let online = api.coordinator.online().await;
    match api.store.nodes().await {
        Ok(nodes) => Json(
            nodes
                .into_iter()
                .map(|n| NodeView {
                    online: online.contains_key(&n.node_id),
                    last_seen_s: online.get(&n.node_id).copied(),
                    node_id: n.node_id,
                    name: n.name,
                    revoked: n.revoked,
                    kind: n.kind,
                    relay: n.relay,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn metrics_page(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.metrics.render(),
    )
        .into_response()
}
