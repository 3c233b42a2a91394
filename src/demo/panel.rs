//! The demo's panel: the two endpoints of SPEC §3 a real panel serves the agent, on
//! 127.0.0.1 port 0, inside the demo's process.
//!
//! - `GET /api/internal/nodes/{id}/allowed-uuids` answers the node's current list (a
//!   JSON array) with an `ETag`, and `304` when the agent's `If-None-Match` matches.
//! - `POST /api/internal/report-traffic` takes a report once per `report_id` (a repeat
//!   is answered `409`, as SPEC lets a panel do) and adds its items to per-user totals.
//!
//! Both check `x-internal-token`. The demo reads what the panel saw ([`Panel::seen`]) the
//! way an operator would look at their panel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

/// What the panel has seen so far.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Syncs by answer: `200`, `304`, `401`.
    pub syncs: BTreeMap<String, usize>,
    /// Distinct reports taken, by `report_id`.
    pub reports: BTreeSet<String>,
    /// Reports sent again and answered `409` (counted once).
    pub duplicates: usize,
    /// uuid → [upload, download], each report counted once.
    pub totals: BTreeMap<String, [u64; 2]>,
    /// Requests refused: a wrong token or a malformed report.
    pub refused: Vec<String>,
}

struct Inner {
    lists: BTreeMap<u64, Vec<String>>,
    seen: Seen,
}

struct Shared {
    token: String,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get("x-internal-token")
            .is_some_and(|v| v.as_bytes() == self.token.as_bytes())
    }
}

pub struct Panel {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Panel {
    /// Serves on 127.0.0.1 port 0 until `stop`; accepts `token`.
    pub async fn start(token: &str, stop: CancellationToken) -> anyhow::Result<Panel> {
        let shared = Arc::new(Shared {
            token: token.to_string(),
            inner: Mutex::new(Inner {
                lists: BTreeMap::new(),
                seen: Seen::default(),
            }),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/api/internal/nodes/{id}/allowed-uuids", get(allowed_uuids))
            .route("/api/internal/report-traffic", post(report_traffic))
            .with_state(shared.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        Ok(Panel { addr, shared })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The users the panel allows on `node` from now on.
    pub fn set_users(&self, node: u64, uuids: &[String]) {
        self.shared.lock().lists.insert(node, uuids.to_vec());
    }

    pub fn seen(&self) -> Seen {
        self.shared.lock().seen.clone()
    }
}

/// A strong ETag: the first 8 bytes of the body's SHA-256, in hex.
fn etag_of(body: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

async fn allowed_uuids(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if !shared.token_ok(&headers) {
        let mut g = shared.lock();
        *g.seen.syncs.entry("401".into()).or_default() += 1;
        g.seen
            .refused
            .push(format!("node {node}: wrong x-internal-token"));
        return (StatusCode::UNAUTHORIZED, "invalid internal token").into_response();
    }
    let mut g = shared.lock();
    let Some(list) = g.lists.get(&node) else {
        *g.seen.syncs.entry("404".into()).or_default() += 1;
        return (StatusCode::NOT_FOUND, "no such node").into_response();
    };
    let body = serde_json::to_string(list).unwrap_or_else(|_| "[]".into());
    let tag = etag_of(&body);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        *g.seen.syncs.entry("304".into()).or_default() += 1;
        return StatusCode::NOT_MODIFIED.into_response();
    }
    *g.seen.syncs.entry("200".into()).or_default() += 1;
    let mut r = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// Takes a report once per `report_id`; a repeat is `409`.
async fn report_traffic(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !shared.token_ok(&headers) {
        shared
            .lock()
            .seen
            .refused
            .push("report: wrong x-internal-token".into());
        return (StatusCode::UNAUTHORIZED, "invalid internal token").into_response();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let report: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return refuse(&shared, "report: body is not JSON".into()),
    };
    let id = report["report_id"].as_str().unwrap_or("");
    if id.is_empty() || id != key {
        return refuse(
            &shared,
            format!("report: Idempotency-Key {key:?} is not its report_id {id:?}"),
        );
    }
    let mut items = Vec::new();
    for item in report["items"].as_array().into_iter().flatten() {
        match (
            item["uuid"].as_str(),
            item["upload"].as_u64(),
            item["download"].as_u64(),
        ) {
            (Some(u), Some(up), Some(down)) => items.push((u.to_string(), up, down)),
            _ => return refuse(&shared, format!("report {id}: a malformed item {item}")),
        }
    }
    let mut g = shared.lock();
    if !g.seen.reports.insert(id.to_string()) {
        g.seen.duplicates += 1;
        return (StatusCode::CONFLICT, "already counted").into_response();
    }
    for (uuid, up, down) in items {
        let t = g.seen.totals.entry(uuid).or_default();
        t[0] += up;
        t[1] += down;
    }
    (StatusCode::OK, "counted").into_response()
}

fn refuse(shared: &Shared, why: String) -> Response {
    shared.lock().seen.refused.push(why.clone());
    (StatusCode::BAD_REQUEST, why).into_response()
}
