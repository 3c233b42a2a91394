//! Per node: the reports waiting and those delivered, with their bytes (`queuectl
//! traffic`). Read-only; from the report jobs themselves, so delivered reports count as
//! long as the queue keeps done jobs (`dedupe_window`, or the kind's `keep_done`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Report;
use crate::jobs;
use crate::queue::{JobState, ListFilter, Outcome, Queue, Stored, rfc3339};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub(crate) struct Tally {
    pub reports: u64,
    /// User entries across those reports.
    pub items: u64,
    pub upload: u64,
    pub download: u64,
}

impl Tally {
    fn add(&mut self, r: &Report) {
        self.reports += 1;
        self.items += r.items.len() as u64;
        self.upload += r.upload();
        self.download += r.download();
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct NodeTraffic {
    pub node: u64,
    /// Scheduled, ready or running.
    pub pending: Tally,
    /// Done (and still kept).
    pub delivered: Tally,
    /// Cancelled by an operator: never delivered.
    pub dead: Tally,
    /// `collected_at` of the oldest report waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending: Option<String>,
    /// The last error of the oldest report waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the newest delivered report was delivered (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_delivered: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Summary {
    pub nodes: Vec<NodeTraffic>,
    /// Reports whose payload does not decode (ids).
    pub unreadable: Vec<u64>,
}

pub(crate) fn summary(queue: &Queue) -> crate::queue::Result<Summary> {
    let now = queue.now();
    let jobs = queue.list(&ListFilter {
        kind: Some(jobs::TRAFFIC_REPORT),
        ..ListFilter::default()
    })?;
    let mut nodes: BTreeMap<u64, NodeTraffic> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut last_done: BTreeMap<u64, u64> = BTreeMap::new();
    // In id order: the first pending report met is the oldest.
    for job in jobs {
        let Ok(r) = Report::decode(&job.payload) else {
            unreadable.push(job.id);
            continue;
        };
        let n = nodes.entry(r.node_id).or_insert_with(|| NodeTraffic {
            node: r.node_id,
            ..NodeTraffic::default()
        });
        match job.state(now) {
            JobState::Done => {
                n.delivered.add(&r);
                if let Stored::Done { at_ms } = job.stored {
                    let last = last_done.entry(r.node_id).or_default();
                    *last = (*last).max(at_ms);
                }
            }
            JobState::Dead => n.dead.add(&r),
            _ => {
                if n.oldest_pending.is_none() {
                    n.oldest_pending = Some(r.collected_at.clone());
                    n.last_error = job.history.iter().rev().find_map(|a| match &a.outcome {
                        Outcome::Failed { error } => Some(error.clone()),
                        Outcome::Interrupted { reason } => Some(reason.clone()),
                        Outcome::LeaseExpired => Some("lease expired".into()),
                        Outcome::Succeeded => None,
                    });
                }
                n.pending.add(&r);
            }
        }
    }
    for (node, at) in last_done {
        if let Some(n) = nodes.get_mut(&node) {
            n.last_delivered = Some(rfc3339(at));
        }
    }
    Ok(Summary {
        nodes: nodes.into_values().collect(),
        unreadable,
    })
}
