//! A real HTTP panel for end-to-end tests and the demo: `GET /api/internal/nodes/{id}/allowed-uuids`
//! served by axum on 127.0.0.1 port 0, whose answer per node a test changes while the
//! agent runs, and which records every request it gets.
//!
//! It runs on its own tokio runtime (the tests themselves are synchronous: they drive
//! child processes; the demo's runtime is busy with the demo), and a test waits for requests through a condition variable, never
//! by sleeping.
//!
//! It also takes traffic reports (`POST /api/internal/report-traffic`) the way SPEC asks
//! a panel to: it deduplicates on `report_id` — a report it has is answered `409` and
//! counted once — and keeps per-user totals, every report, and every duplicate it saw.
//! Its answer to reports is set like a node's, under the pseudo-node [`REPORTS`]:
//! `Status(2xx)` takes them (the default), another status refuses them, `Hang` and
//! `Reset` lose them, and [`Answer::TakeThen`] takes them but answers with an error, as
//! a panel whose answer is lost on the way back.
//!
//! Every response carries `Connection: close`, so each request comes on a new
//! connection: that is what lets [`Answer::Reset`] reset the very connection a request
//! came on. The listener peeks at the request line of each new connection, and when the
//! node's answer is `Reset` it drops the socket with `SO_LINGER` 0 — a TCP RST while the
//! client waits for its answer — instead of handing it to axum.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::{TcpListener, TcpStream};

/// What the panel answers for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `200` with `body`; with `etag`, an `ETag` derived from the body, and `304` to a
    /// request whose `If-None-Match` carries it.
    List { body: String, etag: bool },
    /// This status with a short text body.
    Status(u16),
    /// `200` with this body and no ETag (garbage, an empty body, a wrong shape).
    Raw(String),
    /// Reads the request and never answers.
    Hang,
    /// Resets the connection once the request has arrived.
    Reset,
    /// Reports only: takes the report (counts it, once), then answers this status.
    TakeThen(u16),
    /// This redirect status (`302`, `307`, …) with this `Location`.
    Redirect(u16, String),
}

/// The pseudo-node whose [`Answer`] is the panel's answer to traffic reports.
pub const REPORTS: u64 = u64::MAX;

/// What the panel knows of traffic reports.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Every distinct report, by `report_id`: its body.
    pub reports: BTreeMap<String, serde_json::Value>,
    /// `report_id`s sent again after the panel had them (answered `409`, or taken again
    /// under `TakeThen`, which still counts them once).
    pub duplicates: Vec<String>,
    /// (node, uuid) → [upload, download], deduplicated.
    pub totals: BTreeMap<(u64, String), [u64; 2]>,
    /// Requests refused as malformed (no or wrong `Idempotency-Key`, bad body).
    pub malformed: Vec<String>,
}

impl Ledger {
    /// One node's totals by uuid.
    pub fn node(&self, node: u64) -> BTreeMap<String, [u64; 2]> {
        self.totals
            .iter()
            .filter(|((n, _), _)| *n == node)
            .map(|((_, u), v)| (u.clone(), *v))
            .collect()
    }

    /// Report ids in the order the panel first took them, per node.
    pub fn order(&self, node: u64) -> Vec<String> {
        let mut v: Vec<(u64, String)> = self
            .reports
            .iter()
            .filter(|(_, b)| b["node_id"].as_u64() == Some(node))
            .map(|(id, b)| (b["_seq"].as_u64().unwrap_or(0), id.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }
}

impl Answer {
    /// A JSON array of these UUIDs, with an ETag.
    pub fn list<S: AsRef<str>>(uuids: &[S]) -> Answer {
        Answer::List {
            body: json_array(uuids),
            etag: true,
        }
    }
}

/// `["a","b",…]`.
pub fn json_array<S: AsRef<str>>(uuids: &[S]) -> String {
    let items: Vec<String> = uuids
        .iter()
        .map(|u| format!("\"{}\"", u.as_ref()))
        .collect();
    format!("[{}]", items.join(","))
}

/// One request the panel got, and how it answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// From the start of the test.
    pub at: Duration,
    pub node: u64,
    pub token: Option<String>,
    pub if_none_match: Option<String>,
    /// `200`, `304`, `401`, `500`, `hang`, `reset`, ….
    pub answered: String,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>8.3}s node {} token={:?} if-none-match={:?} -> {}",
            self.at.as_secs_f64(),
            self.node,
            self.token,
            self.if_none_match,
            self.answered
        )
    }
}

struct Inner {
    /// The token the panel accepts in `x-internal-token`.
    token: String,
    answers: BTreeMap<u64, Answer>,
    requests: Vec<Request>,
    ledger: Ledger,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Signalled after every recorded request.
    changed: Condvar,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding it has already failed; its data is
        // still what the other threads should see.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answer_for(&self, node: u64) -> Answer {
        let default = if node == REPORTS {
            Answer::Status(200)
        } else {
            Answer::Status(404)
        };
        self.lock().answers.get(&node).cloned().unwrap_or(default)
    }

    fn record(&self, node: u64, headers: &HeaderMap, answered: &str) {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let r = Request {
            at: self.started.elapsed(),
            node,
            token: text("x-internal-token"),
            if_none_match: text("if-none-match"),
            answered: answered.to_string(),
        };
        self.lock().requests.push(r);
        self.changed.notify_all();
    }
}

/// The panel server. Stops (and drops hanging requests) when dropped.
pub struct Panel {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Panel {
    /// Starts a panel that accepts `token` and answers `404` for every node until told
    /// otherwise. Panics when it cannot (see [`Panel::try_start`]).
    #[track_caller]
    pub fn start(token: &str) -> Panel {
        Panel::try_start(token).unwrap_or_else(|e| panic!("starting the panel: {e}"))
    }

    /// [`Panel::start`], with the failure as `Err`. May be called from inside another
    /// tokio runtime (the demo's): it only enters its own.
    pub fn try_start(token: &str) -> std::io::Result<Panel> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                token: token.to_string(),
                answers: BTreeMap::new(),
                requests: Vec::new(),
                ledger: Ledger::default(),
            }),
            changed: Condvar::new(),
            started: Instant::now(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let app = axum::Router::new()
            .route("/api/internal/nodes/{id}/allowed-uuids", get(allowed_uuids))
            .route("/api/internal/report-traffic", post(report_traffic))
            .with_state(shared.clone());
        let listener = Resetting {
            inner: listener,
            shared: shared.clone(),
        };
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(Panel {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the panel answers for `node` from now on.
    pub fn set(&self, node: u64, answer: Answer) {
        self.shared.lock().answers.insert(node, answer);
    }

    /// The token the panel accepts from now on (a rotated key: the agent's is wrong).
    pub fn set_token(&self, token: &str) {
        self.shared.lock().token = token.to_string();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// When `request` came, on this process's clock.
    pub fn instant_of(&self, request: &Request) -> Instant {
        self.shared.started + request.at
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Waits until a request recorded after the first `after` ones satisfies `pred`;
    /// returns its index and the request. On timeout, `Err` with every request seen.
    pub fn wait_request(
        &self,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&Request) -> bool,
    ) -> Result<(usize, Request), String> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.lock();
        loop {
            let found = inner
                .requests
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, r)| pred(r));
            if let Some((i, r)) = found {
                return Ok((i, r.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the panel did not get the awaited request within {timeout:?}; requests:\n{}",
                    show(&inner.requests)
                ));
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What the panel has taken of traffic reports.
    pub fn ledger(&self) -> Ledger {
        self.shared.lock().ledger.clone()
    }

    /// Waits until the ledger satisfies `pred`; on timeout, `Err` with the requests.
    pub fn wait_ledger(
        &self,
        timeout: Duration,
        pred: impl Fn(&Ledger) -> bool,
    ) -> Result<Ledger, String> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.lock();
        loop {
            if pred(&inner.ledger) {
                return Ok(inner.ledger.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the panel's ledger did not reach the awaited state within {timeout:?}; {} reports, {} duplicates; requests:\n{}",
                    inner.ledger.reports.len(),
                    inner.ledger.duplicates.len(),
                    show(&inner.requests)
                ));
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Every request, one per line, for failure messages.
    pub fn dump(&self) -> String {
        show(&self.shared.lock().requests)
    }
}

impl Drop for Panel {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Hanging handlers never finish; do not wait for them.
            rt.shutdown_background();
        }
    }
}

fn show(requests: &[Request]) -> String {
    if requests.is_empty() {
        return "(none)".into();
    }
    requests
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn etag_of(body: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

async fn allowed_uuids(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<u64>,
    headers: HeaderMap,
) -> Response {
    let token_ok = {
        let inner = shared.lock();
        headers
            .get("x-internal-token")
            .is_some_and(|v| v.as_bytes() == inner.token.as_bytes())
    };
    let mut resp = if !token_ok {
        shared.record(node, &headers, "401");
        (StatusCode::UNAUTHORIZED, "invalid internal token").into_response()
    } else {
        match shared.answer_for(node) {
            Answer::List { body, etag } => {
                let tag = etag.then(|| etag_of(&body));
                let matched = tag.as_deref().is_some_and(|t| {
                    headers
                        .get(header::IF_NONE_MATCH)
                        .is_some_and(|v| v.as_bytes() == t.as_bytes())
                });
                if matched {
                    shared.record(node, &headers, "304");
                    StatusCode::NOT_MODIFIED.into_response()
                } else {
                    shared.record(node, &headers, "200");
                    let mut r =
                        ([(header::CONTENT_TYPE, "application/json")], body).into_response();
                    if let Some(t) = tag.and_then(|t| HeaderValue::from_str(&t).ok()) {
                        r.headers_mut().insert(header::ETAG, t);
                    }
                    r
                }
            }
            Answer::Status(code) | Answer::TakeThen(code) => {
                shared.record(node, &headers, &code.to_string());
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
                (status, format!("panel says {code}")).into_response()
            }
            Answer::Raw(body) => {
                shared.record(node, &headers, "200 raw");
                body.into_response()
            }
            Answer::Redirect(code, location) => {
                shared.record(node, &headers, &code.to_string());
                redirect(code, &location)
            }
            Answer::Hang => {
                shared.record(node, &headers, "hang");
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes")
            }
            Answer::Reset => {
                // The listener resets such connections before axum sees them; a request
                // that got here raced a change of answer. Answer it like a dead panel.
                shared.record(node, &headers, "503 (reset raced)");
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            }
        }
    };
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A `3xx` pointing at `location`.
fn redirect(code: u16, location: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FOUND);
    let mut r = (status, "moved").into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// `POST /api/internal/report-traffic`: checks the token and the `Idempotency-Key`,
/// then takes the report once per `report_id`.
async fn report_traffic(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let token_ok = {
        let inner = shared.lock();
        headers
            .get("x-internal-token")
            .is_some_and(|v| v.as_bytes() == inner.token.as_bytes())
    };
    let answer = shared.answer_for(REPORTS);
    let mut resp = if !token_ok {
        shared.record(REPORTS, &headers, "401");
        (StatusCode::UNAUTHORIZED, "invalid internal token").into_response()
    } else {
        match answer {
            Answer::Hang => {
                shared.record(REPORTS, &headers, "hang");
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes")
            }
            Answer::Reset => {
                shared.record(REPORTS, &headers, "503 (reset raced)");
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            }
            Answer::Redirect(code, location) => {
                shared.record(REPORTS, &headers, &code.to_string());
                redirect(code, &location)
            }
            Answer::Status(code) if !(200..300).contains(&code) => {
                shared.record(REPORTS, &headers, &code.to_string());
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
                (status, format!("panel says {code}")).into_response()
            }
            other => {
                let (taken, note) = take_report(&shared, &headers, &body);
                let code = match (&other, taken) {
                    (_, Err(_)) => 400,
                    (Answer::TakeThen(code), Ok(_)) => *code,
                    (_, Ok(false)) => 409,
                    (Answer::Status(code), Ok(true)) => *code,
                    (_, Ok(true)) => 200,
                };
                shared.record(REPORTS, &headers, &format!("{code} {note}"));
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
                (status, note).into_response()
            }
        }
    };
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Takes one report into the ledger: `Ok(true)` new, `Ok(false)` a duplicate.
fn take_report(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> (Result<bool, ()>, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(body);
    let mut inner = shared.lock();
    let checked = (|| {
        let mut report = parsed.map_err(|_| "body is not JSON".to_string())?;
        let id = report["report_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or("no report_id")?;
        if key.as_deref() != Some(id.as_str()) {
            return Err(format!("Idempotency-Key {key:?} is not the report_id {id}"));
        }
        let (Some(node), Some(items)) = (report["node_id"].as_u64(), report["items"].as_array())
        else {
            return Err(format!("report {id}: no node_id or items"));
        };
        let mut adds = Vec::new();
        for item in items {
            let (Some(uuid), Some(up), Some(down)) = (
                item["uuid"].as_str(),
                item["upload"].as_u64(),
                item["download"].as_u64(),
            ) else {
                return Err(format!("report {id}: a malformed item {item}"));
            };
            adds.push((uuid.to_string(), up, down));
        }
        report["_seq"] = serde_json::Value::Null;
        Ok((id, node, adds, report))
    })();
    let (id, node, adds, mut report) = match checked {
        Ok(c) => c,
        Err(why) => {
            inner.ledger.malformed.push(why.clone());
            return (Err(()), why);
        }
    };
    if inner.ledger.reports.contains_key(&id) {
        inner.ledger.duplicates.push(id.clone());
        return (Ok(false), format!("duplicate {id}"));
    }
    for (uuid, up, down) in adds {
        let t = inner.ledger.totals.entry((node, uuid)).or_default();
        t[0] += up;
        t[1] += down;
    }
    let seq = inner.ledger.reports.len() as u64;
    report["_seq"] = serde_json::Value::from(seq);
    inner.ledger.reports.insert(id.clone(), report);
    (Ok(true), format!("took {id}"))
}

/// A listener that resets the connections of requests whose node answers `Reset`.
struct Resetting {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for Resetting {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(_) => continue,
            };
            match request_head(&stream).await {
                Some((node, headers)) if self.shared.answer_for(node) == Answer::Reset => {
                    self.shared.record(node, &headers, "reset");
                    // SO_LINGER 0: close sends RST, not FIN.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                }
                _ => return (stream, addr),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The node id and the headers of the request on a new connection, read without
/// consuming them (axum reads them again when the connection is handed on).
async fn request_head(stream: &TcpStream) -> Option<(u64, HeaderMap)> {
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        let head = &buf[..n];
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = std::str::from_utf8(&head[..end]).ok()?;
            let mut lines = text.split("\r\n");
            let path = lines.next()?.split(' ').nth(1)?;
            let node = if path == "/api/internal/report-traffic" {
                REPORTS
            } else {
                path.strip_prefix("/api/internal/nodes/")?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()?
            };
            let mut headers = HeaderMap::new();
            for line in lines {
                if let Some((name, value)) = line.split_once(':')
                    && let (Ok(name), Ok(value)) = (
                        header::HeaderName::from_bytes(name.trim().as_bytes()),
                        HeaderValue::from_str(value.trim()),
                    )
                {
                    headers.append(name, value);
                }
            }
            return Some((node, headers));
        }
        if n == buf.len() || Instant::now() > deadline {
            return None;
        }
        // Part of the head is in; peek returns at once while data is buffered, so give
        // the rest a moment to arrive.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
