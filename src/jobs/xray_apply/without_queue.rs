//! Node sync and apply while the queue takes no writes (a full disk, a deleted
//! database: `daemon/disk.rs` probes it): every `sync.interval` each node's list is read
//! from the panel, its files written to `output_dir` (often another filesystem) and,
//! when it changed, applied (hook or core) — from a copy of the last recorded list kept
//! in memory. Nothing of it is recorded; once writes are taken again the queue's own
//! syncs pick up.
//!
//! It lives with `xray_apply` because it drives both kinds and this one already
//! depends on `node_sync` (its list and files), never the reverse.
//!
//! Reads: state `node/{id}/sync` (reads work while writes are refused), the panel.
//! Writes: the output files, the core or the hook; nothing in the queue.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::XrayApply;
use crate::config::Config;
use crate::jobs::node_sync::{NodeSync, state};
use crate::queue::Queue;

/// Syncs and applies every node without the queue while it takes no writes.
pub(crate) async fn run(
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
