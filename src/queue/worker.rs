//! Running jobs: a worker loop per kind that leases due jobs up to the kind's
//! concurrency, runs each attempt under a timeout, and records the result.
//!
//! Each loop reports to its [`Pool`]: when it last turned (a loop that stops turning
//! is stuck), whether it is running, and whether an operator paused it (`queuectl
//! pause KIND`: it leases nothing until resumed; attempts in flight finish). The
//! daemon's `/healthz` reads the pools; every recorded attempt is reported to the
//! [`AttemptObserver`] the caller passes in (the daemon's metrics), so the queue
//! itself knows nothing of how it is measured.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Commit, Error, Job, JobKind, Leased, NewJob, Queue, Result, StateWrite, Stored};

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

/// Told about every attempt whose result the queue recorded. The daemon passes one
/// that feeds its metrics; the default methods do nothing.
pub trait AttemptObserver: Send + Sync + 'static {
    /// One attempt of `kind` was recorded with `outcome` (`done`, `failed`,
    /// `deferred`) after running for `took`.
    fn attempt(&self, kind: JobKind, outcome: &'static str, took: Duration) {
        let _ = (kind, outcome, took);
    }
    /// A job of `kind` succeeded, `latency` after it was created.
    fn finished(&self, kind: JobKind, latency: Duration) {
        let _ = (kind, latency);
    }
    /// A job of `kind` failed its last rung and went dead.
    fn exhausted(&self, kind: JobKind) {
        let _ = kind;
    }
}

/// An [`AttemptObserver`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl AttemptObserver for NoObserver {}

/// Longest the loop sleeps before looking at the queue again, even when nothing woke it
/// (a clock that jumped, a job enqueued by another handle).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// What a worker loop is doing, as [`Pool::status`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStatus {
    /// Not started yet (the webhook pool waits for a first relay).
    Waiting,
    Running,
    /// Paused by an operator: leases nothing until resumed.
    Paused,
    /// The loop has ended (the daemon is stopping, or the queue failed).
    Stopped,
}

impl PoolStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolStatus::Waiting => "waiting",
            PoolStatus::Running => "running",
            PoolStatus::Paused => "paused",
            PoolStatus::Stopped => "stopped",
        }
    }
}

/// Slack over the lease timeout before a loop that has not gone round counts as stuck.
pub(crate) const STUCK_SLACK: Duration = Duration::from_secs(60);

/// See [`Pool::condition`].
#[derive(Debug, Clone)]
pub struct Condition {
    /// `running`, `waiting`, `paused`, `stopped` or `stuck`.
    pub state: &'static str,
    /// Since the loop last went round.
    pub idle: Duration,
    /// Why this makes the daemon unhealthy, naming the kind.
    pub problem: Option<String>,
}

const WAITING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// One kind's worker loop, seen from outside: its liveness and the operator's pause.
#[derive(Debug)]
pub struct Pool {
    kind: JobKind,
    state: AtomicU8,
    paused: watch::Sender<bool>,
    /// When the loop last went round (it does at least every [`IDLE_RECHECK`], or when
    /// an attempt ends, which the lease timeout bounds).
    turned: Mutex<Instant>,
}

impl Pool {
    pub fn new(kind: JobKind) -> Arc<Pool> {
        Arc::new(Pool {
            kind,
            state: AtomicU8::new(WAITING),
            paused: watch::Sender::new(false),
            turned: Mutex::new(Instant::now()),
        })
    }

    pub fn kind(&self) -> JobKind {
        self.kind
    }

    pub fn status(&self) -> PoolStatus {
        match self.state.load(Ordering::Acquire) {
            STOPPED => PoolStatus::Stopped,
            _ if *self.paused.borrow() => PoolStatus::Paused,
            RUNNING => PoolStatus::Running,
            _ => PoolStatus::Waiting,
        }
    }

    /// How long since the loop last went round (zero unless it runs).
    pub fn idle_for(&self) -> Duration {
        if self.state.load(Ordering::Acquire) != RUNNING {
            return Duration::ZERO;
        }
        self.turned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// Pauses (`true`) or resumes the pool. Returns whether this changed anything.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused
            .send_if_modified(|p| std::mem::replace(p, paused) != paused)
    }

    /// The pool as `/healthz` and `queuectl workers` show it. A running loop that has
    /// not gone round for longer than `lease_timeout` plus [`STUCK_SLACK`] is stuck: it
    /// waits at most [`IDLE_RECHECK`] when idle, or for an attempt the lease timeout
    /// ends.
    pub fn condition(&self, lease_timeout: Duration) -> Condition {
        let (status, idle) = (self.status(), self.idle_for());
        let kind = self.kind;
        let (state, problem) = match status {
            PoolStatus::Running if idle > lease_timeout + STUCK_SLACK => (
                "stuck",
                Some(format!(
                    "{kind} workers have not gone round their loop for {}s (more than the lease timeout plus {}s): stuck",
                    idle.as_secs(),
                    STUCK_SLACK.as_secs()
                )),
            ),
            PoolStatus::Paused => (
                "paused",
                Some(format!(
                    "{kind} workers are paused by an operator (`queuectl resume {kind}`)"
                )),
            ),
            PoolStatus::Stopped => ("stopped", Some(format!("{kind} workers have stopped"))),
            s => (s.as_str(), None),
        };
        Condition {
            state,
            idle,
            problem,
        }
    }

    fn turn(&self) {
        *self.turned.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn set_state(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.turn();
    }
}

/// The daemon's worker pools, one per kind it runs: what `/healthz`, the metrics and
/// `queuectl workers|pause|resume` look at.
#[derive(Debug, Default)]
pub struct Pools(std::collections::BTreeMap<JobKind, Arc<Pool>>);

impl Pools {
    pub fn new(kinds: impl IntoIterator<Item = JobKind>) -> Pools {
        Pools(kinds.into_iter().map(|k| (k, Pool::new(k))).collect())
    }

    pub fn get(&self, kind: JobKind) -> Option<&Arc<Pool>> {
        self.0.get(&kind)
    }

    /// In kind order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.0.values()
    }
}

/// Leases and runs jobs of `kind` until `shutdown` is cancelled, then waits for the
/// attempts in flight (the caller bounds that wait). A queue that refuses writes (a
/// full disk) does not end the loop: it waits and leases again once it can.
pub async fn run_workers<H: Handler>(
    queue: Queue,
    kind: JobKind,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<()> {
    run_pool(
        queue,
        Pool::new(kind),
        handler,
        Arc::new(NoObserver),
        shutdown,
    )
    .await
}

/// [`run_workers`], reporting to `pool` (and obeying its pause) and telling `observer`
/// about every recorded attempt.
pub async fn run_pool<H: Handler>(
    queue: Queue,
    pool: Arc<Pool>,
    handler: Arc<H>,
    observer: Arc<dyn AttemptObserver>,
    shutdown: CancellationToken,
) -> Result<()> {
    pool.set_state(RUNNING);
    let outcome = work(&queue, &pool, handler, observer, &shutdown).await;
    pool.set_state(STOPPED);
    outcome
}

async fn work<H: Handler>(
    queue: &Queue,
    pool: &Pool,
    handler: Arc<H>,
    observer: Arc<dyn AttemptObserver>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let kind = pool.kind;
    let settings = queue.settings().kind(kind).clone();
    let concurrency = settings.concurrency.max(1);
    let runner = Runner {
        queue: queue.clone(),
        handler,
        observer,
        kind,
        limit: settings.lease_timeout,
        // A slot is busy while its handler runs, not while its result is being
        // recorded: the next lease is made while the ack is on its way, so both go in
        // one group commit (`combine.rs`) instead of one flush after the other.
        busy: Arc::new(AtomicUsize::new(0)),
        freed: Arc::new(Notify::new()),
    };
    let freed = runner.freed.clone();
    // Leased and not started yet (`KindSettings::lease_ahead`), oldest first, with the
    // loop's turn that leased each.
    let mut ahead: VecDeque<(Leased, u64)> = VecDeque::new();
    let mut turn = 0u64;
    let mut attempts = JoinSet::new();
    let mut pause = pool.paused.subscribe();
    // Set while leasing fails, so the outage is logged once.
    let mut failing: Option<()> = None;
    let outcome = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        pool.turn();
        // Finished attempts stay in the JoinSet until joined.
        while attempts.try_join_next().is_some() {}
        if *pause.borrow_and_update() {
            // Paused leases nothing, and holds nothing leased: what was leased ahead
            // goes back as it was.
            give_back(queue, kind, ahead.drain(..).map(|(l, _)| l)).await;
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = pause.changed() => {}
                _ = freed.notified() => {}
                _ = tokio::time::sleep(IDLE_RECHECK) => {}
            }
            continue;
        }
        turn = turn.wrapping_add(1);
        // Slots given back since the last turn take the jobs leased ahead first.
        fill(&runner, concurrency, &mut ahead, turn, &mut attempts);
        let want = (concurrency + settings.lease_ahead).saturating_sub(runner.busy() + ahead.len());
        let leased = if want == 0 {
            Vec::new()
        } else {
            match queue.lease(kind, want).await {
                Ok(l) => {
                    if failing.take().is_some() {
                        tracing::info!(kind = %kind, "workers lease jobs again");
                    }
                    l
                }
                Err(e) => {
                    // A full disk, a failed write, a deleted database: the queue refuses
                    // writes until it can take them again (`/healthz` says why). Attempts
                    // already running finish; this loop waits and tries again.
                    if failing.replace(()).is_none() {
                        tracing::warn!(kind = %kind, error = %e, "workers cannot lease jobs; trying again every second");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = freed.notified() => {}
                        _ = tokio::time::sleep(IDLE_RECHECK) => {}
                    }
                    continue;
                }
            }
        };
        // As many as asked, or nothing asked for (every slot busy and enough leased
        // ahead): there may be more due right now; wait only for a free slot.
        let full = leased.len() == want;
        ahead.extend(leased.into_iter().map(|l| (l, turn)));
        fill(&runner, concurrency, &mut ahead, turn, &mut attempts);
        if full {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = freed.notified() => {}
                _ = pause.changed() => {}
            }
            continue;
        }
        let wait = match queue.next_due(kind) {
            Ok(Some(due)) => Duration::from_millis(due.saturating_sub(queue.now())),
            Ok(None) => IDLE_RECHECK,
            Err(e) => {
                tracing::debug!(kind = %kind, error = %e, "cannot read when the next job is due");
                IDLE_RECHECK
            }
        }
        .min(IDLE_RECHECK);
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = freed.notified() => {}
            _ = queue.woken(kind) => {}
            _ = pause.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    };
    // Stopping: what was leased ahead never started; it goes back uncounted instead of
    // reading as interrupted at the next start.
    give_back(queue, kind, ahead.drain(..).map(|(l, _)| l)).await;
    while attempts.join_next().await.is_some() {}
    outcome
}

/// Starts jobs leased ahead, oldest first, while slots are free. One leased in an
/// earlier `turn` of the loop is checked first ([`Runner::still_held`]).
fn fill<H: Handler>(
    runner: &Runner<H>,
    concurrency: usize,
    ahead: &mut VecDeque<(Leased, u64)>,
    turn: u64,
    attempts: &mut JoinSet<()>,
) {
    while runner.busy() < concurrency {
        let Some((l, leased_in)) = ahead.pop_front() else {
            break;
        };
        if leased_in == turn {
            runner.start(l, runner.limit, attempts);
        } else if let Some(left) = runner.still_held(&l, attempts) {
            // Its lease began before this slot was free: the attempt gets what is left
            // of it, so it never runs on past its lease into another worker's.
            runner.start(l, left, attempts);
        }
    }
}

/// Puts jobs leased but not started back as they were before their lease: pending, due
/// now, the attempt not counted. One that cannot be put back (the disk refuses writes)
/// keeps its lease; the next start counts it as interrupted, or its lease runs out.
async fn give_back(queue: &Queue, kind: JobKind, jobs: impl Iterator<Item = Leased>) {
    let now = queue.now();
    let mut backs = JoinSet::new();
    for l in jobs {
        let (queue, token) = (queue.clone(), l.token());
        backs.spawn(async move { (token, queue.defer(token, now).await) });
    }
    while let Some(joined) = backs.join_next().await {
        let Ok((token, r)) = joined else { continue };
        match r {
            Ok(_) | Err(Error::LeaseLost { .. }) => {}
            Err(e) => {
                tracing::warn!(kind = %kind, job = token.id, error = %e, "a job leased ahead could not be given back; it runs again once its lease runs out")
            }
        }
    }
}

/// Starts attempts in worker slots and records how they end.
struct Runner<H> {
    queue: Queue,
    handler: Arc<H>,
    observer: Arc<dyn AttemptObserver>,
    kind: JobKind,
    /// The attempt's time limit: the kind's lease timeout.
    limit: Duration,
    busy: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl<H: Handler> Runner<H> {
    fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    /// Whether a job leased ahead may start now, and for how long: its lease is still
    /// the job's (an operator's cancel, or the reaper, may have taken it meanwhile),
    /// with at least half its time left. A lease running short is given back (in
    /// `attempts`, off the loop) instead.
    fn still_held(&self, l: &Leased, attempts: &mut JoinSet<()>) -> Option<Duration> {
        let Stored::Running { lease_until_ms, .. } = l.job.stored else {
            return None;
        };
        let left = Duration::from_millis(lease_until_ms.saturating_sub(self.queue.now()));
        if left < self.limit / 2 {
            let (queue, kind, l) = (self.queue.clone(), self.kind, l.clone());
            attempts.spawn(async move { give_back(&queue, kind, std::iter::once(l)).await });
            return None;
        }
        match self.queue.get(l.job.id) {
            Ok(Some(job))
                if matches!(job.stored, Stored::Running { .. })
                    && job.attempts == l.job.attempts =>
            {
                Some(left.min(self.limit))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(kind = %self.kind, job = l.job.id, error = %e, "cannot read a job leased ahead; left to its lease");
                None
            }
        }
    }

    /// Runs the attempt in a slot taken now, for at most `limit`; the slot is given
    /// back when the handler returns, before its result is recorded.
    fn start(&self, l: Leased, limit: Duration, attempts: &mut JoinSet<()>) {
        let token = l.token();
        let (queue, handler, observer) = (
            self.queue.clone(),
            self.handler.clone(),
            self.observer.clone(),
        );
        let kind = self.kind;
        let created_ms = l.job.created_ms;
        self.busy.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            busy: self.busy.clone(),
            freed: self.freed.clone(),
        };
        attempts.spawn(async move {
            let started = Instant::now();
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
            drop(slot);
            let took = started.elapsed();
            let outcome = match &result {
                AttemptResult::Done | AttemptResult::DoneWith(_) => "done",
                AttemptResult::Retry { .. } => "failed",
                AttemptResult::Defer { .. } => "deferred",
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
                    queue.fail(token, &error, retry_after).await.map(|job| {
                        if matches!(job.stored, Stored::Dead { .. }) {
                            observer.exhausted(kind);
                        }
                    })
                }
                AttemptResult::Defer { until, why } => {
                    tracing::debug!(kind = %kind, job = token.id, %why, "deferred");
                    queue.defer(token, until).await.map(|_| ())
                }
            };
            match recorded {
                Ok(()) => {
                    observer.attempt(kind, outcome, took);
                    if outcome == "done" {
                        let waited = queue.now().saturating_sub(created_ms);
                        observer.finished(kind, Duration::from_millis(waited));
                    }
                }
                Err(e @ Error::LeaseLost { .. }) => tracing::warn!(kind = %kind, error = %e),
                Err(e) => tracing::error!(kind = %kind, job = token.id, error = %e, "could not record attempt"),
            }
        });
    }
}

/// A worker slot held by an attempt's handler; dropping it (the handler returned, or
/// its task ended) frees the slot and wakes the loop.
struct Slot {
    busy: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
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
            // A full disk: the queue said so once; maintenance runs again when it can.
            Err(e) if e.is_unwritable() => tracing::debug!(error = %e, "queue maintenance skipped"),
            Err(e) => tracing::error!(error = %e, "queue maintenance failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_reads_as_healthz_shows_it() {
        let lease = Duration::from_secs(120);
        let pool = Pool::new(JobKind::new(2, "xray_apply"));
        let c = pool.condition(lease);
        assert_eq!((c.state, c.problem), ("waiting", None));

        pool.set_state(RUNNING);
        let c = pool.condition(lease);
        assert_eq!((c.state, c.problem), ("running", None));

        // A loop that has not turned for longer than the lease timeout plus the slack.
        *pool.turned.lock().unwrap() =
            Instant::now() - lease - STUCK_SLACK - Duration::from_secs(5);
        let c = pool.condition(lease);
        assert_eq!(c.state, "stuck");
        let problem = c.problem.unwrap();
        assert!(
            problem.starts_with("xray_apply workers have not gone round"),
            "{problem}"
        );
        // Just under the limit is not stuck.
        *pool.turned.lock().unwrap() = Instant::now() - lease;
        assert_eq!(pool.condition(lease).state, "running");

        assert!(pool.set_paused(true));
        assert!(!pool.set_paused(true));
        let c = pool.condition(lease);
        assert_eq!(c.state, "paused");
        assert!(c.problem.unwrap().contains("queuectl resume xray_apply"));
        assert!(pool.set_paused(false));

        pool.set_state(STOPPED);
        let c = pool.condition(lease);
        assert_eq!(
            (c.state, c.problem.as_deref()),
            ("stopped", Some("xray_apply workers have stopped"))
        );
    }
}
