//! The panel: reachable, the internal key accepted, each node known, each answer a
//! user list the agent can read. One `GET …/allowed-uuids` per node, through the
//! agent's own panel client (no redirects followed, the key sent only there) and
//! node_sync's own parser, so what passes here is what the sync job will see.
//!
//! Lines: `panel` (an answer came back at all), `panel key` (it was not 401/403), then
//! per node `node N` (known: not 404, and its body parses). Once the panel cannot be
//! reached, or refuses the key, the per-node lines would only repeat that: they are
//! left out.

use super::Check;
use crate::config::{Config, ShownUrl};
use crate::jobs::node_sync::userlist;
use crate::peers::panel::{Fetched, Panel, PanelError};

pub(super) async fn checks(cfg: &Config) -> Vec<Check> {
    let url = ShownUrl(&cfg.panel.base_url).to_string();
    if cfg.nodes.is_empty() {
        return vec![Check::ok(
            "panel",
            format!("not called: no node is configured ({url})"),
        )];
    }
    let panel = match Panel::new(&cfg.panel) {
        Ok(p) => p,
        Err(e) => {
            return vec![Check::fail(
                "panel",
                e.to_string(),
                "set INTERNAL_API_KEY (or panel.internal_api_key_file)",
            )];
        }
    };
    let mut out = Vec::new();
    let mut reached = false;
    let mut key_ok = false;
    for node in &cfg.nodes {
        let name = format!("node {}", node.id);
        match panel.allowed_uuids(node.id, None).await {
            Ok(answer) => {
                note_reached(&mut out, &mut reached, &url);
                note_key(&mut out, &mut key_ok);
                out.push(read_answer(&name, answer));
            }
            Err(PanelError::Status { status, .. })
                if status.as_u16() == 401 || status.as_u16() == 403 =>
            {
                note_reached(&mut out, &mut reached, &url);
                out.push(Check::fail(
                    "panel key",
                    format!(
                        "the panel answered {status} for node {}: it refuses the internal API key",
                        node.id
                    ),
                    "set INTERNAL_API_KEY (panel.internal_api_key or _file) to the key the panel expects",
                ));
                return out;
            }
            Err(PanelError::Status { status, .. }) if status.as_u16() == 404 => {
                note_reached(&mut out, &mut reached, &url);
                note_key(&mut out, &mut key_ok);
                out.push(Check::fail(
                    name,
                    format!("the panel answered {status}: it does not know node {}", node.id),
                    format!(
                        "use the node id the panel shows for this server, or remove node {} from nodes (NODE_IDS)",
                        node.id
                    ),
                ));
            }
            Err(e @ PanelError::Status { .. }) | Err(e @ PanelError::Redirect { .. }) => {
                note_reached(&mut out, &mut reached, &url);
                out.push(Check::fail(
                    name,
                    e.to_string(),
                    "see the panel's logs for this node; the sync job retries on its ladder meanwhile",
                ));
            }
            Err(e) => {
                out.push(Check::fail(
                    "panel",
                    // The error names the URL (masked) where it has one.
                    e.to_string(),
                    "check that the panel runs and panel.base_url (PANEL_BASE_URL) points at it; raise panel.timeout (HTTP_TIMEOUT_SECONDS) for a slow one",
                ));
                return out;
            }
        }
    }
    out
}

fn note_reached(out: &mut Vec<Check>, reached: &mut bool, url: &str) {
    if !*reached {
        *reached = true;
        out.push(Check::ok("panel", format!("{url} answers")));
    }
}

fn note_key(out: &mut Vec<Check>, key_ok: &mut bool) {
    if !*key_ok {
        *key_ok = true;
        out.push(Check::ok("panel key", "accepted (not shown)"));
    }
}

/// A `200`'s body through node_sync's parser.
fn read_answer(name: &str, answer: Fetched) -> Check {
    let bytes = match answer {
        // Asked without an ETag: a 304 is odd, but the node is known and the key taken.
        Fetched::NotModified => {
            return Check::ok(name, "known (the panel answered 304 Not Modified)");
        }
        Fetched::Body { bytes, .. } => bytes,
    };
    match userlist::parse(&bytes) {
        Ok(list) => {
            let mut detail = format!("known, {} allowed users", list.users.len());
            if !list.skipped.is_empty() {
                detail.push_str(&format!(
                    "; {} invalid items are skipped ({})",
                    list.skipped.len(),
                    userlist::examples(&list.skipped)
                ));
            }
            if list.skipped.is_empty() {
                Check::ok(name, detail)
            } else {
                Check::warn(
                    name,
                    detail,
                    "fix those entries in the panel; the valid users are applied",
                )
            }
        }
        Err(e) => Check::fail(
            name,
            format!("known, but its answer is not a user list the agent can read: {e}"),
            "make the panel answer a JSON array of UUIDs (or objects with `uuid`), or {\"uuids\": [...]} optionally under `data`; until then the last good list stays in force",
        ),
    }
}
