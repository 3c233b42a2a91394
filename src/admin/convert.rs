//! Queue types to admin messages and back. A job crosses the socket whole (its record,
//! not a rendering), so `queuectl` renders a live job exactly as an offline one.

use tonic::Status;

use super::pb;
use crate::queue::{
    self, Attempt, DeadReason, Event, EventKind, FsckReport, Job, JobKind, Outcome, QuarantineView,
    Stored,
};

impl From<&Job> for pb::Job {
    fn from(job: &Job) -> Self {
        use pb::job::Stored as S;
        pb::Job {
            id: job.id,
            kind: job.kind.to_string(),
            key: job.key.clone(),
            payload: job.payload.clone(),
            created_ms: job.created_ms,
            stored: Some(match job.stored {
                Stored::Pending { due_ms } => S::Pending(pb::Pending { due_ms }),
                Stored::Running {
                    started_ms,
                    lease_until_ms,
                } => S::Running(pb::Running {
                    started_ms,
                    lease_until_ms,
                }),
                Stored::Done { at_ms } => S::Done(pb::Finished { at_ms }),
                Stored::Dead { at_ms, reason } => S::Dead(pb::Dead {
                    at_ms,
                    reason: reason.as_str().to_string(),
                }),
            }),
            attempts: job.attempts,
            history: job.history.iter().map(attempt).collect(),
        }
    }
}

fn attempt(a: &Attempt) -> pb::Attempt {
    use pb::attempt::Outcome as O;
    pb::Attempt {
        number: a.number,
        started_ms: a.started_ms,
        duration_ms: a.duration_ms,
        outcome: Some(match &a.outcome {
            Outcome::Succeeded => O::Succeeded(pb::Empty {}),
            Outcome::Failed { error } => O::Failed(error.clone()),
            Outcome::LeaseExpired => O::LeaseExpired(pb::Empty {}),
            Outcome::Interrupted { reason } => O::Interrupted(reason.clone()),
        }),
        note: a.note.clone(),
    }
}

/// Why a job from the socket cannot be read (a `queuectl` and a daemon of different
/// versions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Kind(#[from] crate::jobs::UnknownKind),
    #[error("job {id}: unknown dead reason `{reason}`")]
    DeadReason { id: u64, reason: String },
    #[error("job {id} came without a state")]
    NoState { id: u64 },
    #[error("job {id}: an attempt without an outcome")]
    NoOutcome { id: u64 },
}

impl TryFrom<pb::Job> for Job {
    type Error = WireError;

    fn try_from(j: pb::Job) -> Result<Self, WireError> {
        use pb::job::Stored as S;
        let kind: JobKind = crate::jobs::kind_named(&j.kind).map_err(WireError::Kind)?;
        let stored = match j.stored {
            Some(S::Pending(p)) => Stored::Pending { due_ms: p.due_ms },
            Some(S::Running(r)) => Stored::Running {
                started_ms: r.started_ms,
                lease_until_ms: r.lease_until_ms,
            },
            Some(S::Done(d)) => Stored::Done { at_ms: d.at_ms },
            Some(S::Dead(d)) => Stored::Dead {
                at_ms: d.at_ms,
                reason: match d.reason.as_str() {
                    "exhausted" => DeadReason::Exhausted,
                    "cancelled" => DeadReason::Cancelled,
                    other => {
                        return Err(WireError::DeadReason {
                            id: j.id,
                            reason: other.to_string(),
                        });
                    }
                },
            },
            None => return Err(WireError::NoState { id: j.id }),
        };
        let history = j
            .history
            .into_iter()
            .map(|a| {
                use pb::attempt::Outcome as O;
                let outcome = match a.outcome {
                    Some(O::Succeeded(_)) => Outcome::Succeeded,
                    Some(O::Failed(error)) => Outcome::Failed { error },
                    Some(O::LeaseExpired(_)) => Outcome::LeaseExpired,
                    Some(O::Interrupted(reason)) => Outcome::Interrupted { reason },
                    None => return Err(WireError::NoOutcome { id: j.id }),
                };
                Ok(Attempt {
                    number: a.number,
                    started_ms: a.started_ms,
                    duration_ms: a.duration_ms,
                    outcome,
                    note: a.note,
                })
            })
            .collect::<Result<_, WireError>>()?;
        Ok(Job {
            id: j.id,
            kind,
            key: j.key,
            payload: j.payload,
            created_ms: j.created_ms,
            stored,
            attempts: j.attempts,
            history,
        })
    }
}

/// A job event as `queuectl tail` shows it.
pub(crate) fn event(e: &Event) -> pb::JobEvent {
    let (name, attempt, due_ms) = match e.what {
        EventKind::Enqueued => ("enqueued", None, None),
        EventKind::Replaced => ("replaced", None, None),
        EventKind::Leased { attempt } => ("leased", Some(attempt), None),
        EventKind::Done => ("done", None, None),
        EventKind::Retry { due_ms } => ("retry", None, Some(due_ms)),
        EventKind::Dead => ("dead", None, None),
        EventKind::Retried { due_ms } => ("retried", None, Some(due_ms)),
        EventKind::Cancelled => ("cancelled", None, None),
    };
    pb::JobEvent {
        id: e.id,
        kind: e.kind.to_string(),
        key: e.key.clone(),
        event: name.to_string(),
        attempt,
        due_ms,
    }
}

impl From<QuarantineView> for pb::QuarantineRecord {
    fn from(q: QuarantineView) -> Self {
        pb::QuarantineRecord {
            key: q.key,
            reason: q.reason,
            at: q.at,
            bytes: q.bytes as u64,
        }
    }
}

impl From<pb::QuarantineRecord> for QuarantineView {
    fn from(q: pb::QuarantineRecord) -> Self {
        QuarantineView {
            key: q.key,
            reason: q.reason,
            at: q.at,
            bytes: usize::try_from(q.bytes).unwrap_or(usize::MAX),
        }
    }
}

impl From<FsckReport> for pb::FsckReport {
    fn from(r: FsckReport) -> Self {
        pb::FsckReport {
            jobs: r.jobs,
            index_entries: r.index_entries,
            idempotency_entries: r.idempotency_entries,
            state_records: r.state_records,
            quarantined: r.quarantined,
            problems: r
                .problems
                .into_iter()
                .map(|p| pb::FsckProblem {
                    key: p.key,
                    problem: p.problem,
                    fix: p.fix,
                    repairable: p.repairable,
                })
                .collect(),
            repaired: r.repaired,
        }
    }
}

/// The status a queue error becomes; its message is the line `queuectl` prints.
pub(crate) fn status(e: queue::Error) -> Status {
    use queue::Error as E;
    let message = e.to_string();
    match e {
        E::NotFound(_) => Status::not_found(message),
        E::InvalidState { .. } | E::KeyTaken { .. } => Status::failed_precondition(message),
        E::InvalidKey(_) => Status::invalid_argument(message),
        _ => Status::internal(message),
    }
}

/// Parses a kind name from a request.
pub(crate) fn parse_kind(s: &str) -> Result<JobKind, Status> {
    crate::jobs::kind_named(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Parses a state name from a request.
pub(crate) fn parse<T: std::str::FromStr<Err: std::fmt::Display>>(s: &str) -> Result<T, Status> {
    s.parse()
        .map_err(|e: T::Err| Status::invalid_argument(e.to_string()))
}

/// A traffic summary as a message, and back (queuectl renders the summary itself).
pub(crate) fn traffic(s: crate::jobs::traffic_report::summary::Summary) -> pb::TrafficReply {
    use crate::jobs::traffic_report::summary::Tally;
    let tally = |t: Tally| {
        Some(pb::TrafficTally {
            reports: t.reports,
            items: t.items,
            upload: t.upload,
            download: t.download,
        })
    };
    pb::TrafficReply {
        nodes: s
            .nodes
            .into_iter()
            .map(|n| pb::NodeTraffic {
                node: n.node,
                pending: tally(n.pending),
                delivered: tally(n.delivered),
                dead: tally(n.dead),
                oldest_pending: n.oldest_pending,
                last_error: n.last_error,
                last_delivered: n.last_delivered,
            })
            .collect(),
        unreadable: s.unreadable,
    }
}

pub(crate) fn traffic_summary(
    r: pb::TrafficReply,
) -> crate::jobs::traffic_report::summary::Summary {
    use crate::jobs::traffic_report::summary::{NodeTraffic, Summary, Tally};
    let tally = |t: Option<pb::TrafficTally>| {
        let t = t.unwrap_or_default();
        Tally {
            reports: t.reports,
            items: t.items,
            upload: t.upload,
            download: t.download,
        }
    };
    Summary {
        nodes: r
            .nodes
            .into_iter()
            .map(|n| NodeTraffic {
                node: n.node,
                pending: tally(n.pending),
                delivered: tally(n.delivered),
                dead: tally(n.dead),
                oldest_pending: n.oldest_pending,
                last_error: n.last_error,
                last_delivered: n.last_delivered,
            })
            .collect(),
        unreadable: r.unreadable,
    }
}
