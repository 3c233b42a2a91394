//! `queuectl stats`: jobs by kind and state, the oldest ready job, and every
//! quarantined (unreadable) record with its key and reason.
//!
//! Read-only: counts come from the queue's indexes (no job record is decoded), and the
//! quarantine is listed as it is. Operators must see quarantined records, so they are
//! always shown here (and, alone, by `queuectl list --quarantined`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Align, Backend, Out, Table, clip, relative};
use crate::queue::{JobKind, JobState, QuarantineView, rfc3339};

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

/// `stats --json`.
#[derive(Serialize)]
struct StatsJson<'a> {
    /// kind → state → count, zeros included.
    jobs: &'a BTreeMap<JobKind, BTreeMap<JobState, u64>>,
    /// state → count over all kinds.
    totals: BTreeMap<JobState, u64>,
    /// Due time of the oldest ready job (RFC 3339), or null.
    oldest_ready: Option<String>,
    quarantined: u64,
    quarantined_records: &'a [QuarantineView],
}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let reply = backend.stats().await?;
    let mut jobs: BTreeMap<JobKind, BTreeMap<JobState, u64>> = BTreeMap::new();
    for k in &reply.kinds {
        let kind: JobKind = crate::jobs::kind_named(&k.kind)?;
        jobs.insert(
            kind,
            BTreeMap::from([
                (JobState::Scheduled, k.scheduled),
                (JobState::Ready, k.ready),
                (JobState::Running, k.running),
                (JobState::Done, k.done),
                (JobState::Dead, k.dead),
            ]),
        );
    }
    let quarantine: Vec<QuarantineView> = reply.quarantine.into_iter().map(Into::into).collect();
    let totals: BTreeMap<JobState, u64> = JobState::ALL
        .into_iter()
        .map(|s| (s, jobs.values().map(|m| m[&s]).sum()))
        .collect();
    if out.json {
        out.json(&StatsJson {
            jobs: &jobs,
            totals,
            oldest_ready: reply.oldest_ready_ms.map(rfc3339),
            quarantined: quarantine.len() as u64,
            quarantined_records: &quarantine,
        })?;
        return Ok(());
    }

    let mut columns = vec![("KIND", Align::Left)];
    columns.extend(JobState::ALL.map(|s| (upper(s), Align::Right)));
    columns.push(("TOTAL", Align::Right));
    let mut table = Table::new(&columns);
    for (kind, by_state) in &jobs {
        let mut row = vec![kind.to_string()];
        row.extend(JobState::ALL.map(|s| by_state.get(&s).copied().unwrap_or(0).to_string()));
        row.push(by_state.values().sum::<u64>().to_string());
        table.row(row);
    }
    let mut row = vec!["total".to_string()];
    row.extend(JobState::ALL.map(|s| totals[&s].to_string()));
    row.push(totals.values().sum::<u64>().to_string());
    table.row(row);
    out.table(&table)?;
    out.line("")?;
    match reply.oldest_ready_ms {
        Some(at) => out.line(format!(
            "oldest ready job: due {} ({})",
            rfc3339(at),
            relative(at, reply.now_ms)
        ))?,
        None => out.line("oldest ready job: none")?,
    }
    if !reply.held_nodes.is_empty() {
        let nodes: Vec<String> = reply.held_nodes.iter().map(u64::to_string).collect();
        out.line(format!(
            "held syncs: {} (node {}): the removal guard holds them; see `queuectl held`",
            nodes.len(),
            nodes.join(", ")
        ))?;
    }
    if quarantine.is_empty() {
        out.line("quarantined records: 0")?;
    } else {
        out.line(format!(
            "quarantined records: {} (unreadable; moved aside byte for byte, the rest of the queue works)",
            quarantine.len()
        ))?;
        out.table(&quarantine_table(&quarantine))?;
    }
    Ok(())
}

/// The quarantine as a table (also used by `list --quarantined`).
pub(super) fn quarantine_table(records: &[QuarantineView]) -> Table {
    let mut t = Table::new(&[
        ("KEY", Align::Left),
        ("SINCE", Align::Left),
        ("BYTES", Align::Right),
        ("REASON", Align::Left),
    ]);
    for q in records {
        t.row(vec![
            q.key.clone(),
            q.at.clone(),
            q.bytes.to_string(),
            clip(&q.reason, 100),
        ]);
    }
    t
}

fn upper(s: JobState) -> &'static str {
    match s {
        JobState::Scheduled => "SCHEDULED",
        JobState::Ready => "READY",
        JobState::Running => "RUNNING",
        JobState::Done => "DONE",
        JobState::Dead => "DEAD",
    }
}
