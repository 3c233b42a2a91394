//! Commits (state + enqueues + ack as one write) and the dedupe modes.

use std::sync::Arc;

use connector::queue::{
    Commit, Dedupe, Error, EventKind, JobKind, JobState, ManualClock, NewJob, Settings, StateWrite,
};

use crate::support::{T0, open_manual};

fn job(key: &str, payload: &[u8], dedupe: Dedupe) -> NewJob {
    NewJob {
        kind: JobKind::XrayApply,
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
    let q = open_manual(dir.path(), Settings::default(), &clock);
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
    let l = q.lease(JobKind::XrayApply, 1).await.unwrap();
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
    let l = q.lease(JobKind::XrayApply, 1).await.unwrap();
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
    let q = open_manual(dir.path(), Settings::default(), &clock);
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
    let l = q.lease(JobKind::XrayApply, 5).await.unwrap();
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
    let q = open_manual(dir.path(), Settings::default(), &clock);
    q.enqueue(JobKind::NodeSync, "sync:1", vec![], None)
        .await
        .unwrap();
    let l = q.lease(JobKind::NodeSync, 1).await.unwrap();
    let token = l[0].token();
    let c = q
        .commit(Commit {
            state: vec![StateWrite::Put("node/1/synced".into(), b"list-1".to_vec())],
            enqueue: vec![job("apply:1", b"gen-1", Dedupe::Replace)],
            ack: Some(token),
            note: Some("synced 1 user".into()),
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
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    assert_eq!(q.state("node/1/synced").unwrap().unwrap(), b"list-1");
    assert!(q.find_key(JobKind::XrayApply, "apply:2").unwrap().is_none());
    // State survives a reopen.
    drop(q);
    let q = open_manual(dir.path(), Settings::default(), &clock);
    assert_eq!(
        q.state_scan("node/").unwrap(),
        [("node/1/synced".to_string(), b"list-1".to_vec())]
    );
}
