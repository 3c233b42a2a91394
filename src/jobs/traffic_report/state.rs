//! What collection keeps in the queue's state area, written in the same batch as the
//! reports it produces. Formats (also in `queue-schema/README.md`):
//!
//! - `traffic/core`: the kinds' state codec (`jobs::state`) of [`CoreMark`]: the core
//!   process as last read (uptime and allocation counters, to tell a restart), when, and
//!   the next report sequence number.
//! - `traffic/bases/{node_id}/{xx}`: the baselines of the node's users whose UUID's
//!   first byte is `xx` (two hex digits): version `2`, then per user, sorted by UUID,
//!   its 16 UUID bytes and its uplink and downlink counter values at the last
//!   collection (each a u64 little-endian): 32 bytes a user. A user without an entry
//!   has baseline 0. 256 chunks a node: a collection rewrites only the chunks with a
//!   user whose counters grew, and a 100,000-user node is 256 records of ~12 KB, not
//!   100,000 keys. In memory ([`Bases`]) the same chunks, as sorted vectors.
//! - `traffic/base/{email}` (before the chunks): version `1`, then the two counter
//!   values (17 bytes), one record per user. Still read; the first collector to open a
//!   queue that has them rewrites them as chunks in one write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::jobs::state as codec;
use crate::peers::xray::SysStats;
use crate::queue::{Millis, Queue, StateWrite};

pub const CORE: &str = "traffic/core";
/// The per-email records of before the chunks.
pub const LEGACY_PREFIX: &str = "traffic/base/";
const LEGACY_VERSION: u8 = 1;
pub const CHUNK_PREFIX: &str = "traffic/bases/";
const CHUNK_VERSION: u8 = 2;
const ENTRY: usize = 32;

/// The core as seen by the last committed collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreMark {
    pub sys: SysStats,
    /// Wall-clock time of that reading.
    pub read_at_ms: Millis,
    /// The next report's sequence number (report keys sort by it).
    pub next_seq: u64,
}

/// Uplink and downlink counter values.
pub type Pair = [u64; 2];

/// A user of a node: whose counters a baseline is.
pub type UserKey = (u64, Uuid);

/// A chunk: a node and the first byte of its users' UUIDs.
pub type ChunkId = (u64, u8);

/// One chunk's baselines, sorted by UUID: 32 bytes a user, as on disk.
pub type Chunk = Vec<(Uuid, Pair)>;

/// Every user's baseline, as the chunks they are kept in: a 100,000-user node is 256
/// sorted vectors, 32 bytes a user, not a tree node per user.
#[derive(Debug, Default, Clone)]
pub struct Bases {
    chunks: BTreeMap<ChunkId, Chunk>,
}

impl Bases {
    pub fn chunk(&self, id: ChunkId) -> &[(Uuid, Pair)] {
        self.chunks.get(&id).map_or(&[], Vec::as_slice)
    }

    /// The chunks that hold a baseline.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunks.keys().copied()
    }

    /// Makes `id` hold `entries` (sorted by UUID), or nothing when empty.
    pub fn set_chunk(&mut self, id: ChunkId, entries: Chunk) {
        if entries.is_empty() {
            self.chunks.remove(&id);
        } else {
            self.chunks.insert(id, entries);
        }
    }

    /// Adds to a user's baseline (the per-email records of before the chunks, two
    /// emails of one user summed); `finish` restores the order afterwards.
    fn add(&mut self, user: UserKey, pair: Pair) {
        self.chunks
            .entry(chunk_of(&user))
            .or_default()
            .push((user.1, pair));
    }

    /// Sorts every chunk by UUID and sums the entries of one user: a chunk read from
    /// disk is written sorted, but the order the merge and the walk rely on is not taken
    /// on trust.
    fn finish(&mut self) {
        for chunk in self.chunks.values_mut() {
            chunk.sort_by_key(|e| e.0);
            chunk.dedup_by(|later, kept| {
                if later.0 != kept.0 {
                    return false;
                }
                kept.1[0] = kept.1[0].saturating_add(later.1[0]);
                kept.1[1] = kept.1[1].saturating_add(later.1[1]);
                true
            });
        }
    }
}

/// Lookups only the tests make: a collection walks the chunks in order instead.
#[cfg(test)]
impl Bases {
    /// A user's baseline, if one is kept.
    fn get(&self, user: &UserKey) -> Option<Pair> {
        let chunk = self.chunks.get(&chunk_of(user))?;
        chunk
            .binary_search_by_key(&user.1, |e| e.0)
            .ok()
            .map(|i| chunk[i].1)
    }

    /// How many users have a baseline.
    fn len(&self) -> usize {
        self.chunks.values().map(Vec::len).sum()
    }
}

/// The chunk a user's baseline is kept in: its node and its UUID's first byte.
pub fn chunk_of(user: &UserKey) -> ChunkId {
    (user.0, user.1.as_bytes()[0])
}

pub fn chunk_key((node_id, byte): ChunkId) -> String {
    format!("{CHUNK_PREFIX}{node_id}/{byte:02x}")
}

/// The write that makes `chunk` hold `entries` (sorted by UUID): a delete when empty.
pub fn put_chunk(chunk: ChunkId, entries: &[(Uuid, Pair)]) -> StateWrite {
    if entries.is_empty() {
        return StateWrite::Delete(chunk_key(chunk));
    }
    let mut bytes = Vec::with_capacity(1 + entries.len() * ENTRY);
    bytes.push(CHUNK_VERSION);
    for (uuid, pair) in entries {
        bytes.extend_from_slice(uuid.as_bytes());
        bytes.extend_from_slice(&pair[0].to_le_bytes());
        bytes.extend_from_slice(&pair[1].to_le_bytes());
    }
    StateWrite::Put(chunk_key(chunk), bytes)
}

fn decode_chunk(bytes: &[u8]) -> Option<impl Iterator<Item = (Uuid, Pair)> + '_> {
    match bytes {
        [CHUNK_VERSION, rest @ ..] if rest.len() % ENTRY == 0 => {
            Some(rest.chunks_exact(ENTRY).map(|e| {
                let (id, counters) = e.split_at(16);
                let (up, down) = counters.split_at(8);
                let word = |b: &[u8]| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    u64::from_le_bytes(w)
                };
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(id);
                (Uuid::from_bytes(uuid), [word(up), word(down)])
            }))
        }
        _ => None,
    }
}

/// Which chunk a chunk record's name is, when it is one.
fn parse_chunk_key(name: &str) -> Option<ChunkId> {
    let (node, byte) = name.strip_prefix(CHUNK_PREFIX)?.split_once('/')?;
    if byte.len() != 2 {
        return None;
    }
    Some((node.parse().ok()?, u8::from_str_radix(byte, 16).ok()?))
}

pub fn put_core(mark: &CoreMark) -> StateWrite {
    codec::put(CORE.into(), mark)
}

/// A traffic state record that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TrafficStateError {
    #[error("{0}")]
    Record(#[from] codec::StateError),
    #[error("{0}")]
    Scan(#[from] crate::queue::Error),
    #[error("state {name} does not decode (17 bytes, version 1)")]
    Base { name: String },
    #[error("state {name} does not decode (version 2, then 32 bytes a user)")]
    Chunk { name: String },
}

pub fn load_core(queue: &Queue) -> Result<Option<CoreMark>, TrafficStateError> {
    Ok(codec::load(queue, CORE)?)
}

/// The per-email record of before the chunks (tests write one to check it is read).
pub fn put_legacy_base(email: &str, pair: Pair) -> StateWrite {
    let mut bytes = Vec::with_capacity(17);
    bytes.push(LEGACY_VERSION);
    bytes.extend_from_slice(&pair[0].to_le_bytes());
    bytes.extend_from_slice(&pair[1].to_le_bytes());
    StateWrite::Put(format!("{LEGACY_PREFIX}{email}"), bytes)
}

fn decode_legacy(bytes: &[u8]) -> Option<Pair> {
    match bytes {
        [LEGACY_VERSION, rest @ ..] if rest.len() == 16 => {
            let (up, down) = rest.split_at(8);
            Some([
                u64::from_le_bytes(up.try_into().ok()?),
                u64::from_le_bytes(down.try_into().ok()?),
            ])
        }
        _ => None,
    }
}

/// The baselines as stored, and the per-email records still to be rewritten as chunks.
#[derive(Debug, Default)]
pub struct Loaded {
    pub bases: Bases,
    /// `traffic/base/{email}` records: already folded into `bases` (or, for an email
    /// of no node's shape, dropped); to be deleted in the write that adds the chunks.
    pub legacy: Vec<String>,
}

/// Every baseline. A record that does not decode is an error naming it: reading it
/// as zero would report that user's whole counter again. `attribute` maps an email of
/// the per-email form to its user.
pub fn load_bases(
    queue: &Queue,
    attribute: impl Fn(&str) -> Option<UserKey>,
) -> Result<Loaded, TrafficStateError> {
    let mut out = Loaded::default();
    for (name, bytes) in queue.state_scan(CHUNK_PREFIX)? {
        let (Some(chunk), Some(entries)) = (parse_chunk_key(&name), decode_chunk(&bytes)) else {
            return Err(TrafficStateError::Chunk { name });
        };
        let mut entries: Chunk = entries.collect();
        if let Some(kept) = out.bases.chunks.get_mut(&chunk) {
            // Only a damaged name could say one chunk twice; keep both, summed below.
            kept.append(&mut entries);
        } else {
            out.bases.chunks.insert(chunk, entries);
        }
    }
    for (name, bytes) in queue.state_scan(LEGACY_PREFIX)? {
        let Some(pair) = decode_legacy(&bytes) else {
            return Err(TrafficStateError::Base { name });
        };
        let email = name.strip_prefix(LEGACY_PREFIX).unwrap_or_default();
        match attribute(email) {
            // Two emails of one user (case) count as one, as the collector reads them.
            Some(user) => out.bases.add(user, pair),
            None => tracing::info!(
                email,
                "a traffic baseline of an email no node has: dropped (xray.email_template or the nodes changed)"
            ),
        }
        out.legacy.push(name);
    }
    out.bases.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_base_round_trip() {
        let StateWrite::Put(name, bytes) = put_legacy_base("a@x", [1, u64::MAX]) else {
            panic!("a put");
        };
        assert_eq!(name, "traffic/base/a@x");
        assert_eq!(bytes.len(), 17);
        assert_eq!(decode_legacy(&bytes), Some([1, u64::MAX]));
        assert_eq!(decode_legacy(&bytes[..16]), None);
        assert_eq!(decode_legacy(&[2; 17]), None);
    }

    #[test]
    fn chunk_round_trip() {
        let a = Uuid::from_u128(0x7a00_0000_0000_0000_0000_0000_0000_0001);
        let b = Uuid::from_u128(0x7aff_ffff_ffff_ffff_ffff_ffff_ffff_ffff);
        let c = Uuid::from_u128(0x7b00_0000_0000_0000_0000_0000_0000_0000);
        let mut bases = Bases::default();
        // Out of order, and `a` twice (two emails of one user): summed.
        bases.add((3, b), [u64::MAX, 0]);
        bases.add((3, a), [1, 1]);
        bases.add((3, c), [5, 5]);
        bases.add((3, a), [0, 1]);
        bases.finish();
        assert_eq!(bases.len(), 3);
        assert_eq!(bases.get(&(3, a)), Some([1, 2]));
        assert_eq!(bases.get(&(4, a)), None);
        let chunk = chunk_of(&(3, a));
        assert_eq!(chunk, (3, 0x7a));
        assert_eq!(chunk_key(chunk), "traffic/bases/3/7a");
        assert_eq!(parse_chunk_key("traffic/bases/3/7a"), Some(chunk));
        assert_eq!(parse_chunk_key("traffic/bases/3/7"), None);
        let StateWrite::Put(name, bytes) = put_chunk(chunk, bases.chunk(chunk)) else {
            panic!("a put");
        };
        assert_eq!(name, "traffic/bases/3/7a");
        assert_eq!(bytes.len(), 1 + 2 * 32);
        let back: Vec<(Uuid, Pair)> = decode_chunk(&bytes).unwrap().collect();
        assert_eq!(back, [(a, [1, 2]), (b, [u64::MAX, 0])]);
        assert!(decode_chunk(&bytes[..40]).is_none());
        assert!(decode_chunk(&[1]).is_none());
        assert!(matches!(
            put_chunk(chunk, &[]),
            StateWrite::Delete(n) if n == "traffic/bases/3/7a"
        ));
        bases.set_chunk(chunk, Vec::new());
        assert_eq!(bases.len(), 1);
        assert_eq!(bases.chunk_ids().collect::<Vec<_>>(), [(3, 0x7b)]);
    }
}
