//! `queuectl bans`: users removed from a core in the last 15 minutes, and whether the
//! ban bit: a removed user whose traffic counters still grow has established
//! connections (or a mux session) the core's API did not cut.
//!
//! With `xray.cut_connections`, each ban also shows whether its established connections
//! were cut, how many and when — or why not (no access log line for the user, no
//! `CAP_NET_ADMIN`…): a ban that did not bite stays listed.
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
    /// `null` when no cut was tried (cutting off).
    cut: Option<CutJson<'a>>,
}

#[derive(Serialize)]
struct CutJson<'a> {
    at: String,
    connections: u32,
    note: &'a str,
}

fn cut_json(b: &Ban) -> Option<CutJson<'_>> {
    (b.cut_at_ms != 0).then(|| CutJson {
        at: rfc3339(b.cut_at_ms),
        connections: b.connections_cut,
        note: &b.cut_note,
    })
}

/// The CUT column: `-` when no cut was tried.
fn cut_cell(b: &Ban) -> String {
    if b.cut_at_ms == 0 {
        return "-".into();
    }
    let mut s = format!("{} at {}", b.connections_cut, rfc3339(b.cut_at_ms));
    if !b.cut_note.is_empty() {
        s.push_str(": ");
        s.push_str(&b.cut_note);
    }
    s
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
                cut: cut_json(b),
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
        ("CUT", Align::Left),
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
            cut_cell(b),
        ]);
    }
    out.table(&t)?;
    Ok(())
}

/// As [`crate::jobs::xray_apply::bans::Ban::biting`]: no traffic since the removal.
fn biting(b: &Ban) -> bool {
    b.bytes_since == 0
}
