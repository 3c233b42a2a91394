//! `xray-grpc` mode: the core's users live only in its memory, so a core restart wipes
//! every user the agent added. Every `sync.interval` the watcher reads the core's uptime;
//! when it went down (a restart) or the core answers again after being unreachable,
//! every node's apply is made due at once. The apply itself is a full reconcile, so it
//! puts back exactly what is missing.
//!
//! The same tick checks the bans being watched (`xray_apply::bans`): a removed user
//! whose traffic counters still grow is reported.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::node_sync::state;
use crate::jobs::xray_apply::{self, XrayApply};
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

pub async fn watch(
    queue: Queue,
    core: XrayClient,
    apply: Arc<XrayApply>,
    config: Arc<Config>,
    stop: CancellationToken,
) {
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
                check_bans(&queue, &core, &apply, &config).await;
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

/// Reports removed users that still carry traffic; one counter query for all nodes.
/// Each node's bans are updated under its apply lock, so an apply adding bans at the
/// same moment is not overwritten.
async fn check_bans(queue: &Queue, core: &XrayClient, apply: &XrayApply, config: &Config) {
    let watched: Vec<u64> = config
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| !xray_apply::bans::load(queue, *id).is_empty())
        .collect();
    if watched.is_empty() {
        return;
    }
    let bytes = match core.query_stats("user>>>", false).await {
        Ok(c) => xray_apply::bans::user_bytes(&c),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read counters to check bans");
            return;
        }
    };
    for node in watched {
        let lock = apply.lock_for(node);
        let _serial = lock.lock().await;
        let mut bans = xray_apply::bans::load(queue, node);
        for (email, ban) in xray_apply::bans::check(&mut bans, &bytes, queue.now()) {
            xray_apply::bans::warn(node, &email, &ban);
        }
        let commit = crate::queue::Commit {
            state: vec![xray_apply::bans::put(node, &bans)],
            ..Default::default()
        };
        if let Err(e) = queue.commit(commit).await {
            tracing::error!(node, error = %e, "cannot record ban checks");
        }
    }
}
