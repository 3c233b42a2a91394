//! The daemon on a full disk, or with its database deleted (SPEC §4, "Faults the agent
//! survives"). The queue decides whether it takes writes (`crate::queue`, `store.rs`);
//! here:
//!
//! - [`watch`] probes it every [`PROBE_EVERY`]: a deleted or replaced database, the
//!   free space, and (once space is back) opening it again; it sets the
//!   `connector_queue_writable` gauge. `/healthz` reads the same state.
//! - [`sync_while_unwritable`] keeps node sync and apply going while the queue takes no
//!   writes: every `sync.interval` each node's list is read from the panel, its files
//!   written to `output_dir` (often another filesystem) and, when it changed, applied
//!   (hook or core) — from a copy of the last recorded list kept in memory. Nothing of
//!   it is recorded; once writes are taken again the queue's own syncs pick up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::node_sync::{NodeSync, state};
use crate::jobs::xray_apply::XrayApply;
use crate::queue::Queue;
use crate::telemetry::metrics;

/// How often the disk is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Probes the queue's disk until `stop`.
pub async fn watch(queue: Queue, stop: CancellationToken) {
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

/// Syncs and applies every node without the queue while it takes no writes.
pub async fn sync_while_unwritable(
    queue: Queue,
    sync: Arc<NodeSync>,
    apply: Arc<XrayApply>,
    config: Arc<Config>,
    stop: CancellationToken,
) {
    // The last list of each node, while the queue refuses writes.
    let mut lists: BTreeMap<u64, state::SyncState> = BTreeMap::new();
    let mut tick = tokio::time::interval(config.sync.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if queue.writability().writable() {
            if !lists.is_empty() {
                tracing::info!("the queue takes writes again: node sync goes through it again");
                lists.clear();
            }
            continue;
        }
        if lists.is_empty() {
            tracing::warn!(
                nodes = config.nodes.len(),
                "the queue takes no writes: node sync and apply go on without it, from the last list (nothing is recorded until it takes writes again)"
            );
        }
        for node in &config.nodes {
            let st = match lists.get_mut(&node.id) {
                Some(st) => st,
                None => {
                    // The last recorded list; reads work while writes are refused.
                    let loaded = state::load(&queue, node.id).unwrap_or_else(|e| {
                        tracing::warn!(node = node.id, error = %e, "cannot read the node's last list; starting from none");
                        state::SyncState::default()
                    });
                    lists.entry(node.id).or_insert(loaded)
                }
            };
            match sync.sync_volatile(node.id, st).await {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = apply.apply_volatile(node.id, st).await {
                        tracing::warn!(node = node.id, error = %e, "apply failed (queue takes no writes); the next sync tries again");
                        // Applied again at the next sync, as if the list had changed.
                        st.generation = st.generation.saturating_sub(1);
                    }
                }
                Err(e) => {
                    tracing::debug!(node = node.id, error = %e, "sync without the queue failed; the last list stays in force")
                }
            }
        }
    }
}
