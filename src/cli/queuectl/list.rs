//! `queuectl list`: jobs in id order, filtered by state and kind, a page at a time
//! (`--limit`, then `--after` the last id shown); or, with `--quarantined`, the records
//! moved aside because they could not be read.
//!
//! Read-only, except that a record found unreadable on the way is quarantined (the
//! queue does that on every read, and logs it).

use super::{Align, Backend, Out, Table, clip, stats::quarantine_table, view};
use crate::admin::pb;
use crate::queue::{JobKind, JobState, JobView, QuarantineView};

/// Page size when `--limit` is not given.
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Only jobs in this state: scheduled, ready, running, done or dead.
    #[arg(long, value_name = "STATE")]
    state: Option<JobState>,
    /// Only jobs of this kind: node_sync, xray_apply, traffic_report or webhook.
    #[arg(long, value_parser = crate::jobs::kind_named, value_name = "KIND")]
    kind: Option<JobKind>,
    /// At most N jobs (0: all of them).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    limit: usize,
    /// Only jobs with an id above ID: pass the last id of a page to get the next one.
    #[arg(long, value_name = "ID")]
    after: Option<u64>,
    /// List the quarantined (unreadable) records instead of jobs.
    #[arg(long, conflicts_with_all = ["state", "kind", "after"])]
    quarantined: bool,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    if args.quarantined {
        let records: Vec<QuarantineView> = backend
            .quarantined()
            .await?
            .records
            .into_iter()
            .map(Into::into)
            .collect();
        let records = match args.limit {
            0 => &records[..],
            n => &records[..n.min(records.len())],
        };
        if out.json {
            out.json(records)?;
        } else if records.is_empty() {
            out.line("no quarantined records")?;
        } else {
            out.table(&quarantine_table(records))?;
        }
        return Ok(());
    }

    // One more than asked, to know whether there is a next page.
    let mut jobs = backend
        .list(pb::ListRequest {
            state: args.state.map(|s| s.to_string()),
            kind: args.kind.map(|k| k.to_string()),
            after_id: args.after,
            limit: match args.limit {
                0 => 0,
                n => n.saturating_add(1) as u64,
            },
        })
        .await?;
    let more = args.limit > 0 && jobs.len() > args.limit;
    jobs.truncate(if args.limit > 0 {
        args.limit
    } else {
        jobs.len()
    });
    let now = backend.now();
    let views = jobs
        .into_iter()
        .map(|j| view(j, now))
        .collect::<anyhow::Result<Vec<JobView>>>()?;
    if out.json {
        out.json(&views)?;
        return Ok(());
    }
    if views.is_empty() {
        out.line("no jobs match")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("KIND", Align::Left),
        ("STATE", Align::Left),
        ("ATTEMPTS", Align::Right),
        ("AT", Align::Left),
        ("KEY", Align::Left),
        ("LAST ERROR", Align::Left),
    ]);
    for v in &views {
        t.row(vec![
            v.id.to_string(),
            v.kind.to_string(),
            state_label(v),
            v.attempts.to_string(),
            v.at.clone(),
            clip(&v.key, 40),
            v.last_error
                .as_deref()
                .map_or(String::new(), |e| clip(e, 60)),
        ]);
    }
    out.table(&t)?;
    if more && let Some(last) = views.last() {
        out.line(format!(
            "(more jobs match: add --after {} for the next page)",
            last.id
        ))?;
    }
    Ok(())
}

/// `dead (cancelled)` rather than `dead`: why matters to whoever reads the list.
pub(super) fn state_label(v: &JobView) -> String {
    match v.dead_reason {
        Some(reason) => format!("{} ({})", v.state, reason.as_str()),
        None => v.state.to_string(),
    }
}
