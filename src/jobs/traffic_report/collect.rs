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

use super::Item;
use super::state::{self, Bases, Chunk, ChunkId, CoreMark, Pair, UserKey};
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
        let (mut values, foreign) = self.values(&counters)?;

        // The users whose baseline changes, by chunk: (UUID, counter values, delta).
        // After a restart every user is here: their chunks are written anew.
        let mut touched: BTreeMap<ChunkId, Vec<(Uuid, Pair, Pair)>> = BTreeMap::new();
        // A chunk holds about users / (256 × nodes) of them (UUIDs are random): a
        // touched chunk is made that big (and three standard deviations more) at once,
        // rather than doubled up from four — most of a full collection's allocations.
        let per_chunk = values.len() / (256 * self.shapes.len().max(1));
        let room = per_chunk + 3 * per_chunk.isqrt() + 4;
        let mut grew = false;
        let mut judge = |user: UserKey, value: Pair, committed: Pair| {
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
            grew |= delta != [0, 0];
            if restarted || committed != value {
                touched
                    .entry(state::chunk_of(&user))
                    .or_insert_with(|| Vec::with_capacity(room))
                    .push((user.1, value, delta));
            }
        };
        // Users with a baseline, chunk by chunk: the chunks are read in order, and each
        // user costs one probe of `values` (a binary search per user into 256 vectors at
        // random missed the cache at every step: most of a steady collection).
        for id in self.bases.chunk_ids() {
            for &(uuid, committed) in self.bases.chunk(id) {
                if let Some((value, seen)) = values.get_mut(&(id.0, uuid)) {
                    *seen = true;
                    judge((id.0, uuid), *value, committed);
                }
            }
        }
        // And the users without one.
        for (&user, &(value, seen)) in &values {
            if !seen {
                judge(user, value, [0, 0]);
            }
        }
        self.seen = Some((after, read_at));

        let mut collected = Collected {
            restarted,
            counters: counters.len(),
            foreign,
            ..Collected::default()
        };
        if !grew && !restarted {
            return Ok(collected);
        }
        drop(values);

        // Chunk order is (node, UUID) order: each node's items come out sorted.
        let mut per_node: BTreeMap<u64, Vec<Item>> = BTreeMap::new();
        for (&(node_id, _), users) in &touched {
            let grew = users.iter().filter(|u| u.2 != [0, 0]).count();
            per_node.entry(node_id).or_default().reserve_exact(grew);
        }
        for (&(node_id, _), users) in &mut touched {
            users.sort_unstable_by_key(|u| u.0);
            let items = per_node.entry(node_id).or_default();
            items.extend(
                users
                    .iter()
                    .filter(|u| u.2 != [0, 0])
                    .map(|&(uuid, _, delta)| Item {
                        uuid,
                        upload: delta[0],
                        download: delta[1],
                    }),
            );
        }
        per_node.retain(|_, items| !items.is_empty());

        let collected_at = rfc3339(now);
        let mut seq = self.next_seq;
        let mut enqueue = Vec::new();
        let mut reports = Vec::new();
        let max = self.config.traffic.max_items.max(1);
        for (node_id, items) in &per_node {
            for chunk in items.chunks(max) {
                let report_id = Uuid::new_v4().to_string();
                enqueue.push(NewJob {
                    kind: jobs::TRAFFIC_REPORT,
                    key: super::key(*node_id, seq),
                    payload: super::encode(&report_id, *node_id, &collected_at, chunk),
                    not_before: None,
                    dedupe: Dedupe::Window,
                });
                seq += 1;
                reports.push(Committed {
                    node_id: *node_id,
                    report_id,
                    job_id: 0,
                    items: chunk.len(),
                    upload: chunk.iter().map(|i| i.upload).sum(),
                    download: chunk.iter().map(|i| i.download).sum(),
                });
            }
        }
        drop(per_node);
        let mark = CoreMark {
            sys: after,
            read_at_ms: now,
            next_seq: seq,
        };
        let chunks = self.new_chunks(&touched, restarted);
        drop(touched);
        let mut writes: Vec<StateWrite> = self
            .legacy
            .iter()
            .map(|n| StateWrite::Delete(n.clone()))
            .collect();
        writes.extend(chunks.iter().map(|(id, c)| state::put_chunk(*id, c)));
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
        for (id, chunk) in chunks {
            self.bases.set_chunk(id, chunk);
        }
        for (report, enqueued) in reports.iter_mut().zip(&done.enqueued) {
            report.job_id = enqueued.job.id;
        }
        collected.reports = reports;
        Ok(collected)
    }

    /// Each of our users' counter values (uplink, downlink), and how many emails were
    /// of no node's shape. Two emails of one user (differing in case: the core matches
    /// emails case-insensitively, its counters do not) are summed, and so is their
    /// baseline: the sum grows exactly as the two do.
    /// (The flag: seen while walking the baselines; `false` here.)
    fn values(&self, counters: &RawStats) -> Result<(Values, usize), BadCounter> {
        let mut values: Values = HashMap::with_capacity(counters.len() / 2);
        let mut foreign: HashSet<&str> = HashSet::new();
        for counter in counters.counters() {
            let (name, value) = counter?;
            let Some((email, dir)) = parse_counter(name) else {
                continue;
            };
            match attribute(&self.shapes, email) {
                Some(user) => {
                    let v = &mut values.entry(user).or_default().0[dir];
                    *v = v.saturating_add(u64::try_from(value).unwrap_or(0));
                }
                None => {
                    foreign.insert(email);
                }
            }
        }
        Ok((values, foreign.len()))
    }

    /// The chunks to write, and what each then holds (empty: deleted): after a
    /// restart, every chunk holds exactly the counters just read; otherwise a touched
    /// chunk is its committed entries with the touched users' values laid over them.
    /// Every chunk is written when per-email records of an older version are still
    /// there (they are deleted in the same write).
    fn new_chunks(
        &self,
        touched: &BTreeMap<ChunkId, Vec<(Uuid, Pair, Pair)>>,
        restarted: bool,
    ) -> Vec<(ChunkId, Chunk)> {
        let mut ids: BTreeSet<ChunkId> = touched.keys().copied().collect();
        if restarted || !self.legacy.is_empty() {
            ids.extend(self.bases.chunk_ids());
        }
        ids.into_iter()
            .map(|id| {
                let now: &[(Uuid, Pair, Pair)] = touched.get(&id).map_or(&[], Vec::as_slice);
                let chunk = if restarted {
                    now.iter().map(|&(u, v, _)| (u, v)).collect()
                } else {
                    merge(self.bases.chunk(id), now)
                };
                (id, chunk)
            })
            .collect()
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

/// Each of our users' counter values, and a flag (see `collect`).
type Values = HashMap<UserKey, (Pair, bool)>;

/// `base` (sorted by UUID) with the values of `over` (sorted by UUID) laid over it.
fn merge(base: &[(Uuid, Pair)], over: &[(Uuid, Pair, Pair)]) -> Chunk {
    // Most of `over` replaces entries of `base` (users seen before): sized for that,
    // it grows only when new users joined.
    let mut out = Vec::with_capacity(base.len().max(over.len()));
    let (mut b, mut o) = (base.iter().peekable(), over.iter().peekable());
    loop {
        match (b.peek(), o.peek()) {
            (Some(&&(bu, bp)), Some(&&(ou, op, _))) => {
                if bu < ou {
                    out.push((bu, bp));
                    b.next();
                } else {
                    if bu == ou {
                        b.next();
                    }
                    out.push((ou, op));
                    o.next();
                }
            }
            (Some(&&e), None) => {
                out.push(e);
                b.next();
            }
            (None, Some(&&(ou, op, _))) => {
                out.push((ou, op));
                o.next();
            }
            (None, None) => return out,
        }
    }
}

/// The node and UUID of a counter's email.
fn attribute(shapes: &[EmailShape], email: &str) -> Option<UserKey> {
    shapes
        .iter()
        .find_map(|s| s.uuid_of(email).map(|u| (s.node_id, u)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    proptest! {
        /// The merge of two sorted lists is the map-overlay it replaces.
        #[test]
        fn merge_is_an_overlay(
            base in proptest::collection::btree_map(any::<u8>(), any::<u64>(), 0..40),
            over in proptest::collection::btree_map(any::<u8>(), any::<u64>(), 0..40),
        ) {
            let base_list: Chunk = base.iter().map(|(&k, &v)| (uuid(k), [v, 1])).collect();
            let over_list: Vec<(Uuid, Pair, Pair)> =
                over.iter().map(|(&k, &v)| (uuid(k), [v, 2], [0, 0])).collect();
            let mut want: BTreeMap<Uuid, Pair> = base_list.iter().copied().collect();
            want.extend(over_list.iter().map(|&(u, p, _)| (u, p)));
            let want: Chunk = want.into_iter().collect();
            prop_assert_eq!(merge(&base_list, &over_list), want);
        }
    }
}
