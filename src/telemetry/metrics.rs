//! The Prometheus metrics of `GET /metrics`: every name, label and meaning is here.
//!
//! Events are recorded where they happen, through the `metrics` facade (a no-op until
//! [`install`] sets the recorder, so libraries, `--once` and tests pay nothing):
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `connector_attempts_total` | counter | `kind`, `outcome` | attempts recorded: `done`, `failed`, `deferred` (waits for other work, no rung used) |
//! | `connector_attempt_duration_seconds` | histogram | `kind` | how long one attempt ran |
//! | `connector_job_latency_seconds` | histogram | `kind` | from the job's creation to its success: a traffic report's collection to the panel's ack, an event's arrival to the relay's 2xx |
//! | `connector_ladder_exhausted_total` | counter | `kind` | jobs that failed their last rung and went dead |
//! | `connector_node_last_sync_success_timestamp_seconds` | gauge | `node` | Unix time of the last sync that read a usable answer (304 included) |
//! | `connector_traffic_reported_bytes_total` | counter | `node`, `direction` | bytes the panel took (`uplink`, `downlink`); a 409 (already had it) adds nothing |
//! | `connector_traffic_reports_total` | counter | `node`, `outcome` | reports the panel answered: `accepted`, `duplicate` |
//! | `connector_webhook_deliveries_total` | counter | `relay`, `outcome` | callback attempts: `delivered`, `failed` (retried on the ladder), `dead` (the last rung failed) |
//! | `connector_connections_cut_total` | counter | `node` | removed users' established TCP connections destroyed (`xray.cut_connections`) |
//! | `connector_cut_connections_available` | gauge | | with `xray.cut_connections` only: 1 when the kernel lets the agent cut connections; 0 without `CAP_NET_ADMIN` (EPERM) or `CONFIG_INET_DIAG_DESTROY` (EOPNOTSUPP) |
//! | `connector_connections_tracked` | gauge | | connections the access log tied to a user of ours whose socket still existed at the last check |
//! | `connector_access_log_following` | gauge | | with `xray.access_log`: 1 while the core's access log is read; 0 while it is missing or unreadable |
//! | `connector_connections_untracked_total` | counter | | access log lines left out because the tracker was full of live connections |
//! | `connector_bans_not_biting` | gauge | `node` | watched bans (users removed in the last 15 minutes) not biting now: the core lists the user still online, or (where it cannot tell) their counters grew since the removal. Set by the core watcher every `sync.interval` (`xray-grpc` mode) |
//! | `connector_queue_writable` | gauge | | 1 while the queue takes writes; 0 on a full disk, after a failed write, or with the database deleted (nothing is acknowledged; `/healthz` says which). Set by the disk probe every second |
//!
//! Read from the queue when scraped ([`Scrape`]), so they are right from the first
//! scrape after a restart:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `connector_jobs` | gauge | `kind`, `state` | jobs now: `scheduled`, `ready`, `running`, `done`, `dead` |
//! | `connector_oldest_ready_job_age_seconds` | gauge | `kind` | how long the oldest ready job has been due (0: none waiting) |
//! | `connector_quarantined_records` | gauge | | unreadable records set aside (`queuectl fsck`) |
//! | `connector_node_users_allowed` | gauge | `node` | users in the node's last good list from the panel |
//! | `connector_node_users_applied` | gauge | `node` | users in the list last applied to the node's core (or hook) |
//! | `connector_node_sync_held` | gauge | `node` | 1 while the removal guard holds a sync (`queuectl held`) |
//! | `connector_worker_pool_up` | gauge | `kind` | 1 when the kind's workers run; 0 when paused, stopped or stuck (`/healthz` says which) |
//!
//! Counters start at zero with each process, as Prometheus expects (`rate()` and
//! `increase()` handle the reset). Labels are bounded: kinds and outcomes are fixed
//! sets, nodes come from the config, relays from the provider files.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::queue::{AttemptObserver, JobKind};

/// Histogram buckets for durations, in seconds: from a quick local call to the
/// webhook ladder's last rung (30 min) and a day-long outage.
const BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 86400.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder (once; later
/// calls return the same handle). `None` when another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "metrics off: another recorder is installed");
                return None;
            }
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!(
        "connector_attempts_total",
        "Attempts recorded, by job kind and outcome (done, failed, deferred)."
    );
    describe_histogram!(
        "connector_attempt_duration_seconds",
        Unit::Seconds,
        "How long one attempt ran, by job kind."
    );
    describe_histogram!(
        "connector_job_latency_seconds",
        Unit::Seconds,
        "From a job's creation to its success, by job kind."
    );
    describe_counter!(
        "connector_ladder_exhausted_total",
        "Jobs that failed their last retry rung and went dead, by kind."
    );
    describe_gauge!(
        "connector_node_last_sync_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the node's last sync that read a usable panel answer."
    );
    describe_counter!(
        "connector_traffic_reported_bytes_total",
        Unit::Bytes,
        "Traffic bytes the panel accepted, by node and direction."
    );
    describe_counter!(
        "connector_traffic_reports_total",
        "Traffic reports the panel answered, by node and outcome (accepted, duplicate)."
    );
    describe_counter!(
        "connector_webhook_deliveries_total",
        "Callback attempts by relay and outcome (delivered, failed, dead)."
    );
    describe_gauge!(
        "connector_bans_not_biting",
        "Watched bans of the node not biting: the user is still online, or their counters grew."
    );
    describe_gauge!(
        "connector_queue_writable",
        "1 while the queue takes writes; 0 on a full disk, a failed write or a deleted database."
    );
    describe_gauge!("connector_jobs", "Jobs in the queue by kind and state.");
    describe_counter!(
        "connector_connections_cut_total",
        "Removed users' established TCP connections destroyed, by node."
    );
    describe_gauge!(
        "connector_cut_connections_available",
        "1 when the agent can cut connections; 0 without CAP_NET_ADMIN or kernel support."
    );
    describe_gauge!(
        "connector_connections_tracked",
        "Connections of our users tied to a source address by the access log."
    );
    describe_gauge!(
        "connector_access_log_following",
        "1 while the core's access log is read; 0 while it is missing or unreadable."
    );
    describe_counter!(
        "connector_connections_untracked_total",
        "Access log lines left out because the tracker was full of live connections."
    );
    describe_gauge!(
        "connector_oldest_ready_job_age_seconds",
        Unit::Seconds,
        "How long the oldest ready job of the kind has been due (0 when none waits)."
    );
    describe_gauge!(
        "connector_quarantined_records",
        "Unreadable queue records set aside (see queuectl fsck)."
    );
    describe_gauge!(
        "connector_node_users_allowed",
        "Users in the node's last good list from the panel."
    );
    describe_gauge!(
        "connector_node_users_applied",
        "Users in the list last applied to the node."
    );
    describe_gauge!(
        "connector_node_sync_held",
        "1 while the removal guard holds the node's sync."
    );
    describe_gauge!(
        "connector_worker_pool_up",
        "1 when the kind's workers run; 0 when paused, stopped or stuck."
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---- events ----

/// One attempt was recorded with `outcome` (`done`, `failed`, `deferred`).
pub fn attempt(kind: JobKind, outcome: &'static str, took: Duration) {
    counter!("connector_attempts_total", "kind" => kind.as_str(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("connector_attempt_duration_seconds", "kind" => kind.as_str())
        .record(took.as_secs_f64());
}

/// A job succeeded, `latency` after it was created.
pub fn finished(kind: JobKind, latency: Duration) {
    metrics::histogram!("connector_job_latency_seconds", "kind" => kind.as_str())
        .record(latency.as_secs_f64());
}

/// A job failed its last rung and went dead.
pub fn exhausted(kind: JobKind) {
    counter!("connector_ladder_exhausted_total", "kind" => kind.as_str()).increment(1);
}

/// What the worker pools report their attempts to: the three events above. The queue
/// defines the trait so it need not know how it is measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempts;

impl AttemptObserver for Attempts {
    fn attempt(&self, kind: JobKind, outcome: &'static str, took: Duration) {
        attempt(kind, outcome, took);
    }
    fn finished(&self, kind: JobKind, latency: Duration) {
        finished(kind, latency);
    }
    fn exhausted(&self, kind: JobKind) {
        exhausted(kind);
    }
}

/// The node's sync read a usable answer from the panel.
pub fn sync_succeeded(node: u64) {
    gauge!("connector_node_last_sync_success_timestamp_seconds", "node" => node.to_string())
        .set(unix_now());
}

/// The panel answered a traffic report: taken (`duplicate` false) or already had it.
pub fn traffic_reported(node: u64, upload: u64, download: u64, duplicate: bool) {
    let node = node.to_string();
    let outcome = if duplicate { "duplicate" } else { "accepted" };
    counter!("connector_traffic_reports_total", "node" => node.clone(), "outcome" => outcome)
        .increment(1);
    if !duplicate {
        counter!("connector_traffic_reported_bytes_total", "node" => node.clone(), "direction" => "uplink")
            .increment(upload);
        counter!("connector_traffic_reported_bytes_total", "node" => node, "direction" => "downlink")
            .increment(download);
    }
}

/// How many of the node's watched bans do not bite, as the core watcher last found.
pub fn bans_not_biting(node: u64, n: usize) {
    gauge!("connector_bans_not_biting", "node" => node.to_string()).set(n as f64);
}

/// Whether the queue takes writes, as the disk probe last found it.
pub fn queue_writable(writable: bool) {
    gauge!("connector_queue_writable").set(if writable { 1.0 } else { 0.0 });
}

/// One callback attempt to `relay` ended: `delivered`, `failed` or `dead`.
pub fn webhook_delivery(relay: &str, outcome: &'static str) {
    counter!("connector_webhook_deliveries_total", "relay" => relay.to_owned(), "outcome" => outcome)
        .increment(1);
}

// ---- read when scraped ----

/// The values read from the queue and the daemon at each scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    /// (kind, state, count) for every kind and state.
    pub jobs: Vec<(JobKind, &'static str, u64)>,
    /// (kind, seconds the oldest ready job has waited).
    pub oldest_ready: Vec<(JobKind, f64)>,
    pub quarantined: u64,
    /// (node, allowed, applied, held).
    pub nodes: Vec<(u64, Option<usize>, Option<usize>, bool)>,
    /// (kind, up).
    pub pools: Vec<(JobKind, bool)>,
}

/// Sets the scraped gauges and renders everything in the Prometheus text format.
pub fn render(handle: &PrometheusHandle, s: &Scrape) -> String {
    for (kind, state, n) in &s.jobs {
        gauge!("connector_jobs", "kind" => kind.as_str(), "state" => *state).set(*n as f64);
    }
    for (kind, age) in &s.oldest_ready {
        gauge!("connector_oldest_ready_job_age_seconds", "kind" => kind.as_str()).set(*age);
    }
    gauge!("connector_quarantined_records").set(s.quarantined as f64);
    for (node, allowed, applied, held) in &s.nodes {
        let node = node.to_string();
        if let Some(n) = allowed {
            gauge!("connector_node_users_allowed", "node" => node.clone()).set(*n as f64);
        }
        if let Some(n) = applied {
            gauge!("connector_node_users_applied", "node" => node.clone()).set(*n as f64);
        }
        gauge!("connector_node_sync_held", "node" => node).set(if *held { 1.0 } else { 0.0 });
    }
    for (kind, up) in &s.pools {
        gauge!("connector_worker_pool_up", "kind" => kind.as_str()).set(if *up {
            1.0
        } else {
            0.0
        });
    }
    handle.run_upkeep();
    handle.render()
}
