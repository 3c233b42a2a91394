//! The daemon: owns the queue for the life of the process; builds the peers and the job
//! kinds, and runs the kinds' producers and watchers (`jobs/<kind>/`), a worker pool
//! per job kind, the HTTP listener, the disk probe and queue housekeeping, each a named
//! task of one `Supervisor` (`supervise.rs`: a task that dies
//! is logged and named on `/healthz`); stops cleanly on SIGTERM/SIGINT.
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

mod disk;
pub mod health;
pub mod http;
pub mod listener;
mod memory;
mod once;
pub mod supervise;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs;
use crate::jobs::node_sync::{self, NodeSync};
use crate::jobs::traffic_report::{self, Collector, TrafficReport};
use crate::jobs::webhook::{self, Webhook};
use crate::jobs::xray_apply::{XrayApply, core_watch};
use crate::peers::panel::Panel;
use crate::peers::relays::{Registry, client::RelayClient};
use crate::peers::xray::XrayClient;
use crate::queue::{self, Pools, Queue, SystemClock};

use supervise::{Stage, Supervisor};

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
    pub(crate) fn open(config: Config) -> anyhow::Result<Agent> {
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

    /// Starts a worker pool for every kind this agent runs, named `{kind} workers`.
    pub(crate) fn spawn_workers(&self, tasks: &mut Supervisor, stop: &CancellationToken) {
        let pool = |kind| {
            self.pools
                .get(kind)
                .cloned()
                .unwrap_or_else(|| queue::Pool::new(kind))
        };
        let observer: Arc<dyn queue::AttemptObserver> =
            Arc::new(crate::telemetry::metrics::Attempts);
        let name = |kind: queue::JobKind| format!("{} workers", kind.as_str());
        if let Some(sync) = &self.sync {
            let run = queue::run_pool(
                self.queue.clone(),
                pool(jobs::NODE_SYNC),
                sync.clone(),
                observer.clone(),
                stop.clone(),
            );
            tasks.spawn(name(jobs::NODE_SYNC), Stage::Worker, async move {
                Ok(run.await?)
            });
        }
        let run = queue::run_pool(
            self.queue.clone(),
            pool(jobs::XRAY_APPLY),
            self.apply.clone(),
            observer.clone(),
            stop.clone(),
        );
        tasks.spawn(name(jobs::XRAY_APPLY), Stage::Worker, async move {
            Ok(run.await?)
        });
        if let Some(traffic) = &self.traffic {
            let run = queue::run_pool(
                self.queue.clone(),
                pool(jobs::TRAFFIC_REPORT),
                traffic.clone(),
                observer.clone(),
                stop.clone(),
            );
            tasks.spawn(name(jobs::TRAFFIC_REPORT), Stage::Worker, async move {
                Ok(run.await?)
            });
        }
        // A node without relays leaves webhook jobs alone rather than failing them.
        let (queue, handler, stop) = (self.queue.clone(), self.webhook.clone(), stop.clone());
        let webhooks = pool(jobs::WEBHOOK);
        tasks.spawn(name(jobs::WEBHOOK), Stage::Worker, async move {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = handler.registry.wait_for_any() => {}
            }
            Ok(queue::run_pool(queue, webhooks, handler, observer, stop).await?)
        });
    }

    /// Waits for the worker pools to drain, at most `shutdown_timeout`, then flushes.
    pub(crate) async fn drain(&self, tasks: &mut Supervisor) -> anyhow::Result<()> {
        let limit = self.config.shutdown_timeout;
        let (failed, timed_out) = tasks.join_stage(Stage::Worker, Some(limit)).await;
        if timed_out {
            tracing::warn!(
                timeout = %humantime::format_duration(limit),
                "attempts still running at the shutdown timeout were stopped; they run again at the next start"
            );
        }
        match self.queue.flush().await {
            Ok(()) => {}
            // Everything acknowledged was flushed when it was; what is left was refused.
            Err(e) if e.is_unwritable() => {
                tracing::warn!(error = %e, "the queue takes no writes: stopping without a last flush (nothing acknowledged depends on it)")
            }
            Err(e) => return Err(e.into()),
        }
        match failed.into_iter().last() {
            Some(e) => Err(anyhow::anyhow!(
                "{} failed: {}",
                e.name,
                e.failure.unwrap_or_default()
            )),
            None => Ok(()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops as described above.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before any work, so the counters see every attempt.
    crate::telemetry::metrics::install();
    // Before the first big buffer.
    memory::return_big_buffers();
    // Before any file is opened: HTTP clients must not be able to take the descriptors
    // the queue and the admin socket need (`listener::connection_limit`).
    let fd_limit = listener::raise_fd_limit();
    let agent = Agent::open(config)?;
    let mut tasks = Supervisor::new();
    // For the daemon's whole life, so `queuectl` works until the queue is flushed.
    let (admin, serving) = crate::admin::Server::start(
        crate::admin::Ctx {
            queue: agent.queue.clone(),
            config: agent.config.clone(),
            pools: Some(agent.pools.clone()),
        },
        &agent.config.admin_socket(),
    )?;
    tasks.spawn(
        "admin server",
        Stage::Admin,
        async move { Ok(serving.await?) },
    );
    let stop = shutdown.child_token();
    // Bound first: a listener that cannot start stops the daemon before it takes work.
    let listener = match agent.config.http.listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    agent.spawn_workers(&mut tasks, &stop);
    tasks.spawn_unit(
        "queue maintenance",
        Stage::Service,
        queue::run_maintenance(agent.queue.clone(), MAINTENANCE_EVERY, stop.clone()),
    );
    if agent.sync.is_some() {
        tasks.spawn_unit(
            "node_sync schedule",
            Stage::Service,
            node_sync::schedule::run(agent.queue.clone(), agent.config.clone(), stop.clone()),
        );
    }
    if let Some(c) = agent.collector.clone() {
        tasks.spawn_unit(
            "traffic_report collector",
            Stage::Service,
            traffic_report::collector::run(c, agent.config.traffic.interval, stop.clone()),
        );
    }
    if let Some(tracking) = agent.apply.tracking.clone() {
        tasks.spawn_unit(
            "xray_apply access log follower",
            Stage::Service,
            crate::jobs::xray_apply::connections::follow(tracking, stop.clone()),
        );
    }
    if let Some(cutter) = agent.apply.cutter.clone() {
        // Said once, now: whether cuts will work (EPERM, EOPNOTSUPP). Bans remove users
        // either way.
        let _ = tokio::task::spawn_blocking(move || cutter.probe()).await;
    }
    if let Some(core) = agent.apply.core.clone() {
        tasks.spawn_unit(
            "xray_apply core watcher",
            Stage::Service,
            core_watch::watch(
                agent.queue.clone(),
                core,
                agent.apply.clone(),
                agent.config.clone(),
                stop.clone(),
            ),
        );
    }
    tasks.spawn_unit(
        "webhook provider watcher",
        Stage::Service,
        agent
            .webhook
            .registry
            .clone()
            .watch(agent.config.webhook.reload_interval, stop.clone()),
    );
    tasks.spawn_unit(
        "webhook stats fold",
        Stage::Service,
        webhook::stats::run_fold(agent.queue.clone(), stop.clone()),
    );
    // A full disk or a deleted database: probed, reported, and synced around.
    tasks.spawn_unit(
        "disk probe",
        Stage::Service,
        disk::watch(agent.queue.clone(), stop.clone()),
    );
    if let Some(sync) = agent.sync.clone() {
        tasks.spawn_unit(
            "node_sync without the queue",
            Stage::Service,
            crate::jobs::xray_apply::without_queue::run(
                agent.queue.clone(),
                sync,
                agent.apply.clone(),
                agent.config.clone(),
                stop.clone(),
            ),
        );
    }
    if let Some(l) = listener {
        let state = Arc::new(http::HttpState {
            queue: agent.queue.clone(),
            registry: agent.webhook.registry.clone(),
            token: agent.config.http.token.clone(),
            max_body_bytes: agent.config.http.max_body_bytes,
            health: Arc::new(health::Health {
                queue: agent.queue.clone(),
                nodes: agent.config.nodes.iter().map(|n| n.id).collect(),
                pools: agent.pools.clone(),
                tasks: tasks.ended(),
                cutter: agent.apply.cutter.clone(),
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
        tasks.spawn_unit(
            "http listener",
            Stage::Intake,
            listener::serve(l, http::router(state), limits, stop.clone()),
        );
    }
    if agent.apply.core.is_some() {
        // Level-triggered: whatever happened while the agent was down, reconcile now.
        core_watch::apply_all(&agent.queue, &agent.config, "start").await;
    }
    // A task that ends before the shutdown is logged and named on `/healthz`. A worker
    // pool ends early only if it panicked or the queue failed (a queue that takes no
    // writes, a full disk, makes it wait, not end: `disk.rs`): then the daemon stops.
    let mut early = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(exit) = tasks.next() => {
                // `stop` is cancelled with `shutdown`: a task may see it first. That is
                // no early end, but a worker's failure is still the daemon's.
                if stop.is_cancelled() {
                    if exit.stage == Stage::Worker && exit.failure.is_some() {
                        early = Some(exit);
                    }
                    break;
                }
                tasks.ended_early(&exit);
                if exit.stage == Stage::Worker {
                    early = Some(exit);
                    break;
                }
            }
        }
    }
    stop.cancel();
    tracing::info!("stopping: no new work; waiting for running attempts");
    // Intake first: once it has ended, no event is being accepted. The listener answers
    // the requests in progress first (at most shutdown_timeout).
    tasks.join_stage(Stage::Intake, None).await;
    tasks.join_stage(Stage::Service, None).await;
    let drained = agent.drain(&mut tasks).await;
    admin.stop();
    let (failed, cut) = tasks
        .join_stage(Stage::Admin, Some(crate::admin::server::STOP_GRACE))
        .await;
    if cut {
        tracing::warn!("admin calls still running at shutdown were cut");
    }
    for e in failed {
        tracing::warn!(
            error = e.failure.unwrap_or_default(),
            "the admin server ended with an error"
        );
    }
    admin.close();
    if let Some(e) = early {
        return Err(anyhow::anyhow!(
            "{} ended: {}",
            e.name,
            e.failure
                .unwrap_or_else(|| "before the daemon was stopping".into())
        ));
    }
    drained?;
    if let Err(e) = webhook::stats::fold(&agent.queue).await {
        tracing::warn!(error = %e, "webhook stats not folded at shutdown (they are at the next start)");
    }
    tracing::info!("queue flushed; stopped");
    Ok(())
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
