//! `xray-grpc` mode: a level-triggered reconcile of one node's inbound with its synced
//! list, over the core's API.
//!
//! 1. Check the inbound's protocol (Xray's `ListInbounds`) before sending any account:
//!    an account of another protocol crashes the whole core. V2Ray cannot list
//!    inbounds; there the configured protocol is all there is.
//! 2. What the core has: Xray lists the inbound's users (`GetInboundUsers`); V2Ray
//!    cannot, so the agent's own record of what it added stands in. When the core may
//!    have lost users (its boot time moved: a restart; or the caller says so, `resend`:
//!    the core watcher saw it come back, or saw a user missing), that record cannot be
//!    trusted for adds, and every listed user is sent again ("already exists" is
//!    success); removes still go to every recorded user the panel dropped.
//! 3. Send only the difference: removes first (a ban should bite at once), then adds,
//!    with bounded concurrency on the one channel. "already exists" and "not found"
//!    count as success.
//!
//! Which users are the agent's: those whose email has the `email_template` shape for
//! this node, and those it recorded adding. Users with other emails (added by hand or
//! in the core's config) are left alone.
//!
//! Before adding, the emails about to be added are recorded (state `node/{id}/managed`):
//! a crash in the middle leaves no user in the core that the agent does not know it
//! added, so a later apply can still remove them.

use std::collections::BTreeSet;

use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Node, Xray};
use crate::jobs::node_sync::users::{Merged, UserRef, Users, merge};
use crate::jobs::state as codec;
use crate::jobs::xray_apply::cut::Cutter;
use crate::peers::xray::account::{self, InboundKind};
use crate::peers::xray::email::{EmailShape, email_for, is_templated};
use crate::peers::xray::{Added, Removed, XrayClient, XrayError};
use crate::queue::{Commit, Millis, Queue, StateWrite};

/// What the agent knows it put into a node's inbound (state `node/{id}/managed`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Managed {
    /// Emails added and not (yet) removed, lowercase, sorted.
    pub emails: BTreeSet<String>,
    /// When the core started, as seen at the last apply (ms since the epoch).
    pub core_boot_ms: Option<Millis>,
}

pub fn managed_key(node_id: u64) -> String {
    codec::node_key(node_id, "managed")
}

/// The node's managed users; none before the first apply in this mode.
pub fn load_managed(queue: &Queue, node_id: u64) -> Result<Managed, codec::StateError> {
    codec::load(queue, &managed_key(node_id)).map(Option::unwrap_or_default)
}

/// A panel user that makes no account for its node's inbound.
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {source}")]
pub struct UserError {
    pub node: u64,
    #[source]
    pub source: account::AccountError,
}

pub fn put_managed(node_id: u64, m: &Managed) -> StateWrite {
    codec::put(managed_key(node_id), m)
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub added: usize,
    pub removed: usize,
    /// Adds the core answered "already exists" (or removes "not found").
    pub already: usize,
    /// Users the core had before, as far as the agent could tell.
    pub core_had: usize,
    pub core_restarted: bool,
    pub managed: Managed,
    /// The node's watched bans, with this apply's removals added.
    pub bans: super::bans::Bans,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "+{} -{} ({} already so; the core had {}{})",
            self.added,
            self.removed,
            self.already,
            self.core_had,
            if self.core_restarted {
                "; the core had restarted"
            } else {
                ""
            }
        )
    }
}

/// Two boot times (ms since the epoch, from uptime in whole seconds) further apart than
/// this are two runs of the core. Estimates of one boot differ by under a second (the
/// uptime is truncated) plus the call's latency.
const SAME_BOOT_MS: u64 = 2_000;

/// What an inbound of `node` expects of each user.
pub fn inbound_kind(node: &Node) -> InboundKind {
    InboundKind {
        protocol: node.protocol,
        flow: node.flow.clone(),
        cipher: node.cipher,
    }
}

/// The user the core gets for panel entry `u` on `node`.
pub fn core_user(
    client: &XrayClient,
    xray: &Xray,
    node: &Node,
    u: UserRef<'_>,
) -> Result<account::CoreUser, UserError> {
    account::user(
        client.flavor(),
        &inbound_kind(node),
        u.uuid,
        email_for(&xray.email_template, node.id, u.uuid),
        u.flow,
        u.level.unwrap_or(0),
    )
    .map_err(|source| UserError {
        node: node.id,
        source,
    })
}

/// Makes `node`'s inbound hold exactly `users` (of those the agent manages).
///
/// `resend`: the core may have lost users without its uptime showing it (it came back
/// after being unreachable, or a user the agent added is missing). Where the core
/// cannot list its users (V2Ray), every user is then added again.
pub async fn reconcile(
    queue: &Queue,
    client: &XrayClient,
    xray: &Xray,
    node: &Node,
    users: &Users,
    resend: bool,
) -> Result<Outcome, ReconcileError> {
    reconcile_cutting(queue, client, xray, node, users, resend, None).await
}

/// [`reconcile`], and with a [`Cutter`] the removed users' established connections are
/// cut right after the core confirmed their removal (before any add).
pub async fn reconcile_cutting(
    queue: &Queue,
    client: &XrayClient,
    xray: &Xray,
    node: &Node,
    users: &Users,
    resend: bool,
    cutter: Option<&Arc<Cutter>>,
) -> Result<Outcome, ReconcileError> {
    let tag = node.inbound_tag.as_str();
    let kind = inbound_kind(node);
    let unreachable = |source: XrayError| ReconcileError::Core {
        node: node.id,
        source,
    };

    // 1. Never send an account the inbound cannot take.
    // The inbound's ports, for a cut: the core's own answer where it has one.
    let mut ports: Vec<u16> = node.port.into_iter().collect();
    if let Some(inbounds) = client.inbounds().await.map_err(unreachable)? {
        let expected = kind.inbound_type(client.flavor());
        if let Some(i) = inbounds.get(tag)
            && !i.ports.is_empty()
        {
            ports = i.ports.clone();
        }
        let types: std::collections::BTreeMap<String, String> = inbounds
            .into_iter()
            .map(|(t, i)| (t, i.proxy_type))
            .collect();
        match types.get(tag) {
            None => {
                let tags: Vec<&str> = types.keys().map(String::as_str).collect();
                return Err(ReconcileError::NoInbound {
                    node: node.id,
                    tag: tag.to_string(),
                    tags: tags.join(", "),
                });
            }
            Some(actual) if *actual != expected => {
                return Err(ReconcileError::Mismatch {
                    node: node.id,
                    tag: tag.to_string(),
                    protocol: account::protocol_of(actual).to_string(),
                    actual: actual.clone(),
                    configured: kind.describe(),
                    expected: expected.to_string(),
                });
            }
            Some(_) => {}
        }
    }

    // 2. What the core has.
    let uptime = client.uptime().await.map_err(unreachable)?;
    let now = queue.now();
    let boot = now.saturating_sub(u64::from(uptime) * 1000);
    let mut managed = load_managed(queue, node.id)?;
    let restarted = managed
        .core_boot_ms
        .is_some_and(|b| b.abs_diff(boot) > SAME_BOOT_MS);
    let listed = client.inbound_emails(tag).await.map_err(unreachable)?;
    // V2Ray: what we added stands in for what the core has, for removes; for adds only
    // while the core cannot have lost them.
    let add_all = listed.is_none() && (restarted || resend);
    // The agent's emails are held as the UUIDs in them (16 bytes, sorted), and the
    // lists compared by merging: at 100,000 users a set of email strings is ~10 MB a
    // copy, and the reconcile held three (issue 15). Only a template that names the
    // UUID once reads back; with any other every email stays text.
    let shape = EmailShape::new(&xray.email_template, node.id)
        .filter(|_| xray.email_template.matches("{uuid}").count() == 1);
    let core = match &listed {
        Some(emails) => Split::of(shape.as_ref(), emails.iter().map(String::as_str)),
        None => Split::of(shape.as_ref(), managed.emails.iter().map(String::as_str)),
    };
    drop(listed);

    // 3. The difference.
    let email = |u: Uuid| email_for(&xray.email_template, node.id, u);
    // Only without a shape: the desired emails as text.
    let desired_text: BTreeSet<String> = match shape {
        Some(_) => BTreeSet::new(),
        None => users.uuids().iter().map(|&u| email(u)).collect(),
    };
    let desired_has = |e: &str| match &shape {
        Some(s) => s.uuid_of(e).is_some_and(|u| users.contains(&u)),
        None => desired_text.contains(e),
    };
    let mut to_remove: Vec<String> = Vec::new();
    let mut to_add: Vec<Uuid> = Vec::new();
    if shape.is_some() {
        for m in merge(&core.uuids, users.uuids()) {
            match m {
                Merged::Left(u) => to_remove.push(email(u)),
                Merged::Right(u) => to_add.push(u),
                Merged::Both(u) if add_all => to_add.push(u),
                Merged::Both(_) => {}
            }
        }
    } else {
        to_add.extend(
            users
                .uuids()
                .iter()
                .filter(|&&u| add_all || !core.other.contains(&email(u))),
        );
    }
    to_remove.extend(
        core.other
            .iter()
            .filter(|e| !desired_has(e))
            .filter(|e| {
                managed.emails.contains(*e) || is_templated(&xray.email_template, node.id, e)
            })
            .cloned(),
    );
    // Every account is checked before any is recorded or sent; each is made again when
    // sent rather than held, 100,000 of them at once.
    for &u in &to_add {
        if let Some(user) = users.get(&u) {
            core_user(client, xray, node, user)?;
        }
    }

    // Record the adds before making them. When the queue takes no writes (a full
    // disk), add anyway: the users are templated (so a later apply can still remove
    // them) and the panel's list must reach the core.
    if !to_add.is_empty() {
        managed.emails.extend(to_add.iter().map(|&u| email(u)));
        match queue
            .commit(Commit {
                state: vec![put_managed(node.id, &managed)],
                ..Commit::default()
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_unwritable() => {
                tracing::warn!(node = node.id, error = %e, "adding users without recording them first: the queue takes no writes");
            }
            Err(e) => return Err(ReconcileError::Record(e)),
        }
    }

    let mut out = Outcome {
        core_had: core.len(),
        core_restarted: restarted,
        ..Outcome::default()
    };
    let width = xray.concurrency.max(1);
    let mut failures: Vec<String> = Vec::new();
    // Each future owns what it uses (a clone of the client shares the one channel).
    let removes = futures_util::stream::iter(to_remove.iter().cloned().map(|email| {
        let (client, tag) = (client.clone(), tag.to_string());
        async move {
            let r = client.remove_user(&tag, &email).await;
            (email, r)
        }
    }))
    .buffer_unordered(width)
    .collect::<Vec<_>>()
    .await;
    for (email, r) in removes {
        match r {
            Ok(Removed::Gone) => {
                out.removed += 1;
                managed.emails.remove(&email);
            }
            Ok(Removed::WasAbsent) => {
                out.already += 1;
                managed.emails.remove(&email);
            }
            Err(e) => failures.push(format!("remove {email}: {e}")),
        }
    }
    // Cut before adding: a ban should bite at once.
    let removed_now: Vec<String> = to_remove
        .iter()
        .filter(|e| !managed.emails.contains(*e))
        .cloned()
        .collect();
    let mut cuts = std::collections::BTreeMap::new();
    if let Some(cutter) = cutter {
        cutter.tracking.set_ports(node.id, ports.clone());
    }
    if let Some(cutter) = cutter
        && !removed_now.is_empty()
    {
        let (c, node_id, emails) = (cutter.clone(), node.id, removed_now.clone());
        cuts = tokio::task::spawn_blocking(move || c.cut(node_id, &ports, &emails, now))
            .await
            .unwrap_or_default();
    }
    let total = to_remove.len() + to_add.len();
    let adds = futures_util::stream::iter(to_add.into_iter().filter_map(|u| {
        // Checked above: every one of them makes an account.
        let user = core_user(client, xray, node, users.get(&u)?).ok()?;
        let (client, tag) = (client.clone(), tag.to_string());
        Some(async move {
            let r = client.add_user(&tag, &user).await;
            (user.email, r)
        })
    }))
    .buffer_unordered(width)
    .collect::<Vec<_>>()
    .await;
    for (email, r) in adds {
        match r {
            Ok(Added::New) => out.added += 1,
            Ok(Added::Existed) => out.already += 1,
            Err(e) => failures.push(format!("add {email}: {e}")),
        }
    }
    managed.core_boot_ms = Some(boot);
    out.managed = managed;
    // Watch the users just removed: established connections keep flowing.
    // Only a watch list: one that does not read is started again, said with its key.
    let mut bans = super::bans::load(queue, node.id).unwrap_or_else(|e| {
        tracing::warn!(node = node.id, error = %e, "watched bans lost; watching from now");
        super::bans::Bans::new()
    });
    bans.retain(|email, _| !desired_has(email));
    let removed: Vec<&String> = to_remove
        .iter()
        .filter(|e| !out.managed.emails.contains(*e))
        .collect();
    if !removed.is_empty() {
        let counters = client
            .query_stats("user>>>", false)
            .await
            .map(|c| super::bans::user_bytes(&c))
            .unwrap_or_default();
        for email in removed {
            bans.insert(
                email.clone(),
                super::bans::Ban {
                    removed_at: now,
                    bytes_at_removal: counters.get(email).copied().unwrap_or(0),
                    last_checked: now,
                    cut: cuts.remove(email.as_str()),
                    ..Default::default()
                },
            );
        }
    }
    out.bans = bans;
    if failures.is_empty() {
        return Ok(out);
    }
    // Keep what did happen, then fail the attempt.
    let _ = queue
        .commit(Commit {
            state: vec![put_managed(node.id, &out.managed)],
            ..Commit::default()
        })
        .await;
    Err(ReconcileError::Operations {
        node: node.id,
        failed: failures.len(),
        total,
        done: out.describe(),
        first: failures.swap_remove(0),
    })
}

/// A set of emails split by a node's email shape: the agent's as the UUIDs in them
/// (sorted, each once), any other as text (lowercase).
#[derive(Debug, Default, PartialEq, Eq)]
struct Split {
    uuids: Vec<Uuid>,
    other: BTreeSet<String>,
}

impl Split {
    fn of<'a>(shape: Option<&EmailShape>, emails: impl Iterator<Item = &'a str>) -> Split {
        let mut out = Split::default();
        for e in emails {
            match shape.and_then(|s| s.uuid_of(e)) {
                Some(u) => out.uuids.push(u),
                None => {
                    out.other.insert(e.to_lowercase());
                }
            }
        }
        out.uuids.sort_unstable();
        out.uuids.dedup();
        out
    }

    fn len(&self) -> usize {
        self.uuids.len() + self.other.len()
    }
}

/// Why a reconcile failed; its Display is the attempt's error in the job history.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("node {node}: {source}")]
    Core {
        node: u64,
        #[source]
        source: XrayError,
    },
    #[error("node {node}: the core has no inbound tagged `{tag}` (it has: {tags})")]
    NoInbound {
        node: u64,
        tag: String,
        tags: String,
    },
    #[error(
        "node {node}: inbound `{tag}` is {protocol} (`{actual}`) but the node is configured as {configured} (`{expected}`): refusing to send its users, a mismatched account would crash the core; fix the node's protocol (or cipher) or the inbound"
    )]
    Mismatch {
        node: u64,
        tag: String,
        protocol: String,
        actual: String,
        configured: String,
        expected: String,
    },
    #[error("{0}")]
    State(#[from] codec::StateError),
    #[error("{0}")]
    User(#[from] UserError),
    /// The adds could not be recorded before being made.
    #[error("{0}")]
    Record(#[source] crate::queue::Error),
    /// Some operations failed: each one's own error is in `first` (the first).
    #[error("node {node}: {failed} of {total} operations failed ({done}); first: {first}")]
    Operations {
        node: u64,
        failed: usize,
        total: usize,
        done: String,
        first: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_split_into_the_agents_uuids_and_the_rest() {
        let shape = EmailShape::new("{node_id}:{uuid}", 7);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let emails = [
            email_for("{node_id}:{uuid}", 7, b),
            email_for("{node_id}:{uuid}", 7, a).to_uppercase(),
            email_for("{node_id}:{uuid}", 7, b),
            email_for("{node_id}:{uuid}", 8, a),
            "Hand@Made".to_string(),
        ];
        let split = Split::of(shape.as_ref(), emails.iter().map(String::as_str));
        assert_eq!(split.uuids, [a, b]);
        assert_eq!(
            split.other.iter().map(String::as_str).collect::<Vec<_>>(),
            [email_for("{node_id}:{uuid}", 8, a).as_str(), "hand@made"]
        );
        assert_eq!(split.len(), 4);
        // Without a shape every email stays text.
        let text = Split::of(None, emails.iter().map(String::as_str));
        assert!(text.uuids.is_empty());
        assert_eq!(text.other.len(), 4);
    }
}
