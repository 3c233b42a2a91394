//! The worker loop: per-kind concurrency, hung attempts, and a shutdown that lets running
//! attempts finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use connector::jobs;
use connector::queue::{
    AttemptResult, Handler, Job, JobState, Outcome, Queue, Settings, SystemClock, run_workers,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

fn open(dir: &tempfile::TempDir, tune: impl FnOnce(&mut Settings)) -> Queue {
    let mut settings = jobs::settings();
    tune(&mut settings);
    Queue::open(dir.path().join("queue"), settings, Arc::new(SystemClock))
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
