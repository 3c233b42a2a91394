//! The daemon: owns the queue for the life of the process; runs the producers (a sync
//! per node every `sync.interval`), a worker pool per job kind, and queue housekeeping;
//! stops cleanly on SIGTERM/SIGINT.
//!
//! Shutdown: intake stops at once (producers end, workers lease nothing more); attempts
//! already running get `shutdown_timeout` to finish; whatever still runs after that is
//! dropped (its hook killed) and, being `running` on disk, runs again at the next start.
//! Then the queue is flushed.
//!
//! `--once` ([`run_once`]): one sync per node, the applies those syncs cause, then exit.

mod core_watch;
pub mod http;
mod once;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::node_sync::{self, NodeSync};
use crate::jobs::webhook::{self, Webhook};
use crate::jobs::xray_apply::XrayApply;
use crate::peers::panel::Panel;
use crate::peers::relays::{Registry, client::RelayClient};
use crate::queue::{self, DeadReason, JobKind, JobState, Queue, Stored, SystemClock};

pub use once::{OnceReport, run_once};

/// How often expired leases are reaped and old done jobs swept.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// The opened queue and the handlers, ready to run.
pub(crate) struct Agent {
    pub queue: Queue,
    pub config: Arc<Config>,
    pub sync: Option<Arc<NodeSync>>,
    pub apply: Arc<XrayApply>,
    pub webhook: Arc<Webhook>,
}

impl Agent {
    pub fn open(config: Config) -> anyhow::Result<Agent> {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        let path = config.queue_path();
        let (queue, recovery) = Queue::open(&path, config.queue.clone(), Arc::new(SystemClock))?;
        let stats = queue.stats()?;
        tracing::info!(
            path = %path.display(),
            pending = stats.total(queue::JobState::Ready) + stats.total(queue::JobState::Scheduled),
            dead = stats.total(queue::JobState::Dead),
            interrupted = recovery.interrupted,
            quarantined = stats.quarantined,
            "queue open"
        );
        let config = Arc::new(config);
        let sync = if config.nodes.is_empty() {
            tracing::warn!("no nodes configured (NODE_IDS or [[nodes]]): nothing to sync");
            None
        } else {
            Some(Arc::new(NodeSync {
                queue: queue.clone(),
                panel: Panel::new(&config.panel)?,
                config: config.clone(),
            }))
        };
        let apply = Arc::new(XrayApply::new(queue.clone(), config.clone())?);
        let webhook = Arc::new(Webhook {
            queue: queue.clone(),
            registry: Arc::new(Registry::load(&config.webhook.providers_dir)),
            client: Arc::new(RelayClient::new(&config.webhook)?),
        });
        tracing::info!(
            nodes = config.nodes.len(),
            apply_mode = config.apply.mode.as_str(),
            interval = %humantime::format_duration(config.sync.interval),
            panel = %config.panel.base_url,
            "connector started"
        );
        Ok(Agent {
            queue,
            config,
            sync,
            apply,
            webhook,
        })
    }

    /// Starts a worker pool for every kind this agent runs.
    pub fn spawn_workers(&self, tasks: &mut JoinSet<queue::Result<()>>, stop: &CancellationToken) {
        if let Some(sync) = &self.sync {
            tasks.spawn(queue::run_workers(
                self.queue.clone(),
                JobKind::NodeSync,
                sync.clone(),
                stop.clone(),
            ));
        }
        tasks.spawn(queue::run_workers(
            self.queue.clone(),
            JobKind::XrayApply,
            self.apply.clone(),
            stop.clone(),
        ));
        // A node without relays leaves webhook jobs alone rather than failing them.
        let (queue, handler, stop) = (self.queue.clone(), self.webhook.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = handler.registry.wait_for_any() => {}
            }
            queue::run_workers(queue, JobKind::Webhook, handler, stop).await
        });
    }

    /// Waits for the worker pools to drain, at most `shutdown_timeout`.
    pub async fn drain(&self, mut tasks: JoinSet<queue::Result<()>>) -> anyhow::Result<()> {
        let limit = self.config.shutdown_timeout;
        let mut failure = None;
        let drained = tokio::time::timeout(limit, async {
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failure = Some(anyhow::Error::new(e)),
                    Err(e) if e.is_panic() => {
                        failure = Some(anyhow::anyhow!("a worker panicked: {e}"))
                    }
                    Err(_) => {}
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                timeout = %humantime::format_duration(limit),
                "attempts still running at the shutdown timeout were stopped; they run again at the next start"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        self.queue.flush().await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops as described above.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let agent = Agent::open(config)?;
    let stop = shutdown.child_token();
    // Bound first: a listener that cannot start stops the daemon before it takes work.
    let listener = match agent.config.http.listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let mut tasks = JoinSet::new();
    agent.spawn_workers(&mut tasks, &stop);
    let maintenance = tokio::spawn(queue::run_maintenance(
        agent.queue.clone(),
        MAINTENANCE_EVERY,
        stop.clone(),
    ));
    let producer = tokio::spawn(produce_syncs(
        agent.queue.clone(),
        agent.config.clone(),
        stop.clone(),
    ));
    let watcher = agent.apply.core.clone().map(|core| {
        tokio::spawn(core_watch::watch(
            agent.queue.clone(),
            core,
            agent.apply.clone(),
            agent.config.clone(),
            stop.clone(),
        ))
    });
    let reloader = tokio::spawn(
        agent
            .webhook
            .registry
            .clone()
            .watch(agent.config.webhook.reload_interval, stop.clone()),
    );
    let folder = tokio::spawn(webhook::stats::run_fold(agent.queue.clone(), stop.clone()));
    let server = listener.map(|l| {
        let state = Arc::new(http::HttpState {
            queue: agent.queue.clone(),
            registry: agent.webhook.registry.clone(),
            token: agent.config.http.token.clone(),
            max_body_bytes: agent.config.http.max_body_bytes,
        });
        let addr = l.local_addr().ok();
        tracing::info!(
            addr = %addr.map(|a| a.to_string()).unwrap_or_default(),
            bearer_token = state.token.is_some(),
            "http listener ready"
        );
        if addr.is_some_and(|a| !a.ip().is_loopback()) && state.token.is_none() {
            tracing::warn!("http.listen is not a loopback address and http.token is not set: anyone who can reach it can submit webhook events");
        }
        tokio::spawn(http::serve(l, http::router(state), stop.clone()))
    });
    if agent.apply.core.is_some() {
        // Level-triggered: whatever happened while the agent was down, reconcile now.
        core_watch::apply_all(&agent.queue, &agent.config, "start").await;
    }
    // A queue failure in a worker pool (a failed flush) stops the daemon too.
    let early = tokio::select! {
        _ = shutdown.cancelled() => None,
        Some(r) = tasks.join_next() => Some(r),
    };
    stop.cancel();
    tracing::info!("stopping: no new work; waiting for running attempts");
    if let Some(s) = server {
        // Intake first: once this returns, no event is being accepted.
        if let Ok(Err(e)) = s.await {
            tracing::error!(error = %e, "http listener failed");
        }
    }
    let _ = producer.await;
    let _ = maintenance.await;
    let _ = reloader.await;
    let _ = folder.await;
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let drained = agent.drain(tasks).await;
    match early {
        Some(Ok(Err(e))) => return Err(anyhow::Error::new(e).context("the queue failed")),
        Some(Err(e)) => return Err(anyhow::anyhow!("a worker pool ended: {e}")),
        _ => {}
    }
    drained?;
    if let Err(e) = webhook::stats::fold(&agent.queue).await {
        tracing::warn!(error = %e, "webhook stats not folded at shutdown (they are at the next start)");
    }
    tracing::info!("queue flushed; stopped");
    Ok(())
}

/// Makes a sync due for every node every `sync.interval`. Each node has one sync job
/// at a time ([`Dedupe::Live`](crate::queue::Dedupe)):
///
/// - none, or the last one is done: a new one;
/// - one waiting on its ladder after a failure: due now — a panel that recovers is
///   read again within one interval, as SPEC promises, not after the ladder's minutes
///   (the ladder still spaces retries shorter than the interval);
/// - one that went dead on its ladder (the panel has been failing for a while): that
///   same job again, so an outage leaves one dead job per node — visible in `queuectl`,
///   its history showing the failures — not a new dead job every few intervals.
async fn produce_syncs(queue: Queue, config: Arc<Config>, stop: CancellationToken) {
    if config.nodes.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(config.sync.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for node in &config.nodes {
            if let Err(e) = make_sync_due(&queue, node.id).await {
                tracing::error!(node = node.id, error = %e, "cannot schedule a sync");
            }
        }
    }
}

async fn make_sync_due(queue: &Queue, node_id: u64) -> queue::Result<()> {
    let revive = match queue.find_key(JobKind::NodeSync, &crate::jobs::node_key(node_id))? {
        Some(job) => match (job.state(queue.now()), &job.stored) {
            (JobState::Scheduled, _) => Some(job.id),
            (
                JobState::Dead,
                Stored::Dead {
                    reason: DeadReason::Exhausted,
                    ..
                },
            ) => Some(job.id),
            (JobState::Ready | JobState::Running, _) => return Ok(()),
            _ => None,
        },
        None => None,
    };
    match revive {
        // It may have been leased meanwhile; then it runs now anyway.
        Some(id) => match queue.retry(id).await {
            Ok(_) | Err(queue::Error::InvalidState { .. }) => Ok(()),
            Err(e) => Err(e),
        },
        None => queue
            .enqueue_with(node_sync::job(node_id))
            .await
            .map(|_| ()),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    run(config, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
