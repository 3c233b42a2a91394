//! Cutting a banned user's connections (issue 14), against baselines in the same run.
//!
//! 1. **Access log parse throughput**: a 1,000,000-line log of both cores' formats (and
//!    lines of other kinds), read by the product's follower into the tracker
//!    (`LogFollower::poll` + `Tracker::line`), and parsed alone
//!    (`access_log::parse`), against a plain `BufRead::lines` count of the same file.
//! 2. **Tracker memory** at 100,000 live connections (10,000 users, 10 each), measured
//!    by a counting allocator: bytes per connection.
//! 3. **Removal → socket closed**, p50/p99 over 100 bans on a real Xray core with a real
//!    client core: the product's reconcile with its cutter (ListInbounds, RemoveUser,
//!    reading the access log, a sock_diag dump, SOCK_DESTROY) from the call to the
//!    victim's download ending at the HTTP client; against RemoveUser then `ss -K`
//!    with the same filter (the inbound port and the tracked source) spawned for each
//!    tracked source, same core, same users, same run.
//!
//! `cargo bench --bench cut` (root, for SOCK_DESTROY; the peers installed:
//! `scripts/install-peers.sh`, `CONNECTOR_XRAY_PYTHON`). Prints its numbers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector::config::{Node, Protocol as NodeProtocol, Xray};
use connector::jobs;
use connector::jobs::node_sync::userlist;
use connector::jobs::xray_apply::connections::{LogFollower, Tracker, Tracking};
use connector::jobs::xray_apply::cut::{Availability, Cutter};
use connector::jobs::xray_apply::grpc;
use connector::peers::xray::email::EmailShape;
use connector::peers::xray::{XrayClient, access_log};
use connector::queue::{Queue, SystemClock};
use connector::sim::core as cores;
use cores::{Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User};
use uuid::Uuid;

/// Counts live heap bytes, for the tracker's memory.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const LINES: usize = 1_000_000;
const BANS: usize = 100;
const TAG: &str = "bench";

fn main() {
    parse_throughput();
    tracker_memory();
    if let Err(why) = cores::peer(Flavor::Xray) {
        eprintln!("cut bench: latency SKIPPED: {why} (run scripts/install-peers.sh)");
        return;
    }
    cut_latency();
}

// ---- 1. parsing ----

fn log_line(i: usize, uuid: &Uuid) -> String {
    match i % 4 {
        0 => format!(
            "2026/12/05 15:04:51.011036 from 10.{}.{}.{}:{} accepted tcp:example.com:443 [in-1 >> direct] email: {uuid}\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255,
            1024 + i % 60000
        ),
        1 => format!(
            "2026/12/05 15:05:01 127.0.0.1:{} accepted tcp:127.0.0.1:33241 [direct] email: {uuid}\n",
            1024 + i % 60000
        ),
        2 => format!(
            "2026/12/05 15:04:51.011036 from tcp:[2001:db8::{:x}]:{} accepted tcp:1.1.1.1:80 [in-1 >> direct] email: {uuid}\n",
            i & 0xffff,
            1024 + i % 60000
        ),
        _ => "2026/12/05 15:04:51.011036 from 127.0.0.1:1 rejected  proxy/vless/encoding: invalid request user id\n".to_string(),
    }
}

fn parse_throughput() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("access.log");
    let uuids: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("the log"));
        for i in 0..LINES {
            f.write_all(log_line(i, &uuids[i % uuids.len()]).as_bytes())
                .expect("write");
        }
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let mut best = BTreeMap::new();
    for _ in 0..3 {
        // Baseline: count lines with BufRead::lines.
        let t = Instant::now();
        let f = std::io::BufReader::new(std::fs::File::open(&path).expect("open"));
        let n = f.lines().map_while(Result::ok).count();
        let base = t.elapsed();
        assert_eq!(n, LINES);
        // Parse only (lines from BufRead::lines).
        let t = Instant::now();
        let f = std::io::BufReader::new(std::fs::File::open(&path).expect("open"));
        let parsed = f
            .lines()
            .map_while(Result::ok)
            .filter(|l| access_log::parse(l).is_some())
            .count();
        let parse = t.elapsed();
        // The product's path: the follower into the tracker (our users: all of them).
        let shapes = vec![EmailShape::new("{uuid}", 1).expect("a shape")];
        let tracker = Tracker::new(shapes, LINES);
        // A follower that started before the file existed reads it from its start: the
        // file appears (a hard link) after its first poll.
        let fresh = dir.path().join("fresh.log");
        let _ = std::fs::remove_file(&fresh);
        let mut follower = LogFollower::new(fresh.clone());
        follower.poll(&mut |_| {});
        std::fs::hard_link(&path, &fresh).expect("link");
        let t = Instant::now();
        let lines = follower.poll(&mut |l| {
            tracker.line(l);
        });
        let product = t.elapsed();
        assert_eq!(lines, LINES);
        assert_eq!(parsed, LINES / 4 * 3);
        for (k, d) in [("baseline", base), ("parse", parse), ("product", product)] {
            let e = best.entry(k).or_insert(d);
            if d < *e {
                *e = d;
            }
        }
    }
    println!(
        "access log: {LINES} lines ({:.0} MB), best of 3:\n  BufRead::lines count (baseline): {:>12.0} lines/s\n  BufRead::lines + access_log::parse: {:>9.0} lines/s\n  follower + tracker (product):    {:>12.0} lines/s",
        size as f64 / 1e6,
        rate(LINES, best["baseline"]),
        rate(LINES, best["parse"]),
        rate(LINES, best["product"]),
    );
}

// ---- 2. memory ----

fn tracker_memory() {
    let shapes = vec![EmailShape::new("{uuid}", 1).expect("a shape")];
    let users: Vec<String> = (0..10_000).map(|_| Uuid::new_v4().to_string()).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let tracker = Tracker::new(shapes, 1_000_000);
    for i in 0..100_000usize {
        let src = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000));
        tracker.insert(src, &users[i % users.len()]);
    }
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(tracker.len(), 100_000);
    let bytes = after.saturating_sub(before);
    println!(
        "tracker: 100,000 live connections of 10,000 users: {:.1} MB ({:.0} bytes per connection; the emails' own 10,000 x 36 bytes included)",
        bytes as f64 / 1e6,
        bytes as f64 / 100_000.0
    );
    drop(tracker);
}

// ---- 3. latency ----

/// A download through the client; when it ended.
struct Drip {
    bytes: Arc<AtomicUsize>,
    ended: Arc<Mutex<Option<Instant>>>,
}

impl Drip {
    fn start(socks: SocketAddr, url: String) -> Drip {
        let bytes = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(Mutex::new(None));
        let (b, e) = (bytes.clone(), ended.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let _ = rt.block_on(async {
                let proxy = reqwest::Proxy::all(format!("socks5h://{socks}"))?;
                let client = reqwest::Client::builder()
                    .proxy(proxy)
                    .pool_max_idle_per_host(0)
                    .build()?;
                let mut resp = client.get(&url).send().await?;
                while let Some(c) = resp.chunk().await? {
                    b.fetch_add(c.len(), Ordering::SeqCst);
                }
                Ok::<_, reqwest::Error>(())
            });
            *e.lock().expect("lock") = Some(Instant::now());
        });
        Drip { bytes, ended }
    }

    fn wait_flowing(&self) {
        let t = Instant::now();
        while self.bytes.load(Ordering::SeqCst) < 2048 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the download stalled"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_end(&self) -> Instant {
        let t = Instant::now();
        loop {
            if let Some(at) = *self.ended.lock().expect("lock") {
                return at;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the download was not cut"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn cut_latency() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let logdir = tempfile::tempdir().expect("a temporary directory");
    let log = logdir.path().join("access.log");
    let mut server = ServerConfig::new(Flavor::Xray)
        .with(Inbound::new(
            TAG,
            Protocol::Vless,
            vec![User::new("admin@bench")],
        ))
        .access_log(&log);
    server.loglevel = "warning";
    let inbound = server.inbound(TAG).clone();
    let _core = Core::start(Flavor::Xray, server.json());
    let users: Vec<userlist::User> = (0..BANS)
        .map(|_| userlist::User {
            uuid: Uuid::new_v4(),
            email: None,
            flow: None,
            level: None,
        })
        .collect();
    let client_users: Vec<User> = users.iter().map(|u| User::panel(u.uuid)).collect();
    let client = Client::start(client_users.iter().map(|u| inbound.route(u)).collect());
    let target = Target::start();
    let url = target.drip_url(4000, Duration::from_millis(10));
    let xray = Xray {
        api: server.api_addr().to_string(),
        access_log: Some(log.clone()),
        cut_connections: true,
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
    let api = rt
        .block_on(async {
            XrayClient::new(
                &xray.api,
                connector::config::Flavor::Xray,
                Duration::from_secs(10),
            )
        })
        .expect("a client");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (queue, _) = Queue::open(
        dir.path().join("queue"),
        jobs::settings(),
        Arc::new(SystemClock),
    )
    .expect("a queue");
    let shapes = vec![EmailShape::new("{uuid}", 1).expect("a shape")];
    let tracking = Arc::new(Tracking::new(
        Tracker::new(shapes, 100_000),
        log.clone(),
        BTreeMap::new(),
    ));
    tracking.catch_up();
    let cutter = Arc::new(Cutter::new(tracking.clone()));
    if cutter.probe() != Availability::Available {
        eprintln!(
            "cut bench: latency SKIPPED: {} (run as root)",
            cutter.describe()
        );
        return;
    }
    let reconcile = |list: &[userlist::User]| {
        rt.block_on(grpc::reconcile_cutting(
            &queue,
            &api,
            &xray,
            &node,
            &list.iter().cloned().collect(),
            false,
            Some(&cutter),
        ))
        .expect("reconcile")
    };
    reconcile(&users);
    let port = inbound.port;
    let mut product = Vec::new();
    let mut baseline = Vec::new();
    let mut spawned = Vec::new();
    for (i, u) in client_users.iter().enumerate() {
        let socks = client.socks(&u.email);
        let without: Vec<userlist::User> = users
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, u)| u.clone())
            .collect();
        // The product: the reconcile that removes the user, and cuts.
        let d = Drip::start(socks, url.clone());
        d.wait_flowing();
        let t = Instant::now();
        let out = reconcile(&without);
        let end = d.wait_end();
        assert_eq!(out.removed, 1);
        product.push(end.duration_since(t));
        reconcile(&users);
        // The baseline: RemoveUser, then `ss -K` of the same 4-tuples.
        let d = Drip::start(socks, url.clone());
        d.wait_flowing();
        let t = Instant::now();
        rt.block_on(api.remove_user(TAG, &u.email))
            .expect("RemoveUser");
        tracking.catch_up();
        let email = u.email.to_lowercase();
        let sources = tracking.tracker.sources_of(std::slice::from_ref(&email));
        let ts = Instant::now();
        for src in &sources[&email] {
            let status = std::process::Command::new("ss")
                .args([
                    "-K",
                    "-t",
                    "state",
                    "established",
                    "sport",
                    "=",
                    &format!(":{port}"),
                    "dst",
                ])
                .arg(src.to_string())
                .stdout(std::process::Stdio::null())
                .status()
                .expect("ss");
            assert!(status.success());
        }
        spawned.push(ts.elapsed());
        let end = d.wait_end();
        baseline.push(end.duration_since(t));
        tracking.tracker.forget(&sources[&email]);
        reconcile(&users);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "removal -> victim's download ended, {BANS} bans each, real Xray + client core:\n  product (reconcile + cut):        p50 {:>7.2} ms  p99 {:>7.2} ms\n  baseline (RemoveUser + ss -K):    p50 {:>7.2} ms  p99 {:>7.2} ms  (of which ss itself p50 {:.2} ms)",
        ms(percentile(&mut product, 0.5)),
        ms(percentile(&mut product, 0.99)),
        ms(percentile(&mut baseline, 0.5)),
        ms(percentile(&mut baseline, 0.99)),
        ms(percentile(&mut spawned, 0.5)),
    );
}
