//! `queuectl confirm NODE`: confirm a sync held by the removal guard; the next sync of
//! that node applies it if the panel still answers the same list.
//!
//! Writes: the node's sync state (the hold's `confirmed` flag). Nothing else.

use super::Out;
use crate::jobs::node_sync::state;
use crate::queue::Queue;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node whose held sync to confirm.
    node: u64,
}

pub async fn run(args: Args, queue: &Queue, out: &mut Out<'_>) -> anyhow::Result<()> {
    let held = state::confirm(queue, args.node)
        .await
        .map_err(anyhow::Error::msg)?
        .ok_or_else(|| anyhow::anyhow!("node {} has no held sync", args.node))?;
    if out.json {
        out.json(&serde_json::json!({
            "node_id": args.node,
            "confirmed": true,
            "removes": held.removed,
            "of": held.before,
        }))?;
    } else {
        out.line(format!(
            "node {}: held sync confirmed; the next sync applies it if the panel still answers the same (removes {} of {} users)",
            args.node, held.removed, held.before
        ))?;
    }
    Ok(())
}
