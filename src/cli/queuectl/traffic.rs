//! `queuectl traffic`: per node, the traffic reports waiting and those delivered, with
//! their bytes; the oldest waiting report and why it waits.
//!
//! Read-only: reads the report jobs (`jobs::traffic_report::summary`).

use super::{Align, Backend, Out, Table};
use crate::admin::convert;
use crate::jobs::traffic_report::summary::Tally;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let s = convert::traffic_summary(backend.traffic().await?);
    if out.json {
        out.json(&s)?;
        return Ok(());
    }
    if s.nodes.is_empty() {
        out.line("no traffic reports in the queue")?;
    } else {
        let mut t = Table::new(&[
            ("NODE", Align::Right),
            ("PENDING", Align::Right),
            ("PENDING UP/DOWN", Align::Right),
            ("DELIVERED", Align::Right),
            ("DELIVERED UP/DOWN", Align::Right),
            ("LAST DELIVERED", Align::Left),
            ("OLDEST PENDING", Align::Left),
        ]);
        for n in &s.nodes {
            t.row(vec![
                n.node.to_string(),
                n.pending.reports.to_string(),
                bytes(&n.pending),
                n.delivered.reports.to_string(),
                bytes(&n.delivered),
                n.last_delivered.clone().unwrap_or_else(|| "-".into()),
                n.oldest_pending.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.table(&t)?;
        for n in &s.nodes {
            if let Some(e) = &n.last_error {
                out.line(format!("node {}: oldest pending report: {e}", n.node))?;
            }
            if n.dead.reports > 0 {
                out.line(format!(
                    "node {}: {} cancelled report(s) never delivered: {}",
                    n.node,
                    n.dead.reports,
                    bytes(&n.dead)
                ))?;
            }
        }
    }
    for id in &s.unreadable {
        out.line(format!("job {id}: payload is not a traffic report"))?;
    }
    Ok(())
}

fn bytes(t: &Tally) -> String {
    format!("{} / {} B", t.upload, t.download)
}
