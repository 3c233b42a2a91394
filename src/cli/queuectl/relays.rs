//! `queuectl relays`: per relay and per `ref`, connect events by status and what became
//! of their callbacks (delivered / pending / dead), with each relay's callback URL
//! (query hidden) and the provider files that were skipped.
//!
//! Read-only. The numbers come from `jobs::webhook::stats::report`, a serializable struct, so the
//! same view can be served by the admin socket or the metrics endpoint.

use super::{Align, Backend, Out, Table};
use crate::jobs::webhook::stats::Counts;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

fn row(relay: &str, r: &str, c: &Counts) -> Vec<String> {
    vec![
        relay.to_string(),
        r.to_string(),
        c.success.to_string(),
        c.cancelled.to_string(),
        c.error.to_string(),
        c.delivered.to_string(),
        c.pending.to_string(),
        c.dead.to_string(),
    ]
}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let report = backend.relays().await?;
    if out.json {
        out.json(&report)?;
        return Ok(());
    }
    if report.relays.is_empty() {
        out.line("no relays: none registered and no webhook events in the queue")?;
    } else {
        let mut t = Table::new(&[
            ("RELAY", Align::Left),
            ("REF", Align::Left),
            ("SUCCESS", Align::Right),
            ("CANCELLED", Align::Right),
            ("ERROR", Align::Right),
            ("DELIVERED", Align::Right),
            ("PENDING", Align::Right),
            ("DEAD", Align::Right),
        ]);
        for r in &report.relays {
            t.row(row(&r.relay_id, "(all)", &r.total));
            for (name, c) in &r.refs {
                t.row(row("", if name.is_empty() { "(none)" } else { name }, c));
            }
        }
        out.table(&t)?;
        out.line("")?;
        for r in &report.relays {
            let target = match &r.callback_url {
                Some(u) => format!("{u}{}", if r.signed { " (signed)" } else { "" }),
                None => "NOT REGISTERED: its callbacks fail until a provider file is back".into(),
            };
            let last = r.last_delivered.as_deref().unwrap_or("never");
            out.line(format!("{}: {target}; last delivered {last}", r.relay_id))?;
        }
    }
    if !report.provider_errors.is_empty() {
        out.line("")?;
        out.line("skipped provider files:")?;
        for e in &report.provider_errors {
            out.line(format!("  {e}"))?;
        }
    }
    Ok(())
}
