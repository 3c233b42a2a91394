//! `fsck`: checks every key of the queue's tree against the invariants in the module doc
//! (`mod.rs`), and with `repair` puts it right without losing anything.
//!
//! What is checked, and what `repair` does about each problem:
//!
//! | key | problem | repair |
//! |---|---|---|
//! | `j` id | does not decode (checksum, version, body, filed under another id) | moved to quarantine (`c`), byte for byte, with its index entries |
//! | `j` id | its index entry (`p`, `r` or `f` for its stored state) is missing or wrong | the right entry is written |
//! | `j` id | it holds its idempotency key (pending, running, done within the window) but `k` does not point at it or at another job of that key | `k` is pointed at it |
//! | `p` `r` `f` | malformed key or value | moved to quarantine |
//! | `p` `r` `f` | names a job whose record is missing | moved to quarantine (it is the only trace of that job) |
//! | `p` `r` `f` | names a job that is in another state (stale) | removed: the job's record is the truth, and its right entry is written |
//! | `k` | malformed value, or names a job that is missing (not quarantined) or has another key | removed, unless a job of that key needs it (then re-pointed) |
//! | `s` name | the envelope does not check (version, CRC) | moved to quarantine |
//! | `c` | the quarantine entry itself does not decode | reported; left as it is |
//! | `m/next_id` | not above the highest job id (ids could be reused) | raised |
//! | `m/k`, `m/d` | a kept count (`counts.rs`) differs from a scan of the indexes, or is not a count | set to what the indexes hold once repaired, in the same write as the other fixes |
//! | any other key | unknown prefix (a newer connector's?) | reported; left as it is |
//!
//! Indexes are derived from job records, so rebuilding them loses nothing; everything
//! else that is wrong is moved aside, never deleted. The whole check runs under the
//! queue's write lock: a live daemon's writers wait for it (jobs are delayed, not lost),
//! and what it sees is one consistent state.

use std::collections::BTreeSet;

use serde::Serialize;

use super::Batch;
use super::Storage as _;
use super::record::{self, Job, Quarantined, Stored};
use super::{Error, JobKind, Queue, Result, counts, decode_at, keys};

/// What `fsck` found (and, with `repair`, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FsckReport {
    /// Records and entries looked at, by kind of key.
    pub jobs: u64,
    pub index_entries: u64,
    pub idempotency_entries: u64,
    pub state_records: u64,
    pub quarantined: u64,
    pub problems: Vec<FsckProblem>,
    /// `repair` was asked for and every repairable problem was fixed.
    pub repaired: bool,
}

impl FsckReport {
    /// Problems `repair` cannot fix (they are reported, and left as they are).
    pub fn unrepairable(&self) -> usize {
        self.problems.iter().filter(|p| !p.repairable).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsckProblem {
    /// The key at fault, rendered (`j/5`, `p/webhook/1767225600000/5`).
    pub key: String,
    pub problem: String,
    /// What `repair` does (or did) about it.
    pub fix: String,
    /// False when `repair` leaves it as it is.
    #[serde(skip)]
    pub repairable: bool,
}

/// A change `repair` makes.
enum Fix {
    /// Move the record under `key` to quarantine with this reason.
    SetAside {
        key: Vec<u8>,
        reason: String,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Move the kept count under `key` by `delta`; `rewrite` when its value is not a
    /// count.
    Count {
        key: Vec<u8>,
        delta: i64,
        rewrite: bool,
    },
    Remove {
        key: Vec<u8>,
    },
    /// Nothing: reported only.
    Leave,
}

struct Found {
    report: FsckReport,
    fixes: Vec<Fix>,
    kinds: Vec<JobKind>,
    /// The counts the job records call for (see `check_kept_counts`).
    expected: std::collections::BTreeMap<Vec<u8>, u64>,
}

impl Found {
    fn expect(&mut self, key: &[u8], value: &[u8]) {
        counts::counted_by(key, value, |k| {
            *self.expected.entry(k.to_vec()).or_default() += 1
        });
    }
}

impl Found {
    fn problem(&mut self, key: &[u8], problem: String, fix_text: &str, fix: Fix) {
        let repairable = !matches!(fix, Fix::Leave);
        self.report.problems.push(FsckProblem {
            key: keys::display(key, &self.kinds),
            problem,
            fix: fix_text.to_string(),
            repairable,
        });
        self.fixes.push(fix);
    }
}

impl Queue {
    /// Checks every record, index entry, idempotency entry and state record (see the
    /// table above); with `repair`, fixes what it found and waits until that is on disk.
    pub async fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let epoch = self.epoch();
        let q = self.clone();
        // sled may panic on a damaged page it reads for the first time (`unwind.rs`).
        let report =
            tokio::task::spawn_blocking(move || super::unwind::guarded(|| q.fsck_blocking(repair)))
                .await
                .map_err(|e| Error::Durability(super::DurabilityError::caused("fsck stopped", e)))?
                .map_err(|panic| Error::Damaged {
                    path: self.inner.path.clone(),
                    detail: format!("sled stopped at {panic}"),
                })??;
        if repair && !report.problems.is_empty() {
            self.durable_since(epoch).await?;
            for &kind in self.inner.settings.kinds() {
                self.wake(kind);
            }
        }
        Ok(report)
    }

    pub(super) fn fsck_blocking(&self, repair: bool) -> Result<FsckReport> {
        let _w = self.lock();
        let mut found = Found {
            report: FsckReport::default(),
            fixes: Vec::new(),
            kinds: self.inner.settings.kinds().to_vec(),
            expected: Default::default(),
        };
        let unreadable = self.check_jobs(&mut found)?;
        self.check_index(&mut found, &unreadable)?;
        self.check_rest(&mut found)?;
        self.check_kept_counts(&mut found)?;
        if repair {
            self.apply_fixes(std::mem::take(&mut found.fixes))?;
            found.report.repaired = true;
        }
        Ok(found.report)
    }

    /// `j` records: each decodes, has its index entry, and holds its key when it should.
    /// Returns the ids of unreadable records (their index entries go with them).
    fn check_jobs(&self, found: &mut Found) -> Result<BTreeSet<u64>> {
        let db = &self.db()?;
        let now = self.now();
        let window = self.inner.settings.dedupe_window;
        let mut unreadable = BTreeSet::new();
        // Idempotency entries this pass re-points; the `k` pass must not also remove them.
        let mut repointed = BTreeSet::new();
        let mut max_id = 0;
        for entry in db.scan_prefix([keys::JOB]) {
            let (k, raw) = entry.storage()?;
            found.report.jobs += 1;
            let job = match decode_at(&k, &raw, self.inner.settings.kinds()) {
                Ok(job) => job,
                Err(e) => {
                    if let Some(id) = keys::parse_id(&k) {
                        unreadable.insert(id);
                    }
                    found.problem(
                        &k,
                        format!("unreadable job record: {e}"),
                        "move it to quarantine (byte for byte) with its index entries",
                        Fix::SetAside {
                            key: k.to_vec(),
                            reason: e.to_string(),
                        },
                    );
                    continue;
                }
            };
            max_id = max_id.max(job.id);
            let (index, value) = index_entry(&job);
            found.expect(&index, &value);
            match db.get(&index).storage()? {
                Some(v) if v.as_ref() == value.as_slice() => {}
                other => {
                    let what = if other.is_some() {
                        "has a wrong value"
                    } else {
                        "is missing"
                    };
                    found.problem(
                        &k,
                        format!(
                            "job {} is {}, but its index entry {} {what}{}",
                            job.id,
                            stored_name(&job.stored),
                            keys::display(&index, self.inner.settings.kinds()),
                            consequence(&job.stored)
                        ),
                        "write the index entry",
                        Fix::Put { key: index, value },
                    );
                }
            }
            if super::txn::holds_key(&job, now, window) {
                let idem = keys::idem(job.kind, &job.key);
                let holder = db.get(&idem).storage()?.and_then(|v| keys::be_u64(&v));
                let held_by_its_key = match holder {
                    Some(id) if id == job.id => true,
                    Some(id) => self.job_has_key(id, job.kind, &job.key)?,
                    None => false,
                };
                if !held_by_its_key {
                    found.problem(
                        &k,
                        format!(
                            "job {} holds its idempotency key, but {} does not point at a job of that key: a duplicate could be enqueued",
                            job.id,
                            keys::display(&idem, self.inner.settings.kinds())
                        ),
                        "point the idempotency entry at this job",
                        Fix::Put {
                            key: idem.clone(),
                            value: job.id.to_be_bytes().to_vec(),
                        },
                    );
                    repointed.insert(idem);
                }
            }
        }
        self.check_idem(found, &unreadable, &repointed)?;
        let next = db
            .get(keys::META_NEXT_ID)
            .storage()?
            .and_then(|v| keys::be_u64(&v))
            .unwrap_or(0);
        let floor = max_id.max(unreadable.last().copied().unwrap_or(0)) + 1;
        if next < floor {
            found.problem(
                keys::META_NEXT_ID,
                format!(
                    "the id counter is {next}, not above the highest job id: ids could be reused"
                ),
                "raise it",
                Fix::Put {
                    key: keys::META_NEXT_ID.to_vec(),
                    value: floor.to_be_bytes().to_vec(),
                },
            );
        }
        Ok(unreadable)
    }

    /// `k` entries: each names an existing job with that kind and key.
    fn check_idem(
        &self,
        found: &mut Found,
        unreadable: &BTreeSet<u64>,
        repointed: &BTreeSet<Vec<u8>>,
    ) -> Result<()> {
        for entry in self.db()?.scan_prefix([keys::IDEM]) {
            let (k, v) = entry.storage()?;
            found.report.idempotency_entries += 1;
            if repointed.contains(k.as_ref()) {
                continue;
            }
            let kind = k.get(1).and_then(|&c| self.inner.settings.by_code(c));
            let key = k.get(2..).and_then(|b| std::str::from_utf8(b).ok());
            let id = keys::be_u64(&v).filter(|_| v.len() == 8);
            let (Some(kind), Some(key), Some(id)) = (kind, key, id) else {
                found.problem(
                    &k,
                    "malformed idempotency entry (unknown kind, key not UTF-8, or value not a job id)".into(),
                    "remove it",
                    Fix::Remove { key: k.to_vec() },
                );
                continue;
            };
            // A job moved to quarantine keeps its key's entry: the record is still there,
            // set aside, and the entry is all that ties the key to it.
            let quarantined = self
                .db()?
                .contains_key(keys::quarantine(&keys::job(id)))
                .storage()?;
            if quarantined || unreadable.contains(&id) || self.job_has_key(id, kind, key)? {
                continue;
            }
            found.problem(
                &k,
                format!("idempotency entry names job {id}, which is missing or has another key"),
                "remove it",
                Fix::Remove { key: k.to_vec() },
            );
        }
        Ok(())
    }

    /// `p`, `r`, `f` entries: each names an existing job in exactly that state.
    fn check_index(&self, found: &mut Found, unreadable: &BTreeSet<u64>) -> Result<()> {
        for prefix in [keys::PENDING, keys::RUNNING, keys::FINISHED] {
            for entry in self.db()?.scan_prefix([prefix]) {
                let (k, v) = entry.storage()?;
                found.report.index_entries += 1;
                let id = match prefix {
                    keys::PENDING => keys::parse_pending(&k).map(|(_, _, id)| id),
                    keys::RUNNING => keys::parse_id(&k),
                    _ => keys::parse_finished(&k).map(|(_, _, id)| id),
                };
                let Some(id) = id else {
                    found.problem(
                        &k,
                        "malformed index key".into(),
                        "move it to quarantine",
                        Fix::SetAside {
                            key: k.to_vec(),
                            reason: "fsck: malformed index key".into(),
                        },
                    );
                    continue;
                };
                if unreadable.contains(&id) {
                    // Reported with the record; set aside with it.
                    found.expect(&k, &v);
                    continue;
                }
                let job = match self.db()?.get(keys::job(id)).storage()? {
                    None => None,
                    Some(raw) => decode_at(&keys::job(id), &raw, self.inner.settings.kinds()).ok(),
                };
                let Some(job) = job else {
                    found.problem(
                        &k,
                        format!("index entry for job {id}, whose record is missing"),
                        "move it to quarantine (the only trace of that job)",
                        Fix::SetAside {
                            key: k.to_vec(),
                            reason: format!(
                                "fsck: index entry for job {id}, whose record is missing"
                            ),
                        },
                    );
                    continue;
                };
                let (right_key, right_value) = index_entry(&job);
                if right_key.as_slice() == k.as_ref() && right_value.as_slice() == v.as_ref() {
                    continue;
                }
                if right_key.as_slice() == k.as_ref() {
                    // A wrong value under the right key: reported and rewritten by the
                    // job pass.
                    continue;
                }
                found.problem(
                    &k,
                    format!(
                        "stale index entry: job {id} is {}",
                        stored_name(&job.stored)
                    ),
                    "remove it (the job's record is the truth)",
                    Fix::Remove { key: k.to_vec() },
                );
            }
        }
        Ok(())
    }

    /// State records, the quarantine, and keys of no known kind.
    fn check_rest(&self, found: &mut Found) -> Result<()> {
        for entry in self.db()?.iter() {
            let (k, v) = entry.storage()?;
            match k.first().copied() {
                Some(keys::JOB | keys::PENDING | keys::RUNNING | keys::FINISHED | keys::IDEM) => {}
                Some(keys::STATE) => {
                    found.report.state_records += 1;
                    if let Err(e) = record::decode_state(&v) {
                        found.problem(
                            &k,
                            format!("unreadable state record: {e}"),
                            "move it to quarantine (byte for byte)",
                            Fix::SetAside {
                                key: k.to_vec(),
                                reason: e.to_string(),
                            },
                        );
                    }
                }
                Some(keys::QUARANTINE) => {
                    found.report.quarantined += 1;
                    found.expect(&k, &v);
                    if let Err(e) = record::decode_quarantined(&v) {
                        found.problem(
                            &k,
                            format!("the quarantine entry itself is unreadable: {e}"),
                            "none: left as it is",
                            Fix::Leave,
                        );
                    }
                }
                _ if k.as_ref() == keys::META_SCHEMA || k.as_ref() == keys::META_NEXT_ID => {}
                // Checked against a scan by `check_kept_counts`.
                _ if counts::is_count_key(&k) => {}
                _ => found.problem(
                    &k,
                    "a key of no known kind (written by a newer connector?)".into(),
                    "none: left as it is",
                    Fix::Leave,
                ),
            }
        }
        Ok(())
    }

    /// The kept counts (`counts.rs`) against what the job records call for (each
    /// readable record's index entry; an unreadable record's entries as they are, since
    /// they go with it; the quarantine as it is). A count that differs is a problem of
    /// its own. A count that differs only from the indexes as they are now (an index
    /// entry removed or added behind the queue's back) is not: that entry is the
    /// problem, reported above.
    ///
    /// The repair moves every count by its difference from the indexes as they are now,
    /// in the same batch as the index fixes, which move it further by what they change:
    /// so after the repair the counts equal the repaired indexes.
    fn check_kept_counts(&self, found: &mut Found) -> Result<()> {
        let db = self.db()?;
        let ((kept, malformed), scanned) = (counts::kept(&db)?, counts::scan(&db)?);
        let kinds = self.inner.settings.kinds();
        for k in &malformed {
            found.problem(
                k,
                format!(
                    "kept count {}: its value is not a count (8 bytes)",
                    counts::display(k, kinds)
                ),
                "rewrite it from the indexes",
                Fix::Leave,
            );
            // Reported above; the fix is the rewrite below.
            found.fixes.pop();
            if let Some(p) = found.report.problems.last_mut() {
                p.repairable = true;
            }
        }
        let expected = std::mem::take(&mut found.expected);
        for (k, kept, want) in super::admin::count_differences(&kept, &expected) {
            if malformed.contains(&k) {
                continue;
            }
            found.problem(
                &k.clone(),
                format!(
                    "kept count {} is {kept}, the job records call for {want}: stats and /metrics show a wrong number",
                    counts::display(&k, kinds)
                ),
                "set it to what the repaired indexes hold",
                Fix::Leave,
            );
            found.fixes.pop();
            if let Some(p) = found.report.problems.last_mut() {
                p.repairable = true;
            }
        }
        for (k, kept, now) in super::admin::count_differences(&kept, &scanned) {
            found.fixes.push(Fix::Count {
                rewrite: false,
                delta: (i128::from(now) - i128::from(kept))
                    .clamp(i128::from(i64::MIN), i128::from(i64::MAX))
                    as i64,
                key: k,
            });
        }
        for k in malformed {
            let now = scanned.get(&k).copied().unwrap_or(0);
            if now == 0 {
                found.fixes.push(Fix::Remove { key: k });
            }
        }
        Ok(())
    }

    /// True when job `id` exists, reads, and has this kind and key.
    fn job_has_key(&self, id: u64, kind: JobKind, key: &str) -> Result<bool> {
        Ok(match self.db()?.get(keys::job(id)).storage()? {
            Some(raw) => decode_at(&keys::job(id), &raw, self.inner.settings.kinds())
                .is_ok_and(|j| j.kind == kind && j.key == key),
            None => false,
        })
    }

    fn apply_fixes(&self, fixes: Vec<Fix>) -> Result<()> {
        let mut b = Batch::default();
        for fix in fixes {
            match fix {
                Fix::SetAside { key, reason } => {
                    let Some(raw) = self.db()?.get(&key).storage()? else {
                        continue;
                    };
                    if key.first() == Some(&keys::JOB) {
                        // Takes the job's index entries with it.
                        self.quarantine_into(&mut b, &key, &raw, &reason)?;
                        continue;
                    }
                    tracing::warn!(key = %keys::display(&key, self.inner.settings.kinds()), %reason, "fsck: record moved to quarantine");
                    let q = Quarantined {
                        key: key.clone(),
                        reason,
                        at_ms: self.now(),
                        raw: raw.to_vec(),
                    };
                    b.put(keys::quarantine(&key), record::encode_quarantined(&q));
                    b.remove(key);
                }
                Fix::Put { key, value } => b.insert(key, value),
                Fix::Remove { key } => b.remove(key),
                Fix::Count {
                    key,
                    delta,
                    rewrite,
                } => {
                    if rewrite {
                        b.remove(&key);
                    }
                    b.adjust(&key, delta);
                }
                Fix::Leave => {}
            }
        }
        self.apply(b)?;
        Ok(())
    }
}

/// The index key and value a job's stored state calls for.
fn index_entry(job: &Job) -> (Vec<u8>, Vec<u8>) {
    match job.stored {
        Stored::Pending { due_ms } => {
            (keys::pending(job.kind, due_ms, job.id).to_vec(), Vec::new())
        }
        Stored::Running { lease_until_ms, .. } => (
            keys::running(job.id).to_vec(),
            keys::running_value(job.kind, lease_until_ms).to_vec(),
        ),
        Stored::Done { at_ms } => (
            keys::finished(keys::FINISHED_DONE, at_ms, job.id).to_vec(),
            vec![job.kind.code()],
        ),
        Stored::Dead { at_ms, .. } => (
            keys::finished(keys::FINISHED_DEAD, at_ms, job.id).to_vec(),
            vec![job.kind.code()],
        ),
    }
}

fn stored_name(s: &Stored) -> &'static str {
    match s {
        Stored::Pending { .. } => "pending",
        Stored::Running { .. } => "running",
        Stored::Done { .. } => "done",
        Stored::Dead { .. } => "dead",
    }
}

/// What a missing index entry means for the job, for the operator reading the report.
fn consequence(s: &Stored) -> &'static str {
    match s {
        Stored::Pending { .. } => ": no worker will ever lease it",
        Stored::Running { .. } => ": a crash would not make it run again",
        Stored::Done { .. } | Stored::Dead { .. } => ": stats, purge and sweeps miss it",
    }
}
