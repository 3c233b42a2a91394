//! `queuectl bans`: users removed from a core in the last 15 minutes, and whether the
//! ban bit: a removed user whose traffic counters still grow has established
//! connections (or a mux session) the core's API did not cut.
//!
//! Read-only: reads the nodes' ban records.

use serde::Serialize;

use super::{Align, Backend, Out, Table, relative};
use crate::admin::pb::Ban;
use crate::queue::rfc3339;

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

pub async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let rows = backend.bans().await?.bans;
    if out.json {
        let v: Vec<BanJson> = rows
            .iter()
            .map(|b| BanJson {
                node_id: b.node_id,
                user: &b.user,
                removed_at: rfc3339(b.removed_at_ms),
                bytes_since_removal: b.bytes_since,
                biting: biting(b),
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
    let now = backend.now();
    for b in &rows {
        t.row(vec![
            b.node_id.to_string(),
            b.user.clone(),
            format!(
                "{} ({})",
                rfc3339(b.removed_at_ms),
                relative(b.removed_at_ms, now)
            ),
            b.bytes_since.to_string(),
            if biting(b) {
                "biting".into()
            } else {
                "NOT YET: established connections still carry traffic".into()
            },
        ]);
    }
    out.table(&t)?;
    Ok(())
}

/// As [`crate::jobs::xray_apply::bans::Ban::biting`]: no traffic since the removal.
fn biting(b: &Ban) -> bool {
    b.bytes_since == 0
}
