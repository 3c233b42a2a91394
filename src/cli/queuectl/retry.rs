//! `queuectl retry ID` and `queuectl retry --dead [--kind K]`: make a dead (or
//! scheduled) job ready now, or every dead job (of one kind).
//!
//! Touches the state of the jobs named, nothing else: a retried dead job gets one more
//! attempt (its ladder is already used up, so a failure makes it dead again). A dead job
//! whose idempotency key a newer live job holds is left dead; `retry ID` says so,
//! `retry --dead` counts it.

use clap::ArgGroup;
use serde::Serialize;

use super::{Backend, Out, count, printable, view};
use crate::admin::pb;
use crate::queue::JobKind;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "dead"])))]
pub(super) struct Args {
    /// The job to retry (dead or scheduled).
    id: Option<u64>,
    /// Retry every dead job instead, cancelled ones included (only those of --kind,
    /// when given).
    #[arg(long)]
    dead: bool,
    /// With --dead: only jobs of this kind.
    #[arg(long, requires = "dead", value_parser = crate::jobs::kind_named, value_name = "KIND")]
    kind: Option<JobKind>,
}

/// `retry --dead --json`.
#[derive(Serialize)]
struct RetriedJson {
    kind: Option<JobKind>,
    retried: u64,
    /// Dead jobs not retried because a newer job holds their key.
    left_dead: u64,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    match args.id {
        Some(id) => {
            let job = view(backend.retry(id).await?, backend.now())?;
            if out.json {
                out.json(&job)?;
            } else {
                out.line(format!(
                    "job {} ({}, key {}) is ready; it runs when the connector daemon runs",
                    job.id,
                    job.kind,
                    printable(&job.key)
                ))?;
            }
        }
        None => {
            let pb::RetryDeadReply { retried, left_dead } = backend
                .retry_dead(pb::RetryDeadRequest {
                    kind: args.kind.map(|k| k.to_string()),
                })
                .await?;
            if out.json {
                out.json(&RetriedJson {
                    kind: args.kind,
                    retried,
                    left_dead,
                })?;
            } else {
                let what = match args.kind {
                    Some(kind) => format!("dead {kind} job"),
                    None => "dead job".to_string(),
                };
                out.line(format!(
                    "retried {}; they run when the connector daemon runs",
                    count(retried, &what)
                ))?;
                if left_dead > 0 {
                    out.line(format!(
                        "{} left dead: a newer job holds the key (queuectl list --state dead)",
                        count(left_dead, "job")
                    ))?;
                }
            }
        }
    }
    Ok(())
}
