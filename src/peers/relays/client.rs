//! The HTTP client callbacks go out through: one `reqwest` client for every relay (so
//! connections are pooled and reused), a timeout per request, the system's CAs plus
//! `webhook.ca_file`, no redirects (a `3xx` is a failed attempt: a callback is never
//! sent somewhere the provider file does not say), and at most
//! `webhook.per_relay_concurrency` requests in flight to one relay. All relays together
//! are bounded by the webhook kind's worker concurrency.
//!
//! The per-relay limit is not waited for here: a sender takes one of the relay's slots
//! ([`RelayClient::reserve`]) or, when they are all taken, leaves a ticket (an opaque
//! number of the caller's) in the relay's line and goes away; each slot given back
//! ([`RelaySlot::release`]) hands out the oldest ticket, so the caller can come back
//! for it. A caller that waited here would hold whatever it runs in (a worker slot of
//! the queue) while one slow relay keeps it waiting, and starve the other relays.
//!
//! Errors name the relay and what happened, never a header, nor a URL's password or
//! query values (relays put tokens there): a redirect's location is shown masked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::WebhookSettings;

/// Longest a `Retry-After` may push an attempt (a relay asking for a week is capped).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How much of a failed answer's body is kept for the job's error.
const SNIPPET: usize = 200;
/// Read at most this much of an answer (to reuse the connection), then drop it.
const MAX_ANSWER: usize = 64 * 1024;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("webhook.ca_file: cannot read {path}: {source}")]
    ReadCa {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook.ca_file: {path} holds no usable PEM certificate: {reason}")]
    BadCa { path: String, reason: &'static str },
    #[error(
        "webhook.ca_file: {path} holds no usable PEM certificate: {}",
        crate::peers::chain(source)
    )]
    BadPem {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the webhook HTTP client: {}", crate::peers::chain(.0))]
    Build(#[source] reqwest::Error),
}

/// Why one callback was not delivered. Every one of them is a failed attempt.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("relay {relay} answered {status}{snippet}")]
    Status {
        relay: String,
        status: reqwest::StatusCode,
        /// `: <start of the body>` or empty.
        snippet: String,
        retry_after: Option<Duration>,
    },
    #[error(
        "relay {relay} answered {status} redirecting to {location}: callbacks do not follow redirects; put the final address in the provider file's callback_url"
    )]
    Redirect {
        relay: String,
        status: reqwest::StatusCode,
        /// The `Location`, masked ([`crate::redact::redact_url`]), or a note.
        location: String,
    },
    #[error("relay {relay} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout { relay: String, timeout: Duration },
    #[error("cannot connect to relay {relay}: {}", crate::peers::chain(source))]
    Connect {
        relay: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the connection to relay {relay} failed: {}",
        crate::peers::chain(source)
    )]
    Transport {
        relay: String,
        #[source]
        source: reqwest::Error,
    },
}

impl DeliveryError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A delivered callback: the relay's `2xx`.
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub status: u16,
}

/// Sends callbacks. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct RelayClient {
    http: reqwest::Client,
    timeout: Duration,
    lines: Arc<Lines>,
}

/// Every relay's requests in flight and the tickets waiting for one to end.
#[derive(Debug)]
struct Lines {
    limit: usize,
    by_relay: Mutex<HashMap<String, Line>>,
}

#[derive(Debug, Default)]
struct Line {
    in_flight: usize,
    waiting: VecDeque<Ticket>,
    /// Told (once) each time a slot is given back, for callers that wait in place.
    freed: Arc<tokio::sync::Notify>,
}

/// A caller's mark in a relay's line: opaque here (the webhook kind puts a job and its
/// attempt in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub id: u64,
    pub n: u32,
}

impl Lines {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Line>> {
        self.by_relay.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One of a relay's `per_relay_concurrency` request slots, held for one delivery.
/// Dropped without [`RelaySlot::release`], it is given back but hands out no ticket.
#[derive(Debug)]
pub struct RelaySlot {
    lines: Arc<Lines>,
    relay: String,
    held: bool,
}

impl RelaySlot {
    /// Gives the slot back; returns the oldest ticket that was waiting for one, whose
    /// holder may now come back (the slot is not kept for it: first come, first served).
    pub fn release(mut self) -> Option<Ticket> {
        self.held = false;
        let mut lines = self.lines.lock();
        let line = lines.get_mut(&self.relay)?;
        line.in_flight = line.in_flight.saturating_sub(1);
        line.freed.notify_one();
        line.waiting.pop_front()
    }
}

impl Drop for RelaySlot {
    fn drop(&mut self) {
        if self.held
            && let Some(line) = self.lines.lock().get_mut(&self.relay)
        {
            line.in_flight = line.in_flight.saturating_sub(1);
            line.freed.notify_one();
        }
    }
}

impl RelayClient {
    pub fn new(cfg: &WebhookSettings) -> Result<RelayClient, ClientError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(cfg.per_relay_concurrency.max(1))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        if let Some(path) = &cfg.ca_file {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| ClientError::ReadCa {
                path: shown.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ClientError::BadPem {
                    path: shown.clone(),
                    source,
                }
            })?;
            if certs.is_empty() {
                return Err(ClientError::BadCa {
                    path: shown,
                    reason: "no `BEGIN CERTIFICATE` block",
                });
            }
            b = b.tls_certs_merge(certs);
        }
        let http = b.build().map_err(ClientError::Build)?;
        Ok(RelayClient {
            http,
            timeout: cfg.timeout,
            lines: Arc::new(Lines {
                limit: cfg.per_relay_concurrency.max(1),
                by_relay: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The request timeout (`webhook.timeout`): the longest a slot is held.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One of `relay`'s slots, or `None` when all `per_relay_concurrency` are taken:
    /// then `ticket` (if given) waits in the relay's line until a [`RelaySlot::release`]
    /// hands it out. Never waits.
    pub fn reserve(&self, relay: &str, ticket: Option<Ticket>) -> Option<RelaySlot> {
        let mut lines = self.lines.lock();
        let line = match lines.get_mut(relay) {
            Some(l) => l,
            None => lines.entry(relay.to_string()).or_default(),
        };
        if line.in_flight >= self.lines.limit {
            // A ticket already in line (its holder came back on its own) is there twice;
            // the holder checks its own ticket when it is handed out.
            line.waiting.extend(ticket);
            return None;
        }
        line.in_flight += 1;
        Some(RelaySlot {
            lines: self.lines.clone(),
            relay: relay.to_string(),
            held: true,
        })
    }

    /// One of `relay`'s slots, waiting in place up to `at_most` for one to be given back
    /// while `keep_waiting` says so; `None` (and no ticket left) otherwise. For a caller
    /// whose waiting holds nothing another relay needs.
    pub async fn wait_slot(
        &self,
        relay: &str,
        at_most: Duration,
        keep_waiting: impl Fn() -> bool,
    ) -> Option<RelaySlot> {
        let deadline = tokio::time::Instant::now() + at_most;
        loop {
            // Taken before looking, so a slot given back in between is not missed.
            let freed = {
                let mut lines = self.lines.lock();
                lines.entry(relay.to_string()).or_default().freed.clone()
            };
            let mut notified = std::pin::pin!(freed.notified());
            notified.as_mut().enable();
            if let Some(slot) = self.reserve(relay, None) {
                return Some(slot);
            }
            if !keep_waiting() {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The oldest ticket waiting in `relay`'s line (its holder went away).
    pub fn next_waiting(&self, relay: &str) -> Option<Ticket> {
        self.lines.lock().get_mut(relay)?.waiting.pop_front()
    }

    /// POSTs `body` to `url` for `relay`, in one of its slots ([`RelayClient::reserve`]).
    pub async fn post(
        &self,
        _slot: &RelaySlot,
        relay: &str,
        url: &url::Url,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<Delivered, DeliveryError> {
        let sent = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(relay, e)),
        };
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers(), SystemTime::now());
        // Read (a bounded part of) the answer so the connection goes back to the pool.
        let mut answer = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) if answer.len() < MAX_ANSWER => answer.extend_from_slice(&c),
                Ok(Some(_)) => break,
                Ok(None) => break,
                // The status is what counts; a body cut short does not change it.
                Err(_) => break,
            }
        }
        if status.is_success() {
            return Ok(Delivered {
                status: status.as_u16(),
            });
        }
        if status.is_redirection() {
            return Err(DeliveryError::Redirect {
                relay: relay.to_string(),
                status,
                location: shown_location(url, resp.headers()),
            });
        }
        Err(DeliveryError::Status {
            relay: relay.to_string(),
            status,
            snippet: snippet(&answer),
            retry_after,
        })
    }

    fn transport_error(&self, relay: &str, e: reqwest::Error) -> DeliveryError {
        let relay = relay.to_string();
        let e = e.without_url();
        if e.is_timeout() {
            DeliveryError::Timeout {
                relay,
                timeout: self.timeout,
            }
        } else if e.is_connect() {
            DeliveryError::Connect { relay, source: e }
        } else {
            DeliveryError::Transport { relay, source: e }
        }
    }
}

/// Where a redirect pointed, masked; a relative location is resolved against `url`.
fn shown_location(url: &url::Url, headers: &HeaderMap) -> String {
    match headers.get(reqwest::header::LOCATION).map(|v| v.to_str()) {
        None => "(no Location header)".into(),
        Some(Err(_)) => "(a Location that is not text)".into(),
        Some(Ok(text)) => match url.join(text.trim()) {
            Ok(to) => crate::redact::redact_url(&to),
            Err(_) => "(a Location that is not a URL)".into(),
        },
    }
}

/// `: <first bytes of the body, one line>` or empty.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(SNIPPET)
        .collect();
    let line = line.trim();
    if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

/// `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_dates_and_caps() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert(RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(120)));
        h.insert(
            RETRY_AFTER,
            "Thu, 01 Jan 2026 00:05:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(300)));
        h.insert(RETRY_AFTER, "999999999".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), None);
    }

    #[test]
    fn snippets_are_one_short_line() {
        assert_eq!(snippet(b""), "");
        assert_eq!(snippet(b"bad\ngateway"), ": bad gateway");
        assert_eq!(snippet(&[b'x'; 500]).len(), 2 + SNIPPET);
    }
}
