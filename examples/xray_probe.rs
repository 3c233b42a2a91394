//! Manual probe of a core's API: `cargo run --example xray_probe -- 127.0.0.1:10085 TAG`.
//! Lists inbounds, users, uptime; adds and removes one user.

use std::time::Duration;

use connector::config::{Flavor, Protocol};
use connector::peers::xray::XrayClient;
use connector::peers::xray::account::{self, InboundKind};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:10085", String::as_str);
    let tag = args.get(2).map_or("node-1", String::as_str);
    let flavor = match args.get(3).map(String::as_str) {
        Some("v2ray") => Flavor::V2ray,
        _ => Flavor::Xray,
    };
    let c = XrayClient::new(addr, flavor, Duration::from_secs(5))?;
    println!("uptime: {:?}", c.uptime().await);
    println!("inbounds: {:?}", c.inbound_types().await);
    println!("users: {:?}", c.inbound_emails(tag).await);
    let kind = InboundKind {
        protocol: Protocol::Vless,
        flow: String::new(),
        cipher: None,
    };
    let id = uuid::Uuid::new_v4();
    let u = account::user(flavor, &kind, id, id.to_string(), None, 0)?;
    println!("add: {:?}", c.add_user(tag, &u).await);
    println!("add again: {:?}", c.add_user(tag, &u).await);
    println!("users: {:?}", c.inbound_emails(tag).await);
    println!("remove: {:?}", c.remove_user(tag, &u.email).await);
    println!("remove again: {:?}", c.remove_user(tag, &u.email).await);
    println!(
        "stats: {:?}",
        c.query_stats("", false).await.map(|v| v.len())
    );
    Ok(())
}
