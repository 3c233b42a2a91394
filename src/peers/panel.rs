//! The panel's internal API: `GET /api/internal/nodes/{id}/allowed-uuids` with
//! `x-internal-token`, `If-None-Match`/`ETag`, a timeout and a body size limit; and
//! `POST /api/internal/report-traffic` with an `Idempotency-Key`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ETAG, HeaderValue, IF_NONE_MATCH, RETRY_AFTER};

use crate::config::{self, Secret};

/// Largest body accepted (a 100,000-user list is about 4 MB).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// A panel client. Cheap to clone (connections are pooled and shared).
#[derive(Clone)]
pub struct Panel {
    client: reqwest::Client,
    base_url: String,
    key: Secret,
    timeout: Duration,
}

/// What the panel answered.
#[derive(Debug)]
pub enum Fetched {
    /// `304`: the list is the one we have.
    NotModified,
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
}

/// Why a request did not produce an answer we can use. The texts name the cause.
#[derive(Debug, thiserror::Error)]
pub enum PanelError {
    #[error("panel answered {status}{hint}")]
    Status {
        status: StatusCode,
        hint: &'static str,
        /// From a `Retry-After` header, if the panel sent one.
        retry_after: Option<Duration>,
    },
    #[error("no answer from the panel within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect to the panel at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the panel connection failed: {0}")]
    Transport(String),
    #[error("the panel's answer is larger than {} MiB", MAX_BODY / 1024 / 1024)]
    TooLarge,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl PanelError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PanelError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl Panel {
    pub fn new(cfg: &config::Panel) -> Result<Panel, PanelError> {
        let key = cfg
            .internal_api_key
            .clone()
            .ok_or_else(|| PanelError::Client("no internal API key configured".into()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .user_agent(concat!("connector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PanelError::Client(super::chain(&e)))?;
        Ok(Panel {
            client,
            base_url: cfg.base_url.clone(),
            key,
            timeout: cfg.timeout,
        })
    }

    /// Fetches one node's allowed-user list, conditional on `etag`.
    pub async fn allowed_uuids(
        &self,
        node_id: u64,
        etag: Option<&str>,
    ) -> Result<Fetched, PanelError> {
        let url = format!(
            "{}/api/internal/nodes/{node_id}/allowed-uuids",
            self.base_url
        );
        let mut req = self
            .client
            .get(&url)
            .header("x-internal-token", self.key.expose());
        if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(t).ok()) {
            req = req.header(IF_NONE_MATCH, tag);
        }
        let mut resp = req.send().await.map_err(|e| self.classify(&url, e))?;
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if !status.is_success() {
            return Err(status_error(status, resp.headers()));
        }
        let etag = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(&url, e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(PanelError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched::Body { bytes, etag })
    }

    /// `POST /api/internal/report-traffic` with `Idempotency-Key: {report_id}` and `body`
    /// (the report's JSON). `2xx` is delivered, `409` delivered before (the panel already
    /// has this `report_id`); anything else is an error.
    pub async fn report_traffic(
        &self,
        report_id: &str,
        body: Vec<u8>,
    ) -> Result<Reported, PanelError> {
        let url = format!("{}/api/internal/report-traffic", self.base_url);
        let resp = self
            .client
            .post(&url)
            .header("x-internal-token", self.key.expose())
            .header("idempotency-key", report_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(&url, e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(Reported::Accepted(status.as_u16()))
        } else if status == StatusCode::CONFLICT {
            Ok(Reported::Duplicate)
        } else {
            Err(status_error(status, resp.headers()))
        }
    }

    fn classify(&self, url: &str, e: reqwest::Error) -> PanelError {
        if e.is_timeout() {
            PanelError::Timeout(self.timeout)
        } else if e.is_connect() {
            PanelError::Connect {
                url: url.to_string(),
                reason: root_cause(&e),
            }
        } else {
            PanelError::Transport(root_cause(&e))
        }
    }
}

/// How the panel took a traffic report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// A `2xx`, with its code.
    Accepted(u16),
    /// `409`: it had this `report_id` already.
    Duplicate,
}

fn status_error(status: StatusCode, headers: &reqwest::header::HeaderMap) -> PanelError {
    PanelError::Status {
        status,
        hint: match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                " (check INTERNAL_API_KEY: the panel refused the token)"
            }
            StatusCode::NOT_FOUND => " (is the node id known to the panel?)",
            StatusCode::PAYLOAD_TOO_LARGE => " (lower traffic.max_items)",
            _ => "",
        },
        retry_after: headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
    }
}

/// The innermost cause: "connection refused", "connection reset by peer", ….
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
