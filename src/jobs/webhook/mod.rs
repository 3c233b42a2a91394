//! `webhook`: deliver one ProxyCast Connect callback to a relay (SPEC §3 webhook).
//!
//! # In
//!
//! [`ingest`] (and [`ingest_json`], what `POST /v1/webhooks/connect` calls) checks an
//! event ([`event::validate`]: every field SPEC names, the relay registered), cuts the
//! key to its first 7 characters, and enqueues one job whose idempotency key is the
//! event's `event_id` ([`Dedupe::Window`]: the same id again within
//! `queue.dedupe_window` is the same job). It returns only once the job is on disk.
//!
//! # Out
//!
//! One attempt ([`Webhook`]) POSTs [`Payload::body`] to the relay's `callback_url`
//! through [`RelayClient`] with `Content-Type: application/json`,
//! `User-Agent: ProxyCast/{client.version}`, `webhook-id: {event_id}` and, when the
//! provider has a secret, Standard Webhooks `webhook-timestamp` and
//! `webhook-signature` ([`sign`]). The body is rebuilt from the payload on every
//! attempt, byte for byte the same (its `timestamp` is the event's, fixed at
//! ingestion). `2xx` is delivered; anything else, a timeout or no connection is a
//! failed attempt on the kind's ladder (`0s, 1m, 5m, 30m`, then dead), pushed later by
//! a `Retry-After`. A relay that is not registered (any more) is a failed attempt too.
//!
//! # Waiting for a busy relay
//!
//! A relay takes at most `webhook.per_relay_concurrency` callbacks at once. A job whose
//! relay is at that limit does not wait in its worker slot (one slow relay would hold
//! every slot and starve the others) — unless its relay is the only one registered,
//! when there are no others to starve: then it waits in place, for at most the request
//! timeout. Otherwise it leaves its ticket in the relay's line
//! ([`RelayClient::reserve`]) and is put back ([`AttemptResult::Defer`]: no attempt
//! counted, no rung used), due after the request timeout — by then a slot of the
//! relay's has been given back for sure. Each slot given back hands out the oldest
//! ticket, and that job is made due at once ([`hand_over`]), as soon as its deferral is
//! on disk.
//!
//! Reads: the job payload, the provider registry. Writes: the relay (HTTP), state
//! `webhook/delivered/{job}` with the ack, `webhook/totals/{relay}` ([`stats`]).
//!
//! Never stored, logged or sent: the full API key, the provider's secret, the bearer
//! token, the callback URL's query.

pub mod event;
pub(crate) mod sign;
pub mod stats;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use serde::Serialize;
use tokio::sync::broadcast;

pub use event::{ConnectEvent, Payload, Rejected, Status};

use crate::jobs;
use crate::peers::relays::Registry;
use crate::peers::relays::client::{RelayClient, Ticket};
use crate::queue::{
    AttemptResult, Commit, Dedupe, Effects, Handler, Job, NewJob, Queue, Stored, next_delay,
};
use crate::telemetry::metrics;

/// What an accepted event became: `202 {"job_id","event_id","duplicate"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accepted {
    pub job_id: u64,
    pub event_id: String,
    /// The event id was already accepted (within the dedupe window): `job_id` is that
    /// job, nothing new was stored.
    pub duplicate: bool,
}

/// Checks `event` and enqueues its callback; returns once the job is durable.
pub async fn ingest(
    queue: &Queue,
    registry: &Registry,
    event: ConnectEvent,
) -> Result<Accepted, Rejected> {
    let payload = event::validate(event, registry, queue.now())?;
    let enqueued = queue
        .enqueue_with(NewJob {
            kind: jobs::WEBHOOK,
            key: payload.event_id.clone(),
            payload: payload.encode(),
            not_before: None,
            dedupe: Dedupe::Window,
        })
        .await
        .map_err(|e| {
            if e.is_unwritable() {
                // The queue says why once, when it stops taking writes (and in /healthz).
                tracing::debug!(error = %e, "webhook event not stored");
            } else {
                tracing::error!(error = %e, "webhook event not stored");
            }
            Rejected {
                status: 503,
                code: "not_stored",
                field: None,
                detail: format!("the event was not stored, try again: {e}"),
            }
        })?;
    tracing::debug!(
        relay = %payload.relay_id,
        status = payload.status.as_str(),
        event_id = %payload.event_id,
        job = enqueued.job.id,
        duplicate = enqueued.duplicate,
        "webhook event accepted"
    );
    Ok(Accepted {
        job_id: enqueued.job.id,
        event_id: payload.event_id,
        duplicate: enqueued.duplicate,
    })
}

/// [`ingest`] of a JSON body (what the HTTP endpoint calls).
pub async fn ingest_json(
    queue: &Queue,
    registry: &Registry,
    body: &[u8],
) -> Result<Accepted, Rejected> {
    ingest(queue, registry, event::parse_json(body)?).await
}

/// The job that delivers `payload` (for programs that build payloads themselves).
pub fn job(payload: &Payload) -> NewJob {
    NewJob {
        kind: jobs::WEBHOOK,
        key: payload.event_id.clone(),
        payload: payload.encode(),
        not_before: None,
        dedupe: Dedupe::Window,
    }
}

/// The headers of one attempt. `now_secs` is the attempt's time (`webhook-timestamp`).
pub fn headers(
    p: &Payload,
    key: Option<&crate::peers::relays::SigningKey>,
    now_secs: u64,
    body: &[u8],
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Validated at ingestion: visible ASCII. A payload edited by hand to something
    // else gets no header rather than a panic.
    if let Ok(ua) = HeaderValue::from_str(&format!("ProxyCast/{}", p.client.version)) {
        h.insert(USER_AGENT, ua);
    }
    if let Ok(id) = HeaderValue::from_str(&p.event_id) {
        h.insert(HeaderName::from_static("webhook-id"), id);
    }
    if let Some(key) = key {
        h.insert(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(now_secs),
        );
        if let Ok(sig) = HeaderValue::from_str(&sign::signature(key, &p.event_id, now_secs, body)) {
            h.insert(HeaderName::from_static("webhook-signature"), sig);
        }
    }
    h
}

/// Runs webhook attempts.
pub struct Webhook {
    pub queue: Queue,
    pub registry: Arc<Registry>,
    pub client: Arc<RelayClient>,
}

fn retry(error: String) -> AttemptResult {
    AttemptResult::Retry {
        error,
        retry_after: None,
    }
}

impl Handler for Webhook {
    async fn run(&self, job: Job) -> AttemptResult {
        let p = match Payload::decode(&job.payload) {
            Ok(p) => p,
            Err(e) => return retry(e.to_string()),
        };
        let Some(provider) = self.registry.get(&p.relay_id) else {
            return self.failed(
                &job,
                &p,
                format!(
                    "relay `{}` is not registered (no valid {}/{}.json with a webhook section)",
                    p.relay_id,
                    self.registry.dir().display(),
                    p.relay_id
                ),
                None,
            );
        };
        let ticket = Ticket {
            id: job.id,
            n: job.attempts,
        };
        let slot = match self.client.reserve(&p.relay_id, None) {
            Some(slot) => slot,
            None => {
                // The only relay: waiting in the worker slot keeps it from no other
                // relay, and costs no deferral and no second lease. For at most the
                // request timeout (the longest a slot of the relay's stays taken), and
                // only while no other relay is registered.
                let waited = if self.only_relay() {
                    let at_most = self.client.timeout();
                    self.client
                        .wait_slot(&p.relay_id, at_most, || self.only_relay())
                        .await
                } else {
                    None
                };
                match waited.or_else(|| self.client.reserve(&p.relay_id, Some(ticket))) {
                    Some(slot) => slot,
                    None => return self.wait_for_relay(&p),
                }
            }
        };
        let body = p.body();
        let now_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let headers = headers(&p, provider.secret.as_ref(), now_secs, &body);
        let sent = self
            .client
            .post(&slot, &p.relay_id, &provider.callback_url, headers, body)
            .await;
        // The slot goes back now, and with it the turn of the oldest job waiting for
        // it: woken in this attempt's own write when its deferral is already on disk.
        let mut wake = Vec::new();
        if let Some(next) = slot.release() {
            if sent.is_ok() && turn(&self.queue, next) == Turn::Wake {
                wake.push(next.id);
            } else {
                tokio::spawn(hand_over(
                    self.queue.clone(),
                    self.client.clone(),
                    p.relay_id.clone(),
                    next,
                ));
            }
        }
        match sent {
            Ok(d) => {
                metrics::webhook_delivery(&p.relay_id, "delivered");
                tracing::info!(
                    relay = %p.relay_id,
                    event_id = %p.event_id,
                    job = job.id,
                    attempt = job.attempts,
                    status = d.status,
                    "callback delivered"
                );
                AttemptResult::DoneWith(Effects {
                    state: vec![stats::delivered(job.id, &p, self.queue.now())],
                    enqueue: Vec::new(),
                    note: Some(format!("relay answered {}", d.status)),
                    wake,
                })
            }
            Err(e) => self.failed(&job, &p, e.to_string(), e.retry_after()),
        }
    }
}

impl Webhook {
    /// At most one relay is registered: no other relay's callbacks can be waiting for a
    /// worker slot.
    fn only_relay(&self) -> bool {
        self.registry.snapshot().by_id.len() <= 1
    }

    /// The relay is at its limit: the job goes back, due after the request timeout (the
    /// longest any of the relay's slots can stay taken), and is woken sooner when its
    /// ticket is handed out.
    fn wait_for_relay(&self, p: &Payload) -> AttemptResult {
        let timeout = self.client.timeout();
        AttemptResult::Defer {
            until: self
                .queue
                .now()
                .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            why: format!(
                "relay {} has webhook.per_relay_concurrency callbacks in flight; waits off the worker pool for one to end",
                p.relay_id
            ),
        }
    }

    /// A failed attempt; says so loudly when it is the last one.
    fn failed(
        &self,
        job: &Job,
        p: &Payload,
        error: String,
        retry_after: Option<std::time::Duration>,
    ) -> AttemptResult {
        let settings = self.queue.settings().kind(jobs::WEBHOOK);
        let last = next_delay(settings, job.attempts, retry_after).is_none();
        metrics::webhook_delivery(&p.relay_id, if last { "dead" } else { "failed" });
        if last {
            tracing::error!(
                relay = %p.relay_id,
                event_id = %p.event_id,
                job = job.id,
                attempts = job.attempts,
                %error,
                "callback given up (dead); `queuectl retry {}` sends it again",
                job.id
            );
        }
        AttemptResult::Retry { error, retry_after }
    }
}

/// Where the job holding a handed-out ticket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Deferred (the lease's attempt given back) and on disk: wake it.
    Wake,
    /// Still in the attempt that found the relay busy: its deferral is not recorded yet.
    Wait,
    /// Moved on (delivered, failed, leased again, purged): the turn passes on.
    Gone,
}

fn turn(queue: &Queue, ticket: Ticket) -> Turn {
    match queue.get(ticket.id) {
        Ok(Some(job)) => match job.stored {
            Stored::Pending { .. } if job.attempts.saturating_add(1) == ticket.n => Turn::Wake,
            Stored::Running { .. } if job.attempts == ticket.n => Turn::Wait,
            _ => Turn::Gone,
        },
        Ok(None) => Turn::Gone,
        Err(e) => {
            tracing::debug!(job = ticket.id, error = %e, "cannot read a job waiting for its relay");
            Turn::Gone
        }
    }
}

/// The turn of the job holding `ticket` came (one of `relay`'s slots was given back)
/// and could not be given in the write of the attempt that gave the slot back: makes
/// the job due now, once its deferral is on disk (the worker records it after the
/// handler returned). A ticket whose job has moved on passes the turn to the next in
/// line. A turn lost on the way costs that job no more than its fallback (the request
/// timeout).
async fn hand_over(queue: Queue, client: Arc<RelayClient>, relay: String, mut ticket: Ticket) {
    let mut events = queue.subscribe();
    loop {
        match turn(&queue, ticket) {
            Turn::Wake => {
                let wake = Commit {
                    wake: vec![ticket.id],
                    ..Commit::default()
                };
                if let Err(e) = queue.commit(wake).await {
                    tracing::debug!(job = ticket.id, error = %e, "a job waiting for its relay is not woken; it runs at its fallback");
                }
                return;
            }
            Turn::Wait => {
                let id = ticket.id;
                let recorded = async {
                    loop {
                        match events.recv().await {
                            Ok(e) if e.id != id => {}
                            // This job's, or missed ones: look again.
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
                            Err(broadcast::error::RecvError::Closed) => return false,
                        }
                    }
                };
                if let Ok(false) = tokio::time::timeout(client.timeout(), recorded).await {
                    return;
                }
            }
            Turn::Gone => match client.next_waiting(&relay) {
                Some(next) => ticket = next,
                None => return,
            },
        }
    }
}
