//! Ban telemetry from the core's online-user API (issue 14, item 5), end to end: the
//! real agent, a real panel, the real server core, and a real client core in a network
//! namespace of its own joined by a veth pair (`support::netns`), so the server sees it
//! come from 10.x.y.z — the online API never lists a loopback client (XRAY-FACTS).
//!
//! - Xray 26 with `statsUserOnline`: a connected user shows online (GetUsersStats,
//!   GetStatsOnlineIpList, GetAllOnlineUsers, from the namespace's address). Dropped by
//!   the panel while a connection of theirs stays open (the API does not cut it), the
//!   ban reads "still online" from that address (log, `queuectl bans`, the gauge
//!   `connector_bans_not_biting`); once the connection ends it reads biting, source
//!   `online` — where the counters alone (which grew after the removal) would still
//!   say it had not bitten.
//! - V2Ray 4.34 (same policy, same client): the online methods are UNIMPLEMENTED, a
//!   typed "unsupported" that is remembered; the ban is judged by the counters, as
//!   before.
//!
//! Every wait is for an event (a log line of the agent, a scrape, a read), with a
//! deadline only a hang reaches.

use crate::support::agent;
use crate::support::cores;
use crate::support::metrics;
use crate::support::netns::{Netns, require_netns};
use crate::support::panel;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use agent::{Opts, Rig};
use connector::peers::xray::XrayClient;
use connector::peers::xray::online::{Method, Support};
use cores::{Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User, block_on};
use panel::Answer;
use serde_json::Value;
use uuid::Uuid;

/// Deadline of each wait: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);

/// A connection through a socks5 proxy to `target`, a `GET path` sent on it and its
/// first bytes read: it stays open (the target drips) until dropped.
struct Held {
    _conn: TcpStream,
}

impl Held {
    fn open(socks: SocketAddr, target: SocketAddr, path: &str) -> Result<Held, String> {
        let io = |what: &str, e: std::io::Error| format!("{what} via socks {socks}: {e}");
        let mut s = TcpStream::connect_timeout(&socks, Duration::from_secs(5))
            .map_err(|e| io("connect", e))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| io("set timeout", e))?;
        s.write_all(&[5, 1, 0]).map_err(|e| io("greet", e))?;
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello).map_err(|e| io("greeting", e))?;
        if hello != [5, 0] {
            return Err(format!("socks greeting answered {hello:?}"));
        }
        let SocketAddr::V4(t) = target else {
            return Err(format!("{target} is not IPv4"));
        };
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&t.ip().octets());
        req.extend_from_slice(&t.port().to_be_bytes());
        s.write_all(&req).map_err(|e| io("CONNECT", e))?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)
            .map_err(|e| io("CONNECT reply", e))?;
        if reply[1] != 0 {
            return Err(format!("socks CONNECT answered {}", reply[1]));
        }
        let get = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        s.write_all(get.as_bytes()).map_err(|e| io("GET", e))?;
        let mut first = [0u8; 512];
        let n = s.read(&mut first).map_err(|e| io("first bytes", e))?;
        if n == 0 || !first.starts_with(b"HTTP/1.1 200") {
            return Err(format!(
                "the target answered {:?}",
                String::from_utf8_lossy(&first[..n])
            ));
        }
        Ok(Held { _conn: s })
    }
}

/// The agent's own client of the core's API.
fn api(server: &ServerConfig) -> XrayClient {
    let addr = server.api_addr().to_string();
    let flavor = match server.flavor {
        Flavor::Xray => connector::config::Flavor::Xray,
        Flavor::V2ray => connector::config::Flavor::V2ray,
    };
    block_on(async move { XrayClient::new(&addr, flavor, Duration::from_secs(10)) })
        .expect("an API client")
}

/// One node (1) on `server`'s inbound, two panel users; the agent started with both.
struct Fixture {
    rig: Rig,
    client: Client,
    keep: User,
    ban: User,
    _core: Core,
}

fn fixture(flavor: Flavor, ns: &Netns) -> (Fixture, ServerConfig) {
    let keep = User::panel(Uuid::new_v4());
    let ban = User::panel(Uuid::new_v4());
    let inbound = Inbound::new("in-1", Protocol::Vless, Vec::new()).listen_on(ns.host_ip);
    let server = ServerConfig::new(flavor).online().with(inbound.clone());
    let core = Core::start(flavor, server.json());
    let client = Client::start_in(
        &ns.name,
        ns.ns_ip,
        vec![inbound.route(&keep), inbound.route(&ban)],
    );
    let mut opts = Opts {
        xray: Some(format!(
            "api = \"{}\"\nflavor = \"{flavor}\"\ntimeout = \"5s\"\n",
            server.api_addr()
        )),
        http: String::new(),
        ..Opts::default()
    };
    opts.node_keys
        .insert(1, "inbound_tag = \"in-1\"\nprotocol = \"vless\"\n".into());
    let mut rig = Rig::new(opts);
    rig.panel.set(1, answer(&[&keep, &ban]));
    rig.start();
    wait_applied_users(&rig, 0, 2);
    (
        Fixture {
            rig,
            client,
            keep,
            ban,
            _core: core,
        },
        server,
    )
}

fn answer(users: &[&User]) -> Answer {
    let ids: Vec<String> = users.iter().map(|u| u.uuid.to_string()).collect();
    Answer::list(&ids)
}

#[track_caller]
fn wait_applied_users(rig: &Rig, from: usize, users: usize) {
    rig.wait_log(from, &format!("`applied` with {users} users"), |v| {
        v["message"] == "applied" && v["node"] == 1 && v["users"] == users
    });
}

/// The user's entry in `queuectl bans --json`.
#[track_caller]
fn ban_row(rig: &Rig, email: &str) -> Value {
    let bans = rig.queuectl(&["bans", "--json"]);
    bans.as_array()
        .and_then(|a| a.iter().find(|b| b["user"] == email))
        .cloned()
        .unwrap_or_else(|| rig.fail(&format!("queuectl bans does not list {email}: {bans}")))
}

/// `connector_bans_not_biting{node="1"}` until it reads `n`.
#[track_caller]
fn wait_not_biting(rig: &Rig, n: f64) {
    let addr = rig.http_addr();
    metrics::wait_for(
        addr,
        WAIT,
        &format!("connector_bans_not_biting = {n}"),
        |m| m.get("connector_bans_not_biting", &[("node", "1")]) == Some(n),
    );
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn xray_online_api_says_a_banned_user_is_still_online_then_that_the_ban_bites() {
    let Some(_) = cores::require_peer(Flavor::Xray) else {
        return;
    };
    let Some(ns) = require_netns() else {
        return;
    };
    let target = Target::start();
    let (mut f, server) = fixture(Flavor::Xray, &ns);
    let me = ns.ns_ip.to_string();
    let held = Held::open(f.client.socks(&f.ban.email), target.addr, "/drip/100000/50")
        .unwrap_or_else(|e| f.rig.fail(&format!("{e}\n{}", f.client.dump())));
    // A second user's fetch goes through too (and is not online afterwards).
    f.client
        .fetch(&f.keep.email, &target.url())
        .unwrap_or_else(|e| f.rig.fail(&format!("{} refused: {e}", f.keep.email)));

    // A connected user shows online, from the namespace's address, in all three calls.
    let core = api(&server);
    let users = match block_on(core.online_users()) {
        Ok(Support::Answered(u)) => u,
        other => f.rig.fail(&format!("GetUsersStats: {other:?}")),
    };
    assert_eq!(
        users.get(&f.ban.email),
        Some(&vec![me.clone()]),
        "{users:?}"
    );
    assert_eq!(core.supports(Method::UsersStats), Some(true));
    assert_eq!(
        block_on(core.online_ips(&f.ban.email)).ok(),
        Some(Support::Answered(Some(vec![me.clone()])))
    );
    match block_on(core.online_emails()) {
        Ok(Support::Answered(e)) => assert!(e.contains(&f.ban.email), "{e:?}"),
        other => f.rig.fail(&format!("GetAllOnlineUsers: {other:?}")),
    }
    assert_eq!(
        block_on(core.online_ips("nobody@x")).ok(),
        Some(Support::Answered(None)),
        "a user the core never saw: it cannot tell"
    );

    // Dropped by the panel with the connection open: still online, said by the agent.
    let mark = f.rig.mark();
    f.rig.panel.set(1, answer(&[&f.keep]));
    wait_applied_users(&f.rig, mark, 1);
    let (_, warn) = f
        .rig
        .wait_log(mark, "a warning that the removed user is online", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a removed user is still online"))
        });
    assert_eq!(warn["user"], f.ban.email.as_str(), "{warn}");
    assert_eq!(warn["source"], "online", "{warn}");
    assert!(
        warn["online_ips"].as_str().is_some_and(|s| s.contains(&me)),
        "{warn}"
    );
    let row = ban_row(&f.rig, &f.ban.email);
    assert_eq!(row["source"], "online", "{row}");
    assert_eq!(row["biting"], false, "{row}");
    assert_eq!(row["online_ips"], serde_json::json!([me]), "{row}");
    wait_not_biting(&f.rig, 1.0);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_queuectl"))
        .arg("--config")
        .arg(&f.rig.config)
        .arg("bans")
        .output()
        .expect("queuectl bans");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("SOURCE") && table.contains(&me) && table.contains("still online"),
        "{table}"
    );

    // The connection ends: the core lists the user no more, and the ban bites.
    let mark = f.rig.mark();
    drop(held);
    let (_, bit) = f.rig.wait_log(mark, "the ban biting once offline", |v| {
        v["message"] == "a removed user is no longer online: the ban bites"
            && v["user"] == f.ban.email.as_str()
    });
    assert_eq!(bit["source"], "online", "{bit}");
    let row = ban_row(&f.rig, &f.ban.email);
    assert_eq!(row["biting"], true, "{row}");
    assert_eq!(row["source"], "online", "{row}");
    assert_eq!(row["online_ips"], serde_json::json!([]), "{row}");
    assert!(
        row["bytes_since_removal"].as_u64().unwrap_or(0) > 0,
        "the counters grew after the removal (they alone would say it had not bitten): {row}"
    );
    wait_not_biting(&f.rig, 0.0);
    assert_eq!(f.rig.stop(), Some(0), "{}", f.rig.report());
    drop(f);
}

#[cfg_attr(
    any(no_xray, no_v2ray),
    ignore = "needs the real Xray and V2Ray cores: scripts/test.sh installs them"
)]
#[test]
fn v2ray_has_no_online_api_and_bans_fall_back_to_the_counters() {
    let (Some(_), Some(_)) = (
        cores::require_peer(Flavor::V2ray),
        cores::require_peer(Flavor::Xray),
    ) else {
        return;
    };
    let Some(ns) = require_netns() else {
        return;
    };
    let target = Target::start();
    let (f, server) = fixture(Flavor::V2ray, &ns);
    let held = Held::open(f.client.socks(&f.ban.email), target.addr, "/drip/100000/50")
        .unwrap_or_else(|e| f.rig.fail(&format!("{e}\n{}", f.client.dump())));

    let core = api(&server);
    assert_eq!(core.supports(Method::UsersStats), None, "not asked yet");
    assert_eq!(
        block_on(core.online_users()).ok(),
        Some(Support::Unsupported)
    );
    assert_eq!(core.supports(Method::UsersStats), Some(false), "remembered");
    assert_eq!(
        block_on(core.online_ips(&f.ban.email)).ok(),
        Some(Support::Unsupported)
    );
    assert_eq!(
        block_on(core.online_emails()).ok(),
        Some(Support::Unsupported)
    );
    core.reprobe();
    assert_eq!(
        core.supports(Method::IpList),
        None,
        "asked again after a restart"
    );

    let mark = f.rig.mark();
    f.rig.panel.set(1, answer(&[&f.keep]));
    wait_applied_users(&f.rig, mark, 1);
    let (_, warn) = f
        .rig
        .wait_log(mark, "a warning that the removed user has traffic", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a removed user still has traffic"))
        });
    assert_eq!(warn["user"], f.ban.email.as_str(), "{warn}");
    assert_eq!(warn["source"], "counters", "{warn}");
    let row = ban_row(&f.rig, &f.ban.email);
    assert_eq!(row["source"], "counters", "{row}");
    assert_eq!(row["biting"], false, "{row}");
    assert_eq!(row["online_ips"], serde_json::json!([]), "{row}");
    wait_not_biting(&f.rig, 1.0);
    drop(held);
    let mut f = f;
    assert_eq!(f.rig.stop(), Some(0), "{}", f.rig.report());
    // The counters stay grown: still not biting, as before the online API.
    let row = ban_row(&f.rig, &f.ban.email);
    assert_eq!(row["biting"], false, "{row}");
    assert_eq!(row["source"], "counters", "{row}");
    drop(f);
}
