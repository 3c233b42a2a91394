//! Property test of the queue's state machine against a reference model (SPEC §2).
//!
//! Random sequences of enqueue / lease / ack / fail / stale reports / clock moves / lease
//! expiry / maintenance / retry / cancel / purge / close-and-reopen run against a real
//! queue on a virtual clock and, step by step, against [`Model`]: a plain map of jobs that
//! follows SPEC §2 and knows nothing of sled, keys or indexes. After every step the queue
//! must equal the model exactly — every job with its state, due time, attempts and
//! history — and so must what the queue derives from its indexes (`stats`, `next_due`,
//! `running_count`, `list --state`). That is: no job is lost, none is in two states, none
//! is leased twice at once, and every retry is due exactly on its rung in virtual time.
//! Each case ends with one more close-and-reopen, after which everything must still be
//! there.
//!
//! `PROPTEST_CASES` overrides the number of cases (default 256).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use connector::jobs;
use connector::queue::record::HISTORY_LIMIT;
use connector::queue::{
    Attempt, DeadReason, Error, Job, JobKind, JobState, LeaseToken, ListFilter, ManualClock,
    OnExhausted, Outcome, PurgeFilter, Queue, Recovery, Settings, Stored,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

use crate::support::wait;

/// Virtual start time: 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const SEC: u64 = 1000;
/// Short, so that done jobs leave the window within a case.
const WINDOW_MS: u64 = 120 * SEC;
/// A small key space, so that duplicates are common.
const KEYS: [&str; 3] = ["a", "b", "c"];

/// The per-kind settings under test: both exhaustion policies, a first rung that delays
/// the first attempt, and a one-rung ladder.
struct Plan {
    kind: JobKind,
    ladder_s: &'static [u64],
    on_exhausted: OnExhausted,
    lease_s: u64,
}

const PLANS: [Plan; 4] = [
    Plan {
        kind: jobs::NODE_SYNC,
        ladder_s: &[0, 10, 50],
        on_exhausted: OnExhausted::Dead,
        lease_s: 30,
    },
    Plan {
        kind: jobs::TRAFFIC_REPORT,
        ladder_s: &[0, 10, 50],
        on_exhausted: OnExhausted::RepeatLast,
        lease_s: 20,
    },
    Plan {
        kind: jobs::WEBHOOK,
        ladder_s: &[5, 20],
        on_exhausted: OnExhausted::Dead,
        lease_s: 15,
    },
    Plan {
        kind: jobs::XRAY_APPLY,
        ladder_s: &[2],
        on_exhausted: OnExhausted::RepeatLast,
        lease_s: 10,
    },
];

fn plan(kind: JobKind) -> &'static Plan {
    PLANS
        .iter()
        .find(|p| p.kind == kind)
        .expect("every kind has a plan")
}

fn settings() -> Settings {
    let mut s = jobs::settings();
    s.dedupe_window = Duration::from_millis(WINDOW_MS);
    for p in &PLANS {
        let k = s.kind_mut(p.kind);
        k.ladder = p.ladder_s.iter().map(|&x| Duration::from_secs(x)).collect();
        k.on_exhausted = p.on_exhausted;
        k.lease_timeout = Duration::from_secs(p.lease_s);
    }
    s
}

impl Plan {
    /// SPEC §2: after failure N the next attempt is due `ladder[N]` later; past the end of
    /// the ladder the kind's policy applies (`dead`, or the last rung forever). A
    /// Retry-After pushes the attempt later, never earlier.
    fn after_failure(&self, attempts: u32, retry_after_ms: Option<u64>) -> Option<u64> {
        let rung = match self.ladder_s.get(attempts as usize) {
            Some(&s) => s * SEC,
            None => match self.on_exhausted {
                OnExhausted::Dead => return None,
                OnExhausted::RepeatLast => self.ladder_s.last().copied().unwrap_or(0) * SEC,
            },
        };
        Some(rung.max(retry_after_ms.unwrap_or(0)))
    }

    /// SPEC §2: an interrupted attempt (process gone, lease expired) counts; the job runs
    /// again at once while rungs remain, else as after a failure.
    fn after_interruption(&self, attempts: u32) -> Option<u64> {
        if (attempts as usize) < self.ladder_s.len() {
            Some(0)
        } else {
            self.after_failure(attempts, None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------

/// The error a call is expected to fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    NotFound(u64),
    LeaseLost(LeaseToken),
    InvalidState,
    KeyTaken,
}

impl Expect {
    fn matches(self, e: &Error) -> bool {
        match (self, e) {
            (Expect::NotFound(want), Error::NotFound(id)) => want == *id,
            (Expect::LeaseLost(t), Error::LeaseLost { id, attempt }) => {
                t.id == *id && t.attempt == *attempt
            }
            (Expect::InvalidState, Error::InvalidState { .. }) => true,
            (Expect::KeyTaken, Error::KeyTaken { .. }) => true,
            _ => false,
        }
    }
}

/// Every job the queue should hold, as SPEC §2 describes it.
struct Model {
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    now: u64,
}

fn state_of(j: &Job, now: u64) -> JobState {
    match j.stored {
        Stored::Pending { due_ms } if due_ms <= now => JobState::Ready,
        Stored::Pending { .. } => JobState::Scheduled,
        Stored::Running { .. } => JobState::Running,
        Stored::Done { .. } => JobState::Done,
        Stored::Dead { .. } => JobState::Dead,
    }
}

fn push_attempt(j: &mut Job, a: Attempt) {
    j.history.push(a);
    if j.history.len() > HISTORY_LIMIT {
        j.history.remove(0);
    }
}

impl Model {
    fn new(now: u64) -> Self {
        Model {
            jobs: BTreeMap::new(),
            next_id: 1,
            now,
        }
    }

    /// A job holds its key while pending, running, or done within the dedupe window.
    fn holds_key(&self, j: &Job) -> bool {
        match j.stored {
            Stored::Pending { .. } | Stored::Running { .. } => true,
            Stored::Done { at_ms } => at_ms + WINDOW_MS > self.now,
            Stored::Dead { .. } => false,
        }
    }

    /// The job, other than `except`, that holds a key. At most one ever does.
    fn holder(&self, kind: JobKind, key: &str, except: u64) -> Option<&Job> {
        let mut holders = self
            .jobs
            .values()
            .filter(|j| j.id != except && j.kind == kind && j.key == key && self.holds_key(j));
        let first = holders.next();
        assert!(
            holders.next().is_none(),
            "model: two jobs hold key {kind}/{key}"
        );
        first
    }

    fn enqueue(
        &mut self,
        kind: JobKind,
        key: &str,
        payload: Vec<u8>,
        not_before: Option<u64>,
    ) -> (Job, bool) {
        // Ids start at 1: `except` 0 excludes nothing.
        if let Some(j) = self.holder(kind, key, 0) {
            return (j.clone(), true);
        }
        let id = self.next_id;
        self.next_id += 1;
        let due = not_before.unwrap_or(self.now).max(self.now) + plan(kind).ladder_s[0] * SEC;
        let job = Job {
            id,
            kind,
            key: key.to_owned(),
            payload,
            created_ms: self.now,
            stored: Stored::Pending { due_ms: due },
            attempts: 0,
            history: Vec::new(),
        };
        self.jobs.insert(id, job.clone());
        (job, false)
    }

    /// Up to `max` ready jobs of `kind`, oldest due first (ties by id).
    fn lease(&mut self, kind: JobKind, max: usize) -> Vec<Job> {
        let now = self.now;
        let mut due: Vec<(u64, u64)> = self
            .jobs
            .values()
            .filter(|j| j.kind == kind)
            .filter_map(|j| match j.stored {
                Stored::Pending { due_ms } if due_ms <= now => Some((due_ms, j.id)),
                _ => None,
            })
            .collect();
        due.sort_unstable();
        due.into_iter()
            .take(max)
            .map(|(_, id)| {
                let j = self.jobs.get_mut(&id).expect("listed above");
                j.attempts += 1;
                j.stored = Stored::Running {
                    started_ms: now,
                    lease_until_ms: now + plan(kind).lease_s * SEC,
                };
                j.clone()
            })
            .collect()
    }

    /// Whether `t` is the job's current lease.
    fn lease_valid(&self, t: LeaseToken) -> bool {
        self.jobs
            .get(&t.id)
            .is_some_and(|j| matches!(j.stored, Stored::Running { .. }) && j.attempts == t.attempt)
    }

    /// ack (`failure` None) or fail (`failure` = error, retry-after).
    fn report(
        &mut self,
        t: LeaseToken,
        failure: Option<(String, Option<u64>)>,
    ) -> Result<Job, Expect> {
        let now = self.now;
        let j = self.jobs.get_mut(&t.id).ok_or(Expect::NotFound(t.id))?;
        let started_ms = match j.stored {
            Stored::Running { started_ms, .. } if j.attempts == t.attempt => started_ms,
            _ => return Err(Expect::LeaseLost(t)),
        };
        let attempt = |outcome| Attempt {
            number: t.attempt,
            started_ms,
            duration_ms: now - started_ms,
            outcome,
            note: None,
        };
        match failure {
            None => {
                push_attempt(j, attempt(Outcome::Succeeded));
                j.stored = Stored::Done { at_ms: now };
            }
            Some((error, retry_after)) => {
                push_attempt(j, attempt(Outcome::Failed { error }));
                j.stored = match plan(j.kind).after_failure(j.attempts, retry_after) {
                    Some(d) => Stored::Pending { due_ms: now + d },
                    None => Stored::Dead {
                        at_ms: now,
                        reason: DeadReason::Exhausted,
                    },
                };
            }
        }
        Ok(j.clone())
    }

    /// Ends a running job's attempt without a result; true when that exhausted it.
    fn interrupt(&mut self, id: u64, outcome: Outcome) -> bool {
        let now = self.now;
        let j = self.jobs.get_mut(&id).expect("interrupting a known job");
        let Stored::Running { started_ms, .. } = j.stored else {
            panic!("model: interrupting job {id}, which is not running");
        };
        push_attempt(
            j,
            Attempt {
                number: j.attempts,
                started_ms,
                duration_ms: now - started_ms,
                outcome,
                note: None,
            },
        );
        match plan(j.kind).after_interruption(j.attempts) {
            Some(d) => {
                j.stored = Stored::Pending { due_ms: now + d };
                false
            }
            None => {
                j.stored = Stored::Dead {
                    at_ms: now,
                    reason: DeadReason::Exhausted,
                };
                true
            }
        }
    }

    fn running_ids(&self, select: impl Fn(u64) -> bool) -> Vec<u64> {
        self.jobs
            .values()
            .filter(|j| matches!(j.stored, Stored::Running { lease_until_ms, .. } if select(lease_until_ms)))
            .map(|j| j.id)
            .collect()
    }

    /// Leases that ran out make their jobs ready again (the attempt counts).
    fn reap(&mut self) -> u64 {
        let now = self.now;
        let ids = self.running_ids(|until| until <= now);
        for &id in &ids {
            self.interrupt(id, Outcome::LeaseExpired);
        }
        ids.len() as u64
    }

    /// What a restart finds: every running job was interrupted.
    fn reopen(&mut self) -> Recovery {
        let ids = self.running_ids(|_| true);
        let mut rec = Recovery::default();
        for id in ids {
            rec.interrupted += 1;
            let outcome = Outcome::Interrupted {
                reason: String::new(),
            };
            if self.interrupt(id, outcome) {
                rec.exhausted += 1;
            }
        }
        rec
    }

    fn cancel(&mut self, id: u64) -> Result<Job, Expect> {
        let now = self.now;
        let j = self.jobs.get_mut(&id).ok_or(Expect::NotFound(id))?;
        match j.stored {
            Stored::Pending { .. } => {}
            Stored::Running { started_ms, .. } => push_attempt(
                j,
                Attempt {
                    number: j.attempts,
                    started_ms,
                    duration_ms: now - started_ms,
                    outcome: Outcome::Interrupted {
                        reason: String::new(),
                    },
                    note: None,
                },
            ),
            Stored::Done { .. } | Stored::Dead { .. } => return Err(Expect::InvalidState),
        }
        j.stored = Stored::Dead {
            at_ms: now,
            reason: DeadReason::Cancelled,
        };
        Ok(j.clone())
    }

    /// A dead or scheduled job becomes due now, unless another job holds its key.
    fn retry(&mut self, id: u64) -> Result<Job, Expect> {
        let now = self.now;
        let j = self.jobs.get(&id).ok_or(Expect::NotFound(id))?;
        if !matches!(state_of(j, now), JobState::Dead | JobState::Scheduled) {
            return Err(Expect::InvalidState);
        }
        if self.holder(j.kind, &j.key, id).is_some() {
            return Err(Expect::KeyTaken);
        }
        let j = self.jobs.get_mut(&id).expect("found above");
        j.stored = Stored::Pending { due_ms: now };
        Ok(j.clone())
    }

    /// Retries the dead jobs (of a kind), in the order they died; those whose key another
    /// job holds stay dead.
    fn retry_dead(&mut self, kind: Option<JobKind>) -> u64 {
        let mut dead: Vec<(u64, u64)> = self
            .jobs
            .values()
            .filter(|j| kind.is_none_or(|k| k == j.kind))
            .filter_map(|j| match j.stored {
                Stored::Dead { at_ms, .. } => Some((at_ms, j.id)),
                _ => None,
            })
            .collect();
        dead.sort_unstable();
        let mut n = 0;
        for (_, id) in dead {
            match self.retry(id) {
                Ok(_) => n += 1,
                Err(Expect::KeyTaken) => {}
                Err(e) => panic!("model: retrying dead job {id}: {e:?}"),
            }
        }
        n
    }

    fn purge(&mut self, state: JobState, older_than_ms: Option<u64>) -> Result<u64, Expect> {
        if !matches!(state, JobState::Done | JobState::Dead) {
            return Err(Expect::InvalidState);
        }
        let cutoff = older_than_ms.map_or(u64::MAX, |d| self.now.saturating_sub(d));
        let before = self.jobs.len();
        self.jobs.retain(|_, j| match j.stored {
            Stored::Done { at_ms } if state == JobState::Done => at_ms > cutoff,
            Stored::Dead { at_ms, .. } if state == JobState::Dead => at_ms > cutoff,
            _ => true,
        });
        Ok((before - self.jobs.len()) as u64)
    }

    /// Done jobs past the dedupe window are deleted; expired leases are reaped.
    fn maintain(&mut self) -> (u64, u64) {
        let swept = self
            .purge(JobState::Done, Some(WINDOW_MS))
            .expect("done is purgeable");
        (swept, self.reap())
    }
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// `not_before_s` is relative to now (negative: in the past).
    Enqueue {
        kind: usize,
        key: usize,
        not_before_s: Option<i64>,
    },
    /// `kind` picks among the kinds that have a ready job (all kinds when none has), so
    /// that most leases get something.
    Lease {
        kind: Index,
        max: usize,
    },
    /// Report on one of the leases handed out and not yet reported (if any).
    Ack {
        lease: Index,
    },
    Fail {
        lease: Index,
        retry_after_s: Option<u64>,
    },
    /// Report again on a lease already reported on: must be refused, changing nothing.
    Stale {
        token: Index,
        ack: bool,
    },
    Advance {
        ms: u64,
    },
    Reap,
    Maintain,
    /// `job` picks among every id ever handed out, plus one never handed out.
    Retry {
        job: Index,
    },
    RetryDead {
        kind: Option<usize>,
    },
    Cancel {
        job: Index,
    },
    Purge {
        state: JobState,
        older_than_s: Option<u64>,
    },
    Reopen,
}

fn kind_index() -> impl Strategy<Value = usize> {
    0..PLANS.len()
}

fn op() -> impl Strategy<Value = Op> {
    // Rungs, lease timeouts and the dedupe window exactly, and around them.
    let advance = prop_oneof![
        Just(0),
        Just(1),
        Just(2 * SEC),
        Just(5 * SEC),
        Just(10 * SEC),
        Just(15 * SEC),
        Just(20 * SEC),
        Just(30 * SEC),
        Just(50 * SEC),
        Just(WINDOW_MS),
        Just(WINDOW_MS + 1),
        0..200 * SEC,
    ];
    let not_before =
        prop::option::weighted(0.3, prop_oneof![Just(-5i64), Just(7), Just(10), -30i64..60]);
    let retry_after =
        prop::option::weighted(0.3, prop_oneof![Just(5u64), Just(15), Just(60), 0u64..100]);
    let purge_state = prop_oneof![
        4 => Just(JobState::Done),
        4 => Just(JobState::Dead),
        1 => Just(JobState::Ready),
    ];
    let older_than = prop::option::of(prop_oneof![Just(0u64), Just(30), Just(120)]);
    prop_oneof![
        5 => (kind_index(), 0..KEYS.len(), not_before).prop_map(|(kind, key, not_before_s)| {
            Op::Enqueue { kind, key, not_before_s }
        }),
        8 => (any::<Index>(), prop_oneof![1 => Just(0usize), 8 => 1usize..4])
            .prop_map(|(kind, max)| Op::Lease { kind, max }),
        4 => any::<Index>().prop_map(|lease| Op::Ack { lease }),
        6 => (any::<Index>(), retry_after)
            .prop_map(|(lease, retry_after_s)| Op::Fail { lease, retry_after_s }),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(token, ack)| Op::Stale { token, ack }),
        6 => advance.prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Reap),
        1 => Just(Op::Maintain),
        2 => any::<Index>().prop_map(|job| Op::Retry { job }),
        1 => prop::option::of(kind_index()).prop_map(|kind| Op::RetryDead { kind }),
        2 => any::<Index>().prop_map(|job| Op::Cancel { job }),
        1 => (purge_state, older_than)
            .prop_map(|(state, older_than_s)| Op::Purge { state, older_than_s }),
        1 => Just(Op::Reopen),
    ]
}

// ---------------------------------------------------------------------------------------
// Running a sequence against both
// ---------------------------------------------------------------------------------------

fn storage<T>(r: Result<T, Error>, what: &str) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: unexpected queue error: {e}")))
}

/// The queue's job, with what the model leaves open (the wording of an interruption).
fn norm(j: &Job) -> Job {
    let mut j = j.clone();
    for a in &mut j.history {
        if let Outcome::Interrupted { reason } = &mut a.outcome {
            reason.clear();
        }
    }
    j
}

fn same<T: PartialEq + std::fmt::Debug>(
    got: Result<T, Error>,
    want: Result<T, Expect>,
    what: &str,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(g), Ok(w)) => prop_assert_eq!(g, w, "{}", what),
        (Err(e), Err(x)) if x.matches(&e) => {}
        (g, w) => {
            return Err(TestCaseError::fail(format!(
                "{what}: queue returned {g:?}, model expects {w:?}"
            )));
        }
    }
    Ok(())
}

fn norm_result(r: Result<Job, Error>) -> Result<Job, Error> {
    r.map(|j| norm(&j))
}

struct Harness {
    // Dropped before `dir`.
    queue: Option<Queue>,
    clock: Arc<ManualClock>,
    path: PathBuf,
    model: Model,
    /// Leases handed out and not yet reported on.
    held: Vec<LeaseToken>,
    /// Leases already reported on (successfully or not).
    used: Vec<LeaseToken>,
    _dir: tempfile::TempDir,
}

/// A fresh directory; on tmpfs when there is one (the queue's fsyncs are what they are
/// on any file system, and this test is about states, not the disk).
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("queue-model")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temp dir")
}

impl Harness {
    fn open() -> Result<Self, TestCaseError> {
        let dir = tempdir();
        let path = dir.path().join("queue");
        let clock = Arc::new(ManualClock::new(T0));
        let (queue, rec) = storage(Queue::open(&path, settings(), clock.clone()), "open")?;
        prop_assert_eq!(rec, Recovery::default());
        Ok(Harness {
            queue: Some(queue),
            clock,
            path,
            model: Model::new(T0),
            held: Vec::new(),
            used: Vec::new(),
            _dir: dir,
        })
    }

    fn q(&self) -> &Queue {
        self.queue.as_ref().expect("queue is open")
    }

    fn pick_id(&self, i: &Index) -> u64 {
        // Every id handed out (purged ones included), and the next one (never handed out).
        i.index(self.model.next_id as usize) as u64 + 1
    }

    fn reopen(&mut self) -> Result<(), TestCaseError> {
        // Close: drop the only handle (the flush thread is joined, a last flush made).
        drop(self.queue.take());
        // sled lets go of its file lock when the last of its background tasks drops the
        // file, a moment after the last handle is dropped (spacejam/sled#1234).
        let (queue, rec) = storage(
            wait::when_unlocked(
                &self.path,
                || Queue::open(&self.path, settings(), self.clock.clone()),
                |e| matches!(e, Error::Locked { .. }),
            ),
            "reopen",
        )?;
        self.queue = Some(queue);
        let want = self.model.reopen();
        prop_assert_eq!(rec, want, "recovery on reopen");
        Ok(())
    }

    async fn step(&mut self, i: usize, op: &Op) -> Result<(), TestCaseError> {
        let now = self.model.now;
        match *op {
            Op::Enqueue {
                kind,
                key,
                not_before_s,
            } => {
                let kind = PLANS[kind].kind;
                let key = KEYS[key];
                let nb = not_before_s.map(|s| now.saturating_add_signed(s * SEC as i64));
                let payload = format!("op {i}").into_bytes();
                let got = storage(
                    self.q().enqueue(kind, key, payload.clone(), nb).await,
                    "enqueue",
                )?;
                let (want, duplicate) = self.model.enqueue(kind, key, payload, nb);
                prop_assert_eq!(got.duplicate, duplicate, "enqueue: duplicate");
                prop_assert_eq!(norm(&got.job), norm(&want), "enqueue: job");
            }
            Op::Lease { ref kind, max } => {
                let ready: Vec<JobKind> = PLANS
                    .iter()
                    .map(|p| p.kind)
                    .filter(|&k| {
                        self.model.jobs.values().any(|j| {
                            j.kind == k
                                && matches!(j.stored, Stored::Pending { due_ms } if due_ms <= now)
                        })
                    })
                    .collect();
                let kind = match ready.len() {
                    0 => PLANS[kind.index(PLANS.len())].kind,
                    n => ready[kind.index(n)],
                };
                let outstanding: BTreeSet<u64> = self
                    .held
                    .iter()
                    .filter(|t| self.model.lease_valid(**t))
                    .map(|t| t.id)
                    .collect();
                let got = storage(self.q().lease(kind, max).await, "lease")?;
                for l in &got {
                    prop_assert!(
                        !outstanding.contains(&l.job.id),
                        "job {} leased while its previous lease is outstanding",
                        l.job.id
                    );
                    prop_assert!(l.job.attempts > 0, "a lease counts an attempt");
                }
                let want = self.model.lease(kind, max);
                let got_jobs: Vec<Job> = got.iter().map(|l| norm(&l.job)).collect();
                let want_jobs: Vec<Job> = want.iter().map(norm).collect();
                prop_assert_eq!(got_jobs, want_jobs, "lease");
                self.held.extend(got.iter().map(|l| l.token()));
            }
            Op::Ack { ref lease } | Op::Fail { ref lease, .. } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let t = self.held.swap_remove(lease.index(self.held.len()));
                self.used.push(t);
                let (got, want) = match *op {
                    Op::Fail { retry_after_s, .. } => {
                        let error = format!("failure at op {i}");
                        let ra = retry_after_s.map(Duration::from_secs);
                        let got = self.q().fail(t, &error, ra).await;
                        let want = self
                            .model
                            .report(t, Some((error, retry_after_s.map(|s| s * SEC))));
                        (got, want)
                    }
                    _ => (self.q().ack(t).await, self.model.report(t, None)),
                };
                same(norm_result(got), want.map(|j| norm(&j)), "report")?;
            }
            Op::Stale { ref token, ack } => {
                if self.used.is_empty() {
                    return Ok(());
                }
                let t = self.used[token.index(self.used.len())];
                let (got, want) = if ack {
                    (self.q().ack(t).await, self.model.report(t, None))
                } else {
                    let got = self.q().fail(t, "late", None).await;
                    (got, self.model.report(t, Some(("late".into(), None))))
                };
                prop_assert!(want.is_err(), "model: a used lease is never valid again");
                same(norm_result(got), want, "stale report")?;
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(ms));
                self.model.now += ms;
            }
            Op::Reap => {
                let got = storage(self.q().reap_expired_leases().await, "reap")?;
                prop_assert_eq!(got, self.model.reap(), "reap_expired_leases");
            }
            Op::Maintain => {
                let got = storage(self.q().maintain().await, "maintain")?;
                prop_assert_eq!(got, self.model.maintain(), "maintain (swept, reaped)");
            }
            Op::Retry { ref job } => {
                let id = self.pick_id(job);
                let got = norm_result(self.q().retry(id).await);
                same(got, self.model.retry(id).map(|j| norm(&j)), "retry")?;
            }
            Op::RetryDead { kind } => {
                let kind = kind.map(|k| PLANS[k].kind);
                let got = storage(self.q().retry_dead(kind).await, "retry_dead")?;
                prop_assert_eq!(got, self.model.retry_dead(kind), "retry_dead");
            }
            Op::Cancel { ref job } => {
                let id = self.pick_id(job);
                let got = norm_result(self.q().cancel(id).await);
                same(got, self.model.cancel(id).map(|j| norm(&j)), "cancel")?;
            }
            Op::Purge {
                state,
                older_than_s,
            } => {
                let filter = PurgeFilter {
                    state,
                    older_than: older_than_s.map(Duration::from_secs),
                };
                let got = self.q().purge(filter).await;
                let want = self.model.purge(state, older_than_s.map(|s| s * SEC));
                same(got, want, "purge")?;
            }
            Op::Reopen => self.reopen()?,
        }
        Ok(())
    }

    /// The queue equals the model, record by record and index by index.
    fn check(&self) -> Result<(), TestCaseError> {
        let q = self.q();
        let m = &self.model;
        let now = m.now;
        prop_assert_eq!(q.now(), now);

        // Every job, exactly: none lost, none extra, same state, due time, attempts, history.
        let got: Vec<Job> = storage(q.list(&ListFilter::default()), "list")?
            .iter()
            .map(norm)
            .collect();
        let want: Vec<Job> = m.jobs.values().map(norm).collect();
        prop_assert_eq!(got, want, "list (all jobs)");
        for id in 1..=m.next_id {
            let got = storage(q.get(id), "get")?.map(|j| norm(&j));
            prop_assert_eq!(got, m.jobs.get(&id).map(norm), "get({})", id);
        }

        // Each job in exactly one state, by record...
        let mut seen = BTreeMap::new();
        for state in JobState::ALL {
            let filter = ListFilter {
                state: Some(state),
                ..ListFilter::default()
            };
            for j in storage(q.list(&filter), "list --state")? {
                prop_assert_eq!(state_of(&j, now), state);
                prop_assert!(
                    seen.insert(j.id, state).is_none(),
                    "job {} listed in two states",
                    j.id
                );
            }
        }
        let want_states: BTreeMap<u64, JobState> =
            m.jobs.values().map(|j| (j.id, state_of(j, now))).collect();
        prop_assert_eq!(seen, want_states, "list --state");

        // ...and by index: the counts, the pending order and the running set.
        let stats = storage(q.stats(), "stats")?;
        let mut counts: BTreeMap<JobKind, BTreeMap<JobState, u64>> = jobs::ALL
            .into_iter()
            .map(|k| (k, JobState::ALL.into_iter().map(|s| (s, 0)).collect()))
            .collect();
        for j in m.jobs.values() {
            *counts
                .get_mut(&j.kind)
                .and_then(|c| c.get_mut(&state_of(j, now)))
                .expect("all kinds and states") += 1;
        }
        prop_assert_eq!(&stats.jobs, &counts, "stats");
        let total: u64 = JobState::ALL.into_iter().map(|s| stats.total(s)).sum();
        prop_assert_eq!(total, m.jobs.len() as u64, "stats total");
        prop_assert_eq!(stats.quarantined, 0);
        let oldest_ready = m
            .jobs
            .values()
            .filter_map(|j| match j.stored {
                Stored::Pending { due_ms } if due_ms <= now => Some(due_ms),
                _ => None,
            })
            .min();
        prop_assert_eq!(stats.oldest_ready_ms, oldest_ready, "oldest ready");
        // The kept counts `stats` reads equal a scan of the indexes, due-time buckets
        // included.
        let differ = storage(q.check_counts(), "check_counts")?;
        prop_assert!(
            differ.is_empty(),
            "kept counts differ from the indexes: {:?}",
            differ
        );
        for kind in jobs::ALL {
            let of_kind = || m.jobs.values().filter(move |j| j.kind == kind);
            let next_due = of_kind()
                .filter_map(|j| match j.stored {
                    Stored::Pending { due_ms } => Some(due_ms),
                    _ => None,
                })
                .min();
            prop_assert_eq!(
                storage(q.next_due(kind), "next_due")?,
                next_due,
                "next_due({})",
                kind
            );
            let running = of_kind()
                .filter(|j| matches!(j.stored, Stored::Running { .. }))
                .count();
            prop_assert_eq!(
                storage(q.running_count(kind), "running_count")?,
                running,
                "running_count({})",
                kind
            );
        }
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut h = Harness::open()?;
        h.check()?;
        for (i, op) in ops.iter().enumerate() {
            h.step(i, op).await.map_err(|e| at_step(e, i, op))?;
            h.check().map_err(|e| at_step(e, i, op))?;
        }
        // Close and reopen once more: every acknowledged job is still there.
        h.reopen().map_err(|e| at_step(e, ops.len(), &Op::Reopen))?;
        h.check().map_err(|e| at_step(e, ops.len(), &Op::Reopen))
    })
}

fn at_step(e: TestCaseError, i: usize, op: &Op) -> TestCaseError {
    match e {
        TestCaseError::Fail(why) => TestCaseError::fail(format!("after step {i} ({op:?}): {why}")),
        other => other,
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn queue_matches_reference_model(ops in prop::collection::vec(op(), 1..100)) {
        run(&ops)?;
    }
}

/// The first divergence the model found, as a plain scenario. SPEC §2: a key is held
/// while its job is pending, running, or done within the dedupe window. Here a newer job
/// of the key is done and already past the window — `enqueue` of the key would create a
/// new job — yet `retry` of the older dead job is refused with `KeyTaken` ("retry that one
/// instead", though a done job cannot be retried), until `maintain` sweeps the done job.
#[tokio::test]
async fn retry_is_not_blocked_by_a_done_job_past_the_dedupe_window() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(T0));
    let (q, _) = Queue::open(dir.path().join("queue"), settings(), clock.clone()).unwrap();
    let kind = jobs::NODE_SYNC;
    let old = q.enqueue(kind, "k", Vec::new(), None).await.unwrap().job;
    q.cancel(old.id).await.unwrap();
    let new = q.enqueue(kind, "k", Vec::new(), None).await.unwrap();
    assert!(!new.duplicate, "a dead job does not hold its key");
    let leased = q.lease(kind, 1).await.unwrap();
    assert_eq!(leased[0].job.id, new.job.id);
    q.ack(leased[0].token()).await.unwrap();
    clock.advance(Duration::from_millis(WINDOW_MS));

    let retried = q
        .retry(old.id)
        .await
        .expect("the done job no longer holds the key: the dead job can be retried");
    assert_eq!(
        retried.stored,
        Stored::Pending {
            due_ms: T0 + WINDOW_MS
        }
    );
}
