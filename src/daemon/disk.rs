//! The daemon on a full disk, or with its database deleted (SPEC §4, "Faults the agent
//! survives"). The queue decides whether it takes writes (`crate::queue`, `store.rs`);
//! here:
//!
//! - [`watch`] probes it every [`PROBE_EVERY`]: a deleted or replaced database, the
//!   free space, and (once space is back) opening it again; it sets the
//!   `connector_queue_writable` gauge. `/healthz` reads the same state.
//! - node sync and apply go on without the queue meanwhile: that is node sync's own
//!   work (`jobs/xray_apply/without_queue.rs`), spawned beside this probe.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::queue::Queue;
use crate::telemetry::metrics;

/// How often the disk is probed.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Probes the queue's disk until `stop`.
pub(super) async fn watch(queue: Queue, stop: CancellationToken) {
    loop {
        let q = queue.clone();
        if let Ok(w) = tokio::task::spawn_blocking(move || q.probe()).await {
            metrics::queue_writable(w.writable());
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}
