//! `xray_apply`: make one node's users what the last good sync says.
//!
//! Modes (`apply.mode`):
//! - `cmd`: run `APPLY_CMD` with `{node_id}`, `{uuids_file}`, `{uuids_json}` substituted
//!   (see `peers::hook`); exit 0 is success, anything else a failed attempt.
//! - `none`: files only; no apply jobs are enqueued.
//! - `xray-grpc`: reconcile the inbound with the list over the core's gRPC API
//!   ([`grpc`]).
//!
//! Produced by `node_sync` (a changed list) and, in `xray-grpc` mode, by [`core_watch`]
//! (the core restarted or lost users; it also checks the watched [`bans`]).
//!
//! With `xray.access_log`, [`connections`] follows the core's access log (which source
//! address is which user's connection); with `xray.cut_connections`, [`cut`] destroys a
//! removed user's established connections right after the removal.
//!
//! Reads: state `node/{id}/sync`, the output files (through the hook), the core.
//! Writes: state `node/{id}/applied` (and `node/{id}/managed`, `node/{id}/bans` in
//! `xray-grpc` mode); the core's users.
//!
//! Pending applies of a node coalesce (one pending job per node takes the newest
//! generation), and attempts for one node never overlap: a per-node lock serialises
//! them when a new apply was enqueued while one was running.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::{ApplyMode, Config};
use crate::jobs::NodePayload;
use crate::jobs::node_sync::files::NodeFiles;
use crate::jobs::state::{self, StateError};
use crate::peers::hook;
use crate::peers::xray::XrayClient;

pub mod bans;
pub mod connections;
pub(crate) mod core_watch;
pub mod cut;
pub mod grpc;
pub(crate) mod without_queue;
use crate::queue::{AttemptResult, Effects, Handler, Job, Millis, Queue, StateWrite};

/// The apply job for a node's synced list of `generation` (defined in [`crate::jobs`],
/// where node_sync, which enqueues it, can reach it without depending on this kind).
pub use super::apply_job as job;

/// What was last applied to a node (state `node/{id}/applied`: the kinds' state codec;
/// JSON before it, still read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub generation: u64,
    pub users: usize,
    pub at: Millis,
}

pub fn applied_key(node_id: u64) -> String {
    state::node_key(node_id, "applied")
}

/// What was last applied to the node; `None` before its first apply.
pub fn load_applied(queue: &Queue, node_id: u64) -> Result<Option<Applied>, StateError> {
    state::load(queue, &applied_key(node_id))
}

/// Runs xray_apply attempts.
pub struct XrayApply {
    pub queue: Queue,
    pub config: Arc<Config>,
    /// The core's API, in `xray-grpc` mode.
    pub core: Option<XrayClient>,
    locks: StdMutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Nodes whose next reconcile sends every user again ([`XrayApply::resend`]). In
    /// memory: what sets it (the core watcher) runs in this process.
    resend: StdMutex<BTreeSet<u64>>,
    /// Who is connected from where (`xray.access_log`, `xray-grpc` mode): the daemon
    /// runs its follower.
    pub tracking: Option<Arc<connections::Tracking>>,
    /// Cuts removed users' connections (`xray.cut_connections`).
    pub cutter: Option<Arc<cut::Cutter>>,
}

impl XrayApply {
    pub fn new(queue: Queue, config: Arc<Config>) -> Result<Self, crate::peers::xray::XrayError> {
        let core = match (&config.apply.mode, &config.xray) {
            (ApplyMode::XrayGrpc, Some(x)) => Some(XrayClient::new(&x.api, x.flavor, x.timeout)?),
            _ => None,
        };
        let tracking = core
            .as_ref()
            .and_then(|_| connections::Tracking::for_config(&config))
            .map(Arc::new);
        let cutter = match (&tracking, &config.xray) {
            (Some(t), Some(x)) if x.cut_connections => Some(Arc::new(cut::Cutter::new(t.clone()))),
            _ => None,
        };
        Ok(XrayApply {
            queue,
            config,
            core,
            locks: StdMutex::new(HashMap::new()),
            resend: StdMutex::new(BTreeSet::new()),
            tracking,
            cutter,
        })
    }

    /// The core may have lost `node_id`'s users where neither its listing nor its uptime
    /// can show it (V2Ray cannot list users; a restart within the core's first second
    /// does not show in its uptime): its next reconcile adds every user again.
    pub fn resend(&self, node_id: u64) {
        self.resend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node_id);
    }

    fn take_resend(&self, node_id: u64) -> bool {
        self.resend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&node_id)
    }

    /// The lock that serialises everything touching one node's core state.
    pub(crate) fn lock_for(&self, node_id: u64) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(node_id)
            .or_default()
            .clone()
    }
}

fn retry(error: String) -> AttemptResult {
    AttemptResult::Retry {
        error,
        retry_after: None,
    }
}

impl Handler for XrayApply {
    async fn run(&self, job: Job) -> AttemptResult {
        let node_id = match NodePayload::decode(&job.payload) {
            Ok(p) => p.node_id,
            Err(e) => return retry(e.to_string()),
        };
        let lock = self.lock_for(node_id);
        let _serial = lock.lock().await;
        let synced = match crate::jobs::node_sync::state::load(&self.queue, node_id) {
            Ok(s) => s,
            Err(e) => return retry(e.to_string()),
        };
        if synced.generation == 0 {
            return retry(format!("node {node_id} has no synced list yet"));
        }
        match self.config.apply.mode {
            ApplyMode::Cmd => {}
            ApplyMode::None => return AttemptResult::Done,
            // Level-triggered: reconciled every time, the core may have changed.
            ApplyMode::XrayGrpc => return self.reconcile(node_id, &synced).await,
        }
        let applied = load_applied(&self.queue, node_id).unwrap_or_else(|e| {
            // Applying again is always safe: the record is rewritten after it.
            tracing::warn!(node = node_id, error = %e, "applying the list again");
            None
        });
        if applied.is_some_and(|a| a.generation >= synced.generation) {
            tracing::debug!(
                node = node_id,
                generation = synced.generation,
                "already applied"
            );
            return AttemptResult::Done;
        }
        match self.run_hook(node_id, &synced).await {
            Ok(output) => AttemptResult::DoneWith(Effects {
                state: vec![self.applied(node_id, &synced)],
                enqueue: Vec::new(),
                wake: Vec::new(),
                note: Some(output),
            }),
            Err(error) => retry(error.to_string()),
        }
    }
}

/// Why an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The hook could not be run.
    #[error("{0}")]
    Spawn(#[from] hook::HookError),
    /// The hook ran and failed: what it said.
    #[error("{0}")]
    Hook(String),
    /// A reconcile's failed attempt, as the job history records it.
    #[error("{0}")]
    Attempt(String),
}

impl XrayApply {
    /// Runs `APPLY_CMD` for the node's output files; `Ok` holds what it said.
    async fn run_hook(
        &self,
        node_id: u64,
        synced: &crate::jobs::node_sync::state::SyncState,
    ) -> Result<String, ApplyError> {
        let files = NodeFiles::new(&self.config.sync.output_dir, node_id);
        let argv = hook::substitute(&self.config.apply.argv, node_id, &files.txt, &files.json);
        let timeout = self.config.apply.timeout;
        let run = hook::run(&argv, timeout).await?;
        if !run.success() {
            let error = run.describe(timeout);
            tracing::warn!(node = node_id, %error, "apply hook failed");
            return Err(ApplyError::Hook(error));
        }
        tracing::info!(
            node = node_id,
            generation = synced.generation,
            users = synced.users.len(),
            output = %run.describe(timeout),
            "applied"
        );
        Ok(run.describe(timeout))
    }

    /// Applies `synced` to the node without recording anything in the queue: for when
    /// the queue takes no writes (a full disk). The next apply through the queue, once
    /// it takes writes again, reconciles and records as usual.
    pub async fn apply_volatile(
        &self,
        node_id: u64,
        synced: &crate::jobs::node_sync::state::SyncState,
    ) -> Result<(), ApplyError> {
        let lock = self.lock_for(node_id);
        let _serial = lock.lock().await;
        match self.config.apply.mode {
            ApplyMode::None => Ok(()),
            ApplyMode::Cmd => self.run_hook(node_id, synced).await.map(|_| ()),
            ApplyMode::XrayGrpc => match self.reconcile(node_id, synced).await {
                AttemptResult::Retry { error, .. } => Err(ApplyError::Attempt(error)),
                _ => Ok(()),
            },
        }
    }
}

impl XrayApply {
    /// The state write recording that `synced` is now applied to the node.
    fn applied(
        &self,
        node_id: u64,
        synced: &crate::jobs::node_sync::state::SyncState,
    ) -> StateWrite {
        let applied = Applied {
            generation: synced.generation,
            users: synced.users.len(),
            at: self.queue.now(),
        };
        state::put(applied_key(node_id), &applied)
    }

    async fn reconcile(
        &self,
        node_id: u64,
        synced: &crate::jobs::node_sync::state::SyncState,
    ) -> AttemptResult {
        let (Some(core), Some(xray), Some(node)) =
            (&self.core, &self.config.xray, self.config.node(node_id))
        else {
            tracing::warn!(
                node = node_id,
                "node or [xray] no longer configured; apply dropped"
            );
            return AttemptResult::Done;
        };
        let resend = self.take_resend(node_id);
        let cutter = self.cutter.as_ref();
        match grpc::reconcile_cutting(&self.queue, core, xray, node, &synced.users, resend, cutter)
            .await
        {
            Ok(out) => {
                tracing::info!(
                    node = node_id,
                    generation = synced.generation,
                    users = synced.users.len(),
                    added = out.added,
                    removed = out.removed,
                    already = out.already,
                    core_restarted = out.core_restarted,
                    resend,
                    "applied"
                );
                AttemptResult::DoneWith(Effects {
                    state: vec![
                        grpc::put_managed(node_id, &out.managed),
                        bans::put(node_id, &out.bans),
                        self.applied(node_id, synced),
                    ],
                    enqueue: Vec::new(),
                    wake: Vec::new(),
                    note: Some(out.describe()),
                })
            }
            Err(error) => {
                if resend {
                    // Not done: the next attempt still has to.
                    self.resend(node_id);
                }
                tracing::warn!(node = node_id, %error, "apply failed");
                retry(error.to_string())
            }
        }
    }
}
