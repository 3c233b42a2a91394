//! Per relay and per `ref`: connect events by status (success / cancelled / error) and
//! what became of their callbacks (delivered / pending / dead).
//!
//! # How it is counted, exactly once and cheaply
//!
//! Every accepted event is one webhook job, and every job is pending (or running),
//! dead, or done. So:
//!
//! - **delivered** callbacks are counted with the ack: the successful attempt commits a
//!   small record `webhook/delivered/{job id}` in the same atomic write that makes the
//!   job done ([`delivered`]). No read-modify-write, so concurrent deliveries never
//!   lose a count, and a crash either has the job done *and* counted, or neither.
//!   [`fold`] (the daemon, every few seconds) adds those records into one total per
//!   relay, `webhook/totals/{relay}`, and deletes them, in one atomic write; it is the
//!   only writer of the totals.
//! - **pending** and **dead** callbacks are read live from the queue's indexes
//!   ([`Queue::unfinished_and_dead`]): what is dead right now is what `queuectl retry`
//!   can bring back, and a dead callback retried and delivered moves from one column
//!   to the other.
//! - **events** of a status = delivered + pending + dead callbacks of that status.
//!   Purging dead jobs forgets their events.
//!
//! Both records are the kinds' state codec (`jobs::state`: a version byte, then bincode 2) of the struct;
//! documented in `queue-schema/README.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::event::{Payload, Status};
use crate::jobs;
use crate::jobs::state::{decode, encode};
use crate::peers::relays::{self, Providers};
use crate::queue::{self, Commit, JobState, Millis, Queue, StateWrite, rfc3339};

const DELIVERED_PREFIX: &str = "webhook/delivered/";
const TOTALS_PREFIX: &str = "webhook/totals/";

fn totals_key(relay: &str) -> String {
    format!("{TOTALS_PREFIX}{relay}")
}

/// One delivered callback, until [`fold`] adds it to its relay's totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredRecord {
    pub relay_id: String,
    pub ref_: Option<String>,
    pub status: Status,
    pub at_ms: Millis,
}

/// Delivered callbacks of one relay, by ref (`None`: no ref) and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub by_ref: BTreeMap<Option<String>, [u64; 3]>,
    pub last_delivered_ms: Option<Millis>,
}

fn index(s: Status) -> usize {
    match s {
        Status::Success => 0,
        Status::Cancelled => 1,
        Status::Error => 2,
    }
}

/// The state write that counts job `job_id` as delivered; goes with its ack.
pub fn delivered(job_id: u64, p: &Payload, at_ms: Millis) -> StateWrite {
    StateWrite::Put(
        format!("{DELIVERED_PREFIX}{job_id:020}"),
        encode(&DeliveredRecord {
            relay_id: p.relay_id.clone(),
            ref_: p.ref_.clone(),
            status: p.status,
            at_ms,
        }),
    )
}

/// Adds the delivered records into the relays' totals and deletes them, in one write.
/// Only one fold may run at a time (the daemon runs one task). Returns how many.
pub async fn fold(queue: &Queue) -> queue::Result<usize> {
    let records = queue.state_scan(DELIVERED_PREFIX)?;
    if records.is_empty() {
        return Ok(0);
    }
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    let mut writes = Vec::with_capacity(records.len() + 4);
    for (name, bytes) in &records {
        writes.push(StateWrite::Delete(name.clone()));
        let r: DeliveredRecord = match decode(name, bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(record = %name, error = %e, "webhook stats: record dropped");
                continue;
            }
        };
        if !totals.contains_key(&r.relay_id) {
            let t = load_totals(queue, &r.relay_id)?;
            totals.insert(r.relay_id.clone(), t);
        }
        if let Some(t) = totals.get_mut(&r.relay_id) {
            add(t, &r);
        }
    }
    for (relay, t) in &totals {
        writes.push(StateWrite::Put(totals_key(relay), encode(t)));
    }
    queue
        .commit(Commit {
            state: writes,
            ..Default::default()
        })
        .await?;
    Ok(records.len())
}

fn add(t: &mut Totals, r: &DeliveredRecord) {
    t.by_ref.entry(r.ref_.clone()).or_default()[index(r.status)] += 1;
    t.last_delivered_ms = t.last_delivered_ms.max(Some(r.at_ms));
}

fn load_totals(queue: &Queue, relay: &str) -> queue::Result<Totals> {
    Ok(match queue.state(&totals_key(relay))? {
        Some(bytes) => decode(&totals_key(relay), &bytes).unwrap_or_else(|e| {
            tracing::error!(relay, error = %e, "webhook totals unreadable; counting from zero");
            Totals::default()
        }),
        None => Totals::default(),
    })
}

/// Counts of one (relay, ref).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Events by status.
    pub success: u64,
    pub cancelled: u64,
    pub error: u64,
    /// Callbacks by fate.
    pub delivered: u64,
    pub pending: u64,
    pub dead: u64,
}

impl Counts {
    fn event(&mut self, s: Status) {
        match s {
            Status::Success => self.success += 1,
            Status::Cancelled => self.cancelled += 1,
            Status::Error => self.error += 1,
        }
    }

    fn merge(&mut self, o: &Counts) {
        self.success += o.success;
        self.cancelled += o.cancelled;
        self.error += o.error;
        self.delivered += o.delivered;
        self.pending += o.pending;
        self.dead += o.dead;
    }
}

/// One relay's stats: `queuectl relays`, and later the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStats {
    pub relay_id: String,
    /// Registered now (a valid provider file with a webhook section).
    pub registered: bool,
    /// `callback_url` with its password and query values masked; absent when not registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Callbacks carry a Standard Webhooks signature.
    pub signed: bool,
    pub last_delivered: Option<String>,
    pub total: Counts,
    /// By `ref`; the key `""` is events without one.
    pub refs: BTreeMap<String, Counts>,
}

/// Every relay's stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub relays: Vec<RelayStats>,
    /// Provider files that were skipped, as `path: field: reason`.
    pub provider_errors: Vec<String>,
}

fn relay_entry<'a>(relays: &'a mut BTreeMap<String, RelayStats>, id: &str) -> &'a mut RelayStats {
    relays.entry(id.to_string()).or_insert_with(|| RelayStats {
        relay_id: id.to_string(),
        ..Default::default()
    })
}

/// Reads the stats: folded totals, records not yet folded, and the live pending and
/// dead jobs. `providers`: the registry, so registered relays without events show too.
pub fn report(queue: &Queue, providers: Option<&Providers>) -> queue::Result<Report> {
    let mut relays: BTreeMap<String, RelayStats> = BTreeMap::new();
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for (name, bytes) in queue.state_scan(TOTALS_PREFIX)? {
        let relay = name[TOTALS_PREFIX.len()..].to_string();
        match decode::<Totals>(&name, &bytes) {
            Ok(t) => {
                totals.insert(relay, t);
            }
            Err(e) => tracing::warn!(error = %e, "webhook stats: totals left out"),
        }
    }
    for (name, bytes) in queue.state_scan(DELIVERED_PREFIX)? {
        match decode::<DeliveredRecord>(&name, &bytes) {
            Ok(r) => add(totals.entry(r.relay_id.clone()).or_default(), &r),
            Err(e) => tracing::warn!(error = %e, "webhook stats: record left out"),
        }
    }
    for (relay, t) in &totals {
        let rs = relay_entry(&mut relays, relay);
        rs.last_delivered = t.last_delivered_ms.map(rfc3339);
        for (r, counts) in &t.by_ref {
            let c = rs.refs.entry(r.clone().unwrap_or_default()).or_default();
            for s in Status::ALL {
                let n = counts[index(s)];
                match s {
                    Status::Success => c.success += n,
                    Status::Cancelled => c.cancelled += n,
                    Status::Error => c.error += n,
                }
                c.delivered += n;
            }
        }
    }
    let now = queue.now();
    for job in queue.unfinished_and_dead(jobs::WEBHOOK)? {
        let Ok(p) = Payload::decode(&job.payload) else {
            continue;
        };
        let c = relay_entry(&mut relays, &p.relay_id)
            .refs
            .entry(p.ref_.clone().unwrap_or_default())
            .or_default();
        c.event(p.status);
        match job.state(now) {
            JobState::Dead => c.dead += 1,
            JobState::Done => c.delivered += 1,
            _ => c.pending += 1,
        }
    }
    let mut provider_errors = Vec::new();
    if let Some(p) = providers {
        for (id, prov) in &p.by_id {
            let rs = relay_entry(&mut relays, id);
            rs.registered = true;
            rs.callback_url = Some(relays::redacted(&prov.callback_url));
            rs.signed = prov.secret.is_some();
        }
        provider_errors = p.errors.iter().map(|e| e.to_string()).collect();
    }
    let relays = relays
        .into_values()
        .map(|mut r| {
            let mut total = Counts::default();
            for c in r.refs.values() {
                total.merge(c);
            }
            r.total = total;
            r
        })
        .collect();
    Ok(Report {
        relays,
        provider_errors,
    })
}

/// How often the daemon folds delivered records into the totals.
pub const FOLD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds every [`FOLD_EVERY`] until `stop` (and once at the start: a previous run may
/// have left records).
pub async fn run_fold(queue: Queue, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(FOLD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = fold(&queue).await {
            tracing::warn!(error = %e, "webhook stats: fold failed; retried later");
        }
    }
}
