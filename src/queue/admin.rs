//! Operations for operators (what `queuectl` and the admin API call): stats, list, show,
//! retry, cancel, purge, export, quarantine, and the periodic sweep of expired done jobs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::Batch;
use super::Storage as _;
use super::clock::{Millis, rfc3339};
use super::combine::{Done, Group, Op};
use super::record::{self, Attempt, DeadReason, Job, Stored};
use super::{Error, JobKind, JobState, Queue, Result, counts, keys};

/// Counts of jobs by kind and state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// kind → state → count; every kind and state is present, zeros included.
    pub jobs: BTreeMap<JobKind, BTreeMap<JobState, u64>>,
    /// Records moved aside because they could not be read.
    pub quarantined: u64,
    /// Due time of the oldest ready job, if any.
    pub oldest_ready_ms: Option<Millis>,
}

impl Stats {
    pub fn total(&self, state: JobState) -> u64 {
        self.jobs
            .values()
            .map(|m| m.get(&state).copied().unwrap_or(0))
            .sum()
    }
}

/// Which jobs `list` returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    /// Only jobs with an id greater than this (paging).
    pub after_id: Option<u64>,
    pub limit: usize,
}

/// Which finished jobs `purge` deletes.
#[derive(Debug, Clone, Copy)]
pub struct PurgeFilter {
    /// `Done` or `Dead`.
    pub state: JobState,
    /// Only jobs that finished at least this long ago.
    pub older_than: Option<Duration>,
}

/// A job rendered for people and scripts (`queuectl --json`, `export`).
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: u64,
    pub kind: JobKind,
    pub key: String,
    pub state: JobState,
    /// When it is due (pending), its lease ends (running), or it finished (done, dead).
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<DeadReason>,
    pub created: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub history: Vec<AttemptView>,
    /// The payload as JSON when it is JSON, else absent (see `payload_hex`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub number: u32,
    pub started: String,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub outcome: record::Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl JobView {
    pub fn new(job: &Job, now: Millis) -> Self {
        let (at, dead_reason) = match job.stored {
            Stored::Pending { due_ms } => (due_ms, None),
            Stored::Running { lease_until_ms, .. } => (lease_until_ms, None),
            Stored::Done { at_ms } => (at_ms, None),
            Stored::Dead { at_ms, reason } => (at_ms, Some(reason)),
        };
        let payload = serde_json::from_slice::<serde_json::Value>(&job.payload).ok();
        let payload_hex = match (&payload, job.payload.is_empty()) {
            (None, false) => Some(job.payload.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        };
        JobView {
            id: job.id,
            kind: job.kind,
            key: job.key.clone(),
            state: job.state(now),
            at: rfc3339(at),
            dead_reason,
            created: rfc3339(job.created_ms),
            attempts: job.attempts,
            last_error: job.history.iter().rev().find_map(|a| match &a.outcome {
                record::Outcome::Succeeded => None,
                record::Outcome::Failed { error } => Some(error.clone()),
                record::Outcome::LeaseExpired => Some("lease expired".into()),
                record::Outcome::Interrupted { reason } => Some(reason.clone()),
            }),
            history: job.history.iter().map(AttemptView::new).collect(),
            payload,
            payload_hex,
        }
    }
}

impl AttemptView {
    fn new(a: &Attempt) -> Self {
        AttemptView {
            number: a.number,
            started: rfc3339(a.started_ms),
            duration_ms: a.duration_ms,
            outcome: a.outcome.clone(),
            note: a.note.clone(),
        }
    }
}

/// A quarantined record, for people.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineView {
    pub key: String,
    pub reason: String,
    pub at: String,
    pub bytes: usize,
}

impl Queue {
    /// Counts every job by kind and state, from the counts kept beside the indexes
    /// (`counts.rs`): a few keys read per kind, whatever the number of jobs. Pending
    /// jobs are ready or scheduled by their due-time buckets; the oldest ready one is
    /// the first pending key of each kind.
    pub fn stats(&self) -> Result<Stats> {
        let now = self.now();
        let db = self.db()?;
        let mut stats = Stats::default();
        let mut oldest: Option<Millis> = None;
        for &kind in self.inner.settings.kinds() {
            let code = kind.code();
            let pending = counts::count(&db, code, counts::PENDING)?;
            let ready = counts::due_by(&db, code, now)?.min(pending);
            let m = stats.jobs.entry(kind).or_default();
            m.insert(JobState::Scheduled, pending - ready);
            m.insert(JobState::Ready, ready);
            m.insert(
                JobState::Running,
                counts::count(&db, code, counts::RUNNING)?,
            );
            m.insert(JobState::Done, counts::count(&db, code, counts::DONE)?);
            m.insert(JobState::Dead, counts::count(&db, code, counts::DEAD)?);
            if let Some(due) = self.next_due(kind)?.filter(|&due| due <= now) {
                oldest = Some(oldest.map_or(due, |o| o.min(due)));
            }
        }
        stats.quarantined = counts::count(&db, 0, counts::QUARANTINED)?;
        stats.oldest_ready_ms = oldest;
        Ok(stats)
    }

    /// Compares the kept counts with a scan of the indexes (what `fsck` does): one
    /// line per count that differs, empty when they agree. Reads every index entry.
    pub fn check_counts(&self) -> Result<Vec<String>> {
        let _w = self.lock();
        let db = self.db()?;
        let ((kept, malformed), scanned) = (counts::kept(&db)?, counts::scan(&db)?);
        let kinds = self.inner.settings.kinds();
        Ok(malformed
            .iter()
            .map(|k| format!("{}: not a count", counts::display(k, kinds)))
            .chain(
                count_differences(&kept, &scanned)
                    .into_iter()
                    .filter(|(k, _, _)| !malformed.contains(k))
                    .map(|(k, kept, scanned)| {
                        format!(
                            "{}: kept {kept}, the indexes hold {scanned}",
                            counts::display(&k, kinds)
                        )
                    }),
            )
            .collect())
    }

    /// Jobs in id order, filtered. Unreadable records met on the way are quarantined.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Job>> {
        let now = self.now();
        let start = keys::job(filter.after_id.map_or(0, |id| id.saturating_add(1)));
        let end = keys::job(u64::MAX);
        let mut out = Vec::new();
        for entry in self.db()?.range(start..=end) {
            let (k, raw) = entry.storage()?;
            let Some(job) = self.read_job(&k, &raw)? else {
                continue;
            };
            if filter.kind.is_some_and(|kind| kind != job.kind)
                || filter.state.is_some_and(|s| s != job.state(now))
            {
                continue;
            }
            out.push(job);
            if filter.limit > 0 && out.len() >= filter.limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every job, in id order, one call of `f` each (for export).
    pub fn for_each_job(&self, mut f: impl FnMut(&Job) -> std::io::Result<()>) -> Result<u64> {
        let mut n = 0;
        for entry in self.db()?.scan_prefix([keys::JOB]) {
            let (k, raw) = entry.storage()?;
            let Some(job) = self.read_job(&k, &raw)? else {
                continue;
            };
            if let Err(e) = f(&job) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    break;
                }
                return Err(Error::Write(e));
            }
            n += 1;
        }
        Ok(n)
    }

    /// Records in quarantine.
    pub fn quarantined(&self) -> Result<Vec<QuarantineView>> {
        let mut out = Vec::new();
        for entry in self.db()?.scan_prefix([keys::QUARANTINE]) {
            let (k, v) = entry.storage()?;
            let original = keys::display(&k[1..], self.inner.settings.kinds());
            out.push(match record::decode_quarantined(&v) {
                Ok(q) => QuarantineView {
                    key: original,
                    reason: q.reason,
                    at: rfc3339(q.at_ms),
                    bytes: q.raw.len(),
                },
                Err(e) => QuarantineView {
                    key: original,
                    reason: format!("quarantine entry itself unreadable: {e}"),
                    at: String::new(),
                    bytes: v.len(),
                },
            });
        }
        Ok(out)
    }

    /// Makes a dead or scheduled job due now. A dead job gets one more attempt; if that
    /// fails it is dead again (its ladder is already used up).
    pub async fn retry(&self, id: u64) -> Result<Job> {
        match self.submit(Op::Retry(id)).await? {
            Done::Retried(job) => Ok(job),
            _ => Err(super::wrong_reply()),
        }
    }

    /// Retries every dead job (of one kind, or all). Jobs whose key was taken by a newer
    /// job are left dead. Returns how many were retried.
    pub async fn retry_dead(&self, kind: Option<JobKind>) -> Result<u64> {
        let epoch = self.epoch();
        let mut retried = Vec::new();
        {
            let _w = self.lock();
            let ids: Vec<u64> = self
                .db()?
                .scan_prefix([keys::FINISHED, keys::FINISHED_DEAD])
                .filter_map(|e| e.ok())
                .filter(|(_, v)| kind.is_none_or(|kind| v.first() == Some(&kind.code())))
                .filter_map(|(k, _)| keys::parse_finished(&k).map(|(_, _, id)| id))
                .collect();
            let mut b = Batch::default();
            let mut g = Group::default();
            for id in ids {
                if let Some(job) = self.load_in(&g, id)? {
                    match self.retry_locked(&mut b, &mut g, job) {
                        Ok(job) => retried.push(job),
                        Err(Error::KeyTaken { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            self.apply(b)?;
        }
        self.durable_since(epoch).await?;
        for &kind in self.inner.settings.kinds() {
            self.wake(kind);
        }
        for job in &retried {
            self.emit_retried(job);
        }
        Ok(retried.len() as u64)
    }

    pub(super) fn emit_retried(&self, job: &Job) {
        if let Stored::Pending { due_ms } = job.stored {
            self.emit(job, super::EventKind::Retried { due_ms });
        }
    }

    /// Adds the retry of `job` to `b`, as the group `g` sees the jobs and keys.
    pub(super) fn retry_locked(&self, b: &mut Batch, g: &mut Group, mut job: Job) -> Result<Job> {
        let now = self.now();
        match job.state(now) {
            JobState::Dead | JobState::Scheduled => {}
            s => {
                return Err(Error::InvalidState {
                    id: job.id,
                    state: s.as_str(),
                    op: "retry",
                });
            }
        }
        let idem = keys::idem(job.kind, &job.key);
        let holder = self.holder_in(g, &idem)?;
        if let Some(holder) = holder
            && holder != job.id
            && self
                .load_in(g, holder)?
                .is_some_and(|h| super::txn::holds_key(&h, now, self.inner.settings.dedupe_window))
        {
            return Err(Error::KeyTaken { id: job.id, holder });
        }
        self.index_remove(b, &job);
        job.stored = Stored::Pending { due_ms: now };
        self.index_insert(b, &job);
        b.put(keys::job(job.id), record::encode_job(&job));
        b.insert(&idem, job.id.to_be_bytes());
        g.touch(&job);
        g.set_holder(idem, job.id);
        Ok(job)
    }

    /// Cancels a pending or running job: it goes dead (reason `cancelled`). A worker still
    /// running it will find its lease lost when it reports.
    pub async fn cancel(&self, id: u64) -> Result<Job> {
        match self.submit(Op::Cancel(id)).await? {
            Done::Cancelled(job) => Ok(job),
            _ => Err(super::wrong_reply()),
        }
    }

    /// Adds the cancel of job `id` to `b`, as the group `g` sees it.
    pub(super) fn cancel_locked(&self, b: &mut Batch, g: &mut Group, id: u64) -> Result<Job> {
        let now = self.now();
        let mut job = self.load_in(g, id)?.ok_or(Error::NotFound(id))?;
        match job.stored {
            Stored::Pending { .. } => {}
            Stored::Running { started_ms, .. } => job.push_attempt(Attempt {
                number: job.attempts,
                started_ms,
                duration_ms: now.saturating_sub(started_ms),
                outcome: record::Outcome::Interrupted {
                    reason: "cancelled by an operator".into(),
                },
                note: None,
            }),
            _ => {
                return Err(Error::InvalidState {
                    id,
                    state: job.state(now).as_str(),
                    op: "cancel",
                });
            }
        }
        self.index_remove(b, &job);
        job.stored = Stored::Dead {
            at_ms: now,
            reason: DeadReason::Cancelled,
        };
        self.index_insert(b, &job);
        b.put(keys::job(id), record::encode_job(&job));
        g.touch(&job);
        Ok(job)
    }

    /// Deletes finished jobs (done or dead) that finished before `older_than` ago.
    /// Returns how many.
    pub async fn purge(&self, filter: PurgeFilter) -> Result<u64> {
        let epoch = self.epoch();
        let state = match filter.state {
            JobState::Done => keys::FINISHED_DONE,
            JobState::Dead => keys::FINISHED_DEAD,
            s => {
                return Err(Error::InvalidState {
                    id: 0,
                    state: s.as_str(),
                    op: "purge jobs that are",
                });
            }
        };
        let n = {
            let _w = self.lock();
            let now = self.now();
            let cutoff = filter
                .older_than
                .map_or(u64::MAX, |d| now.saturating_sub(d.as_millis() as u64));
            self.purge_locked(state, cutoff)?
        };
        if n > 0 {
            self.durable_since(epoch).await?;
        }
        Ok(n)
    }

    /// Deletes finished jobs of `state` that finished at or before `cutoff`.
    fn purge_locked(&self, state: u8, cutoff: Millis) -> Result<u64> {
        let start = keys::finished(state, 0, 0);
        let end = keys::finished(state, cutoff, u64::MAX);
        let mut n = 0;
        let mut b = Batch::default();
        for entry in self.db()?.range(start..=end) {
            let (k, _) = entry.storage()?;
            let id = keys::parse_finished(&k).map(|(_, _, id)| id);
            if self.delete_finished(&mut b, k, id)? {
                n += 1;
            }
        }
        self.apply(b)?;
        Ok(n)
    }

    /// Adds to `b` the deletion of a finished job: its index entry `index`, its record,
    /// and its idempotency entry if it still holds the key. True when a record existed.
    fn delete_finished(&self, b: &mut Batch, index: sled::IVec, id: Option<u64>) -> Result<bool> {
        b.remove(index);
        let Some(job) = id.map(|id| self.load_locked(id)).transpose()?.flatten() else {
            return Ok(false);
        };
        let idem = keys::idem(job.kind, &job.key);
        if self
            .db()?
            .get(&idem)
            .storage()?
            .and_then(|v| keys::be_u64(&v))
            == Some(job.id)
        {
            b.remove(idem);
        }
        b.remove(keys::job(job.id));
        Ok(true)
    }

    fn sweep_done_locked(&self) -> Result<u64> {
        let now = self.now();
        let settings = &self.inner.settings;
        let keep = |kind: JobKind| {
            settings
                .kind(kind)
                .keep_done
                .unwrap_or(settings.dedupe_window)
                .as_millis() as u64
        };
        let shortest = self
            .inner
            .settings
            .kinds()
            .iter()
            .copied()
            .map(keep)
            .min()
            .unwrap_or(0);
        let start = keys::finished(keys::FINISHED_DONE, 0, 0);
        let end = keys::finished(keys::FINISHED_DONE, now.saturating_sub(shortest), u64::MAX);
        let mut expired = Vec::new();
        for entry in self.db()?.range(start..=end) {
            let (k, v) = entry.storage()?;
            let (Some((_, at, id)), Some(kind)) = (
                keys::parse_finished(&k),
                v.first().and_then(|&c| self.inner.settings.by_code(c)),
            ) else {
                continue;
            };
            if at.saturating_add(keep(kind)) <= now {
                expired.push((k, id));
            }
        }
        let mut b = Batch::default();
        let mut n = 0;
        for (k, id) in expired {
            if self.delete_finished(&mut b, k, Some(id))? {
                n += 1;
            }
        }
        self.apply(b)?;
        Ok(n)
    }

    /// Periodic housekeeping: deletes done jobs kept long enough (the kind's
    /// `keep_done`, else the dedupe window) and makes jobs with expired leases ready
    /// again. Returns (swept, reaped).
    pub async fn maintain(&self) -> Result<(u64, u64)> {
        let epoch = self.epoch();
        let swept = {
            let _w = self.lock();
            self.sweep_done_locked()?
        };
        if swept > 0 {
            self.durable_since(epoch).await?;
        }
        let reaped = self.reap_expired_leases().await?;
        Ok((swept, reaped))
    }

    /// The jobs of `kind` that are not done: pending (scheduled or ready), running and
    /// dead, found through the indexes, so the cost follows their number, not the
    /// number of done jobs kept for the dedupe window.
    pub fn unfinished_and_dead(&self, kind: JobKind) -> Result<Vec<Job>> {
        let mut ids = Vec::new();
        for k in self.db()?.scan_prefix([keys::PENDING, kind.code()]).keys() {
            if let Some((_, _, id)) = keys::parse_pending(&k.storage()?) {
                ids.push(id);
            }
        }
        for entry in self.db()?.scan_prefix([keys::RUNNING]) {
            let (k, v) = entry.storage()?;
            if v.first() == Some(&kind.code())
                && let Some(id) = keys::parse_id(&k)
            {
                ids.push(id);
            }
        }
        for entry in self
            .db()?
            .scan_prefix([keys::FINISHED, keys::FINISHED_DEAD])
        {
            let (k, v) = entry.storage()?;
            if v.first() == Some(&kind.code())
                && let Some((_, _, id)) = keys::parse_finished(&k)
            {
                ids.push(id);
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = self.get(id)? {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.db()?.size_on_disk().storage()
    }
}

/// Count keys whose kept value differs from the scan's: (key, kept, scanned).
pub(super) fn count_differences(
    kept: &BTreeMap<Vec<u8>, u64>,
    scanned: &BTreeMap<Vec<u8>, u64>,
) -> Vec<(Vec<u8>, u64, u64)> {
    let mut out = Vec::new();
    for (k, &n) in kept {
        let s = scanned.get(k).copied().unwrap_or(0);
        if n != s {
            out.push((k.clone(), n, s));
        }
    }
    for (k, &s) in scanned {
        if !kept.contains_key(k) {
            out.push((k.clone(), 0, s));
        }
    }
    out.sort();
    out
}
