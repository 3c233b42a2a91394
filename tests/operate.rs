//! Watching the agent as an operator's Prometheus and supervisor do (issue 7): the real
//! `connector` daemon against a real HTTP panel, its `GET /metrics` read with a
//! Prometheus text parser, its `GET /healthz`, and `queuectl workers|pause|resume`.
//!
//! - the metrics parse, every sample has its HELP and TYPE, and they move when jobs
//!   move: syncs and applies counted, users per node, a failing node's attempts and
//!   its ladder running out, a list that grows;
//! - `/healthz` is 200 while every worker pool runs, 503 naming the pool when an
//!   operator pauses one (its jobs wait, and the oldest ready job's age grows), 200
//!   again after `resume`, and the paused kind's work then gets done.
//!
//! Webhook deliveries and traffic bytes are checked where those jobs run against their
//! real peers: `tests/webhook.rs` and `tests/traffic_report.rs`.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/metrics.rs"]
mod metrics;
#[path = "support/panel.rs"]
mod panel;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use agent::{Opts, Rig, WAIT};
use metrics::get;
use panel::Answer;

fn healthz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = get(addr, "/healthz");
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {body}"));
    (status, v)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn metrics_parse_and_move_when_jobs_move() {
    let mut rig = Rig::new(Opts {
        nodes: vec![1, 2],
        // Two rungs: node 2's failures run its ladder out quickly.
        sync_ladder: Some(r#"["0s", "50ms"]"#),
        ..Opts::default()
    });
    let users = agent::uuids(5);
    rig.panel.set(1, Answer::list(&users[..3]));
    rig.panel.set(2, Answer::Status(500));
    rig.start();
    let addr = rig.http_addr();
    rig.wait_applied(0, 1, 1);

    let m = metrics::wait_for(addr, WAIT, "node 2's ladder running out", |m| {
        m.get("connector_ladder_exhausted_total", &[("kind", "node_sync")])
            .is_some_and(|n| n >= 1.0)
    });
    for (name, kind) in [
        ("connector_attempts_total", "counter"),
        ("connector_ladder_exhausted_total", "counter"),
        ("connector_jobs", "gauge"),
        ("connector_node_users_applied", "gauge"),
        ("connector_attempt_duration_seconds", "histogram"),
        ("connector_job_latency_seconds", "histogram"),
    ] {
        assert_eq!(m.kind_of(name), kind, "{name}");
    }
    // Every kind and state is there, zeros included.
    for kind in ["node_sync", "xray_apply", "traffic_report", "webhook"] {
        for state in ["scheduled", "ready", "running", "done", "dead"] {
            m.value("connector_jobs", &[("kind", kind), ("state", state)]);
        }
        m.value("connector_oldest_ready_job_age_seconds", &[("kind", kind)]);
    }
    assert!(
        m.value(
            "connector_jobs",
            &[("kind", "node_sync"), ("state", "done")]
        ) >= 1.0
    );
    assert!(
        m.value(
            "connector_jobs",
            &[("kind", "xray_apply"), ("state", "done")]
        ) >= 1.0
    );
    assert!(
        m.value(
            "connector_attempts_total",
            &[("kind", "node_sync"), ("outcome", "done")]
        ) >= 1.0
    );
    assert!(
        m.value(
            "connector_attempts_total",
            &[("kind", "node_sync"), ("outcome", "failed")]
        ) >= 2.0
    );
    let applies = m.value(
        "connector_attempts_total",
        &[("kind", "xray_apply"), ("outcome", "done")],
    );
    assert!(applies >= 1.0);
    assert_eq!(
        m.value("connector_node_users_allowed", &[("node", "1")]),
        3.0
    );
    assert_eq!(
        m.value("connector_node_users_applied", &[("node", "1")]),
        3.0
    );
    assert_eq!(m.value("connector_node_sync_held", &[("node", "1")]), 0.0);
    let synced = m.value(
        "connector_node_last_sync_success_timestamp_seconds",
        &[("node", "1")],
    );
    assert!((unix_now() - synced).abs() < 30.0, "last sync at {synced}");
    // Node 2 never read a usable answer: no time, no users.
    assert_eq!(
        m.get(
            "connector_node_last_sync_success_timestamp_seconds",
            &[("node", "2")]
        ),
        None
    );
    assert_eq!(
        m.get("connector_node_users_applied", &[("node", "2")]),
        None
    );
    assert_eq!(m.value("connector_quarantined_records", &[]), 0.0);
    for kind in ["node_sync", "xray_apply", "webhook"] {
        assert_eq!(m.value("connector_worker_pool_up", &[("kind", kind)]), 1.0);
    }
    assert!(m.value("connector_job_latency_seconds", &[("kind", "xray_apply")]) >= 1.0);

    // The list grows and node 2's panel recovers: the numbers follow.
    let from = rig.mark();
    rig.panel.set(1, Answer::list(&users));
    rig.panel.set(2, Answer::list(&users[..1]));
    rig.wait_applied(from, 1, 2);
    rig.wait_applied(from, 2, 1);
    let m = metrics::wait_for(addr, WAIT, "the new lists", |m| {
        m.get("connector_node_users_applied", &[("node", "1")]) == Some(5.0)
            && m.get("connector_node_users_applied", &[("node", "2")]) == Some(1.0)
    });
    assert!(
        m.value(
            "connector_attempts_total",
            &[("kind", "xray_apply"), ("outcome", "done")]
        ) >= applies + 2.0
    );
    assert!(
        m.get(
            "connector_node_last_sync_success_timestamp_seconds",
            &[("node", "2")]
        )
        .is_some()
    );
    assert_eq!(rig.stop(), Some(0));
}

#[test]
fn healthz_turns_503_naming_a_paused_pool() {
    let mut rig = Rig::new(Opts::default());
    let users = agent::uuids(4);
    rig.panel.set(1, Answer::list(&users[..2]));
    rig.start();
    let addr = rig.http_addr();
    rig.wait_applied(0, 1, 1);

    let (status, v) = healthz(addr);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["queue"], "ok");
    assert_eq!(v["workers"]["node_sync"], "running");
    assert_eq!(v["workers"]["xray_apply"], "running");
    // No provider files: nothing to deliver to, and that is healthy.
    assert_eq!(v["workers"]["webhook"], "waiting");
    assert_eq!(v["problems"], serde_json::json!([]));

    let paused = rig.queuectl(&["pause", "xray_apply", "--json"]);
    assert_eq!(paused["changed"], true, "{paused}");
    let (status, v) = healthz(addr);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["workers"]["xray_apply"], "paused");
    assert_eq!(v["workers"]["node_sync"], "running");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains("xray_apply workers are paused"),
        "{v}"
    );
    let workers = rig.queuectl(&["workers", "--json"]);
    let by_kind: BTreeMap<String, String> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["kind"].as_str().unwrap().to_string(),
                w["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_kind["xray_apply"], "paused", "{workers}");
    assert_eq!(by_kind["node_sync"], "running", "{workers}");
    // Pausing twice changes nothing and says so.
    assert_eq!(
        rig.queuectl(&["pause", "xray_apply", "--json"])["changed"],
        false
    );

    // Syncs go on; the applies they cause wait, and the metrics show them waiting.
    rig.panel.set(1, Answer::list(&users));
    let m = metrics::wait_for(addr, WAIT, "an apply waiting while paused", |m| {
        m.get(
            "connector_jobs",
            &[("kind", "xray_apply"), ("state", "ready")],
        ) == Some(1.0)
            && m.get(
                "connector_oldest_ready_job_age_seconds",
                &[("kind", "xray_apply")],
            )
            .is_some_and(|age| age > 0.2)
    });
    assert_eq!(
        m.value("connector_worker_pool_up", &[("kind", "xray_apply")]),
        0.0
    );
    assert_eq!(
        m.value("connector_node_users_allowed", &[("node", "1")]),
        4.0
    );
    assert_eq!(
        m.value("connector_node_users_applied", &[("node", "1")]),
        2.0
    );

    let from = rig.mark();
    assert_eq!(
        rig.queuectl(&["resume", "xray_apply", "--json"])["changed"],
        true
    );
    rig.wait_applied(from, 1, 2);
    let (status, v) = healthz(addr);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["workers"]["xray_apply"], "running");
    metrics::wait_for(addr, WAIT, "the apply done after resume", |m| {
        m.get("connector_node_users_applied", &[("node", "1")]) == Some(4.0)
            && m.get("connector_worker_pool_up", &[("kind", "xray_apply")]) == Some(1.0)
    });
    assert_eq!(rig.stop(), Some(0));

    // Without a daemon there are no workers: a clear error, exit 1.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
    agent::scrub(&mut cmd);
    let out = cmd
        .arg("--config")
        .arg(&rig.config)
        .args(["pause", "xray_apply"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("worker pools exist only in a running daemon"),
        "{stderr}"
    );
}
