//! The worker loop: per-kind concurrency, hung attempts, and a shutdown that lets running
//! attempts finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use connector::jobs;
use connector::queue::{
    AttemptResult, Clock, Event, EventKind, Handler, Job, JobState, KindSettings, ManualClock,
    NoObserver, Outcome, Pool, Queue, Settings, SystemClock, run_pool, run_workers,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

fn open(dir: &tempfile::TempDir, tune: impl FnOnce(&mut Settings)) -> Queue {
    open_on(dir, Arc::new(SystemClock), tune)
}

fn open_on(
    dir: &tempfile::TempDir,
    clock: Arc<dyn Clock>,
    tune: impl FnOnce(&mut Settings),
) -> Queue {
    let mut settings = jobs::settings();
    tune(&mut settings);
    Queue::open(dir.path().join("queue"), settings, clock)
        .unwrap()
        .0
}

/// Counts attempts in flight and the most ever seen at once.
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    done: mpsc::UnboundedSender<u64>,
}

impl Handler for Gauge {
    async fn run(&self, job: Job) -> AttemptResult {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        // Hold the slot across a few scheduler turns so attempts overlap.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        let _ = self.done.send(job.id);
        AttemptResult::Done
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_more_attempts_than_the_kind_allows() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, |s| s.kind_mut(jobs::WEBHOOK).concurrency = 3);
    for i in 0..40 {
        q.enqueue(jobs::WEBHOOK, &format!("e{i}"), vec![], None)
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gauge = Arc::new(Gauge {
        now: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
        done: tx,
    });
    let stop = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        q.clone(),
        jobs::WEBHOOK,
        gauge.clone(),
        stop.clone(),
    ));
    for _ in 0..40 {
        rx.recv().await.unwrap();
    }
    stop.cancel();
    workers.await.unwrap().unwrap();
    let max = gauge.max.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} attempts ran at once");
    assert_eq!(q.stats().unwrap().total(JobState::Done), 40);
}

/// Hangs on its first attempt, succeeds on the second.
struct HangOnce {
    calls: AtomicUsize,
    done: mpsc::UnboundedSender<()>,
}

impl Handler for HangOnce {
    async fn run(&self, _job: Job) -> AttemptResult {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        let _ = self.done.send(());
        AttemptResult::Done
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_times_out_and_counts_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, |s| {
        let k = s.kind_mut(jobs::NODE_SYNC);
        k.ladder = vec![Duration::ZERO, Duration::ZERO];
        k.lease_timeout = Duration::from_secs(30);
    });
    let job = q
        .enqueue(jobs::NODE_SYNC, "node-1", vec![], None)
        .await
        .unwrap()
        .job;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let h = Arc::new(HangOnce {
        calls: AtomicUsize::new(0),
        done: tx,
    });
    let workers = tokio::spawn(run_workers(q.clone(), jobs::NODE_SYNC, h, stop.clone()));
    rx.recv().await.unwrap();
    stop.cancel();
    workers.await.unwrap().unwrap();
    let job = q.get(job.id).unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    assert_eq!(
        job.history[0].outcome,
        Outcome::Failed {
            error: "attempt timed out after 30s".into()
        }
    );
    assert_eq!(job.history[1].outcome, Outcome::Succeeded);
}

/// Signals when it starts, then waits to be released.
struct Gate {
    started: Arc<Notify>,
    release: Arc<Notify>,
}

impl Handler for Gate {
    async fn run(&self, _job: Job) -> AttemptResult {
        self.started.notify_one();
        self.release.notified().await;
        AttemptResult::Done
    }
}

#[tokio::test]
async fn shutdown_lets_the_running_attempt_finish_and_takes_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, |s| s.kind_mut(jobs::XRAY_APPLY).concurrency = 1);
    let first = q
        .enqueue(jobs::XRAY_APPLY, "a", vec![], None)
        .await
        .unwrap()
        .job;
    let second = q
        .enqueue(jobs::XRAY_APPLY, "b", vec![], None)
        .await
        .unwrap()
        .job;
    let gate = Arc::new(Gate {
        started: Arc::new(Notify::new()),
        release: Arc::new(Notify::new()),
    });
    let stop = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        q.clone(),
        jobs::XRAY_APPLY,
        gate.clone(),
        stop.clone(),
    ));
    gate.started.notified().await;
    stop.cancel();
    gate.release.notify_one();
    workers.await.unwrap().unwrap();
    let now = q.now();
    assert_eq!(q.get(first.id).unwrap().unwrap().state(now), JobState::Done);
    assert_eq!(
        q.get(second.id).unwrap().unwrap().state(now),
        JobState::Ready
    );
}

/// Records every job it runs; holds the first one until released.
struct HoldFirst {
    ran: std::sync::Mutex<Vec<u64>>,
    started: Arc<Notify>,
    release: Arc<Notify>,
    done: mpsc::UnboundedSender<u64>,
}

impl HoldFirst {
    fn new() -> (Arc<HoldFirst>, mpsc::UnboundedReceiver<u64>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = HoldFirst {
            ran: std::sync::Mutex::new(Vec::new()),
            started: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
            done: tx,
        };
        (Arc::new(h), rx)
    }

    fn ran(&self) -> Vec<u64> {
        self.ran.lock().unwrap().clone()
    }
}

impl Handler for HoldFirst {
    async fn run(&self, job: Job) -> AttemptResult {
        let first = {
            let mut ran = self.ran.lock().unwrap();
            ran.push(job.id);
            ran.len() == 1
        };
        if first {
            self.started.notify_one();
            self.release.notified().await;
        }
        let _ = self.done.send(job.id);
        AttemptResult::Done
    }
}

/// One webhook slot, `ahead` jobs leased ahead of it, on `clock`; `tune` sets the rest.
fn one_slot(
    dir: &tempfile::TempDir,
    ahead: usize,
    clock: Arc<dyn Clock>,
    tune: impl FnOnce(&mut KindSettings),
) -> Queue {
    open_on(dir, clock, |s| {
        let k = s.kind_mut(jobs::WEBHOOK);
        k.concurrency = 1;
        k.lease_ahead = ahead;
        tune(k);
    })
}

/// Enqueues webhook jobs keyed `e{i}` for each `i` in `keys`; returns their ids.
async fn enqueue(q: &Queue, keys: std::ops::Range<usize>) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in keys {
        let e = q
            .enqueue(jobs::WEBHOOK, &format!("e{i}"), vec![], None)
            .await
            .unwrap();
        ids.push(e.job.id);
    }
    ids
}

/// A webhook pool running, seen from the test.
struct Running {
    pool: Arc<Pool>,
    /// Every job event since just before the pool started.
    events: tokio::sync::broadcast::Receiver<Event>,
    stop: CancellationToken,
    workers: tokio::task::JoinHandle<connector::queue::Result<()>>,
}

/// Starts a webhook pool running `handler`; returns once `first` holds its first job.
async fn start(q: &Queue, handler: Arc<impl Handler>, first: &HoldFirst) -> Running {
    let events = q.subscribe();
    let pool = Pool::new(jobs::WEBHOOK);
    let stop = CancellationToken::new();
    let workers = tokio::spawn(run_pool(
        q.clone(),
        pool.clone(),
        handler,
        Arc::new(NoObserver),
        stop.clone(),
    ));
    first.started.notified().await;
    Running {
        pool,
        events,
        stop,
        workers,
    }
}

impl Running {
    /// Stops the pool, letting `first`'s held job go, and waits for the loop to end.
    async fn stop(self, first: &HoldFirst) {
        self.stop.cancel();
        first.release.notify_one();
        self.workers.await.unwrap().unwrap();
    }
}

/// Waits until each of jobs `ids` had an event that `want` accepts, in any order.
async fn events_of(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    ids: &[u64],
    want: impl Fn(&EventKind) -> bool,
) {
    let mut left: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    let waiting = async {
        while !left.is_empty() {
            let e = events.recv().await.unwrap();
            if want(&e.what) {
                left.remove(&e.id);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .is_err()
    {
        panic!("no such event within 30s for jobs {left:?}");
    }
}

fn leased(w: &EventKind) -> bool {
    matches!(w, EventKind::Leased { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_leased_ahead_start_as_slots_free_and_go_back_uncounted_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let q = one_slot(&dir, 2, Arc::new(SystemClock), |_| {});
    let ids = enqueue(&q, 0..4).await;
    let (h, mut done) = HoldFirst::new();
    let mut r = start(&q, h.clone(), &h).await;
    // The one slot is busy; two more are leased ahead of it, counted like any lease.
    events_of(&mut r.events, &ids[1..3], leased).await;
    let now = q.now();
    assert_eq!(
        q.get(ids[1]).unwrap().unwrap().state(now),
        JobState::Running
    );
    assert_eq!(q.get(ids[3]).unwrap().unwrap().state(now), JobState::Ready);
    // The slot given back starts the next leased job; the fourth is leased ahead.
    h.release.notify_one();
    assert_eq!(done.recv().await, Some(ids[0]));
    for &id in &ids[1..4] {
        assert_eq!(done.recv().await, Some(id));
    }
    assert_eq!(h.ran(), ids);
    r.stop(&h).await;
    // Stopped with jobs leased ahead: they go back as they were, not interrupted.
    let more = enqueue(&q, 4..7).await;
    let (h2, _) = HoldFirst::new();
    let mut r = start(&q, h2.clone(), &h2).await;
    events_of(&mut r.events, &more[1..3], leased).await;
    r.stop(&h2).await;
    let now = q.now();
    for &id in &more[1..3] {
        let job = q.get(id).unwrap().unwrap();
        assert_eq!(job.state(now), JobState::Ready, "job {id}");
        assert_eq!((job.attempts, job.history.len()), (0, 0), "job {id}");
    }
    assert_eq!(h2.ran(), vec![more[0]]);
    drop(q);
    let path = dir.path().join("queue");
    let (q, rec) = crate::support::wait::when_unlocked(
        &path,
        || Queue::open(&path, jobs::settings(), Arc::new(SystemClock)),
        |e| matches!(e, connector::queue::Error::Locked { .. }),
    )
    .unwrap();
    assert_eq!(rec.interrupted, 0, "nothing was left running");
    assert_eq!(q.stats().unwrap().total(JobState::Ready), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_pool_gives_back_what_it_leased_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let q = one_slot(&dir, 2, Arc::new(SystemClock), |_| {});
    let ids = enqueue(&q, 0..3).await;
    let (h, mut done) = HoldFirst::new();
    let mut r = start(&q, h.clone(), &h).await;
    events_of(&mut r.events, &ids[1..], leased).await;
    assert!(r.pool.set_paused(true));
    events_of(&mut r.events, &ids[1..], |w| {
        matches!(w, EventKind::Retry { .. })
    })
    .await;
    for &id in &ids[1..] {
        let job = q.get(id).unwrap().unwrap();
        assert_eq!(job.state(q.now()), JobState::Ready, "job {id}");
        assert_eq!((job.attempts, job.history.len()), (0, 0), "job {id}");
    }
    // The attempt in flight finishes; nothing else runs while paused.
    h.release.notify_one();
    assert_eq!(done.recv().await, Some(ids[0]));
    assert_eq!(h.ran(), vec![ids[0]]);
    assert!(r.pool.set_paused(false));
    let mut after = vec![done.recv().await.unwrap(), done.recv().await.unwrap()];
    after.sort_unstable();
    assert_eq!(after, ids[1..]);
    for &id in &ids[1..] {
        assert_eq!(q.get(id).unwrap().unwrap().attempts, 1, "job {id}");
    }
    r.stop(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_leased_ahead_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let q = one_slot(&dir, 1, Arc::new(SystemClock), |_| {});
    let ids = enqueue(&q, 0..2).await;
    let (h, mut done) = HoldFirst::new();
    let mut r = start(&q, h.clone(), &h).await;
    events_of(&mut r.events, &ids[1..2], leased).await;
    // An operator cancels it while it waits for the slot.
    q.cancel(ids[1]).await.unwrap();
    let later = enqueue(&q, 2..3).await;
    h.release.notify_one();
    assert_eq!(done.recv().await, Some(ids[0]));
    assert_eq!(done.recv().await, Some(later[0]));
    assert_eq!(h.ran(), vec![ids[0], later[0]], "the cancelled job ran");
    assert_eq!(
        q.get(ids[1]).unwrap().unwrap().state(q.now()),
        JobState::Dead
    );
    r.stop(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leased_ahead_too_long_goes_back_instead_of_running_on_a_short_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    let q = one_slot(&dir, 1, clock.clone(), |k| {
        k.lease_timeout = Duration::from_secs(60)
    });
    let ids = enqueue(&q, 0..2).await;
    let (h, mut done) = HoldFirst::new();
    let mut r = start(&q, h.clone(), &h).await;
    events_of(&mut r.events, &ids[1..], leased).await;
    // The first attempt holds the slot for 31 of the second's 60 lease seconds: less
    // than half is left, so it goes back, uncounted, and is leased afresh.
    clock.advance(Duration::from_secs(31));
    h.release.notify_one();
    events_of(&mut r.events, &ids[1..], |w| {
        matches!(w, EventKind::Retry { .. })
    })
    .await;
    assert_eq!(done.recv().await, Some(ids[0]));
    assert_eq!(done.recv().await, Some(ids[1]));
    events_of(&mut r.events, &ids[1..], |w| *w == EventKind::Done).await;
    let job = q.get(ids[1]).unwrap().unwrap();
    assert_eq!((job.attempts, job.history.len()), (1, 1));
    assert_eq!(job.history[0].started_ms, clock.now_ms());
    r.stop(&h).await;
}

/// Holds the first job it runs until released; hangs on the first attempt of any other.
struct HoldThenHang {
    inner: Arc<HoldFirst>,
}

impl Handler for HoldThenHang {
    async fn run(&self, job: Job) -> AttemptResult {
        if !self.inner.ran().is_empty() && job.attempts == 1 {
            std::future::pending::<()>().await;
        }
        self.inner.run(job).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leased_ahead_runs_only_for_what_is_left_of_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    let q = one_slot(&dir, 1, clock.clone(), |k| {
        k.lease_timeout = Duration::from_secs(2);
        k.ladder = vec![Duration::ZERO, Duration::ZERO];
    });
    let ids = enqueue(&q, 0..2).await;
    let (h, mut done) = HoldFirst::new();
    let handler = Arc::new(HoldThenHang { inner: h.clone() });
    let mut r = start(&q, handler, &h).await;
    events_of(&mut r.events, &ids[1..], leased).await;
    // 600 ms of the second job's 2 s lease go by while it waits for the slot: its
    // attempt gets the 1.4 s left, not a whole lease timeout that would outlive it.
    clock.advance(Duration::from_millis(600));
    h.release.notify_one();
    assert_eq!(done.recv().await, Some(ids[0]));
    assert_eq!(done.recv().await, Some(ids[1]));
    events_of(&mut r.events, &ids[1..], |w| *w == EventKind::Done).await;
    let job = q.get(ids[1]).unwrap().unwrap();
    assert_eq!(
        job.history[0].outcome,
        Outcome::Failed {
            error: "attempt timed out after 1s 400ms".into()
        }
    );
    r.stop(&h).await;
}
