//! Webhook throughput, printed as numbers (not criterion: each run needs a fresh queue
//! of events and a live HTTPS receiver).
//!
//! - **delivery**: 1,000 queued callbacks delivered by the webhook worker to a local
//!   HTTPS receiver that answers `200` at once (`connector::sim::relay`), against
//!   the baseline of the same number of plain `reqwest` POSTs of the same body to the
//!   same receiver, with as many in flight as the worker runs, in the same run;
//! - **ingestion**: events accepted per second through `POST /v1/webhooks/connect`
//!   with 64 concurrent clients (each `202` means the job is on disk), against the
//!   baseline of the same path called in-process (`webhook::ingest_json` from 64 tasks,
//!   the same bodies, a fresh queue), in the same run.
//!
//! `cargo bench --bench webhook` (`WEBHOOK_BENCH_EVENTS` changes the 1,000; 20,000
//! gives rates that start-up does not weigh on; `WEBHOOK_BENCH_ONLY=delivery` or
//! `ingestion` runs one half, for a profiler).

use connector::sim::relay as receiver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use connector::config::Webhook as WebhookConfig;
use connector::daemon::health::Health;
use connector::daemon::http::{self, HttpState};
use connector::daemon::listener::{self, Limits};
use connector::jobs;
use connector::jobs::webhook::{self, Webhook};
use connector::peers::relays::client::RelayClient;
use connector::peers::relays::{Provider, Registry, SigningKey};
use connector::queue::{JobState, Pools, Queue, SystemClock, run_workers};
use futures_util::future::join_all;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 64;

fn event(i: usize) -> serde_json::Value {
    json!({
        "relay_id": "bench",
        "status": if i.is_multiple_of(2) { "success" } else { "cancelled" },
        "ref": format!("ref{}", i % 10),
        "key": "sk-bench-0123456789abcdef",
        "client": {"version": "1.2.0", "platform": "linux"},
        "event_id": format!("evt-{i}"),
    })
}

struct Setup {
    _dir: tempfile::TempDir,
    queue: Queue,
    registry: Arc<Registry>,
    config: WebhookConfig,
}

fn setup(receiver: &receiver::Receiver, per_relay: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &receiver.ca_pem).unwrap();
    let (queue, _) = Queue::open(
        dir.path().join("queue"),
        jobs::settings(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let registry = Arc::new(Registry::from_providers([Provider {
        id: "bench".into(),
        name: None,
        callback_url: url::Url::parse(&receiver.url("/cb")).unwrap(),
        secret: Some(SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()),
        path: "bench.json".into(),
    }]));
    let config = WebhookConfig {
        ca_file: Some(ca),
        per_relay_concurrency: per_relay,
        ..WebhookConfig::default()
    };
    Setup {
        _dir: dir,
        queue,
        registry,
        config,
    }
}

/// Enqueues `n` events, then times the worker delivering them all.
async fn delivery(receiver: &receiver::Receiver, n: usize, per_relay: usize) -> f64 {
    let s = setup(receiver, per_relay);
    join_all((0..n).map(|i| {
        let (q, r) = (s.queue.clone(), s.registry.clone());
        async move {
            webhook::ingest_json(&q, &r, event(i).to_string().as_bytes())
                .await
                .unwrap()
        }
    }))
    .await;
    let handler = Arc::new(Webhook {
        queue: s.queue.clone(),
        registry: s.registry.clone(),
        client: Arc::new(RelayClient::new(&s.config).unwrap()),
    });
    let stop = CancellationToken::new();
    let start = Instant::now();
    let workers = tokio::spawn(run_workers(
        s.queue.clone(),
        jobs::WEBHOOK,
        handler,
        stop.clone(),
    ));
    loop {
        let done = s.queue.stats().unwrap().jobs[&jobs::WEBHOOK][&JobState::Done];
        if done as usize >= n {
            break;
        }
        // Polled, not woken by every job event: reading the stats once per event would
        // take the CPU the workers are measured on.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.cancel();
    workers.await.unwrap().unwrap();
    n as f64 / secs
}

/// The same number of plain POSTs, `in_flight` at a time, with a client configured the
/// same way.
async fn baseline(receiver: &receiver::Receiver, n: usize, in_flight: usize) -> f64 {
    let s = setup(receiver, in_flight);
    let pem = std::fs::read(s.config.ca_file.as_ref().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = receiver.url("/cb");
    let body = br#"{"event":"connect","status":"success","relay_id":"bench","ref":"ref1","key_prefix":"sk-benc","timestamp":"2026-01-05T12:00:00Z","client":{"version":"1.2.0","platform":"linux"}}"#;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    join_all((0..in_flight).map(|_| {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(&body[..])
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            }
        }
    }))
    .await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// The bodies of `total` events, made before the clock starts.
fn bodies(total: usize) -> Arc<Vec<axum::body::Bytes>> {
    Arc::new(
        (0..total)
            .map(|i| axum::body::Bytes::from(event(i).to_string()))
            .collect(),
    )
}

/// The baseline: `total` events through `webhook::ingest_json` by `CLIENTS` tasks.
async fn ingestion_in_process(receiver: &receiver::Receiver, total: usize) -> f64 {
    let s = setup(receiver, 8);
    let bodies = bodies(total);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (q, r, next, bodies) = (
                s.queue.clone(),
                s.registry.clone(),
                next.clone(),
                bodies.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    webhook::ingest_json(&q, &r, &bodies[i]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let stored = s.queue.stats().unwrap().jobs[&jobs::WEBHOOK][&JobState::Ready];
    assert_eq!(stored as usize, total, "every event is a stored job");
    rate
}

/// `total` events POSTed to the listener by `CLIENTS` concurrent clients.
async fn ingestion(receiver: &receiver::Receiver, total: usize) -> f64 {
    let s = setup(receiver, 8);
    let bodies = bodies(total);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let state = Arc::new(HttpState {
        queue: s.queue.clone(),
        registry: s.registry.clone(),
        token: None,
        max_body_bytes: 64 * 1024,
        health: Arc::new(Health {
            queue: s.queue.clone(),
            nodes: Vec::new(),
            pools: Arc::new(Pools::default()),
            tasks: Default::default(),
            cutter: None,
        }),
    });
    let limits = Limits::new(&connector::config::Http::default(), Duration::from_secs(30));
    let server = tokio::spawn(listener::serve(
        listener,
        http::router(state),
        limits,
        stop.clone(),
    ));
    let url = format!("http://{addr}/v1/webhooks/connect");
    // One client, made before the clock starts (a client loads the system's CAs), with
    // a connection per concurrent sender.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, next, bodies) =
                (client.clone(), url.clone(), next.clone(), bodies.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bodies[i].clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 202);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = server.await;
    let stored = s.queue.stats().unwrap().jobs[&jobs::WEBHOOK][&JobState::Ready];
    assert_eq!(stored as usize, total, "every 202 is a stored job");
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it once, small.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("WEBHOOK_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 50 } else { 1000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let receiver = receiver::Receiver::start();
    let worker_concurrency = jobs::settings().kind(jobs::WEBHOOK).concurrency;
    let only = std::env::var("WEBHOOK_BENCH_ONLY").unwrap_or_default();
    rt.block_on(async {
        if only == "ingestion" {
            return;
        }
        // Warm-up: connections, TLS sessions, page cache.
        baseline(&receiver, n.min(100), 8).await;
        let base = baseline(&receiver, n, worker_concurrency).await;
        let d8 = delivery(&receiver, n, 8).await;
        let d32 = delivery(&receiver, n, worker_concurrency).await;
        println!(
            "webhook delivery, {n} queued callbacks, local HTTPS receiver answering 200 at once:"
        );
        println!("  baseline: plain reqwest POSTs, {worker_concurrency} in flight   {base:>9.0}/s");
        println!("  webhook worker, per_relay_concurrency = 8 (default)   {d8:>9.0}/s");
        println!(
            "  webhook worker, per_relay_concurrency = {worker_concurrency}            {d32:>9.0}/s"
        );
    });
    rt.block_on(async {
        if only == "delivery" {
            return;
        }
        let total = n * 4;
        let base = ingestion_in_process(&receiver, total).await;
        let ing = ingestion(&receiver, total).await;
        println!("webhook ingestion, {total} events, {CLIENTS} concurrent senders (each durable before it is answered):");
        println!("  baseline: webhook::ingest_json in-process    {base:>9.0}/s");
        println!("  POST /v1/webhooks/connect over HTTP          {ing:>9.0}/s");
    });
}
