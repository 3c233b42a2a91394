//! What Prometheus costs the agent (issue 7, `GET /metrics`), against baselines in the
//! same run:
//!
//! - `scrape/{jobs}`: one scrape's work — [`Health::scrape`] (the queue's counts by
//!   kind and state, the oldest ready age per kind, per-node users) plus the rendering
//!   of every metric — on a queue of 10,000 and 100,000 jobs (half of them due, half
//!   in the future, over all four kinds), against `stats/{jobs}`: `Queue::stats()`
//!   alone, what `queuectl stats` already pays. Sizes 0, 10,000 and 1,000,000: the
//!   empty queue's scrape is the baseline of the others (issue 15: at most 2× at 1M,
//!   since the counts are kept, not scanned).
//! - `record_attempt`: the counters and histogram one attempt records, against
//!   `atomic_add`, one relaxed atomic increment.
//!
//! Run: `cargo bench --bench metrics` (a few minutes: building the 1M queue takes
//! most). `METRICS_BENCH_JOBS=0,1000` replaces the queue sizes for a quick look.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connector::daemon::health::Health;
use connector::jobs;
use connector::queue::{Commit, Dedupe, NewJob, Pools, Queue, SystemClock};
use connector::telemetry::metrics;
use criterion::{BenchmarkId, Criterion};
use tempfile::TempDir;

/// Jobs per commit while building a queue.
const BUILD_COMMIT: usize = 1_000;

fn sizes() -> Vec<usize> {
    match std::env::var("METRICS_BENCH_JOBS") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("METRICS_BENCH_JOBS is a list of numbers")
            })
            .collect(),
        // The empty queue is the baseline of the 1M one (issue 15: ≤ 2×).
        Err(_) => vec![0, 10_000, 1_000_000],
    }
}

/// A queue of `jobs` pending jobs over every kind, half due now and half in an hour.
fn build(rt: &tokio::runtime::Runtime, jobs: usize) -> (TempDir, Queue) {
    let dir = TempDir::new().expect("temp dir");
    let (queue, _) = Queue::open(
        dir.path().join("queue"),
        jobs::settings(),
        Arc::new(SystemClock),
    )
    .expect("open queue");
    let later = queue.now() + 3_600_000;
    rt.block_on(async {
        for start in (0..jobs).step_by(BUILD_COMMIT) {
            let enqueue = (start..(start + BUILD_COMMIT).min(jobs))
                .map(|i| NewJob {
                    kind: jobs::ALL[i % jobs::ALL.len()],
                    key: format!("bench/{i:09}"),
                    payload: vec![b'x'; 128],
                    not_before: (i % 2 == 1).then_some(later),
                    dedupe: Dedupe::Window,
                })
                .collect();
            queue
                .commit(Commit {
                    enqueue,
                    ..Commit::default()
                })
                .await
                .expect("commit");
        }
    });
    (dir, queue)
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let handle = metrics::install().expect("the recorder installs");
    {
        let mut g = c.benchmark_group("scrape");
        g.sample_size(20);
        for jobs in sizes() {
            let (_dir, queue) = build(&rt, jobs);
            let health = Health {
                queue: queue.clone(),
                nodes: (1..=8).collect(),
                pools: Arc::new(Pools::new(jobs::ALL)),
                tasks: Default::default(),
                cutter: None,
            };
            g.bench_function(BenchmarkId::new("stats", jobs), |b| {
                b.iter(|| black_box(queue.stats().expect("stats")))
            });
            g.bench_function(BenchmarkId::new("scrape", jobs), |b| {
                b.iter(|| {
                    let s = health.scrape().expect("scrape");
                    black_box(metrics::render(handle, &s))
                })
            });
            let text = metrics::render(handle, &health.scrape().expect("scrape"));
            eprintln!(
                "NOTE scrape of {jobs} jobs: {} bytes, {} lines of exposition",
                text.len(),
                text.lines().count()
            );
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("record_attempt");
        let counter = AtomicU64::new(0);
        g.bench_function("atomic_add", |b| {
            b.iter(|| counter.fetch_add(black_box(1), Ordering::Relaxed))
        });
        g.bench_function("attempt", |b| {
            b.iter(|| metrics::attempt(jobs::WEBHOOK, "done", black_box(Duration::from_millis(3))))
        });
        g.finish();
    }
    c.final_summary();
}
