//! `connector doctor` (issue 16, item 1) against real peers: the real Xray core (and
//! V2Ray), a real client core driving real traffic, the panel simulator, provider files,
//! a real daemon. A correct setup passes with every check `✓`; each broken setting gives
//! its own `✗` (and only that one) and exit 1; the key never appears in the output.

use crate::support::agent::{self, Daemon, TOKEN, WAIT};
use crate::support::cores::{
    self, Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User, require_peer,
};
use crate::support::panel::{Answer, Panel};
use crate::support::wait;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use uuid::Uuid;

/// A node's setup: a core with inbounds `node-1` (vless, one panel user) and `node-2`
/// (vless, nobody), its access log, a panel that lists the user for node 1, and the
/// settings a test changes before writing the config.
struct Setup {
    dir: tempfile::TempDir,
    panel: Panel,
    server: ServerConfig,
    core: Core,
    user: User,
    target: Target,
    /// Keys of the config, by section (`""` is the top level): a test overrides one.
    keys: BTreeMap<&'static str, BTreeMap<&'static str, String>>,
    /// `[[nodes]]` entries, each its TOML keys.
    nodes: Vec<String>,
    /// A command the doctor is run under (`setpriv …`), when not empty.
    wrapper: Vec<String>,
}

fn q(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

impl Setup {
    /// `adjust` may change the core's config (its JSON) before it starts.
    fn start(flavor: Flavor, adjust: impl FnOnce(&mut Value)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let user = User::panel(Uuid::new_v4());
        let server = ServerConfig::new(flavor)
            .with(Inbound::new("node-1", Protocol::Vless, vec![user.clone()]))
            .with(Inbound::new("node-2", Protocol::Vless, vec![]));
        let access = dir.path().join("access.log");
        let mut json = server.json();
        json["log"]["access"] = Value::String(access.display().to_string());
        adjust(&mut json);
        let core = Core::start(flavor, json);
        let panel = Panel::start(TOKEN);
        panel.set(1, Answer::list(&[user.uuid.to_string()]));
        std::fs::create_dir_all(dir.path().join("providers")).unwrap();
        std::fs::write(
            dir.path().join("providers/good.json"),
            r#"{"id":"good","name":"Good","webhook":{"callback_url":"https://relay.example/cb","secret":"whsec_c2VjcmV0c2VjcmV0c2VjcmV0"}}"#,
        )
        .unwrap();
        let mut keys: BTreeMap<&'static str, BTreeMap<&'static str, String>> = BTreeMap::new();
        let mut set = |section, key, value: String| {
            keys.entry(section).or_default().insert(key, value);
        };
        set(
            "",
            "data_dir",
            q(dir.path().join("data").display().to_string()),
        );
        set(
            "http",
            "listen",
            q(format!("127.0.0.1:{}", cores::free_port())),
        );
        set("panel", "base_url", q(panel.base_url()));
        set("panel", "internal_api_key", q(TOKEN));
        set("panel", "timeout", q("3s"));
        set(
            "sync",
            "output_dir",
            q(dir.path().join("out").display().to_string()),
        );
        set("xray", "api", q(server.api_addr().to_string()));
        set(
            "xray",
            "flavor",
            q(match flavor {
                Flavor::Xray => "xray",
                Flavor::V2ray => "v2ray",
            }),
        );
        set("xray", "timeout", q("3s"));
        set("xray", "access_log", q(access.display().to_string()));
        set("xray", "cut_connections", "true".into());
        set(
            "webhook",
            "providers_dir",
            q(dir.path().join("providers").display().to_string()),
        );
        Setup {
            dir,
            panel,
            server,
            core,
            user,
            target: Target::start(),
            keys,
            nodes: vec![node(1)],
            wrapper: Vec::new(),
        }
    }

    fn set(&mut self, section: &'static str, key: &'static str, value: String) {
        self.keys.entry(section).or_default().insert(key, value);
    }

    /// Real traffic of the node-1 user through a real client core: counters and
    /// access-log lines as a user's would be.
    fn traffic(&self) -> Client {
        let mut client = Client::start(vec![self.server.inbound("node-1").route(&self.user)]);
        let url = format!("http://{}/bytes/50000", self.target.addr);
        client
            .wait_through(&self.user.email, &url, WAIT)
            .unwrap_or_else(|e| panic!("the user's traffic does not get through: {e}"));
        client
    }

    fn config(&self) -> PathBuf {
        let mut text = String::new();
        for (section, keys) in &self.keys {
            if !section.is_empty() {
                text.push_str(&format!("[{section}]\n"));
            }
            for (k, v) in keys {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        for n in &self.nodes {
            text.push_str(&format!("[[nodes]]\n{n}"));
        }
        let path = self.dir.path().join("connector.toml");
        agent::write_private(&path, &text);
        path
    }

    fn doctor(&self, json: bool) -> Out {
        let config = self.config();
        let mut cmd = match self.wrapper.split_first() {
            None => agent::connector(self.dir.path()),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(env!("CARGO_BIN_EXE_connector"));
                agent::scrub(&mut cmd);
                cmd.current_dir(self.dir.path())
                    .arg("--log-format")
                    .arg("json");
                cmd
            }
        };
        cmd.arg("--config").arg(&config).arg("doctor");
        if json {
            cmd.arg("--json");
        }
        Out::of(cmd, &self.core)
    }

    /// `--json`, and the plain lines too: both must hold the same verdict.
    fn checks(&self) -> Out {
        let plain = self.doctor(false);
        let out = self.doctor(true);
        assert_eq!(plain.code, out.code, "{plain}{out}");
        out.assert_no_secret();
        plain.assert_no_secret();
        out
    }
}

fn node(id: u64) -> String {
    format!("id = {id}\ninbound_tag = \"node-{id}\"\nprotocol = \"vless\"\n")
}

/// One run of `connector doctor`.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    core: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n--- exit {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- core\n{}\n",
            self.code, self.stdout, self.stderr, self.core
        )
    }
}

impl Out {
    fn of(mut cmd: Command, core: &Core) -> Out {
        let out = cmd.output().expect("connector runs");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            core: core.dump(),
        }
    }

    fn items(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("doctor --json printed no JSON array ({e}){self}"));
        let items = v.as_array().cloned().expect("an array");
        for i in &items {
            for k in ["check", "status", "detail", "fix"] {
                assert!(i.get(k).is_some(), "item without {k}: {i}{self}");
            }
        }
        items
    }

    /// The checks with this status.
    fn with(&self, status: &str) -> Vec<String> {
        self.items()
            .iter()
            .filter(|i| i["status"] == status)
            .map(|i| i["check"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn item(&self, check: &str) -> Value {
        self.items()
            .into_iter()
            .find(|i| i["check"] == check)
            .unwrap_or_else(|| panic!("no check {check:?}{self}"))
    }

    fn assert_no_secret(&self) {
        for secret in [TOKEN, "wrong-key-9f2c", "c2VjcmV0c2VjcmV0c2VjcmV0"] {
            assert!(
                !self.stdout.contains(secret) && !self.stderr.contains(secret),
                "a secret is printed{self}"
            );
        }
    }

    /// Exit 1, and `check` is the one failed check.
    #[track_caller]
    fn assert_only_failure(&self, check: &str, says: &str) {
        assert_eq!(self.code, Some(1), "{self}");
        assert_eq!(self.with("fail"), vec![check.to_string()], "{self}");
        let item = self.item(check);
        let detail = item["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(says),
            "{check}: {detail:?} lacks {says:?}{self}"
        );
        assert!(
            item["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "{check} has no fix{self}"
        );
    }
}

/// Whether this test process has CAP_NET_ADMIN (the doctor it starts inherits it).
fn net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    u64::from_str_radix(&hex, 16).unwrap() & (1 << 12) != 0
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_correct_setup_passes_every_check() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();
    let plain = s.doctor(false);
    let out = s.checks();
    if !net_admin() {
        out.assert_only_failure("CAP_NET_ADMIN", "missing");
        return;
    }
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.with("fail").is_empty() && out.with("warn").is_empty(),
        "{out}"
    );
    for check in [
        "config",
        "data_dir",
        "queue",
        "http listener",
        "panel",
        "panel key",
        "node 1",
        "core API",
        "core HandlerService",
        "core StatsService",
        "node 1 inbound",
        "node 1 traffic counters",
        "access log",
        "CAP_NET_ADMIN",
        "providers",
    ] {
        assert_eq!(out.item(check)["status"], "ok", "{check}{out}");
    }
    assert!(
        out.item("node 1 traffic counters")["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 of 1 applied users"),
        "{out}"
    );
    // One line per check, each with its mark, and the key masked in the config line.
    let lines: Vec<&str> = plain.stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), out.items().len() + 1, "{plain}");
    assert!(
        lines
            .iter()
            .take(out.items().len())
            .all(|l| l.starts_with("✓ ")),
        "{plain}"
    );
    assert!(plain.stdout.contains("key ***"), "{plain}");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn the_panel_unreachable_wrong_key_unknown_node_and_garbage_each_fail() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();

    s.set("panel", "internal_api_key", q("wrong-key-9f2c"));
    s.checks().assert_only_failure("panel key", "401");
    s.set("panel", "internal_api_key", q(TOKEN));

    s.nodes.push(node(2));
    s.checks().assert_only_failure("node 2", "404");
    s.nodes.pop();

    s.panel
        .set(1, Answer::Raw("<html>maintenance</html>".into()));
    s.checks().assert_only_failure("node 1", "not a user list");
    s.panel.set(1, Answer::list(&[s.user.uuid.to_string()]));

    let closed = format!("http://127.0.0.1:{}", cores::free_port());
    s.set("panel", "base_url", q(&closed));
    s.checks().assert_only_failure("panel", "cannot connect");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn the_core_unreachable_wrong_flavour_missing_inbound_and_wrong_protocol_each_fail() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();

    s.set("xray", "flavor", q("v2ray"));
    s.checks().assert_only_failure("core flavor", "is Xray");
    s.set("xray", "flavor", q("xray"));

    s.nodes = vec!["id = 1\ninbound_tag = \"nope\"\nprotocol = \"vless\"\n".into()];
    s.checks()
        .assert_only_failure("node 1 inbound", "no inbound tagged `nope`");

    s.nodes = vec!["id = 1\ninbound_tag = \"node-1\"\nprotocol = \"vmess\"\n".into()];
    s.checks()
        .assert_only_failure("node 1 inbound", "is a vless inbound");
    s.nodes = vec![node(1)];

    s.set(
        "xray",
        "api",
        q(format!("127.0.0.1:{}", cores::free_port())),
    );
    s.checks().assert_only_failure("core API", "cannot reach");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn user_stats_off_is_told_from_users_without_traffic() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    // The core counts no user: no policy levels.
    let s = Setup::start(Flavor::Xray, |json| {
        json.as_object_mut().unwrap().remove("policy");
    });
    // Before any traffic it cannot be told: `!`, not `✗`.
    let out = s.checks();
    assert_eq!(
        out.item("node 1 traffic counters")["status"],
        "warn",
        "{out}"
    );
    // The user's connections are in the access log, yet no counter: stats are off.
    let _client = s.traffic();
    s.checks().assert_only_failure(
        "node 1 traffic counters",
        "statsUserUplink/statsUserDownlink is off",
    );
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn user_stats_off_shows_against_the_inbounds_own_counters() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    // No user counters, but the inbound counts its traffic; no access log is read.
    let mut s = Setup::start(Flavor::Xray, |json| {
        json["policy"] = serde_json::json!({
            "system": {"statsInboundUplink": true, "statsInboundDownlink": true}
        });
    });
    s.keys.get_mut("xray").unwrap().remove("access_log");
    s.set("xray", "cut_connections", "false".into());
    let _client = s.traffic();
    s.checks()
        .assert_only_failure("node 1 traffic counters", "inbound `node-1` has carried");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn cuts_without_cap_net_admin_fail() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    if !net_admin() || Command::new("setpriv").arg("--version").output().is_err() {
        cores::skipped(
            "doctor::cuts_without_cap_net_admin_fail",
            "needs CAP_NET_ADMIN to drop and setpriv (util-linux)",
        );
        return;
    }
    let mut s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();
    s.wrapper = ["setpriv", "--bounding-set", "-net_admin", "--"]
        .map(String::from)
        .to_vec();
    s.checks().assert_only_failure("CAP_NET_ADMIN", "missing");
    // Without cuts, the capability is not asked for.
    s.set("xray", "cut_connections", "false".into());
    let out = s.checks();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.items().iter().all(|i| i["check"] != "CAP_NET_ADMIN"),
        "{out}"
    );
}

/// A read-only tmpfs mounted on a directory, unmounted when dropped.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(dir: PathBuf) -> Option<ReadOnlyMount> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(ReadOnlyMount(dir))
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn an_unusable_access_log_fails_when_cuts_are_on() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();
    let missing = s.dir.path().join("no-such.log");
    s.set("xray", "access_log", q(missing.display().to_string()));
    s.checks().assert_only_failure("access log", "No such file");
    // A directory where the file should be: root reads anything, but not that.
    s.set("xray", "access_log", q(s.dir.path().display().to_string()));
    s.checks().assert_only_failure("access log", "cannot read");
    // Without cuts, the same log is only a warning.
    s.set("xray", "cut_connections", "false".into());
    let out = s.checks();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.item("access log")["status"], "warn", "{out}");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn data_dir_provider_and_listener_faults_each_fail() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();

    // A file where the directory should be (tests run as root, which permission bits
    // do not stop).
    let file = s.dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let data = q(s.dir.path().join("data").display().to_string());
    s.set("", "data_dir", q(file.display().to_string()));
    s.checks()
        .assert_only_failure("data_dir", "is not a directory");
    // A read-only file system, which root cannot write either (mounting needs root).
    let ro = s.dir.path().join("ro");
    match ReadOnlyMount::new(ro.clone()) {
        Some(_mount) => {
            s.set("", "data_dir", q(ro.display().to_string()));
            s.checks()
                .assert_only_failure("data_dir", "Read-only file system");
        }
        None => cores::skipped(
            "doctor::data_dir_provider_and_listener_faults_each_fail (read-only tmpfs part)",
            "cannot mount a tmpfs (not root?)",
        ),
    }
    s.set("", "data_dir", data);

    std::fs::write(
        s.dir.path().join("providers/plain.json"),
        r#"{"id":"plain","webhook":{"callback_url":"http://relay.example/cb"}}"#,
    )
    .unwrap();
    s.checks()
        .assert_only_failure("provider plain.json", "must be https://");
    std::fs::remove_file(s.dir.path().join("providers/plain.json")).unwrap();

    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.set("http", "listen", q(other.local_addr().unwrap().to_string()));
    s.checks()
        .assert_only_failure("http listener", "held by another process");
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn beside_a_running_daemon_the_queue_and_listener_are_its() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let s = Setup::start(Flavor::Xray, |_| {});
    let _client = s.traffic();
    let config = s.config();
    let mut cmd = agent::connector(s.dir.path());
    cmd.arg("--config").arg(&config);
    let daemon = Daemon::spawn(cmd);
    let socket = s.dir.path().join("data/admin.sock");
    wait::wait_until(WAIT, "the daemon's admin socket", || socket.exists())
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.lines.text()));
    let listen = s.keys["http"]["listen"].trim_matches('"').to_string();
    wait::wait_until(WAIT, "the daemon's listener", || {
        std::net::TcpStream::connect(&listen).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.lines.text()));
    let out = s.checks();
    assert_eq!(out.code, Some(if net_admin() { 0 } else { 1 }), "{out}");
    let queue = out.item("queue");
    assert_eq!(queue["status"], "ok", "{out}");
    assert!(
        queue["detail"]
            .as_str()
            .unwrap()
            .contains("a running daemon"),
        "{out}"
    );
    let listener = out.item("http listener");
    assert_eq!(listener["status"], "ok", "{out}");
    assert!(
        listener["detail"]
            .as_str()
            .unwrap()
            .contains("held by a running connector daemon"),
        "{out}"
    );
}

#[cfg_attr(
    any(no_xray, no_v2ray),
    ignore = "needs the real Xray and V2Ray cores: scripts/test.sh installs them"
)]
#[test]
fn v2ray_passes_with_its_inbound_unchecked_and_refuses_the_xray_flavour() {
    let Some(_) = require_peer(Flavor::V2ray) else {
        return;
    };
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut s = Setup::start(Flavor::V2ray, |_| {});
    let _client = s.traffic();
    // V2Ray cannot list its users: the synced list on disk says who is applied.
    let out_dir = s.dir.path().join("out/node-1");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(
        out_dir.join("allowed-uuids.txt"),
        format!("{}\n", s.user.uuid),
    )
    .unwrap();
    let out = s.checks();
    if net_admin() {
        assert_eq!(out.code, Some(0), "{out}");
    }
    assert_eq!(
        out.with("warn"),
        vec!["node 1 inbound".to_string()],
        "{out}"
    );
    assert_eq!(out.item("node 1 traffic counters")["status"], "ok", "{out}");

    // The tag is asked for even where the protocol cannot be.
    s.nodes = vec!["id = 1\ninbound_tag = \"nope\"\nprotocol = \"vless\"\n".into()];
    s.checks()
        .assert_only_failure("node 1 inbound", "no inbound tagged `nope`");
    s.nodes = vec![node(1)];

    s.set("xray", "flavor", q("xray"));
    s.checks()
        .assert_only_failure("core flavor", "answers the v2ray API");
}

#[test]
fn a_config_error_is_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    agent::write_private(
        &path,
        "[panel]\ninternal_api_key = \"wrong-key-9f2c\"\nbase_url = \"ftp://x\"\n",
    );
    for json in [false, true] {
        let mut cmd = agent::connector(dir.path());
        cmd.arg("--config").arg(&path).arg("doctor");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("config error") && stderr.contains("panel.base_url"),
            "{stderr}"
        );
        assert!(!stderr.contains("wrong-key-9f2c") && !stdout.contains("wrong-key-9f2c"));
        if json {
            let v: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(v[0]["status"], "fail", "{stdout}");
        }
    }
}
