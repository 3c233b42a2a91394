//! `queuectl purge --dead|--done [--older-than AGE]`: delete finished jobs.
//!
//! Touches only jobs in the chosen finished state (and, with `--older-than`, only those
//! that finished at least that long ago): their records, index entries and idempotency
//! keys are deleted for good. Pending and running jobs are never touched.

use std::time::Duration;

use clap::ArgGroup;
use serde::Serialize;

use super::{Backend, Out, count};
use crate::admin::pb;
use crate::queue::JobState;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("state").required(true).args(["dead", "done"])))]
pub(super) struct Args {
    /// Delete dead jobs (given up on, or cancelled).
    #[arg(long)]
    dead: bool,
    /// Delete done jobs (their idempotency keys go with them).
    #[arg(long)]
    done: bool,
    /// Only jobs that finished at least this long ago (humantime: 7d, 12h, 30m).
    #[arg(long, value_name = "AGE", value_parser = Age::parse)]
    older_than: Option<Age>,
}

/// An `--older-than` value, kept as typed for messages.
#[derive(Debug, Clone)]
struct Age {
    text: String,
    duration: Duration,
}

impl Age {
    fn parse(s: &str) -> Result<Age, humantime::DurationError> {
        Ok(Age {
            text: s.to_string(),
            duration: humantime::parse_duration(s)?,
        })
    }
}

/// `purge --json`.
#[derive(Serialize)]
struct PurgedJson {
    state: JobState,
    older_than: Option<String>,
    purged: u64,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let state = if args.dead {
        JobState::Dead
    } else {
        JobState::Done
    };
    let purged = backend
        .purge(pb::PurgeRequest {
            state: state.to_string(),
            older_than_ms: args
                .older_than
                .as_ref()
                .map(|a| a.duration.as_millis() as u64),
        })
        .await?
        .purged;
    let older_than = args.older_than.map(|a| a.text);
    if out.json {
        out.json(&PurgedJson {
            state,
            older_than,
            purged,
        })?;
    } else {
        let age = older_than.map_or(String::new(), |d| format!(" that finished over {d} ago"));
        out.line(format!(
            "purged {}{age}",
            count(purged, &format!("{state} job"))
        ))?;
    }
    Ok(())
}
