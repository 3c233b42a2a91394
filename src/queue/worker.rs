//! Running jobs: a worker loop per kind that leases due jobs up to the kind's
//! concurrency, runs each attempt under a timeout, and records the result.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Commit, Error, Job, JobKind, NewJob, Queue, Result, StateWrite};

/// How one attempt ended, as the job's handler reports it.
#[derive(Debug, Clone)]
pub enum AttemptResult {
    Done,
    /// Done, and these changes are committed in the same write as the ack: after a
    /// crash either the job is done and they happened, or neither.
    DoneWith(Effects),
    /// Try again on the ladder. `retry_after` (e.g. an HTTP `Retry-After`) can only
    /// push the next attempt later.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Not now, and not a failure: the job waits for other work (`why`) and is due
    /// again at `until` ([`Queue::defer`]: nothing recorded, no ladder rung used).
    Defer {
        until: super::Millis,
        why: String,
    },
}

/// State writes and new jobs that go with a successful attempt.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub state: Vec<StateWrite>,
    pub enqueue: Vec<NewJob>,
    /// Kept on the attempt's record (e.g. a hook's output).
    pub note: Option<String>,
    /// Pending jobs made due now in the same write ([`Commit::wake`]).
    pub wake: Vec<u64>,
}

/// Runs one attempt of a job. Implemented by each job kind.
pub trait Handler: Send + Sync + 'static {
    fn run(&self, job: Job) -> impl Future<Output = AttemptResult> + Send;
}

/// Longest the loop sleeps before looking at the queue again, even when nothing woke it
/// (a clock that jumped, a job enqueued by another handle).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Leases and runs jobs of `kind` until `shutdown` is cancelled, then waits for the
/// attempts in flight (the caller bounds that wait). Returns an error only when the
/// queue itself fails.
pub async fn run_workers<H: Handler>(
    queue: Queue,
    kind: JobKind,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<()> {
    let settings = queue.settings().kind(kind).clone();
    let concurrency = settings.concurrency.max(1);
    let mut attempts = JoinSet::new();
    let outcome = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        // A JoinSet counts finished attempts until they are joined: reap them all, or
        // `free` stays at 1 and every lease (and its flush) brings in a single job.
        while attempts.try_join_next().is_some() {}
        let free = concurrency - attempts.len();
        let leased = match queue.lease(kind, free).await {
            Ok(l) => l,
            Err(e) => break Err(e),
        };
        let full = free > 0 && leased.len() == free;
        for l in leased {
            let token = l.token();
            let (queue, handler) = (queue.clone(), handler.clone());
            let limit = settings.lease_timeout;
            attempts.spawn(async move {
                let result = match tokio::time::timeout(limit, handler.run(l.job)).await {
                    Ok(r) => r,
                    Err(_) => AttemptResult::Retry {
                        error: format!(
                            "attempt timed out after {}",
                            humantime::format_duration(limit)
                        ),
                        retry_after: None,
                    },
                };
                let recorded = match result {
                    AttemptResult::Done => queue.ack(token).await.map(|_| ()),
                    AttemptResult::DoneWith(fx) => queue
                        .commit(Commit {
                            state: fx.state,
                            enqueue: fx.enqueue,
                            ack: Some(token),
                            note: fx.note,
                            wake: fx.wake,
                        })
                        .await
                        .map(|_| ()),
                    AttemptResult::Retry { error, retry_after } => {
                        tracing::warn!(kind = %kind, job = token.id, attempt = token.attempt, %error, "attempt failed");
                        queue.fail(token, &error, retry_after).await.map(|_| ())
                    }
                    AttemptResult::Defer { until, why } => {
                        tracing::debug!(kind = %kind, job = token.id, %why, "deferred");
                        queue.defer(token, until).await.map(|_| ())
                    }
                };
                match recorded {
                    Ok(()) => {}
                    Err(e @ Error::LeaseLost { .. }) => tracing::warn!(kind = %kind, error = %e),
                    Err(e) => tracing::error!(kind = %kind, job = token.id, error = %e, "could not record attempt"),
                }
            });
        }
        if full {
            // There may be more due right now; wait only for a free slot.
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = attempts.join_next() => {}
            }
            continue;
        }
        let wait = match queue.next_due(kind) {
            Ok(Some(due)) => Duration::from_millis(due.saturating_sub(queue.now())),
            Ok(None) => IDLE_RECHECK,
            Err(e) => break Err(e),
        }
        .min(IDLE_RECHECK);
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            _ = queue.woken(kind) => {}
            _ = tokio::time::sleep(wait) => {}
        }
    };
    while attempts.join_next().await.is_some() {}
    outcome
}

/// Runs `Queue::maintain` every `every` until `shutdown`: expired leases are made ready
/// again and done jobs past the dedupe window are deleted.
pub async fn run_maintenance(queue: Queue, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match queue.maintain().await {
            Ok((swept, reaped)) if swept + reaped > 0 => {
                tracing::info!(swept, reaped, "queue maintenance")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "queue maintenance failed"),
        }
    }
}
