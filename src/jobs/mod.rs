//! The job kinds. Each module says what one job does, what it reads, and what it may
//! write; the queue knows them only as a [`JobKind`](crate::queue::JobKind) and opaque
//! payload bytes (JSON here, so `queuectl` can show them).
//!
//! A kind's folder holds what produces its jobs, its handler, its state records (keys
//! declared once there, encoded with [`state`]) and its watchers; the daemon only
//! builds and spawns them.
//!
//! | kind | module | produced by | reads | writes |
//! |---|---|---|---|---|
//! | `node_sync` | [`node_sync`] | `schedule.rs` (every `sync.interval`; `xray_apply/without_queue.rs` while the queue takes no writes) | the panel | `{output_dir}/node-{id}/*`, state `node/{id}/sync`, enqueues `xray_apply` |
//! | `xray_apply` | [`xray_apply`] | `node_sync`; `core_watch.rs` (a core restart, lost users) | state `node/{id}/sync`, the output files, the core | runs the hook or the core's API; state `node/{id}/applied`, `node/{id}/managed`, `node/{id}/bans` |
//! | `traffic_report` | [`traffic_report`] | `collector.rs` (every `traffic.interval`) | the core's counters (collection); its own jobs | state `traffic/*`, enqueues `traffic_report`; the panel's report endpoint |
//! | `webhook` | [`webhook`] | the HTTP listener (`daemon::http`) | the job's event, the provider registry | POSTs to the relay; state `webhook/delivered/{job}`, `webhook/totals/{relay}` |

pub mod node_sync;
pub mod state;
pub mod traffic_report;
pub mod webhook;
pub mod xray_apply;

use crate::queue::{Dedupe, JobKind, NewJob};

/// The key of a node's job (the same for every kind that works per node).
pub fn node_key(node_id: u64) -> String {
    format!("node-{node_id}")
}

/// The `xray_apply` job for a node's synced list of `generation`. Here rather than in
/// `xray_apply` because `node_sync` enqueues it, and `xray_apply` reads `node_sync`'s
/// state: kinds depend on each other one way only.
pub fn apply_job(node_id: u64, generation: u64) -> NewJob {
    NewJob {
        kind: JobKind::XrayApply,
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
