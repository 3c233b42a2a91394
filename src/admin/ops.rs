//! Every admin operation, as a function of the queue and the config: the daemon's
//! server calls these for a request that came over the socket, and `queuectl` calls
//! them itself when no daemon runs. Each takes the context by value (it is two `Arc`s),
//! so the server can hand it to a blocking thread.
//!
//! Reads that scan the database are plain functions (the server runs them on a blocking
//! thread); operations that write are `async`: they return once the change is on disk.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::convert::{parse, parse_kind, status};
use super::pb;
use crate::config::Config;
use crate::jobs::node_sync::state as sync_state;
use crate::jobs::traffic_report;
use crate::jobs::xray_apply::bans;
use crate::queue::{self, JobKind, JobState, ListFilter, PurgeFilter, Queue};

/// What every operation works on: the open queue and the configuration of whoever
/// opened it (the daemon, or an offline `queuectl`), and the daemon's worker pools
/// (`None` offline: there are no workers then).
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub queue: Queue,
    pub config: Arc<Config>,
    pub pools: Option<Arc<queue::Pools>>,
}

pub(crate) type Result<T> = std::result::Result<T, Status>;

pub(crate) fn hello(ctx: Ctx, _: pb::HelloRequest) -> Result<pb::HelloReply> {
    Ok(pb::HelloReply {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        queue_path: ctx.queue.path().display().to_string(),
    })
}

pub(crate) fn stats(ctx: Ctx, _: pb::StatsRequest) -> Result<pb::StatsReply> {
    let q = &ctx.queue;
    let stats = q.stats().map_err(status)?;
    let count = |m: &std::collections::BTreeMap<JobState, u64>, s| m.get(&s).copied().unwrap_or(0);
    Ok(pb::StatsReply {
        kinds: stats
            .jobs
            .iter()
            .map(|(kind, m)| pb::KindCounts {
                kind: kind.to_string(),
                scheduled: count(m, JobState::Scheduled),
                ready: count(m, JobState::Ready),
                running: count(m, JobState::Running),
                done: count(m, JobState::Done),
                dead: count(m, JobState::Dead),
            })
            .collect(),
        oldest_ready_ms: stats.oldest_ready_ms,
        quarantine: quarantine(q)?,
        held_nodes: sync_state::held(q)
            .map_err(status)?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
        now_ms: q.now(),
    })
}

fn quarantine(q: &Queue) -> Result<Vec<pb::QuarantineRecord>> {
    Ok(q.quarantined()
        .map_err(status)?
        .into_iter()
        .map(Into::into)
        .collect())
}

pub(crate) fn list(ctx: Ctx, req: pb::ListRequest) -> Result<Vec<pb::Job>> {
    let filter = ListFilter {
        state: req.state.as_deref().map(parse).transpose()?,
        kind: req.kind.as_deref().map(parse_kind).transpose()?,
        after_id: req.after_id,
        limit: usize::try_from(req.limit).unwrap_or(usize::MAX),
    };
    Ok(ctx
        .queue
        .list(&filter)
        .map_err(status)?
        .iter()
        .map(Into::into)
        .collect())
}

pub(crate) fn quarantined(ctx: Ctx, _: pb::QuarantinedRequest) -> Result<pb::QuarantinedReply> {
    Ok(pb::QuarantinedReply {
        records: quarantine(&ctx.queue)?,
    })
}

pub(crate) fn show(ctx: Ctx, req: pb::JobId) -> Result<pb::Job> {
    let q = &ctx.queue;
    match q.get(req.id).map_err(status)? {
        Some(job) => Ok((&job).into()),
        None => {
            let key = format!("j/{}", req.id);
            match q
                .quarantined()
                .map_err(status)?
                .into_iter()
                .find(|r| r.key == key)
            {
                Some(r) => Err(Status::failed_precondition(format!(
                    "job {} is quarantined (its record is unreadable: {}); see `queuectl list --quarantined`",
                    req.id, r.reason
                ))),
                None => Err(status(queue::Error::NotFound(req.id))),
            }
        }
    }
}

pub(crate) async fn retry(ctx: Ctx, req: pb::JobId) -> Result<pb::Job> {
    let job = ctx.queue.retry(req.id).await.map_err(status)?;
    Ok((&job).into())
}

pub(crate) async fn retry_dead(ctx: Ctx, req: pb::RetryDeadRequest) -> Result<pb::RetryDeadReply> {
    let kind: Option<JobKind> = req.kind.as_deref().map(parse_kind).transpose()?;
    let q = &ctx.queue;
    let retried = q.retry_dead(kind).await.map_err(status)?;
    let stats = q.stats().map_err(status)?;
    let left_dead = match kind {
        Some(kind) => stats
            .jobs
            .get(&kind)
            .and_then(|m| m.get(&JobState::Dead))
            .copied()
            .unwrap_or(0),
        None => stats.total(JobState::Dead),
    };
    Ok(pb::RetryDeadReply { retried, left_dead })
}

pub(crate) async fn cancel(ctx: Ctx, req: pb::JobId) -> Result<pb::Job> {
    let job = ctx.queue.cancel(req.id).await.map_err(status)?;
    Ok((&job).into())
}

pub(crate) async fn purge(ctx: Ctx, req: pb::PurgeRequest) -> Result<pb::PurgeReply> {
    let state: JobState = parse(&req.state)?;
    if !matches!(state, JobState::Done | JobState::Dead) {
        return Err(Status::invalid_argument(format!(
            "only done or dead jobs can be purged, not {state}"
        )));
    }
    let purged = ctx
        .queue
        .purge(PurgeFilter {
            state,
            older_than: req.older_than_ms.map(Duration::from_millis),
        })
        .await
        .map_err(status)?;
    Ok(pb::PurgeReply { purged })
}

/// Every job in id order, one call of `each` per job. `each` failing with a broken pipe
/// (the reader went away) ends the export quietly.
pub(crate) fn export(ctx: Ctx, mut each: impl FnMut(pb::Job) -> std::io::Result<()>) -> Result<()> {
    match ctx.queue.for_each_job(|job| each(job.into())) {
        Ok(_) => Ok(()),
        Err(e) => Err(status(e)),
    }
}

pub(crate) fn held(ctx: Ctx, _: pb::HeldRequest) -> Result<pb::HeldReply> {
    let held = sync_state::held(&ctx.queue).map_err(status)?;
    Ok(pb::HeldReply {
        held: held
            .into_iter()
            .map(|(node_id, h)| pb::HeldSync {
                node_id,
                removes: h.removed as u64,
                of: h.before as u64,
                would_keep: h.users.len() as u64,
                since_ms: h.since,
                confirmed: h.confirmed,
            })
            .collect(),
        confirm_after_ms: ctx.config.sync.confirm_after.as_millis() as u64,
    })
}

pub(crate) async fn confirm(ctx: Ctx, req: pb::ConfirmRequest) -> Result<pb::ConfirmReply> {
    let held = sync_state::confirm(&ctx.queue, req.node_id)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("node {} has no held sync", req.node_id)))?;
    Ok(pb::ConfirmReply {
        removes: held.removed as u64,
        of: held.before as u64,
    })
}

pub(crate) fn bans(ctx: Ctx, _: pb::BansRequest) -> Result<pb::BansReply> {
    let mut out = Vec::new();
    // A record that does not read is an error naming its key, not a node left out.
    let all = bans::all(&ctx.queue).map_err(|e| Status::internal(e.to_string()))?;
    for (node_id, b) in all {
        out.extend(b.into_iter().map(|(user, ban)| pb::Ban {
            node_id,
            user,
            removed_at_ms: ban.removed_at,
            bytes_since: ban.bytes_since,
            source: ban.source.as_str().to_string(),
            biting: ban.biting(),
            online_ips: ban.online_ips.clone(),
            cut_at_ms: ban.cut.as_ref().map_or(0, |c| c.at),
            connections_cut: ban.cut.as_ref().map_or(0, |c| c.connections),
            cut_note: ban.cut.map(|c| c.note).unwrap_or_default(),
        }));
    }
    Ok(pb::BansReply { bans: out })
}

pub(crate) fn traffic(ctx: Ctx, _: pb::TrafficRequest) -> Result<pb::TrafficReply> {
    let s = traffic_report::summary::summary(&ctx.queue).map_err(status)?;
    Ok(super::convert::traffic(s))
}

pub(crate) fn relays(ctx: Ctx, _: pb::RelaysRequest) -> Result<pb::RelaysReply> {
    let providers = crate::peers::relays::load_dir(&ctx.config.webhook.providers_dir, None);
    let report =
        crate::jobs::webhook::stats::report(&ctx.queue, Some(&providers)).map_err(status)?;
    let report_json = serde_json::to_string(&report)
        .map_err(|e| Status::internal(format!("relay stats do not serialise: {e}")))?;
    Ok(pb::RelaysReply { report_json })
}

pub(crate) async fn fsck(ctx: Ctx, req: pb::FsckRequest) -> Result<pb::FsckReport> {
    let report = ctx.queue.fsck(req.repair).await.map_err(status)?;
    Ok(report.into())
}

/// The daemon's pools, or why there are none.
fn pools(ctx: &Ctx) -> Result<&Arc<queue::Pools>> {
    ctx.pools.as_ref().ok_or_else(|| {
        Status::failed_precondition(
            "no daemon is running: worker pools exist only in the running daemon",
        )
    })
}

fn workers_reply(ctx: &Ctx, changed: bool) -> Result<pb::WorkersReply> {
    let workers = pools(ctx)?
        .iter()
        .map(|pool| {
            let c = pool.condition(ctx.queue.settings().kind(pool.kind()).lease_timeout);
            pb::Worker {
                kind: pool.kind().to_string(),
                status: c.state.to_string(),
                idle_ms: c.idle.as_millis() as u64,
                problem: c.problem,
            }
        })
        .collect();
    Ok(pb::WorkersReply { workers, changed })
}

pub(crate) fn workers(ctx: Ctx, _: pb::WorkersRequest) -> Result<pb::WorkersReply> {
    workers_reply(&ctx, false)
}

pub(crate) async fn pause(ctx: Ctx, req: pb::PauseRequest) -> Result<pb::WorkersReply> {
    let kind: JobKind = parse_kind(&req.kind)?;
    let pool = pools(&ctx)?.get(kind).ok_or_else(|| {
        Status::failed_precondition(format!("this daemon runs no {kind} workers"))
    })?;
    let changed = pool.set_paused(req.paused);
    if changed {
        tracing::warn!(kind = %kind, paused = req.paused, "{kind} workers {} by an operator", if req.paused { "paused" } else { "resumed" });
    }
    workers_reply(&ctx, changed)
}
