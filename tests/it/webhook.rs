//! Webhook callbacks (issue 6) against a real HTTPS receiver (`connector::sim::relay`:
//! rustls, a CA made here, trusted through `webhook.ca_file`).
//!
//! Two halves:
//! - in-process, where the ladder's minutes pass on a [`ManualClock`]: the queue, the
//!   webhook worker and the real HTTP client, with the test moving the clock and
//!   waiting on the queue's job events;
//! - end to end, the real `connector` binary (`support/agent.rs` runs it) with its
//!   HTTP listener, provider files, SIGHUP, SIGKILL and `queuectl`.
//!
//! Nothing waits by sleeping: a test waits for a job event, a request reaching the
//! receiver, or a log line, each with a deadline that only a hang reaches.

use crate::support::agent;
use crate::support::capture;
use crate::support::metrics;
use crate::support::receiver;
use crate::support::wait;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use connector::config::Webhook as WebhookConfig;
use connector::jobs;
use connector::jobs::webhook::{self, ConnectEvent, Webhook, stats};
use connector::peers::relays::client::RelayClient;
use connector::peers::relays::{Provider, Registry, SigningKey};
use connector::queue::{EventKind, JobState, ManualClock, Outcome, Queue, run_workers};
use receiver::{Answer, Receiver, Recorded};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = agent::WAIT;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const FULL_KEY: &str = "sk-live-7Qm2ZbT9xWc4Lp0NfRj8VhYs";
const BEARER: &str = "ingest-token-5f0c";

// ---- an independent Standard Webhooks verifier ----

/// HMAC-SHA256 by its definition (RFC 2104), not through the crate's code.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner = Sha256::digest(&inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner.iter().copied())
        .collect();
    Sha256::digest(&outer).into()
}

/// What a relay does with a request: Standard Webhooks verification. `Ok` when some
/// `v1` signature in the header matches and the timestamp is within 5 minutes.
fn verify(secret: &str, r: &Recorded) -> Result<(), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").ok_or("no whsec_ prefix")?)
        .map_err(|e| e.to_string())?;
    let id = r.header("webhook-id").ok_or("no webhook-id")?;
    let ts = r
        .header("webhook-timestamp")
        .ok_or("no webhook-timestamp")?;
    let ts_n: u64 = ts.parse().map_err(|_| format!("timestamp {ts:?}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(ts_n) > 300 {
        return Err(format!("timestamp {ts} is not within 5 minutes of {now}"));
    }
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let expected = b64.encode(hmac_sha256(&key, &signed));
    let header = r
        .header("webhook-signature")
        .ok_or("no webhook-signature")?;
    if header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| sig == expected)
    {
        Ok(())
    } else {
        Err(format!("signature {header:?} does not match v1,{expected}"))
    }
}

#[test]
fn the_verifier_itself_matches_the_reference_example() {
    let r = Recorded {
        at: std::time::Instant::now(),
        method: "POST".into(),
        path: "/".into(),
        headers: vec![
            ("webhook-id".into(), "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
            ("webhook-timestamp".into(), "1614265330".into()),
            (
                "webhook-signature".into(),
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into(),
            ),
        ],
        body: br#"{"test": 2432232314}"#.to_vec(),
        answer: Answer::Status(200),
    };
    // Only the timestamp check fails (it is from 2021): the HMAC is right.
    let e = verify(SECRET, &r).unwrap_err();
    assert!(e.contains("not within 5 minutes"), "{e}");
}

// ---- in-process: the queue, the worker, the real client, a manual clock ----

struct InProcess {
    _dir: tempfile::TempDir,
    queue: Queue,
    clock: Arc<ManualClock>,
    registry: Arc<Registry>,
    receiver: Arc<Receiver>,
    stop: CancellationToken,
    workers: tokio::task::JoinHandle<connector::queue::Result<()>>,
}

/// 2026-01-05T12:00:00Z
const T0: u64 = 1_767_614_400_000;

/// The webhook kind's worker pool on `queue`, delivering through `client`.
fn spawn_workers(
    queue: &Queue,
    registry: &Arc<Registry>,
    client: RelayClient,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<connector::queue::Result<()>> {
    tokio::spawn(run_workers(
        queue.clone(),
        jobs::WEBHOOK,
        Arc::new(Webhook {
            queue: queue.clone(),
            registry: registry.clone(),
            client: Arc::new(client),
        }),
        stop.clone(),
    ))
}

impl InProcess {
    fn start(secret: Option<&str>) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Arc::new(Receiver::start());
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &receiver.ca_pem).unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let (queue, _) =
            Queue::open(dir.path().join("queue"), jobs::settings(), clock.clone()).unwrap();
        let registry = Arc::new(Registry::from_providers([Provider {
            id: "myrelay".into(),
            name: Some("My relay".into()),
            callback_url: url::Url::parse(&receiver.url("/proxycast/callback?token=t0k")).unwrap(),
            secret: secret.map(|s| SigningKey::parse(s).unwrap()),
            path: dir.path().join("myrelay.json"),
        }]));
        let client = RelayClient::new(&WebhookConfig {
            ca_file: Some(ca),
            ..WebhookConfig::default()
        })
        .unwrap();
        let stop = CancellationToken::new();
        let workers = spawn_workers(&queue, &registry, client, &stop);
        InProcess {
            _dir: dir,
            queue,
            clock,
            registry,
            receiver,
            stop,
            workers,
        }
    }

    async fn ingest(&self, body: Value) -> webhook::Accepted {
        webhook::ingest_json(&self.queue, &self.registry, body.to_string().as_bytes())
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.workers.await.unwrap().unwrap();
    }
}

/// The next event of job `id` that ends an attempt (retry, done or dead).
async fn attempt_end(
    events: &mut broadcast::Receiver<connector::queue::Event>,
    id: u64,
) -> EventKind {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) if e.id == id => {
                    if let w @ (EventKind::Retry { .. } | EventKind::Done | EventKind::Dead) =
                        e.what
                    {
                        return w;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("job events: {e}"),
            }
        }
    })
    .await
    .expect("the attempt ended")
}

fn connect_event(event_id: &str, status: &str) -> Value {
    let mut v = json!({
        "relay_id": "myrelay",
        "status": status,
        "ref": "promo2024",
        "key": FULL_KEY,
        "client": {"version": "1.2.0", "platform": "macos"},
        "event_id": event_id,
        "timestamp": "2026-01-05T12:00:00Z",
    });
    if status == "error" {
        v["error_code"] = json!("network_error");
        v["error_message"] = json!("timed out reaching the relay");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_and_headers_are_exactly_as_specified_and_the_signature_verifies() {
    let t = InProcess::start(Some(SECRET));
    let mut events = t.queue.subscribe();
    let a = t.ingest(connect_event("evt-a", "success")).await;
    assert_eq!(a.event_id, "evt-a");
    assert!(!a.duplicate);
    assert_eq!(attempt_end(&mut events, a.job_id).await, EventKind::Done);
    // The same event again is the same job, not a second callback.
    let again = t.ingest(connect_event("evt-a", "success")).await;
    assert_eq!((again.job_id, again.duplicate), (a.job_id, true));
    let e = t.ingest(connect_event("evt-e", "error")).await;
    assert_eq!(attempt_end(&mut events, e.job_id).await, EventKind::Done);

    let reqs = t.receiver.wait_requests_async(2, WAIT).await.unwrap();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/proxycast/callback")
    );
    assert_eq!(
        r.body_text(),
        r#"{"event":"connect","status":"success","relay_id":"myrelay","ref":"promo2024","key_prefix":"sk-live","timestamp":"2026-01-05T12:00:00Z","client":{"version":"1.2.0","platform":"macos"}}"#
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("user-agent"), Some("ProxyCast/1.2.0"));
    assert_eq!(r.header("webhook-id"), Some("evt-a"));
    verify(SECRET, r).unwrap();
    let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
    for n in &names {
        assert!(
            [
                "content-type",
                "user-agent",
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
                "accept",
                "host",
                "content-length"
            ]
            .contains(n),
            "unexpected header {n}: {names:?}"
        );
    }
    let r = &reqs[1];
    assert_eq!(
        r.body_text(),
        r#"{"event":"connect","status":"error","relay_id":"myrelay","ref":"promo2024","key_prefix":"sk-live","timestamp":"2026-01-05T12:00:00Z","client":{"version":"1.2.0","platform":"macos"},"error_code":"network_error","error_message":"timed out reaching the relay"}"#
    );
    verify(SECRET, r).unwrap();
    // Tampering is caught by the verifier.
    let mut forged = r.clone();
    forged.body[10] ^= 1;
    assert!(verify(SECRET, &forged).is_err());

    // Counted once each, whether folded or not yet.
    let before = stats::report(&t.queue, None).unwrap();
    stats::fold(&t.queue).await.unwrap();
    let after = stats::report(&t.queue, None).unwrap();
    assert_eq!(before, after);
    let relay = &after.relays[0];
    assert_eq!(relay.relay_id, "myrelay");
    let c = &relay.refs["promo2024"];
    assert_eq!(
        (
            c.success,
            c.cancelled,
            c.error,
            c.delivered,
            c.pending,
            c.dead
        ),
        (1, 0, 1, 2, 0, 0)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_there_is_no_signature() {
    let t = InProcess::start(None);
    let mut events = t.queue.subscribe();
    let a = t
        .ingest(
            json!({"relay_id":"myrelay","status":"cancelled","key_prefix":"sk-abcdefgh",
                       "client":{"version":"2.0.1","platform":"windows"}}),
        )
        .await;
    assert_eq!(attempt_end(&mut events, a.job_id).await, EventKind::Done);
    let r = &t.receiver.wait_requests_async(1, WAIT).await.unwrap()[0];
    assert!(r.header("webhook-signature").is_none() && r.header("webhook-timestamp").is_none());
    assert_eq!(r.header("webhook-id"), Some(a.event_id.as_str()));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["ref"], Value::Null);
    assert_eq!(body["key_prefix"], "sk-abcd");
    // The event's time defaults to when it was accepted (the queue's clock).
    assert_eq!(body["timestamp"], "2026-01-05T12:00:00Z");
    t.stop().await;
}

/// Fails 3 times, delivered on the 4th, at 0, +1m, +5m, +30m of the virtual clock;
/// every attempt the same bytes and webhook-id. Then: failing 4 times is dead, and a
/// retry by hand delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ladder_in_virtual_time_then_dead_then_retried_by_hand() {
    let t = InProcess::start(Some(SECRET));
    let mut events = t.queue.subscribe();
    t.receiver.plan([
        Answer::Status(500),
        Answer::Status(502),
        Answer::Status(503),
    ]);
    let a = t.ingest(connect_event("evt-ladder", "success")).await;
    let rungs = [60, 300, 1800];
    for (i, rung) in rungs.iter().enumerate() {
        let before = t.queue.now();
        let due = match attempt_end(&mut events, a.job_id).await {
            EventKind::Retry { due_ms } => due_ms,
            other => panic!("attempt {} ended {other:?}", i + 1),
        };
        assert_eq!(
            due,
            before + rung * 1000,
            "attempt {} failed: next due {rung}s later",
            i + 1
        );
        // Not a moment earlier: the receiver has seen only the attempts so far.
        t.clock.advance(Duration::from_secs(rung - 1));
        t.queue.wake(jobs::WEBHOOK);
        assert_eq!(
            t.queue.get(a.job_id).unwrap().unwrap().state(t.queue.now()),
            JobState::Scheduled
        );
        assert_eq!(t.receiver.requests().len(), i + 1);
        t.clock.advance(Duration::from_secs(1));
        t.queue.wake(jobs::WEBHOOK);
    }
    assert_eq!(attempt_end(&mut events, a.job_id).await, EventKind::Done);
    let job = t.queue.get(a.job_id).unwrap().unwrap();
    let starts: Vec<u64> = job
        .history
        .iter()
        .map(|h| (h.started_ms - T0) / 1000)
        .collect();
    assert_eq!(
        starts,
        [0, 60, 360, 2160],
        "attempts at 0s, 1m, 1m+5m, 1m+5m+30m"
    );
    assert!(matches!(job.history[3].outcome, Outcome::Succeeded));
    let reqs = t.receiver.wait_requests_async(4, WAIT).await.unwrap();
    for r in &reqs {
        assert_eq!(r.body, reqs[0].body, "the same body on every attempt");
        assert_eq!(r.header("webhook-id"), Some("evt-ladder"));
        verify(SECRET, r).unwrap();
    }

    // Four failures: dead, and counted so.
    t.receiver.plan(vec![Answer::Status(500); 4]);
    let d = t.ingest(connect_event("evt-dead", "cancelled")).await;
    for rung in rungs {
        assert!(matches!(
            attempt_end(&mut events, d.job_id).await,
            EventKind::Retry { .. }
        ));
        t.clock.advance(Duration::from_secs(rung));
        t.queue.wake(jobs::WEBHOOK);
    }
    assert_eq!(attempt_end(&mut events, d.job_id).await, EventKind::Dead);
    assert_eq!(t.receiver.requests().len(), 8);
    let c = stats::report(&t.queue, None).unwrap().relays[0].refs["promo2024"].clone();
    assert_eq!((c.cancelled, c.dead, c.delivered), (1, 1, 1));
    // By hand (what `queuectl retry` calls): delivered.
    t.queue.retry(d.job_id).await.unwrap();
    t.queue.wake(jobs::WEBHOOK);
    assert_eq!(attempt_end(&mut events, d.job_id).await, EventKind::Done);
    let c = stats::report(&t.queue, None).unwrap().relays[0].refs["promo2024"].clone();
    assert_eq!((c.success, c.cancelled, c.dead, c.delivered), (1, 1, 0, 2));
    t.stop().await;
}

/// A relay answering a redirect (issue 12, item 2): the callback is not followed to the
/// other server, which sees nothing (no body, no signature); the attempt fails with an
/// error naming the status and the masked location, and goes on the ladder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_relay_is_a_failed_attempt_and_nothing_reaches_the_other_server() {
    let t = InProcess::start(Some(SECRET));
    let elsewhere = capture::Capture::start("{}");
    let mut events = t.queue.subscribe();
    // 307 is the worst case: a following client replays method, body and headers.
    t.receiver.plan([
        Answer::Redirect(307, elsewhere.url("/stolen?token=leak-me")),
        Answer::Redirect(302, elsewhere.url("/stolen")),
    ]);
    let a = t.ingest(connect_event("evt-redirect", "success")).await;
    for attempt in 1..=2 {
        let end = attempt_end(&mut events, a.job_id).await;
        assert!(
            matches!(end, EventKind::Retry { .. }),
            "a redirect must fail attempt {attempt}, it ended {end:?}; the other server got {:#?}",
            elsewhere.requests()
        );
        if attempt == 1 {
            // The ladder's first rung.
            t.clock.advance(Duration::from_secs(60));
            t.queue.wake(jobs::WEBHOOK);
        }
    }
    let job = t.queue.get(a.job_id).unwrap().unwrap();
    let errors: Vec<String> = job
        .history
        .iter()
        .map(|h| match &h.outcome {
            Outcome::Failed { error } => error.clone(),
            other => panic!("every attempt failed: {other:?}"),
        })
        .collect();
    let shown = format!("http://{}/stolen?token=***", elsewhere.addr);
    assert!(
        errors[0].contains("307") && errors[0].contains("redirect") && errors[0].contains(&shown),
        "{errors:#?}"
    );
    assert!(errors[1].contains("302"), "{errors:#?}");
    assert!(!errors.concat().contains("leak-me"), "{errors:#?}");
    assert_eq!(t.receiver.requests().len(), 2);
    let captured = elsewhere.requests();
    assert!(captured.is_empty(), "the other server got {captured:#?}");
    t.stop().await;
}

/// `Retry-After` pushes an attempt later than the ladder says, never earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_only_pushes_later() {
    let t = InProcess::start(None);
    let mut events = t.queue.subscribe();
    t.receiver.plan([
        Answer::RetryAfter(503, "600".into()),
        Answer::RetryAfter(429, "10".into()),
    ]);
    let a = t.ingest(connect_event("evt-ra", "success")).await;
    let now = t.queue.now();
    assert_eq!(
        attempt_end(&mut events, a.job_id).await,
        EventKind::Retry {
            due_ms: now + 600_000
        }
    );
    t.clock.advance(Duration::from_secs(600));
    t.queue.wake(jobs::WEBHOOK);
    let now = t.queue.now();
    assert_eq!(
        attempt_end(&mut events, a.job_id).await,
        EventKind::Retry {
            due_ms: now + 300_000
        }
    );
    t.stop().await;
}

/// Waits until every job of `relay` in `ids` is done.
async fn all_done(queue: &Queue, ids: &std::collections::HashMap<u64, &str>, relay: &str) {
    let mut events = queue.subscribe();
    let want: Vec<u64> = ids
        .iter()
        .filter(|(_, r)| **r == relay)
        .map(|(id, _)| *id)
        .collect();
    tokio::time::timeout(WAIT, async {
        loop {
            let done =
                |id: &&u64| queue.get(**id).unwrap().unwrap().state(queue.now()) == JobState::Done;
            if want.iter().all(|id| done(&id)) {
                return;
            }
            // Any job event may be the last one; the jobs are the truth.
            match events.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("job events: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("every callback to `{relay}` delivered"))
}

/// Issue 15: a relay at its `per_relay_concurrency` holds no worker slot with the jobs
/// that wait for it. One relay hangs every request (until released); with it at its
/// limit of 2 and the pool at 4 slots, every callback to another relay, queued after
/// the hanging relay's, is still delivered. Then, released, the waiting callbacks are
/// delivered too — woken by the relay's freed slots, not by their fallback, which is
/// the request timeout (10 minutes here) — each on its first attempt: waiting for the
/// relay is not a failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_its_limit_holds_no_worker_slot_and_other_relays_are_delivered() {
    const LIMIT: usize = 2;
    const EACH: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let (slow, fast) = (Arc::new(Receiver::start()), Arc::new(Receiver::start()));
    slow.set_default(Answer::Hold);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, format!("{}{}", slow.ca_pem, fast.ca_pem)).unwrap();
    let mut settings = jobs::settings();
    settings.kind_mut(jobs::WEBHOOK).concurrency = 4;
    let (queue, _) = Queue::open(
        dir.path().join("queue"),
        settings,
        Arc::new(connector::queue::SystemClock),
    )
    .unwrap();
    let provider = |id: &str, r: &Receiver| Provider {
        id: id.into(),
        name: None,
        callback_url: url::Url::parse(&r.url("/cb")).unwrap(),
        secret: None,
        path: dir.path().join(format!("{id}.json")),
    };
    let registry = Arc::new(Registry::from_providers([
        provider("slow", &slow),
        provider("fast", &fast),
    ]));
    let client = RelayClient::new(&WebhookConfig {
        ca_file: Some(ca),
        per_relay_concurrency: LIMIT,
        // Longer than the test waits: a held request never times out here.
        timeout: Duration::from_secs(600),
        ..WebhookConfig::default()
    })
    .unwrap();
    let mut ids = std::collections::HashMap::new();
    for relay in ["slow", "fast"] {
        for i in 0..EACH {
            let mut ev = connect_event(&format!("{relay}-{i}"), "success");
            ev["relay_id"] = json!(relay);
            let a = webhook::ingest_json(&queue, &registry, ev.to_string().as_bytes())
                .await
                .unwrap();
            ids.insert(a.job_id, relay);
        }
    }
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &registry, client, &stop);
    all_done(&queue, &ids, "fast").await;
    let fast_reqs = fast.wait_requests_async(EACH, WAIT).await.unwrap();
    assert_eq!(fast_reqs.len(), EACH);
    // The hanging relay has exactly its limit in flight; the rest wait off the pool.
    let held = slow.wait_requests_async(LIMIT, WAIT).await.unwrap();
    assert_eq!(held.len(), LIMIT, "the per-relay limit holds");

    slow.release();
    all_done(&queue, &ids, "slow").await;
    assert_eq!(slow.requests().len(), EACH, "each callback sent once");
    for (&id, _) in ids.iter().filter(|(_, r)| **r == "slow") {
        let job = queue.get(id).unwrap().unwrap();
        assert_eq!(
            (job.attempts, job.history.len()),
            (1, 1),
            "waiting for the relay is not an attempt: {job:#?}"
        );
    }
    stop.cancel();
    workers.await.unwrap().unwrap();
}

// ---- end to end: the real binary ----

/// A temporary directory with provider files, the receiver's CA, a config, and the
/// agent started from it.
struct Rig {
    dir: tempfile::TempDir,
    receiver: Receiver,
    config: PathBuf,
    daemon: Option<agent::Daemon>,
    past: Vec<String>,
}

impl Rig {
    /// `ladder`: the webhook kind's ladder; `extra`: more config text.
    fn new(ladder: &str, extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::start();
        let providers = dir.path().join("providers");
        std::fs::create_dir_all(&providers).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &receiver.ca_pem).unwrap();
        let rig = Rig {
            config: dir.path().join("connector.toml"),
            dir,
            receiver,
            daemon: None,
            past: Vec::new(),
        };
        rig.provider(
            "myrelay",
            &rig.receiver.url("/cb?token=relay-url-token"),
            Some(SECRET),
        );
        let text = format!(
            "data_dir = {data:?}\nshutdown_timeout = \"2s\"\n\
             [webhook]\nproviders_dir = {prov:?}\nca_file = {ca:?}\nreload_interval = \"100ms\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\ntoken = {BEARER:?}\n{extra}\
             [queue.kinds.webhook]\nladder = {ladder}\n",
            data = rig.path("data"),
            prov = providers,
            ca = rig.path("ca.pem"),
        );
        agent::write_private(&rig.config, &text);
        rig
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn provider(&self, id: &str, url: &str, secret: Option<&str>) -> PathBuf {
        let mut v =
            json!({"id": id, "name": format!("relay {id}"), "webhook": {"callback_url": url}});
        if let Some(s) = secret {
            v["webhook"]["secret"] = json!(s);
        }
        let p = self.path("providers").join(format!("{id}.json"));
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    fn start(&mut self) -> SocketAddr {
        let mut cmd = agent::connector(self.dir.path());
        cmd.arg("run").arg("--config").arg(&self.config);
        self.daemon = Some(agent::Daemon::spawn(cmd));
        let (_, v) = self.wait_log(0, "http listener ready", |v| {
            v["message"] == "http listener ready"
        });
        v["addr"].as_str().unwrap().parse().unwrap()
    }

    fn lines(&self) -> &agent::Lines {
        &self.daemon.as_ref().expect("the agent is running").lines
    }

    #[track_caller]
    fn wait_log(&self, from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> (usize, Value) {
        match self.lines().wait(from, WAIT, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v))
        }) {
            Ok((i, l)) => (i, serde_json::from_str(&l).unwrap()),
            Err(()) => self.fail(&format!("the agent never logged {what}")),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.daemon.as_ref().unwrap().child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let mut d = self.daemon.take().expect("the agent is running");
        let code = match wait::wait_exit(&mut d.child, WAIT) {
            Ok(s) => s.code(),
            // Killed as `d` drops.
            Err(_) => panic!("the agent did not exit:\n{}", d.lines.text()),
        };
        d.lines.wait_closed(WAIT);
        self.past.push(d.lines.text());
        code
    }

    fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit()
    }

    fn kill9(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            let _ = d.child.kill();
        }
        self.wait_exit();
    }

    /// `queuectl --config … ARGS`: (exit code, stdout).
    fn queuectl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
        agent::scrub(&mut cmd);
        cmd.current_dir(self.dir.path())
            .arg("--config")
            .arg(&self.config)
            .args(args);
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn queuectl_json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.queuectl(args);
        if code != Some(0) {
            self.fail(&format!("queuectl {args:?}: {code:?}\n{err}"));
        }
        serde_json::from_str(&out).unwrap_or_else(|e| self.fail(&format!("{e}: {out}")))
    }

    fn webhook_jobs(&self) -> Vec<Value> {
        self.queuectl_json(&["list", "--kind", "webhook", "--limit", "0", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn all_logs(&self) -> String {
        let mut s = self.past.join("\n");
        if let Some(d) = &self.daemon {
            s.push_str(&d.lines.text());
        }
        s
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- agent stderr\n{}\n--- receiver\n{:#?}",
            self.all_logs(),
            self.receiver.requests()
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.receiver.release();
        // Its `Reaped` child is killed as it drops.
        drop(self.daemon.take());
    }
}

/// A raw HTTP/1.1 request (so a test can send anything, broken JSON included):
/// (status, JSON body or `null`).
fn http(addr: SocketAddr, token: Option<&str>, body: &[u8], extra_headers: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /v1/webhooks/connect HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A refused body may be answered before it is all sent.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post(addr: SocketAddr, v: &Value) -> (u16, Value) {
    http(addr, Some(BEARER), v.to_string().as_bytes(), "")
}

/// Every file under `dir`, as bytes: (path, contents).
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn bad_input_gets_the_right_4xx_and_nothing_is_enqueued() {
    let mut rig = Rig::new(r#"["0s"]"#, "max_body_bytes = 2048\n");
    let plain = rig.provider("plainhttp", "http://127.0.0.1:9/cb", None);
    let addr = rig.start();
    rig.wait_log(0, "the http:// provider named with its field", |v| {
        v["level"] == "ERROR"
            && v["file"] == plain.display().to_string()
            && v["field"] == "webhook.callback_url"
    });
    let good = connect_event("evt-good", "success");
    let with = |k: &str, v: Value| {
        let mut e = good.clone();
        e[k] = v;
        e
    };
    let without = |k: &str| {
        let mut e = good.clone();
        e.as_object_mut().unwrap().remove(k);
        e
    };
    /// (what, expected status, code, field, what it got)
    type Case<'a> = (&'a str, u16, &'a str, Option<&'a str>, (u16, Value));
    let cases: Vec<Case> = vec![
        (
            "unknown relay",
            422,
            "unknown_relay",
            Some("relay_id"),
            post(addr, &with("relay_id", json!("nosuch"))),
        ),
        (
            "http:// callback",
            422,
            "unknown_relay",
            Some("relay_id"),
            post(addr, &with("relay_id", json!("plainhttp"))),
        ),
        (
            "bad status",
            422,
            "invalid_field",
            Some("status"),
            post(addr, &with("status", json!("accepted"))),
        ),
        (
            "error without error_code",
            422,
            "missing_field",
            Some("error_code"),
            post(addr, &with("status", json!("error"))),
        ),
        (
            "no client",
            422,
            "missing_field",
            Some("client"),
            post(addr, &without("client")),
        ),
        (
            "bad platform",
            422,
            "invalid_field",
            Some("client.platform"),
            post(
                addr,
                &with("client", json!({"version":"1.2.0","platform":"bsd"})),
            ),
        ),
        (
            "a timestamp without an offset (not guessed to be UTC)",
            422,
            "invalid_field",
            Some("timestamp"),
            post(addr, &with("timestamp", json!("2026-01-05T12:00:00"))),
        ),
        (
            "malformed JSON",
            400,
            "malformed_json",
            None,
            http(addr, Some(BEARER), b"{\"relay_id\": ", ""),
        ),
        (
            "oversize body",
            413,
            "payload_too_large",
            None,
            http(addr, Some(BEARER), &vec![b' '; 4096], ""),
        ),
        (
            "wrong bearer token",
            401,
            "unauthorized",
            None,
            http(addr, Some("not-the-token"), good.to_string().as_bytes(), ""),
        ),
        (
            "no bearer token",
            401,
            "unauthorized",
            None,
            http(addr, None, good.to_string().as_bytes(), ""),
        ),
    ];
    for (what, status, code, field, (got, body)) in &cases {
        if got != status || body["code"] != *code || body["field"].as_str() != *field {
            rig.fail(&format!(
                "{what}: expected {status} {code} {field:?}, got {got} {body}"
            ));
        }
        if body["detail"].as_str().is_none_or(str::is_empty) {
            rig.fail(&format!("{what}: no detail in {body}"));
        }
    }
    // The good one is accepted after all that, once.
    let (s, a) = post(addr, &good);
    assert_eq!(s, 202, "{a}");
    assert_eq!(
        (a["event_id"].as_str(), a["duplicate"].as_bool()),
        (Some("evt-good"), Some(false))
    );
    let (s, b) = post(addr, &good);
    assert_eq!(
        (s, &b["job_id"], b["duplicate"].as_bool()),
        (202, &a["job_id"], Some(true))
    );
    rig.receiver.wait_requests(1, WAIT).unwrap();
    assert_eq!(rig.stop(), Some(0));
    let jobs = rig.webhook_jobs();
    assert_eq!(jobs.len(), 1, "only the good event was enqueued: {jobs:#?}");
    assert_eq!(jobs[0]["key"], "evt-good");
    assert_eq!(rig.receiver.requests().len(), 1);
}

#[test]
fn killed_mid_delivery_is_delivered_after_restart_with_the_same_webhook_id() {
    let mut rig = Rig::new(r#"["0s", "1m", "5m", "30m"]"#, "");
    rig.receiver.plan([Answer::Hold]);
    let addr = rig.start();
    let (s, a) = post(addr, &connect_event("evt-kill", "success"));
    assert_eq!(s, 202, "{a}");
    let held = rig.receiver.wait_requests(1, WAIT).unwrap().remove(0);
    // The request is at the relay, unanswered: the process dies now.
    rig.kill9();
    rig.start();
    let again = rig.receiver.wait_requests(2, WAIT).unwrap().remove(1);
    rig.wait_log(0, "callback delivered", |v| {
        v["message"] == "callback delivered" && v["event_id"] == "evt-kill"
    });
    assert_eq!(again.header("webhook-id"), Some("evt-kill"));
    assert_eq!(again.header("webhook-id"), held.header("webhook-id"));
    assert_eq!(again.body, held.body, "the same bytes after the restart");
    verify(SECRET, &again).unwrap();
    assert_eq!(rig.stop(), Some(0));
    let jobs = rig.webhook_jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[0]["attempts"], 2, "the interrupted attempt counts");
    rig.receiver.release();
}

#[test]
fn dead_callbacks_show_in_queuectl_and_a_retry_by_hand_delivers_them() {
    let mut rig = Rig::new(r#"["0s", "10ms", "10ms", "10ms"]"#, "");
    rig.receiver.plan(vec![Answer::Status(500); 4]);
    let addr = rig.start();
    let (s, a) = post(addr, &connect_event("evt-dead", "success"));
    assert_eq!(s, 202, "{a}");
    rig.wait_log(0, "the callback given up", |v| {
        v["level"] == "ERROR" && v["event_id"] == "evt-dead" && v["attempts"] == 4
    });
    // Prometheus sees the relay's three failures, its death, and the ladder run out
    // (the log line comes from the attempt, a moment before the queue records it).
    let m = metrics::wait_for(addr, WAIT, "the dead job", |m| {
        m.get("connector_ladder_exhausted_total", &[("kind", "webhook")]) == Some(1.0)
    });
    let deliveries = |m: &metrics::Metrics, outcome| {
        m.get(
            "connector_webhook_deliveries_total",
            &[("relay", "myrelay"), ("outcome", outcome)],
        )
    };
    assert_eq!(deliveries(&m, "failed"), Some(3.0), "{}", m.text);
    assert_eq!(deliveries(&m, "dead"), Some(1.0), "{}", m.text);
    assert_eq!(deliveries(&m, "delivered"), None, "{}", m.text);
    assert_eq!(
        m.value("connector_ladder_exhausted_total", &[("kind", "webhook")]),
        1.0
    );
    assert_eq!(
        m.value("connector_jobs", &[("kind", "webhook"), ("state", "dead")]),
        1.0
    );
    assert_eq!(rig.stop(), Some(0));
    let id = a["job_id"].as_u64().unwrap().to_string();
    let job = rig.queuectl_json(&["show", &id, "--json"]);
    assert_eq!(job["state"], "dead", "{job}");
    let relays = rig.queuectl_json(&["relays", "--json"]);
    let r = &relays["relays"][0];
    assert_eq!(
        (&r["relay_id"], &r["total"]["dead"], &r["total"]["success"]),
        (&json!("myrelay"), &json!(1), &json!(1)),
        "{relays}"
    );
    assert_eq!(
        r["callback_url"],
        "https://localhost:".to_string() + &rig.receiver.addr.port().to_string() + "/cb?token=***"
    );
    let (code, _, err) = rig.queuectl(&["retry", &id]);
    assert_eq!(code, Some(0), "{err}");
    let addr = rig.start();
    rig.wait_log(0, "callback delivered", |v| {
        v["message"] == "callback delivered"
    });
    // A new process counts from zero, as Prometheus expects of a counter.
    let m = metrics::wait_for(addr, WAIT, "the delivery done", |m| {
        m.get("connector_jobs", &[("kind", "webhook"), ("state", "done")]) == Some(1.0)
    });
    assert_eq!(deliveries(&m, "delivered"), Some(1.0), "{}", m.text);
    assert_eq!(deliveries(&m, "failed"), None, "{}", m.text);
    assert_eq!(
        m.value("connector_jobs", &[("kind", "webhook"), ("state", "done")]),
        1.0
    );
    // Its latency runs from the event's arrival, before the restart.
    assert_eq!(
        m.value("connector_job_latency_seconds", &[("kind", "webhook")]),
        1.0
    );
    assert_eq!(rig.stop(), Some(0));
    let relays = rig.queuectl_json(&["relays", "--json"]);
    let t = &relays["relays"][0]["total"];
    assert_eq!(
        (&t["dead"], &t["delivered"], &t["success"]),
        (&json!(0), &json!(1), &json!(1)),
        "{relays}"
    );
    let (code, table, _) = rig.queuectl(&["relays"]);
    assert_eq!(code, Some(0));
    assert!(
        table.contains("RELAY") && table.contains("promo2024"),
        "{table}"
    );
    let reqs = rig.receiver.requests();
    assert_eq!(reqs.len(), 5);
    assert!(
        reqs.iter()
            .all(|r| r.header("webhook-id") == Some("evt-dead"))
    );
}

#[test]
fn providers_reload_on_sighup_and_on_change_without_a_restart() {
    let mut rig = Rig::new(r#"["0s"]"#, "");
    let addr = rig.start();
    let ev = |relay: &str| {
        let mut e = connect_event(&format!("evt-{relay}"), "success");
        e["relay_id"] = json!(relay);
        e
    };
    assert_eq!(post(addr, &ev("second")).0, 422);
    let mark = rig.lines().len();
    rig.provider("second", &rig.receiver.url("/second"), None);
    rig.wait_log(mark, "a reload after the file appeared", |v| {
        v["message"] == "providers reloaded (files changed)" && v["relays"] == 2
    });
    assert_eq!(post(addr, &ev("second")).0, 202);
    // SIGHUP reloads at once, whatever the timestamps say.
    let mark = rig.lines().len();
    rig.signal("HUP");
    rig.wait_log(mark, "a reload on SIGHUP", |v| {
        v["message"] == "providers reloaded (SIGHUP)" && v["relays"] == 2
    });
    // A broken edit keeps the last good version in force.
    let mark = rig.lines().len();
    std::fs::write(
        rig.path("providers/second.json"),
        "{\"id\": \"second\", \"webhook\": {",
    )
    .unwrap();
    rig.signal("HUP");
    rig.wait_log(mark, "the broken file kept at its last version", |v| {
        v["level"] == "ERROR" && v["field"] == "(json)"
    });
    assert_eq!(post(addr, &ev("second-2")).0, 422, "unknown relay second-2");
    let mut e = ev("second");
    e["event_id"] = json!("evt-second-b");
    assert_eq!(post(addr, &e).0, 202);
    rig.receiver.wait_requests(2, WAIT).unwrap();
    assert_eq!(rig.stop(), Some(0));
}

#[test]
fn provider_files_that_cannot_be_relays_are_named_once() {
    let mut rig = Rig::new(r#"["0s"]"#, "");
    let dir = rig.path("providers");
    let ghost = dir.join("ghost.json");
    std::os::unix::fs::symlink(rig.path("nowhere.json"), &ghost).unwrap();
    let folder = dir.join("folder.json");
    std::fs::create_dir(&folder).unwrap();
    let typo = dir.join("typo.json");
    std::fs::write(
        &typo,
        json!({"id": "typo", "webhok": {"callback_url": rig.receiver.url("/typo")}}).to_string(),
    )
    .unwrap();
    let big = dir.join("big.json");
    let mut text = br#"{"id":"big","pad":""#.to_vec();
    text.resize(text.len() + 1024 * 1024, b'x');
    text.extend_from_slice(br#""}"#);
    std::fs::write(&big, text).unwrap();
    rig.start();
    let named = |file: &Path, field: &'static str, reason: &'static str| {
        let file = file.display().to_string();
        move |v: &Value| {
            v["level"] == "ERROR"
                && v["file"] == file
                && v["field"] == field
                && v["reason"].as_str().is_some_and(|r| r.contains(reason))
        }
    };
    let cases = [
        (&ghost, "(file)", "does not exist", "the dangling symlink"),
        (&folder, "(file)", "is a directory", "the directory"),
        (
            &typo,
            "webhok",
            "did you mean `webhook`",
            "the misspelt key",
        ),
        (&big, "(file)", "larger than", "the oversized file"),
    ];
    for (file, field, reason, what) in cases {
        rig.wait_log(0, what, named(file, field, reason));
    }
    // The good relay still loads; a reload does not say it all again.
    let mark = rig.lines().len();
    rig.signal("HUP");
    let (end, _) = rig.wait_log(mark, "a reload on SIGHUP", |v| {
        v["message"] == "providers reloaded (SIGHUP)" && v["relays"] == 1 && v["skipped"] == 4
    });
    let repeated: Vec<String> = rig.lines().all()[mark..end]
        .iter()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["level"] == "ERROR"))
        .cloned()
        .collect();
    if !repeated.is_empty() {
        rig.fail(&format!(
            "a reload repeated unchanged errors: {repeated:#?}"
        ));
    }
    assert_eq!(rig.stop(), Some(0));
}

#[test]
fn the_full_key_never_reaches_the_database_the_logs_or_an_export() {
    let mut rig = Rig::new(r#"["0s", "10ms"]"#, "");
    rig.receiver.plan([Answer::Status(500)]);
    let addr = rig.start();
    for (i, status) in ["success", "cancelled", "error"].iter().enumerate() {
        let (s, a) = post(addr, &connect_event(&format!("evt-key-{i}"), status));
        assert_eq!(s, 202, "{a}");
    }
    // A rejected one carrying the key too.
    let mut bad = connect_event("evt-key-bad", "bogus");
    bad["key"] = json!(FULL_KEY);
    assert_eq!(post(addr, &bad).0, 422);
    rig.receiver.wait_requests(4, WAIT).unwrap();
    rig.wait_log(0, "all delivered", |v| {
        v["message"] == "callback delivered" && v["event_id"] == "evt-key-0"
    });
    assert_eq!(rig.stop(), Some(0));
    let (code, export, _) = rig.queuectl(&["export"]);
    assert_eq!(code, Some(0));
    assert!(export.contains("\"key_prefix\":\"sk-live\""), "{export}");
    let (_, relays, _) = rig.queuectl(&["relays", "--json"]);
    let secret_b64 = SECRET.trim_start_matches("whsec_");
    for (what, text) in [
        ("export", export.as_bytes()),
        ("relays", relays.as_bytes()),
        ("logs", rig.all_logs().as_bytes()),
    ] {
        for needle in [
            FULL_KEY,
            &FULL_KEY[..8],
            secret_b64,
            BEARER,
            "relay-url-token",
        ] {
            if contains(text, needle.as_bytes()) {
                rig.fail(&format!("{what} holds {needle:?}"));
            }
        }
    }
    for (path, bytes) in files_under(&rig.path("data")) {
        for needle in [FULL_KEY, &FULL_KEY[..8]] {
            if contains(&bytes, needle.as_bytes()) {
                rig.fail(&format!("{} holds {needle:?}", path.display()));
            }
        }
    }
    for r in rig.receiver.requests() {
        assert!(!contains(&r.body, &FULL_KEY.as_bytes()[..8]));
    }
}

#[test]
fn the_library_api_takes_typed_events() {
    // For programs embedding the crate: the same checks as the endpoint.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(
            dir.path().join("queue"),
            jobs::settings(),
            Arc::new(connector::queue::SystemClock),
        )
        .unwrap();
        let registry = Registry::from_providers([Provider {
            id: "r1".into(),
            name: None,
            callback_url: url::Url::parse("https://r1.example/cb").unwrap(),
            secret: None,
            path: "r1.json".into(),
        }]);
        let ev = ConnectEvent {
            relay_id: Some("r1".into()),
            status: Some("success".into()),
            key: Some(connector::config::Secret::new(FULL_KEY)),
            client: Some(webhook::event::ClientInfo {
                version: Some("1.2.0".into()),
                platform: Some("linux".into()),
            }),
            ..Default::default()
        };
        assert!(!format!("{ev:?}").contains(FULL_KEY));
        let a = webhook::ingest(&queue, &registry, ev.clone())
            .await
            .unwrap();
        let job = queue.get(a.job_id).unwrap().unwrap();
        assert_eq!(job.key, a.event_id);
        assert!(!contains(&job.payload, FULL_KEY.as_bytes()));
        let r = webhook::ingest(
            &queue,
            &registry,
            ConnectEvent {
                status: Some("error".into()),
                ..ev
            },
        )
        .await
        .unwrap_err();
        assert_eq!((r.status, r.field.as_deref()), (422, Some("error_code")));
    });
}
