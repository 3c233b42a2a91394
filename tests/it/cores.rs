//! The real-peer harness (`connector::sim::core`) proved against the real cores, without
//! the agent: Xray 26 from the PyPI wheel and V2Ray 4.34 from Debian, a real client core
//! and a local HTTP target.
//!
//! - a user in the server's config gets through, for every protocol each core is used
//!   with, and a user who is not is refused;
//! - vless with the vision flow over TLS, and what a client with the wrong flow meets;
//! - the API: a user added over gRPC (a minimal hand-made call, below) gets through, a
//!   removed one is refused, and a SIGKILLed, restarted core comes back without them;
//! - the harness's own failure reports: a config a core cannot load, a port taken.
//!
//! Missing peers skip these tests loudly, except under `CI=true`, where they fail.

use crate::support::cores;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cores::{
    Client, Core, Flavor, Inbound, Protocol, Route, ServerConfig, TARGET_BODY, Target, User,
    V2rayCore, XrayCore, api_call, api_prefix, fetch_through, require_peer,
};
use serde_json::json;

/// Deadline of the waits in these tests (a refusal or an admission is immediate).
const WAIT: Duration = Duration::from_secs(10);

/// One user the config knows and one it does not, on an inbound of every protocol in
/// `protocols`, all on one server core; one client core carries every route.
struct Rig {
    server: ServerConfig,
    core: Core,
    client: Client,
    target: Target,
    routes: Vec<RigRoute>,
}

#[derive(Clone)]
struct RigRoute {
    protocol: Protocol,
    /// The client's route: the user's email.
    name: String,
    /// Whether the server's config has the user.
    known: bool,
}

impl Rig {
    fn start(flavor: Flavor, protocols: &[Protocol]) -> Rig {
        let target = Target::start();
        let mut server = ServerConfig::new(flavor);
        let mut routes = Vec::new();
        let mut client_routes = Vec::new();
        for &p in protocols {
            let tag = format!("in-{}", p.name());
            let tag = if server.inbounds.iter().any(|i| i.tag == tag) {
                format!("{tag}-2022")
            } else {
                tag
            };
            let known = User::new(&format!("alice@{tag}"));
            let stranger = User::new(&format!("mallory@{tag}"));
            let inbound = Inbound::new(&tag, p, vec![known.clone()]);
            for (user, in_config) in [(&known, true), (&stranger, false)] {
                client_routes.push(inbound.route(user));
                routes.push(RigRoute {
                    protocol: p,
                    name: user.email.clone(),
                    known: in_config,
                });
            }
            server = server.with(inbound);
        }
        let core = Core::start(flavor, server.json());
        let client = Client::start(client_routes);
        Rig {
            server,
            core,
            client,
            target,
            routes,
        }
    }

    /// Fetches the target through every route at once (refusals of different protocols
    /// take different times); each route's result.
    fn fetch_all(&mut self, url: &str) -> Vec<(RigRoute, Result<Vec<u8>, String>)> {
        let socks: Vec<SocketAddr> = self
            .routes
            .iter()
            .map(|r| self.client.socks(&r.name))
            .collect();
        let results: Vec<Result<Vec<u8>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = socks
                .iter()
                .map(|&a| s.spawn(move || fetch_through(a, url)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(self.client.core.is_running(), "the client core died");
        self.routes.iter().cloned().zip(results).collect()
    }

    /// Config users get through (the target's body), strangers are refused.
    #[track_caller]
    fn assert_only_config_users(&mut self) {
        let url = self.target.url();
        let mut wrong = Vec::new();
        for (
            RigRoute {
                protocol: p,
                name,
                known,
            },
            got,
        ) in self.fetch_all(&url)
        {
            let ok = match (&got, known) {
                (Ok(body), true) => body == TARGET_BODY.as_bytes(),
                (Err(_), false) => true,
                _ => false,
            };
            let outcome = match &got {
                Ok(b) => format!("through, {} bytes", b.len()),
                Err(e) => format!("refused: {e}"),
            };
            let line = format!(
                "{:<36} {name:<32} in config: {known:<5} -> {outcome}",
                p.to_string()
            );
            eprintln!("{line}");
            if !ok {
                wrong.push(line);
            }
        }
        assert!(wrong.is_empty(), "wrong outcomes:\n{}", wrong.join("\n"));
    }
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn xray_lets_config_users_through_and_refuses_others_on_every_protocol() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let mut rig = Rig::start(Flavor::Xray, &Protocol::XRAY);
    rig.assert_only_config_users();

    // The access log names the user; per-user counters (stats + policy) count the bytes,
    // and a bigger download streams whole.
    let alice = rig.server.inbounds[0].users[0].clone();
    let n = 1 << 20;
    let body = rig
        .client
        .fetch(&alice.email, &rig.target.bytes_url(n))
        .unwrap_or_else(|e| panic!("a 1 MiB download as alice: {e}"));
    assert_eq!(body.len(), n);
    let log = rig.core.log();
    assert!(
        log.contains(&format!("email: {}", alice.email)),
        "the access log does not name alice"
    );
    let down = stat(
        &rig.core,
        &format!("user>>>{}>>>traffic>>>downlink", alice.email),
    );
    assert!(
        down >= n as i64,
        "alice's downlink counter is {down}, below the {n} bytes she downloaded"
    );
}

#[cfg_attr(
    any(no_xray, no_v2ray),
    ignore = "needs the real Xray and V2Ray cores: scripts/test.sh installs them"
)]
#[test]
fn v2ray_lets_config_users_through_and_refuses_others() {
    // The client is always Xray.
    if require_peer(Flavor::V2ray).is_none() || require_peer(Flavor::Xray).is_none() {
        return;
    }
    // V2Ray's shadowsocks is single-user and cannot be managed over the API; its config
    // user still works, so it is here too.
    let mut protocols = Protocol::V2RAY.to_vec();
    protocols.push(Protocol::Shadowsocks("aes-128-gcm"));
    let mut rig = Rig::start(Flavor::V2ray, &protocols);
    rig.assert_only_config_users();
    let alice = rig.server.inbounds[0].users[0].clone();
    let n = 1 << 20;
    let body = rig
        .client
        .fetch(&alice.email, &rig.target.bytes_url(n))
        .unwrap_or_else(|e| panic!("a 1 MiB download as alice: {e}"));
    assert_eq!(body.len(), n);
    let log = rig.core.log();
    assert!(
        log.contains(&format!("email: {}", alice.email)),
        "the access log does not name alice"
    );
    let down = stat(
        &rig.core,
        &format!("user>>>{}>>>traffic>>>downlink", alice.email),
    );
    assert!(
        down >= n as i64,
        "alice's downlink counter is {down}, below the {n} bytes she downloaded"
    );
}

/// vless with `xtls-rprx-vision` needs TLS (without it the client fails: "XTLS only
/// supports TLS and REALITY directly"). A client that leaves the flow out, for a user
/// whose server entry has it, is refused: a wrong flow locks a user out.
#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn xray_vless_vision_over_tls() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let target = Target::start();
    let vision = User::new("vision@tls").flow("xtls-rprx-vision");
    let plain = User::new("plain@tls");
    let inbound = Inbound::new(
        "in-vision",
        Protocol::Vless,
        vec![vision.clone(), plain.clone()],
    )
    .tls();
    let server = ServerConfig::new(Flavor::Xray).with(inbound.clone());
    let _core = XrayCore::start(server.json());
    let mut no_flow = vision.clone();
    no_flow.flow = None;
    let mut client = Client::start(vec![
        inbound.route(&vision),
        inbound.route(&plain),
        inbound.route(&no_flow).named("vision user without flow"),
    ]);
    for name in [&vision.email, &plain.email] {
        match client.fetch(name, &target.url()) {
            Ok(body) => assert_eq!(body, TARGET_BODY.as_bytes()),
            Err(e) => panic!("{name} over TLS: {e}"),
        }
    }
    let got = client.fetch("vision user without flow", &target.url());
    assert!(got.is_err(), "a client without the user's flow got through");
}

use cores::api;
use prost::Message as _;

fn alter(core: &Core, tag: &str, op: &str, value: Vec<u8>) -> Result<(), String> {
    let p = api_prefix(core);
    let req = api::AlterInboundRequest {
        tag: tag.to_string(),
        operation: Some(api::TypedMessage {
            r#type: format!("{p}app.proxyman.command.{op}"),
            value,
        }),
    };
    api_call::<_, api::Empty>(core, "proxyman.command.HandlerService", "AlterInbound", req)
        .map(|_| ())
}

fn add_vless_user(core: &Core, tag: &str, user: &User) -> Result<(), String> {
    let account = api::VlessAccount {
        id: user.secret(Protocol::Vless),
        flow: user.flow.clone().unwrap_or_default(),
        encryption: "none".into(),
    };
    let op = api::AddUserOperation {
        user: Some(api::User {
            level: 0,
            email: user.email.clone(),
            account: Some(api::TypedMessage {
                r#type: format!("{}proxy.vless.Account", api_prefix(core)),
                value: account.encode_to_vec(),
            }),
        }),
    };
    alter(core, tag, "AddUserOperation", op.encode_to_vec())
}

fn remove_user(core: &Core, tag: &str, email: &str) -> Result<(), String> {
    let op = api::RemoveUserOperation {
        email: email.to_string(),
    };
    alter(core, tag, "RemoveUserOperation", op.encode_to_vec())
}

fn uptime(core: &Core) -> u32 {
    api_call::<_, api::SysStatsResponse>(
        core,
        "stats.command.StatsService",
        "GetSysStats",
        api::Empty {},
    )
    .unwrap_or_else(|e| panic!("GetSysStats: {e}"))
    .uptime
}

/// The counter `name` (0 when the core has none by that name).
fn stat(core: &Core, name: &str) -> i64 {
    let req = api::QueryStatsRequest {
        pattern: name.to_string(),
        reset: false,
    };
    let resp: api::QueryStatsResponse =
        api_call(core, "stats.command.StatsService", "QueryStats", req)
            .unwrap_or_else(|e| panic!("QueryStats: {e}"));
    resp.stat
        .iter()
        .find(|s| s.name == name)
        .map_or(0, |s| s.value)
}

/// A user added over the API gets through, a removed one is refused at once; a core
/// SIGKILLed and restarted comes back (API port, config users) without the API's user.
fn api_and_restart(flavor: Flavor) {
    let target = Target::start();
    let alice = User::new("alice@config");
    let bob = User::new("bob@api");
    let inbound = Inbound::new("node-1", Protocol::Vless, vec![alice.clone()]);
    let server = ServerConfig::new(flavor).with(inbound.clone());
    let mut core = match flavor {
        Flavor::Xray => XrayCore::start(server.json()),
        Flavor::V2ray => V2rayCore::start(server.json()),
    };
    let mut client = Client::start(vec![inbound.route(&alice), inbound.route(&bob)]);
    let url = target.url();
    // The core and the client print their configs and logs as the test unwinds.
    let fail = |what: String| -> ! { panic!("{what}") };

    if let Ok(body) = client.fetch(&bob.email, &url) {
        fail(format!(
            "bob got through before he was added ({} bytes)",
            body.len()
        ));
    }
    add_vless_user(&core, "node-1", &bob).unwrap_or_else(|e| fail(format!("AddUser bob: {e}")));
    // The core applies an add before it answers: the very next connection gets through.
    if let Err(e) = client.fetch(&bob.email, &url) {
        fail(format!("bob, added over the API, was refused: {e}"));
    }
    let again = add_vless_user(&core, "node-1", &bob);
    assert!(
        again.as_ref().is_err_and(|e| e.contains("already exists")),
        "adding bob twice: {again:?}"
    );
    remove_user(&core, "node-1", &bob.email)
        .unwrap_or_else(|e| fail(format!("RemoveUser bob: {e}")));
    if let Ok(body) = client.fetch(&bob.email, &url) {
        fail(format!(
            "bob got through after removal ({} bytes)",
            body.len()
        ));
    }
    add_vless_user(&core, "node-1", &bob)
        .unwrap_or_else(|e| fail(format!("AddUser bob again: {e}")));
    if let Err(e) = client.fetch(&bob.email, &url) {
        fail(format!("bob, re-added, was refused: {e}"));
    }

    // SIGKILL: nothing listens, nothing gets through.
    let api = core.api_addr();
    let pid = core.pid().unwrap();
    core.kill();
    assert!(!core.is_running());
    assert!(
        TcpStream::connect_timeout(&api, Duration::from_millis(500)).is_err(),
        "the API port {api} still accepts after SIGKILL of pid {pid}"
    );
    // (This takes ~2 s: the client core retries its dial before it gives up.)
    if let Ok(body) = client.fetch(&alice.email, &url) {
        fail(format!(
            "alice got through a killed core ({} bytes)",
            body.len()
        ));
    }

    // Restart: the API answers, uptime starts again, config users are back, bob is not.
    let restarted = Instant::now();
    core.restart();
    let up_in = restarted.elapsed();
    assert_eq!(core.starts(), 2);
    assert_ne!(core.pid(), Some(pid));
    TcpStream::connect_timeout(&api, Duration::from_secs(1))
        .unwrap_or_else(|e| fail(format!("API port after restart: {e}")));
    let up = uptime(&core);
    assert!(up <= 2, "uptime {up}s right after a restart");
    client
        .wait_through(&alice.email, &url, WAIT)
        .unwrap_or_else(|e| fail(format!("alice after the restart: {e}")));
    let through = restarted.elapsed();
    if let Ok(body) = client.fetch(&bob.email, &url) {
        fail(format!(
            "bob (added over the API) survived the restart ({} bytes)",
            body.len()
        ));
    }
    let gone = remove_user(&core, "node-1", &bob.email);
    assert!(
        gone.as_ref().is_err_and(|e| e.contains("not found")),
        "removing bob after the restart: {gone:?}"
    );
    eprintln!(
        "{flavor}: restarted in {:.0} ms; alice through {:.0} ms after the restart began",
        up_in.as_secs_f64() * 1000.0,
        through.as_secs_f64() * 1000.0
    );
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn xray_api_users_and_a_killed_core_restarting() {
    if require_peer(Flavor::Xray).is_some() {
        api_and_restart(Flavor::Xray);
    }
}

#[cfg_attr(
    any(no_xray, no_v2ray),
    ignore = "needs the real Xray and V2Ray cores: scripts/test.sh installs them"
)]
#[test]
fn v2ray_api_users_and_a_killed_core_restarting() {
    // The client is always Xray.
    if require_peer(Flavor::V2ray).is_some() && require_peer(Flavor::Xray).is_some() {
        api_and_restart(Flavor::V2ray);
    }
}

// ---- the harness's own failure reports ----

#[cfg_attr(
    any(no_xray, no_v2ray),
    ignore = "needs the real Xray and V2Ray cores: scripts/test.sh installs them"
)]
#[test]
fn a_config_the_core_cannot_load_is_reported_with_the_config() {
    for flavor in [Flavor::Xray, Flavor::V2ray] {
        if require_peer(flavor).is_none() {
            continue;
        }
        let config = json!({
            "inbounds": [{"tag": "x", "listen": "127.0.0.1", "port": cores::free_port(),
                          "protocol": "no-such-protocol"}],
        });
        let err = match Core::try_start(flavor, config) {
            // Dropped while unwinding, it prints its config and output.
            Ok(_core) => panic!("{flavor} started from a bad config"),
            Err(e) => e,
        };
        assert!(err.contains("no-such-protocol"), "{flavor}: {err}");
        match flavor {
            Flavor::Xray => assert!(err.contains("status 23"), "{err}"),
            Flavor::V2ray => assert!(err.contains("exited with status"), "{err}"),
        }
    }
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn a_taken_port_is_named_before_the_core_starts() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = json!({
        "inbounds": [{"tag": "s", "listen": "127.0.0.1", "port": port, "protocol": "socks"}],
        "outbounds": [{"protocol": "blackhole"}],
    });
    let err = match Core::try_start(Flavor::Xray, config) {
        Ok(_core) => panic!("started on a taken port"),
        Err(e) => e,
    };
    assert!(err.contains(&format!("port {port}")), "{err}");
}

/// Routes can be renamed and looked up; a client of many routes is one process; a
/// route can multiplex.
#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn one_client_core_carries_many_users() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let target = Target::start();
    let users: Vec<User> = (0..20).map(|i| User::new(&format!("u{i}@many"))).collect();
    let inbound = Inbound::new("many", Protocol::Vmess, users.clone());
    let _core = XrayCore::start(ServerConfig::new(Flavor::Xray).with(inbound.clone()).json());
    let mut routes: Vec<Route> = users.iter().map(|u| inbound.route(u)).collect();
    routes.push(inbound.route(&users[0]).named("u0 over mux").mux());
    let mut client = Client::start(routes);
    let names = users
        .iter()
        .map(|u| u.email.as_str())
        .chain(["u0 over mux"; 3]);
    let mut fetched = 0;
    for name in names {
        if let Err(e) = client.fetch(name, &target.url()) {
            panic!("{name}: {e}");
        }
        fetched += 1;
    }
    assert_eq!(target.hits(), fetched);
}
