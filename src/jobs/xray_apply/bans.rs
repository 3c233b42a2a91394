//! Bans that did not bite. Removing a user refuses new connections, but the core's API
//! does not cut established ones (nor a client's mux session). So for a while after each
//! removal the agent watches the removed user's traffic counters: if they still grow,
//! the ban has not bitten yet, and an operator is told (a warning, and `queuectl bans`).
//!
//! With `xray.cut_connections`, each ban also records what cutting the user's open
//! connections did ([`Cut`]): how many were cut and when, or why none was (no access
//! log line tied a connection to the user, cuts unavailable…).
//!
//! State `node/{id}/bans`: the kinds' state codec (`jobs::state`) of email → [`Ban`],
//! version 2 since bans record their cut; version 1 (without it) and the JSON before
//! the codec still read. Entries older than [`WATCH_FOR`] are dropped; a user
//! the panel allows again leaves the list.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::jobs::state::{self as codec, StateError};
use crate::queue::{Millis, Queue, StateWrite, rfc3339};

/// The record's name under `node/{id}/`.
const RECORD: &str = "bans";

/// How long a removed user is watched.
pub const WATCH_FOR: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub removed_at: Millis,
    /// uplink + downlink when the user was removed (0 when the core had no counter).
    pub bytes_at_removal: u64,
    /// Bytes counted since the removal, as of the last check.
    pub bytes_since: u64,
    /// The last check that wrote the record (one that finds nothing new does not).
    pub last_checked: Millis,
    /// What cutting the user's open connections did; `None` with cutting off (or for a
    /// ban recorded before cuts existed).
    #[serde(default)]
    pub cut: Option<Cut>,
}

/// What cutting a removed user's established connections did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// When the cut ran (right after the removal succeeded on the core).
    pub at: Millis,
    /// Established TCP connections destroyed.
    pub connections: u32,
    /// Why nothing (or not everything) was cut; empty when all went well.
    pub note: String,
}

/// The record's version since bans carry their [`Cut`].
const VERSION: u8 = 2;

/// A ban as version 1 of the record wrote it.
#[derive(Deserialize)]
struct BanV1 {
    removed_at: Millis,
    bytes_at_removal: u64,
    bytes_since: u64,
    last_checked: Millis,
}

/// Version 1 of the record.
#[derive(Deserialize)]
#[serde(transparent)]
struct BansV1(BTreeMap<String, BanV1>);

impl From<BansV1> for Bans {
    fn from(old: BansV1) -> Bans {
        old.0
            .into_iter()
            .map(|(email, b)| {
                let ban = Ban {
                    removed_at: b.removed_at,
                    bytes_at_removal: b.bytes_at_removal,
                    bytes_since: b.bytes_since,
                    last_checked: b.last_checked,
                    cut: None,
                };
                (email, ban)
            })
            .collect()
    }
}

/// Reads back the record found under `key`, in any of its forms.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Bans, StateError> {
    codec::decode_grown::<Bans, BansV1>(key, bytes, VERSION)
}

impl Ban {
    pub fn biting(&self) -> bool {
        self.bytes_since == 0
    }
}

pub type Bans = BTreeMap<String, Ban>;

pub fn key(node_id: u64) -> String {
    codec::node_key(node_id, RECORD)
}

/// The node's watched bans; none when it has no record.
pub fn load(queue: &Queue, node_id: u64) -> Result<Bans, StateError> {
    let key = key(node_id);
    match queue.state(&key) {
        Ok(Some(bytes)) => decode(&key, &bytes),
        Ok(None) => Ok(Bans::new()),
        Err(source) => Err(StateError::Read { key, source }),
    }
}

/// Every node's watched bans, by node.
pub fn all(queue: &Queue) -> Result<Vec<(u64, Bans)>, StateError> {
    let scan = queue
        .state_scan(codec::NODE_PREFIX)
        .map_err(|source| StateError::Read {
            key: codec::NODE_PREFIX.to_string(),
            source,
        })?;
    let mut out = Vec::new();
    for (name, bytes) in scan {
        if let Some(node_id) = codec::node_of(&name, RECORD) {
            out.push((node_id, decode(&name, &bytes)?));
        }
    }
    Ok(out)
}

pub fn put(node_id: u64, bans: &Bans) -> StateWrite {
    codec::put_grown(key(node_id), VERSION, bans)
}

/// uplink + downlink per user email, from `user>>>{email}>>>traffic>>>…` counters.
pub fn user_bytes(counters: &[(String, i64)]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, value) in counters {
        if let Some((email, _)) = crate::peers::xray::email::parse_counter(name) {
            *out.entry(email.to_lowercase()).or_default() += u64::try_from(*value).unwrap_or(0);
        }
    }
    out
}

/// What one check of a node's bans found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Bans found still carrying traffic for the first time (to report).
    pub newly: Vec<(String, Ban)>,
    /// Whether the record changed beyond `last_checked` (worth writing): traffic grew,
    /// or a ban's watch ended.
    pub changed: bool,
}

/// Updates the watched bans of one node with fresh counters.
pub fn check(bans: &mut Bans, bytes: &BTreeMap<String, u64>, now: Millis) -> Checked {
    let horizon = now.saturating_sub(WATCH_FOR.as_millis() as u64);
    let before = bans.len();
    bans.retain(|_, b| b.removed_at >= horizon);
    let mut out = Checked {
        changed: bans.len() != before,
        ..Checked::default()
    };
    for (email, ban) in bans.iter_mut() {
        let current = bytes.get(email).copied().unwrap_or(ban.bytes_at_removal);
        let since = current.saturating_sub(ban.bytes_at_removal);
        if since > ban.bytes_since {
            if ban.bytes_since == 0 {
                out.newly.push((email.clone(), Ban::default()));
            }
            ban.bytes_since = since;
            out.changed = true;
        }
        ban.last_checked = now;
    }
    for (email, ban) in &mut out.newly {
        if let Some(b) = bans.get(email) {
            *ban = b.clone();
        }
    }
    out
}

/// One warning line for a ban that has not bitten.
pub fn warn(node_id: u64, email: &str, ban: &Ban) {
    tracing::warn!(
        node = node_id,
        user = email,
        removed_at = %rfc3339(ban.removed_at),
        bytes_since = ban.bytes_since,
        "a removed user still has traffic: the core refuses their new connections but does not cut established ones (or a client's mux session); see `queuectl bans`"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_written_before_the_codec_still_reads() {
        let json =
            br#"{"a@x":{"removed_at":1,"bytes_at_removal":2,"bytes_since":3,"last_checked":4}}"#;
        let bans: Bans = decode("node/1/bans", json).unwrap();
        let ban = &bans["a@x"];
        assert_eq!(
            (
                ban.removed_at,
                ban.bytes_at_removal,
                ban.bytes_since,
                ban.last_checked
            ),
            (1, 2, 3, 4)
        );
        let StateWrite::Put(name, bytes) = put(1, &bans) else {
            panic!("a put");
        };
        assert_eq!(name, "node/1/bans");
        assert_eq!(decode(&name, &bytes).unwrap(), bans);
    }

    /// A version-1 record (written before bans carried their cut) still reads, and the
    /// version-2 form round-trips with the cut.
    #[test]
    fn version_1_records_still_read() {
        #[derive(Serialize)]
        struct Old {
            removed_at: Millis,
            bytes_at_removal: u64,
            bytes_since: u64,
            last_checked: Millis,
        }
        let mut old = BTreeMap::new();
        for (i, email) in ["a@x", "b@x"].iter().enumerate() {
            let i = i as u64;
            old.insert(
                email.to_string(),
                Old {
                    removed_at: 10 + i,
                    bytes_at_removal: 20 + i,
                    bytes_since: 30 + i,
                    last_checked: 40 + i,
                },
            );
        }
        let bytes = codec::encode(&old);
        assert_eq!(bytes[0], 1);
        let bans = decode("node/1/bans", &bytes).unwrap();
        assert_eq!(bans.len(), 2);
        assert_eq!(bans["b@x"].bytes_since, 31);
        assert_eq!(bans["b@x"].last_checked, 41);
        assert_eq!(bans["a@x"].cut, None);
        let mut new = bans.clone();
        new.get_mut("a@x").unwrap().cut = Some(Cut {
            at: 50,
            connections: 3,
            note: String::new(),
        });
        let StateWrite::Put(name, bytes) = put(1, &new) else {
            panic!("a put");
        };
        assert_eq!(bytes[0], VERSION);
        assert_eq!(decode(&name, &bytes).unwrap(), new);
        let mut future = bytes.clone();
        future[0] = 9;
        assert!(
            decode(&name, &future)
                .unwrap_err()
                .to_string()
                .contains("node/1/bans")
        );
    }

    #[test]
    fn counters_and_checks() {
        let c = vec![
            ("user>>>a@x>>>traffic>>>uplink".to_string(), 10),
            ("user>>>a@x>>>traffic>>>downlink".to_string(), 5),
            ("inbound>>>api>>>traffic>>>uplink".to_string(), 99),
        ];
        let bytes = user_bytes(&c);
        assert_eq!(bytes.get("a@x"), Some(&15));
        let mut bans = Bans::new();
        bans.insert(
            "a@x".into(),
            Ban {
                removed_at: 1_000,
                bytes_at_removal: 15,
                ..Ban::default()
            },
        );
        let quiet = check(&mut bans, &bytes, 2_000);
        assert!(quiet.newly.is_empty() && !quiet.changed);
        let mut more = bytes.clone();
        more.insert("a@x".into(), 40);
        let grew = check(&mut bans, &more, 3_000);
        assert_eq!(grew.newly.len(), 1);
        assert_eq!(grew.newly[0].1.bytes_since, 25);
        assert!(grew.changed);
        let again = check(&mut bans, &more, 4_000);
        assert!(again.newly.is_empty(), "reported once");
        assert!(!again.changed, "nothing new to write");
        more.insert("a@x".into(), 50);
        let more_traffic = check(&mut bans, &more, 5_000);
        assert!(more_traffic.newly.is_empty() && more_traffic.changed);
        let late = 1_000 + WATCH_FOR.as_millis() as u64 + 1;
        assert!(check(&mut bans, &more, late + 1_000).changed);
        assert!(bans.is_empty(), "dropped after the watch");
    }
}
