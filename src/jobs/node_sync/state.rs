//! What node sync keeps between runs, in the queue's state area under
//! `node/{id}/sync`: the last good list (it stays in force whatever the panel answers
//! next), its ETag and generation, and a sync held by the removal guard.
//!
//! Encoding: one version byte (1), then bincode 2 (standard config) of [`SyncState`].
//! Documented in `queue-schema/README.md`.

use serde::{Deserialize, Serialize};

use super::userlist::User;
use crate::queue::{self, Millis, Queue, StateWrite};

const VERSION: u8 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The panel's ETag for `users`, sent as `If-None-Match`.
    pub etag: Option<String>,
    /// Bumped each time `users` changes; 0 before the first good sync.
    pub generation: u64,
    /// When `users` was last fetched and changed.
    pub fetched_at: Millis,
    /// The last good list, sorted by UUID.
    pub users: Vec<User>,
    pub held: Option<Held>,
}

/// A sync that would remove more users than `sync.max_removal_ratio` allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The list the panel answered with.
    pub users: Vec<User>,
    /// When the panel first answered with it.
    pub since: Millis,
    /// Users it would remove, out of `before`.
    pub removed: usize,
    pub before: usize,
    /// An operator confirmed it (`queuectl confirm`).
    pub confirmed: bool,
}

pub fn key(node_id: u64) -> String {
    format!("node/{node_id}/sync")
}

pub fn load(queue: &Queue, node_id: u64) -> Result<SyncState, String> {
    match queue.state(&key(node_id)).map_err(|e| e.to_string())? {
        None => Ok(SyncState::default()),
        Some(bytes) => decode(&bytes),
    }
}

pub fn decode(bytes: &[u8]) -> Result<SyncState, String> {
    match bytes.split_first() {
        Some((&VERSION, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(s, _)| s)
                .map_err(|e| format!("node sync state does not decode: {e}"))
        }
        Some((v, _)) => Err(format!(
            "node sync state has version {v}; this build reads version {VERSION}"
        )),
        None => Err("node sync state is empty".into()),
    }
}

pub fn put(node_id: u64, state: &SyncState) -> StateWrite {
    let mut bytes = vec![VERSION];
    // Plain data always encodes.
    bytes.extend(
        bincode::serde::encode_to_vec(state, bincode::config::standard()).unwrap_or_default(),
    );
    StateWrite::Put(key(node_id), bytes)
}

/// Every node with a held sync: (node id, hold).
pub fn held(queue: &Queue) -> queue::Result<Vec<(u64, Held)>> {
    let mut out = Vec::new();
    for (name, bytes) in queue.state_scan("node/")? {
        let Some(id) = name
            .strip_prefix("node/")
            .and_then(|r| r.strip_suffix("/sync"))
            .and_then(|id| id.parse().ok())
        else {
            continue;
        };
        if let Ok(SyncState { held: Some(h), .. }) = decode(&bytes) {
            out.push((id, h));
        }
    }
    Ok(out)
}

/// Marks a node's held sync as confirmed; the next sync applies it if the panel still
/// answers the same. Returns the hold, or `None` when nothing is held.
pub async fn confirm(queue: &Queue, node_id: u64) -> Result<Option<Held>, String> {
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
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(held))
}
