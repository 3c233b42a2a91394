//! Queue benchmarks (issue 2, "Benchmarks"), all in one run:
//!
//! - `baseline_sled`: sled alone, configured as the queue configures it. One `insert`
//!   then a durable write per item, and a batch of N inserts sharing one durable write;
//!   each with sled's `flush` only and with `flush` + `fdatasync` (what the queue's group
//!   commit does, `commit.rs`). The floor and the ceiling the queue sits between.
//! - `enqueue_durable`: enqueues/s with 1, 8 and 64 concurrent producers; each enqueue
//!   returns only after the group-commit flush that covers it.
//! - `round_trip`: enqueue → lease → ack, one at a time, with 64 in flight (each task
//!   enqueues, leases one, acks it), and through the real worker loop (`run_workers`,
//!   concurrency 64, batch leases) fed by 64 producers.
//! - `recovery`: `Queue::open` + first `stats()` on a queue of 1,000,000 pending jobs,
//!   and again with 1,000 of them left running by a "dead" process (leased, then the
//!   queue dropped without acking).
//!
//! Criterion has no unit for bytes, so bytes on disk per pending job (sled's
//! `size_on_disk` and a walk of the directory) and a few other facts are printed on
//! stderr as `NOTE` lines, with the machine's core count and load average before and
//! after (the numbers depend on what else the machine is doing).
//!
//! Run: `cargo bench --bench queue` (about 3 minutes on 2 cores).
//! `QUEUE_BENCH_JOBS=100000` shrinks the recovery queue for a quick look. Every data dir
//! is a `tempfile::TempDir` and deletes itself.
//!
//! Jobs are `webhook` jobs (first rung 0s, so due at once) with a unique key and a
//! 128-byte payload, about the size of a real relay callback.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use connector::jobs;
use connector::queue::{
    AttemptResult, Commit, Dedupe, Error, Handler, Job, JobKind, JobState, NewJob, Queue, Recovery,
    Settings, Stored, SystemClock, record, run_workers,
};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const KIND: JobKind = jobs::WEBHOOK;
const PAYLOAD_LEN: usize = 128;
const RECOVERY_JOBS: u64 = 1_000_000;
const LEFT_RUNNING: usize = 1_000;
/// Jobs per `Queue::commit` when building the big queue.
const BUILD_COMMIT: u64 = 1_000;

/// Idempotency keys must be unique or enqueue dedupes; one counter for the whole run.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn next_key() -> String {
    format!("bench-{:012}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

fn payload() -> Vec<u8> {
    let mut p =
        br#"{"relay":"r-1","event":"connect","user":"u-12345","node":"n-7","bytes":"#.to_vec();
    p.resize(PAYLOAD_LEN, b'0');
    p
}

/// The runtime the agent runs on: multi-thread, one worker per core.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

fn settings() -> Settings {
    let mut s = jobs::settings();
    let k = s.kind_mut(KIND);
    // The worker-pool round trip runs 64 attempts at once.
    k.concurrency = 64;
    // Every rung 0s: the recovery bench interrupts the same jobs again and again (a
    // small QUEUE_BENCH_JOBS queue many times over); they must stay ready, not go dead.
    k.ladder = vec![Duration::ZERO; 64];
    s
}

fn open(path: &Path) -> (Queue, Recovery) {
    // sled lets go of its file lock from a background thread a moment after the last
    // handle is dropped, so a reopen right after a drop can find it still locked.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Queue::open(path, settings(), Arc::new(SystemClock)) {
            Err(Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r.expect("open queue"),
        }
    }
}

/// A queue in a temp dir. Field order matters: the queue (and its flush thread) is
/// dropped before the directory is deleted.
struct Fixture {
    queue: Queue,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = TempDir::new().expect("temp dir");
        let (queue, _) = open(&dir.path().join("queue"));
        Self { queue, _dir: dir }
    }

    /// Bytes on disk per job so far, as a `NOTE` line.
    fn note_size(&self, what: &str) {
        let stats = self.queue.stats().expect("stats");
        let jobs: u64 = JobState::ALL.iter().map(|&s| stats.total(s)).sum();
        note_bytes(what, &self.queue, self.queue.path(), jobs);
    }
}

fn note(line: impl std::fmt::Display) {
    eprintln!("NOTE {line}");
}

/// Cores, load average and kernel: what the numbers were measured on.
fn note_machine(when: &str) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    note(format_args!(
        "machine ({when}): {cores} cores, load average {}, kernel {}, temp dir {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        kernel.trim(),
        std::env::temp_dir().display(),
    ));
}

async fn enqueue_one(q: &Queue) {
    let out = q
        .enqueue(KIND, &next_key(), payload(), None)
        .await
        .expect("enqueue");
    assert!(!out.duplicate);
}

/// Enqueue, lease one job, ack it. With many in flight a task may lease another task's
/// job; that is fine: every task enqueues before it leases, so one is always due.
async fn round_trip(q: &Queue) {
    enqueue_one(q).await;
    loop {
        let leased = q.lease(KIND, 1).await.expect("lease");
        if let Some(job) = leased.into_iter().next() {
            q.ack(job.token()).await.expect("ack");
            return;
        }
        // Only if the wall clock stepped back a millisecond: the job is not due yet.
        tokio::task::yield_now().await;
    }
}

/// A handler that succeeds at once: the worker loop's own cost, nothing else.
struct Succeed;

impl Handler for Succeed {
    fn run(&self, _job: Job) -> impl Future<Output = AttemptResult> + Send {
        std::future::ready(AttemptResult::Done)
    }
}

/// `jobs` enqueued by `producers` tasks and worked by `run_workers` (lease in batches,
/// ack each); returns the time until the last one is done.
async fn worker_pool(q: Queue, jobs: u64, producers: u64) -> Duration {
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        q.clone(),
        KIND,
        Arc::new(Succeed),
        shutdown.clone(),
    ));
    let start = Instant::now();
    let producing = {
        let q = q.clone();
        concurrently(jobs, producers, move || {
            let q = q.clone();
            async move { enqueue_one(&q).await }
        })
    };
    producing.await;
    // Every job is enqueued; it is done once none is pending (checked first) or running.
    while q.next_due(KIND).expect("next due").is_some()
        || q.running_count(KIND).expect("running") > 0
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    workers
        .await
        .expect("worker loop panicked")
        .expect("worker loop");
    elapsed
}

/// Runs `total` operations spread over `tasks` concurrent tasks (each runs its share one
/// after another) and returns the wall time from first start to last finish.
async fn concurrently<F, Fut>(total: u64, tasks: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let tasks = tasks.clamp(1, total.max(1));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let share = total / tasks + u64::from(t < total % tasks);
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..share {
                    op().await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("bench task panicked");
    }
    start.elapsed()
}

fn throughput_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    // Flat: every sample runs the same number of operations, so the 64-task runs never
    // get a sample too small to keep 64 busy. 10 samples of ~0.5 s each per bench.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    g
}

// ---- baselines: sled alone ----

/// A value the size of a freshly enqueued job record, so the baselines write what the
/// queue writes for its job (without its three index and metadata keys).
fn job_record() -> Vec<u8> {
    record::encode_job(&Job {
        id: 1_000_000,
        kind: KIND,
        key: "bench-000001000000".into(),
        payload: payload(),
        created_ms: 1_760_000_000_000,
        stored: Stored::Pending {
            due_ms: 1_760_000_000_000,
        },
        attempts: 0,
        history: Vec::new(),
    })
}

/// sled configured as `Queue::open` configures it, and a handle on its log file for
/// `fdatasync`.
fn raw_sled(dir: &TempDir) -> (sled::Db, std::fs::File) {
    let path = dir.path().join("raw");
    let db = sled::Config::new()
        .path(&path)
        .flush_every_ms(None)
        .cache_capacity(256 * 1024 * 1024)
        .open()
        .expect("open sled");
    let file = std::fs::File::open(path.join("db")).expect("open sled's log file");
    (db, file)
}

/// How far a baseline goes to make its writes durable.
#[derive(Clone, Copy)]
enum Sync {
    /// `Db::flush` only (sled writes its log with `sync_file_range`).
    Flush,
    /// `Db::flush` and `fdatasync` of the log file, as the queue's group commit does.
    FlushFdatasync,
}

impl Sync {
    fn name(self) -> &'static str {
        match self {
            Sync::Flush => "flush",
            Sync::FlushFdatasync => "flush_fdatasync",
        }
    }

    fn run(self, db: &sled::Db, file: &std::fs::File) {
        db.flush().expect("flush");
        if let Sync::FlushFdatasync = self {
            file.sync_data().expect("fdatasync");
        }
    }
}

fn baseline_sled(c: &mut Criterion) {
    let value = job_record();
    let mut g = throughput_group(c, "baseline_sled");
    for sync in [Sync::Flush, Sync::FlushFdatasync] {
        let dir = TempDir::new().expect("temp dir");
        let (db, file) = raw_sled(&dir);
        let mut id = 0u64;
        let mut insert = |db: &sled::Db| {
            id += 1;
            let mut key = [b'j'; 9];
            key[1..].copy_from_slice(&id.to_be_bytes());
            db.insert(key, value.as_slice()).expect("insert");
        };
        // Every item is its own durable write: where a queue without group commit sits.
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("insert_each_then_{}", sync.name()), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    insert(&db);
                    sync.run(&db, &file);
                }
                start.elapsed()
            })
        });
        // N inserts share one durable write: what perfect group commit could reach.
        for n in [64u64, 1024] {
            g.throughput(Throughput::Elements(n));
            g.bench_with_input(
                BenchmarkId::new(format!("insert_batch_then_one_{}", sync.name()), n),
                &n,
                |b, &n| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            for _ in 0..n {
                                insert(&db);
                            }
                            sync.run(&db, &file);
                        }
                        start.elapsed()
                    })
                },
            );
        }
    }
    g.finish();
}

// ---- the queue ----

fn enqueue_durable(c: &mut Criterion) {
    let rt = runtime();
    let mut g = throughput_group(c, "enqueue_durable");
    for producers in [1u64, 8, 64] {
        // A fresh queue per producer count, so each starts from the same (empty) size.
        let fx = Fixture::new();
        g.bench_with_input(
            BenchmarkId::new("producers", producers),
            &producers,
            |b, &producers| {
                b.to_async(&rt).iter_custom(|iters| {
                    let q = fx.queue.clone();
                    concurrently(iters, producers, move || {
                        let q = q.clone();
                        async move { enqueue_one(&q).await }
                    })
                })
            },
        );
        if producers == 64 && fx.queue.next_due(KIND).expect("next due").is_some() {
            fx.note_size("enqueue_durable/producers/64 queue (jobs enqueued one by one)");
        }
    }
    g.finish();
}

fn round_trips(c: &mut Criterion) {
    let rt = runtime();
    let mut g = throughput_group(c, "round_trip");
    for in_flight in [1u64, 64] {
        let fx = Fixture::new();
        g.bench_with_input(
            BenchmarkId::new("in_flight", in_flight),
            &in_flight,
            |b, &in_flight| {
                b.to_async(&rt).iter_custom(|iters| {
                    let q = fx.queue.clone();
                    concurrently(iters, in_flight, move || {
                        let q = q.clone();
                        async move { round_trip(&q).await }
                    })
                })
            },
        );
        let stats = fx.queue.stats().expect("stats");
        assert_eq!(stats.total(JobState::Running), 0);
        assert_eq!(stats.total(JobState::Ready), 0);
    }

    let fx = Fixture::new();
    g.bench_function(BenchmarkId::new("worker_pool", 64), |b| {
        b.to_async(&rt)
            .iter_custom(|iters| worker_pool(fx.queue.clone(), iters, 64))
    });
    let stats = fx.queue.stats().expect("stats");
    assert_eq!(stats.total(JobState::Running), 0);
    assert_eq!(stats.total(JobState::Ready), 0);
    g.finish();
}

// ---- recovery ----

/// Apparent and allocated bytes of every file under `path`.
fn dir_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    for entry in std::fs::read_dir(path).expect("read dir") {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            let (a, b) = dir_size(&entry.path());
            apparent += a;
            allocated += b;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    (apparent, allocated)
}

fn note_bytes(what: &str, q: &Queue, path: &Path, jobs: u64) {
    let sled_bytes = q.size_on_disk().expect("size on disk");
    let (apparent, allocated) = dir_size(path);
    let per = |b: u64| b as f64 / jobs.max(1) as f64;
    note(format_args!(
        "BYTES PER JOB, {what}: {jobs} jobs ({PAYLOAD_LEN}-byte payload, {}-byte record): \
         size_on_disk() {sled_bytes} B = {:.0} B/job; directory walk {apparent} B apparent \
         = {:.0} B/job, {allocated} B allocated = {:.0} B/job",
        job_record().len(),
        per(sled_bytes),
        per(apparent),
        per(allocated),
    ));
}

/// A queue of `jobs` pending jobs in its own temp dir, written by the queue itself
/// (`Queue::commit`, `BUILD_COMMIT` jobs per commit, so the build takes seconds, not
/// minutes). Notes what it took and how many bytes each job costs on disk.
struct BigQueue {
    jobs: u64,
    path: PathBuf,
    _dir: TempDir,
}

impl BigQueue {
    fn build(rt: &Runtime, jobs: u64) -> Self {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().join("queue");
        let (q, _) = open(&path);
        let start = Instant::now();
        rt.block_on(async {
            let mut left = jobs;
            while left > 0 {
                let n = left.min(BUILD_COMMIT);
                left -= n;
                let enqueue = (0..n)
                    .map(|_| NewJob {
                        kind: KIND,
                        key: next_key(),
                        payload: payload(),
                        not_before: None,
                        dedupe: Dedupe::Window,
                    })
                    .collect();
                q.commit(Commit {
                    enqueue,
                    ..Commit::default()
                })
                .await
                .expect("commit");
            }
            q.flush().await.expect("flush");
        });
        let took = start.elapsed();
        note(format_args!(
            "recovery: built {jobs} pending jobs in {:.1} s ({:.0} jobs/s, {BUILD_COMMIT} per commit)",
            took.as_secs_f64(),
            jobs as f64 / took.as_secs_f64()
        ));
        note_bytes("recovery queue after flush", &q, &path, jobs);
        drop(q);

        // One untimed pass that splits open from stats, to see which part costs.
        let t = Instant::now();
        let (q, _) = open(&path);
        let opened = t.elapsed();
        let t = Instant::now();
        let stats = q.stats().expect("stats");
        let counted = t.elapsed();
        assert_eq!(stats.total(JobState::Ready), jobs);
        note(format_args!(
            "recovery: first open took {:.0} ms, then stats {:.0} ms ({jobs} pending)",
            opened.as_secs_f64() * 1e3,
            counted.as_secs_f64() * 1e3
        ));
        Self {
            jobs,
            path,
            _dir: dir,
        }
    }
}

fn recovery(c: &mut Criterion) {
    let jobs = std::env::var("QUEUE_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RECOVERY_JOBS);
    let rt = runtime();
    // Built on first use, so a filtered run that skips these benches skips the build.
    let big = std::cell::OnceCell::new();
    let big = || big.get_or_init(|| BigQueue::build(&rt, jobs));

    let mut g = c.benchmark_group("recovery");
    // Each open takes most of a second: 10 samples of one open each.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15));

    g.bench_function(BenchmarkId::new("open_stats_pending", jobs), |b| {
        let big = big();
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let (q, rec) = open(&big.path);
                let stats = q.stats().expect("stats");
                timed += t.elapsed();
                assert_eq!(rec.interrupted, 0);
                assert_eq!(stats.total(JobState::Ready), big.jobs);
                // Untimed: dropping flushes (nothing is dirty) and releases sled's lock.
                drop(q);
            }
            timed
        })
    });

    g.bench_function(
        BenchmarkId::new(format!("open_stats_{LEFT_RUNNING}_running"), jobs),
        |b| {
            let big = big();
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Untimed: a process leases 1,000 jobs and goes away without acking.
                    {
                        let (q, _) = open(&big.path);
                        let leased = rt.block_on(q.lease(KIND, LEFT_RUNNING)).expect("lease");
                        assert_eq!(leased.len(), LEFT_RUNNING);
                    }
                    let t = Instant::now();
                    let (q, rec) = open(&big.path);
                    let stats = q.stats().expect("stats");
                    timed += t.elapsed();
                    assert_eq!(rec.interrupted, LEFT_RUNNING as u64);
                    assert_eq!(stats.total(JobState::Running), 0);
                    assert_eq!(stats.total(JobState::Ready), big.jobs);
                    drop(q);
                }
                timed
            })
        },
    );
    g.finish();
}

fn main() {
    note_machine("start");
    let mut c = Criterion::default().configure_from_args();
    baseline_sled(&mut c);
    enqueue_durable(&mut c);
    round_trips(&mut c);
    recovery(&mut c);
    c.final_summary();
    note_machine("end");
}
