//! Corruption between opens (SPEC §2, issue 2): bytes of the database are overwritten
//! while the queue is closed, then it is opened again.
//!
//! Two layers can be damaged, and they fail differently:
//!
//! - **A job record** (the value under `j` + id). sled hands the bytes back as they
//!   are; the queue's own envelope (version byte + CRC-32, see `queue-schema/`) must
//!   catch it: the record is moved to quarantine under its key, byte for byte, and every
//!   other job keeps working. These tests damage the value through sled itself (the
//!   same sled version as the queue), which is what a bad sector under one value, a
//!   stray write or a downgrade after a newer build looks like from above sled.
//! - **sled's own files** (`db`, `snap.*`). sled checks its own CRCs; what it does with
//!   overwritten bytes is pinned in the last tests, and whatever sled decides, opening
//!   the queue must never panic and any error must name the database path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector::jobs;
use connector::queue::record::{RecordError, decode_job, decode_quarantined, encode_job};
use connector::queue::{
    Error, JobState, ListFilter, ManualClock, Queue, Recovery, SCHEMA_VERSION, Stored,
};

use crate::support::wait;

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;

/// sled's global thread pool can hold the database file, and with it sled's lock, for
/// a moment after the last handle is dropped (its tasks own a clone of the file): an
/// open right after a close waits for the lock.
fn open_queue(path: &Path, clock: Arc<ManualClock>) -> Result<(Queue, Recovery), Error> {
    wait::when_unlocked(
        path,
        || Queue::open(path, jobs::settings(), clock.clone()),
        |e| matches!(e, Error::Locked { .. }),
    )
}

fn open(path: &Path) -> (Queue, Recovery) {
    open_queue(path, Arc::new(ManualClock::new(T0))).expect("open queue")
}

/// The `j` key of a job: `j` + id as 8 big-endian bytes (queue-schema/README.md).
fn job_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'j';
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Opens the closed database with sled directly and lets `f` change it.
fn with_raw_sled<T>(path: &Path, f: impl FnOnce(&sled::Db) -> T) -> T {
    let db =
        wait::when_unlocked(path, || sled::open(path), wait::sled_locked).expect("raw sled open");
    let out = f(&db);
    db.flush().expect("raw sled flush");
    out
}

/// A queue with six webhook jobs: 1–5 pending (3 of them leased when `leave_running`),
/// 6 done. Returns the database path.
async fn six_jobs(dir: &Path, leave_running: Option<u64>) -> PathBuf {
    let path = dir.join("queue");
    let (q, _) = open(&path);
    for i in 1..=6u64 {
        let e = q
            .enqueue(
                jobs::WEBHOOK,
                &format!("evt-{i}"),
                format!("{{\"n\":{i}}}").into_bytes(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(e.job.id, i);
    }
    // Lease all six: ack 6, fail the others back to pending (webhook ladder: the next
    // rung is 1 min), except the one to leave running.
    let leased = q.lease(jobs::WEBHOOK, 6).await.unwrap();
    assert_eq!(leased.len(), 6);
    for l in leased {
        match l.job.id {
            6 => {
                q.ack(l.token()).await.unwrap();
            }
            id if Some(id) == leave_running => {}
            _ => {
                q.fail(l.token(), "503", None).await.unwrap();
            }
        }
    }
    drop(q);
    path
}

/// What the other jobs must look like after the damaged one was moved aside: all there,
/// leasable and ackable, and counted once.
async fn rest_keeps_working(q: &Queue, clock: &ManualClock, damaged: u64) {
    let jobs = q.list(&ListFilter::default()).unwrap();
    let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
    let expected: Vec<u64> = (1..=6).filter(|id| *id != damaged).collect();
    assert_eq!(ids, expected, "every other job is intact");
    for job in &jobs {
        assert_eq!(job.key, format!("evt-{}", job.id));
        assert_eq!(job.payload, format!("{{\"n\":{}}}", job.id).into_bytes());
    }
    assert_eq!(q.stats().unwrap().quarantined, 1);

    // The pending ones are due after their 1-minute rung: lease and ack them all.
    clock.advance(Duration::from_secs(120));
    let leased = q.lease(jobs::WEBHOOK, 10).await.unwrap();
    let mut leased_ids: Vec<u64> = leased.iter().map(|l| l.job.id).collect();
    leased_ids.sort();
    let pending: Vec<u64> = expected.iter().copied().filter(|id| *id != 6).collect();
    assert_eq!(leased_ids, pending);
    for l in leased {
        q.ack(l.token()).await.unwrap();
    }
    let stats = q.stats().unwrap();
    assert_eq!(stats.total(JobState::Done), expected.len() as u64);
    assert_eq!(
        JobState::ALL.iter().map(|s| stats.total(*s)).sum::<u64>(),
        expected.len() as u64
    );
}

/// Damages job 3's record with `mangle`, reopens, and checks that exactly that record is
/// quarantined under `j/3` with a reason matching `reason`, kept byte for byte.
async fn damaged_record_is_quarantined(mangle: impl FnOnce(Vec<u8>) -> Vec<u8>, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs(dir.path(), None).await;
    let damaged = with_raw_sled(&path, |db| {
        let good = db
            .get(job_key(3))
            .unwrap()
            .expect("job 3 is stored")
            .to_vec();
        let bad = mangle(good);
        db.insert(job_key(3), bad.clone()).unwrap();
        bad
    });

    let clock = Arc::new(ManualClock::new(T0));
    let (q, recovery) = open_queue(&path, clock.clone()).unwrap();
    assert_eq!(recovery.quarantined, 0, "job 3 was not running");
    // Reading the job is what finds the damage.
    assert!(
        q.get(3).unwrap().is_none(),
        "a damaged record never reads as a job"
    );
    let quarantined = q.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].key, "j/3", "reported with its key");
    assert!(
        quarantined[0].reason.contains(reason),
        "reason `{}` should say `{reason}`",
        quarantined[0].reason
    );
    assert_eq!(quarantined[0].bytes, damaged.len());
    rest_keeps_working(&q, &clock, 3).await;
    drop(q);

    // Moved aside byte for byte, under `c` + the original key.
    with_raw_sled(&path, |db| {
        assert!(db.get(job_key(3)).unwrap().is_none());
        let mut ckey = vec![b'c'];
        ckey.extend_from_slice(&job_key(3));
        let q = decode_quarantined(&db.get(&ckey).unwrap().expect("quarantine entry")).unwrap();
        assert_eq!(q.key, job_key(3));
        assert_eq!(q.raw, damaged);
        assert_eq!(q.at_ms, T0);
    });
    // And it stays quarantined across another open.
    let (q, _) = open(&path);
    assert_eq!(q.stats().unwrap().quarantined, 1);
}

#[tokio::test]
async fn flipped_body_bytes_fail_the_checksum_and_are_quarantined() {
    damaged_record_is_quarantined(
        |mut v| {
            // Flip bytes in the body, leaving the envelope header alone.
            let mid = 5 + (v.len() - 5) / 2;
            for b in &mut v[mid..mid + 3] {
                *b ^= 0xa5;
            }
            v
        },
        "checksum mismatch",
    )
    .await;
}

#[tokio::test]
async fn a_record_cut_inside_its_body_fails_the_checksum() {
    damaged_record_is_quarantined(|v| v[..v.len() - 4].to_vec(), "checksum mismatch").await;
}

#[tokio::test]
async fn a_record_shorter_than_its_header_is_quarantined() {
    damaged_record_is_quarantined(|v| v[..3].to_vec(), "shorter than its 5-byte header").await;
}

#[tokio::test]
async fn a_newer_record_version_is_refused_never_misread() {
    // Version 2 with a correct CRC over a body this build could decode as version 1:
    // only the version byte says "not for you", and it must be believed.
    let to_v2 = |mut v: Vec<u8>| {
        v[0] = 2;
        v
    };
    let probe = {
        let dir = tempfile::tempdir().unwrap();
        let path = six_jobs(dir.path(), None).await;
        with_raw_sled(&path, |db| db.get(job_key(3)).unwrap().unwrap().to_vec())
    };
    assert_eq!(
        decode_job(&to_v2(probe), &jobs::ALL).unwrap_err(),
        RecordError::NewerVersion {
            found: 2,
            supported: 1
        }
    );
    damaged_record_is_quarantined(to_v2, "record version 2 is newer than this build reads").await;
}

/// mod.rs: "A record that fails its checksum or does not decode is moved under `c` with
/// the reason, its index entries are dropped". If they are not, `stats` (which counts
/// index entries, and is what `queuectl stats` and the metrics show) keeps counting the
/// quarantined job: a pending one until some lease happens to walk over its entry, a
/// done or dead one until it is purged.
#[tokio::test]
async fn a_quarantined_job_is_no_longer_counted_in_stats() {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs(dir.path(), None).await;
    // Job 3 is pending (scheduled), job 6 is done.
    with_raw_sled(&path, |db| {
        for id in [3, 6] {
            let mut v = db.get(job_key(id)).unwrap().unwrap().to_vec();
            v[6] ^= 0xff;
            db.insert(job_key(id), v).unwrap();
        }
    });
    let (q, _) = open(&path);
    let jobs = q.list(&ListFilter::default()).unwrap();
    assert_eq!(jobs.len(), 4);
    let stats = q.stats().unwrap();
    assert_eq!(stats.quarantined, 2);
    assert_eq!(
        (
            stats.total(JobState::Scheduled),
            stats.total(JobState::Done)
        ),
        (4, 0),
        "stats count the four jobs left, not the two quarantined ones: {stats:?}"
    );
}

#[tokio::test]
async fn a_damaged_record_of_a_running_job_is_quarantined_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs(dir.path(), Some(3)).await;
    with_raw_sled(&path, |db| {
        let mut v = db.get(job_key(3)).unwrap().unwrap().to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        db.insert(job_key(3), v).unwrap();
    });
    let clock = Arc::new(ManualClock::new(T0));
    let (q, recovery) = open_queue(&path, clock.clone()).unwrap();
    assert_eq!(recovery.quarantined, 1);
    assert_eq!(recovery.interrupted, 0);
    let quarantined = q.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].key, "j/3");
    assert_eq!(q.stats().unwrap().total(JobState::Running), 0);
    rest_keeps_working(&q, &clock, 3).await;
}

#[tokio::test]
async fn a_record_filed_under_another_id_is_quarantined() {
    // A well-formed record in the wrong place (a misdirected write) is not trusted: it
    // would otherwise show up as a second job 4. The write paths check this (they read
    // through `load_locked`); `list`, `get` and `export` must too.
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs(dir.path(), None).await;
    with_raw_sled(&path, |db| {
        let mut job = decode_job(&db.get(job_key(3)).unwrap().unwrap(), &jobs::ALL).unwrap();
        job.id = 4;
        db.insert(job_key(3), encode_job(&job)).unwrap();
    });
    let clock = Arc::new(ManualClock::new(T0));
    let (q, _) = open_queue(&path, clock.clone()).unwrap();
    let jobs = q.list(&ListFilter::default()).unwrap();
    let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
    assert_eq!(
        ids,
        vec![1, 2, 4, 5, 6],
        "listed once each, the misfiled one not at all"
    );
    let quarantined = q.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].key, "j/3");
    assert!(quarantined[0].reason.contains("job 4"), "{quarantined:?}");
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs(dir.path(), None).await;
    with_raw_sled(&path, |db| {
        db.insert("m/schema", &2u32.to_be_bytes()).unwrap();
    });
    match open_queue(&path, Arc::new(ManualClock::new(T0))) {
        Err(e @ Error::NewerSchema { .. }) => {
            let Error::NewerSchema {
                path: p,
                found,
                supported,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!((*found, *supported), (2, SCHEMA_VERSION));
            assert_eq!(p, &path);
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("upgrade"), "{msg}");
        }
        other => panic!("a schema-2 database must be refused, got {other:?}"),
    }
    // Refused means untouched: no recovery ran, nothing was rewritten.
    with_raw_sled(&path, |db| {
        assert_eq!(
            db.get("m/schema").unwrap().unwrap().as_ref(),
            &2u32.to_be_bytes()
        );
        let job = decode_job(&db.get(job_key(6)).unwrap().unwrap(), &jobs::ALL).unwrap();
        assert!(matches!(job.stored, Stored::Done { .. }));
    });
}

// ---- damage to sled's own files ----
//
// What sled 0.34.7 does with overwritten bytes of its files (observed by these tests):
//
// - Damage to anything a snapshot covers (`snap.*` itself, log records older than the
//   newest snapshot, the first segment's header, `conf`): sled refuses to open,
//   `Corruption { at }` or `Unsupported`, and the queue returns `Error::Open` naming
//   the path.
// - Damage to the log *after* the newest snapshot (everything written since the queue
//   was last opened, or every write of a queue never reopened): sled cannot tell it
//   from the torn tail of a crash; it truncates the log at the first bad message and
//   opens. Jobs acknowledged after that point are gone, with no error and nothing in
//   quarantine; with the first segment's header damaged, the queue opens empty.

/// Writes six jobs whose payloads are easy to find in sled's files, and closes. With
/// `snapshot`, opens and closes once more: sled snapshots on an open that finds the log
/// grown, so every record is then covered by `snap.*`.
async fn six_jobs_on_disk(dir: &Path, snapshot: bool) -> PathBuf {
    let path = dir.join("queue");
    let (q, _) = open(&path);
    for i in 1..=6u64 {
        q.enqueue(jobs::WEBHOOK, &format!("evt-{i}"), marker(i), None)
            .await
            .unwrap();
    }
    drop(q);
    if snapshot {
        drop(open(&path));
        assert!(
            !snapshot_files(&path).is_empty(),
            "sled wrote no snapshot on reopen"
        );
    } else {
        assert!(snapshot_files(&path).is_empty());
    }
    path
}

fn marker(i: u64) -> Vec<u8> {
    format!("PAYLOAD-MARKER-{i:03}").into_bytes()
}

fn snapshot_files(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
        })
        .collect()
}

fn edit_file(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

type Damage = fn(&Path);

/// Flips a byte inside every copy of job 3's payload in sled's log (sled rewrites a
/// node with all its values, so there are several).
fn flip_job_3_in_log(path: &Path) {
    edit_file(&path.join("db"), |b| {
        let needle = marker(3);
        let hits: Vec<usize> = (0..b.len().saturating_sub(needle.len()))
            .filter(|&i| b[i..i + needle.len()] == needle[..])
            .collect();
        assert!(!hits.is_empty(), "job 3's payload is not in sled's log");
        for i in hits {
            b[i + 3] ^= 0xff;
        }
    });
}

fn zero_log_head(path: &Path) {
    edit_file(&path.join("db"), |b| b[..64].fill(0));
}

fn flip_snapshot(path: &Path) {
    for snap in snapshot_files(path) {
        edit_file(&snap, |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
        });
    }
}

fn flip_conf(path: &Path) {
    edit_file(&path.join("conf"), |b| {
        for x in &mut b[..8] {
            *x ^= 0xff;
        }
    });
}

fn truncate_log(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("db"))
        .unwrap();
    f.set_len(1000).unwrap();
}

/// SPEC §5: "Bad input gets a clear error naming what is wrong, and loses nothing that
/// was accepted." After `damage`, opening the queue must not panic, and must either
/// refuse with an error naming the database path, or open with all six jobs intact.
/// Returns what went wrong, if anything.
async fn refused_or_intact(name: &str, snapshot: bool, damage: Damage) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs_on_disk(dir.path(), snapshot).await;
    damage(&path);
    let opened = std::panic::catch_unwind(|| open_queue(&path, Arc::new(ManualClock::new(T0))));
    match opened {
        Err(_) => Some(format!("{name}: Queue::open panicked")),
        Ok(Err(e)) => {
            let msg = e.to_string();
            (!msg.contains(&path.display().to_string()))
                .then(|| format!("{name}: the error does not name {}: {msg}", path.display()))
        }
        Ok(Ok((q, _))) => {
            let jobs = q.list(&ListFilter::default()).unwrap();
            let intact = jobs.len() == 6
                && jobs
                    .iter()
                    .all(|j| j.payload == marker(j.id) && j.key == format!("evt-{}", j.id));
            (!intact).then(|| {
                let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
                format!(
                    "{name}: the queue opened without an error but holds jobs {ids:?} of 1..=6 \
                     (quarantined: {})",
                    q.stats().unwrap().quarantined
                )
            })
        }
    }
}

#[tokio::test]
async fn damage_to_sled_files_under_a_snapshot_is_refused_with_the_path() {
    let cases: [(&str, Damage); 5] = [
        ("a byte of the snapshot flipped", flip_snapshot),
        ("job 3's bytes in the log flipped", flip_job_3_in_log),
        ("the log's first 64 bytes zeroed", zero_log_head),
        ("the log cut to 1000 bytes", truncate_log),
        ("sled's conf overwritten", flip_conf),
    ];
    let mut failures = Vec::new();
    for (name, damage) in cases {
        failures.extend(refused_or_intact(name, true, damage).await);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The case sled cannot catch: damage to log records no snapshot covers yet (in a
/// running daemon, every job since its last start) reads to sled like a torn tail
/// after a crash, so it silently cuts the log there, and acknowledged jobs vanish
/// without an error or a quarantine entry. Fails until the queue can tell: for
/// instance a high-water mark of `m/next_id` kept outside sled, synced with each group
/// commit, and compared on open.
#[tokio::test]
async fn damage_to_sleds_log_after_its_last_snapshot_is_not_silent() {
    let cases: [(&str, Damage); 3] = [
        ("job 3's bytes in the log flipped", flip_job_3_in_log),
        ("the log's first 64 bytes zeroed", zero_log_head),
        ("the log cut to 1000 bytes", truncate_log),
    ];
    let mut failures = Vec::new();
    for (name, damage) in cases {
        failures.extend(refused_or_intact(name, false, damage).await);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// After the refusal, an operator can accept the loss: the queue opens with what is
/// left, the loss stays listed in the quarantine, and lost ids are never handed out
/// again (a relay or a log may still refer to them).
#[tokio::test]
async fn an_accepted_loss_is_recorded_and_ids_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs_on_disk(dir.path(), false).await;
    flip_job_3_in_log(&path);
    let clock = Arc::new(ManualClock::new(T0));
    match open_queue(&path, clock.clone()) {
        Err(Error::LostWrites {
            acknowledged,
            recovered,
            ..
        }) => assert!(
            acknowledged == 6 && recovered < 6,
            "{acknowledged} {recovered}"
        ),
        Err(e) => panic!("expected LostWrites, got {e}"),
        Ok(_) => panic!("a queue that lost jobs opened silently"),
    }
    let (q, _) = wait::when_unlocked(
        &path,
        || Queue::open_with(&path, jobs::settings(), clock.clone(), true),
        |e| matches!(e, Error::Locked { .. }),
    )
    .unwrap();
    let lost: Vec<_> = q
        .quarantined()
        .unwrap()
        .into_iter()
        .filter(|r| r.key.starts_with("lost-writes/"))
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].reason.contains("..=6"), "{}", lost[0].reason);
    let next = q
        .enqueue(jobs::WEBHOOK, "after-the-loss", vec![], None)
        .await
        .unwrap();
    assert_eq!(next.job.id, 7, "ids of lost jobs are not reused");
    drop(q);
    // Accepted once is accepted: the next plain open succeeds.
    let (q, _) = open_queue(&path, clock).unwrap();
    assert!(q.get(7).unwrap().is_some());
}

// ---- garbage anywhere in sled's log: never a panic, and salvage keeps what checks ----
//
// sled 0.34.7 panics on some damage instead of returning an error (a segment header
// overwritten: "tried to serialize Uninitialized" while it writes its snapshot), and it
// did so in `connector`, `queuectl stats`, `fsck` and `accept-loss` (exit 101). So 64
// bytes of garbage go at many offsets of a copy of one database — every segment
// header, and offsets spread over the whole log — and for each copy: the queue opens
// or refuses with an error naming the database, the real binaries exit with one clear
// line, and `queuectl salvage` writes a database that opens, checks clean, holds only
// jobs that were put in, byte for byte, and reports exactly what it could not keep.

/// sled's default segment size (`Config::segment_size`).
const SEGMENT: u64 = 512 * 1024;
/// Jobs in the damaged database: enough to fill three of sled's segments.
const MANY: u64 = 600;

/// Every version of every job the fixture wrote, by id, as encoded on disk.
type Versions = std::collections::BTreeMap<u64, Vec<Vec<u8>>>;

/// A closed queue of [`MANY`] jobs, node_sync and webhook (webhooks never due, so
/// `connector --once` leaves them alone; node_sync runs only for configured nodes, and
/// none are), the node_sync quarter leased and then done or failed; with every version
/// each job had.
async fn many_jobs(dir: &Path) -> (PathBuf, Versions) {
    // One open only: sled snapshots on a reopen, and the damage must land on log records
    // no snapshot covers (where sled panics).
    let path = dir.join("queue");
    let (q, _) = open(&path);
    let mut versions = Versions::new();
    let mut keep = |q: &Queue, id: u64| {
        let job = q.get(id).unwrap().expect("the job just written");
        versions.entry(id).or_default().push(encode_job(&job));
    };
    let far = T0 + 10 * 365 * 24 * 3600 * 1000;
    for i in 1..=MANY {
        let (kind, due) = if i % 4 == 0 {
            (jobs::NODE_SYNC, None)
        } else {
            (jobs::WEBHOOK, Some(far))
        };
        let payload = format!("{i:06}:{}", "p".repeat(400)).into_bytes();
        let e = q
            .enqueue(kind, &format!("key-{i}"), payload, due)
            .await
            .unwrap();
        keep(&q, e.job.id);
    }
    // node_sync jobs 4, 8, …: lease them, then ack or fail each.
    let leased = q.lease(jobs::NODE_SYNC, MANY as usize).await.unwrap();
    for l in leased {
        keep(&q, l.job.id);
        if l.job.id % 8 == 0 {
            q.ack(l.token()).await.unwrap();
        } else {
            q.fail(l.token(), "panel answered 503", None).await.unwrap();
        }
        keep(&q, l.job.id);
    }
    drop(q);
    assert!(snapshot_files(&path).is_empty(), "sled wrote a snapshot");
    (path, versions)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// 64 bytes of deterministic garbage at `offset` of `db`.
fn garbage_at(db: &Path, offset: u64) {
    edit_file(db, |b| {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ offset;
        let end = (offset as usize + 64).min(b.len());
        for byte in &mut b[offset as usize..end] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
    });
}

/// Where to damage a log of `len` bytes: each segment's header and the first message
/// after it, and 40 offsets spread over the whole log.
fn offsets(len: u64) -> Vec<u64> {
    let mut at: Vec<u64> = (0..len.div_ceil(SEGMENT))
        .flat_map(|s| [s * SEGMENT, s * SEGMENT + 20])
        .collect();
    at.extend((0..40).map(|i| (len * i / 40 + 1237 * i) % (len - 64)));
    at.sort();
    at.dedup();
    at
}

/// A binary's run, for the checks below.
struct Ran {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn new(what: String, out: std::process::Output) -> Ran {
        Ran {
            what,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Not a panic (101, "panicked", a backtrace hint), and a failure is one line that
    /// starts with the binary's name and names the database.
    fn clear(&self, name: &str, db: &Path) -> Result<(), String> {
        let panicked = self.code == Some(101)
            || self.stderr.contains("panicked")
            || self.stderr.contains("RUST_BACKTRACE");
        if panicked {
            return Err(format!("{} panicked: {self}", self.what));
        }
        if self.code != Some(0) {
            let prefix = format!("{name}: ");
            let lines: Vec<&str> = self
                .stderr
                .lines()
                .filter(|l| l.starts_with(&prefix) && !l.starts_with("queuectl: database at "))
                .collect();
            // queuectl names the database on its "database at" line once it is open.
            if lines.len() != 1 || !self.stderr.contains(&db.display().to_string()) {
                return Err(format!(
                    "{} failed without one line naming {}: {self}",
                    self.what,
                    db.display()
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run_bin(bin: &str, args: &[&std::ffi::OsStr], data_dir: &Path) -> Ran {
    let out = std::process::Command::new(bin)
        .args(args)
        .env_remove("CONNECTOR_CONFIG")
        .env("DATA_DIR", data_dir)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let what = format!(
        "{} {}",
        Path::new(bin).file_name().unwrap().to_string_lossy(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ran::new(what, out)
}

/// Whether `salvaged` is a version the fixture wrote, or (a version left running,
/// salvaged, then recovered by the next open) that version with the interrupted
/// attempt added.
fn was_put_in(salvaged: &[u8], versions: &[Vec<u8>]) -> bool {
    if versions.iter().any(|v| v == salvaged) {
        return true;
    }
    let Ok(s) = decode_job(salvaged, &jobs::ALL) else {
        return false;
    };
    versions.iter().any(|v| {
        let v = decode_job(v, &jobs::ALL).unwrap();
        matches!(v.stored, Stored::Running { .. })
            && (s.id, s.kind, &s.key, &s.payload, s.created_ms, s.attempts)
                == (v.id, v.kind, &v.key, &v.payload, v.created_ms, v.attempts)
            && s.history.len() == v.history.len() + 1
            && s.history[..v.history.len()] == v.history[..]
    })
}

/// One damaged copy through everything. Returns what went wrong.
fn damaged_copy(base: &Path, versions: &Versions, offset: u64, work: &Path) -> Vec<String> {
    let mut wrong = Vec::new();
    let damaged = work.join("damaged");
    copy_dir(base, &damaged);
    garbage_at(&damaged.join("db"), offset);
    // Each run gets its own copy: opening may change sled's files.
    let copy = |name: &str| {
        let dir = work.join(name);
        copy_dir(&damaged, &dir.join("queue"));
        dir
    };

    // (a) the library: Ok, or an error naming the database; never a panic.
    let lib = copy("lib").join("queue");
    match std::panic::catch_unwind(|| {
        Queue::open(&lib, jobs::settings(), Arc::new(ManualClock::new(T0)))
    }) {
        Err(_) => wrong.push("Queue::open panicked".to_string()),
        Ok(Err(e)) if !e.to_string().contains(&lib.display().to_string()) => wrong.push(format!(
            "Queue::open: the error does not name the database: {e}"
        )),
        Ok(Err(e @ Error::Damaged { .. })) if !e.to_string().contains("queuectl salvage") => wrong
            .push(format!(
                "Queue::open: the error does not say what to do: {e}"
            )),
        Ok(_) => {}
    }
    // … and the real binaries.
    let stats_dir = copy("stats");
    let stats = run_bin(
        env!("CARGO_BIN_EXE_queuectl"),
        &["stats".as_ref()],
        &stats_dir,
    );
    wrong.extend(stats.clear("queuectl", &stats_dir.join("queue")).err());
    let daemon_dir = copy("daemon");
    let once = run_bin(
        env!("CARGO_BIN_EXE_connector"),
        &["--once".as_ref()],
        &daemon_dir,
    );
    wrong.extend(once.clear("connector", &daemon_dir.join("queue")).err());

    // (b) salvage.
    let from = copy("salvage");
    let out = work.join("out");
    let to = out.join("queue");
    let salvage = run_bin(
        env!("CARGO_BIN_EXE_queuectl"),
        &[
            "salvage".as_ref(),
            "--json".as_ref(),
            "--to".as_ref(),
            to.as_os_str(),
        ],
        &from,
    );
    if salvage.code != Some(0) {
        wrong.push(format!("salvage failed: {salvage}"));
        return wrong;
    }
    let report: serde_json::Value = match serde_json::from_str(&salvage.stdout) {
        Ok(v) => v,
        Err(e) => {
            wrong.push(format!("salvage --json is not JSON ({e}): {salvage}"));
            return wrong;
        }
    };
    let fsck = run_bin(
        env!("CARGO_BIN_EXE_queuectl"),
        &["fsck".as_ref(), "--json".as_ref()],
        &out,
    );
    if fsck.code != Some(0) {
        wrong.push(format!(
            "the salvaged database does not check clean: {fsck}"
        ));
    }
    let salvaged: Vec<(u64, Vec<u8>)> = with_raw_sled(&to, |db| {
        db.scan_prefix(b"j")
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (u64::from_be_bytes(k[1..9].try_into().unwrap()), v.to_vec())
            })
            .collect()
    });
    for (id, raw) in &salvaged {
        match versions.get(id) {
            Some(vs) if was_put_in(raw, vs) => {}
            _ => wrong.push(format!(
                "salvage invented job {id}: {:?}",
                decode_job(raw, &jobs::ALL)
            )),
        }
    }
    let kept = salvaged.len() as u64;
    let reported = (report["jobs_kept"].as_u64(), report["lost"].as_u64());
    if reported != (Some(kept), Some(MANY - kept)) {
        wrong.push(format!(
            "salvage kept {kept} of {MANY} jobs but reported kept/lost {reported:?}: {salvage}"
        ));
    }
    wrong
}

#[test]
fn garbage_at_many_offsets_never_panics_and_salvage_keeps_every_good_record() {
    let dir = tempfile::tempdir().unwrap();
    let (base, versions) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(many_jobs(dir.path()));
    let len = std::fs::metadata(base.join("db")).unwrap().len();
    assert!(
        len > 2 * SEGMENT,
        "the fixture should fill three segments, its log is {len} bytes"
    );
    let offsets = offsets(len);
    let started = Instant::now();
    // Most of each copy's time is spent waiting (process starts, fsync): four at once.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&offset) = offsets.get(n) else { break };
                    let work = dir.path().join(format!("at-{offset}"));
                    let found = damaged_copy(&base, &versions, offset, &work);
                    std::fs::remove_dir_all(&work).unwrap();
                    results.lock().unwrap().push((offset, found));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort();
    eprintln!(
        "{} damaged copies in {:?}",
        offsets.len(),
        started.elapsed()
    );
    let panicked_before = results
        .iter()
        .filter(|(_, w)| w.iter().any(|w| w.contains("panicked")))
        .count();
    let wrong: Vec<String> = results
        .iter()
        .flat_map(|(offset, w)| w.iter().map(move |w| format!("offset {offset}: {w}")))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} damaged copies went wrong ({panicked_before} with a panic):\n{}",
        results.iter().filter(|(_, w)| !w.is_empty()).count(),
        offsets.len(),
        wrong.join("\n")
    );
}

/// Where sled silently cuts its log (damage after the last snapshot: `LostWrites`),
/// `accept-loss` can only start from what sled kept; salvage also reads the raw files
/// and gets back every job written after the damage. Job 3's every copy is flipped,
/// so job 3 alone is lost, and reported as such.
#[tokio::test]
async fn salvage_gets_back_the_jobs_sled_cut_off_after_damage_in_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = six_jobs_on_disk(dir.path(), false).await;
    flip_job_3_in_log(&path);
    let damaged = std::fs::read(path.join("db")).unwrap();
    let to = dir.path().join("salvaged");
    let report = wait::when_unlocked(
        &path,
        || connector::queue::salvage(&path, &to, jobs::settings(), Arc::new(ManualClock::new(T0))),
        |e| matches!(e, connector::queue::SalvageError::Locked { .. }),
    )
    .unwrap();
    assert_eq!(
        (report.jobs_kept, report.lost, report.high_water_mark),
        (5, 1, Some(7)),
        "{report:#?}"
    );
    assert_eq!(report.lost_ids.len(), 1, "{report:#?}");
    assert_eq!((report.lost_ids[0].from, report.lost_ids[0].to), (3, 3));
    assert!(report.fsck_clean, "{report:#?}");
    assert!(
        report.jobs_from_raw_files > 0,
        "sled cut its log at job 3: what follows comes from the raw files {report:#?}"
    );
    assert!(
        std::fs::read(path.join("db")).unwrap() == damaged,
        "the damaged database is left as it was"
    );
    let (q, _) = open(&to);
    let jobs = q.list(&ListFilter::default()).unwrap();
    let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![1, 2, 4, 5, 6]);
    for j in &jobs {
        assert_eq!(j.payload, marker(j.id));
    }
    let next = q
        .enqueue(jobs::WEBHOOK, "after-salvage", vec![], None)
        .await
        .unwrap();
    assert_eq!(next.job.id, 7, "ids continue above every acknowledged one");
}

/// The state job kinds keep beside their jobs (a node's last list) is salvaged too, from
/// the raw files when sled reads nothing: here the log's head is zeroed, so sled opens
/// an empty database.
#[tokio::test]
async fn salvage_keeps_state_records_from_the_raw_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    {
        let (q, _) = open(&path);
        for i in 1..=3u64 {
            q.enqueue(jobs::WEBHOOK, &format!("evt-{i}"), marker(i), None)
                .await
                .unwrap();
        }
        q.commit(connector::queue::Commit {
            state: vec![connector::queue::StateWrite::Put(
                "node/1/sync".into(),
                b"STATE-MARKER-1".to_vec(),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    zero_log_head(&path);
    let to = dir.path().join("salvaged");
    let report = wait::when_unlocked(
        &path,
        || connector::queue::salvage(&path, &to, jobs::settings(), Arc::new(ManualClock::new(T0))),
        |e| matches!(e, connector::queue::SalvageError::Locked { .. }),
    )
    .unwrap();
    assert_eq!(
        (report.jobs_kept, report.state_records, report.lost),
        (3, 1, 0),
        "{report:#?}"
    );
    let (q, _) = open(&to);
    assert_eq!(
        q.state("node/1/sync").unwrap().as_deref(),
        Some(&b"STATE-MARKER-1"[..])
    );
}
