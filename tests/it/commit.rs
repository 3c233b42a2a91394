//! Commits (state + enqueues + ack as one write) and the dedupe modes.

use std::sync::Arc;

use connector::jobs;
use connector::queue::{
    Commit, Dedupe, Error, EventKind, JobState, ManualClock, NewJob, StateWrite,
};

use crate::support::{T0, open_manual};

fn job(key: &str, payload: &[u8], dedupe: Dedupe) -> NewJob {
    NewJob {
        kind: jobs::XRAY_APPLY,
        key: key.into(),
        payload: payload.to_vec(),
        not_before: None,
        dedupe,
    }
}

#[tokio::test]
async fn live_dedupe_allows_one_live_job_per_key_whatever_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    let a = q
        .enqueue_with(job("sync:1", b"", Dedupe::Live))
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(
        q.enqueue_with(job("sync:1", b"", Dedupe::Live))
            .await
            .unwrap()
            .duplicate
    );
    let l = q.lease(jobs::XRAY_APPLY, 1).await.unwrap();
    assert!(
        q.enqueue_with(job("sync:1", b"", Dedupe::Live))
            .await
            .unwrap()
            .duplicate
    );
    q.ack(l[0].token()).await.unwrap();
    let b = q
        .enqueue_with(job("sync:1", b"", Dedupe::Live))
        .await
        .unwrap();
    assert!(!b.duplicate, "done jobs do not block a Live key");
    assert_ne!(a.job.id, b.job.id);
    // The default (Window) mode still holds the key while the done job is in its window.
    let l = q.lease(jobs::XRAY_APPLY, 1).await.unwrap();
    q.ack(l[0].token()).await.unwrap();
    assert!(
        q.enqueue_with(job("sync:1", b"", Dedupe::Window))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn replace_coalesces_pending_and_follows_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    let mut events = q.subscribe();
    let first = q
        .enqueue_with(job("apply:1", b"v1", Dedupe::Replace))
        .await
        .unwrap();
    let second = q
        .enqueue_with(job("apply:1", b"v2", Dedupe::Replace))
        .await
        .unwrap();
    assert!(second.duplicate && second.replaced);
    assert_eq!(second.job.id, first.job.id);
    assert_eq!(events.recv().await.unwrap().what, EventKind::Enqueued);
    assert_eq!(events.recv().await.unwrap().what, EventKind::Replaced);
    let l = q.lease(jobs::XRAY_APPLY, 5).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].job.payload, b"v2");
    let third = q
        .enqueue_with(job("apply:1", b"v3", Dedupe::Replace))
        .await
        .unwrap();
    assert!(!third.duplicate, "a running apply is followed by a new one");
    let fourth = q
        .enqueue_with(job("apply:1", b"v4", Dedupe::Replace))
        .await
        .unwrap();
    assert_eq!(fourth.job.id, third.job.id);
    assert_eq!(q.get(third.job.id).unwrap().unwrap().payload, b"v4");
}

#[tokio::test]
async fn a_commit_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    q.enqueue(jobs::NODE_SYNC, "sync:1", vec![], None)
        .await
        .unwrap();
    let l = q.lease(jobs::NODE_SYNC, 1).await.unwrap();
    let token = l[0].token();
    let c = q
        .commit(Commit {
            state: vec![StateWrite::Put("node/1/synced".into(), b"list-1".to_vec())],
            enqueue: vec![job("apply:1", b"gen-1", Dedupe::Replace)],
            ack: Some(token),
            note: Some("synced 1 user".into()),
            wake: vec![],
        })
        .await
        .unwrap();
    let acked = c.acked.unwrap();
    assert_eq!(acked.state(q.now()), JobState::Done);
    assert_eq!(acked.history[0].note.as_deref(), Some("synced 1 user"));
    assert_eq!(q.state("node/1/synced").unwrap().unwrap(), b"list-1");
    // Acking the same lease again is refused, and nothing else in that commit lands.
    let e = q
        .commit(Commit {
            state: vec![StateWrite::Put("node/1/synced".into(), b"list-2".to_vec())],
            enqueue: vec![job("apply:2", b"", Dedupe::Window)],
            ack: Some(token),
            note: None,
            wake: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    assert_eq!(q.state("node/1/synced").unwrap().unwrap(), b"list-1");
    assert!(q.find_key(jobs::XRAY_APPLY, "apply:2").unwrap().is_none());
    // State survives a reopen.
    drop(q);
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    assert_eq!(
        q.state_scan("node/").unwrap(),
        [("node/1/synced".to_string(), b"list-1".to_vec())]
    );
}

/// Concurrent Replace enqueues, leases and acks on a few keys land in the same write
/// groups; afterwards every job must be in exactly one state, its record agreeing with
/// its index, and every job must be able to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replace_lease_and_ack_keep_records_and_indexes_in_step() {
    use connector::queue::{ListFilter, SystemClock};
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = connector::queue::Queue::open(
        dir.path().join("queue"),
        jobs::settings(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..8u32 {
        let q = q.clone();
        tasks.spawn(async move {
            for i in 0..150u32 {
                let key = format!("apply:{}", (p + i) % 4);
                q.enqueue_with(job(&key, &i.to_be_bytes(), Dedupe::Replace))
                    .await
                    .unwrap();
            }
        });
    }
    for _ in 0..4 {
        let q = q.clone();
        tasks.spawn(async move {
            for _ in 0..300 {
                for l in q.lease(jobs::XRAY_APPLY, 2).await.unwrap() {
                    q.ack(l.token()).await.unwrap();
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Drain what is left.
    loop {
        let l = q.lease(jobs::XRAY_APPLY, 16).await.unwrap();
        if l.is_empty() {
            break;
        }
        for l in l {
            q.ack(l.token()).await.unwrap();
        }
    }
    let jobs = q.list(&ListFilter::default()).unwrap();
    let stats = q.stats().unwrap();
    let now = q.now();
    for state in JobState::ALL {
        let listed = jobs.iter().filter(|j| j.state(now) == state).count() as u64;
        assert_eq!(
            listed,
            stats.total(state),
            "{state}: records and indexes disagree"
        );
    }
    assert!(
        jobs.iter().all(|j| j.state(now) == JobState::Done),
        "every job finishes: {:?}",
        jobs.iter()
            .filter(|j| j.state(now) != JobState::Done)
            .map(|j| (j.id, j.state(now)))
            .collect::<Vec<_>>()
    );
}

/// A deferred attempt leaves no trace on the ladder; a commit can wake a waiting job.
#[tokio::test]
async fn defer_uses_no_rung_and_a_commit_wakes_the_job_that_waited() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    let older = q
        .enqueue_with(job("r/1", b"", Dedupe::Window))
        .await
        .unwrap()
        .job;
    let newer = q
        .enqueue_with(job("r/2", b"", Dedupe::Window))
        .await
        .unwrap()
        .job;
    let leased = q.lease(jobs::XRAY_APPLY, 2).await.unwrap();
    assert_eq!(leased.len(), 2);
    let (lo, ln) = (leased[0].token(), leased[1].token());
    assert_eq!(ln.id, newer.id);
    // The newer one waits an hour for the older.
    let deferred = q.defer(ln, T0 + 3_600_000).await.unwrap();
    assert_eq!(deferred.attempts, 0);
    assert!(deferred.history.is_empty());
    assert_eq!(deferred.state(q.now()), JobState::Scheduled);
    // The older one is acked, waking it in the same write.
    q.commit(Commit {
        ack: Some(lo),
        wake: vec![newer.id, older.id],
        ..Commit::default()
    })
    .await
    .unwrap();
    let now = q.get(newer.id).unwrap().unwrap();
    assert_eq!(now.state(q.now()), JobState::Ready);
    assert_eq!(
        q.get(older.id).unwrap().unwrap().state(q.now()),
        JobState::Done
    );
    // Its next lease is its first attempt.
    let again = q.lease(jobs::XRAY_APPLY, 1).await.unwrap();
    assert_eq!(again[0].token().attempt, 1);
}
