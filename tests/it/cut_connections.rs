//! What cuts a removed user's *established* connections on the real Xray core (issue 4,
//! item 6): a slow download started before the removal, and a client's mux session.
//! One vless inbound with two config users (alice, bob) and one added over the API
//! (carol); each has a 1 KiB/25 ms download running through a real client, alice a
//! second one over a mux session. Measured, and kept true by this test:
//!
//! - (a) `RemoveUser alice` (~2 ms) refuses her new connections at once (the first
//!   attempt, ~25 ms), but her running download keeps flowing and her mux session keeps
//!   serving new requests.
//! - (b) re-creating the inbound (`ListInbounds` full → `RemoveInbound` →
//!   `AddInbound` with the listed `InboundHandlerConfig`, 3–7 ms) cuts nothing: all four
//!   downloads keep flowing. And it is harmful: the listed config is the one the core
//!   was *started* with, so alice (removed over the API) is back and gets through, and
//!   carol (added over the API) is gone and refused.
//! - (c) `RemoveOutbound` of the `freedom` outbound the downloads leave through cuts
//!   none of them either. (`policy.levels.N.connIdle` is config-only and only ends
//!   *idle* connections; a busy download or mux session never trips it.)
//!
//! So the API has no way to cut an established connection; only a core restart does.
//! Synchronisation is by events with deadlines: a download is "flowing" when its byte
//! count grows after the operation.

use crate::support::cores;
use crate::support::download::Download;

use std::time::{Duration, Instant};

use connector::peers::xray::wire;
use cores::{Client, Core, Flavor, Inbound, Protocol, ServerConfig, Target, User, require_peer};
use prost::Message as _;

/// Deadline of each wait (every event measured here takes milliseconds).
const WAIT: Duration = Duration::from_secs(5);

// The two HandlerService messages the product does not use (app/proxyman/command).
#[derive(Clone, PartialEq, prost::Message)]
struct RemoveInboundRequest {
    #[prost(string, tag = "1")]
    tag: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct AddInboundRequest {
    #[prost(message, optional, tag = "1")]
    inbound: Option<wire::InboundHandlerConfig>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}
#[derive(Clone, PartialEq, prost::Message)]
struct RemoveOutboundRequest {
    #[prost(string, tag = "1")]
    tag: String,
}

/// One unary call to HandlerService (Xray), on a fresh connection.
fn call<Req, Resp>(core: &Core, method: &str, req: Req) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    cores::api_call(core, "proxyman.command.HandlerService", method, req)
}

fn alter(core: &Core, tag: &str, op: &str, value: Vec<u8>) {
    let req = wire::AlterInboundRequest {
        tag: tag.to_string(),
        operation: Some(wire::TypedMessage {
            r#type: format!("xray.app.proxyman.command.{op}"),
            value,
        }),
    };
    call::<_, Empty>(core, "AlterInbound", req).unwrap_or_else(|e| panic!("{op}: {e}"));
}

fn add_user(core: &Core, tag: &str, user: &User) {
    let account = wire::VlessAccount {
        id: user.secret(Protocol::Vless),
        flow: String::new(),
        encryption: "none".into(),
    };
    let op = wire::AddUserOperation {
        user: Some(wire::User {
            level: 0,
            email: user.email.clone(),
            account: Some(wire::TypedMessage {
                r#type: "xray.proxy.vless.Account".into(),
                value: account.encode_to_vec(),
            }),
        }),
    };
    alter(core, tag, "AddUserOperation", op.encode_to_vec());
}

fn remove_user(core: &Core, tag: &str, email: &str) {
    let op = wire::RemoveUserOperation {
        email: email.to_string(),
    };
    alter(core, tag, "RemoveUserOperation", op.encode_to_vec());
}

fn emails(core: &Core, tag: &str) -> Vec<String> {
    let req = wire::GetInboundUserRequest {
        tag: tag.to_string(),
        email: String::new(),
    };
    let resp: wire::GetInboundUserResponse =
        call(core, "GetInboundUsers", req).unwrap_or_else(|e| panic!("{e}"));
    let mut e: Vec<String> = resp.users.into_iter().map(|u| u.email).collect();
    e.sort();
    e
}

#[cfg_attr(
    no_xray,
    ignore = "needs the real Xray core: scripts/test.sh installs it"
)]
#[test]
fn recreating_the_inbound() {
    let Some(_) = require_peer(Flavor::Xray) else {
        return;
    };
    let tag = "in";
    let (alice, bob, carol) = (User::new("alice"), User::new("bob"), User::new("carol"));
    // alice and bob are config users; carol is added over the API.
    let inbound = Inbound::new(tag, Protocol::Vless, vec![alice.clone(), bob.clone()]);
    let server = ServerConfig::new(Flavor::Xray).with(inbound.clone());
    let core = Core::start(Flavor::Xray, server.json());
    let target = Target::start();
    let mut client = Client::start(vec![
        inbound.route(&alice),
        inbound.route(&alice).named("alice-mux").mux(),
        inbound.route(&bob),
        inbound.route(&carol),
    ]);
    add_user(&core, tag, &carol);
    client.wait_through("carol", &target.url(), WAIT).unwrap();

    // 20 s of drip each: longer than the test, so only a cut ends them.
    let drip = target.drip_url(800, Duration::from_millis(25));
    let drips: Vec<Download> = ["alice", "alice-mux", "bob", "carol"]
        .iter()
        .map(|n| Download::start(n, client.socks(n), drip.clone()))
        .collect();
    for d in &drips {
        d.wait_flowing(2048);
    }
    let [a, amux, ..] = &drips[..] else {
        unreachable!()
    };

    // (a) RemoveUser: new connections refused, the established ones keep flowing.
    let t = Instant::now();
    remove_user(&core, tag, "alice");
    let rm = t.elapsed();
    let refused = client.wait_refused("alice", &target.url(), WAIT).unwrap();
    a.wait_flowing(10 * 1024);
    amux.wait_flowing(10 * 1024);
    // A new request over alice's mux session still gets through.
    client
        .fetch("alice-mux", &target.url())
        .expect("alice's mux session after RemoveUser");
    eprintln!("(a) RemoveUser {rm:?}; new connection refused after {refused:?}; drips flow");

    // (b) re-create the inbound from its own config.
    let listed: wire::ListInboundsResponse = call(
        &core,
        "ListInbounds",
        wire::ListInboundsRequest {
            is_only_tags: false,
        },
    )
    .unwrap();
    let config = listed.inbounds.into_iter().find(|i| i.tag == tag).unwrap();
    let t = Instant::now();
    call::<_, Empty>(
        &core,
        "RemoveInbound",
        RemoveInboundRequest { tag: tag.into() },
    )
    .unwrap();
    call::<_, Empty>(
        &core,
        "AddInbound",
        AddInboundRequest {
            inbound: Some(config),
        },
    )
    .unwrap();
    let recreate = t.elapsed();
    // Nothing is cut: every download, the removed user's and the others', keeps flowing.
    for d in &drips {
        d.wait_flowing(4 * 1024);
    }
    // The inbound is back as the config file made it: the config user removed over the
    // API is back, and the user added over the API is gone.
    assert_eq!(emails(&core, tag), ["alice", "bob"]);
    client.wait_through("alice", &target.url(), WAIT).unwrap();
    client.wait_through("bob", &target.url(), WAIT).unwrap();
    client.wait_refused("carol", &target.url(), WAIT).unwrap();
    eprintln!("(b) RemoveInbound+AddInbound {recreate:?}: no download cut; alice back, carol gone");

    // (c) the outbound too: removing the freedom outbound the downloads leave through
    // cuts none of them either.
    call::<_, Empty>(
        &core,
        "RemoveOutbound",
        RemoveOutboundRequest {
            tag: "direct".into(),
        },
    )
    .unwrap();
    for d in &drips {
        d.wait_flowing(4 * 1024);
    }
    eprintln!("(c) RemoveOutbound: no download cut");
}
