//! The key layout of the queue's one sled tree. Every key starts with a one-byte prefix;
//! integers are big-endian so that byte order is numeric order. Mirrored in
//! `queue-schema/README.md`.

use super::clock::Millis;
use super::kind::{self, JobKind};

/// `m` + name: metadata (`m/schema` → u32 BE, `m/next_id` → u64 BE; the kept counts
/// `m/k…`, `m/d…`, `m/counted` are in `counts.rs`).
pub(crate) const META_SCHEMA: &[u8] = b"m/schema";
pub(crate) const META_NEXT_ID: &[u8] = b"m/next_id";
/// `j` + id(8): the job record (envelope, see `record.rs`).
pub(crate) const JOB: u8 = b'j';
/// `p` + kind(1) + due(8) + id(8) → empty: pending jobs (scheduled and ready) by due time.
pub(crate) const PENDING: u8 = b'p';
/// `r` + id(8) → kind(1) + lease_until(8): running jobs.
pub(crate) const RUNNING: u8 = b'r';
/// `f` + state(1: 1 done, 2 dead) + at(8) + id(8) → kind(1): finished jobs by finish time.
pub(crate) const FINISHED: u8 = b'f';
/// `k` + kind(1) + idempotency key bytes → id(8): the newest job of each key.
pub(crate) const IDEM: u8 = b'k';
/// `c` + original key → quarantine envelope: records that could not be read.
pub(crate) const QUARANTINE: u8 = b'c';
/// `s` + UTF-8 name → state envelope: small state the job kinds keep beside their jobs
/// (a node's synced list, traffic baselines), written in the same batch as jobs.
pub(crate) const STATE: u8 = b's';

pub(crate) const FINISHED_DONE: u8 = 1;
pub(crate) const FINISHED_DEAD: u8 = 2;

pub(crate) fn job(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = JOB;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn pending(kind: JobKind, due: Millis, id: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = PENDING;
    k[1] = kind.code();
    k[2..10].copy_from_slice(&due.to_be_bytes());
    k[10..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn running(id: u64) -> [u8; 9] {
    let mut k = job(id);
    k[0] = RUNNING;
    k
}

pub(crate) fn running_value(kind: JobKind, lease_until: Millis) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = kind.code();
    v[1..].copy_from_slice(&lease_until.to_be_bytes());
    v
}

pub(crate) fn finished(state: u8, at: Millis, id: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = FINISHED;
    k[1] = state;
    k[2..10].copy_from_slice(&at.to_be_bytes());
    k[10..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn idem(kind: JobKind, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.push(IDEM);
    k.push(kind.code());
    k.extend_from_slice(key.as_bytes());
    k
}

pub(crate) fn state(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(STATE);
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn quarantine(original: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + original.len());
    k.push(QUARANTINE);
    k.extend_from_slice(original);
    k
}

pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// (kind code, due, id) of a pending key.
pub(crate) fn parse_pending(key: &[u8]) -> Option<(u8, Millis, u64)> {
    if key.len() != 18 || key[0] != PENDING {
        return None;
    }
    Some((key[1], be_u64(&key[2..10])?, be_u64(&key[10..])?))
}

/// (state, at, id) of a finished key.
pub(crate) fn parse_finished(key: &[u8]) -> Option<(u8, Millis, u64)> {
    if key.len() != 18 || key[0] != FINISHED {
        return None;
    }
    Some((key[1], be_u64(&key[2..10])?, be_u64(&key[10..])?))
}

/// The id in a `j` or `r` key.
pub(crate) fn parse_id(key: &[u8]) -> Option<u64> {
    if key.len() != 9 {
        return None;
    }
    be_u64(&key[1..])
}

/// A readable rendering of a key for error messages: `j/42`, `s/node/1/sync`,
/// `p/webhook/1767225600000/42`, `f/dead/1767225600000/42`, `k/webhook/evt-a`,
/// printable text as it is, else hex.
pub(crate) fn display(key: &[u8], kinds: &[JobKind]) -> String {
    let kind =
        |code: u8| kind::by_code(kinds, code).map_or(format!("kind{code}"), |k| k.to_string());
    match key.first() {
        Some(&JOB) | Some(&RUNNING) if key.len() == 9 => {
            format!("{}/{}", key[0] as char, parse_id(key).unwrap_or_default())
        }
        Some(&PENDING) if let Some((code, due, id)) = parse_pending(key) => {
            format!("p/{}/{due}/{id}", kind(code))
        }
        Some(&FINISHED) if let Some((state, at, id)) = parse_finished(key) => {
            let state = match state {
                FINISHED_DONE => "done".to_string(),
                FINISHED_DEAD => "dead".to_string(),
                other => format!("state{other}"),
            };
            format!("f/{state}/{at}/{id}")
        }
        Some(&IDEM) if key.len() >= 2 => format!(
            "k/{}/{}",
            kind(key[1]),
            String::from_utf8_lossy(&key[2..]).escape_default()
        ),
        Some(&QUARANTINE) => format!("c/{}", display(&key[1..], kinds)),
        Some(&STATE) => format!("s/{}", String::from_utf8_lossy(&key[1..])),
        _ if super::counts::is_count_key(key) => super::counts::display(key, kinds),
        _ => match std::str::from_utf8(key) {
            Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => text.to_owned(),
            _ => key.iter().map(|b| format!("{b:02x}")).collect(),
        },
    }
}
