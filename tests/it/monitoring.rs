//! Monitoring checked for real (issue 16 item 4): `deploy/prometheus/alerts.yml` and
//! `deploy/grafana/connector.json` against Debian's `prometheus` package
//! (`scripts/install-peers.sh` installs it):
//! - `promtool check rules` takes the rules;
//! - `promtool test rules deploy/prometheus/alerts_test.yml` makes every alert fire on one
//!   instance and not on another (and this file checks every alert has such a case);
//! - a real Prometheus scrapes a real daemon (real panel simulator, real Xray core with
//!   traffic through it, a real HTTPS relay that fails a callback to death and takes the
//!   next), evaluates every alert rule without error, and answers every dashboard query
//!   and every metric an alert reads with series.
//!
//! Under `CI=true` a missing `prometheus`/`promtool` fails these tests; elsewhere they
//! are skipped loudly.

use crate::support::agent::{self, Opts, Rig};
use crate::support::cores::{
    self, Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User,
};
use crate::support::metrics;
use crate::support::panel::Answer;
use crate::support::receiver::{self, Receiver};
use crate::support::wait::{self, Reaped};

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/connector.json";

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BEARER: &str = "monitoring-ingest-token";
/// Deadline for Prometheus to see something: a few scrapes at 1 s, generously.
const SEEN: Duration = Duration::from_secs(60);

/// The program `name` (from the `prometheus` package); like `require_peer`: missing
/// fails under `CI=true`, else skips loudly.
fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let test = std::thread::current()
            .name()
            .unwrap_or("this test")
            .to_string();
        let why = format!("no `{name}` on PATH (Debian's `prometheus` package)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test} needs {name} and CI=true: {why} (scripts/install-peers.sh installs it)");
        }
        cores::skipped(
            &test,
            &format!("{why}; run scripts/install-peers.sh as root"),
        );
    }
    found
}

fn file(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// `program args…`: (success, stdout + stderr).
fn run(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The alert names of alerts.yml, read as text (`- alert: Name`).
fn alert_names() -> Vec<String> {
    std::fs::read_to_string(file(ALERTS))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn promtool_checks_the_rules() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let (ok, out) = run(&promtool, &["check", "rules", ALERTS], Path::new(ROOT));
    assert!(ok, "promtool check rules {ALERTS}:\n{out}");
    let n = alert_names().len();
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

/// Each alert fires on the "bad" instance and not on the "good" one: promtool compares
/// the exact list of firing alerts at each evaluation time, so a case expecting `bad`
/// alone also fails when `good` fires.
#[test]
fn promtool_makes_every_alert_fire_and_not_fire() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let (ok, out) = run(
        &promtool,
        &["test", "rules", "alerts_test.yml"],
        &file("deploy/prometheus"),
    );
    assert!(ok, "promtool test rules {ALERTS_TEST}:\n{out}");
    // Every alert has a case in which it fires (a non-empty exp_alerts).
    let text = std::fs::read_to_string(file(ALERTS_TEST)).unwrap();
    let mut firing = BTreeSet::new();
    let mut current = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name.to_string());
        } else if line.starts_with("- exp_labels:")
            && let Some(name) = &current
        {
            firing.insert(name.clone());
        }
    }
    for name in alert_names() {
        assert!(
            firing.contains(&name),
            "{ALERTS_TEST} has no case in which {name} fires"
        );
    }
    assert!(
        text.contains("instance=\"good\""),
        "{ALERTS_TEST} has no healthy instance"
    );
}

// ---- the live check ----

/// A real Prometheus on a free port, scraping `target` every second and evaluating
/// alerts.yml every second, its storage in `dir`. Killed when dropped.
struct Prometheus {
    addr: SocketAddr,
    _child: Reaped,
    log: PathBuf,
}

impl Prometheus {
    fn start(program: &Path, dir: &Path, target: SocketAddr) -> Prometheus {
        let port = cores::free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{rules:?}]\n\
                 scrape_configs:\n  - job_name: connector\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
                rules = file(ALERTS).display().to_string(),
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: Reaped(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>?<params>`: the JSON answer, or `None` while Prometheus does
    /// not answer yet (connection refused).
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<Value> {
        let url =
            reqwest::Url::parse_with_params(&format!("http://{}/api/v1/{path}", self.addr), params)
                .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = reqwest::get(url).await.ok()?;
            serde_json::from_str(&r.text().await.ok()?).ok()
        })
    }

    /// An instant query: `Ok(result)` or `Err(what Prometheus said)`.
    fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let v = self
            .api("query", &[("query", q)])
            .ok_or_else(|| "no answer".to_string())?;
        if v["status"] != "success" {
            return Err(v.to_string());
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Until `q` returns series; `Err` with the last answer after [`SEEN`].
    fn wait_series(&self, q: &str) -> Result<Vec<Value>, String> {
        let mut last = String::new();
        wait::wait_for(SEEN, q, || match self.query(q) {
            Ok(r) if !r.is_empty() => Some(r),
            Ok(_) => {
                last = "no series".into();
                None
            }
            Err(e) => {
                last = e;
                None
            }
        })
        .map_err(|_| last)
    }
}

/// The metric names in a PromQL expression, each with the label names its matchers use:
/// `name{a="x", b=~"y"}` → (name, [a, b]). Enough PromQL for our own expressions:
/// names are `connector_…`, matchers are `label op "value"`.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("connector_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let after = &tail[end..];
        let mut labels = Vec::new();
        let mut consumed = end;
        if let Some(body) = after.strip_prefix('{') {
            let close = body.find('}').expect("a closed selector");
            for m in body[..close].split(',') {
                let label: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !label.is_empty() {
                    labels.push(label);
                }
            }
            consumed += close + 2;
        }
        out.push((name, labels));
        rest = &tail[consumed..];
    }
    out
}

/// A raw `POST /v1/webhooks/connect` with the bearer token: the status.
fn post_event(addr: SocketAddr, event_id: &str) -> u16 {
    let body = json!({
        "relay_id": "myrelay",
        "status": "success",
        "ref": "promo2024",
        "key": "sk-live-7Qm2ZbT9xWc4Lp0NfRj8VhYs",
        "client": {"version": "1.2.0", "platform": "macos"},
        "event_id": event_id,
        "timestamp": "2026-01-05T12:00:00Z",
    })
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(agent::WAIT)).unwrap();
    let head = format!(
        "POST /v1/webhooks/connect HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {BEARER}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {out:?}"))
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_real_prometheus_scraping_the_daemon_evaluates_every_alert_and_dashboard_query() {
    let Some(_) = cores::require_peer(Flavor::Xray) else {
        return;
    };
    let Some(prometheus) = require_tool("prometheus") else {
        return;
    };
    // A node whose users the agent applies to a real core, with traffic through it.
    let alice = User::new("alice");
    let inbound = Inbound::new("node-1", Protocol::Vless, Vec::new());
    // Its access log, so that bans cut connections (and their metrics are there).
    let logs = tempfile::tempdir().unwrap();
    let access_log = logs.path().join("access.log");
    let server = ServerConfig::new(Flavor::Xray)
        .with(inbound.clone())
        .access_log(&access_log);
    let _core = Core::start(Flavor::Xray, server.json());
    let target = Target::start();
    let mut client = Client::start(vec![inbound.route(&alice).named("alice")]);
    // A relay that fails the first callback to death, then takes the next.
    let relay = Receiver::start();
    relay.plan(vec![receiver::Answer::Status(500); 3]);
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers");
    std::fs::create_dir_all(&providers).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &relay.ca_pem).unwrap();
    std::fs::write(
        providers.join("myrelay.json"),
        json!({"id": "myrelay", "name": "relay", "webhook": {
            "callback_url": relay.url("/cb"), "secret": SECRET}})
        .to_string(),
    )
    .unwrap();
    let mut opts = Opts {
        xray: Some(format!(
            "api = \"{}\"\nflavor = \"xray\"\ntimeout = \"5s\"\naccess_log = {access_log:?}\ncut_connections = true\n",
            server.api_addr()
        )),
        http: format!("token = {BEARER:?}\n"),
        extra: format!(
            "[traffic]\nenabled = true\ninterval = \"300ms\"\n\
             [webhook]\nproviders_dir = {providers:?}\nca_file = {ca:?}\nreload_interval = \"100ms\"\n\
             [queue.kinds.webhook]\nladder = [\"0s\", \"10ms\", \"10ms\"]\n",
            ca = dir.path().join("ca.pem"),
        ),
        ..Opts::default()
    };
    opts.node_keys
        .insert(1, "inbound_tag = \"node-1\"\nprotocol = \"vless\"\n".into());
    let mut rig = Rig::new(opts);
    rig.panel.set(1, Answer::list(&[alice.uuid.to_string()]));
    rig.start();
    let addr = rig.http_addr();
    client
        .wait_through("alice", &target.url(), agent::WAIT)
        .unwrap_or_else(|e| rig.fail(&format!("alice never got through: {e}")));
    client
        .fetch("alice", &target.bytes_url(64 * 1024))
        .unwrap_or_else(|e| rig.fail(&format!("alice's download: {e}")));
    assert_eq!(post_event(addr, "evt-dies"), 202);
    metrics::wait_for(addr, agent::WAIT, "the dead callback", |m| {
        m.get("connector_ladder_exhausted_total", &[("kind", "webhook")]) == Some(1.0)
    });
    assert_eq!(post_event(addr, "evt-delivered"), 202);
    metrics::wait_for(
        addr,
        agent::WAIT,
        "traffic reported and a callback delivered",
        |m| {
            m.get(
                "connector_webhook_deliveries_total",
                &[("relay", "myrelay"), ("outcome", "delivered")],
            ) == Some(1.0)
                && m.get(
                    "connector_traffic_reports_total",
                    &[("node", "1"), ("outcome", "accepted")],
                )
                .is_some()
        },
    );
    // alice is banned: the ban, its cut, and their metrics.
    rig.panel.set(1, Answer::list::<&str>(&[]));
    metrics::wait_for(addr, agent::WAIT, "the ban's cut", |m| {
        m.get("connector_connections_cut_total", &[("node", "1")])
            .is_some()
    });

    let prom_dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&prometheus, prom_dir.path(), addr);
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- prometheus log:\n{}\n--- agent:\n{}",
            prom.log(),
            rig.report()
        )
    };
    // The event: Prometheus reports its one target up.
    let up = wait::wait_for(SEEN, "the scrape target up", || {
        let v = prom.api("targets", &[])?;
        let t = v["data"]["activeTargets"].as_array()?.first()?.clone();
        (t["health"] == "up").then_some(t)
    });
    if up.is_err() {
        fail("Prometheus never scraped the daemon");
    }

    // Every alert rule loaded and evaluated by Prometheus itself without error. A rule
    // is evaluated every second; `health` is `unknown` until its first evaluation.
    let rules = wait::wait_for(SEEN, "every rule evaluated", || {
        let v = prom.api("rules", &[])?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules
            .iter()
            .all(|r| r["health"] != "unknown")
            .then_some(rules)
    })
    .unwrap_or_else(|_| fail("the rules were never all evaluated"));
    let names: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert_eq!(
        names,
        alert_names().into_iter().collect(),
        "the rules Prometheus loaded"
    );
    let mut problems = Vec::new();
    let mut exprs = Vec::new();
    for r in &rules {
        if r["health"] != "ok" {
            problems.push(format!(
                "rule {}: {} {}",
                r["name"], r["health"], r["lastError"]
            ));
        }
        let q = r["query"].as_str().unwrap_or_default().to_string();
        if let Err(e) = prom.query(&q) {
            problems.push(format!("rule {}: {q}: {e}", r["name"]));
        }
        exprs.push((format!("rule {}", r["name"]), q));
    }

    // Alert expressions compare, and on a healthy daemon they rightly return nothing;
    // so "returns series" is asked of what they read: every metric an alert names
    // returns series, and carries every label the alert's matchers filter on. (Asking
    // for the matchers' values too would need every failure to have happened: a
    // `outcome="failed"` traffic report, say, which a healthy run never has.)
    //
    // The dashboard's queries are what an operator looks at on a healthy daemon: each
    // must return series itself (`$__rate_interval` as Grafana fills it for 1 s scrapes,
    // `$instance` as "All").
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(file(DASHBOARD)).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            queries.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("")),
                q,
            ));
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    let mut seen = BTreeSet::new();
    for (what, q) in &queries {
        if let Err(e) = prom.wait_series(q) {
            problems.push(format!("{what}: {q}: {e}"));
        }
    }
    for (what, q) in exprs.iter().chain(&queries) {
        for (name, labels) in selectors(q) {
            if !seen.insert((name.clone(), labels.clone())) {
                continue;
            }
            match prom.wait_series(&name) {
                Ok(series) => {
                    for l in &labels {
                        if !series.iter().any(|s| s["metric"].get(l).is_some()) {
                            problems.push(format!("{what}: {name} has no label {l}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("{what}: {name}: {e}")),
            }
        }
    }
    if !problems.is_empty() {
        fail(&format!(
            "against a real Prometheus:\n  {}",
            problems.join("\n  ")
        ));
    }
    drop(prom);
    assert_eq!(rig.stop(), Some(0));
}

#[test]
fn selectors_are_read_with_their_matchers() {
    assert_eq!(
        selectors(
            "sum by (k) (rate(connector_a_total{instance=~\"$i\", outcome=\"f\"}[1m])) / connector_b"
        ),
        vec![
            (
                "connector_a_total".to_string(),
                vec!["instance".into(), "outcome".into()]
            ),
            ("connector_b".to_string(), vec![])
        ]
    );
}
