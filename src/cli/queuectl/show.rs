//! `queuectl show ID`: one job — kind, key, state, times, payload — and its attempt
//! history (number, start, duration, outcome, and the error or what a successful
//! attempt reported, such as a hook's output), oldest first.
//!
//! Read-only. A job whose record turned out unreadable is reported as quarantined,
//! with the reason, rather than as missing.

use std::time::Duration;

use super::{Align, Backend, Out, Table, clip, job, list::state_label, printable, relative};
use crate::queue::{JobView, Outcome, Stored, rfc3339};

/// Longest payload shown to people; `--json` always has all of it.
const PAYLOAD_SHOWN: usize = 2000;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The job id (from `queuectl list`).
    id: u64,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    // A missing or quarantined job is an error the backend words.
    let job = job(backend.show(args.id).await?)?;
    let now = backend.now();
    let view = JobView::new(&job, now);
    if out.json {
        out.json(&view)?;
        return Ok(());
    }

    let (at_label, at_ms) = match job.stored {
        Stored::Pending { due_ms } => ("due", due_ms),
        Stored::Running { lease_until_ms, .. } => ("lease until", lease_until_ms),
        Stored::Done { at_ms } | Stored::Dead { at_ms, .. } => ("finished", at_ms),
    };
    let mut fields = vec![
        ("kind", view.kind.to_string()),
        ("key", printable(&view.key)),
        ("state", state_label(&view)),
        (
            at_label,
            format!("{} ({})", rfc3339(at_ms), relative(at_ms, now)),
        ),
        (
            "created",
            format!("{} ({})", view.created, relative(job.created_ms, now)),
        ),
        ("attempts", view.attempts.to_string()),
    ];
    if let Stored::Running { started_ms, .. } = job.stored {
        fields.insert(
            3,
            (
                "started",
                format!("{} ({})", rfc3339(started_ms), relative(started_ms, now)),
            ),
        );
    }
    if let Some(e) = &view.last_error {
        fields.push(("last error", printable(e)));
    }
    let payload = match (&view.payload, &view.payload_hex) {
        (Some(json), _) => Some(serde_json::to_string(json)?),
        (None, Some(hex)) => Some(format!("(hex) {hex}")),
        (None, None) => None,
    };
    if let Some(p) = payload {
        let shown = if p.chars().count() > PAYLOAD_SHOWN {
            format!(
                "{} ({} bytes; all of it: queuectl show {} --json)",
                clip(&p, PAYLOAD_SHOWN),
                job.payload.len(),
                job.id
            )
        } else {
            printable(&p)
        };
        fields.push(("payload", shown));
    }

    out.line(format!("job {}", job.id))?;
    let label_width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    for (label, value) in &fields {
        out.line(format!("  {:<label_width$} {value}", format!("{label}:")))?;
    }
    out.line("")?;
    if view.history.is_empty() {
        out.line("attempt history: none yet")?;
        return Ok(());
    }
    if (view.history.len() as u64) < u64::from(view.attempts) {
        out.line(format!(
            "attempt history (the last {} of {} attempts are kept):",
            view.history.len(),
            view.attempts
        ))?;
    } else {
        out.line("attempt history:")?;
    }
    let mut t = Table::new(&[
        ("#", Align::Right),
        ("STARTED", Align::Left),
        ("DURATION", Align::Right),
        ("OUTCOME", Align::Left),
        ("DETAIL", Align::Left),
    ]);
    for a in &view.history {
        let note = a.note.as_deref().unwrap_or("");
        let (outcome, error) = match &a.outcome {
            Outcome::Succeeded => ("succeeded", note),
            Outcome::Failed { error } => ("failed", error.as_str()),
            Outcome::LeaseExpired => ("lease expired", ""),
            Outcome::Interrupted { reason } => ("interrupted", reason.as_str()),
        };
        t.row(vec![
            a.number.to_string(),
            a.started.clone(),
            humantime::format_duration(Duration::from_millis(a.duration_ms)).to_string(),
            outcome.to_string(),
            error.to_string(),
        ]);
    }
    out.table_indented(&t, 2)?;
    Ok(())
}
