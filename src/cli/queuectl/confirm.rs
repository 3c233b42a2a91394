//! `queuectl confirm NODE`: confirm a sync held by the removal guard; the next sync of
//! that node applies it if the panel still answers the same list.
//!
//! Writes: the node's sync state (the hold's `confirmed` flag). Nothing else.

use super::{Backend, Out};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The node whose held sync to confirm.
    node: u64,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    // "node N has no held sync" is an error the backend words.
    let held = backend.confirm(args.node).await?;
    if out.json {
        out.json(&serde_json::json!({
            "node_id": args.node,
            "confirmed": true,
            "removes": held.removes,
            "of": held.of,
        }))?;
    } else {
        out.line(format!(
            "node {}: held sync confirmed; the next sync applies it if the panel still answers the same (removes {} of {} users)",
            args.node, held.removes, held.of
        ))?;
    }
    Ok(())
}
