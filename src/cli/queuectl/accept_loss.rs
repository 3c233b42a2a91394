//! `queuectl accept-loss`: open a queue that lost acknowledged writes anyway.
//!
//! When sled's log is damaged after its last snapshot, sled silently drops what came
//! after the damage; the queue notices (its high-water mark says more ids were
//! acknowledged than the database recovered) and refuses to open, so nobody runs on
//! a queue that is silently short. After keeping a copy of the directory, an operator
//! accepts the loss with this command: the loss is recorded in the quarantine (shown by
//! `queuectl stats` from then on) and ids are never reused.
//!
//! Writes: one quarantine entry; the id counter.
//!
//! Offline by nature: only a database that refuses to open needs this, and then no
//! daemon can be running. With a daemon answering, it lists the losses already
//! accepted (the same output as offline once the loss is recorded).

use super::{Backend, Out};
use crate::queue::QuarantineView;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let losses: Vec<QuarantineView> = backend
        .quarantined()
        .await?
        .records
        .into_iter()
        .filter(|q| q.key.starts_with("lost-writes/"))
        .map(Into::into)
        .collect();
    if out.json {
        out.json(&losses)?;
    } else if losses.is_empty() {
        out.line("the queue has lost no acknowledged writes; nothing to accept")?;
    } else {
        for l in &losses {
            out.line(format!("{}: {}", l.key, l.reason))?;
        }
        out.line("the queue opens normally again; the loss stays listed in `queuectl stats`")?;
    }
    Ok(())
}
