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
//!   100,000 keys.
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

/// Every user's baseline, in chunk order (node, then UUID).
pub type Bases = BTreeMap<UserKey, Pair>;

/// The chunk a user's baseline is kept in: its node and its UUID's first byte.
pub fn chunk_of(user: &UserKey) -> (u64, u8) {
    (user.0, user.1.as_bytes()[0])
}

pub fn chunk_key((node_id, byte): (u64, u8)) -> String {
    format!("{CHUNK_PREFIX}{node_id}/{byte:02x}")
}

/// The lowest and highest UUID of a chunk.
pub fn chunk_range_bounds((_, byte): (u64, u8)) -> (Uuid, Uuid) {
    let mut lo = [0u8; 16];
    lo[0] = byte;
    let mut hi = [0xffu8; 16];
    hi[0] = byte;
    (Uuid::from_bytes(lo), Uuid::from_bytes(hi))
}

/// The users of `chunk` in `bases`.
pub fn chunk_range(
    bases: &Bases,
    chunk: (u64, u8),
) -> std::collections::btree_map::Range<'_, UserKey, Pair> {
    let (lo, hi) = chunk_range_bounds(chunk);
    bases.range((chunk.0, lo)..=(chunk.0, hi))
}

/// The write that makes `chunk` hold `entries` (sorted by UUID): a delete when empty.
pub fn put_chunk<'a>(
    chunk: (u64, u8),
    entries: impl Iterator<Item = (&'a Uuid, &'a Pair)>,
) -> StateWrite {
    let mut bytes = Vec::with_capacity(1 + entries.size_hint().0 * ENTRY);
    bytes.push(CHUNK_VERSION);
    for (uuid, pair) in entries {
        bytes.extend_from_slice(uuid.as_bytes());
        bytes.extend_from_slice(&pair[0].to_le_bytes());
        bytes.extend_from_slice(&pair[1].to_le_bytes());
    }
    if bytes.len() == 1 {
        return StateWrite::Delete(chunk_key(chunk));
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
fn parse_chunk_key(name: &str) -> Option<(u64, u8)> {
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
        for (uuid, pair) in entries {
            out.bases.insert((chunk.0, uuid), pair);
        }
    }
    for (name, bytes) in queue.state_scan(LEGACY_PREFIX)? {
        let Some(pair) = decode_legacy(&bytes) else {
            return Err(TrafficStateError::Base { name });
        };
        let email = name.strip_prefix(LEGACY_PREFIX).unwrap_or_default();
        match attribute(email) {
            // Two emails of one user (case) count as one, as the collector reads them.
            Some(user) => {
                let base = out.bases.entry(user).or_default();
                base[0] = base[0].saturating_add(pair[0]);
                base[1] = base[1].saturating_add(pair[1]);
            }
            None => tracing::info!(
                email,
                "a traffic baseline of an email no node has: dropped (xray.email_template or the nodes changed)"
            ),
        }
        out.legacy.push(name);
    }
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
        let bases: Bases = [((3, a), [1, 2]), ((3, b), [u64::MAX, 0]), ((3, c), [5, 5])]
            .into_iter()
            .collect();
        let chunk = chunk_of(&(3, a));
        assert_eq!(chunk, (3, 0x7a));
        assert_eq!(chunk_key(chunk), "traffic/bases/3/7a");
        assert_eq!(parse_chunk_key("traffic/bases/3/7a"), Some(chunk));
        assert_eq!(parse_chunk_key("traffic/bases/3/7"), None);
        let range = chunk_range(&bases, chunk);
        let StateWrite::Put(name, bytes) = put_chunk(chunk, range.map(|((_, u), p)| (u, p))) else {
            panic!("a put");
        };
        assert_eq!(name, "traffic/bases/3/7a");
        assert_eq!(bytes.len(), 1 + 2 * 32);
        let back: Vec<(Uuid, Pair)> = decode_chunk(&bytes).unwrap().collect();
        assert_eq!(back, [(a, [1, 2]), (b, [u64::MAX, 0])]);
        assert!(decode_chunk(&bytes[..40]).is_none());
        assert!(decode_chunk(&[1]).is_none());
        let empty = Bases::new();
        assert!(matches!(
            put_chunk(chunk, chunk_range(&empty, chunk).map(|((_, u), p)| (u, p))),
            StateWrite::Delete(n) if n == "traffic/bases/3/7a"
        ));
    }
}
