//! A plain HTTP server on 127.0.0.1 port 0 that records every request it gets, whatever
//! its method and path, and answers each `200` with a fixed body: the "another host" a
//! redirect points at, to prove that nothing (no request, no key) ever reaches it.
//!
//! `support::capture` in the tests. It runs on its own
//! tokio runtime, like the panel; waiting is on a condition variable, never a sleep.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse;

/// One request as it came.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

struct Shared {
    requests: Mutex<Vec<Captured>>,
    changed: Condvar,
    body: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Captured>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Capture {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn record(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let captured = Captured {
        method: method.to_string(),
        uri: uri.to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    shared.lock().push(captured);
    shared.changed.notify_all();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        shared.body.clone(),
    )
}

impl Capture {
    /// Starts a capture server answering every request `200` with `body`.
    pub fn start(body: &str) -> Capture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the capture server");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            body: body.to_string(),
        });
        // Bound here, not with `block_on`: async tests start capture servers too.
        let std_tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_tcp
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_tcp.local_addr().expect("the capture server's address");
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        runtime.spawn(async move {
            let tcp = tokio::net::TcpListener::from_std(std_tcp).expect("a tokio listener");
            let _ = axum::serve(tcp, app).await;
        });
        Capture {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.shared.lock().clone()
    }

    /// Blocks until at least `n` requests have come (at most `timeout`).
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<Captured>, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while g.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the capture server got {} request(s), expected {n}",
                    g.len()
                ));
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(g.clone())
    }
}
