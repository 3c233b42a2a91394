//! What node sync keeps between runs, in the queue's state area under
//! `node/{id}/sync`: the last good list (it stays in force whatever the panel answers
//! next), its ETag and generation, and a sync held by the removal guard.
//!
//! Encoding: the kinds' state codec (`jobs::state`) of [`SyncState`]. Documented in
//! `queue-schema/README.md`.

use serde::{Deserialize, Serialize};

use super::users::Users;
use crate::jobs::state as codec;
use crate::queue::{self, Millis, Queue, StateWrite};

/// The record's name under `node/{id}/`.
const RECORD: &str = "sync";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The panel's ETag for `users`, sent as `If-None-Match`.
    pub etag: Option<String>,
    /// Bumped each time `users` changes; 0 before the first good sync.
    pub generation: u64,
    /// When `users` was last fetched and changed.
    pub fetched_at: Millis,
    /// The last good list (written as the `Vec<User>` it was before issue 15).
    pub users: Users,
    pub held: Option<Held>,
}

/// A sync that would remove more users than `sync.max_removal_ratio` allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The list the panel answered with.
    pub users: Users,
    /// When the panel first answered with it.
    pub since: Millis,
    /// Users it would remove, out of `before`.
    pub removed: usize,
    pub before: usize,
    /// An operator confirmed it (`queuectl confirm`).
    pub confirmed: bool,
}

pub fn key(node_id: u64) -> String {
    codec::node_key(node_id, RECORD)
}

/// The node's state; before its first sync, the empty state (generation 0).
pub fn load(queue: &Queue, node_id: u64) -> Result<SyncState, codec::StateError> {
    codec::load(queue, &key(node_id)).map(Option::unwrap_or_default)
}

/// Reads back the record `put` wrote for `node_id`.
pub fn decode(node_id: u64, bytes: &[u8]) -> Result<SyncState, codec::StateError> {
    codec::decode(&key(node_id), bytes)
}

pub fn put(node_id: u64, state: &SyncState) -> StateWrite {
    codec::put(key(node_id), state)
}

/// Every node with a held sync: (node id, hold). A node whose record does not read is
/// logged with its key and left out (its own sync fails on it, naming it too).
pub fn held(queue: &Queue) -> queue::Result<Vec<(u64, Held)>> {
    let mut out = Vec::new();
    for (name, bytes) in queue.state_scan(codec::NODE_PREFIX)? {
        let Some(id) = codec::node_of(&name, RECORD) else {
            continue;
        };
        match codec::decode::<SyncState>(&name, &bytes) {
            Ok(SyncState { held: Some(h), .. }) => out.push((id, h)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "a node's sync state does not read"),
        }
    }
    Ok(out)
}

/// Marks a node's held sync as confirmed; the next sync applies it if the panel still
/// answers the same. Returns the hold, or `None` when nothing is held.
pub async fn confirm(queue: &Queue, node_id: u64) -> Result<Option<Held>, ConfirmError> {
    let mut state = load(queue, node_id)?;
    let Some(h) = state.held.as_mut() else {
        return Ok(None);
    };
    h.confirmed = true;
    let held = h.clone();
    queue
        .commit(queue::Commit {
            state: vec![put(node_id, &state)],
            ..Default::default()
        })
        .await?;
    Ok(Some(held))
}

/// Why a hold could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error("{0}")]
    State(#[from] codec::StateError),
    #[error("{0}")]
    Queue(#[from] queue::Error),
}
