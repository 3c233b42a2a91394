//! `queuectl tail [--kind K]`: job events as they happen — enqueued, leased (with the
//! attempt), done, retry (with when the next attempt is due), dead, and an operator's
//! retried and cancelled — one line each, `--json` as JSON lines, until Ctrl-C or the
//! daemon stops (exit 0).
//!
//! Needs the running daemon: events happen only in the process that runs the jobs.
//! Read-only. A reader slower than the daemon's event burst is told how many events it
//! missed (`queuectl list` then shows where the jobs are); nothing else is lost.

use serde::Serialize;

use super::{Backend, Out, clip, printable};
use crate::admin::pb::{self, tail_event::What};
use crate::queue::{JobKind, rfc3339};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Only events of jobs of this kind.
    #[arg(long, value_parser = crate::jobs::kind_named, value_name = "KIND")]
    kind: Option<JobKind>,
}

/// One line of `tail --json`.
#[derive(Serialize)]
struct EventJson<'a> {
    at: String,
    /// enqueued, replaced, leased, done, retry, dead, retried, cancelled; or lagged,
    /// stopping.
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    due: Option<String>,
    /// lagged: how many events were missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<u64>,
}

pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let kind = args.kind.map(|k| k.to_string());
    backend
        .tail(|e| {
            let Some(what) = &e.what else { return Ok(()) };
            if let (What::Job(j), Some(kind)) = (what, &kind)
                && &j.kind != kind
            {
                return Ok(());
            }
            write(out, e.at_ms, what)?;
            out.flush()?;
            Ok(())
        })
        .await
}

fn write(out: &mut Out<'_>, at_ms: u64, what: &What) -> std::io::Result<()> {
    let at = rfc3339(at_ms);
    let mut json = EventJson {
        at: at.clone(),
        event: "",
        id: None,
        kind: None,
        key: None,
        attempt: None,
        due: None,
        missed: None,
    };
    let line = match what {
        What::Job(j) => {
            json.event = &j.event;
            json.id = Some(j.id);
            json.kind = Some(&j.kind);
            json.key = Some(&j.key);
            json.attempt = j.attempt;
            json.due = j.due_ms.map(rfc3339);
            format!(
                "{at}  {:<9}  job {}  {}  {}{}",
                j.event,
                j.id,
                j.kind,
                clip(&j.key, 60),
                detail(j)
            )
        }
        What::Lagged(n) => {
            json.event = "lagged";
            json.missed = Some(*n);
            format!(
                "{at}  missed {n} events (this reader fell behind); `queuectl list` shows where the jobs are now"
            )
        }
        What::Stopping(_) => {
            json.event = "stopping";
            format!("{at}  the daemon is stopping; tail ends")
        }
    };
    if out.json {
        out.json_line(&json)
    } else {
        out.line(printable(&line))
    }
}

fn detail(j: &pb::JobEvent) -> String {
    match (j.event.as_str(), j.attempt, j.due_ms) {
        ("leased", Some(n), _) => format!(" (attempt {n})"),
        ("retry", _, Some(due)) => format!(" (next attempt due {})", rfc3339(due)),
        ("retried", _, Some(due)) => format!(" (due {})", rfc3339(due)),
        _ => String::new(),
    }
}
