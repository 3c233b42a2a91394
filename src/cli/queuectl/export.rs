//! `queuectl export`: every job, in id order, as JSON lines on stdout — one job view per
//! line (the same object `queuectl show ID --json` prints), for backups and scripts.
//!
//! Read-only, except that a record found unreadable is quarantined (and left out; see
//! `queuectl stats`). Output is the same with or without `--json`. A reader that stops
//! early (`| head`) is not an error.

use std::io;

use super::Out;
use crate::queue::{JobView, Queue};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, queue: &Queue, out: &mut Out<'_>) -> anyhow::Result<()> {
    let now = queue.now();
    // The queue stops at a broken pipe and wraps other write errors as its own; keep
    // the writer's error to report it as what it is.
    let mut write_error: Option<io::Error> = None;
    let result = queue.for_each_job(|job| {
        out.json_line(&JobView::new(job, now)).map_err(|e| {
            let copy = io::Error::new(e.kind(), e.to_string());
            write_error = Some(e);
            copy
        })
    });
    if let Some(e) = write_error {
        return Err(anyhow::Error::new(e).context("cannot write the export to stdout"));
    }
    result?;
    Ok(())
}
