//! The demo's Xray core: the real one, from the PyPI wheel `Xray-core`
//! (`import xray; xray.startFromJSON(config)`), run by a python that has it, as a child
//! process in the demo's directory. SIGKILLed when dropped (the wheel ignores SIGTERM),
//! and by the kernel when the demo dies: it is spawned, and its runner script written,
//! by the tests' core launcher (`crate::sim::core`), which owns both.
//!
//! One core plays both sides:
//! - the *server*: a VLESS inbound tagged `node-1` (no users in its config: the agent
//!   adds them over the API), the gRPC API (HandlerService, StatsService) on its own
//!   port, per-user traffic counters, and a `freedom` outbound allowed to reach loopback
//!   (Xray 26 blackholes it otherwise: XRAY-FACTS);
//! - the *client*: one socks5 inbound per demo user, each routed to a VLESS outbound that
//!   connects back to `node-1` as that user. A fetch through alice's socks port is alice
//!   connecting to the node, exactly as her app would.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::show::{self, Check};

/// The wheel the project is pinned to (scripts/install-peers.sh).
pub use crate::sim::core::XRAY_WHEEL;

/// The inbound the agent manages.
pub const INBOUND_TAG: &str = "node-1";
const API_TAG: &str = "api";

/// A python with the `xray` module.
#[derive(Debug, Clone)]
pub struct Python {
    pub path: PathBuf,
    pub version: String,
}

/// `CONNECTOR_XRAY_PYTHON` when set (and only it: an explicit choice is not second-guessed),
/// else `python3` on PATH. `Err` says what was tried and why it does not do.
pub fn find_python() -> Result<Python, String> {
    let (path, from) = match std::env::var_os("CONNECTOR_XRAY_PYTHON") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "CONNECTOR_XRAY_PYTHON"),
        _ => (PathBuf::from("python3"), "PATH"),
    };
    let out = Command::new(&path)
        .args(["-c", "import xray; print(xray.__version__)"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} (from {from}): {e}", path.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!(
            "{} (from {from}) has no `xray` module: {last}",
            path.display()
        ));
    }
    Ok(Python {
        path,
        version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    })
}

/// Free TCP ports on 127.0.0.1, distinct: the kernel picks each (bind to port 0), and
/// the core binds them moments later.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let mut held = Vec::new();
    for _ in 0..n {
        // Held together until all are chosen, so no two are the same.
        held.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A demo user's way in: their UUID, and the socks5 port that connects as them.
#[derive(Debug, Clone)]
pub struct Route {
    pub uuid: String,
    pub socks: u16,
}

pub struct Core {
    child: Child,
    pub api: SocketAddr,
    pub inbound: SocketAddr,
    pub routes: Vec<Route>,
    pub dir: PathBuf,
}

impl Core {
    /// Writes the config for `uuids` under `dir` and starts the core; returns once every
    /// port listens.
    pub async fn start(python: &Python, dir: &Path, uuids: &[String]) -> anyhow::Result<Core> {
        std::fs::create_dir_all(dir)?;
        let ports = free_ports(2 + uuids.len())?;
        let (api, inbound) = (ports[0], ports[1]);
        let routes: Vec<Route> = uuids
            .iter()
            .zip(&ports[2..])
            .map(|(u, p)| Route {
                uuid: u.clone(),
                socks: *p,
            })
            .collect();
        let config = config(api, inbound, &routes);
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        let runner = dir.join("runner.py");
        std::fs::write(&runner, crate::sim::core::XRAY_RUNNER)?;
        let mut cmd = Command::new(&python.path);
        cmd.arg(&runner)
            .arg(&config_path)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("core.log"))?)
            .stderr(std::fs::File::create(dir.join("core.err"))?);
        // The same spawner as the tests': the kernel kills the core when the demo dies.
        let child = crate::sim::core::spawn_reaped_on_exit(cmd)?;
        let mut core = Core {
            child,
            api: local(api),
            inbound: local(inbound),
            routes,
            dir: dir.to_path_buf(),
        };
        let all: Vec<u16> = ports.clone();
        let waited = show::wait_for(
            "the Xray core to listen on its ports",
            Duration::from_secs(20),
            || {
                let exited = core.child.try_wait().ok().flatten();
                let pending: Vec<u16> = all
                    .iter()
                    .copied()
                    .filter(|p| std::net::TcpStream::connect(local(*p)).is_err())
                    .collect();
                async move {
                    match exited {
                        Some(status) => Check::NotYet(format!("the core exited: {status}")),
                        None if pending.is_empty() => Check::Done(()),
                        None => Check::NotYet(format!("ports not listening yet: {pending:?}")),
                    }
                }
            },
        )
        .await;
        if let Some(status) = core.child.try_wait().ok().flatten() {
            anyhow::bail!(
                "the Xray core exited at start ({status}; 23 means it could not load {}, 255 that it could not start); its output is in {}",
                config_path.display(),
                dir.display()
            );
        }
        waited?;
        Ok(core)
    }

    /// The socks5 port that connects as `uuid`.
    pub fn socks(&self, uuid: &str) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|r| r.uuid == uuid)
            .map(|r| local(r.socks))
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The one core's config: API, the `node-1` VLESS inbound, and per-user socks5 → VLESS
/// routes back into it.
fn config(api: u16, inbound: u16, routes: &[Route]) -> Value {
    let mut inbounds = vec![
        json!({"tag": API_TAG, "listen": "127.0.0.1", "port": api,
               "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}}),
        json!({"tag": INBOUND_TAG, "listen": "127.0.0.1", "port": inbound,
               "protocol": "vless", "settings": {"decryption": "none", "clients": []}}),
    ];
    // The first outbound is where the node's users go: straight out (loopback allowed).
    let mut outbounds = vec![json!({
        "tag": "direct", "protocol": "freedom",
        "settings": {"finalRules": [{"action": "allow", "ip": ["127.0.0.0/8"]}]},
    })];
    let mut rules = vec![json!({"type": "field", "inboundTag": [API_TAG], "outboundTag": API_TAG})];
    for (i, r) in routes.iter().enumerate() {
        let (inb, out) = (format!("as-user-{i}"), format!("to-node-as-user-{i}"));
        inbounds.push(json!({"tag": inb, "listen": "127.0.0.1", "port": r.socks,
            "protocol": "socks", "settings": {"auth": "noauth", "udp": false}}));
        outbounds.push(
            json!({"tag": out, "protocol": "vless", "settings": {"vnext": [{
            "address": "127.0.0.1", "port": inbound,
            "users": [{"id": r.uuid, "encryption": "none"}]}]}}),
        );
        rules.push(json!({"type": "field", "inboundTag": [inb], "outboundTag": out}));
    }
    json!({
        "log": {"loglevel": "info"},
        "api": {"tag": API_TAG, "services": ["HandlerService", "StatsService"]},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": true, "statsUserDownlink": true}}},
        "inbounds": inbounds,
        "outbounds": outbounds,
        "routing": {"rules": rules},
    })
}

/// `GET url` through the socks5 proxy at `socks` on a new connection: `Ok(bytes
/// received)` on a `200`; `Err` (an empty reply, a reset) is how a core refuses a user.
pub async fn fetch_through(socks: SocketAddr, url: &str) -> Result<usize, String> {
    let proxy = reqwest::Proxy::all(format!("socks5h://{socks}")).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(url)
        .header(reqwest::header::CONNECTION, "close")
        .send()
        .await
        .map_err(chain)?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(chain)?;
    if status.is_success() {
        Ok(body.len())
    } else {
        Err(format!("answered {status}"))
    }
}

/// An error and its sources, `a: b: c`.
fn chain(e: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}
