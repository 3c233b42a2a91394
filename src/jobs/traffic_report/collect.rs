//! Collection: the core's per-user counters turned into reports, exactly.
//!
//! 1. Read the core's process stats (uptime, allocation counters), then every
//!    `user>>>{email}>>>traffic>>>uplink|downlink` counter *without* resetting it, then
//!    the process stats again. If they went back between the two readings the core
//!    restarted during the read: nothing is counted, the next interval reads again.
//! 2. Decide whether the core restarted since the baseline was taken: a counter of its
//!    process went back, or its uptime is shorter than the time since then allows.
//!    After a restart every counter started again at zero, so the baseline is zero.
//! 3. Delta per user = counter − baseline. A counter lower than its baseline without a
//!    restart (someone reset it) counts from zero, with a warning. Removing a user does
//!    not delete their counters (XRAY-FACTS), so a removed and re-added user's counters
//!    continue from their baseline: nothing is counted twice.
//! 4. Attribute each email to a node and a UUID through `xray.email_template`; emails
//!    of another shape are not ours and are skipped.
//! 5. Commit the new baselines, the core mark, and one report per node (split into
//!    reports of at most `traffic.max_items` items, each with its own `report_id`) as
//!    one write. Nothing is committed when no user's counters grew and the core did not
//!    restart.
//!
//! Its cost follows what changed (issue 15): the answer is read as bytes, each name a
//! `&str` into it ([`RawStats`]); users are (node, 16-byte UUID), never a `String`; the
//! baselines are 256 chunks a node, and a commit rewrites only the chunks of users
//! whose counters grew. A collection where nothing grew writes nothing.
//!
//! Why the counters are never reset: a reset is a swap per counter, and uplink and
//! downlink are separate counters, so a crash between the reset and the commit would
//! lose those bytes for good. Reading without resetting and keeping the baseline in the
//! same write as the report makes a crash at any instant harmless.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use super::state::{self, Bases, CoreMark, Pair, UserKey};
use super::{Item, Report};
use crate::config::Config;
use crate::jobs;
use crate::peers::xray::email::{EmailShape, parse_counter};
use crate::peers::xray::stats::{BadCounter, RawStats};
use crate::peers::xray::{SysStats, XrayClient};
use crate::queue::{Commit, Dedupe, NewJob, Queue, StateWrite, rfc3339};

/// Slack for the uptime rule within one agent process (monotonic clock): uptime is
/// whole seconds, read somewhere within a call.
const SLACK_SECS: f64 = 2.0;
/// Slack across agent restarts, where only the wall clock relates two readings: a
/// clock step forward larger than this and the core's age would read as a restart.
const WALL_SLACK_SECS: f64 = 120.0;

/// What one collection did.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// (node, report id, items, upload, download, job id) per report committed.
    pub reports: Vec<Committed>,
    /// The core restarted since the previous collection.
    pub restarted: bool,
    /// Counters read (user uplink and downlink).
    pub counters: usize,
    /// Emails skipped: not of the template's shape for any node.
    pub foreign: usize,
}

#[derive(Debug, Clone)]
pub struct Committed {
    pub node_id: u64,
    pub report_id: String,
    pub job_id: u64,
    pub items: usize,
    pub upload: u64,
    pub download: u64,
}

/// The collector. One per core; collections never overlap (`&mut self`).
pub struct Collector {
    queue: Queue,
    core: XrayClient,
    config: Arc<Config>,
    shapes: Vec<EmailShape>,
    /// The baselines as committed.
    bases: Bases,
    /// Per-email baseline records of an older version, folded into `bases`: deleted by
    /// the next commit, which writes every chunk.
    legacy: Vec<String>,
    /// The core as committed; `seen` is the last reading in this process.
    mark: Option<CoreMark>,
    seen: Option<(SysStats, Instant)>,
    next_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cannot read the core's counters: {0}")]
    Core(#[from] crate::peers::xray::XrayError),
    #[error("the core's counters do not decode: {0}")]
    Counter(#[from] BadCounter),
    #[error(
        "the core restarted while its counters were read; nothing counted, the next collection reads again"
    )]
    RestartedDuringRead,
    #[error("traffic state: {0}")]
    State(#[from] state::TrafficStateError),
    #[error(transparent)]
    Queue(#[from] crate::queue::Error),
}

impl Collector {
    /// Loads the baselines. Fails when a baseline record cannot be read: counting
    /// from zero then would report that user's whole counter again.
    pub fn new(
        queue: Queue,
        core: XrayClient,
        config: Arc<Config>,
    ) -> Result<Collector, CollectError> {
        let mark = state::load_core(&queue)?;
        let template = config
            .xray
            .as_ref()
            .map_or("{uuid}", |x| x.email_template.as_str());
        let shapes: Vec<EmailShape> = config
            .nodes
            .iter()
            .filter_map(|n| EmailShape::new(template, n.id))
            .collect();
        let loaded = state::load_bases(&queue, |email| attribute(&shapes, email))?;
        if !loaded.legacy.is_empty() {
            tracing::info!(
                records = loaded.legacy.len(),
                "traffic baselines are kept per email (an older version): the next collection rewrites them as chunks"
            );
        }
        Ok(Collector {
            next_seq: mark.map_or(0, |m| m.next_seq),
            queue,
            core,
            config,
            shapes,
            bases: loaded.bases,
            legacy: loaded.legacy,
            mark,
            seen: None,
        })
    }

    /// One collection; see the module doc.
    pub async fn collect(&mut self) -> Result<Collected, CollectError> {
        let before = self.core.sys_stats().await?;
        let counters = self.core.query_stats_raw("user>>>").await?;
        let after = self.core.sys_stats().await?;
        let read_at = Instant::now();
        if after.went_back(&before) {
            return Err(CollectError::RestartedDuringRead);
        }
        let now = self.queue.now();
        let restarted = self.restarted(&before, now);
        let (values, foreign) = self.values(&counters)?;

        let mut per_node: BTreeMap<u64, Vec<Item>> = BTreeMap::new();
        // The users whose baseline changes (`None`: goes), and their chunks.
        let mut changed: BTreeMap<UserKey, Option<Pair>> = BTreeMap::new();
        for (&user, &value) in &values {
            let committed = self.bases.get(&user).copied().unwrap_or_default();
            let base = if restarted { [0, 0] } else { committed };
            let mut delta = [0u64; 2];
            for d in 0..2 {
                delta[d] = if value[d] >= base[d] {
                    value[d] - base[d]
                } else {
                    tracing::warn!(
                        node = user.0,
                        uuid = %user.1,
                        counter = if d == 0 { "uplink" } else { "downlink" },
                        was = base[d],
                        now = value[d],
                        "a traffic counter went down without a core restart (reset by someone else?): counting it from zero"
                    );
                    value[d]
                };
            }
            if delta != [0, 0] {
                per_node.entry(user.0).or_default().push(Item {
                    uuid: user.1,
                    upload: delta[0],
                    download: delta[1],
                });
            }
            if committed != value {
                changed.insert(user, Some(value));
            }
        }
        if restarted {
            // The old process's baselines mean nothing to the new one.
            for user in self.bases.keys() {
                if !values.contains_key(user) {
                    changed.insert(*user, None);
                }
            }
        }
        self.seen = Some((after, read_at));

        let mut collected = Collected {
            restarted,
            counters: counters.len(),
            foreign,
            ..Collected::default()
        };
        if per_node.is_empty() && !restarted {
            return Ok(collected);
        }

        let collected_at = rfc3339(now);
        let mut seq = self.next_seq;
        let mut enqueue = Vec::new();
        let mut reports = Vec::new();
        let max = self.config.traffic.max_items.max(1);
        for (node_id, mut items) in per_node {
            items.sort_unstable_by_key(|i| i.uuid);
            for chunk in items.chunks(max) {
                let report = Report {
                    report_id: Uuid::new_v4().to_string(),
                    node_id,
                    collected_at: collected_at.clone(),
                    items: chunk.to_vec(),
                };
                enqueue.push(NewJob {
                    kind: jobs::TRAFFIC_REPORT,
                    key: super::key(node_id, seq),
                    payload: report.encode(),
                    not_before: None,
                    dedupe: Dedupe::Window,
                });
                seq += 1;
                reports.push(report);
            }
        }
        let mark = CoreMark {
            sys: after,
            read_at_ms: now,
            next_seq: seq,
        };
        let mut writes = self.chunk_writes(&changed);
        writes.push(state::put_core(&mark));
        let done = self
            .queue
            .commit(Commit {
                state: writes,
                enqueue,
                ..Commit::default()
            })
            .await?;

        // Committed: only now does the in-memory view move.
        self.next_seq = seq;
        self.mark = Some(mark);
        self.legacy.clear();
        for (user, value) in changed {
            match value {
                Some(v) => self.bases.insert(user, v),
                None => self.bases.remove(&user),
            };
        }
        collected.reports = reports
            .iter()
            .zip(&done.enqueued)
            .map(|(r, e)| Committed {
                node_id: r.node_id,
                report_id: r.report_id.clone(),
                job_id: e.job.id,
                items: r.items.len(),
                upload: r.upload(),
                download: r.download(),
            })
            .collect();
        Ok(collected)
    }

    /// Each of our users' counter values (uplink, downlink), and how many emails were
    /// of no node's shape. Two emails of one user (differing in case: the core matches
    /// emails case-insensitively, its counters do not) are summed, and so is their
    /// baseline: the sum grows exactly as the two do.
    fn values(&self, counters: &RawStats) -> Result<(HashMap<UserKey, Pair>, usize), BadCounter> {
        let mut values: HashMap<UserKey, Pair> = HashMap::with_capacity(counters.len() / 2);
        let mut foreign: HashSet<&str> = HashSet::new();
        for counter in counters.counters() {
            let (name, value) = counter?;
            let Some((email, dir)) = parse_counter(name) else {
                continue;
            };
            match attribute(&self.shapes, email) {
                Some(user) => {
                    let v = &mut values.entry(user).or_default()[dir];
                    *v = v.saturating_add(u64::try_from(value).unwrap_or(0));
                }
                None => {
                    foreign.insert(email);
                }
            }
        }
        Ok((values, foreign.len()))
    }

    /// The chunk records to write for `changed` users, over the committed baselines;
    /// every chunk (and the deletion of the per-email records) when the per-email
    /// records of an older version are still there.
    fn chunk_writes(&self, changed: &BTreeMap<UserKey, Option<Pair>>) -> Vec<StateWrite> {
        let mut chunks: BTreeSet<(u64, u8)> = changed.keys().map(state::chunk_of).collect();
        let mut writes: Vec<StateWrite> = Vec::new();
        if !self.legacy.is_empty() {
            chunks.extend(self.bases.keys().map(state::chunk_of));
            writes.extend(self.legacy.iter().map(|n| StateWrite::Delete(n.clone())));
        }
        for chunk in chunks {
            // The chunk's committed entries with the changes laid over them.
            let mut entries: BTreeMap<Uuid, Pair> = state::chunk_range(&self.bases, chunk)
                .map(|(&(_, u), &p)| (u, p))
                .collect();
            let (lo, hi) = state::chunk_range_bounds(chunk);
            for (&(_, uuid), value) in changed.range((chunk.0, lo)..=(chunk.0, hi)) {
                match value {
                    Some(v) => entries.insert(uuid, *v),
                    None => entries.remove(&uuid),
                };
            }
            writes.push(state::put_chunk(chunk, entries.iter()));
        }
        writes
    }

    /// Whether the core read as `now_sys` is a new process since the baseline.
    fn restarted(&self, now_sys: &SysStats, now_ms: crate::queue::Millis) -> bool {
        if let Some((seen, at)) = &self.seen {
            // Same agent process: the monotonic clock relates the readings.
            let expected = f64::from(seen.uptime) + at.elapsed().as_secs_f64();
            if now_sys.went_back(seen) || f64::from(now_sys.uptime) + SLACK_SECS < expected {
                return true;
            }
        }
        match &self.mark {
            Some(mark) => {
                let wall = now_ms.saturating_sub(mark.read_at_ms) as f64 / 1000.0;
                now_sys.went_back(&mark.sys)
                    || f64::from(now_sys.uptime) + WALL_SLACK_SECS
                        < f64::from(mark.sys.uptime) + wall
            }
            // Never collected: the baselines (none) are zero anyway.
            None => false,
        }
    }
}

/// The node and UUID of a counter's email.
fn attribute(shapes: &[EmailShape], email: &str) -> Option<UserKey> {
    shapes
        .iter()
        .find_map(|s| s.uuid_of(email).map(|u| (s.node_id, u)))
}
