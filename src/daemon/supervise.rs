//! The daemon's one owner of its long-running tasks. Every task is spawned here with a
//! name and a [`Stage`]; a task that panics or returns while the daemon is not stopping
//! is logged with its name and recorded in [`Ended`], which `/healthz` reads
//! (`health.rs`): it answers 503 naming the task until the daemon is restarted.
//!
//! At shutdown the stages are joined in order ([`Stage`]), so intake stops before the
//! workers drain, and the admin socket answers until the very end.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};

/// Set to a task's name, makes that task panic as it starts: how the tests see a task
/// die in a real daemon. Not configuration.
#[doc(hidden)]
pub const PANIC_TASK_ENV: &str = "CONNECTOR_TEST_PANIC_TASK";

/// When a task is joined at shutdown, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Takes work in from outside (the HTTP listener): stopped first.
    Intake,
    /// Producers, watchers, housekeeping: end as soon as they are told to.
    Service,
    /// Worker pools: given `shutdown_timeout` to finish their attempts, then aborted.
    Worker,
    /// The admin server: `queuectl` works until the queue is flushed.
    Admin,
}

/// Tasks that ended before the daemon was stopping, for `/healthz`.
#[derive(Debug, Default)]
pub struct Ended {
    problems: Mutex<Vec<String>>,
}

impl Ended {
    /// One line per task that ended early, naming it.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, problem: String) {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(problem);
    }
}

/// A task's end, as the supervisor saw it.
#[derive(Debug)]
pub struct Exit {
    pub name: String,
    pub stage: Stage,
    /// Why it ended, when that is a failure (an error it returned, or a panic).
    pub failure: Option<String>,
}

struct Entry {
    name: String,
    stage: Stage,
    abort: AbortHandle,
}

/// The daemon's tasks (see the module doc).
#[derive(Default)]
pub struct Supervisor {
    set: JoinSet<anyhow::Result<()>>,
    tasks: HashMap<Id, Entry>,
    ended: Arc<Ended>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// What `/healthz` reads.
    pub fn ended(&self) -> Arc<Ended> {
        self.ended.clone()
    }

    /// Spawns `task` under `name`. It should run until it is told to stop.
    pub fn spawn<F>(&mut self, name: impl Into<String>, stage: Stage, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        let panic = std::env::var(PANIC_TASK_ENV).is_ok_and(|n| n == name);
        let abort = self.set.spawn(async move {
            if panic {
                panic!("{PANIC_TASK_ENV} asked this task to panic");
            }
            task.await
        });
        self.tasks.insert(abort.id(), Entry { name, stage, abort });
    }

    /// Spawns a task that returns nothing.
    pub fn spawn_unit<F>(&mut self, name: impl Into<String>, stage: Stage, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, stage, async move {
            task.await;
            Ok(())
        });
    }

    /// Waits for the next task to end, and says which one and how. `None` when no task
    /// is left.
    pub async fn next(&mut self) -> Option<Exit> {
        let joined = self.set.join_next_with_id().await?;
        let (id, failure) = match joined {
            Ok((id, Ok(()))) => (id, None),
            Ok((id, Err(e))) => (id, Some(format!("{e:#}"))),
            Err(e) => (e.id(), Some(join_failure(&e))),
        };
        let (name, stage) = match self.tasks.remove(&id) {
            Some(e) => (e.name, e.stage),
            None => ("an unnamed task".to_string(), Stage::Service),
        };
        Some(Exit {
            name,
            stage,
            failure,
        })
    }

    /// Records a task that ended while the daemon was not stopping: logged, and a
    /// problem on `/healthz` for the rest of the daemon's life.
    pub fn ended_early(&self, exit: &Exit) {
        let problem = match &exit.failure {
            Some(why) => format!("task {} ended: {why}", exit.name),
            None => format!("task {} ended before the daemon was stopping", exit.name),
        };
        // Recorded before it is logged: whoever reads the line finds `/healthz` saying it.
        self.ended.push(problem.clone());
        tracing::error!(task = exit.name.as_str(), "{problem}");
    }

    /// Whether a task of `stage` is still running.
    fn has(&self, stage: Stage) -> bool {
        self.tasks.values().any(|e| e.stage == stage)
    }

    /// Joins every task of `stage` (tasks of other stages that end meanwhile are joined
    /// too), waiting at most `limit` before aborting what is left of it. Returns the
    /// failures, and whether the limit was reached.
    pub async fn join_stage(&mut self, stage: Stage, limit: Option<Duration>) -> (Vec<Exit>, bool) {
        let mut failed = Vec::new();
        let joined = async {
            while self.has(stage) {
                match self.next().await {
                    Some(exit) if exit.failure.is_some() => failed.push(exit),
                    Some(_) => {}
                    None => break,
                }
            }
        };
        let timed_out = match limit {
            Some(limit) => tokio::time::timeout(limit, joined).await.is_err(),
            None => {
                joined.await;
                false
            }
        };
        if timed_out {
            for e in self.tasks.values().filter(|e| e.stage == stage) {
                e.abort.abort();
            }
            while self.has(stage) {
                match self.next().await {
                    Some(exit) if exit.failure.is_some() && !is_cancelled(&exit) => {
                        failed.push(exit)
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        (failed, timed_out)
    }
}

const CANCELLED: &str = "cancelled";

fn join_failure(e: &JoinError) -> String {
    if e.is_cancelled() {
        return CANCELLED.to_string();
    }
    format!("it panicked: {e}")
}

fn is_cancelled(exit: &Exit) -> bool {
    exit.failure.as_deref() == Some(CANCELLED)
}
