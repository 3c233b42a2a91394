//! `connector --once`: one sync per node, and the apply each changed node needs (every
//! node, in `xray-grpc` mode: a reconcile), one traffic collection (when reporting is
//! on and a core is configured) and every pending traffic report, then exit. Each job gets one attempt here; a job whose attempt failed stays in the queue
//! on its ladder for the next run, and the exit status says so.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::config::Config;
use crate::jobs;
use crate::jobs::traffic_report::collect::CollectError;
use crate::jobs::{node_key, node_sync};
use crate::queue::{Job, JobKind, JobState, Outcome, Queue, Stored};

/// What `--once` did.
#[derive(Debug, Clone, Default)]
pub struct OnceReport {
    /// (node, kind) → `Ok` or the error of its attempt. For `webhook`, the first
    /// number is the job id (callbacks that were due).
    pub results: BTreeMap<(u64, JobKind), Result<(), Failed>>,
}

/// Why a job of the pass did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failed {
    /// The error of the job's last attempt, as its history records it.
    #[error("{0}")]
    Attempt(String),
    /// The traffic collection, which is no job.
    #[error("{0}")]
    Collect(#[source] Arc<CollectError>),
}

impl OnceReport {
    pub fn ok(&self) -> bool {
        self.results.values().all(Result::is_ok)
    }

    /// One line for people: what failed, or what succeeded.
    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter_map(|((node, kind), r)| {
                r.as_ref().err().map(|e| match *kind {
                    jobs::WEBHOOK => format!("webhook job {node}: {e}"),
                    _ => format!("node {node} {kind}: {e}"),
                })
            })
            .collect();
        let count = |kind| self.results.keys().filter(|(_, k)| *k == kind).count();
        let (syncs, applies) = (count(jobs::NODE_SYNC), count(jobs::XRAY_APPLY));
        let (reports, webhooks) = (count(jobs::TRAFFIC_REPORT), count(jobs::WEBHOOK));
        if failed.is_empty() {
            format!(
                "once: {syncs} node(s) synced, {applies} apply(ies) run, traffic reported for {reports} node(s), {webhooks} callback(s) delivered, all succeeded"
            )
        } else {
            format!(
                "once: {} of {} job(s) failed: {}",
                failed.len(),
                self.results.len(),
                failed.join("; ")
            )
        }
    }
}

struct Tracked {
    node: u64,
    kind: JobKind,
    attempts_before: u32,
}

/// Runs one pass and reports; the queue is flushed before it returns.
pub async fn run_once(config: Config) -> anyhow::Result<OnceReport> {
    let agent = Agent::open(config)?;
    let queue = agent.queue.clone();
    let mut events = queue.subscribe();
    let mut tracked: BTreeMap<u64, Tracked> = BTreeMap::new();
    for node in &agent.config.nodes {
        let e = queue.enqueue_with(node_sync::job(node.id)).await?;
        let job = due_now(&queue, e.job).await?;
        track(&mut tracked, &job, node.id);
    }
    let mut report = OnceReport::default();
    if let Some(collector) = &agent.collector
        && let Err(e) = collector.lock().await.collect().await
    {
        tracing::error!(error = %e, "traffic collection failed");
        report
            .results
            .insert((0, jobs::TRAFFIC_REPORT), Err(Failed::Collect(Arc::new(e))));
    }
    if agent.traffic.is_some() {
        // Every report waiting, oldest first (ids grow with creation).
        let pending = queue.list(&crate::queue::ListFilter {
            kind: Some(jobs::TRAFFIC_REPORT),
            ..Default::default()
        })?;
        for job in pending {
            if matches!(
                job.state(queue.now()),
                JobState::Ready | JobState::Scheduled | JobState::Running
            ) && let Ok(r) = crate::jobs::traffic_report::Report::decode(&job.payload)
            {
                let job = due_now(&queue, job).await?;
                track(&mut tracked, &job, r.node_id);
            }
        }
    }
    // Callbacks that are due get one attempt too (when any relay is registered: else
    // no webhook worker runs).
    if !agent.webhook.registry.snapshot().by_id.is_empty() {
        let now = queue.now();
        for job in queue.unfinished_and_dead(jobs::WEBHOOK)? {
            if job.state(now) == JobState::Ready {
                track(&mut tracked, &job, job.id);
            }
        }
    }
    let stop = CancellationToken::new();
    let mut tasks = super::Supervisor::new();
    agent.spawn_workers(&mut tasks, &stop);
    loop {
        let ids: Vec<u64> = tracked.keys().copied().collect();
        for id in ids {
            let Some(job) = queue.get(id)? else {
                continue;
            };
            let Some(t) = tracked.get(&id) else { continue };
            let Some(result) = resolved(&job, t.attempts_before) else {
                continue;
            };
            let (node, kind) = (t.node, t.kind);
            tracked.remove(&id);
            if kind == jobs::NODE_SYNC && result.is_ok() && agent.apply.core.is_some() {
                // xray-grpc: every node is reconciled, changed or not; the core may
                // have lost users, or its inbound may not be what the config says.
                crate::jobs::xray_apply::core_watch::apply_now(&queue, node)
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            if kind == jobs::NODE_SYNC
                && result.is_ok()
                && let Some(apply) = queue.find_key(jobs::XRAY_APPLY, &node_key(node))?
                && matches!(
                    apply.state(queue.now()),
                    JobState::Ready | JobState::Scheduled | JobState::Running
                )
            {
                let apply = due_now(&queue, apply).await?;
                track(&mut tracked, &apply, node);
            }
            if kind == jobs::TRAFFIC_REPORT && result.is_err() {
                // A node's newer reports wait for this one (oldest first): not sent.
                let blocked: Vec<u64> = tracked
                    .iter()
                    .filter(|&(&other, t)| other > id && t.node == node && t.kind == kind)
                    .map(|(&other, _)| other)
                    .collect();
                for other in blocked {
                    tracked.remove(&other);
                }
            }
            let slot = report.results.entry((node, kind)).or_insert(Ok(()));
            if slot.is_ok() {
                *slot = result;
            }
        }
        if tracked.is_empty() {
            break;
        }
        tokio::select! {
            r = events.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
            Some(exit) = tasks.next() => {
                // A worker pool ended early: the queue failed.
                if let Some(why) = exit.failure {
                    anyhow::bail!("{} failed: {why}", exit.name);
                }
            }
        }
    }
    stop.cancel();
    agent.drain(&mut tasks).await?;
    Ok(report)
}

fn track(tracked: &mut BTreeMap<u64, Tracked>, job: &Job, node: u64) {
    // A lease counts its attempt: a job already running (a worker took it between
    // being made due and being looked up) is waiting for the attempt it has. Counting
    // that one as "before" waited forever for the next when it failed.
    let attempts_before = match job.stored {
        Stored::Running { .. } => job.attempts.saturating_sub(1),
        _ => job.attempts,
    };
    tracked.entry(job.id).or_insert(Tracked {
        node,
        kind: job.kind,
        attempts_before,
    });
}

/// A job waiting on its ladder is made due now: `--once` gives it one attempt.
async fn due_now(queue: &Queue, job: Job) -> anyhow::Result<Job> {
    if job.state(queue.now()) == JobState::Scheduled {
        return Ok(queue.retry(job.id).await?);
    }
    Ok(job)
}

/// `Some` once the job has had an attempt since it was tracked.
fn resolved(job: &Job, attempts_before: u32) -> Option<Result<(), Failed>> {
    let last_error = || {
        job.history
            .iter()
            .rev()
            .find_map(|a| match &a.outcome {
                Outcome::Succeeded => None,
                Outcome::Failed { error } => Some(error.clone()),
                Outcome::LeaseExpired => Some("lease expired".into()),
                Outcome::Interrupted { reason } => Some(reason.clone()),
            })
            .unwrap_or_else(|| "failed".into())
    };
    match job.state(u64::MAX) {
        JobState::Done => Some(Ok(())),
        JobState::Dead => Some(Err(Failed::Attempt(last_error()))),
        JobState::Running => None,
        _ if job.attempts > attempts_before => Some(Err(Failed::Attempt(last_error()))),
        _ => None,
    }
}
