//! `xray-grpc` mode: the core's users live only in its memory, so a core restart wipes
//! every user the agent added. Every `sync.interval` the watcher asks the core:
//!
//! - its uptime: lower than last time, or lower than the time since then allows (a
//!   restart), or the core answers again after being unreachable (perhaps restarted):
//!   every node is re-applied at once, sending every user again where the core cannot
//!   list them (V2Ray);
//! - otherwise, per node whose last apply went through, whether the core still has one
//!   user the agent added and the panel still lists. That catches what the uptime
//!   cannot show — a core restarted within its first second (uptime is whole seconds),
//!   users removed by hand — and re-applies the node in full. Xray answers from its
//!   user list; V2Ray cannot list, so the user is added again, under the node's apply
//!   lock: "already exists" means it was there.
//!
//! The apply itself is a full reconcile, so it puts back exactly what is missing.
//!
//! The same tick checks the bans being watched (`xray_apply::bans`): a removed user
//! the core still lists online (Xray, `statsUserOnline`), or else whose traffic
//! counters still grow, is reported; the gauge `connector_bans_not_biting` counts them.
//! A restart (or the core back after being unreachable) makes the client ask again
//! which online methods the core has: it may be another build.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Node};
use crate::jobs;
use crate::jobs::node_key;
use crate::jobs::node_sync::state;
use crate::jobs::state::StateError;
use crate::jobs::xray_apply::{self, XrayApply, grpc};
use crate::peers::xray::email::email_for;
use crate::peers::xray::{Added, XrayClient, XrayError};
use crate::queue::{JobState, Queue};
use crate::telemetry::metrics;

/// Why an apply could not be made due, or a node's core could not be checked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Queue(#[from] crate::queue::Error),
    #[error("{0}")]
    Core(#[from] XrayError),
    #[error("{0}")]
    User(#[from] grpc::UserError),
}

/// Makes `node_id`'s apply due now (coalescing with a pending one), if it has a list.
pub(crate) async fn apply_now(queue: &Queue, node_id: u64) -> Result<(), WatchError> {
    let generation = state::load(queue, node_id)?.generation;
    if generation == 0 {
        return Ok(());
    }
    let e = queue
        .enqueue_with(xray_apply::job(node_id, generation))
        .await?;
    if e.job.state(queue.now()) == JobState::Scheduled {
        match queue.retry(e.job.id).await {
            Ok(_) | Err(crate::queue::Error::InvalidState { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Re-applies every node.
pub(crate) async fn apply_all(queue: &Queue, config: &Config, why: &str) {
    for node in &config.nodes {
        if let Err(e) = apply_now(queue, node.id).await {
            tracing::error!(node = node.id, error = %e, "cannot schedule an apply ({why})");
        }
    }
}

pub(crate) async fn watch(
    queue: Queue,
    core: XrayClient,
    apply: Arc<XrayApply>,
    config: Arc<Config>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.sync.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(u32, Instant)> = None;
    let mut down = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match core.uptime().await {
            Ok(uptime) => {
                let now = Instant::now();
                let restarted = last.is_some_and(|(before, at)| restarted(before, at, uptime, now));
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
                    core.reprobe();
                    for node in &config.nodes {
                        apply.resend(node.id);
                    }
                    apply_all(&queue, &config, "core restart").await;
                } else {
                    check_users(&queue, &core, &apply, &config).await;
                }
                last = Some((uptime, now));
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

/// Whether a core that read `before` seconds of uptime at `then` was restarted by the
/// time it reads `uptime` at `now`. One run's uptime never goes down, and grows with
/// the time between readings; each reading is truncated to whole seconds and taken
/// somewhere within its call, hence the slack.
fn restarted(before: u32, then: Instant, uptime: u32, now: Instant) -> bool {
    const SLACK_SECS: f64 = 2.0;
    let expected = f64::from(before) + now.saturating_duration_since(then).as_secs_f64();
    uptime < before || f64::from(uptime) + SLACK_SECS < expected
}

/// Re-applies in full the nodes whose core lost a user the agent added.
async fn check_users(queue: &Queue, core: &XrayClient, apply: &XrayApply, config: &Config) {
    for node in &config.nodes {
        match lost_users(queue, core, apply, config, node).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(
                    node = node.id,
                    core = core.addr(),
                    tag = node.inbound_tag.as_str(),
                    "the core lost users the agent had added (restarted, or removed by hand): re-applying the node"
                );
                apply.resend(node.id);
                if let Err(e) = apply_now(queue, node.id).await {
                    tracing::error!(node = node.id, error = %e, "cannot schedule an apply (users lost)");
                }
            }
            Err(e) => tracing::debug!(node = node.id, error = %e, "cannot check the core's users"),
        }
    }
}

/// Whether the core no longer has a user the agent added to `node` and the panel still
/// lists. Only asked when the node's last apply went through and none is pending or
/// running: a failing apply retries on its own ladder, not every tick.
async fn lost_users(
    queue: &Queue,
    core: &XrayClient,
    apply: &XrayApply,
    config: &Config,
    node: &Node,
) -> Result<bool, WatchError> {
    let Some(xray) = &config.xray else {
        return Ok(false);
    };
    let job = queue.find_key(jobs::XRAY_APPLY, &node_key(node.id))?;
    if job.is_some_and(|j| j.state(queue.now()) != JobState::Done) {
        return Ok(false);
    }
    // While an apply runs, it is the one to ask; and V2Ray's probe below adds a user,
    // which must not race an apply removing it.
    let lock = apply.lock_for(node.id);
    let Ok(_serial) = lock.try_lock() else {
        return Ok(false);
    };
    let synced = state::load(queue, node.id)?;
    let managed = grpc::load_managed(queue, node.id)?;
    let Some((user, email)) = synced
        .users
        .iter()
        .map(|u| (u, email_for(&xray.email_template, node.id, u.uuid)))
        .find(|(_, email)| managed.emails.contains(email))
    else {
        return Ok(false);
    };
    let tag = node.inbound_tag.as_str();
    match core.has_user(tag, &email).await? {
        Some(has) => Ok(!has),
        None => {
            let user = grpc::core_user(core, xray, node, user)?;
            match core.add_user(tag, &user).await? {
                Added::Existed => Ok(false),
                Added::New => Ok(true),
            }
        }
    }
}

/// Reports removed users still online, or else still carrying traffic; one counter
/// query and one online query for all nodes. Each node's bans are updated under its
/// apply lock, so an apply adding bans at the same moment is not overwritten.
async fn check_bans(queue: &Queue, core: &XrayClient, apply: &XrayApply, config: &Config) {
    let mut watched = Vec::new();
    let mut users = Vec::new();
    for node in &config.nodes {
        match xray_apply::bans::load(queue, node.id) {
            Ok(bans) if bans.is_empty() => metrics::bans_not_biting(node.id, 0),
            Ok(bans) => {
                users.extend(bans.iter().map(|(e, b)| (e.clone(), b.source)));
                watched.push(node.id);
            }
            Err(e) => tracing::warn!(node = node.id, error = %e, "cannot check the node's bans"),
        }
    }
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
    let online = match xray_apply::bans::online(core, &users).await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the core who is online to check bans");
            return;
        }
    };
    for node in watched {
        let lock = apply.lock_for(node);
        let _serial = lock.lock().await;
        let mut bans = match xray_apply::bans::load(queue, node) {
            Ok(bans) => bans,
            Err(e) => {
                tracing::warn!(node, error = %e, "cannot check the node's bans");
                continue;
            }
        };
        let checked = xray_apply::bans::check(&mut bans, &bytes, &online, queue.now());
        for (email, ban) in &checked.newly {
            xray_apply::bans::warn(node, email, ban);
        }
        for (email, ban) in &checked.bit {
            xray_apply::bans::bit(node, email, ban);
        }
        metrics::bans_not_biting(node, bans.values().filter(|b| !b.biting()).count());
        // A write (a flush) under the node's lock delays its applies: only when it
        // says something new.
        if !checked.changed {
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn restarts_from_uptime() {
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        // One run: the uptime grows with the time between readings (truncated).
        assert!(!restarted(0, at(0.0), 0, at(0.2)));
        assert!(!restarted(7, at(0.0), 7, at(0.9)));
        assert!(!restarted(7, at(0.0), 17, at(10.5)));
        assert!(
            !restarted(7, at(0.0), 16, at(10.9)),
            "truncation and latency"
        );
        // It went down: a restart, however short the wait.
        assert!(restarted(1, at(0.0), 0, at(0.2)));
        // Ten seconds later it reads 3: a restart, though 3 > 1.
        assert!(restarted(1, at(0.0), 3, at(10.0)));
    }
}
