//! The producer of `traffic_report` jobs: runs a [`Collector`] every
//! `traffic.interval`, outside the queue's workers, and logs what each collection found.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Collector;

/// Collects traffic every `interval` (the first one a full interval after the start,
/// so a restarted agent does not read twice in a row). A collection that is running
/// when the agent stops finishes first: it is one read and one commit.
pub(crate) async fn run(
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
