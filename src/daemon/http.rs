//! The local HTTP listener (`http.listen`, SPEC §4).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/webhooks/connect` | a ProxyCast Connect event → one durable webhook job |
//! | `POST /v1/nodes/{id}/sync` | the node's sync due now (a panel pushing a ban): `202` once due, `404` for a node not served |
//! | `GET /metrics` | Prometheus text format (names: `crate::telemetry::metrics`) |
//! | `GET /healthz` | 200 `{"status":"ok",…}`, or 503 with `problems` naming what is wrong ([`Health`]) |
//!
//! [`router`] builds the routes from one shared [`HttpState`]; [`super::listener`]
//! serves them under connection limits and timeouts. The bearer token guards
//! the webhook and sync routes: metrics and health hold no secret and are read by
//! scrapers and supervisors that carry none.
//!
//! Answers are JSON. `202 {"job_id","event_id","duplicate"}` once the job is on disk;
//! errors are `{"code","field","detail"}` (`field` when one is at fault): `400`
//! malformed JSON, `401` a missing or wrong bearer token (when `http.token` is set),
//! `413` a body over `http.max_body_bytes`, `422` a field that fails its check (an
//! unknown relay included), `503` the queue could not store it (with `Retry-After`:
//! a full disk, a failed write, a deleted database — `/healthz` says which). The body
//! is never logged (it holds the full API key).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

use super::health::Health;
use crate::config::Secret;
use crate::jobs::webhook::{self, Rejected};
use crate::peers::relays::Registry;
use crate::queue::Queue;

/// `Retry-After` on a 503 (the queue could not store the event): the disk probe runs
/// every second, so a sender that waits this long finds writes taken again as soon as
/// they can be.
const RETRY_AFTER_SECS: &str = "5";

/// What every route can reach.
pub struct HttpState {
    pub queue: Queue,
    pub registry: Arc<Registry>,
    /// Required as `Authorization: Bearer …` on the webhook route, when set.
    pub token: Option<Secret>,
    pub max_body_bytes: usize,
    pub health: Arc<Health>,
}

/// The routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/webhooks/connect", post(connect))
        .route("/v1/nodes/{id}/sync", post(sync_now))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Binds `addr`; the error names it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("http.listen: cannot listen on {addr}: {e} (set http.listen to another address, or \"\" for no listener)")
    })
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let Some(handle) = crate::telemetry::metrics::install() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are off: another metrics recorder is installed in this process\n",
        )
            .into_response();
    };
    let health = st.health.clone();
    // The scrape reads the queue's indexes: not on the runtime's threads.
    match tokio::task::spawn_blocking(move || health.scrape()).await {
        Ok(Ok(scrape)) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            crate::telemetry::metrics::render(handle, &scrape),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: cannot read the queue");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the queue: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the scrape failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz(State(st): State<Arc<HttpState>>) -> Response {
    let health = st.health.clone();
    match tokio::task::spawn_blocking(move || health.check()).await {
        Ok(report) => {
            let status = if report.ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, axum::Json(report)).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the health check failed: {e}\n"),
        )
            .into_response(),
    }
}

fn json_error(r: &Rejected) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, axum::Json(r)).into_response()
}

fn plain(status: u16, code: &'static str, detail: String) -> Rejected {
    Rejected {
        status,
        code,
        field: None,
        detail,
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .is_some_and(|given| same(given.trim().as_bytes(), token.expose().as_bytes()))
}

/// `401` with `WWW-Authenticate` when `http.token` is set and not given.
fn unauthorized(st: &HttpState, headers: &HeaderMap, what: &str) -> Option<Response> {
    let token = st.token.as_ref()?;
    if authorized(headers, token) {
        return None;
    }
    tracing::info!("{what} refused: missing or wrong bearer token");
    let mut r = json_error(&plain(
        401,
        "unauthorized",
        "a valid bearer token is required (Authorization: Bearer …)".into(),
    ));
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

#[derive(serde::Serialize)]
struct SyncDue {
    node_id: u64,
    status: &'static str,
}

/// `POST /v1/nodes/{id}/sync`: the node's sync is due now; coalesces with one already
/// due or running (`node_sync::schedule::make_sync_due`).
async fn sync_now(
    State(st): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&st, &headers, "sync request") {
        return r;
    }
    let node = match id.parse::<u64>() {
        Ok(n) if st.health.nodes.contains(&n) => n,
        _ => {
            return json_error(&plain(
                404,
                "unknown_node",
                format!("this agent serves no node `{id}`"),
            ));
        }
    };
    match crate::jobs::node_sync::schedule::make_sync_due(&st.queue, node).await {
        Ok(()) => {
            tracing::info!(node, "sync made due by a push");
            (
                StatusCode::ACCEPTED,
                axum::Json(SyncDue {
                    node_id: node,
                    status: "due",
                }),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "a pushed sync could not be scheduled");
            let mut resp = json_error(&plain(
                503,
                "unavailable",
                format!("the sync could not be scheduled: {e}"),
            ));
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            resp
        }
    }
}

async fn connect(State(st): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = unauthorized(&st, &headers, "webhook event") {
        return r;
    }
    let too_large = || {
        tracing::info!(
            limit = st.max_body_bytes,
            "webhook event refused: body too large"
        );
        json_error(&plain(
            413,
            "payload_too_large",
            format!("the body is larger than {} bytes", st.max_body_bytes),
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_body_bytes as u64) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, st.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    match webhook::ingest_json(&st.queue, &st.registry, &bytes).await {
        Ok(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Err(r) if r.status == 503 => {
            let mut resp = json_error(&r);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            resp
        }
        Err(r) => {
            tracing::info!(code = r.code, field = r.field.as_deref().unwrap_or(""), detail = %r.detail, "webhook event refused");
            json_error(&r)
        }
    }
}
