//! The panel's internal API: `GET /api/internal/nodes/{id}/allowed-uuids` with
//! `x-internal-token`, `If-None-Match`/`ETag`, a timeout and a body size limit; and
//! `POST /api/internal/report-traffic` with an `Idempotency-Key`.
//!
//! Redirects are never followed: the internal key goes to `panel.base_url` and nowhere
//! else, so a `3xx` (a moved panel, a hijacked one, a captive portal) is a failed
//! attempt whose error names the status and where it pointed (masked). URLs in errors
//! are shown masked ([`ShownUrl`]): a base URL may carry a password.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ETAG, HeaderMap, HeaderValue, IF_NONE_MATCH, LOCATION, RETRY_AFTER};

use crate::redact::{Secret, ShownUrl, redact_url};

/// Largest body accepted (a 100,000-user list is about 4 MB).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// `[panel]`: where the panel is and how it is called (filled in by `config`).
#[derive(Clone)]
pub struct PanelSettings {
    /// `http(s)://[user[:password]@]host[:port][/path]`, no trailing slash, no query or
    /// fragment: request paths are appended to it. Shown only through [`ShownUrl`].
    pub base_url: String,
    pub internal_api_key: Option<Secret>,
    /// Where the key was read from, when it came from a file.
    pub internal_api_key_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// By hand: the base URL may carry a password.
impl fmt::Debug for PanelSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Panel")
            .field("base_url", &ShownUrl(&self.base_url).to_string())
            .field("internal_api_key", &self.internal_api_key)
            .field("internal_api_key_file", &self.internal_api_key_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Default for PanelSettings {
    fn default() -> Self {
        PanelSettings {
            base_url: "http://127.0.0.1:3000".into(),
            internal_api_key: None,
            internal_api_key_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

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
    #[error(
        "panel answered {status} redirecting to {location}: redirects are not followed (the internal key is only sent to panel.base_url); set panel.base_url (PANEL_BASE_URL) to the address the panel really serves from"
    )]
    Redirect {
        status: StatusCode,
        /// The `Location`, masked (resolved against the request's URL), or a note that
        /// there was none.
        location: String,
    },
    #[error("no answer from the panel within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect to the panel at {url}: {}", root_cause(source))]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the panel connection failed: {}", root_cause(.0))]
    Transport(#[source] reqwest::Error),
    #[error("the panel's answer is larger than {} MiB", MAX_BODY / 1024 / 1024)]
    TooLarge,
    #[error("cannot build the HTTP client: no internal API key configured")]
    NoKey,
    #[error("cannot build the HTTP client: {}", super::chain(.0))]
    Client(#[source] reqwest::Error),
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
    pub fn new(cfg: &PanelSettings) -> Result<Panel, PanelError> {
        let key = cfg.internal_api_key.clone().ok_or(PanelError::NoKey)?;
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .user_agent(concat!("connector/", env!("CARGO_PKG_VERSION")))
            // Following a redirect would send the internal key to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(PanelError::Client)?;
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
            return Err(answer_error(&url, status, resp.headers()));
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
            Err(answer_error(&url, status, resp.headers()))
        }
    }

    fn classify(&self, url: &str, e: reqwest::Error) -> PanelError {
        // reqwest's own text carries the URL unmasked: only the masked one is shown.
        let e = e.without_url();
        if e.is_timeout() {
            PanelError::Timeout(self.timeout)
        } else if e.is_connect() {
            PanelError::Connect {
                url: ShownUrl(url).to_string(),
                source: e,
            }
        } else {
            PanelError::Transport(e)
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

/// The error for a non-`2xx` answer (a `304` is handled before): a redirect, or a
/// status with a hint.
fn answer_error(url: &str, status: StatusCode, headers: &HeaderMap) -> PanelError {
    if status.is_redirection() {
        return PanelError::Redirect {
            status,
            location: shown_location(url, headers),
        };
    }
    status_error(status, headers)
}

/// Where a redirect pointed, masked; relative locations are resolved against `url`.
fn shown_location(url: &str, headers: &HeaderMap) -> String {
    let Some(value) = headers.get(LOCATION) else {
        return "(no Location header)".into();
    };
    let Ok(text) = value.to_str() else {
        return "(a Location that is not text)".into();
    };
    match url::Url::parse(url).and_then(|base| base.join(text.trim())) {
        Ok(to) => redact_url(&to),
        Err(_) => "(a Location that is not a URL)".into(),
    }
}

fn status_error(status: StatusCode, headers: &HeaderMap) -> PanelError {
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
