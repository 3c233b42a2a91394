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
//! A record whose shape grew (a field added) is written under a version byte of its
//! own ([`put_grown`]), and its version-1 form still reads ([`decode_grown`]): bincode
//! is not self-describing, so an old record cannot be read as the new struct. Since:
//! `node/{id}/bans` is version 2 (a ban's cut).
//!
//! A record that does not read is a [`StateError`] naming its key, never a default: a
//! kind that can do without it says so in the log, with the key.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::queue::{self, Queue, StateWrite};

/// The version byte this build writes and reads.
pub const VERSION: u8 = 1;

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
    #[error("state {key} has version {version}; this build reads version {VERSION}")]
    Version { key: String, version: u8 },
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
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![VERSION];
    // The records are plain data (integers, strings, collections of them): bincode
    // cannot fail to encode them.
    bytes.extend(
        bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default(),
    );
    bytes
}

/// The write putting `value` under `key`.
pub fn put<T: Serialize>(key: String, value: &T) -> StateWrite {
    StateWrite::Put(key, encode(value))
}

/// Reads back a record found under `key`.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
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
        }),
        None => Err(StateError::Empty {
            key: key.to_string(),
        }),
    }
}

/// The write putting `value`, a record whose shape grew, under `key` with `version`.
pub fn put_grown<T: Serialize>(key: String, version: u8, value: &T) -> StateWrite {
    let mut bytes = encode(value);
    bytes[0] = version;
    StateWrite::Put(key, bytes)
}

/// Reads back a record whose shape grew: `version` is the current form (`T`), version 1
/// the older one (`Old`, converted), JSON the form before the codec (which names its
/// fields, so `T`'s new fields take their serde defaults).
pub fn decode_grown<T, Old>(key: &str, bytes: &[u8], version: u8) -> Result<T, StateError>
where
    T: DeserializeOwned,
    Old: DeserializeOwned + Into<T>,
{
    match bytes.split_first() {
        Some((&v, body)) if v == version => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|source| StateError::Decode {
                    key: key.to_string(),
                    source,
                })
        }
        Some((&VERSION, _)) => decode::<Old>(key, bytes).map(Into::into),
        Some((&LEGACY_JSON, _)) => decode::<T>(key, bytes),
        Some((&v, _)) => Err(StateError::Version {
            key: key.to_string(),
            version: v,
        }),
        None => Err(StateError::Empty {
            key: key.to_string(),
        }),
    }
}

/// The record under `key`, `None` when there is none.
pub fn load<T: DeserializeOwned>(queue: &Queue, key: &str) -> Result<Option<T>, StateError> {
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
pub fn node_key(node_id: u64, record: &str) -> String {
    format!("{NODE_PREFIX}{node_id}/{record}")
}

/// The node whose `record` `key` is, if it is one.
pub fn node_of(key: &str, record: &str) -> Option<u64> {
    key.strip_prefix(NODE_PREFIX)?
        .strip_suffix(record)?
        .strip_suffix('/')?
        .parse()
        .ok()
}

/// Where the per-node records are, for a scan.
pub const NODE_PREFIX: &str = "node/";

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
    fn node_keys() {
        assert_eq!(node_key(7, "bans"), "node/7/bans");
        assert_eq!(node_of("node/7/bans", "bans"), Some(7));
        assert_eq!(node_of("node/7/sync", "bans"), None);
        assert_eq!(node_of("node/7bans", "bans"), None);
        assert_eq!(node_of("node/x/bans", "bans"), None);
    }
}
