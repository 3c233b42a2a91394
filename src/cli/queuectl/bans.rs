//! `queuectl bans`: users removed from a core in the last 15 minutes, and whether the
//! ban bit. Each ban says what it was judged by (`SOURCE`): `online`, the core's own
//! list of the user's open connections (Xray with `statsUserOnline`; the user's
//! addresses are shown), or `counters`, the user's traffic counters since the removal
//! (V2Ray, older Xray, or a user the core does not track). A ban has not bitten while the
//! user is still online, or (counters) once their counters grew: established
//! connections (or a mux session) the core's API did not cut.
//!
//! With `xray.cut_connections`, each ban also shows whether its established connections
//! were cut, how many and when — or why not (no access log line for the user, no
//! `CAP_NET_ADMIN`…): a ban that did not bite stays listed.
//!
//! Read-only: reads the nodes' ban records.

use serde::Serialize;

use super::{Align, Backend, Out, Table, relative};
use crate::admin::pb::Ban;
use crate::queue::rfc3339;

#[derive(Debug, clap::Args)]
pub(super) struct Args {}

#[derive(Serialize)]
struct BanJson<'a> {
    node_id: u64,
    user: &'a str,
    removed_at: String,
    bytes_since_removal: u64,
    biting: bool,
    /// `online` or `counters`.
    source: &'a str,
    /// With `online`: where the core lists the user online from (none: offline).
    online_ips: &'a [String],
    /// `null` when no cut was tried (cutting off).
    cut: Option<CutJson<'a>>,
}

#[derive(Serialize)]
struct CutJson<'a> {
    at: String,
    connections: u32,
    note: &'a str,
}

fn cut_json(b: &Ban) -> Option<CutJson<'_>> {
    (b.cut_at_ms != 0).then(|| CutJson {
        at: rfc3339(b.cut_at_ms),
        connections: b.connections_cut,
        note: &b.cut_note,
    })
}

/// The CUT column: `-` when no cut was tried.
fn cut_cell(b: &Ban) -> String {
    if b.cut_at_ms == 0 {
        return "-".into();
    }
    let mut s = format!("{} at {}", b.connections_cut, rfc3339(b.cut_at_ms));
    if !b.cut_note.is_empty() {
        s.push_str(": ");
        s.push_str(&b.cut_note);
    }
    s
}

pub(super) async fn run(_args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<()> {
    let rows = backend.bans().await?.bans;
    if out.json {
        let v: Vec<BanJson> = rows
            .iter()
            .map(|b| BanJson {
                node_id: b.node_id,
                user: &b.user,
                removed_at: rfc3339(b.removed_at_ms),
                bytes_since_removal: b.bytes_since,
                biting: biting(b),
                cut: cut_json(b),
                source: source(b),
                online_ips: &b.online_ips,
            })
            .collect();
        out.json(&v)?;
        return Ok(());
    }
    if rows.is_empty() {
        out.line("no users removed in the last 15 minutes")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("NODE", Align::Right),
        ("USER", Align::Left),
        ("REMOVED", Align::Left),
        ("SOURCE", Align::Left),
        ("ONLINE FROM", Align::Left),
        ("BYTES SINCE", Align::Right),
        ("BAN", Align::Left),
        ("CUT", Align::Left),
    ]);
    let now = backend.now();
    for b in &rows {
        let online = source(b) == "online";
        t.row(vec![
            b.node_id.to_string(),
            b.user.clone(),
            format!(
                "{} ({})",
                rfc3339(b.removed_at_ms),
                relative(b.removed_at_ms, now)
            ),
            source(b).to_string(),
            if !online {
                "-".into()
            } else if b.online_ips.is_empty() {
                "(offline)".into()
            } else {
                b.online_ips.join(",")
            },
            b.bytes_since.to_string(),
            match (biting(b), online) {
                (true, _) => "biting".into(),
                (false, true) => format!(
                    "NOT YET: still online ({} address{})",
                    b.online_ips.len(),
                    if b.online_ips.len() == 1 { "" } else { "es" }
                ),
                (false, false) => "NOT YET: established connections still carry traffic".into(),
            },
            cut_cell(b),
        ]);
    }
    out.table(&t)?;
    Ok(())
}

/// What the ban was judged by; a daemon before the online API sends none: counters.
fn source(b: &Ban) -> &str {
    if b.source.is_empty() {
        "counters"
    } else {
        &b.source
    }
}

/// As [`crate::jobs::xray_apply::bans::Ban::biting`], from the daemon; a daemon before
/// the online API sends no verdict: no traffic since the removal.
fn biting(b: &Ban) -> bool {
    if b.source.is_empty() {
        b.bytes_since == 0
    } else {
        b.biting
    }
}
