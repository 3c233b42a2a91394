//! The one codec of the job kinds' state records (the queue's `s` values; their keys
//! are declared by the kind that owns them, see each kind's `state`/`bans` module).
//!
//! A record is one version byte ([`VERSION`], 1), then bincode 2 (standard
//! configuration) of the record's struct. The queue wraps every state value in its own
//! envelope with a CRC-32 and quarantines a value whose CRC does not match
//! (`queue-schema/README.md`), so the codec adds no second checksum.
//!
//! Older forms still read: `node/{id}/applied` and `node/{id}/bans` were JSON objects
//! (their first byte `{` is never a version byte); they are rewritten in the current
//! form the next time their kind writes them.
//!
//! A record whose layout changed since carries its own version byte (above
//! [`VERSION`]; `node/{id}/bans` is 2): [`put_as`] writes it, [`decode_upgrading`] reads
//! it and still reads every older form of the record, upgraded.
//!
//! A record that does not read is a [`StateError`] naming its key, never a default: a
//! kind that can do without it says so in the log, with the key.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::queue::{self, Queue, StateWrite};

/// The version byte this build writes and reads.
pub(crate) const VERSION: u8 = 1;

/// The first byte of a record written as JSON before this codec.
const LEGACY_JSON: u8 = b'{';

/// A state record that cannot be read, naming its key.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state {key}: {source}")]
    Read {
        key: String,
        #[source]
        source: queue::Error,
    },
    #[error("state {key} is empty")]
    Empty { key: String },
    #[error("state {key} has version {version}; this build reads up to version {reads}")]
    Version { key: String, version: u8, reads: u8 },
    #[error("state {key} does not decode: {source}")]
    Decode {
        key: String,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("state {key} (JSON, an older form) does not decode: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The bytes of `value` as a record.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![VERSION];
    // The records are plain data (integers, strings, collections of them): bincode
    // cannot fail to encode them.
    bytes.extend(
        bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default(),
    );
    bytes
}

/// The write putting `value` under `key`.
pub(crate) fn put<T: Serialize>(key: String, value: &T) -> StateWrite {
    StateWrite::Put(key, encode(value))
}

/// Reads back a record found under `key`.
pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    match bytes.split_first() {
        Some((&VERSION, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|source| StateError::Decode {
                    key: key.to_string(),
                    source,
                })
        }
        Some((&LEGACY_JSON, _)) => {
            serde_json::from_slice(bytes).map_err(|source| StateError::Json {
                key: key.to_string(),
                source,
            })
        }
        Some((&version, _)) => Err(StateError::Version {
            key: key.to_string(),
            version,
            reads: VERSION,
        }),
        None => Err(StateError::Empty {
            key: key.to_string(),
        }),
    }
}

/// The bytes of `value` as a record of layout `version` (one of a record whose layout
/// changed since [`VERSION`]).
pub(crate) fn encode_as<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut bytes = encode(value);
    bytes[0] = version;
    bytes
}

/// The write putting `value` under `key` as a record of layout `version`.
pub(crate) fn put_as<T: Serialize>(key: String, version: u8, value: &T) -> StateWrite {
    StateWrite::Put(key, encode_as(version, value))
}

/// Reads back a record of layout `version` (written by [`put_as`]); one in an older
/// form (an older version byte, JSON) reads as `Old` and is upgraded. A newer version
/// is an error naming the key.
pub(crate) fn decode_upgrading<T, Old>(
    key: &str,
    bytes: &[u8],
    version: u8,
    upgrade: impl FnOnce(Old) -> T,
) -> Result<T, StateError>
where
    T: DeserializeOwned,
    Old: DeserializeOwned,
{
    match bytes.first() {
        Some(&v) if v == version => {
            bincode::serde::decode_from_slice(&bytes[1..], bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|source| StateError::Decode {
                    key: key.to_string(),
                    source,
                })
        }
        Some(&v) if v > version && v != LEGACY_JSON => Err(StateError::Version {
            key: key.to_string(),
            version: v,
            reads: version,
        }),
        _ => decode::<Old>(key, bytes).map(upgrade),
    }
}

/// The record under `key`, `None` when there is none.
pub(crate) fn load<T: DeserializeOwned>(queue: &Queue, key: &str) -> Result<Option<T>, StateError> {
    match queue.state(key) {
        Ok(Some(bytes)) => decode(key, &bytes).map(Some),
        Ok(None) => Ok(None),
        Err(source) => Err(StateError::Read {
            key: key.to_string(),
            source,
        }),
    }
}

/// The key of a per-node record: `node/{id}/{record}`.
pub(crate) fn node_key(node_id: u64, record: &str) -> String {
    format!("{NODE_PREFIX}{node_id}/{record}")
}

/// The node whose `record` `key` is, if it is one.
pub(crate) fn node_of(key: &str, record: &str) -> Option<u64> {
    key.strip_prefix(NODE_PREFIX)?
        .strip_suffix(record)?
        .strip_suffix('/')?
        .parse()
        .ok()
}

/// Where the per-node records are, for a scan.
pub(crate) const NODE_PREFIX: &str = "node/";

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct R {
        a: u64,
        b: String,
    }

    #[test]
    fn round_trip_and_errors_name_the_key() {
        let r = R {
            a: 300,
            b: "x".into(),
        };
        let bytes = encode(&r);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(decode::<R>("k", &bytes).unwrap(), r);
        let json = br#"{"a":300,"b":"x"}"#;
        assert_eq!(decode::<R>("k", json).unwrap(), r, "the older JSON form");
        for bad in [&[][..], &[2, 0][..], &[1][..], &b"{\"a\":"[..]] {
            let e = decode::<R>("node/7/bans", bad).unwrap_err();
            assert!(e.to_string().contains("node/7/bans"), "{e}");
        }
    }

    #[test]
    fn a_record_with_its_own_version_reads_its_older_forms() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct R2 {
            a: u64,
            b: String,
            c: Vec<String>,
        }
        let up = |r: R| R2 {
            a: r.a,
            b: r.b,
            c: Vec::new(),
        };
        let r2 = R2 {
            a: 1,
            b: "x".into(),
            c: vec!["y".into()],
        };
        let bytes = encode_as(2, &r2);
        assert_eq!(bytes[0], 2);
        assert_eq!(decode_upgrading("k", &bytes, 2, up).unwrap(), r2);
        let old = R {
            a: 1,
            b: "x".into(),
        };
        let want = R2 {
            c: Vec::new(),
            ..r2
        };
        assert_eq!(decode_upgrading("k", &encode(&old), 2, up).unwrap(), want);
        assert_eq!(
            decode_upgrading("k", br#"{"a":1,"b":"x"}"#, 2, up).unwrap(),
            want
        );
        let e = decode_upgrading("node/7/bans", &[3, 0], 2, up).unwrap_err();
        assert!(e.to_string().contains("version 3"), "{e}");
        assert!(decode_upgrading("k", &[], 2, up).is_err());
    }

    #[test]
    fn node_keys() {
        assert_eq!(node_key(7, "bans"), "node/7/bans");
        assert_eq!(node_of("node/7/bans", "bans"), Some(7));
        assert_eq!(node_of("node/7/sync", "bans"), None);
        assert_eq!(node_of("node/7bans", "bans"), None);
        assert_eq!(node_of("node/x/bans", "bans"), None);
    }
}
