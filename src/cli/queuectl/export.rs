//! `queuectl export`: every job, in id order, as JSON lines on stdout — one job view per
//! line (the same object `queuectl show ID --json` prints), for backups and scripts.
//!
//! Read-only, except that a record found unreadable is quarantined (and left out; see
//! `queuectl stats`). Output is the same with or without `--json`. A reader that stops
//! early (`| head`) is not an error.

use std::io;

use super::{Backend, Out, view};

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let now = backend.now();
    // The backend stops quietly at a broken pipe; any other write error is the writer's.
    backend
        .export(|job| {
            let v = view(job, now).map_err(io::Error::other)?;
            out.json_line(&v)
        })
        .await
}
