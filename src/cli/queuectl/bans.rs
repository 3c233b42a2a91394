//! `queuectl bans`: users removed from a core in the last 15 minutes, and whether the
//! ban bit: a removed user whose traffic counters still grow has established
//! connections (or a mux session) the core's API did not cut.
//!
//! Read-only: reads the nodes' ban records.

use serde::Serialize;

use super::{Align, Out, Table, relative};
use crate::jobs::xray_apply::bans::{self, Ban};
use crate::queue::{Queue, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {}

#[derive(Serialize)]
struct BanJson<'a> {
    node_id: u64,
    user: &'a str,
    removed_at: String,
    bytes_since_removal: u64,
    biting: bool,
}

pub fn run(_args: Args, queue: &Queue, out: &mut Out<'_>) -> anyhow::Result<()> {
    let mut rows: Vec<(u64, String, Ban)> = Vec::new();
    for (name, bytes) in queue.state_scan("node/")? {
        let Some(node) = name
            .strip_prefix("node/")
            .and_then(|r| r.strip_suffix("/bans"))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(b) = serde_json::from_slice::<bans::Bans>(&bytes) else {
            continue;
        };
        rows.extend(b.into_iter().map(|(email, ban)| (node, email, ban)));
    }
    if out.json {
        let v: Vec<BanJson> = rows
            .iter()
            .map(|(node, email, b)| BanJson {
                node_id: *node,
                user: email,
                removed_at: rfc3339(b.removed_at),
                bytes_since_removal: b.bytes_since,
                biting: b.biting(),
            })
            .collect();
        out.json(&v)?;
        return Ok(());
    }
    if rows.is_empty() {
        out.line("no users removed in the last 15 minutes")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("NODE", Align::Right),
        ("USER", Align::Left),
        ("REMOVED", Align::Left),
        ("BYTES SINCE", Align::Right),
        ("BAN", Align::Left),
    ]);
    let now = queue.now();
    for (node, email, b) in &rows {
        t.row(vec![
            node.to_string(),
            email.clone(),
            format!(
                "{} ({})",
                rfc3339(b.removed_at),
                relative(b.removed_at, now)
            ),
            b.bytes_since.to_string(),
            if b.biting() {
                "biting".into()
            } else {
                "NOT YET: established connections still carry traffic".into()
            },
        ]);
    }
    out.table(&t)?;
    Ok(())
}
