//! Traffic collection against a real Xray core (issue 5), against the bare QueryStats
//! call in the same run.
//!
//! For 10,000 and 100,000 users: a fresh core with one plain vless inbound, the users
//! added through the product's reconcile, then one real VLESS connection per user
//! (written here: the request header, an HTTP request to a local target, the answer
//! read to its end), so that every user has uplink and downlink counters. Then:
//!
//! - **baseline**: `QueryStats("user>>>", reset = false)` through the product's client;
//!   and, for a look inside, the same call as collection makes it (`RawStats`);
//! - **full collection**: a fresh queue (no baseline), so every user has a delta: read,
//!   deltas, reports split at 5,000 users, and the commit of baselines and reports with
//!   its flush;
//! - **steady collection**: the same collector again, nothing grew: read and compare,
//!   no commit.
//!
//! Time is the median of the rounds; allocations (count and bytes) are counted by this
//! binary's global allocator around the call, for every thread of the process.
//!
//! `cargo bench --bench traffic` (the peers must be installed: `scripts/install-peers.sh`,
//! `CONNECTOR_XRAY_PYTHON`). Prints its numbers; no criterion, because a sample needs
//! a core loaded with users and traffic, which takes seconds to build.

use connector::sim::core as cores;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use connector::config::{Config, Node, Protocol as NodeProtocol, Xray};
use connector::jobs;
use connector::jobs::node_sync::userlist;
use connector::jobs::traffic_report::Collector;
use connector::jobs::xray_apply::grpc;
use connector::peers::xray::XrayClient;
use connector::queue::{Queue, SystemClock};
use cores::{Core, Flavor, Inbound, Protocol, ServerConfig, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TAG: &str = "bench";
const ROUNDS: usize = 5;

fn main() {
    if let Err(why) = cores::peer(Flavor::Xray) {
        eprintln!("traffic bench SKIPPED: {why} (run scripts/install-peers.sh)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // `TRAFFIC_BENCH_USERS=10000` (a comma-separated list) for a quicker look.
    let sizes: Vec<usize> = std::env::var("TRAFFIC_BENCH_USERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);
    for users in sizes {
        bench(&rt, users);
    }
}

struct Sample {
    time: Duration,
    allocs: u64,
    bytes: u64,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Sample) {
    let (a, b) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let t = Instant::now();
    let out = f();
    let time = t.elapsed();
    let s = Sample {
        time,
        allocs: ALLOCS.load(Ordering::Relaxed) - a,
        bytes: BYTES.load(Ordering::Relaxed) - b,
    };
    (out, s)
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by_key(|s| s.time);
    v.swap_remove(v.len() / 2)
}

fn show(what: &str, s: &Sample, users: usize) {
    println!(
        "  {what:<34} {:>9.1} ms  {:>9} allocs ({:.1}/user)  {:>8.1} MiB allocated",
        s.time.as_secs_f64() * 1e3,
        s.allocs,
        s.allocs as f64 / users as f64,
        s.bytes as f64 / (1024.0 * 1024.0)
    );
}

fn bench(rt: &tokio::runtime::Runtime, n: usize) {
    let target = Target::start();
    let mut server =
        ServerConfig::new(Flavor::Xray).with(Inbound::new(TAG, Protocol::Vless, Vec::new()));
    server.loglevel = "warning";
    let _core = Core::start(Flavor::Xray, server.json());
    let api = server.api_addr().to_string();
    let client = rt
        .block_on(async {
            XrayClient::new(
                &api,
                connector::config::Flavor::Xray,
                Duration::from_secs(60),
            )
        })
        .expect("a client");
    let xray = Xray {
        api: api.clone(),
        ..Xray::default()
    };
    let node = Node {
        id: 1,
        inbound_tag: TAG.into(),
        protocol: NodeProtocol::Vless,
        flow: String::new(),
        cipher: None,
        port: None,
    };
    let users: Vec<userlist::User> = (0..n)
        .map(|_| userlist::User {
            uuid: Uuid::new_v4(),
            email: None,
            flow: None,
            level: None,
        })
        .collect();
    let setup = tempfile::tempdir().expect("a temporary directory");
    let (q, _) = Queue::open(
        setup.path().join("queue"),
        jobs::settings(),
        Arc::new(SystemClock),
    )
    .expect("a queue");
    let t = Instant::now();
    rt.block_on(grpc::reconcile(
        &q,
        &client,
        &xray,
        &node,
        &users.iter().cloned().collect(),
        false,
    ))
    .expect("users added");
    let added = t.elapsed();
    let t = Instant::now();
    let inbound = server.inbound(TAG).addr();
    let target_port = target_port(&target);
    rt.block_on(traffic(inbound, target_port, &users));
    println!(
        "traffic: {n} users on a fresh Xray core ({} ms to add, {} ms for one VLESS connection each)",
        added.as_millis(),
        t.elapsed().as_millis()
    );

    let config = Arc::new(Config {
        xray: Some(xray.clone()),
        nodes: vec![node.clone()],
        ..Config::default()
    });

    let mut base = Vec::new();
    let mut counters = 0;
    for _ in 0..ROUNDS {
        let (r, s) = measure(|| rt.block_on(client.query_stats("user>>>", false)));
        counters = r.expect("QueryStats").len();
        base.push(s);
    }
    assert!(
        counters >= 2 * n,
        "only {counters} counters for {n} users: not every user carried traffic"
    );
    let mut raw = Vec::new();
    for _ in 0..ROUNDS {
        let (r, s) = measure(|| rt.block_on(client.query_stats_raw("user>>>")));
        assert_eq!(r.expect("QueryStats").len(), counters);
        raw.push(s);
    }
    let mut full = Vec::new();
    let mut steady = Vec::new();
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (queue, _) = Queue::open(
            dir.path().join("queue"),
            jobs::settings(),
            Arc::new(SystemClock),
        )
        .expect("a queue");
        let mut c =
            Collector::new(queue.clone(), client.clone(), config.clone()).expect("a collector");
        let (r, s) = measure(|| rt.block_on(c.collect()));
        let r = r.expect("a collection");
        let items: usize = r.reports.iter().map(|x| x.items).sum();
        assert_eq!(items, n, "every user reported");
        full.push(s);
        let (r, s) = measure(|| rt.block_on(c.collect()));
        assert!(r.expect("a collection").reports.is_empty());
        steady.push(s);
    }
    println!("  ({counters} counters; median of {ROUNDS})");
    show("baseline: bare QueryStats", &median(base), n);
    show("  the same answer kept as bytes", &median(raw), n);
    show("full collection + commit", &median(full), n);
    show("steady collection (nothing grew)", &median(steady), n);
}

fn target_port(target: &Target) -> u16 {
    let url = target.url();
    url.rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the target's port")
}

/// One VLESS connection per user through the inbound to the target: request header
/// (version 0, the user's id, no addons, TCP to 127.0.0.1:port), an HTTP request, then
/// the answer read to its end. 256 at a time.
async fn traffic(inbound: std::net::SocketAddr, port: u16, users: &[userlist::User]) {
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for u in users {
        let permit = sem.clone().acquire_owned().await.expect("a permit");
        let id = *u.uuid.as_bytes();
        tasks.spawn(async move {
            let _permit = permit;
            let mut req = vec![0u8];
            req.extend_from_slice(&id);
            req.extend_from_slice(&[0, 1]);
            req.extend_from_slice(&port.to_be_bytes());
            req.extend_from_slice(&[1, 127, 0, 0, 1]);
            req.extend_from_slice(b"GET / HTTP/1.0\r\nHost: target\r\n\r\n");
            let mut s = tokio::net::TcpStream::connect(inbound)
                .await
                .expect("connect to the inbound");
            s.write_all(&req).await.expect("send");
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await.expect("read");
            assert!(
                answer.len() > 2,
                "the core refused a user ({} bytes)",
                answer.len()
            );
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a connection");
    }
}
