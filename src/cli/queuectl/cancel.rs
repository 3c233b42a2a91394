//! `queuectl cancel ID`: cancel a pending (scheduled or ready) or running job.
//!
//! Touches that one job: it goes dead with reason `cancelled` and stays until purged
//! (or retried). A worker still running it finds its lease lost when it reports. Done
//! and dead jobs cannot be cancelled.

use super::{Backend, Out, printable, view};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The job to cancel.
    id: u64,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let job = view(backend.cancel(args.id).await?, backend.now())?;
    if out.json {
        out.json(&job)?;
    } else {
        out.line(format!(
            "job {} ({}, key {}) cancelled: it is dead (cancelled) until purged or retried",
            job.id,
            job.kind,
            printable(&job.key)
        ))?;
    }
    Ok(())
}
