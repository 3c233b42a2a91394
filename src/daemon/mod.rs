//! The daemon: owns the queue for the life of the process, runs its housekeeping, and
//! stops cleanly on SIGTERM/SIGINT. Job producers and workers join it as the job kinds
//! arrive.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::queue::{self, Queue, SystemClock};

/// How often expired leases are reaped and old done jobs swept.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// Runs the daemon until `shutdown` is cancelled, then flushes the queue.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    let maintenance = tokio::spawn(queue::run_maintenance(
        queue.clone(),
        MAINTENANCE_EVERY,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let _ = maintenance.await;
    queue.flush().await?;
    tracing::info!("queue flushed; bye");
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
