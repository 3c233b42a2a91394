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
//! And what an operator's machine does to it (issue 12):
//!
//! - thousands of idle and half-sent-header connections from 127.0.0.1, against an
//!   agent whose open-file limit is 1024: it holds at most `http.max_connections` of
//!   them, and `/healthz` and `queuectl stats` answer meanwhile;
//! - a connection that sends nothing, half its headers, or half its body, and a
//!   keep-alive connection left idle, are closed within `http.header_timeout` /
//!   `http.idle_timeout`;
//! - a request in progress when SIGTERM arrives gets its answer;
//! - the reader of its log pipe going away (`connector run 2>&1 | head`) loses log
//!   lines, not the agent: it keeps syncing, and SIGTERM still exits 0.
//!
//! Webhook deliveries and traffic bytes are checked where those jobs run against their
//! real peers: `tests/it/webhook.rs` and `tests/it/traffic_report.rs`.

use crate::support::agent;
use crate::support::metrics;
use crate::support::panel;
use crate::support::wait;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// A long-running task of the daemon that dies (here: made to panic through the test
/// hook) is logged with its name and named on `/healthz`, which answers 503; the rest of
/// the daemon goes on, and stops cleanly.
#[test]
fn healthz_turns_503_naming_a_task_that_died() {
    let mut rig = Rig::new(Opts::default());
    let users = agent::uuids(2);
    rig.panel.set(1, Answer::list(&users));
    rig.start_with(|cmd| {
        cmd.env(
            connector::daemon::supervise::PANIC_TASK_ENV,
            "webhook stats fold",
        );
    });
    let addr = rig.http_addr();
    let (_, line) = rig.wait_log(0, "the task's end", |v| v["task"] == "webhook stats fold");
    assert_eq!(line["level"], "ERROR", "{line}");
    let (status, v) = healthz(addr);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["status"], "unhealthy");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    let problem = problems[0].as_str().unwrap();
    assert!(
        problem.contains("webhook stats fold") && problem.contains("panicked"),
        "{v}"
    );
    // The pools and the other tasks were not touched.
    assert_eq!(v["workers"]["node_sync"], "running");
    rig.wait_applied(0, 1, 1);
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

// ---- the HTTP listener under hostile clients (issue 12) ----

/// `GET path` with a deadline: `None` when no answer came within it.
fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> Option<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().timeout(limit).build().ok()?;
        let r = client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    })
}

/// Waits for node 1's next sync request after the first `after`, however answered
/// (`200`, then `304` while the list is unchanged); its index.
#[track_caller]
fn next_sync(rig: &Rig, after: usize) -> usize {
    match rig.panel.wait_request(after, WAIT, |r| r.node == 1) {
        Ok((i, _)) => i,
        Err(e) => rig.fail(&format!("no sync request came: {e}")),
    }
}

/// The agent's open file descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lifts this test process's own soft open-file limit to its hard limit (it opens
/// thousands of sockets).
fn raise_own_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `queuectl stats --json` with a deadline: whether it answered.
fn queuectl_stats_within(rig: &Rig, limit: Duration) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
    agent::scrub(&mut cmd);
    cmd.arg("--config")
        .arg(&rig.config)
        .args(["stats", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if wait::wait_exit(&mut child, limit).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("queuectl stats did not answer within {limit:?}"));
    }
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "queuectl stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("queuectl stats: {e}"))
}

/// The agent's open-file limit, set for its process before it starts: low enough that
/// the flood below would take every descriptor of an agent without a connection limit.
const AGENT_FD_LIMIT: u64 = 1024;

#[test]
fn a_flood_of_idle_and_half_sent_connections_leaves_health_and_admin_answering() {
    raise_own_fd_limit();
    let mut rig = Rig::new(Opts {
        // Long: the flood's connections stay open unless the agent makes room.
        http: "max_connections = 256\nheader_timeout = \"60s\"\n".into(),
        ..Opts::default()
    });
    rig.panel.set(1, Answer::list(&agent::uuids(2)));
    rig.start_with(|cmd| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child here.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: AGENT_FD_LIMIT,
                    rlim_max: AGENT_FD_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let addr = rig.http_addr();
    rig.wait_applied(0, 1, 1);
    let pid = rig.daemon().child.id();
    let baseline = fds(pid);
    let bound = baseline + 256 + 16;

    // 1,500 connections that send nothing, 1,500 that send half their headers: more
    // than the agent's whole descriptor table.
    let mut flood = Vec::new();
    let mut most = baseline;
    for i in 0..3000 {
        // An agent that stopped accepting fills its backlog: connecting times out.
        // The checks below then say what that did to it.
        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            break;
        };
        if i % 2 == 1 {
            // The agent may have closed it already to make room: that is fine.
            let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
        }
        flood.push(c);
        if i % 100 == 0 {
            most = most.max(fds(pid));
        }
    }
    most = most.max(fds(pid));

    // Meanwhile, with every flood connection still open on our side:
    let health = get_within(addr, "/healthz", Duration::from_secs(10));
    let stats = queuectl_stats_within(&rig, Duration::from_secs(15));
    most = most.max(fds(pid));
    if health.as_ref().map(|(s, _)| *s) != Some(200) {
        rig.fail(&format!("/healthz during the flood: {health:?}"));
    }
    if let Err(e) = &stats {
        rig.fail(&format!("the admin socket during the flood: {e}"));
    }
    if most > bound {
        rig.fail(&format!(
            "the agent held {most} descriptors during the flood (baseline {baseline}, http.max_connections 256)"
        ));
    }
    // It says once that it is at its limit, not once per connection.
    let full: Vec<String> = rig
        .daemon()
        .lines
        .all()
        .into_iter()
        .filter(|l| l.contains("at http.max_connections"))
        .collect();
    assert_eq!(full.len(), 1, "{full:?}");

    // Syncing went on, and once the flood is gone all is as before.
    next_sync(&rig, rig.panel.request_count());
    drop(flood);
    let (status, _) = healthz(addr);
    assert_eq!(status, 200);
    assert_eq!(rig.stop(), Some(0));
}

/// Reads from `c` until the agent closes it (EOF or a reset); the time that took, or
/// `None` after `limit`. What it sent before closing, if anything, is returned too.
fn closed_within(mut c: TcpStream, limit: Duration) -> Option<(Duration, String)> {
    let start = Instant::now();
    c.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Some((start.elapsed(), String::from_utf8_lossy(&got).into())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // A reset is a close too.
            Err(_) => return Some((start.elapsed(), String::from_utf8_lossy(&got).into())),
        }
        if start.elapsed() > limit {
            return None;
        }
    }
}

#[test]
fn slow_and_silent_connections_are_closed_by_the_timeouts() {
    let mut rig = Rig::new(Opts {
        http: "header_timeout = \"1s\"\nidle_timeout = \"1s\"\n".into(),
        ..Opts::default()
    });
    rig.start();
    let addr = rig.http_addr();
    let limit = Duration::from_secs(10);
    let connect = || TcpStream::connect(addr).unwrap();

    // Sends nothing at all.
    let silent = connect();
    // Half of its headers.
    let mut half_headers = connect();
    half_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    // All its headers, half its body.
    let mut half_body = connect();
    half_body
        .write_all(
            b"POST /v1/webhooks/connect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"event_id\":",
        )
        .unwrap();
    // One whole request, answered, then nothing: an idle keep-alive connection.
    let mut keep_alive = connect();
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    keep_alive.read_exact(&mut first).unwrap();
    assert_eq!(
        &first,
        b"HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&first)
    );

    for (what, c) in [
        ("a connection that sent nothing", silent),
        ("a connection with half its headers", half_headers),
        ("a request with half its body", half_body),
        ("an idle keep-alive connection", keep_alive),
    ] {
        match closed_within(c, limit) {
            Some((took, _)) => assert!(
                took < Duration::from_secs(5),
                "{what} was closed only after {took:?}"
            ),
            None => rig.fail(&format!("{what} was still open after {limit:?}")),
        }
    }
    // The listener still serves.
    assert_eq!(healthz(addr).0, 200);
    assert_eq!(rig.stop(), Some(0));
}

/// One whole answer (status line, headers, a `Content-Length` body) read from `c`;
/// what came before EOF or an error otherwise.
fn read_answer(c: &TcpStream) -> String {
    let mut r = BufReader::new(c);
    let mut text = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return text,
            Ok(_) => {}
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        text.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    if r.read_exact(&mut body).is_ok() {
        text.push_str(&String::from_utf8_lossy(&body));
    }
    text
}

#[test]
fn requests_in_progress_at_sigterm_get_their_answers() {
    let mut rig = Rig::new(Opts {
        // Long: only a request that is never finished would wait this out.
        shutdown_timeout: Some("60s"),
        ..Opts::default()
    });
    rig.start();
    let addr = rig.http_addr();
    let body = br#"{"event_id":"evt-shutdown-1","provider_id":"nobody","ts":1700000000}"#;
    let head = format!(
        "POST /v1/webhooks/connect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let connect = || {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c
    };
    // Headers and half the body: the handler is waiting for the rest.
    let (half, rest) = body.split_at(body.len() / 2);
    let mut half_body = connect();
    half_body.write_all(head.as_bytes()).unwrap();
    half_body.write_all(half).unwrap();
    // Half the headers: the request has begun, the handler not yet.
    let (half_head, rest_of_head) = head.split_at(head.len() / 2);
    let mut half_headers = connect();
    half_headers.write_all(half_head.as_bytes()).unwrap();
    // The same on a keep-alive connection's second request.
    let mut second = connect();
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answer = read_answer(&second);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    second.write_all(half_head.as_bytes()).unwrap();
    // An idle keep-alive connection: closing it at shutdown loses nobody's request.
    let mut idle = connect();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answer = read_answer(&idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The agent accepts in order and reads as data arrives: by the time /healthz has
    // answered on a later connection, it has read what the ones above sent.
    assert_eq!(healthz(addr).0, 200);

    let from = rig.mark();
    rig.signal("TERM");
    rig.wait_log(from, "the stopping line", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stopping"))
    });
    // A connection the agent closed fails these writes; the answer check says so.
    let _ = half_body.write_all(rest);
    for c in [&mut half_headers, &mut second] {
        let _ = c.write_all(rest_of_head.as_bytes());
        let _ = c.write_all(body);
    }
    for (what, c) in [
        ("a request with half its body", half_body),
        ("a request with half its headers", half_headers),
        (
            "a keep-alive connection's second request with half its headers",
            second,
        ),
    ] {
        let answer = read_answer(&c);
        if !answer.starts_with("HTTP/1.1 ") {
            rig.fail(&format!("{what} at SIGTERM got no answer: {answer:?}"));
        }
    }
    // The idle connection was closed, and did not hold the shutdown up.
    assert!(closed_within(idle, WAIT).is_some());
    assert_eq!(rig.wait_exit(), Some(0));
}

#[test]
fn a_closed_log_pipe_loses_lines_not_the_agent() {
    let mut rig = Rig::new(Opts::default());
    rig.panel.set(1, Answer::list(&agent::uuids(2)));
    let mut cmd = agent::connector(rig.dir.path());
    cmd.arg("run")
        .arg("--config")
        .arg(&rig.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Read a little, as `| head -c` does, then go away: both pipes' read ends close.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(!first.is_empty());
    drop(stderr);
    drop(child.stdout.take());
    let lines = agent::Lines::default();
    // Nothing more is read: the line list is complete as it is.
    lines.lock().1 = true;
    rig.daemon = Some(agent::Daemon {
        child: wait::Reaped(child),
        lines: std::sync::Arc::new(lines),
    });

    // Every sync logs; several more syncs after the pipe closed.
    let mut after = rig.panel.request_count();
    for _ in 0..5 {
        if rig.exited() {
            rig.fail("the agent exited after its log pipe closed");
        }
        after = next_sync(&rig, after) + 1;
    }
    assert!(!rig.exited(), "the agent exited after its log pipe closed");
    assert_eq!(rig.stop(), Some(0));
}
