//! The producer of `node_sync` jobs: a sync per node every `sync.interval`.
//!
//! Reads: the node's sync job (`node-{id}`). Writes: enqueues or retries it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::node_key;
use crate::queue::{self, DeadReason, JobState, Queue, Stored};

/// Makes a sync due for every node every `sync.interval`. Each node has one sync job
/// at a time ([`Dedupe::Live`](crate::queue::Dedupe)):
///
/// - none, or the last one is done: a new one;
/// - one waiting on its ladder after a failure: due now — a panel that recovers is
///   read again within one interval, as SPEC promises, not after the ladder's minutes
///   (the ladder still spaces retries shorter than the interval);
/// - one that went dead on its ladder (the panel has been failing for a while): that
///   same job again, so an outage leaves one dead job per node — visible in `queuectl`,
///   its history showing the failures — not a new dead job every few intervals.
pub(crate) async fn run(queue: Queue, config: Arc<Config>, stop: CancellationToken) {
    if config.nodes.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(config.sync.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for node in &config.nodes {
            match make_sync_due(&queue, node.id).await {
                Ok(()) => {}
                // A full disk: said once by the queue; the sync goes on without it.
                Err(e) if e.is_unwritable() => {
                    tracing::debug!(node = node.id, error = %e, "cannot schedule a sync")
                }
                Err(e) => tracing::error!(node = node.id, error = %e, "cannot schedule a sync"),
            }
        }
    }
}

/// Makes node `node_id`'s sync due now: a scheduled (or exhausted) one runs at once, one
/// already due or running is left as is (they coalesce), and none makes one.
pub(crate) async fn make_sync_due(queue: &Queue, node_id: u64) -> queue::Result<()> {
    let revive = match queue.find_key(crate::jobs::NODE_SYNC, &node_key(node_id))? {
        Some(job) => match (job.state(queue.now()), &job.stored) {
            (JobState::Scheduled, _) => Some(job.id),
            (
                JobState::Dead,
                Stored::Dead {
                    reason: DeadReason::Exhausted,
                    ..
                },
            ) => Some(job.id),
            (JobState::Ready | JobState::Running, _) => return Ok(()),
            _ => None,
        },
        None => None,
    };
    match revive {
        // It may have been leased meanwhile; then it runs now anyway.
        Some(id) => match queue.retry(id).await {
            Ok(_) | Err(queue::Error::InvalidState { .. }) => Ok(()),
            Err(e) => Err(e),
        },
        None => queue.enqueue_with(super::job(node_id)).await.map(|_| ()),
    }
}
