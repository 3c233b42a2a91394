//! The job kinds. Each module says what one job does, what it reads, and what it may
//! write; the queue knows them only as the [`JobKind`](crate::queue::JobKind)s declared here
//! (code and name; [`settings`] gives it their ladders and concurrency) and opaque
//! payload bytes (JSON here, so `queuectl` can show them).
//!
//! A kind's folder holds what produces its jobs, its handler, its state records (keys
//! declared once there, encoded with [`state`]) and its watchers; the daemon only
//! builds and spawns them.
//!
//! | kind | module | produced by | reads | writes |
//! |---|---|---|---|---|
//! | `node_sync` | [`node_sync`] | `schedule.rs` (every `sync.interval`, and at once on the panel's `POST /v1/nodes/{id}/sync`; `xray_apply/without_queue.rs` while the queue takes no writes) | the panel | `{output_dir}/node-{id}/*`, state `node/{id}/sync`, enqueues `xray_apply` |
//! | `xray_apply` | [`xray_apply`] | `node_sync`; `core_watch.rs` (a core restart, lost users; it also watches the bans) | state `node/{id}/sync`, the output files, the core (users, online lists, counters), the core's access log (`connections.rs`, a watcher), the kernel's socket table | runs the hook or the core's API; destroys a removed user's sockets (`cut.rs`); state `node/{id}/applied`, `node/{id}/managed`, `node/{id}/bans` |
//! | `traffic_report` | [`traffic_report`] | `collector.rs` (every `traffic.interval`) | the core's counters (collection); its own jobs | state `traffic/*`, enqueues `traffic_report`; the panel's report endpoint |
//! | `webhook` | [`webhook`] | the HTTP listener (`daemon::http`) | the job's event, the provider registry | POSTs to the relay; state `webhook/delivered/{job}`, `webhook/totals/{relay}` |

pub mod node_sync;
pub(crate) mod state;
pub mod traffic_report;
pub mod webhook;
pub mod xray_apply;

use crate::queue::{Dedupe, JobKind, NewJob};

use std::time::Duration;

use crate::queue::{KindSettings, OnExhausted, Settings};

// The codes are part of the on-disk key layout (`queue-schema/`): never reuse or
// renumber one.
/// Fetch one node's allowed-UUID list from the panel.
pub const NODE_SYNC: JobKind = JobKind::new(1, "node_sync");
/// Make one node's Xray/V2Ray inbound users equal the synced list.
pub const XRAY_APPLY: JobKind = JobKind::new(2, "xray_apply");
/// Deliver one batch of per-user traffic deltas to the panel.
pub const TRAFFIC_REPORT: JobKind = JobKind::new(3, "traffic_report");
/// Deliver one ProxyCast Connect callback to a relay.
pub const WEBHOOK: JobKind = JobKind::new(4, "webhook");

/// Every kind the product runs, by code.
pub const ALL: [JobKind; 4] = [NODE_SYNC, XRAY_APPLY, TRAFFIC_REPORT, WEBHOOK];

/// A kind name that is none of ours (config, `queuectl`, the admin API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job kind `{0}` (expected node_sync, xray_apply, traffic_report or webhook)")]
pub struct UnknownKind(pub String);

/// The kind named `name` (config, `queuectl`).
pub fn kind_named(name: &str) -> Result<JobKind, UnknownKind> {
    ALL.into_iter()
        .find(|k| k.as_str() == name)
        .ok_or_else(|| UnknownKind(name.to_string()))
}

/// SPEC §2 defaults: `0s, 1m, 5m, 30m`; `dead` for webhook and node_sync,
/// `repeat-last` for traffic_report and xray_apply.
pub fn default_settings(kind: JobKind) -> KindSettings {
    let ladder = vec![
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_secs(5 * 60),
        Duration::from_secs(30 * 60),
    ];
    let (on_exhausted, concurrency, lease) = match kind {
        XRAY_APPLY => (OnExhausted::RepeatLast, 2, 600),
        TRAFFIC_REPORT => (OnExhausted::RepeatLast, 2, 120),
        WEBHOOK => (OnExhausted::Dead, 32, 60),
        // node_sync, and any kind not listed.
        _ => (OnExhausted::Dead, 4, 120),
    };
    KindSettings {
        ladder,
        on_exhausted,
        concurrency,
        // Callbacks are many and short: a slot waiting for its next lease's flush was
        // most of a delivery's time. The others run few, long attempts per node.
        lease_ahead: if kind == WEBHOOK { concurrency } else { 0 },
        lease_timeout: Duration::from_secs(lease),
        keep_done: None,
    }
}

/// The queue's settings with every kind at its defaults and a one-day dedupe window.
pub fn settings() -> Settings {
    Settings::new(
        Duration::from_secs(24 * 3600),
        ALL.map(|k| (k, default_settings(k))),
    )
}

/// The key of a node's job (the same for every kind that works per node).
pub fn node_key(node_id: u64) -> String {
    format!("node-{node_id}")
}

/// The `xray_apply` job for a node's synced list of `generation`. Here rather than in
/// `xray_apply` because `node_sync` enqueues it, and `xray_apply` reads `node_sync`'s
/// state: kinds depend on each other one way only.
pub fn apply_job(node_id: u64, generation: u64) -> NewJob {
    NewJob {
        kind: XRAY_APPLY,
        key: node_key(node_id),
        payload: NodePayload {
            node_id,
            generation: Some(generation),
        }
        .encode(),
        not_before: None,
        dedupe: Dedupe::Replace,
    }
}

/// The payload of per-node jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodePayload {
    pub node_id: u64,
    /// For `xray_apply`: the synced list's generation this apply was enqueued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl NodePayload {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of two integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        serde_json::from_slice(bytes).map_err(|source| PayloadError {
            what: "job",
            source,
        })
    }
}

/// A job's payload that does not decode: written by another build, or damaged. The
/// attempt fails with it (the queue keeps the job for an operator to see).
#[derive(Debug, thiserror::Error)]
#[error("bad {what} payload: {source}")]
pub struct PayloadError {
    /// What the payload is of (`job`, `traffic report`, `webhook job`).
    pub what: &'static str,
    #[source]
    pub source: serde_json::Error,
}
