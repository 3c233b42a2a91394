//! The demo's Xray core: the real one — the PyPI wheel `Xray-core` run by a python that
//! has it, or an `xray` executable (`xray run -c FILE`), whichever [`super::find`] found
//! — as a child process in a directory under the demo's. Started, waited for, and
//! SIGKILLed when dropped (the wheel ignores SIGTERM) or when the demo dies, by the
//! tests' core launcher (`crate::sim::core`); this file only writes its config.
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
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::sim::core::Peer;

/// The wheel the project is pinned to (scripts/install-peers.sh).
pub(crate) use crate::sim::core::XRAY_WHEEL;

/// The inbound the agent manages.
pub(crate) const INBOUND_TAG: &str = "node-1";
const API_TAG: &str = "api";

/// Free TCP ports on 127.0.0.1, distinct: the kernel picks each (bind to port 0), and
/// the core binds them moments later.
pub(crate) fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let mut held = Vec::new();
    for _ in 0..n {
        // Held together until all are chosen, so no two are the same.
        held.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A demo user's way in: their UUID, and the socks5 port that connects as them.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub uuid: String,
    pub socks: u16,
}

pub(crate) struct Core {
    /// The shared launcher's core: it waits until the ports listen, reports a failed
    /// start with the core's output, and SIGKILLs the core when dropped.
    _core: crate::sim::core::Core,
    pub api: SocketAddr,
    pub inbound: SocketAddr,
    pub routes: Vec<Route>,
}

impl Core {
    /// Writes the config for `uuids` in a new directory under `dir` and starts `peer`
    /// with it; returns once every port listens.
    pub(crate) fn start(peer: &Peer, dir: &Path, uuids: &[String]) -> anyhow::Result<Core> {
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
        let core = crate::sim::core::Core::try_start_peer(
            peer.clone(),
            config(api, inbound, &routes),
            dir,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Core {
            _core: core,
            api: local(api),
            inbound: local(inbound),
            routes,
        })
    }

    /// The socks5 port that connects as `uuid`.
    pub(crate) fn socks(&self, uuid: &str) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|r| r.uuid == uuid)
            .map(|r| local(r.socks))
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
pub(crate) async fn fetch_through(socks: SocketAddr, url: &str) -> Result<usize, String> {
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
