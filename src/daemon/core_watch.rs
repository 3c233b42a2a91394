//! `xray-grpc` mode: the core's users live only in its memory, so a core restart wipes
//! every user the agent added. Every `sync.interval` the watcher reads the core's uptime;
//! when it went down (a restart) or the core answers again after being unreachable,
//! every node's apply is made due at once. The apply itself is a full reconcile, so it
//! puts back exactly what is missing.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::node_sync::state;
use crate::jobs::xray_apply;
use crate::peers::xray::XrayClient;
use crate::queue::{JobState, Queue};

/// Makes `node_id`'s apply due now (coalescing with a pending one), if it has a list.
pub async fn apply_now(queue: &Queue, node_id: u64) -> Result<(), String> {
    let generation = state::load(queue, node_id)?.generation;
    if generation == 0 {
        return Ok(());
    }
    let e = queue
        .enqueue_with(xray_apply::job(node_id, generation))
        .await
        .map_err(|e| e.to_string())?;
    if e.job.state(queue.now()) == JobState::Scheduled {
        match queue.retry(e.job.id).await {
            Ok(_) | Err(crate::queue::Error::InvalidState { .. }) => {}
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(())
}

/// Re-applies every node.
pub async fn apply_all(queue: &Queue, config: &Config, why: &str) {
    for node in &config.nodes {
        if let Err(e) = apply_now(queue, node.id).await {
            tracing::error!(node = node.id, error = %e, "cannot schedule an apply ({why})");
        }
    }
}

pub async fn watch(queue: Queue, core: XrayClient, config: Arc<Config>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(config.sync.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_boot: Option<u64> = None;
    let mut down = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match core.uptime().await {
            Ok(uptime) => {
                let boot = queue.now().saturating_sub(u64::from(uptime) * 1000);
                let restarted = last_boot.is_some_and(|b| b.abs_diff(boot) > 5_000);
                if restarted || down {
                    tracing::warn!(
                        core = core.addr(),
                        uptime,
                        "the core {}: re-applying every node",
                        if restarted {
                            "restarted"
                        } else {
                            "is reachable again"
                        }
                    );
                    apply_all(&queue, &config, "core restart").await;
                }
                last_boot = Some(boot);
                down = false;
            }
            Err(e) => {
                if !down {
                    tracing::warn!(core = core.addr(), error = %e, "the core's API is unreachable; applies wait for it");
                }
                down = true;
            }
        }
    }
}
