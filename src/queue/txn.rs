//! Commits: several changes made durable as one. A job kind that must keep its own state
//! in step with the queue — a node's synced list and the apply it enqueues, a traffic
//! baseline and the report it produces — writes both in one [`Commit`], which is one
//! sled batch: after a crash, either both are there or neither.

use std::collections::HashMap;

use super::Batch;
use super::Storage as _;
use super::combine::{Done, Group, Op};
use super::record::{self, Job, Stored};
use super::{
    Enqueued, Error, JobKind, LeaseToken, Millis, Queue, Result, WriteState, clock, keys, succeed,
};

/// How an enqueue treats a key that already has a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dedupe {
    /// SPEC idempotency: a key that is pending, running, or done within the dedupe window
    /// returns the existing job.
    #[default]
    Window,
    /// One live job per key: pending or running returns the existing job; otherwise a new
    /// job, whatever the window. For periodic work (a node's sync).
    Live,
    /// Newest wins: a pending job takes the new payload; when the key's job is running
    /// or finished, a new job follows it. For "apply the latest list".
    Replace,
}

/// A job to add.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: JobKind,
    pub key: String,
    pub payload: Vec<u8>,
    /// Not before this time (default: now). `ladder[0]` is added to it.
    pub not_before: Option<Millis>,
    pub dedupe: Dedupe,
}

/// A change to the state area.
#[derive(Debug, Clone)]
pub enum StateWrite {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Changes to make durable together.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub state: Vec<StateWrite>,
    pub enqueue: Vec<NewJob>,
    /// Ends this attempt as succeeded.
    pub ack: Option<LeaseToken>,
    /// Kept on the acked attempt (bounded to 4 KiB): what it did, e.g. a hook's output.
    pub note: Option<String>,
    /// Pending jobs to make due now (others are left as they are): work that waited for
    /// this commit, e.g. a node's next traffic report once the older one is delivered.
    pub wake: Vec<u64>,
}

/// What a commit did: one [`Enqueued`] per [`NewJob`], in order, and the acked job.
#[derive(Debug, Clone)]
pub struct Committed {
    pub enqueued: Vec<Enqueued>,
    pub acked: Option<Job>,
}

impl Queue {
    /// Adds one job; see [`Dedupe`]. Returns once it is on disk.
    pub async fn enqueue_with(&self, job: NewJob) -> Result<Enqueued> {
        check_key(&job.key)?;
        match self.submit(Op::Enqueue(job)).await? {
            Done::Enqueued(e) => Ok(e),
            _ => Err(super::wrong_reply()),
        }
    }

    /// Applies every change in `c` as one atomic write and waits until it is on disk.
    /// If anything in it is refused (a lost lease, a bad key), nothing is written.
    pub async fn commit(&self, c: Commit) -> Result<Committed> {
        for j in &c.enqueue {
            check_key(&j.key)?;
        }
        match self.submit(Op::Commit(c)).await? {
            Done::Committed(c, _) => Ok(c),
            _ => Err(super::wrong_reply()),
        }
    }

    /// Adds a commit to `b`, as the group `g` sees the jobs. Returns what it did and the
    /// kinds it made work due for. The ack is checked first: if it is refused, nothing
    /// was added.
    pub(super) fn commit_locked(
        &self,
        w: &mut WriteState,
        b: &mut Batch,
        g: &mut Group,
        c: Commit,
        now: Millis,
    ) -> Result<(Committed, Vec<JobKind>)> {
        let acked = match c.ack {
            Some(lease) => Some(self.finish_locked(b, g, lease, |job, now, started| {
                succeed(job, lease, now, started, c.note.as_deref())
            })?),
            None => None,
        };
        for s in &c.state {
            match s {
                StateWrite::Put(name, bytes) => {
                    b.put(keys::state(name), record::encode_state(bytes))
                }
                StateWrite::Delete(name) => b.remove(keys::state(name)),
            }
        }
        let mut woken = Vec::new();
        for &id in &c.wake {
            if c.ack.is_some_and(|l| l.id == id) {
                continue;
            }
            if let Some(mut job) = self.load_in(g, id)?
                && let Stored::Pending { due_ms } = job.stored
                && due_ms > now
            {
                self.index_remove(b, &job);
                job.stored = Stored::Pending { due_ms: now };
                self.index_insert(b, &job);
                b.put(keys::job(job.id), record::encode_job(&job));
                g.touch(&job);
                woken.push(job.kind);
            }
        }
        let mut enqueued: Vec<Enqueued> = Vec::with_capacity(c.enqueue.len());
        // Keys enqueued earlier in this commit: the second is a duplicate of the first.
        let mut fresh: HashMap<(JobKind, String), usize> = HashMap::new();
        for j in c.enqueue {
            let slot = (j.kind, j.key.clone());
            if let Some(&i) = fresh.get(&slot) {
                let e = self.repeat_in_commit(b, g, &mut enqueued[i], j);
                enqueued.push(e);
                continue;
            }
            let e = self.enqueue_locked(w, b, j, now, g)?;
            fresh.insert(slot, enqueued.len());
            enqueued.push(e);
        }
        Ok((Committed { enqueued, acked }, woken))
    }

    /// A second job with the same key in one commit: a duplicate of the first, or (for
    /// `Replace`) the first takes its payload.
    pub(super) fn repeat_in_commit(
        &self,
        b: &mut Batch,
        g: &mut Group,
        first: &mut Enqueued,
        j: NewJob,
    ) -> Enqueued {
        if j.dedupe == Dedupe::Replace && matches!(first.job.stored, Stored::Pending { .. }) {
            first.job.payload = j.payload;
            b.put(keys::job(first.job.id), record::encode_job(&first.job));
            g.touch(&first.job);
        }
        Enqueued {
            job: first.job.clone(),
            duplicate: true,
            replaced: j.dedupe == Dedupe::Replace,
        }
    }

    /// Adds an enqueue to `b`. `g` holds the jobs and keys already changed in the same
    /// group (the tree does not show them yet); what changes here is recorded in it.
    pub(super) fn enqueue_locked(
        &self,
        w: &mut WriteState,
        b: &mut Batch,
        j: NewJob,
        now: Millis,
        g: &mut Group,
    ) -> Result<Enqueued> {
        let idem = keys::idem(j.kind, &j.key);
        let holder = self.holder_in(g, &idem)?;
        let existing = match holder {
            Some(id) => self.load_in(g, id)?,
            None => None,
        };
        let window = self.inner.settings.dedupe_window;
        if let Some(mut job) = existing {
            let taken = match (j.dedupe, &job.stored) {
                (Dedupe::Window, _) => holds_key(&job, now, window),
                (_, Stored::Pending { .. }) => true,
                (Dedupe::Replace, Stored::Running { .. }) => false,
                (Dedupe::Live, Stored::Running { .. }) => true,
                _ => false,
            };
            if taken {
                let replaced = j.dedupe == Dedupe::Replace;
                if replaced {
                    job.payload = j.payload;
                    b.put(keys::job(job.id), record::encode_job(&job));
                    g.touch(&job);
                }
                return Ok(Enqueued {
                    job,
                    duplicate: true,
                    replaced,
                });
            }
        }
        let id = w.next_id;
        w.next_id += 1;
        let base = j.not_before.unwrap_or(now).max(now);
        let due = clock::after(base, self.inner.settings.kind(j.kind).ladder[0]);
        let job = Job {
            id,
            kind: j.kind,
            key: j.key,
            payload: j.payload,
            created_ms: now,
            stored: Stored::Pending { due_ms: due },
            attempts: 0,
            history: Vec::new(),
        };
        b.put(keys::job(id), record::encode_job(&job));
        b.insert(keys::pending(job.kind, due, id), b"");
        b.insert(&idem, id.to_be_bytes());
        b.insert(keys::META_NEXT_ID, (id + 1).to_be_bytes());
        g.touch(&job);
        g.set_holder(idem, id);
        Ok(Enqueued {
            job,
            duplicate: false,
            replaced: false,
        })
    }

    /// Reads a state value. An unreadable one is quarantined and reads as absent.
    pub fn state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = keys::state(name);
        match self.db()?.get(&key).storage()? {
            None => Ok(None),
            Some(raw) => match record::decode_state(&raw) {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    self.quarantine(&key, &raw, &e)?;
                    Ok(None)
                }
            },
        }
    }

    /// Every state value whose name starts with `prefix`, in name order.
    pub fn state_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for entry in self.db()?.scan_prefix(keys::state(prefix)) {
            let (k, raw) = entry.storage()?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            match record::decode_state(&raw) {
                Ok(v) => out.push((name, v)),
                Err(e) => self.quarantine(&k, &raw, &e)?,
            }
        }
        Ok(out)
    }
}

/// SPEC §2: a job holds its key while pending, running, or done within the window.
pub(super) fn holds_key(job: &Job, now: Millis, window: std::time::Duration) -> bool {
    match job.stored {
        Stored::Pending { .. } | Stored::Running { .. } => true,
        Stored::Done { at_ms } => clock::after(at_ms, window) > now,
        Stored::Dead { .. } => false,
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey("it is empty"));
    }
    if key.len() > super::MAX_KEY_LEN {
        return Err(Error::InvalidKey("it is longer than 512 bytes"));
    }
    Ok(())
}
