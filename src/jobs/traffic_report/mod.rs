//! `traffic_report`: every byte the core counted, reported to the panel once.
//!
//! Two halves:
//!
//! - **Collection** ([`collect`], run by [`collector`]), every `traffic.interval`,
//!   outside the queue's workers:
//!   reads the core's per-user counters without resetting them, takes deltas against
//!   the persisted baseline, and commits the new baseline together with the reports
//!   that carry those deltas — one atomic write, so a crash anywhere either loses the
//!   whole collection (the next one counts the same bytes again) or keeps all of it.
//! - **Delivery** (this file, a [`Handler`]): one job per report, `POST`ed to the panel
//!   with `Idempotency-Key: {report_id}`; `2xx` or `409` is delivered, anything else
//!   retries on the ladder (`repeat-last`: a report is never dropped). A panel that
//!   deduplicates on `report_id` counts every byte exactly once.
//!
//! | reads | writes |
//! |---|---|
//! | the core's StatsService (collection) | state `traffic/core`, `traffic/bases/{node}/{xx}` |
//! | its own jobs (oldest first, below) | the panel's `report-traffic` endpoint |
//!
//! # Oldest first
//!
//! A node's reports are keyed `traffic/{node_id}/{seq}`, `seq` a zero-padded counter
//! that only grows, so key order is creation order. A report whose node has an older
//! report still pending is deferred ([`AttemptResult::Defer`]: no attempt is used up)
//! until that one is due; a delivered report wakes the node's next one in the same
//! write as its ack. So after an outage a node's backlog drains in order, at once.

pub(crate) mod collect;
pub(crate) mod collector;
pub mod state;
pub(crate) mod summary;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::jobs;
use crate::jobs::PayloadError;
use crate::peers::panel::{Panel, Reported};
use crate::queue::{AttemptResult, Effects, Handler, Job, JobState, Queue};
use crate::telemetry::metrics;

pub use collect::{Collected, Collector};

/// What is `POST`ed, exactly: SPEC §3 traffic_report. Also the job's payload, so
/// `queuectl show` prints the body the panel gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub report_id: String,
    pub node_id: u64,
    /// RFC 3339, when the counters were read.
    pub collected_at: String,
    pub items: Vec<Item>,
}

/// One user's bytes since the previous collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Sent as the hyphenated lower-case form.
    pub uuid: Uuid,
    /// The user's uplink counter's growth.
    pub upload: u64,
    /// The user's downlink counter's growth.
    pub download: u64,
}

impl Report {
    pub fn upload(&self) -> u64 {
        self.items.iter().map(|i| i.upload).sum()
    }

    pub fn download(&self) -> u64 {
        self.items.iter().map(|i| i.download).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(
            &self.report_id,
            self.node_id,
            &self.collected_at,
            &self.items,
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<Report, PayloadError> {
        serde_json::from_slice(bytes).map_err(|source| PayloadError {
            what: "traffic report",
            source,
        })
    }
}

/// A [`Report`]'s body from borrowed parts (a collection splits one node's items into
/// reports without copying them), in one allocation of the right size.
pub(crate) fn encode(report_id: &str, node_id: u64, collected_at: &str, items: &[Item]) -> Vec<u8> {
    /// The same fields, in the same order, as `Report`.
    #[derive(Serialize)]
    struct Body<'a> {
        report_id: &'a str,
        node_id: u64,
        collected_at: &'a str,
        items: &'a [Item],
    }
    let mut out = Vec::with_capacity(encoded_len(report_id, node_id, collected_at, items));
    let body = Body {
        report_id,
        node_id,
        collected_at,
        items,
    };
    // Strings and integers always serialise.
    let _ = serde_json::to_writer(&mut out, &body);
    out
}

/// How long [`encode`]'s output is: exactly, when the two strings need no escaping
/// (ours never do; otherwise the vector grows once).
fn encoded_len(report_id: &str, node_id: u64, collected_at: &str, items: &[Item]) -> usize {
    fn digits(n: u64) -> usize {
        n.checked_ilog10().map_or(1, |d| d as usize + 1)
    }
    // {"report_id":"…","node_id":N,"collected_at":"…","items":[…]}, with each item
    // {"uuid":"<36>","upload":N,"download":N} and a comma between two.
    let head = 14 + report_id.len() + 12 + digits(node_id) + 17 + collected_at.len() + 13;
    let each: usize = items
        .iter()
        .map(|i| 69 + digits(i.upload) + digits(i.download))
        .sum();
    head + each + items.len().saturating_sub(1)
}

/// The key prefix of one node's reports.
pub fn node_prefix(node_id: u64) -> String {
    format!("traffic/{node_id}/")
}

/// The key of report number `seq` of a node.
pub fn key(node_id: u64, seq: u64) -> String {
    format!("traffic/{node_id}/{seq:020}")
}

/// How long a report waits for an older one that is ready or running (that one wakes
/// it when delivered; this only bounds a missed wake).
const RECHECK: Duration = Duration::from_secs(60);

/// Delivers reports.
pub struct TrafficReport {
    pub queue: Queue,
    pub panel: Panel,
}

impl Handler for TrafficReport {
    async fn run(&self, job: Job) -> AttemptResult {
        let report = match Report::decode(&job.payload) {
            Ok(r) => r,
            Err(e) => {
                return AttemptResult::Retry {
                    error: e.to_string(),
                    retry_after: None,
                };
            }
        };
        let prefix = node_prefix(report.node_id);
        match self.older_pending(&prefix, &job.key) {
            Ok(Some(older)) => {
                let now = self.queue.now();
                let until = match older.stored {
                    crate::queue::Stored::Pending { due_ms } if due_ms > now => due_ms,
                    _ => now.saturating_add(RECHECK.as_millis() as u64),
                };
                return AttemptResult::Defer {
                    until,
                    why: format!(
                        "node {}'s older report #{} is not delivered yet",
                        report.node_id, older.id
                    ),
                };
            }
            Ok(None) => {}
            Err(e) => {
                return AttemptResult::Retry {
                    error: format!("cannot read the queue: {e}"),
                    retry_after: None,
                };
            }
        }
        let (up, down, items) = (report.upload(), report.download(), report.items.len());
        match self
            .panel
            .report_traffic(&report.report_id, job.payload.clone())
            .await
        {
            Ok(how) => {
                metrics::traffic_reported(
                    report.node_id,
                    up,
                    down,
                    matches!(how, Reported::Duplicate),
                );
                let answer = match how {
                    Reported::Accepted(code) => code.to_string(),
                    Reported::Duplicate => "409 (it had this report already)".to_string(),
                };
                tracing::info!(
                    job = job.id,
                    node = report.node_id,
                    report_id = %report.report_id,
                    items,
                    upload = up,
                    download = down,
                    collected_at = %report.collected_at,
                    panel = %answer,
                    "traffic report delivered"
                );
                let wake = match self.next_pending(&prefix, &job.key) {
                    Ok(next) => next.into_iter().collect(),
                    // It is woken at its due time anyway.
                    Err(_) => Vec::new(),
                };
                AttemptResult::DoneWith(Effects {
                    note: Some(format!(
                        "{items} users, {up} B up, {down} B down; panel answered {answer}"
                    )),
                    wake,
                    ..Effects::default()
                })
            }
            Err(e) => AttemptResult::Retry {
                error: format!("report {}: {e}", report.report_id),
                retry_after: e.retry_after(),
            },
        }
    }
}

impl TrafficReport {
    pub fn new(queue: Queue, panel: Panel) -> Arc<TrafficReport> {
        Arc::new(TrafficReport { queue, panel })
    }

    /// The nearest older report of the node that is still pending or running. Stops at
    /// the first delivered one: everything before it was delivered before it.
    fn older_pending(&self, prefix: &str, key: &str) -> crate::queue::Result<Option<Job>> {
        let now = self.queue.now();
        let mut found = None;
        self.queue
            .scan_keys(jobs::TRAFFIC_REPORT, prefix, Some(key), true, |j| {
                match j.state(now) {
                    JobState::Done => false,
                    // Cancelled by an operator: not in the way.
                    JobState::Dead => true,
                    _ => {
                        found = Some(j);
                        false
                    }
                }
            })?;
        Ok(found)
    }

    /// The node's next report still waiting, if any.
    fn next_pending(&self, prefix: &str, key: &str) -> crate::queue::Result<Option<u64>> {
        let now = self.queue.now();
        let mut found = None;
        self.queue.scan_keys(
            jobs::TRAFFIC_REPORT,
            prefix,
            Some(key),
            false,
            |j| match j.state(now) {
                JobState::Scheduled | JobState::Ready | JobState::Running => {
                    found = Some(j.id);
                    false
                }
                _ => true,
            },
        )?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_spec_shape() {
        let r = Report {
            report_id: "r-1".into(),
            node_id: 7,
            collected_at: "2026-11-21T10:00:00Z".into(),
            items: vec![Item {
                uuid: Uuid::from_u128(0x9b2c8f4e_0000_4000_8000_000000000001),
                upload: 123,
                download: 456,
            }],
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"report_id":"r-1","node_id":7,"collected_at":"2026-11-21T10:00:00Z","items":[{"uuid":"9b2c8f4e-0000-4000-8000-000000000001","upload":123,"download":456}]}"#
        );
        assert_eq!(Report::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn the_body_is_sized_before_it_is_written() {
        let (id, at) = (
            "8a1f0c2e-5b6d-4e7f-9a0b-1c2d3e4f5a6b",
            "2026-11-21T10:00:00.123Z",
        );
        for n in [0u64, 1, 2, 1000] {
            let items: Vec<Item> = (0..n)
                .map(|i| Item {
                    uuid: Uuid::from_u128(u128::from(i) << 64 | 7),
                    upload: i * 1_000_003,
                    download: u64::MAX - i,
                })
                .collect();
            let body = encode(id, u64::MAX, at, &items);
            let want = encoded_len(id, u64::MAX, at, &items);
            assert_eq!(body.len(), want);
            assert_eq!(body.capacity(), want, "grown while written");
        }
    }

    #[test]
    fn keys_sort_in_creation_order_and_per_node() {
        assert!(key(1, 9) < key(1, 10));
        assert!(key(1, 99).starts_with(&node_prefix(1)));
        assert!(!key(10, 1).starts_with(&node_prefix(1)));
    }
}
