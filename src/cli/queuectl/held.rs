//! `queuectl held`: node syncs held by the removal guard (`sync.max_removal_ratio`):
//! which node, how many of its users the panel's answer would remove, since when, and
//! when it applies by itself if the panel keeps answering the same
//! (`sync.confirm_after`). `queuectl confirm NODE` applies one sooner.
//!
//! Read-only: reads the nodes' sync state. `APPLIES BY ITSELF` follows the
//! `sync.confirm_after` of whoever holds the queue: the daemon's, when it runs.

use serde::Serialize;

use super::{Align, Backend, Out, Table, relative};
use crate::queue::rfc3339;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

#[derive(Serialize)]
struct HeldJson {
    node_id: u64,
    removes: u64,
    of: u64,
    would_keep: u64,
    since: String,
    applies_at: String,
    confirmed: bool,
}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let reply = backend.held().await?;
    let after = reply.confirm_after_ms;
    let rows: Vec<HeldJson> = reply
        .held
        .iter()
        .map(|h| HeldJson {
            node_id: h.node_id,
            removes: h.removes,
            of: h.of,
            would_keep: h.would_keep,
            since: rfc3339(h.since_ms),
            applies_at: rfc3339(h.since_ms.saturating_add(after)),
            confirmed: h.confirmed,
        })
        .collect();
    if out.json {
        out.json(&rows)?;
        return Ok(());
    }
    if rows.is_empty() {
        out.line("no syncs are held by the removal guard")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("NODE", Align::Right),
        ("REMOVES", Align::Right),
        ("OF", Align::Right),
        ("HELD SINCE", Align::Left),
        ("APPLIES BY ITSELF", Align::Left),
        ("CONFIRMED", Align::Left),
    ]);
    let now = backend.now();
    for (h, r) in reply.held.iter().zip(&rows) {
        t.row(vec![
            r.node_id.to_string(),
            r.removes.to_string(),
            r.of.to_string(),
            format!("{} ({})", r.since, relative(h.since_ms, now)),
            r.applies_at.clone(),
            if r.confirmed { "yes" } else { "no" }.into(),
        ]);
    }
    out.table(&t)?;
    out.line("")?;
    out.line("a held sync applies if the panel repeats it until APPLIES BY ITSELF, or at the next sync after `queuectl confirm NODE`")?;
    Ok(())
}
