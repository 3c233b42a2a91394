//! Traffic accounting end to end (issue 5): the real `connector` binary
//! (`support/agent.rs`), a real Xray core from the PyPI wheel with per-user counters, a
//! real Xray *client* core carrying known downloads as each user from a local HTTP
//! target, and a real HTTP panel that takes reports the way SPEC asks a panel to:
//! deduplicating on `report_id`, and counting the duplicates it saw
//! (`connector::sim::panel`, [`panel::Ledger`]).
//!
//! The one measure of success everywhere: the panel's deduplicated totals per user equal
//! the core's own counters, read through the test's own gRPC messages
//! ([`cores::user_counters`]) — exactly, byte for byte — and every duplicate the panel
//! saw is a re-send of a `report_id` it already had.
//!
//! - steady state, two nodes on one core told apart by `{node_id}` in the email
//!   template, reports split at `max_items`, `queuectl traffic`, and `--once`;
//! - the panel answering 500, hanging, resetting, and taking a report but losing its
//!   answer, each for several intervals, then recovering: every byte once, and each
//!   node's reports taken oldest first;
//! - the agent SIGKILLed at 24 random moments with traffic flowing;
//! - the core restarted mid-run: its new counters are counted from zero, its old ones
//!   not again;
//! - a user removed and re-added: their counters continue and are not counted twice.
//!
//! Nothing waits by sleeping, but for the random moments of the kill test: every wait
//! is for an event (a log line, a request reaching the panel, the ledger reaching the
//! core's counters) with a deadline only a hang reaches.

use crate::support::agent;
use crate::support::cores;
use crate::support::metrics;
use crate::support::panel;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::{Opts, Rig};
use cores::{Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User, require_peer};
use panel::{Answer, Ledger, REPORTS};
use uuid::Uuid;

/// `traffic.interval` in these tests.
const INTERVAL: &str = "300ms";
/// Deadline for the panel to reach the core's counters: only a hang reaches it.
const SETTLE: Duration = Duration::from_secs(60);

/// Bytes per download (the response body; the core counts headers too).
const CHUNK: usize = 64 * 1024;

struct Fixture {
    target: Target,
    core: Core,
    client: Client,
    rig: Rig,
}

/// A core with one vless inbound per node (`in-{id}`), the given panel users on each,
/// and a client with a route per (node, user) named `{email}@{node}`.
fn fixture(nodes: &[(u64, Vec<User>)], extra: &str, panel_timeout: &'static str) -> Fixture {
    let target = Target::start();
    let mut server = ServerConfig::new(Flavor::Xray);
    let mut routes = Vec::new();
    let mut opts = Opts {
        nodes: nodes.iter().map(|(id, _)| *id).collect(),
        panel_timeout,
        extra: format!(
            "[traffic]\nenabled = true\ninterval = {INTERVAL:?}\n{extra}\
             [queue.kinds.traffic_report]\nladder = [\"0s\", \"100ms\", \"200ms\"]\n"
        ),
        ..Opts::default()
    };
    for (id, users) in nodes {
        let inbound = Inbound::new(&format!("in-{id}"), Protocol::Vless, Vec::new());
        for u in users {
            routes.push(inbound.route(u).named(&route(u, *id)));
        }
        opts.node_keys.insert(
            *id,
            format!("inbound_tag = \"in-{id}\"\nprotocol = \"vless\"\n"),
        );
        server = server.with(inbound);
    }
    let core = Core::start(Flavor::Xray, server.json());
    opts.xray = Some(format!(
        "api = \"{}\"\nflavor = \"xray\"\ntimeout = \"5s\"\nemail_template = \"{{node_id}}:{{uuid}}\"\n",
        server.api_addr()
    ));
    let client = Client::start(routes);
    let rig = Rig::new(opts);
    for (id, users) in nodes {
        let ids: Vec<String> = users.iter().map(|u| u.uuid.to_string()).collect();
        rig.panel.set(*id, Answer::list(&ids));
    }
    Fixture {
        target,
        core,
        client,
        rig,
    }
}

fn route(u: &User, node: u64) -> String {
    format!("{}@{node}", u.email)
}

impl Fixture {
    /// Downloads `times` × [`CHUNK`] as `user` through `node`, waiting until the user
    /// gets through first (the agent adds users a moment after it starts).
    fn download(&mut self, user: &User, node: u64, times: usize) {
        let name = route(user, node);
        let url = self.target.bytes_url(CHUNK);
        self.client
            .wait_through(&name, &self.target.url(), SETTLE)
            .unwrap_or_else(|e| self.rig.fail(&format!("{name} never got through: {e}")));
        for _ in 0..times {
            let body = self
                .client
                .fetch(&name, &url)
                .unwrap_or_else(|e| self.rig.fail(&format!("{name}: {e}")));
            assert_eq!(body.len(), CHUNK);
        }
    }

    /// The core's counters as (node, uuid) → [up, down], through the template.
    fn core_totals(&self) -> BTreeMap<(u64, String), [u64; 2]> {
        cores::user_counters(&self.core)
            .unwrap_or_else(|e| self.rig.fail(&format!("QueryStats: {e}")))
            .into_iter()
            .filter_map(|(email, v)| {
                let (node, uuid) = email.split_once(':')?;
                Some(((node.parse().ok()?, uuid.to_string()), v))
            })
            .filter(|(_, v)| *v != [0, 0])
            .collect()
    }

    /// Waits until the panel's totals equal `expected()` (read after the ledger each
    /// time, so a total above it is an overcount, whenever it is seen).
    fn settle_on(
        &self,
        expected: impl Fn(&Fixture) -> BTreeMap<(u64, String), [u64; 2]>,
    ) -> Ledger {
        let deadline = Instant::now() + SETTLE;
        loop {
            let cursor = self.rig.panel.request_count();
            let ledger = self.rig.panel.ledger();
            let want = expected(self);
            for (k, got) in &ledger.totals {
                let w = want.get(k).copied().unwrap_or_default();
                if got[0] > w[0] || got[1] > w[1] {
                    self.rig.fail(&format!(
                        "overcount for {k:?}: the panel has {got:?}, the core counted {w:?}\nledger: {:?}",
                        ledger.totals
                    ));
                }
            }
            if ledger.totals == want {
                check_duplicates(&self.rig, &ledger);
                return ledger;
            }
            if Instant::now() > deadline {
                self.rig.fail(&format!(
                    "the panel never reached the core's counters.\npanel: {:?}\ncore:  {want:?}",
                    ledger.totals
                ));
            }
            // The next report (or the deadline's end of it).
            let _ = self
                .rig
                .panel
                .wait_request(cursor, Duration::from_secs(2), |r| r.node == REPORTS);
        }
    }

    fn settle(&self) -> Ledger {
        self.settle_on(Fixture::core_totals)
    }
}

/// Every duplicate is a re-send of a report the panel has.
fn check_duplicates(rig: &Rig, ledger: &Ledger) {
    for d in &ledger.duplicates {
        if !ledger.reports.contains_key(d) {
            rig.fail(&format!("duplicate {d} is not a report the panel has"));
        }
    }
    if !ledger.malformed.is_empty() {
        rig.fail(&format!("malformed reports: {:?}", ledger.malformed));
    }
}

/// Each node's reports were first taken in collection order.
fn check_oldest_first(rig: &Rig, ledger: &Ledger, node: u64) {
    let times: Vec<String> = ledger
        .order(node)
        .iter()
        .map(|id| {
            ledger.reports[id]["collected_at"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    if times != sorted {
        rig.fail(&format!(
            "node {node}'s reports were not taken oldest first: {times:?}"
        ));
    }
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn steady_state_reports_every_byte_per_node_split_and_once() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let alice = User::panel(Uuid::new_v4());
    let bob = User::panel(Uuid::new_v4());
    let carol = User::panel(Uuid::new_v4());
    // alice is on both nodes: her bytes on each must land on that node.
    let mut f = fixture(
        &[
            (1, vec![alice.clone(), bob.clone(), carol.clone()]),
            (2, vec![alice.clone()]),
        ],
        "max_items = 2\n",
        "5s",
    );
    f.rig.start();
    f.download(&alice, 1, 3);
    f.download(&bob, 1, 1);
    f.download(&carol, 1, 2);
    f.download(&alice, 2, 5);
    let ledger = f.settle();
    let a1 = ledger.totals[&(1, alice.uuid.to_string())];
    let a2 = ledger.totals[&(2, alice.uuid.to_string())];
    assert!(
        a1[1] >= 3 * CHUNK as u64 && a1[1] < 4 * CHUNK as u64,
        "{a1:?}"
    );
    assert!(
        a2[1] >= 5 * CHUNK as u64 && a2[1] < 6 * CHUNK as u64,
        "{a2:?}"
    );
    // Three users of node 1 with traffic, max_items 2: split, same collection.
    let node1: Vec<&serde_json::Value> = ledger
        .reports
        .values()
        .filter(|r| r["node_id"] == 1)
        .collect();
    assert!(
        node1
            .iter()
            .all(|r| r["items"].as_array().unwrap().len() <= 2)
    );
    let mut by_time: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &node1 {
        *by_time
            .entry(r["collected_at"].as_str().unwrap())
            .or_default() += r["items"].as_array().unwrap().len();
    }
    assert!(
        by_time.values().any(|&n| n > 2),
        "no collection of node 1 was split: {by_time:?}"
    );
    assert!(ledger.duplicates.is_empty(), "{:?}", ledger.duplicates);
    // The agent's own reports carried the token and the key.
    for r in f.rig.panel.requests().iter().filter(|r| r.node == REPORTS) {
        assert_eq!(r.token.as_deref(), Some(agent::TOKEN));
    }
    // Prometheus: the bytes the panel took, per node and direction, to the byte.
    let addr = f.rig.http_addr();
    let reported = |m: &metrics::Metrics, node: u64, direction| {
        m.get(
            "connector_traffic_reported_bytes_total",
            &[("node", &node.to_string()), ("direction", direction)],
        )
    };
    let sum = |node: u64, i: usize| ledger.node(node).values().map(|t| t[i]).sum::<u64>() as f64;
    let m = metrics::wait_for(addr, agent::WAIT, "the panel's totals", |m| {
        [1u64, 2].iter().all(|&n| {
            reported(m, n, "uplink") == Some(sum(n, 0))
                && reported(m, n, "downlink") == Some(sum(n, 1))
        })
    });
    for node in [1u64, 2] {
        let taken = ledger
            .reports
            .values()
            .filter(|r| r["node_id"] == node)
            .count() as f64;
        assert_eq!(
            m.value(
                "connector_traffic_reports_total",
                &[("node", &node.to_string()), ("outcome", "accepted")]
            ),
            taken,
            "{}",
            m.text
        );
    }
    assert_eq!(f.rig.stop(), Some(0));

    // queuectl: the delivered bytes per node match the panel's.
    let v = f.rig.queuectl(&["traffic", "--json"]);
    let nodes = v["nodes"].as_array().unwrap();
    for node in [1u64, 2] {
        let row = nodes.iter().find(|n| n["node"] == node).unwrap();
        let panel: u64 = ledger.node(node).values().map(|t| t[1]).sum();
        assert_eq!(row["delivered"]["download"], panel, "{v}");
        assert_eq!(row["pending"]["reports"], 0, "{v}");
    }

    // --once, with the agent stopped: more traffic, one collection, delivered.
    f.download(&bob, 1, 2);
    let out = agent::connector(f.rig.dir.path())
        .args(["--once", "--config"])
        .arg(&f.rig.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("traffic reported for 1 node"), "{stderr}");
    f.settle();
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_failing_panel_loses_nothing_and_counts_nothing_twice() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let alice = User::panel(Uuid::new_v4());
    let bob = User::panel(Uuid::new_v4());
    let mut f = fixture(&[(1, vec![alice.clone(), bob.clone()])], "", "1s");
    f.rig.start();
    f.download(&alice, 1, 1);
    f.settle();
    // Each failure for several intervals, traffic flowing through all of them.
    for bad in [
        Answer::Status(500),
        Answer::Hang,
        Answer::Reset,
        Answer::TakeThen(502),
    ] {
        f.rig.panel.set(REPORTS, bad.clone());
        for _ in 0..3 {
            let mark = f.rig.mark();
            f.download(&alice, 1, 1);
            f.download(&bob, 1, 1);
            f.rig.wait_log(mark, "a traffic collection", |v| {
                v["message"] == "traffic collected"
            });
        }
        // A failed delivery was attempted under this answer.
        let label = match &bad {
            Answer::Status(c) => c.to_string(),
            Answer::Hang => "hang".into(),
            Answer::Reset => "reset".into(),
            Answer::TakeThen(c) => format!("{c} took"),
            _ => unreachable!(),
        };
        f.rig
            .panel
            .wait_request(0, SETTLE, |r| {
                r.node == REPORTS && r.answered.starts_with(&label)
            })
            .unwrap_or_else(|e| f.rig.fail(&e));
    }
    // Nothing of the outage reached the panel's totals but what it took.
    f.rig.panel.set(REPORTS, Answer::Status(200));
    let ledger = f.settle();
    assert!(
        !ledger.duplicates.is_empty(),
        "the reports the panel took while losing its answer were never re-sent"
    );
    check_oldest_first(&f.rig, &ledger, 1);
    assert_eq!(f.rig.stop(), Some(0));
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn sigkill_at_random_moments_with_traffic_flowing_counts_every_byte_once() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let alice = User::panel(Uuid::new_v4());
    let bob = User::panel(Uuid::new_v4());
    let mut f = fixture(&[(1, vec![alice.clone(), bob.clone()])], "", "2s");
    f.rig.start();
    f.download(&alice, 1, 1);
    f.download(&bob, 1, 1);
    // Traffic throughout, on its own threads: a download every few ms per user.
    let stop = Arc::new(AtomicBool::new(false));
    let fetched = Arc::new(AtomicU64::new(0));
    let url = f.target.bytes_url(CHUNK);
    let pumps: Vec<_> = [&alice, &bob]
        .iter()
        .map(|u| {
            let socks = f.client.socks(&route(u, 1));
            let (stop, fetched, url) = (stop.clone(), fetched.clone(), url.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if cores::fetch_through(socks, &url).is_ok() {
                        fetched.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let seed: u64 = rand::random();
    eprintln!("kill seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let kills = 24;
    for i in 0..kills {
        // The panel alternates between taking reports and losing its answers, so kills
        // land during deliveries that did and did not count.
        f.rig.panel.set(
            REPORTS,
            if i % 3 == 2 {
                Answer::TakeThen(500)
            } else {
                Answer::Status(200)
            },
        );
        if f.rig.daemon.is_none() {
            f.rig.start();
            // The queue open, then a kill somewhere in the next ~2 intervals.
            f.rig.wait_log(0, "connector started", |v| {
                v["message"] == "connector started"
            });
        }
        let pause = rand::Rng::random_range(&mut rng, 0..900);
        std::thread::sleep(Duration::from_millis(pause));
        f.rig.kill9();
    }
    stop.store(true, Ordering::Relaxed);
    for p in pumps {
        p.join().unwrap();
    }
    f.rig.panel.set(REPORTS, Answer::Status(200));
    f.rig.start();
    let ledger = f.settle();
    eprintln!(
        "{kills} kills; {} downloads; {} reports taken, {} duplicates re-sent",
        fetched.load(Ordering::Relaxed),
        ledger.reports.len(),
        ledger.duplicates.len()
    );
    assert!(ledger.reports.len() > 3, "too few reports to mean anything");
    check_oldest_first(&f.rig, &ledger, 1);
    assert_eq!(f.rig.stop(), Some(0));
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_core_restart_counts_the_new_counters_from_zero_and_the_old_not_again() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let alice = User::panel(Uuid::new_v4());
    let mut f = fixture(&[(1, vec![alice.clone()])], "", "5s");
    f.rig.start();
    // Fewer bytes before than after: a restart taken for a counter merely reset by
    // someone would then count only the growth past the old value.
    f.download(&alice, 1, 2);
    let before = f.settle().totals;
    // Past the first seconds of uptime, so a restart shows in it (polling the core's
    // own clock: the event awaited is time passing).
    let uptime = |core: &Core| {
        cores::api_call::<_, cores::api::SysStatsResponse>(
            core,
            "stats.command.StatsService",
            "GetSysStats",
            cores::api::Empty {},
        )
        .map(|s| s.uptime)
        .unwrap_or(0)
    };
    while uptime(&f.core) < 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    // One more collection reads that uptime.
    f.rig.wait_syncs(1, "304", 3);
    let mark = f.rig.mark();
    f.core.restart();
    // The agent puts alice back; her new downloads are counted from zero.
    f.download(&alice, 1, 4);
    f.rig.wait_log(mark, "the restart noticed", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the core restarted since the last collection"))
    });
    let ledger = f.settle_on(|f| {
        let mut want = before.clone();
        for (k, v) in f.core_totals() {
            let t = want.entry(k).or_default();
            t[0] += v[0];
            t[1] += v[1];
        }
        want
    });
    let k = (1, alice.uuid.to_string());
    assert!(
        ledger.totals[&k][1] >= 6 * CHUNK as u64,
        "{:?}",
        ledger.totals
    );
    assert_eq!(f.rig.stop(), Some(0));
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_user_removed_and_readded_is_not_counted_twice() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let alice = User::panel(Uuid::new_v4());
    let bob = User::panel(Uuid::new_v4());
    let mut f = fixture(&[(1, vec![alice.clone(), bob.clone()])], "", "5s");
    f.rig.start();
    f.download(&alice, 1, 3);
    f.download(&bob, 1, 1);
    f.settle();
    // alice dropped by the panel: refused once applied; her counters stay in the core.
    let mark = f.rig.mark();
    f.rig.panel.set(1, Answer::list(&[bob.uuid.to_string()]));
    f.rig.wait_log(mark, "the removal applied", |v| {
        v["message"] == "applied" && v["node"] == 1 && v["users"] == 1
    });
    f.client
        .wait_refused(&route(&alice, 1), &f.target.url(), SETTLE)
        .unwrap_or_else(|e| f.rig.fail(&e));
    // A few collections while she is gone (syncs come every 200 ms, collections
    // every 300 ms).
    f.rig.wait_syncs(1, "304", 4);
    // Back: her counters continue from where they were.
    f.rig.panel.set(
        1,
        Answer::list(&[alice.uuid.to_string(), bob.uuid.to_string()]),
    );
    f.download(&alice, 1, 2);
    let ledger = f.settle();
    let a = ledger.totals[&(1, alice.uuid.to_string())];
    assert!(a[1] >= 5 * CHUNK as u64 && a[1] < 6 * CHUNK as u64, "{a:?}");
    let reported: BTreeSet<String> = ledger
        .reports
        .values()
        .flat_map(|r| r["items"].as_array().unwrap().clone())
        .filter_map(|i| i["uuid"].as_str().map(str::to_owned))
        .collect();
    assert!(reported.contains(&alice.uuid.to_string()));
    assert_eq!(f.rig.stop(), Some(0));
}
