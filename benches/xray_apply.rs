//! Applying users to a real Xray core (issue 4), against baselines in the same run.
//!
//! 1. **10,000 adds to a fresh core, then 1,000 removes**, through the product's
//!    reconcile (`xray_apply::grpc::reconcile`: a real queue in a temporary directory,
//!    `xray.concurrency` calls in flight on one channel, the managed-user record
//!    committed before the adds), against the same AddUser / RemoveUser calls made one
//!    at a time, each awaited, on the same client. Each round starts a fresh core for
//!    each side. Target: 10,000 adds under 2 s.
//! 2. **Ban latency**: the real `connector` binary (release build), a real panel, a
//!    real client core with one route per user. 100 users; each round the panel drops
//!    one, and the time is taken from the moment the agent fetched that answer (the
//!    panel's clock) to the start of the first fetch through the client, as that user,
//!    that the core refused. Fetches go back to back, so the resolution is one
//!    successful fetch (a few ms). `sync.interval` is 200ms; the time from the panel's
//!    change to the fetch (up to one interval) is printed apart.
//!
//! `cargo bench --bench xray_apply` (the peers must be installed:
//! `scripts/install-peers.sh`, `CONNECTOR_XRAY_PYTHON`). Prints its numbers; no
//! criterion, because each sample needs a fresh core.

#[path = "../tests/it/support/agent.rs"]
mod agent;
use connector::sim::core as cores;
use connector::sim::panel;
#[path = "../tests/it/support/wait.rs"]
#[allow(dead_code)]
mod wait;

use std::sync::Arc;
use std::time::{Duration, Instant};

use connector::config::{Node, Protocol as NodeProtocol, Xray};
use connector::jobs;
use connector::jobs::node_sync::userlist;
use connector::jobs::xray_apply::grpc;
use connector::peers::xray::{Added, Removed, XrayClient};
use connector::queue::{Queue, SystemClock};
use cores::{Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User};
use uuid::Uuid;

const USERS: usize = 10_000;
const REMOVED: usize = 1_000;
const ROUNDS: usize = 3;
const BANS: usize = 100;
const TAG: &str = "bench";

fn main() {
    if let Err(why) = cores::peer(Flavor::Xray) {
        eprintln!("xray_apply bench SKIPPED: {why} (run scripts/install-peers.sh)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    apply(&rt);
    ban_latency();
}

// ---- 1. adds and removes ----

/// A fresh core with one vless inbound holding one config user.
fn fresh_core() -> (Core, ServerConfig) {
    let admin = User::new("admin@bench");
    let mut server =
        ServerConfig::new(Flavor::Xray).with(Inbound::new(TAG, Protocol::Vless, vec![admin]));
    server.loglevel = "warning";
    let core = Core::start(Flavor::Xray, server.json());
    (core, server)
}

fn client(rt: &tokio::runtime::Runtime, server: &ServerConfig) -> XrayClient {
    let addr = server.api_addr().to_string();
    rt.block_on(async {
        XrayClient::new(
            &addr,
            connector::config::Flavor::Xray,
            Duration::from_secs(10),
        )
    })
    .expect("a client")
}

fn count(rt: &tokio::runtime::Runtime, c: &XrayClient) -> usize {
    rt.block_on(c.inbound_emails(TAG))
        .expect("GetInboundUsers")
        .expect("Xray lists users")
        .len()
}

struct Times {
    adds: Duration,
    removes: Duration,
}

fn apply(rt: &tokio::runtime::Runtime) {
    let users: Vec<userlist::User> = (0..USERS)
        .map(|_| userlist::User {
            uuid: Uuid::new_v4(),
            email: None,
            flow: None,
            level: None,
        })
        .collect();
    let xray_for = |server: &ServerConfig| Xray {
        api: server.api_addr().to_string(),
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
    println!(
        "xray_apply: {USERS} adds to a fresh Xray core, then {REMOVED} removes ({ROUNDS} rounds, a fresh core per side and round)"
    );
    let mut product = Vec::new();
    let mut baseline = Vec::new();
    for round in 1..=ROUNDS {
        // The product: one reconcile to the full list, one to the list without 1,000.
        let (_core, server) = fresh_core();
        let c = client(rt, &server);
        let xray = xray_for(&server);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (queue, _) = Queue::open(
            dir.path().join("queue"),
            jobs::settings(),
            Arc::new(SystemClock),
        )
        .expect("a queue");
        let t = Instant::now();
        let out = rt
            .block_on(grpc::reconcile(
                &queue,
                &c,
                &xray,
                &node,
                &users.iter().cloned().collect(),
                false,
            ))
            .expect("reconcile");
        let adds = t.elapsed();
        assert_eq!(out.added, USERS, "{}", out.describe());
        let t = Instant::now();
        let out = rt
            .block_on(grpc::reconcile(
                &queue,
                &c,
                &xray,
                &node,
                &users[REMOVED..].iter().cloned().collect(),
                false,
            ))
            .expect("reconcile");
        let removes = t.elapsed();
        assert_eq!(out.removed, REMOVED, "{}", out.describe());
        assert_eq!(count(rt, &c), USERS - REMOVED + 1);
        drop(_core);

        // The baseline: the same calls, one at a time.
        let (_core, server) = fresh_core();
        let c = client(rt, &server);
        let xray = xray_for(&server);
        let accounts: Vec<_> = users
            .iter()
            .map(|u| grpc::core_user(&c, &xray, &node, u.view()).expect("an account"))
            .collect();
        let t = Instant::now();
        rt.block_on(async {
            for a in &accounts {
                assert_eq!(c.add_user(TAG, a).await.expect("AddUser"), Added::New);
            }
        });
        let b_adds = t.elapsed();
        let t = Instant::now();
        rt.block_on(async {
            for a in &accounts[..REMOVED] {
                assert_eq!(
                    c.remove_user(TAG, &a.email).await.expect("RemoveUser"),
                    Removed::Gone
                );
            }
        });
        let b_removes = t.elapsed();
        assert_eq!(count(rt, &c), USERS - REMOVED + 1);
        println!(
            "  round {round}: reconcile {:>6.0} ms adds, {:>5.0} ms removes | one at a time {:>6.0} ms adds, {:>5.0} ms removes",
            ms(adds),
            ms(removes),
            ms(b_adds),
            ms(b_removes)
        );
        product.push(Times { adds, removes });
        baseline.push(Times {
            adds: b_adds,
            removes: b_removes,
        });
    }
    let med = |v: &[Times], f: fn(&Times) -> Duration| {
        let mut d: Vec<Duration> = v.iter().map(f).collect();
        d.sort();
        d[d.len() / 2]
    };
    let (pa, pr) = (med(&product, |t| t.adds), med(&product, |t| t.removes));
    let (ba, br) = (med(&baseline, |t| t.adds), med(&baseline, |t| t.removes));
    println!(
        "  median: {USERS} adds: reconcile {:.0} ms ({:.0}/s) vs one at a time {:.0} ms ({:.0}/s): {:.1}x; target < 2000 ms: {}",
        ms(pa),
        USERS as f64 / pa.as_secs_f64(),
        ms(ba),
        USERS as f64 / ba.as_secs_f64(),
        ba.as_secs_f64() / pa.as_secs_f64(),
        if pa < Duration::from_secs(2) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  median: {REMOVED} removes: reconcile {:.0} ms vs one at a time {:.0} ms: {:.1}x",
        ms(pr),
        ms(br),
        br.as_secs_f64() / pr.as_secs_f64()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---- 2. ban latency ----

fn ban_latency() {
    let target = Target::start();
    let url = target.url();
    let users: Vec<User> = (0..BANS).map(|_| User::panel(Uuid::new_v4())).collect();
    let admin = User::new("admin@bench");
    let inbound = Inbound::new(TAG, Protocol::Vless, vec![admin]);
    let mut server = ServerConfig::new(Flavor::Xray).with(inbound.clone());
    server.loglevel = "warning";
    let _core = Core::start(Flavor::Xray, server.json());
    let client = Client::start(users.iter().map(|u| inbound.route(u)).collect());
    let mut opts = agent::Opts {
        xray: Some(format!(
            "api = \"{}\"\nflavor = \"xray\"\n",
            server.api_addr()
        )),
        ..agent::Opts::default()
    };
    opts.node_keys
        .insert(1, format!("inbound_tag = {TAG:?}\nprotocol = \"vless\"\n"));
    let mut rig = agent::Rig::new(opts);
    let list = |from: usize| {
        let ids: Vec<String> = users[from..].iter().map(|u| u.uuid.to_string()).collect();
        panel::Answer::list(&ids)
    };
    rig.panel.set(1, list(0));
    rig.start();
    rig.wait_log(0, "the first apply", |v| {
        v["message"] == "applied" && v["users"] == BANS
    });
    let mut from_fetch = Vec::new();
    let mut from_change = Vec::new();
    for (k, user) in users.iter().enumerate() {
        let socks = client.socks(&user.email);
        let after = rig.panel.request_count();
        let changed = Instant::now();
        rig.panel.set(1, list(k + 1));
        let deadline = changed + agent::WAIT;
        let refused = loop {
            let start = Instant::now();
            if cores::fetch_through(socks, &url).is_err() {
                break start;
            }
            if start > deadline {
                rig.fail(&format!("user {k} was never refused"));
            }
        };
        let (_, fetched) = rig
            .panel
            .wait_request(after, agent::WAIT, |r| r.node == 1 && r.answered == "200")
            .unwrap_or_else(|e| rig.fail(&e));
        let fetched = rig.panel.instant_of(&fetched);
        from_fetch.push(refused.saturating_duration_since(fetched));
        from_change.push(refused - changed);
    }
    assert_eq!(rig.stop(), Some(0), "{}", rig.report());
    // Nearest rank: p50 of 100 is the 50th smallest, p99 the 99th.
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p).div_ceil(100).max(1) - 1]
    };
    println!(
        "xray_apply: ban latency over {BANS} bans (real connector, release build; sync.interval 200ms)"
    );
    println!(
        "  panel answer fetched -> user refused: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(pct(&mut from_fetch, 50)),
        ms(pct(&mut from_fetch, 99)),
        ms(*from_fetch.iter().max().unwrap())
    );
    println!(
        "  panel changed -> user refused (adds the wait for the next sync): p50 {:.1} ms, p99 {:.1} ms",
        ms(pct(&mut from_change, 50)),
        ms(pct(&mut from_change, 99)),
    );
}
