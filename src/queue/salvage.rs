//! `salvage`: copies every record that still passes its own checksum out of a damaged
//! queue database into a fresh one, and reports what was kept and what was lost.
//!
//! For a database sled cannot open (or panics on, see `unwind.rs`), or opens short.
//! The source is never written to: it is read under sled's own lock (so no daemon can
//! hold it meanwhile) and left as it was.
//!
//! # Where records come from
//!
//! 1. **sled**, when it can still read the database: a copy of the files is opened in a
//!    scratch directory beside the destination (sled rewrites the tail of its log when
//!    it opens, and the original must stay as it is), and its one tree is read key by
//!    key, every step guarded against sled's panics. A read that fails ends this view;
//!    what was read before it counts.
//! 2. **The raw files** (`db`, `snap.*`, `blobs/*`), always: records are
//!    self-describing (`record.rs`), so every offset where a job envelope decodes and
//!    its CRC-32 matches is a job — filed under the id it carries (`keys::job`). sled
//!    rewrites pages, so a job is usually found several times, at several stages of
//!    its life; the one kept is the furthest along (most attempts, then longest
//!    history, then the latest in the file). A state (`s`) or quarantine (`c`) record
//!    is found where sled logged it as a single update (its key stored right before
//!    it); one that sled only wrote inside a whole page cannot be told from its
//!    neighbours' keys and is not recovered from raw bytes.
//!
//! A job sled read is kept as sled read it, unless the raw files hold a version of it
//! with more attempts or a longer history (written after the point where sled's log
//! was cut). Index entries (`p`, `r`, `f`, `k`) are not copied: the destination's are
//! rebuilt from the jobs by `fsck --repair`, and it must then check clean. The id
//! counter is set above the high-water mark (`connector.hwm`, `disk.rs`) and every
//! id found, so no id is ever handed out twice.
//!
//! # What is lost, and what cannot be told apart
//!
//! Ids below the high-water mark that no source holds are reported as missing. A job
//! that was deleted on purpose (purged, or swept after its dedupe window) is missing
//! the same way, and the raw files can even still hold an old copy of it, which then
//! comes back: salvage cannot tell it from a lost job, and keeps it.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::record::{self, Found, Job};
use super::{Batch, Clock, Error, JobKind, JobState, Queue, Settings, counts, disk, keys, unwind};

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("no queue database at {path} (no `db` file there)")]
    NotAQueue { path: PathBuf },
    #[error(
        "the queue database {path} is in use by another process (is the connector daemon running? stop it first: salvage works only on a stopped queue)"
    )]
    Locked { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination {path} {reason}: give a new directory")]
    Destination { path: PathBuf, reason: &'static str },
    #[error("cannot write the salvaged database at {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
}

/// What a salvage kept and lost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SalvageReport {
    pub source: PathBuf,
    pub destination: PathBuf,
    /// How sled fared: `opened`, or why it could not read the database.
    pub sled: String,
    /// Keys sled read before it stopped (0 when it could not open the database).
    pub sled_keys: u64,
    /// Bytes of raw files scanned.
    pub scanned_bytes: u64,
    /// Jobs kept, by kind and state (as stored: a running job is retried on open).
    pub jobs: Vec<KindStateCount>,
    pub jobs_kept: u64,
    /// Of those, jobs that only the raw files still held.
    pub jobs_from_raw_files: u64,
    pub state_records: u64,
    pub quarantine_records: u64,
    /// Job-shaped byte ranges whose checksum did not match (damaged copies).
    pub damaged_copies: u64,
    /// Records sled read whose checksum or layout is wrong, by key, not copied (unless a
    /// good version of the same job was found elsewhere).
    pub unreadable: Vec<String>,
    /// Keys with a prefix this build does not know, not copied.
    pub unknown_keys: Vec<String>,
    /// `next_id` of `connector.hwm`: every id below it was acknowledged.
    pub high_water_mark: Option<u64>,
    /// The id counter of the salvaged database.
    pub next_id: u64,
    /// Ids below the high-water mark (or the highest id found) that nothing holds.
    pub lost: u64,
    pub lost_ids: Vec<IdRange>,
    /// The salvaged database passed `fsck` after its indexes were rebuilt.
    pub fsck_clean: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindStateCount {
    pub kind: JobKind,
    pub state: JobState,
    pub count: u64,
}

/// `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdRange {
    pub from: u64,
    pub to: u64,
}

/// A job found, and how far along it is.
struct Candidate {
    raw: Vec<u8>,
    job: Job,
    /// Position in the files (sled's view: after every file).
    at: u64,
    from_sled: bool,
}

impl Candidate {
    fn progress(&self) -> (u32, usize) {
        (self.job.attempts, self.job.history.len())
    }
}

#[derive(Default)]
struct Haul {
    jobs: BTreeMap<u64, Candidate>,
    /// `s`/`c` key → (position, value).
    other: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
    /// `s` keys seen logged with a value whose checksum does not match.
    bad_state: std::collections::BTreeSet<Vec<u8>>,
    damaged: u64,
}

impl Haul {
    fn offer(&mut self, c: Candidate) {
        match self.jobs.get(&c.job.id) {
            Some(old) if old.from_sled && !c.from_sled && c.progress() <= old.progress() => {}
            Some(old) if !old.from_sled && (c.progress(), c.at) <= (old.progress(), old.at) => {}
            _ => {
                self.jobs.insert(c.job.id, c);
            }
        }
    }

    fn offer_other(&mut self, key: Vec<u8>, at: u64, value: Vec<u8>) {
        match self.other.get(&key) {
            Some((old_at, _)) if *old_at >= at => {}
            _ => {
                self.other.insert(key, (at, value));
            }
        }
    }
}

/// Salvages the database at `from` into a new database at `to` (which must not exist,
/// or be an empty directory). See the module doc.
pub fn salvage(
    from: &Path,
    to: &Path,
    settings: Settings,
    clock: Arc<dyn Clock>,
) -> Result<SalvageReport, SalvageError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SalvageError::Read { path, source }
    };
    let db_file = from.join("db");
    if !db_file.is_file() {
        return Err(SalvageError::NotAQueue {
            path: from.to_path_buf(),
        });
    }
    check_destination(from, to)?;
    // Held until the end: no daemon can open the source meanwhile.
    let _lock = lock(&db_file)?;
    let files = read_files(from).map_err(read_err(from))?;
    let mut report = SalvageReport {
        source: from.to_path_buf(),
        destination: to.to_path_buf(),
        high_water_mark: disk::read_hwm(from),
        scanned_bytes: files.iter().map(|(_, b)| b.len() as u64).sum(),
        ..SalvageReport::default()
    };
    let kinds = settings.kinds().to_vec();
    let mut found = Haul::default();
    let mut at = 0u64;
    for (_, bytes) in &files {
        scan(bytes, at, &mut found, &kinds);
        at += bytes.len() as u64;
    }
    report.damaged_copies = found.damaged;

    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(read_err(parent))?;
    let scratch = tempfile::Builder::new()
        .prefix(".salvage-")
        .tempdir_in(parent)
        .map_err(read_err(parent))?;
    let mut sled_next_id = None;
    for (rel, bytes) in &files {
        let dest = scratch.path().join(rel);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(read_err(dir))?;
        }
        std::fs::write(&dest, bytes).map_err(read_err(&dest))?;
    }
    report.sled = match read_with_sled(scratch.path(), at, &mut found, &mut report, &kinds) {
        Ok(SledRead { next_id, stopped }) => {
            sled_next_id = next_id;
            match stopped {
                // What was read before the stop is kept; the report says it stopped.
                Some(why) => format!("sled stopped reading part way: {why}"),
                None => "opened".to_string(),
            }
        }
        Err(why) => why.to_string(),
    };
    drop(scratch);
    report.jobs_from_raw_files = found.jobs.values().filter(|c| !c.from_sled).count() as u64;

    let max_id = found.jobs.keys().next_back().copied().unwrap_or(0);
    let next_id = [
        report.high_water_mark.unwrap_or(1),
        sled_next_id.unwrap_or(1),
        max_id + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or(1);
    report.next_id = next_id;
    let upto = report.high_water_mark.unwrap_or(max_id + 1).max(max_id + 1);
    let mut range: Option<IdRange> = None;
    for id in 1..upto {
        if found.jobs.contains_key(&id) {
            continue;
        }
        report.lost += 1;
        match &mut range {
            Some(r) if r.to + 1 == id => r.to = id,
            _ => {
                report.lost_ids.extend(range.take());
                range = Some(IdRange { from: id, to: id });
            }
        }
    }
    report.lost_ids.extend(range);
    for k in &found.bad_state {
        let shown = keys::display(k, &kinds);
        let known = report
            .unreadable
            .iter()
            .any(|u| u.starts_with(&format!("{shown}: ")));
        if !found.other.contains_key(k) && !known {
            report
                .unreadable
                .push(format!("{shown}: no copy in the files passes its checksum"));
        }
    }
    // A job found under a good version is not unreadable any more.
    report.unreadable.retain(|k| {
        !(k.starts_with("j/")
            && k[2..]
                .parse::<u64>()
                .is_ok_and(|id| found.jobs.contains_key(&id)))
    });

    let now = clock.now_ms();
    let mut counts: BTreeMap<(JobKind, JobState), u64> = BTreeMap::new();
    for c in found.jobs.values() {
        *counts.entry((c.job.kind, c.job.state(now))).or_default() += 1;
    }
    report.jobs = counts
        .into_iter()
        .map(|((kind, state), count)| KindStateCount { kind, state, count })
        .collect();
    report.jobs_kept = found.jobs.len() as u64;
    for k in found.other.keys() {
        match k.first() {
            Some(&keys::STATE) => report.state_records += 1,
            _ => report.quarantine_records += 1,
        }
    }

    let write_err = |e: Error| SalvageError::Write {
        path: to.to_path_buf(),
        source: Box::new(e),
    };
    let (queue, _) = Queue::open(to, settings, clock).map_err(write_err)?;
    report.fsck_clean = queue.restore(&found, next_id).map_err(write_err)?;
    Ok(report)
}

fn check_destination(from: &Path, to: &Path) -> Result<(), SalvageError> {
    let bad = |reason| {
        Err(SalvageError::Destination {
            path: to.to_path_buf(),
            reason,
        })
    };
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return bad("is not empty");
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) if e.kind() == ErrorKind::NotADirectory => return bad("is a file"),
        Err(source) => {
            return Err(SalvageError::Read {
                path: to.to_path_buf(),
                source,
            });
        }
    }
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if abs(to).starts_with(abs(from)) {
        return bad("is inside the damaged database");
    }
    Ok(())
}

/// Takes sled's lock on `db` (an exclusive `flock`, as sled does), or says who has it.
fn lock(db: &Path) -> Result<std::fs::File, SalvageError> {
    let file = std::fs::File::open(db).map_err(|source| SalvageError::Read {
        path: db.to_path_buf(),
        source,
    })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::WouldBlock {
            return Err(SalvageError::Locked {
                path: db.parent().unwrap_or(db).to_path_buf(),
            });
        }
        return Err(SalvageError::Read {
            path: db.to_path_buf(),
            source: e,
        });
    }
    Ok(file)
}

/// sled's files under `dir` (relative path, bytes), `db` first. Our own files
/// (`connector.hwm`) are not sled's.
fn read_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = vec![(PathBuf::from("db"), std::fs::read(dir.join("db"))?)];
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = PathBuf::from(entry.file_name());
        let text = name.to_string_lossy();
        if text == "conf" || text.starts_with("snap.") {
            names.push(name);
        } else if text == "blobs" && entry.file_type()?.is_dir() {
            for blob in std::fs::read_dir(entry.path())? {
                let blob = blob?;
                if blob.file_type()?.is_file() {
                    names.push(name.join(blob.file_name()));
                }
            }
        }
    }
    names.sort();
    for name in names {
        let bytes = std::fs::read(dir.join(&name))?;
        out.push((name, bytes));
    }
    Ok(out)
}

/// How long the bincode varint at the head of `b` is, if it is one of an integer.
fn varint_len(b: &[u8]) -> Option<usize> {
    match *b.first()? {
        0..=250 => Some(1),
        251 => Some(3),
        252 => Some(5),
        253 => Some(9),
        _ => None,
    }
}

/// sled's own varint (`serialization.rs`, `impl Serialize for u64`): (value, length).
fn sled_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let le = |n: usize| -> Option<u64> {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b.get(1..1 + n)?);
        Some(u64::from_le_bytes(v))
    };
    Some(match first {
        0..=240 => (u64::from(first), 1),
        241..=248 => (
            240 + 256 * u64::from(first - 241) + u64::from(*b.get(1)?),
            2,
        ),
        249 => (
            2288 + 256 * u64::from(*b.get(1)?) + u64::from(*b.get(2)?),
            3,
        ),
        n => {
            let len = usize::from(n - 247);
            (le(len)?, 1 + len)
        }
    })
}

/// Every job envelope, and every `s`/`c` record sled logged as a single update, in
/// `bytes`; `base` is where `bytes` starts among all files scanned.
fn scan(bytes: &[u8], base: u64, found: &mut Haul, kinds: &[JobKind]) {
    for i in 0..bytes.len() {
        let at = &bytes[i..];
        match at[0] {
            record::RECORD_VERSION if looks_like_job(at, kinds) => {
                match record::job_at(at, kinds) {
                    Some(Found::Job(job, len)) => found.offer(Candidate {
                        raw: at[..len].to_vec(),
                        job,
                        at: base + i as u64,
                        from_sled: false,
                    }),
                    Some(Found::Damaged) => found.damaged += 1,
                    None => {}
                }
            }
            // sled's `Link::Set(key, value)`: 0, key length, key, value length, value.
            0 => match logged_set(&at[1..]) {
                Some(Logged::Good(key, value)) => {
                    found.offer_other(key.to_vec(), base + i as u64, value.to_vec())
                }
                Some(Logged::Damaged(key)) => {
                    found.bad_state.insert(key.to_vec());
                }
                None => {}
            },
            _ => {}
        }
    }
}

/// A cheap look at what would be a `JobV1` body before decoding it: an id, a known
/// kind code, then a key length no longer than the queue allows.
fn looks_like_job(at: &[u8], kinds: &[JobKind]) -> bool {
    let Some(body) = at.get(5..) else {
        return false;
    };
    let Some(id_len) = varint_len(body) else {
        return false;
    };
    let Some(&kind) = body.get(id_len) else {
        return false;
    };
    if super::kind::by_code(kinds, kind).is_none() {
        return false;
    }
    match body.get(id_len + 1) {
        Some(&n) if n < 251 => true,
        Some(251) => body
            .get(id_len + 2..id_len + 4)
            .is_some_and(|b| usize::from(u16::from_le_bytes([b[0], b[1]])) <= super::MAX_KEY_LEN),
        _ => false,
    }
}

/// What [`logged_set`] found.
enum Logged<'a> {
    /// A key and its value, which checks.
    Good(&'a [u8], &'a [u8]),
    /// A state key whose value is laid out as an envelope but does not check.
    Damaged(&'a [u8]),
}

/// A state or quarantine record logged as `Link::Set`.
fn logged_set(b: &[u8]) -> Option<Logged<'_>> {
    let (klen, n) = sled_varint(b)?;
    let klen = usize::try_from(klen).ok()?;
    if !(2..=super::MAX_KEY_LEN + 10).contains(&klen) {
        return None;
    }
    let key = b.get(n..n + klen)?;
    let rest = &b[n + klen..];
    let (vlen, m) = sled_varint(rest)?;
    // A length read from garbage may be near 2^64: the end must not overflow.
    let value = rest.get(m..m.checked_add(usize::try_from(vlen).ok()?)?)?;
    match key[0] {
        keys::STATE => {
            if !key[1..].iter().all(|c| c.is_ascii_graphic()) {
                return None;
            }
            match record::decode_state(value) {
                Ok(_) => Some(Logged::Good(key, value)),
                Err(_) if value.first() == Some(&record::RECORD_VERSION) && value.len() > 5 => {
                    Some(Logged::Damaged(key))
                }
                Err(_) => None,
            }
        }
        keys::QUARANTINE => {
            let q = record::decode_quarantined(value).ok()?;
            (q.key == key[1..]).then_some(Logged::Good(key, value))
        }
        _ => None,
    }
}

/// Why sled could not open the copy at all.
#[derive(Debug, thiserror::Error)]
enum SledOpen {
    #[error("sled cannot open it: {0}")]
    Failed(#[source] sled::Error),
    #[error("sled cannot open it: it stopped at {0}")]
    Panicked(String),
}

/// Why sled stopped part way through the keys.
#[derive(Debug, thiserror::Error)]
enum SledStop {
    #[error("{0}")]
    Failed(#[source] sled::Error),
    #[error("it stopped at {0}")]
    Panicked(String),
}

/// What sled read of the copy: its id counter, and why it stopped early if it did.
struct SledRead {
    next_id: Option<u64>,
    stopped: Option<SledStop>,
}

/// Opens the copy at `dir` with sled and reads every key, guarded. `Err` says why sled
/// could not open it; a stop part way keeps what was read and says why.
fn read_with_sled(
    dir: &Path,
    at: u64,
    found: &mut Haul,
    report: &mut SalvageReport,
    kinds: &[JobKind],
) -> Result<SledRead, SledOpen> {
    let db = match unwind::guarded(|| sled::Config::new().path(dir).open()) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(SledOpen::Failed(e)),
        Err(panic) => return Err(SledOpen::Panicked(panic.to_string())),
    };
    let mut iter = db.iter();
    let mut next_id = None;
    let mut stopped = None;
    loop {
        let (k, v) = match unwind::guarded(|| iter.next()) {
            Ok(None) => break,
            Ok(Some(Ok(kv))) => kv,
            Ok(Some(Err(e))) => {
                stopped = Some(SledStop::Failed(e));
                break;
            }
            Err(panic) => {
                stopped = Some(SledStop::Panicked(panic.to_string()));
                break;
            }
        };
        report.sled_keys += 1;
        match k.first() {
            Some(&keys::JOB) => match super::decode_at(&k, &v, kinds) {
                Ok(job) => found.offer(Candidate {
                    raw: v.to_vec(),
                    job,
                    at,
                    from_sled: true,
                }),
                Err(e) => report
                    .unreadable
                    .push(format!("{}: {e}", keys::display(&k, kinds))),
            },
            Some(&keys::STATE) => match record::decode_state(&v) {
                Ok(_) => found.offer_other(k.to_vec(), at, v.to_vec()),
                Err(e) => report
                    .unreadable
                    .push(format!("{}: {e}", keys::display(&k, kinds))),
            },
            Some(&keys::QUARANTINE) => match record::decode_quarantined(&v) {
                Ok(_) => found.offer_other(k.to_vec(), at, v.to_vec()),
                Err(e) => report
                    .unreadable
                    .push(format!("{}: {e}", keys::display(&k, kinds))),
            },
            Some(&(keys::PENDING | keys::RUNNING | keys::FINISHED | keys::IDEM)) => {}
            _ if k.as_ref() == keys::META_NEXT_ID => next_id = keys::be_u64(&v),
            _ if k.as_ref() == keys::META_SCHEMA => {}
            // Derived from the indexes: rebuilt by the repair, like them.
            _ if counts::is_count_key(&k) => {}
            _ => report.unknown_keys.push(keys::display(&k, kinds)),
        }
    }
    // Dropping a database sled could not fully read may panic again; it is a scratch
    // copy, so whatever it does is thrown away.
    let _ = unwind::guarded(move || drop((iter, db)));
    Ok(SledRead { next_id, stopped })
}

impl Queue {
    /// Writes salvaged records into this (new, empty) queue, rebuilds its indexes and
    /// checks it. Returns whether the check came out clean.
    fn restore(&self, found: &Haul, next_id: u64) -> Result<bool, Error> {
        let mut b = Batch::default();
        for (id, c) in &found.jobs {
            b.insert(keys::job(*id), c.raw.as_slice());
        }
        for (k, (_, v)) in &found.other {
            b.insert(k.as_slice(), v.as_slice());
        }
        b.insert(keys::META_NEXT_ID, next_id.to_be_bytes());
        {
            let mut w = self.lock();
            self.apply(b)?;
            w.next_id = next_id;
        }
        self.fsck_blocking(true)?;
        let check = self.fsck_blocking(false)?;
        self.with_db(|db| db.flush())?;
        Ok(check.problems.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_varints_read_back() {
        assert_eq!(sled_varint(&[7]), Some((7, 1)));
        assert_eq!(sled_varint(&[241, 10]), Some((250, 2)));
        assert_eq!(sled_varint(&[249, 0, 0]), Some((2288, 3)));
        assert_eq!(sled_varint(&[250, 1, 0, 1]), Some((0x01_0001, 4)));
    }

    /// Garbage that reads as a record with a value length near 2^64 is not a record
    /// (it once overflowed the end offset and panicked the salvage).
    #[test]
    fn a_logged_set_with_a_huge_value_length_is_not_a_record() {
        let mut b = vec![2, keys::STATE, b'a', 255];
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 16]);
        assert!(logged_set(&b).is_none());
    }
}
