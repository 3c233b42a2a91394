//! `queuectl export`: every job, in id order, as JSON lines on stdout — one job view per
//! line (the same object `queuectl show ID --json` prints), for backups and scripts.
//!
//! Read-only, except that a record found unreadable is quarantined (and left out; see
//! `queuectl stats`). Output is the same with or without `--json`. A reader that stops
//! early (`| head`) is not an error.

use super::Out;
use crate::queue::{Error, JobView, Queue};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, queue: &Queue, out: &mut Out<'_>) -> anyhow::Result<()> {
    let now = queue.now();
    // The queue stops quietly at a broken pipe; any other write error is the writer's.
    match queue.for_each_job(|job| out.json_line(&JobView::new(job, now))) {
        Ok(_) => Ok(()),
        Err(Error::Write(e)) => {
            Err(anyhow::Error::new(e).context("cannot write the export to stdout"))
        }
        Err(e) => Err(e.into()),
    }
}
