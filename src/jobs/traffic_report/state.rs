//! What collection keeps in the queue's state area, written in the same batch as the
//! reports it produces. Formats (also in `queue-schema/README.md`):
//!
//! - `traffic/core`: the kinds' state codec (`jobs::state`) of [`CoreMark`]: the core
//!   process as last read (uptime and allocation counters, to tell a restart), when, and
//!   the next report sequence number.
//! - `traffic/base/{email}`: version `1`, then the user's uplink and downlink counter
//!   values at the last collection, each a u64 little-endian (17 bytes). Absent = 0.
//!   Not the codec's form: one record per user (100k on a large node), fixed-width, and
//!   already on disk in this form.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::jobs::state as codec;
use crate::peers::xray::SysStats;
use crate::queue::{Millis, Queue, StateWrite};

pub const CORE: &str = "traffic/core";
pub const BASE_PREFIX: &str = "traffic/base/";
const VERSION: u8 = 1;

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
}

pub fn load_core(queue: &Queue) -> Result<Option<CoreMark>, TrafficStateError> {
    Ok(codec::load(queue, CORE)?)
}

pub fn put_base(email: &str, pair: Pair) -> StateWrite {
    let mut bytes = Vec::with_capacity(17);
    bytes.push(VERSION);
    bytes.extend_from_slice(&pair[0].to_le_bytes());
    bytes.extend_from_slice(&pair[1].to_le_bytes());
    StateWrite::Put(format!("{BASE_PREFIX}{email}"), bytes)
}

pub fn delete_base(email: &str) -> StateWrite {
    StateWrite::Delete(format!("{BASE_PREFIX}{email}"))
}

fn decode_base(bytes: &[u8]) -> Option<Pair> {
    match bytes {
        [VERSION, rest @ ..] if rest.len() == 16 => {
            let (up, down) = rest.split_at(8);
            Some([
                u64::from_le_bytes(up.try_into().ok()?),
                u64::from_le_bytes(down.try_into().ok()?),
            ])
        }
        _ => None,
    }
}

/// Every baseline. A record that does not decode is an error naming it: reading it
/// as zero would report that user's whole counter again.
pub fn load_bases(queue: &Queue) -> Result<HashMap<String, Pair>, TrafficStateError> {
    let mut out = HashMap::new();
    for (name, bytes) in queue.state_scan(BASE_PREFIX)? {
        let Some(pair) = decode_base(&bytes) else {
            return Err(TrafficStateError::Base { name });
        };
        if let Some(email) = name.strip_prefix(BASE_PREFIX) {
            out.insert(email.to_string(), pair);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_round_trip() {
        let StateWrite::Put(name, bytes) = put_base("a@x", [1, u64::MAX]) else {
            panic!("a put");
        };
        assert_eq!(name, "traffic/base/a@x");
        assert_eq!(bytes.len(), 17);
        assert_eq!(decode_base(&bytes), Some([1, u64::MAX]));
        assert_eq!(decode_base(&bytes[..16]), None);
        assert_eq!(decode_base(&[2; 17]), None);
    }
}
