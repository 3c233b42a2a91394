//! `queuectl held`: node syncs held by the removal guard (`sync.max_removal_ratio`):
//! which node, how many of its users the panel's answer would remove, since when, and
//! when it applies by itself if the panel keeps answering the same
//! (`sync.confirm_after`). `queuectl confirm NODE` applies one sooner.
//!
//! Read-only: reads the nodes' sync state.

use serde::Serialize;

use super::{Align, Out, Table, relative};
use crate::config::Config;
use crate::jobs::node_sync::state;
use crate::queue::{Queue, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {}

#[derive(Serialize)]
struct HeldJson {
    node_id: u64,
    removes: usize,
    of: usize,
    would_keep: usize,
    since: String,
    applies_at: String,
    confirmed: bool,
}

pub fn run(_args: Args, queue: &Queue, config: &Config, out: &mut Out<'_>) -> anyhow::Result<()> {
    let held = state::held(queue)?;
    let after = config.sync.confirm_after.as_millis() as u64;
    let rows: Vec<HeldJson> = held
        .iter()
        .map(|(node_id, h)| HeldJson {
            node_id: *node_id,
            removes: h.removed,
            of: h.before,
            would_keep: h.users.len(),
            since: rfc3339(h.since),
            applies_at: rfc3339(h.since.saturating_add(after)),
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
    let now = queue.now();
    for ((_, h), r) in held.iter().zip(&rows) {
        t.row(vec![
            r.node_id.to_string(),
            r.removes.to_string(),
            r.of.to_string(),
            format!("{} ({})", r.since, relative(h.since, now)),
            r.applies_at.clone(),
            if r.confirmed { "yes" } else { "no" }.into(),
        ]);
    }
    out.table(&t)?;
    out.line("")?;
    out.line("a held sync applies if the panel repeats it until APPLIES BY ITSELF, or at the next sync after `queuectl confirm NODE`")?;
    Ok(())
}
