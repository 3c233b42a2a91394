//! What asking the core who is online costs the ban watcher each `sync.interval`
//! (`xray_apply::bans::online`), against the counter query the same tick already makes
//! (`QueryStats user>>>`), in the same run, on real cores with 1,000 watched bans:
//!
//! - Xray, `statsUserOnline` on, every ban already judged by the online list: one
//!   `GetUsersStats` call;
//! - Xray, `statsUserOnline` off (the worst case): `GetUsersStats`, then one
//!   `GetStatsOnlineIpList` per ban (NOT_FOUND), 8 in flight;
//! - V2Ray: nothing, once the core answered UNIMPLEMENTED.
//!
//! `cargo bench --bench online_bans` (peers: `scripts/install-peers.sh`,
//! `CONNECTOR_XRAY_PYTHON`). Prints median and p90 of 50 rounds each.

use connector::sim::core as cores;

use std::time::{Duration, Instant};

use connector::jobs::xray_apply::bans::{self, Source};
use connector::peers::xray::XrayClient;
use cores::{Core, Flavor, Inbound, Protocol, ServerConfig, User};

const BANS: usize = 1_000;
const ROUNDS: usize = 50;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    for (flavor, online) in [
        (Flavor::Xray, true),
        (Flavor::Xray, false),
        (Flavor::V2ray, false),
    ] {
        if let Err(why) = cores::peer(flavor) {
            eprintln!("online_bans bench: {flavor} SKIPPED: {why}");
            continue;
        }
        let users: Vec<User> = (0..BANS)
            .map(|_| User::panel(uuid::Uuid::new_v4()))
            .collect();
        let inbound = Inbound::new("bench", Protocol::Vless, users.clone());
        let mut server = ServerConfig::new(flavor).with(inbound);
        server.user_online = online;
        server.loglevel = "warning";
        let _core = Core::start(flavor, server.json());
        let addr = server.api_addr().to_string();
        let f = match flavor {
            Flavor::Xray => connector::config::Flavor::Xray,
            Flavor::V2ray => connector::config::Flavor::V2ray,
        };
        let client = rt
            .block_on(async { XrayClient::new(&addr, f, Duration::from_secs(10)) })
            .expect("a client");
        let source = if online {
            Source::Online
        } else {
            Source::Counters
        };
        let watched: Vec<(String, Source)> =
            users.iter().map(|u| (u.email.clone(), source)).collect();
        // The first call probes (and, on V2Ray, learns the methods are missing).
        rt.block_on(bans::online(&client, &watched))
            .expect("online");
        let ask = measure(|| {
            rt.block_on(bans::online(&client, &watched))
                .expect("online");
        });
        let base = measure(|| {
            rt.block_on(client.query_stats("user>>>", false))
                .expect("QueryStats");
        });
        println!(
            "{flavor} statsUserOnline={online}, {BANS} watched bans: online query median {:.2} ms p90 {:.2} ms; QueryStats baseline median {:.2} ms p90 {:.2} ms",
            ask.0, ask.1, base.0, base.1
        );
    }
}

/// Median and p90 of `ROUNDS` runs of `f`, in ms.
fn measure(mut f: impl FnMut()) -> (f64, f64) {
    let mut t: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[ROUNDS / 2], t[ROUNDS * 9 / 10])
}
