//! The daemon: owns the queue for the life of the process; runs the producers (a sync
//! per node every `sync.interval`), a worker pool per job kind, and queue housekeeping;
//! stops cleanly on SIGTERM/SIGINT.
//!
//! Shutdown: intake stops at once (producers end, workers lease nothing more); attempts
//! already running get `shutdown_timeout` to finish; whatever still runs after that is
//! dropped (its hook killed) and, being `running` on disk, runs again at the next start.
//! Then the queue is flushed.
//!
//! The admin socket (`crate::admin`) is served from the queue's opening until it is
//! flushed at the end, so `queuectl` works during the shutdown's wait as well.
//!
//! `--once` ([`run_once`]): one sync per node, the applies those syncs cause, then exit.

mod core_watch;
mod disk;
pub mod health;
pub mod http;
pub mod listener;
mod once;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs;
use crate::jobs::node_sync::{self, NodeSync};
use crate::jobs::traffic_report::{Collector, TrafficReport};
use crate::jobs::webhook::{self, Webhook};
use crate::jobs::xray_apply::XrayApply;
use crate::peers::panel::Panel;
use crate::peers::relays::{Registry, client::RelayClient};
use crate::peers::xray::XrayClient;
use crate::queue::{self, DeadReason, JobState, Pools, Queue, Stored, SystemClock};

pub use once::{OnceReport, run_once};

/// How often expired leases are reaped and old done jobs swept.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// The opened queue and the handlers, ready to run.
pub(crate) struct Agent {
    pub queue: Queue,
    pub config: Arc<Config>,
    pub sync: Option<Arc<NodeSync>>,
    pub apply: Arc<XrayApply>,
    /// Delivers traffic reports (whenever a panel is configured: reports a previous
    /// run left are delivered even if collection is now off).
    pub traffic: Option<Arc<TrafficReport>>,
    /// Reads the core's counters, when `traffic.enabled` and `[xray]` is set.
    pub collector: Option<Arc<tokio::sync::Mutex<Collector>>>,
    pub webhook: Arc<Webhook>,
    /// One per kind this agent runs: liveness and pause, for `/healthz` and `queuectl`.
    pub pools: Arc<Pools>,
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
        let panel = if config.nodes.is_empty() {
            tracing::warn!("no nodes configured (NODE_IDS or [[nodes]]): nothing to sync");
            None
        } else {
            Some(Panel::new(&config.panel)?)
        };
        let sync = panel.as_ref().map(|panel| {
            Arc::new(NodeSync {
                queue: queue.clone(),
                panel: panel.clone(),
                config: config.clone(),
            })
        });
        let traffic = panel
            .as_ref()
            .map(|panel| TrafficReport::new(queue.clone(), panel.clone()));
        let collector = match (&config.xray, config.traffic.enabled, &panel) {
            (Some(x), true, Some(_)) => {
                let core = XrayClient::new(&x.api, x.flavor, x.timeout)?;
                let c = Collector::new(queue.clone(), core, config.clone())?;
                tracing::info!(
                    core = %x.api,
                    interval = %humantime::format_duration(config.traffic.interval),
                    "traffic reporting on"
                );
                Some(Arc::new(tokio::sync::Mutex::new(c)))
            }
            (None, true, Some(_)) => {
                tracing::info!(
                    "traffic reporting off: no [xray] api to read the counters from (XRAY_API_ADDR)"
                );
                None
            }
            _ => None,
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
            panel = %crate::config::ShownUrl(&config.panel.base_url),
            "connector started"
        );
        let kinds = [
            sync.as_ref().map(|_| jobs::NODE_SYNC),
            Some(jobs::XRAY_APPLY),
            traffic.as_ref().map(|_| jobs::TRAFFIC_REPORT),
            Some(jobs::WEBHOOK),
        ];
        let pools = Arc::new(Pools::new(kinds.into_iter().flatten()));
        Ok(Agent {
            queue,
            config,
            sync,
            apply,
            traffic,
            collector,
            webhook,
            pools,
        })
    }

    /// Starts a worker pool for every kind this agent runs.
    pub fn spawn_workers(&self, tasks: &mut JoinSet<queue::Result<()>>, stop: &CancellationToken) {
        let pool = |kind| {
            self.pools
                .get(kind)
                .cloned()
                .unwrap_or_else(|| queue::Pool::new(kind))
        };
        let observer: Arc<dyn queue::AttemptObserver> =
            Arc::new(crate::telemetry::metrics::Attempts);
        if let Some(sync) = &self.sync {
            tasks.spawn(queue::run_pool(
                self.queue.clone(),
                pool(jobs::NODE_SYNC),
                sync.clone(),
                observer.clone(),
                stop.clone(),
            ));
        }
        tasks.spawn(queue::run_pool(
            self.queue.clone(),
            pool(jobs::XRAY_APPLY),
            self.apply.clone(),
            observer.clone(),
            stop.clone(),
        ));
        if let Some(traffic) = &self.traffic {
            tasks.spawn(queue::run_pool(
                self.queue.clone(),
                pool(jobs::TRAFFIC_REPORT),
                traffic.clone(),
                observer.clone(),
                stop.clone(),
            ));
        }
        // A node without relays leaves webhook jobs alone rather than failing them.
        let (queue, handler, stop) = (self.queue.clone(), self.webhook.clone(), stop.clone());
        let webhooks = pool(jobs::WEBHOOK);
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = handler.registry.wait_for_any() => {}
            }
            queue::run_pool(queue, webhooks, handler, observer, stop).await
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
        match self.queue.flush().await {
            Ok(()) => {}
            // Everything acknowledged was flushed when it was; what is left was refused.
            Err(e) if e.is_unwritable() => {
                tracing::warn!(error = %e, "the queue takes no writes: stopping without a last flush (nothing acknowledged depends on it)")
            }
            Err(e) => return Err(e.into()),
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops as described above.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before any work, so the counters see every attempt.
    crate::telemetry::metrics::install();
    // Before any file is opened: HTTP clients must not be able to take the descriptors
    // the queue and the admin socket need (`listener::connection_limit`).
    let fd_limit = listener::raise_fd_limit();
    let agent = Agent::open(config)?;
    // For the daemon's whole life, so `queuectl` works until the queue is flushed.
    let admin = crate::admin::Server::start(
        crate::admin::Ctx {
            queue: agent.queue.clone(),
            config: agent.config.clone(),
            pools: Some(agent.pools.clone()),
        },
        &agent.config.admin_socket(),
    )?;
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
    let collecting = agent.collector.clone().map(|c| {
        tokio::spawn(collect_traffic(
            c,
            agent.config.traffic.interval,
            stop.clone(),
        ))
    });
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
    // A full disk or a deleted database: probed, reported, and synced around.
    let disk_watch = tokio::spawn(disk::watch(agent.queue.clone(), stop.clone()));
    let fallback = agent.sync.clone().map(|sync| {
        tokio::spawn(disk::sync_while_unwritable(
            agent.queue.clone(),
            sync,
            agent.apply.clone(),
            agent.config.clone(),
            stop.clone(),
        ))
    });
    let server = listener.map(|l| {
        let state = Arc::new(http::HttpState {
            queue: agent.queue.clone(),
            registry: agent.webhook.registry.clone(),
            token: agent.config.http.token.clone(),
            max_body_bytes: agent.config.http.max_body_bytes,
            health: Arc::new(health::Health {
                queue: agent.queue.clone(),
                nodes: agent.config.nodes.iter().map(|n| n.id).collect(),
                pools: agent.pools.clone(),
            }),
        });
        let addr = l.local_addr().ok();
        tracing::info!(
            addr = %addr.map(|a| a.to_string()).unwrap_or_default(),
            bearer_token = state.token.is_some(),
            "http listener ready"
        );
        // A non-loopback listen without a token is one of config.warnings, logged at start.
        let mut limits = listener::Limits::new(&agent.config.http, agent.config.shutdown_timeout);
        limits.max_connections = listener::connection_limit(limits.max_connections, fd_limit);
        tokio::spawn(listener::serve(
            l,
            http::router(state),
            limits,
            stop.clone(),
        ))
    });
    if agent.apply.core.is_some() {
        // Level-triggered: whatever happened while the agent was down, reconcile now.
        core_watch::apply_all(&agent.queue, &agent.config, "start").await;
    }
    // A worker pool ends early only if it panicked: a queue that takes no writes (a full
    // disk) makes it wait, not end (`disk.rs`).
    let early = tokio::select! {
        _ = shutdown.cancelled() => None,
        Some(r) = tasks.join_next() => Some(r),
    };
    stop.cancel();
    tracing::info!("stopping: no new work; waiting for running attempts");
    if let Some(s) = server {
        // Intake first: once this returns, no event is being accepted.
        // It answers the requests in progress first (at most shutdown_timeout).
        let _ = s.await;
    }
    let _ = producer.await;
    let _ = maintenance.await;
    if let Some(c) = collecting {
        let _ = c.await;
    }
    let _ = reloader.await;
    let _ = folder.await;
    let _ = disk_watch.await;
    if let Some(f) = fallback {
        let _ = f.await;
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let drained = agent.drain(tasks).await;
    admin.stop().await;
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
            match make_sync_due(&queue, node.id).await {
                Ok(()) => {}
                // A full disk: said once by the queue; the sync goes on without it.
                Err(e) if e.is_unwritable() => {
                    tracing::debug!(node = node.id, error = %e, "cannot schedule a sync")
                }
                Err(e) => tracing::error!(node = node.id, error = %e, "cannot schedule a sync"),
            }
        }
    }
}

/// Collects traffic every `interval` (the first one a full interval after the start,
/// so a restarted agent does not read twice in a row). A collection that is running
/// when the agent stops finishes first: it is one read and one commit.
async fn collect_traffic(
    collector: Arc<tokio::sync::Mutex<Collector>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = std::time::Instant::now();
        match collector.lock().await.collect().await {
            Ok(c) => {
                if failing {
                    tracing::info!("traffic collection works again");
                }
                failing = false;
                for r in &c.reports {
                    tracing::info!(
                        job = r.job_id,
                        node = r.node_id,
                        report_id = %r.report_id,
                        items = r.items,
                        upload = r.upload,
                        download = r.download,
                        "traffic collected"
                    );
                }
                tracing::debug!(
                    counters = c.counters,
                    reports = c.reports.len(),
                    restarted = c.restarted,
                    foreign = c.foreign,
                    took_ms = started.elapsed().as_millis() as u64,
                    "traffic collection"
                );
                if c.restarted {
                    tracing::warn!(
                        "the core restarted since the last collection: counting from zero (bytes it counted after that collection and before the restart are lost with it)"
                    );
                }
            }
            Err(e) => {
                // Once per outage at warn level; the rest at debug.
                if failing {
                    tracing::debug!(error = %e, "traffic collection failed");
                } else {
                    tracing::warn!(error = %e, "traffic collection failed; the next interval reads again (nothing is lost: counters are not reset)");
                }
                failing = true;
            }
        }
    }
}

async fn make_sync_due(queue: &Queue, node_id: u64) -> queue::Result<()> {
    let revive = match queue.find_key(jobs::NODE_SYNC, &crate::jobs::node_key(node_id))? {
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
