//! Write combining. Every write a worker makes — enqueues, leases, acks, failures,
//! deferrals, commits — and an operator's cancel and retry are applied together: the
//! first caller in starts a combiner on a blocking thread that takes every operation
//! waiting, runs each one under the write lock into ONE sled batch, applies it, takes
//! one ticket, hands the durability wait and the replies to a task, and goes round
//! again while more are waiting.
//!
//! Why: sled 0.34's `apply_batch` takes sled's global lock exclusively and `flush` holds
//! it shared for the whole write, so applies and flushes strictly alternate, and every
//! apply blocks the tokio worker that made it. One apply for a whole group costs far less
//! per job than one apply each, and no tokio worker ever blocks behind a flush.
//!
//! Operations in one group do not see each other's writes in the tree, so the group
//! keeps them ([`Group`]): every job it changed, by id, and every idempotency entry it
//! wrote. A lease skips jobs already touched; every other operation reads a job, or the
//! holder of a key, from there first (else a `Replace` after a lease in the same group
//! would write the job back as pending over its running record, or two enqueues of one
//! key in one group would make two jobs). Each operation writes into a batch of its
//! own, added to the group's only if it succeeds: an operation that is refused (a lost
//! lease) leaves nothing behind, and its changes to the group are undone.
//!
//! A group that wrote nothing and answered only empty leases waits for no flush: an
//! empty lease promises nothing.
//!
//! Measured (benches/queue.rs, 2 cores): 64 producers went from ~11k to 20-40k durable
//! enqueues/s, because one `apply_batch` now serves a whole group.
//!
//! Where the time goes now (issue 15, `perf record --call-graph dwarf`, 64 round trips
//! in flight): this thread is the bottleneck, with 57% of all CPU samples, 34 of them in
//! sled's `apply_batch` (per key: `view_for_key` 19%, of which leaf splits 8%, and
//! `PageCache::link` 18%, which copies the whole leaf for every key it adds) and 8% in
//! `counts::Batch::resolve`'s reads of what each index key held. sled's
//! `flush` holds its lock shared for the whole log write, so applies and flushes still
//! alternate. A round trip writes nine keys (enqueue: `j`, `p`, `k`; lease: `p`, `r`,
//! `j`; ack: `r`, `f`, `j`) besides the counts: fewer means a new record layout (e.g. a
//! lease that writes only `r`, not the whole job again). Same hour, same machine, load
//! average 3.9-6.0 on 2 cores (others building): the baseline "sled batch of 64 +
//! fdatasync" 27-43k items/s; enqueues with 64 producers 20.2-20.6k/s; round trips with
//! 64 in flight 6.1-7.4k/s; the worker pool 6.0-10.2k/s.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Batch;
use super::Storage as _;
use super::record::{self, Job, Stored};
use super::{
    Commit, Committed, DurabilityError, Enqueued, Error, EventKind, JobKind, LeaseToken, Leased,
    Millis, NewJob, Queue, Result, clock, keys, succeed,
};

pub(super) enum Op {
    Enqueue(NewJob),
    Lease {
        kind: JobKind,
        max: usize,
    },
    Ack(LeaseToken),
    Fail {
        lease: LeaseToken,
        error: String,
        retry_after: Option<Duration>,
    },
    Defer {
        lease: LeaseToken,
        due_ms: Millis,
    },
    Commit(Commit),
    Cancel(u64),
    Retry(u64),
}

pub(super) enum Done {
    Enqueued(Enqueued),
    Leased(Vec<Leased>),
    /// An attempt ended (ack, fail, defer).
    Finished(Job),
    /// A commit, and the kinds it made work due for.
    Committed(Committed, Vec<JobKind>),
    Cancelled(Job),
    Retried(Job),
}

type Reply = oneshot::Sender<Result<Done>>;

/// Operations waiting for the combiner, and whether one is running.
#[derive(Default)]
pub(super) struct Combine {
    waiting: Vec<(Op, Reply)>,
    active: bool,
}

/// What the operations of one group wrote so far, which the tree does not show yet.
#[derive(Default)]
pub(super) struct Group {
    /// Jobs changed, by id, as they now are.
    touched: HashMap<u64, Job>,
    /// Idempotency entries written: key → job id.
    idem: HashMap<Vec<u8>, u64>,
    /// Before-images of the current operation's changes, to undo them if it fails.
    undo: Vec<Undo>,
}

enum Undo {
    Job(u64, Option<Job>),
    Idem(Vec<u8>, Option<u64>),
}

impl Group {
    /// Job `id` as this group left it, if it changed it.
    pub(super) fn job(&self, id: u64) -> Option<&Job> {
        self.touched.get(&id)
    }

    pub(super) fn touch(&mut self, job: &Job) {
        let before = self.touched.insert(job.id, job.clone());
        self.undo.push(Undo::Job(job.id, before));
    }

    /// The job id an idempotency entry written in this group names.
    pub(super) fn holder(&self, idem: &[u8]) -> Option<u64> {
        self.idem.get(idem).copied()
    }

    pub(super) fn set_holder(&mut self, idem: Vec<u8>, id: u64) {
        let before = self.idem.insert(idem.clone(), id);
        self.undo.push(Undo::Idem(idem, before));
    }

    /// Keeps the changes of the operation that just succeeded.
    fn keep(&mut self) {
        self.undo.clear();
    }

    /// Undoes the changes of the operation that just failed.
    fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Job(id, Some(j)) => {
                    self.touched.insert(id, j);
                }
                Undo::Job(id, None) => {
                    self.touched.remove(&id);
                }
                Undo::Idem(k, Some(id)) => {
                    self.idem.insert(k, id);
                }
                Undo::Idem(k, None) => {
                    self.idem.remove(&k);
                }
            }
        }
    }
}

impl Queue {
    pub(super) async fn submit(&self, op: Op) -> Result<Done> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut c = self
                .inner
                .combine
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.waiting.push((op, tx));
            !std::mem::replace(&mut c.active, true)
        };
        if lead {
            let q = self.clone();
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || q.combine(rt));
        }
        rx.await
            .map_err(|_| Error::Durability(DurabilityError::new("the write combiner went away")))?
    }

    fn combine(&self, rt: tokio::runtime::Handle) {
        loop {
            let group = {
                let mut c = self
                    .inner
                    .combine
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if c.waiting.is_empty() {
                    c.active = false;
                    return;
                }
                std::mem::take(&mut c.waiting)
            };
            let (ops, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
            match self.apply_group(ops) {
                Err(e) => {
                    // Every write of the group gets the one error; it is not `Clone`, so
                    // all but an unwritable queue's share it as the cause.
                    let unwritable = match &e {
                        Error::Unwritable { path, why } => Some((path.clone(), why.clone())),
                        _ => None,
                    };
                    let shared = match e {
                        Error::Durability(d) => d,
                        Error::Unwritable { .. } => DurabilityError::new(e.to_string()),
                        e => DurabilityError::shared(e),
                    };
                    for tx in replies {
                        let e = match &unwritable {
                            Some((path, why)) => Error::Unwritable {
                                path: path.clone(),
                                why: why.clone(),
                            },
                            None => Error::Durability(shared.clone()),
                        };
                        let _ = tx.send(Err(e));
                    }
                }
                Ok((results, None)) => {
                    // Nothing written, nothing promised: no flush to wait for.
                    for (r, tx) in results.into_iter().zip(replies) {
                        let _ = tx.send(r);
                    }
                }
                Ok((results, Some(epoch))) => {
                    let q = self.clone();
                    rt.spawn(async move {
                        let durable = q.durable_since(epoch).await.map_err(|e| match e {
                            Error::Durability(d) => d,
                            e => DurabilityError::shared(e),
                        });
                        for (r, tx) in results.into_iter().zip(replies) {
                            let r = match (&durable, r) {
                                (Err(d), _) => Err(Error::Durability(d.clone())),
                                (Ok(()), r) => {
                                    if let Ok(done) = &r {
                                        q.after(done);
                                    }
                                    r
                                }
                            };
                            let _ = tx.send(r);
                        }
                    });
                }
            }
        }
    }

    /// Events and wake-ups once a group is durable.
    fn after(&self, done: &Done) {
        match done {
            Done::Enqueued(e) => self.after_enqueue(e),
            Done::Leased(l) => {
                for l in l {
                    self.emit(
                        &l.job,
                        EventKind::Leased {
                            attempt: l.job.attempts,
                        },
                    );
                }
            }
            Done::Finished(job) => self.after_finish(job),
            Done::Committed(c, woken) => {
                for &kind in woken {
                    self.wake(kind);
                }
                if let Some(job) = &c.acked {
                    self.after_finish(job);
                }
                for e in &c.enqueued {
                    self.after_enqueue(e);
                }
            }
            Done::Cancelled(job) => self.emit(job, EventKind::Cancelled),
            Done::Retried(job) => {
                self.wake(job.kind);
                self.emit_retried(job);
            }
        }
    }

    fn after_enqueue(&self, e: &Enqueued) {
        if e.replaced {
            self.emit(&e.job, EventKind::Replaced);
        } else if !e.duplicate {
            self.emit(&e.job, EventKind::Enqueued);
            self.wake(e.job.kind);
        }
    }

    /// Runs a group into one batch. The outer error (the apply) fails the whole group
    /// and nothing is written; an operation's own error fails only that operation, and
    /// nothing of it is written. Returns the results and, when the group must wait for a
    /// flush, the epoch of the handle written to.
    #[allow(clippy::type_complexity)]
    fn apply_group(&self, ops: Vec<Op>) -> Result<(Vec<Result<Done>>, Option<u64>)> {
        let mut w = self.lock();
        let epoch = self.epoch();
        let now = self.now();
        let mut b = Batch::default();
        let mut g = Group::default();
        let mut results: Vec<Result<Done>> = Vec::with_capacity(ops.len());
        for op in ops {
            let mut own = Batch::default();
            let r = match op {
                Op::Enqueue(j) => self
                    .enqueue_locked(&mut w, &mut own, j, now, &mut g)
                    .map(Done::Enqueued),
                Op::Lease { kind, max } => self
                    .lease_in_group(&mut own, &mut g, kind, max)
                    .map(Done::Leased),
                Op::Ack(lease) => self
                    .finish_locked(&mut own, &mut g, lease, |job, now, started| {
                        succeed(job, lease, now, started, None)
                    })
                    .map(Done::Finished),
                Op::Fail {
                    lease,
                    error,
                    retry_after,
                } => self
                    .finish_locked(&mut own, &mut g, lease, |job, now, started| {
                        self.failed(job, lease, now, started, &error, retry_after)
                    })
                    .map(Done::Finished),
                Op::Defer { lease, due_ms } => self
                    .finish_locked(&mut own, &mut g, lease, |job, now, _| {
                        job.attempts = job.attempts.saturating_sub(1);
                        job.stored = Stored::Pending {
                            due_ms: due_ms.max(now),
                        };
                    })
                    .map(Done::Finished),
                Op::Commit(c) => self
                    .commit_locked(&mut w, &mut own, &mut g, c, now)
                    .map(|(c, woken)| Done::Committed(c, woken)),
                Op::Cancel(id) => self
                    .cancel_locked(&mut own, &mut g, id)
                    .map(Done::Cancelled),
                Op::Retry(id) => self
                    .load_in(&g, id)
                    .and_then(|job| job.ok_or(Error::NotFound(id)))
                    .and_then(|job| self.retry_locked(&mut own, &mut g, job))
                    .map(Done::Retried),
            };
            match &r {
                Ok(_) => {
                    g.keep();
                    b.append(own);
                }
                Err(_) => g.rollback(),
            }
            results.push(r);
        }
        let quiet = b.is_empty()
            && results
                .iter()
                .all(|r| matches!(r, Ok(Done::Leased(l)) if l.is_empty()));
        self.apply(b)?;
        Ok((results, (!quiet).then_some(epoch)))
    }

    /// The job holding idempotency entry `idem` as the group sees it: as it wrote it,
    /// else from the tree.
    pub(super) fn holder_in(&self, g: &Group, idem: &[u8]) -> Result<Option<u64>> {
        match g.holder(idem) {
            Some(id) => Ok(Some(id)),
            None => Ok(self
                .db()?
                .get(idem)
                .storage()?
                .and_then(|v| keys::be_u64(&v))),
        }
    }

    /// Job `id` as the group sees it: as it left it, else from the tree.
    pub(super) fn load_in(&self, g: &Group, id: u64) -> Result<Option<Job>> {
        match g.job(id) {
            Some(j) => Ok(Some(j.clone())),
            None => self.load_locked(id),
        }
    }

    fn lease_in_group(
        &self,
        b: &mut Batch,
        g: &mut Group,
        kind: JobKind,
        max: usize,
    ) -> Result<Vec<Leased>> {
        let now = self.now();
        let ttl = self.inner.settings.kind(kind).lease_timeout;
        let start = keys::pending(kind, 0, 0);
        let end = keys::pending(kind, now, u64::MAX);
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        for entry in self.db()?.range(start..=end) {
            let (k, _) = entry.storage()?;
            let Some((_, _, id)) = keys::parse_pending(&k) else {
                b.remove(k);
                continue;
            };
            if g.job(id).is_some() {
                // Changed earlier in this group; the tree's index is stale for it.
                continue;
            }
            let Some(mut job) = self.load_locked(id)? else {
                b.remove(k);
                continue;
            };
            if !matches!(job.stored, Stored::Pending { .. }) {
                b.remove(k);
                continue;
            }
            let lease_until = clock::after(now, ttl);
            job.attempts += 1;
            job.stored = Stored::Running {
                started_ms: now,
                lease_until_ms: lease_until,
            };
            b.remove(k);
            b.insert(keys::running(id), keys::running_value(kind, lease_until));
            b.put(keys::job(id), record::encode_job(&job));
            g.touch(&job);
            out.push(Leased { job });
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::{KindSettings, ManualClock, OnExhausted, Settings};
    use super::*;

    const KIND: JobKind = JobKind::new(4, "webhook");

    fn tickets(q: &Queue) -> u64 {
        let store = q.inner.store.read().unwrap();
        store.as_ref().unwrap().commit.issued()
    }

    /// An empty lease writes nothing and promises nothing: it takes no flush. A lease
    /// that leased something does.
    #[tokio::test]
    async fn an_empty_lease_waits_for_no_flush() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::new(
            Duration::from_secs(60),
            [(
                KIND,
                KindSettings {
                    ladder: vec![Duration::ZERO],
                    on_exhausted: OnExhausted::Dead,
                    concurrency: 1,
                    lease_ahead: 0,
                    lease_timeout: Duration::from_secs(60),
                    keep_done: None,
                },
            )],
        );
        let (q, _) = Queue::open(
            dir.path().join("queue"),
            settings,
            Arc::new(ManualClock::new(1_767_225_600_000)),
        )
        .unwrap();
        let before = tickets(&q);
        for _ in 0..3 {
            assert!(q.lease(KIND, 4).await.unwrap().is_empty());
        }
        assert_eq!(tickets(&q), before, "empty leases took a flush");
        q.enqueue(KIND, "a", Vec::new(), None).await.unwrap();
        let after_enqueue = tickets(&q);
        assert!(after_enqueue > before);
        assert_eq!(q.lease(KIND, 4).await.unwrap().len(), 1);
        assert!(tickets(&q) > after_enqueue, "a lease that wrote is flushed");
    }
}
