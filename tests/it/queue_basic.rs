//! The queue's main paths, one scenario each, in virtual time.

use std::sync::Arc;

use connector::jobs;
use connector::queue::{JobState, ManualClock, Stored};

use crate::support::{T0, minutes, open_manual};

#[tokio::test]
async fn webhook_ladder_then_dead_then_retry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let q = open_manual(dir.path(), jobs::settings(), &clock);
    let e = q
        .enqueue(jobs::WEBHOOK, "evt-1", b"{}".to_vec(), None)
        .await
        .unwrap();
    assert!(!e.duplicate);
    let again = q
        .enqueue(jobs::WEBHOOK, "evt-1", b"{}".to_vec(), None)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.job.id, e.job.id);

    let expected_gaps = [1, 5, 30];
    for (i, gap) in expected_gaps.iter().enumerate() {
        let leased = q.lease(jobs::WEBHOOK, 10).await.unwrap();
        assert_eq!(leased.len(), 1, "attempt {}", i + 1);
        let job = q.fail(leased[0].token(), "503", None).await.unwrap();
        assert_eq!(
            job.stored,
            Stored::Pending {
                due_ms: clock_now(&clock) + minutes(*gap).as_millis() as u64
            }
        );
        assert!(
            q.lease(jobs::WEBHOOK, 10).await.unwrap().is_empty(),
            "not due yet"
        );
        clock.advance(minutes(*gap));
    }
    let leased = q.lease(jobs::WEBHOOK, 10).await.unwrap();
    let job = q.fail(leased[0].token(), "503", None).await.unwrap();
    assert_eq!(job.state(clock_now(&clock)), JobState::Dead);
    assert_eq!(job.attempts, 4);
    assert_eq!(job.history.len(), 4);

    q.retry(job.id).await.unwrap();
    let leased = q.lease(jobs::WEBHOOK, 10).await.unwrap();
    let job = q.ack(leased[0].token()).await.unwrap();
    assert_eq!(job.state(clock_now(&clock)), JobState::Done);
    let s = q.stats().unwrap();
    assert_eq!(s.total(JobState::Done), 1);
}

fn clock_now(c: &ManualClock) -> u64 {
    use connector::queue::Clock;
    c.now_ms()
}

#[tokio::test]
async fn running_job_is_ready_after_reopen_and_attempt_counts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    {
        let q = open_manual(dir.path(), jobs::settings(), &clock);
        q.enqueue(jobs::TRAFFIC_REPORT, "r1", vec![1, 2, 3], None)
            .await
            .unwrap();
        let l = q.lease(jobs::TRAFFIC_REPORT, 1).await.unwrap();
        assert_eq!(l.len(), 1);
    }
    let (q, rec) =
        connector::queue::Queue::open(dir.path().join("queue"), jobs::settings(), clock.clone())
            .unwrap();
    assert_eq!(rec.interrupted, 1);
    let l = q.lease(jobs::TRAFFIC_REPORT, 1).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].job.attempts, 2);
    assert_eq!(l[0].job.payload, vec![1, 2, 3]);
}

#[tokio::test]
async fn done_jobs_are_kept_per_kind_then_swept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let mut settings = jobs::settings();
    settings.kind_mut(jobs::NODE_SYNC).keep_done = Some(minutes(60));
    let q = open_manual(dir.path(), settings, &clock);
    for kind in [jobs::NODE_SYNC, jobs::WEBHOOK] {
        q.enqueue(kind, "k", vec![], None).await.unwrap();
        let l = q.lease(kind, 1).await.unwrap();
        q.ack(l[0].token()).await.unwrap();
    }
    clock.advance(minutes(59));
    assert_eq!(q.maintain().await.unwrap().0, 0);
    clock.advance(minutes(1));
    assert_eq!(q.maintain().await.unwrap().0, 1, "node_sync after its hour");
    assert!(q.find_key(jobs::NODE_SYNC, "k").unwrap().is_none());
    assert!(q.find_key(jobs::WEBHOOK, "k").unwrap().is_some());
    clock.advance(minutes(23 * 60));
    assert_eq!(
        q.maintain().await.unwrap().0,
        1,
        "webhook after the dedupe window"
    );
    assert_eq!(q.stats().unwrap().total(JobState::Done), 0);
}
