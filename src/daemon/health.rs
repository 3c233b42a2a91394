//! What `GET /healthz` and `GET /metrics` read: the queue, the config's nodes, and the
//! worker pools ([`Pools`]).
//!
//! Healthy means: the queue database answers a read and takes writes (not a full disk,
//! not deleted underneath the daemon: `queue` then says `read-only` and `problems`
//! names the path and the cause), and every worker pool this daemon
//! runs is running, not paused by an operator, not stopped, and not stuck
//! ([`Pool::condition`](crate::queue::Pool::condition)), and no task of the daemon
//! ended before it was stopping (`supervise.rs`: a producer, a watcher, the listener…).
//! The webhook pool waiting for its first provider file is healthy: there is nothing to
//! deliver to.

use std::sync::Arc;

use serde::Serialize;

use crate::jobs;
use crate::jobs::node_sync::state as sync_state;
use crate::jobs::xray_apply::load_applied;
use crate::queue::{JobState, Pools, Queue};
use crate::telemetry::metrics::Scrape;

pub struct Health {
    pub queue: Queue,
    /// The configured nodes' ids.
    pub nodes: Vec<u64>,
    pub pools: Arc<Pools>,
    /// The daemon's tasks that ended before it was stopping.
    pub tasks: Arc<super::supervise::Ended>,
    /// With `xray.cut_connections`: whether cuts work (a detail, not a problem: bans
    /// still remove users without them).
    pub cutter: Option<Arc<crate::jobs::xray_apply::cut::Cutter>>,
}

/// The answer of `/healthz` (its JSON body).
#[derive(Debug, Serialize)]
pub struct Report {
    /// `ok` or `unhealthy`.
    pub status: &'static str,
    /// `ok`, `read-only` (it takes no writes: see `problems`), or why the database
    /// cannot be read.
    pub queue: String,
    /// Per kind: `running`, `waiting`, `paused`, `stopped` or `stuck`.
    pub workers: std::collections::BTreeMap<&'static str, String>,
    /// One line per thing that is wrong, naming it.
    pub problems: Vec<String>,
    /// With `xray.cut_connections`: `on`, or why removed users' connections are not cut
    /// (no CAP_NET_ADMIN, a kernel without SOCK_DESTROY, the access log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_connections: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Health {
    fn condition(&self, pool: &crate::queue::Pool) -> crate::queue::Condition {
        pool.condition(self.queue.settings().kind(pool.kind()).lease_timeout)
    }

    pub fn check(&self) -> Report {
        let mut problems = Vec::new();
        let mut queue = match self.queue.next_due(jobs::NODE_SYNC) {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                let why = format!("cannot read the queue database: {e}");
                problems.push(format!("queue: {why}"));
                why
            }
        };
        // A full disk, a failed write, a deleted database: nothing is acknowledged.
        if let Some(p) = self.queue.writability().problem {
            if queue == "ok" {
                queue = "read-only".to_string();
            }
            problems.push(format!("queue: {p}"));
        }
        let mut workers = std::collections::BTreeMap::new();
        for pool in self.pools.iter() {
            let c = self.condition(pool);
            workers.insert(pool.kind().as_str(), c.state.to_string());
            problems.extend(c.problem);
        }
        problems.extend(self.tasks.problems());
        Report {
            status: if problems.is_empty() {
                "ok"
            } else {
                "unhealthy"
            },
            queue,
            workers,
            problems,
            cut_connections: self.cutter.as_ref().map(|c| c.describe()),
        }
    }

    /// Everything `/metrics` reads from the queue: its kept counts and the first
    /// pending key of each kind (a few keys per kind, whatever the number of jobs), and
    /// each node's state records. Reads the database: call it on a blocking thread.
    pub fn scrape(&self) -> crate::queue::Result<Scrape> {
        let q = &self.queue;
        let stats = q.stats()?;
        let now = q.now();
        let mut s = Scrape {
            quarantined: stats.quarantined,
            ..Scrape::default()
        };
        for (kind, states) in &stats.jobs {
            for state in JobState::ALL {
                s.jobs.push((
                    *kind,
                    state.as_str(),
                    states.get(&state).copied().unwrap_or(0),
                ));
            }
            let age = match q.next_due(*kind)? {
                Some(due) if due <= now => (now - due) as f64 / 1000.0,
                _ => 0.0,
            };
            s.oldest_ready.push((*kind, age));
        }
        let held: std::collections::BTreeSet<u64> = sync_state::held(q)?
            .into_iter()
            .map(|(node, _)| node)
            .collect();
        for &node in &self.nodes {
            let allowed = match sync_state::load(q, node) {
                Ok(st) => (st.generation > 0).then_some(st.users.len()),
                Err(e) => {
                    tracing::warn!(node, error = %e, "users allowed not shown");
                    None
                }
            };
            let applied = match load_applied(q, node) {
                Ok(a) => a.map(|a| a.users),
                Err(e) => {
                    tracing::warn!(node, error = %e, "users applied not shown");
                    None
                }
            };
            s.nodes.push((node, allowed, applied, held.contains(&node)));
        }
        for pool in self.pools.iter() {
            s.pools
                .push((pool.kind(), self.condition(pool).problem.is_none()));
        }
        Ok(s)
    }
}
