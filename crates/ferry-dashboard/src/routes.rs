//! The dashboard's HTTP surface: transport checks (who may look or act), then one call into
//! the run's [`Source`].

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;

use crate::{
    access::{Access, Refusal, refusal},
    assets::{self, Asset},
    events,
    source::{DashboardError, Source},
};

/// The dashboard over one [`Source`], with its [`Access`] rules.
#[derive(Clone)]
pub struct Dashboard {
    source: Arc<dyn Source>,
    access: Access,
}

/// The page's restrictions: scripts and styles only from the dashboard itself (no inline
/// script, so markup that slipped into the page still could not run), no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

impl Dashboard {
    /// A dashboard showing `source` to whoever `access` lets in.
    pub fn new(source: Arc<dyn Source>, access: Access) -> Self {
        Self { source, access }
    }

    /// The pages at `/` and `/assets/*`, the data at `/dashboard/v1/*`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/assets/{name}", get(asset))
            .route("/dashboard/v1/run", get(run))
            .route("/dashboard/v1/cross-site", get(cross_site))
            .route("/dashboard/v1/events", get(feed))
            .route("/dashboard/v1/compare", get(compare))
            .route("/dashboard/v1/tokens", get(tokens).post(create_token))
            .route("/dashboard/v1/tokens/revoke", post(revoke_token))
            .route("/dashboard/v1/stop", post(stop))
            .layer(middleware::map_response(protect))
            // The run's document is JSON that repeats its keys round after round: gzip takes
            // a 1,000-node run's 129 kB to a few kB.
            .layer(tower_http::compression::CompressionLayer::new().gzip(true))
            .with_state(self)
    }
}

async fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn serve_asset(asset: Asset) -> Response {
    ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
}

async fn index() -> Response {
    serve_asset(assets::INDEX)
}

async fn asset(Path(name): Path<String>) -> Response {
    match assets::named(&name) {
        Some(asset) => serve_asset(asset),
        None => refusal(StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

impl From<DashboardError> for Refusal {
    fn from(e: DashboardError) -> Self {
        let status = match e {
            DashboardError::NotFound(_) => StatusCode::NOT_FOUND,
            DashboardError::Invalid(_) => StatusCode::BAD_REQUEST,
            DashboardError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        refusal(status, &e.to_string())
    }
}

/// What a data or action route answers: JSON, or a refusal.
type Answer = Result<Response, Refusal>;

/// Which run a request is about, in finished-run browsing.
#[derive(Deserialize)]
struct RunQuery {
    run: Option<String>,
}

async fn run(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<RunQuery>,
) -> Answer {
    d.access.may_view(peer, &headers)?;
    let mut view = d.source.view(query.run).await?;
    view.actions = d.source.operator().is_some() && d.access.has_admin();
    Ok(Json(view).into_response())
}

/// The run's cross-site validation matrix (`final.cross_site` of its history), for tools that
/// want the matrix alone.
async fn cross_site(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<RunQuery>,
) -> Answer {
    d.access.may_view(peer, &headers)?;
    let view = d.source.view(query.run).await?;
    match view.history.get("final").and_then(|f| f.get("cross_site")) {
        Some(matrix) if !matrix.is_null() => Ok(Json(matrix.clone()).into_response()),
        _ => Err(DashboardError::NotFound(
            "this run has no cross-site matrix: run it with --cross-site (a server's [run]: \
             cross-site = \"global\"), or compute it with `ferry cross-site RUN_DIR`"
                .into(),
        )
        .into()),
    }
}

async fn feed(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Answer {
    d.access.may_view(peer, &headers)?;
    Ok(events::feed(d.source.changes()).into_response())
}

async fn compare(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Answer {
    d.access.may_view(peer, &headers)?;
    Ok(Json(d.source.curves().await?).into_response())
}

/// The source's operator, once the request may act.
fn operator<'a>(d: &'a Dashboard, headers: &HeaderMap) -> Result<&'a dyn crate::Operator, Refusal> {
    d.access.may_act(headers)?;
    d.source.operator().ok_or_else(|| {
        refusal(
            StatusCode::FORBIDDEN,
            "this dashboard has no operator actions (it shows a simulation or finished runs)",
        )
    })
}

async fn tokens(State(d): State<Dashboard>, headers: HeaderMap) -> Answer {
    let tokens = operator(&d, &headers)?.tokens().await?;
    Ok(Json(tokens).into_response())
}

/// A token named in an action's body.
#[derive(Deserialize)]
struct TokenName {
    name: String,
}

/// Token names the page may create: what a terminal, a file name and a log line show as is.
fn check_name(name: &str) -> Result<(), Refusal> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(refusal(
            StatusCode::BAD_REQUEST,
            "a token name is 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

async fn create_token(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Json(body): Json<TokenName>,
) -> Answer {
    let operator = operator(&d, &headers)?;
    check_name(&body.name)?;
    let token = operator.create_token(body.name.clone()).await?;
    Ok(Json(serde_json::json!({ "name": body.name, "token": token })).into_response())
}

async fn revoke_token(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Json(body): Json<TokenName>,
) -> Answer {
    if operator(&d, &headers)?
        .revoke_token(body.name.clone())
        .await?
    {
        Ok(Json(serde_json::json!({ "revoked": body.name })).into_response())
    } else {
        Err(refusal(StatusCode::NOT_FOUND, "no token of that name"))
    }
}

async fn stop(State(d): State<Dashboard>, headers: HeaderMap) -> Answer {
    operator(&d, &headers)?.stop_after_round().await?;
    Ok(Json(serde_json::json!({ "stopping": true })).into_response())
}
