//! `queuectl workers`, `queuectl pause KIND`, `queuectl resume KIND`: the running
//! daemon's worker pools.
//!
//! A pool is `running`, `waiting` (the webhook pool before a first provider file),
//! `paused` (by `pause`: it leases nothing; attempts in flight finish; jobs keep
//! queueing and wait), `stopped`, or `stuck` (its loop has not gone round for longer
//! than the kind's lease timeout plus a minute). Paused, stopped and stuck pools make
//! `GET /healthz` answer 503, naming them.
//!
//! Touches nothing on disk: a pause lives in the daemon's memory, and a restart runs
//! every pool again. Daemon only.

use super::{Align, Backend, Out, Table};
use crate::admin::pb;
use crate::queue::JobKind;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

#[derive(Debug, clap::Args)]
pub(super) struct KindArgs {
    /// node_sync, xray_apply, traffic_report or webhook.
    #[arg(value_parser = crate::jobs::kind_named)]
    kind: JobKind,
}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let reply = backend.workers().await?;
    render(&reply, out)
}

pub(super) async fn pause(
    args: KindArgs,
    backend: &Backend,
    out: &mut Out<'_>,
    paused: bool,
) -> anyhow::Result<()> {
    let reply = backend.pause(args.kind.as_str(), paused).await?;
    if !out.json {
        let (verb, already) = if paused {
            (
                "paused: they lease nothing until `queuectl resume",
                "already paused",
            )
        } else {
            ("resumed", "not paused")
        };
        if reply.changed {
            out.line(if paused {
                format!("{} workers {verb} {}`", args.kind, args.kind)
            } else {
                format!("{} workers {verb}", args.kind)
            })?;
        } else {
            out.line(format!("{} workers were {already}", args.kind))?;
        }
    }
    render(&reply, out)
}

fn render(reply: &pb::WorkersReply, out: &mut Out<'_>) -> anyhow::Result<()> {
    if out.json {
        let rows: Vec<_> = reply
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "kind": w.kind,
                    "status": w.status,
                    "idle_ms": w.idle_ms,
                    "problem": w.problem,
                })
            })
            .collect();
        out.json(&serde_json::json!({ "changed": reply.changed, "workers": rows }))?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("KIND", Align::Left),
        ("STATUS", Align::Left),
        ("LAST TURN", Align::Right),
    ]);
    for w in &reply.workers {
        t.row(vec![
            w.kind.clone(),
            w.status.clone(),
            format!("{:.1}s ago", w.idle_ms as f64 / 1000.0),
        ]);
    }
    out.table(&t)?;
    for w in &reply.workers {
        if let Some(p) = &w.problem {
            out.line(format!("unhealthy: {p}"))?;
        }
    }
    Ok(())
}
