//! Kept counts (issue 15 item 5): jobs by kind and state are kept in the same writes as
//! the indexes (`src/queue/counts.rs`), so `stats` reads a few keys instead of scanning.
//! They must equal a scan of the indexes after any mix of operations (the model test
//! checks that after every step, `tests/crash.rs` after every kill); here: a tampered
//! count is found by `fsck` and set right by `--repair`, a database from before the
//! counts gets them on open, and operations that the write combiner puts in one group
//! (enqueue, lease, ack, fail, defer, commit, cancel, retry: issue 15 item 4) leave the
//! counts and the indexes agreeing with the records.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connector::jobs;
use connector::queue::{
    Commit, Dedupe, Error, JobState, ListFilter, ManualClock, NewJob, Queue, Stats, Stored,
};

use crate::support::{T0, wait};

fn open(path: &Path, clock: &Arc<ManualClock>) -> Queue {
    wait::when_unlocked(
        path,
        || Queue::open(path, jobs::settings(), clock.clone()),
        |e| matches!(e, Error::Locked { .. }),
    )
    .expect("open queue")
    .0
}

fn raw(path: &Path, f: impl FnOnce(&sled::Db)) {
    let db =
        wait::when_unlocked(path, || sled::open(path), wait::sled_locked).expect("raw sled open");
    f(&db);
    db.flush().expect("raw flush");
}

/// Webhook jobs in every state a closed queue keeps: 2 ready, 1 scheduled (by a
/// failure), 2 done, 1 dead (cancelled). Returns the stats it ends with.
async fn every_state(q: &Queue, clock: &ManualClock) -> Stats {
    for i in 0..6 {
        q.enqueue(jobs::WEBHOOK, &format!("evt-{i}"), b"{}".to_vec(), None)
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(5));
    let leased = q.lease(jobs::WEBHOOK, 3).await.unwrap();
    q.ack(leased[0].token()).await.unwrap();
    q.ack(leased[1].token()).await.unwrap();
    q.fail(leased[2].token(), "503", None).await.unwrap();
    let pending = q
        .list(&ListFilter {
            state: Some(JobState::Ready),
            ..ListFilter::default()
        })
        .unwrap();
    q.cancel(pending[0].id).await.unwrap();
    let s = q.stats().unwrap();
    let w = &s.jobs[&jobs::WEBHOOK];
    assert_eq!(
        (
            w[&JobState::Ready],
            w[&JobState::Scheduled],
            w[&JobState::Running],
            w[&JobState::Done],
            w[&JobState::Dead]
        ),
        (2, 1, 0, 2, 1),
        "{s:?}"
    );
    s
}

fn count_key(code: u8, class: u8) -> Vec<u8> {
    let mut k = b"m/k".to_vec();
    k.extend([code, class]);
    k
}

#[tokio::test]
async fn fsck_finds_a_tampered_count_and_repair_sets_it_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    let clock = Arc::new(ManualClock::new(T0));
    let q = open(&path, &clock);
    let before = every_state(&q, &clock).await;
    assert!(q.check_counts().unwrap().is_empty());
    drop(q);

    // Done: 2 → 99; running: a value that is not a count. (Layout:
    // queue-schema/README.md, "Kept counts".)
    raw(&path, |db| {
        db.insert(count_key(jobs::WEBHOOK.code(), 3), &99u64.to_be_bytes())
            .unwrap();
        db.insert(count_key(jobs::WEBHOOK.code(), 2), b"bad")
            .unwrap();
    });
    let q = open(&path, &clock);
    assert_eq!(
        q.stats().unwrap().jobs[&jobs::WEBHOOK][&JobState::Done],
        99,
        "stats read the kept counts"
    );
    let report = q.fsck(false).await.unwrap();
    let keys: Vec<&str> = report.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["m/k/webhook/running", "m/k/webhook/done"],
        "{report:#?}"
    );
    assert!(report.problems[1].problem.contains("is 99"), "{report:#?}");
    assert_eq!(report.unrepairable(), 0);
    assert_eq!(q.check_counts().unwrap().len(), 2);

    let repaired = q.fsck(true).await.unwrap();
    assert!(repaired.repaired);
    assert_eq!(repaired.problems.len(), 2);
    assert!(q.fsck(false).await.unwrap().problems.is_empty());
    assert!(q.check_counts().unwrap().is_empty());
    assert_eq!(q.stats().unwrap(), before);
}

/// An index entry removed behind the queue's back: the entry is the problem (reported
/// as before), the counts still agree with the records, and after the repair they agree
/// with the repaired index too.
#[tokio::test]
async fn a_removed_index_entry_is_one_problem_and_the_repair_keeps_the_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    let clock = Arc::new(ManualClock::new(T0));
    let q = open(&path, &clock);
    let before = every_state(&q, &clock).await;
    drop(q);
    raw(&path, |db| {
        let k = db
            .scan_prefix(b"f")
            .keys()
            .next()
            .expect("a finished entry")
            .unwrap();
        db.remove(k).unwrap();
    });
    let q = open(&path, &clock);
    let report = q.fsck(false).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{report:#?}");
    assert!(report.problems[0].problem.contains("is missing"));
    assert!(!q.check_counts().unwrap().is_empty(), "kept ≠ index now");
    q.fsck(true).await.unwrap();
    assert!(q.fsck(false).await.unwrap().problems.is_empty());
    assert!(q.check_counts().unwrap().is_empty());
    assert_eq!(q.stats().unwrap(), before);
}

#[tokio::test]
async fn a_database_without_counts_gets_them_once_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    let clock = Arc::new(ManualClock::new(T0));
    let q = open(&path, &clock);
    let before = every_state(&q, &clock).await;
    drop(q);
    // As a connector from before the counts left it.
    raw(&path, |db| {
        let mut n = 0;
        for k in db.scan_prefix(b"m/").keys() {
            let k = k.unwrap();
            if k.starts_with(b"m/k") || k.starts_with(b"m/d") || &k[..] == b"m/counted" {
                db.remove(k).unwrap();
                n += 1;
            }
        }
        assert!(n > 5, "the counts were there to remove ({n})");
    });
    let q = open(&path, &clock);
    assert!(q.check_counts().unwrap().is_empty());
    assert_eq!(q.stats().unwrap(), before);
    assert!(q.fsck(false).await.unwrap().problems.is_empty());

    // An older build that enqueued since (its `m/next_id` moved, `m/counted` did not):
    // counted again.
    drop(q);
    raw(&path, |db| {
        let next = db.get("m/next_id").unwrap().unwrap();
        let bumped = u64::from_be_bytes(next[..].try_into().unwrap()) + 1;
        db.insert("m/next_id", &bumped.to_be_bytes()).unwrap();
        db.insert(count_key(jobs::WEBHOOK.code(), 3), &7u64.to_be_bytes())
            .unwrap();
    });
    let q = open(&path, &clock);
    assert!(q.check_counts().unwrap().is_empty());
    assert_eq!(q.stats().unwrap().jobs[&jobs::WEBHOOK][&JobState::Done], 2);
}

/// Every write path of the combiner at once, on overlapping keys and jobs: whatever
/// groups they fell into, the records, the indexes and the counts agree afterwards, and
/// every job ended in one of the states its operations allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_writes_of_every_kind_keep_indexes_and_counts_true() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue");
    let clock = Arc::new(ManualClock::new(T0));
    let q = open(&path, &clock);
    let kind = jobs::XRAY_APPLY;
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..6u64 {
                let key = format!("k{}", (t + round) % 8);
                let dedupe = match (t + round) % 3 {
                    0 => Dedupe::Window,
                    1 => Dedupe::Live,
                    _ => Dedupe::Replace,
                };
                let e = q
                    .enqueue_with(NewJob {
                        kind,
                        key: key.clone(),
                        payload: format!("{t}/{round}").into_bytes(),
                        not_before: None,
                        dedupe,
                    })
                    .await
                    .unwrap();
                for l in q.lease(kind, 2).await.unwrap() {
                    let token = l.token();
                    let r = match (t + round + l.job.id) % 5 {
                        0 => q.ack(token).await.map(|_| ()),
                        1 => q.fail(token, "no", None).await.map(|_| ()),
                        2 => q.defer(token, T0).await.map(|_| ()),
                        3 => q
                            .commit(Commit {
                                ack: Some(token),
                                enqueue: vec![NewJob {
                                    kind,
                                    key: format!("follow-{}", l.job.id),
                                    payload: Vec::new(),
                                    not_before: None,
                                    dedupe: Dedupe::Window,
                                }],
                                wake: vec![e.job.id],
                                ..Commit::default()
                            })
                            .await
                            .map(|_| ()),
                        _ => q.cancel(l.job.id).await.map(|_| ()),
                    };
                    match r {
                        Ok(()) | Err(Error::LeaseLost { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                match q.retry(e.job.id).await {
                    Ok(_) | Err(Error::InvalidState { .. }) | Err(Error::KeyTaken { .. }) => {}
                    Err(e) => panic!("retry: {e}"),
                }
                // Nothing due at times: an empty lease answers at once.
                let _ = q.lease(jobs::NODE_SYNC, 4).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = q.fsck(false).await.unwrap();
    assert!(report.problems.is_empty(), "{report:#?}");
    assert!(q.check_counts().unwrap().is_empty());
    let jobs = q.list(&ListFilter::default()).unwrap();
    let stats = q.stats().unwrap();
    let total: u64 = JobState::ALL.iter().map(|s| stats.total(*s)).sum();
    assert_eq!(total, jobs.len() as u64);
    // One live job per key at most for the keys enqueued with Live or Window.
    for j in &jobs {
        assert!(
            !matches!(j.stored, Stored::Running { .. }),
            "job {} is still running: every lease was reported on",
            j.id
        );
    }
    drop(q);
    // And the same after a reopen.
    let q = open(&path, &clock);
    assert!(q.fsck(false).await.unwrap().problems.is_empty());
    assert_eq!(q.stats().unwrap(), stats);
}
