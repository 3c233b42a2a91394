//! `node_sync`: fetch one node's allowed users from the panel, write them to disk, and
//! when they changed, enqueue an `xray_apply`.
//!
//! Produced by [`schedule`]: a sync per node every `sync.interval`. While the queue takes
//! no writes, `xray_apply::without_queue` syncs (through [`NodeSync::sync_volatile`])
//! and applies outside it.
//!
//! Reads: the panel (`peers::panel`), state `node/{id}/sync`.
//! Writes: `{output_dir}/node-{id}/allowed-uuids.{txt,json}` (atomically), state
//! `node/{id}/sync`, and enqueues `xray_apply` for the node (coalescing).
//!
//! Fail static: a non-2xx answer (a redirect included: it is never followed), a
//! timeout, a broken connection, or a broken answer is a failed attempt and changes
//! nothing — files, state, the core; the last good list stays in force. A broken answer
//! ([`userlist`] has the rule) is a body that is not a user list, a list with items of
//! which none is a valid user, or one whose items are more than half invalid. An
//! explicitly empty list is an answer ("nobody"), which the removal guard below can
//! hold. Invalid items of an answer (at most half) are skipped and logged once per
//! changed list, with the node, their count and the first few positions. The new state and the apply job are committed with the ack in one write, so
//! a crash between writing the files and committing only means the next sync writes
//! them again and enqueues the apply then.
//!
//! The removal guard (`sync.max_removal_ratio` < 1): an answer that would remove more
//! than that share of the node's users is held, not applied, until an operator
//! confirms it (`queuectl confirm`) or the panel has repeated it for
//! `sync.confirm_after`.

pub mod files;
pub(crate) mod schedule;
pub mod state;
pub mod userlist;
pub mod users;

use std::sync::Arc;

use crate::config::{ApplyMode, Config};
use crate::jobs;
use crate::jobs::{NodePayload, node_key};
use crate::peers::panel::{Fetched, Panel};
use crate::queue::{AttemptResult, Dedupe, Effects, Handler, Job, Millis, NewJob, Queue, rfc3339};
use crate::telemetry::metrics;

use files::NodeFiles;
use state::{Held, SyncState};
use userlist::UserList;

/// Runs node_sync attempts.
pub struct NodeSync {
    pub queue: Queue,
    pub panel: Panel,
    pub config: Arc<Config>,
}

/// The job that syncs `node_id` now (one live per node).
pub fn job(node_id: u64) -> NewJob {
    NewJob {
        kind: jobs::NODE_SYNC,
        key: node_key(node_id),
        payload: NodePayload {
            node_id,
            generation: None,
        }
        .encode(),
        not_before: None,
        dedupe: Dedupe::Live,
    }
}

fn retry(error: String) -> AttemptResult {
    AttemptResult::Retry {
        error,
        retry_after: None,
    }
}

impl Handler for NodeSync {
    async fn run(&self, job: Job) -> AttemptResult {
        let node_id = match NodePayload::decode(&job.payload) {
            Ok(p) => p.node_id,
            Err(e) => return retry(e.to_string()),
        };
        if self.config.node(node_id).is_none() {
            tracing::warn!(node = node_id, "node is no longer configured; sync dropped");
            return AttemptResult::Done;
        }
        let result = self.sync(node_id).await;
        if matches!(result, AttemptResult::Done | AttemptResult::DoneWith(_)) {
            metrics::sync_succeeded(node_id);
        }
        result
    }
}

/// Why a sync without the queue failed.
#[derive(Debug, thiserror::Error)]
pub enum VolatileError {
    /// The sync's failed attempt, as the job history would record it.
    #[error("{0}")]
    Attempt(String),
    /// The state the sync wrote does not read back.
    #[error("{0}")]
    State(#[from] crate::jobs::state::StateError),
}

impl NodeSync {
    /// One sync of a configured node.
    async fn sync(&self, node_id: u64) -> AttemptResult {
        match state::load(&self.queue, node_id) {
            Ok(st) => self.sync_from(node_id, st).await,
            Err(e) => retry(e.to_string()),
        }
    }

    /// One sync without the queue, for when it takes no writes (a full disk): the panel
    /// is read and the files written as usual, from and into `st` (kept in memory by
    /// the caller). Returns whether the list changed (then the caller applies it).
    /// Nothing is recorded: once the queue takes writes again, the next sync through it
    /// compares the panel's list with the last recorded one and enqueues the apply.
    pub async fn sync_volatile(
        &self,
        node_id: u64,
        st: &mut SyncState,
    ) -> Result<bool, VolatileError> {
        let before = st.generation;
        let result = self.sync_from(node_id, st.clone()).await;
        if let AttemptResult::Retry { error, .. } = result {
            return Err(VolatileError::Attempt(error));
        }
        metrics::sync_succeeded(node_id);
        if let AttemptResult::DoneWith(fx) = result {
            let key = state::key(node_id);
            for w in fx.state {
                if let crate::queue::StateWrite::Put(name, bytes) = w
                    && name == key
                {
                    *st = state::decode(node_id, &bytes)?;
                }
            }
        }
        Ok(st.generation != before)
    }

    async fn sync_from(&self, node_id: u64, mut st: SyncState) -> AttemptResult {
        let files = NodeFiles::new(&self.config.sync.output_dir, node_id);
        let fetched = match self
            .panel
            .allowed_uuids(node_id, st.etag.as_deref().filter(|_| st.generation > 0))
            .await
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(node = node_id, reason = %e, "sync failed; the last good list stays in force");
                return AttemptResult::Retry {
                    error: e.to_string(),
                    retry_after: e.retry_after(),
                };
            }
        };
        let now = self.queue.now();
        let (bytes, etag) = match fetched {
            Fetched::NotModified => {
                tracing::debug!(node = node_id, "panel: not modified");
                return self.ensure_files(&files, node_id, &st);
            }
            Fetched::Body { bytes, etag } => (bytes, etag),
        };
        let list = match userlist::parse(&bytes) {
            Ok(l) => l,
            Err(e) => {
                let error = format!(
                    "panel answer for node {node_id} is broken: {e} — keeping the last good list"
                );
                tracing::warn!(node = node_id, reason = %error, "sync failed: unusable panel answer; the last good list stays in force");
                return retry(error);
            }
        };
        let same = st.generation > 0 && list.users == st.users;
        report_skipped(node_id, &list, same);
        let users = list.users;
        if same {
            // Same list (the panel sent no ETag, or a new one): nothing to rewrite.
            let mut fx = Effects::default();
            if st.etag != etag || st.held.is_some() {
                st.etag = etag;
                st.held = None;
                fx.state.push(state::put(node_id, &st));
            }
            if let AttemptResult::Retry { error, retry_after } =
                self.ensure_files(&files, node_id, &st)
            {
                return AttemptResult::Retry { error, retry_after };
            }
            return AttemptResult::DoneWith(fx);
        }
        if let Some(hold) = self.guard(node_id, &st, &users, now) {
            let note = format!(
                "held by the removal guard: the answer would remove {} of {} users",
                hold.removed, hold.before
            );
            st.held = Some(hold);
            return AttemptResult::DoneWith(Effects {
                state: vec![state::put(node_id, &st)],
                enqueue: Vec::new(),
                wake: Vec::new(),
                note: Some(note),
            });
        }
        if let Err(e) = files.write(node_id, &users, now) {
            let error = format!("cannot write {}: {e}", files.dir.display());
            tracing::error!(node = node_id, %error);
            return retry(error);
        }
        let before = st.users.len();
        tracing::info!(
            node = node_id,
            users = users.len(),
            before,
            generation = st.generation + 1,
            "allowed users changed; files written"
        );
        st = SyncState {
            etag,
            generation: st.generation + 1,
            fetched_at: now,
            users,
            held: None,
        };
        let mut fx = Effects {
            state: vec![state::put(node_id, &st)],
            enqueue: Vec::new(),
            wake: Vec::new(),
            note: Some(format!(
                "{} users (was {before}); generation {}",
                st.users.len(),
                st.generation
            )),
        };
        if self.config.apply.mode != ApplyMode::None {
            fx.enqueue
                .push(crate::jobs::apply_job(node_id, st.generation));
        }
        AttemptResult::DoneWith(fx)
    }

    /// Rewrites the files from the last good list if someone deleted them.
    fn ensure_files(&self, files: &NodeFiles, node_id: u64, st: &SyncState) -> AttemptResult {
        if st.generation > 0 && !(files.txt.exists() && files.json.exists()) {
            tracing::warn!(node = node_id, dir = %files.dir.display(), "output files were missing; rewritten from the last good list");
            if let Err(e) = files.write(node_id, &st.users, st.fetched_at) {
                return retry(format!("cannot write {}: {e}", files.dir.display()));
            }
        }
        AttemptResult::Done
    }

    /// The removal guard: `Some(hold)` when this answer must be held rather than applied.
    fn guard(
        &self,
        node_id: u64,
        st: &SyncState,
        users: &userlist::Users,
        now: Millis,
    ) -> Option<Held> {
        let ratio = self.config.sync.max_removal_ratio;
        if ratio >= 1.0 || st.generation == 0 || st.users.is_empty() {
            return None;
        }
        let removed = userlist::removed_count(&st.users, users);
        let before = st.users.len();
        if (removed as f64) / (before as f64) <= ratio {
            return None;
        }
        let confirm_after = self.config.sync.confirm_after;
        match &st.held {
            Some(h) if h.users == *users => {
                let repeated_for = now.saturating_sub(h.since);
                if h.confirmed || repeated_for >= confirm_after.as_millis() as u64 {
                    tracing::warn!(
                        node = node_id,
                        removed,
                        before,
                        confirmed = h.confirmed,
                        "applying held sync ({})",
                        if h.confirmed {
                            "confirmed by an operator"
                        } else {
                            "the panel repeated it for sync.confirm_after"
                        }
                    );
                    None
                } else {
                    tracing::warn!(
                        node = node_id,
                        removed,
                        before,
                        applies_at = %rfc3339(h.since + confirm_after.as_millis() as u64),
                        "sync still held by the removal guard"
                    );
                    Some(h.clone())
                }
            }
            _ => {
                tracing::warn!(
                    node = node_id,
                    removed,
                    before,
                    max_removal_ratio = ratio,
                    applies_at = %rfc3339(now + confirm_after.as_millis() as u64),
                    "sync HELD: the panel's answer would remove {removed} of {before} users; it applies if the panel repeats it until applies_at, or now with `queuectl confirm {node_id}`"
                );
                Some(Held {
                    users: users.clone(),
                    since: now,
                    removed,
                    before,
                    confirmed: false,
                })
            }
        }
    }
}

/// Says what was left out of an answer: once per changed list as a warning (the same
/// list every interval would repeat it), otherwise at debug level.
fn report_skipped(node_id: u64, list: &UserList, same: bool) {
    if list.skipped.is_empty() && list.duplicates == 0 {
        return;
    }
    let examples = userlist::examples(&list.skipped);
    let message = "panel list had invalid or repeated entries; they were left out";
    if same {
        tracing::debug!(
            node = node_id,
            items = list.items,
            skipped = list.skipped.len(),
            duplicates = list.duplicates,
            examples = %examples,
            "{message}"
        );
    } else {
        tracing::warn!(
            node = node_id,
            items = list.items,
            skipped = list.skipped.len(),
            duplicates = list.duplicates,
            examples = %examples,
            "{message}"
        );
    }
}
