//! Versioned, checksummed records: the only place that knows how a job looks on disk.
//!
//! Every value the queue stores is an *envelope*:
//!
//! ```text
//! byte 0      record version (u8), 1 for every record this build writes
//! bytes 1..5  CRC-32 (IEEE) of the body, little endian
//! bytes 5..   body: bincode 2, `config::standard()` (varint integers), of the
//!             versioned struct below (`JobV1`, `QuarantinedV1`)
//! ```
//!
//! The `*V1` structs are frozen: a field is never added, removed or reordered in them. A
//! change of layout is a new version (`JobV2`), a new decode arm here that upgrades the
//! old one in memory, and a new fixture in `queue-schema/fixtures/`. A record whose
//! version is higher than this build knows is refused with [`RecordError::NewerVersion`],
//! never guessed at; a record whose checksum does not match is [`RecordError::Checksum`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::clock::Millis;
use super::kind::{self, JobKind};

/// The newest record version this build reads and the one it writes.
pub const RECORD_VERSION: u8 = 1;

const HEADER_LEN: usize = 5;

/// Why a stored value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is {len} bytes, shorter than its 5-byte header")]
    Truncated { len: usize },
    #[error(
        "record version {found} is newer than this build reads (up to {supported}); upgrade connector to read it"
    )]
    NewerVersion { found: u8, supported: u8 },
    #[error("record version 0 does not exist")]
    UnknownVersion,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("body does not decode: {0}")]
    Body(String),
    #[error("job kind code {0} is not known")]
    UnknownKind(u8),
}

/// What happened to one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed {
        error: String,
    },
    /// The worker held the lease past its deadline (a hung attempt).
    LeaseExpired,
    /// The process died (or was cancelled by an operator) while the attempt ran.
    Interrupted {
        reason: String,
    },
}

/// One attempt at running a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based attempt number over the job's whole life.
    pub number: u32,
    pub started_ms: Millis,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// What the attempt reported beside its outcome (a hook's output), bounded like
    /// errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a job is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The ladder was used up and the kind's policy is `dead`.
    Exhausted,
    /// An operator cancelled it.
    Cancelled,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Exhausted => "exhausted",
            DeadReason::Cancelled => "cancelled",
        }
    }
}

/// The stored state of a job. `scheduled` and `ready` are both `Pending`; which one a
/// job is depends only on whether `due_ms` has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Stored {
    Pending {
        due_ms: Millis,
    },
    Running {
        started_ms: Millis,
        lease_until_ms: Millis,
    },
    Done {
        at_ms: Millis,
    },
    Dead {
        at_ms: Millis,
        reason: DeadReason,
    },
}

/// A job as the rest of the program sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    /// The idempotency key, unique per kind among live jobs.
    pub key: String,
    /// Opaque to the queue; each job kind owns its encoding.
    pub payload: Vec<u8>,
    pub created_ms: Millis,
    pub stored: Stored,
    /// Attempts started over the job's life, including interrupted ones.
    pub attempts: u32,
    /// The most recent attempts, oldest first, at most [`HISTORY_LIMIT`].
    pub history: Vec<Attempt>,
}

/// How many attempts are kept on a job. A `repeat-last` job retries forever; its record
/// must not grow forever.
pub const HISTORY_LIMIT: usize = 32;
/// Error texts longer than this are cut (on a char boundary) before they are stored.
pub const ERROR_LIMIT: usize = 4096;

impl Job {
    pub fn push_attempt(&mut self, attempt: Attempt) {
        self.history.push(attempt);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }
}

/// A record that could not be read, kept byte for byte under the quarantine prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The key the record was found under.
    pub key: Vec<u8>,
    pub reason: String,
    pub at_ms: Millis,
    pub raw: Vec<u8>,
}

// ---- version 1 layout (frozen) ----

/// The key and payload are borrowed when a job is written (a payload can be megabytes:
/// a 100,000-user traffic report) and owned when one is read; `Cow` encodes exactly as
/// the `String` and `Vec<u8>` it stands for.
#[derive(Serialize, Deserialize)]
struct JobV1<'a> {
    id: u64,
    kind: u8,
    key: Cow<'a, str>,
    payload: Cow<'a, [u8]>,
    created_ms: u64,
    state: StateV1,
    attempts: u32,
    history: Vec<AttemptV1>,
}

#[derive(Serialize, Deserialize)]
enum StateV1 {
    Pending {
        due_ms: u64,
    },
    Running {
        started_ms: u64,
        lease_until_ms: u64,
    },
    Done {
        at_ms: u64,
    },
    Dead {
        at_ms: u64,
        reason: u8,
    },
}

#[derive(Serialize, Deserialize)]
struct AttemptV1 {
    number: u32,
    started_ms: u64,
    duration_ms: u64,
    outcome: OutcomeV1,
    note: Option<String>,
}

#[derive(Serialize, Deserialize)]
enum OutcomeV1 {
    Succeeded,
    Failed { error: String },
    LeaseExpired,
    Interrupted { reason: String },
}

#[derive(Serialize, Deserialize)]
struct QuarantinedV1 {
    key: Vec<u8>,
    reason: String,
    at_ms: u64,
    raw: Vec<u8>,
}

fn dead_reason_code(r: DeadReason) -> u8 {
    match r {
        DeadReason::Exhausted => 1,
        DeadReason::Cancelled => 2,
    }
}

fn to_v1(job: &Job) -> JobV1<'_> {
    JobV1 {
        id: job.id,
        kind: job.kind.code(),
        key: Cow::Borrowed(&job.key),
        payload: Cow::Borrowed(&job.payload),
        created_ms: job.created_ms,
        state: match job.stored {
            Stored::Pending { due_ms } => StateV1::Pending { due_ms },
            Stored::Running {
                started_ms,
                lease_until_ms,
            } => StateV1::Running {
                started_ms,
                lease_until_ms,
            },
            Stored::Done { at_ms } => StateV1::Done { at_ms },
            Stored::Dead { at_ms, reason } => StateV1::Dead {
                at_ms,
                reason: dead_reason_code(reason),
            },
        },
        attempts: job.attempts,
        history: job
            .history
            .iter()
            .map(|a| AttemptV1 {
                number: a.number,
                started_ms: a.started_ms,
                duration_ms: a.duration_ms,
                outcome: match &a.outcome {
                    Outcome::Succeeded => OutcomeV1::Succeeded,
                    Outcome::Failed { error } => OutcomeV1::Failed {
                        error: error.clone(),
                    },
                    Outcome::LeaseExpired => OutcomeV1::LeaseExpired,
                    Outcome::Interrupted { reason } => OutcomeV1::Interrupted {
                        reason: reason.clone(),
                    },
                },
                note: a.note.clone(),
            })
            .collect(),
    }
}

fn from_v1(v: JobV1, kinds: &[JobKind]) -> Result<Job, RecordError> {
    let kind = kind::by_code(kinds, v.kind).ok_or(RecordError::UnknownKind(v.kind))?;
    let stored = match v.state {
        StateV1::Pending { due_ms } => Stored::Pending { due_ms },
        StateV1::Running {
            started_ms,
            lease_until_ms,
        } => Stored::Running {
            started_ms,
            lease_until_ms,
        },
        StateV1::Done { at_ms } => Stored::Done { at_ms },
        StateV1::Dead { at_ms, reason } => Stored::Dead {
            at_ms,
            reason: match reason {
                1 => DeadReason::Exhausted,
                2 => DeadReason::Cancelled,
                other => return Err(RecordError::Body(format!("dead reason code {other}"))),
            },
        },
    };
    Ok(Job {
        id: v.id,
        kind,
        key: v.key.into_owned(),
        payload: v.payload.into_owned(),
        created_ms: v.created_ms,
        stored,
        attempts: v.attempts,
        history: v
            .history
            .into_iter()
            .map(|a| Attempt {
                number: a.number,
                started_ms: a.started_ms,
                duration_ms: a.duration_ms,
                outcome: match a.outcome {
                    OutcomeV1::Succeeded => Outcome::Succeeded,
                    OutcomeV1::Failed { error } => Outcome::Failed { error },
                    OutcomeV1::LeaseExpired => Outcome::LeaseExpired,
                    OutcomeV1::Interrupted { reason } => Outcome::Interrupted { reason },
                },
                note: a.note,
            })
            .collect(),
    })
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn seal<T: Serialize>(body: &T) -> Vec<u8> {
    seal_sized(body, 64)
}

/// The envelope around `body`, encoded straight into the record's buffer; `hint`: about
/// how long the body is, so that a large one is not grown by doubling and copied again.
fn seal_sized<T: Serialize>(body: &T, hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + hint);
    out.extend_from_slice(&[RECORD_VERSION, 0, 0, 0, 0]);
    // Encoding plain structs of integers, strings and byte vectors into a Vec cannot
    // fail; the fallback (an empty body) keeps this total without a panic path.
    if bincode::serde::encode_into_std_write(body, &mut out, bincode_config()).is_err() {
        out.truncate(HEADER_LEN);
    }
    let crc = crc32fast::hash(&out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks the envelope and returns (version, body).
fn open(bytes: &[u8]) -> Result<(u8, &[u8]), RecordError> {
    if bytes.len() < HEADER_LEN {
        return Err(RecordError::Truncated { len: bytes.len() });
    }
    let version = bytes[0];
    if version == 0 {
        return Err(RecordError::UnknownVersion);
    }
    if version > RECORD_VERSION {
        return Err(RecordError::NewerVersion {
            found: version,
            supported: RECORD_VERSION,
        });
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[HEADER_LEN..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok((version, body))
}

fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, RecordError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, bincode_config())
        .map_err(|e| RecordError::Body(e.to_string()))?;
    if used != body.len() {
        return Err(RecordError::Body(format!(
            "{} trailing bytes after the record",
            body.len() - used
        )));
    }
    Ok(value)
}

pub fn encode_job(job: &Job) -> Vec<u8> {
    // Fixed fields ~30 bytes, lengths as varints, the history's notes and errors.
    let history: usize = job
        .history
        .iter()
        .map(|a| {
            let text = match &a.outcome {
                Outcome::Failed { error } => error.len(),
                Outcome::Interrupted { reason } => reason.len(),
                Outcome::Succeeded | Outcome::LeaseExpired => 0,
            };
            48 + a.note.as_ref().map_or(0, String::len) + text
        })
        .sum();
    seal_sized(
        &to_v1(job),
        48 + job.key.len() + job.payload.len() + history,
    )
}

/// `kinds`: the kinds the queue was given; a job of any other code is `UnknownKind`.
pub fn decode_job(bytes: &[u8], kinds: &[JobKind]) -> Result<Job, RecordError> {
    let (version, body) = open(bytes)?;
    match version {
        1 => from_v1(decode_body::<JobV1>(body)?, kinds),
        // `open` refuses anything newer than RECORD_VERSION.
        other => Err(RecordError::NewerVersion {
            found: other,
            supported: RECORD_VERSION,
        }),
    }
}

/// State values: the envelope around bytes the owning job kind encodes (and versions)
/// itself; the queue only guarantees they are read back intact or reported.
pub fn encode_state(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + bytes.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

pub fn decode_state(bytes: &[u8]) -> Result<Vec<u8>, RecordError> {
    let (_, body) = open(bytes)?;
    Ok(body.to_vec())
}

pub fn encode_quarantined(q: &Quarantined) -> Vec<u8> {
    seal(&QuarantinedV1 {
        key: q.key.clone(),
        reason: q.reason.clone(),
        at_ms: q.at_ms,
        raw: q.raw.clone(),
    })
}

pub fn decode_quarantined(bytes: &[u8]) -> Result<Quarantined, RecordError> {
    let (version, body) = open(bytes)?;
    match version {
        1 => {
            let v = decode_body::<QuarantinedV1>(body)?;
            Ok(Quarantined {
                key: v.key,
                reason: v.reason,
                at_ms: v.at_ms,
                raw: v.raw,
            })
        }
        other => Err(RecordError::NewerVersion {
            found: other,
            supported: RECORD_VERSION,
        }),
    }
}

/// Cuts an error text to [`ERROR_LIMIT`] bytes on a char boundary.
pub fn bound_error(text: &str) -> String {
    if text.len() <= ERROR_LIMIT {
        return text.to_owned();
    }
    let mut end = ERROR_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

/// What [`job_at`] found at the head of a byte range.
#[derive(Debug)]
pub(crate) enum Found {
    /// A job envelope whose checksum matches, and its length in bytes.
    Job(Job, usize),
    /// Something laid out like a job envelope whose checksum does not match (a damaged
    /// copy of a job, or garbage that happens to look like one).
    Damaged,
}

/// Looks for a job envelope starting at `bytes[0]` when its length is not known (a
/// salvage reading raw database files): the body is decoded first, which says where
/// it ends, and then the checksum over exactly that body must match. `None` when the
/// bytes are not laid out like a job at all. Allocation is bounded: a garbage length
/// never asks for more than the bytes that follow.
pub(crate) fn job_at(bytes: &[u8], kinds: &[JobKind]) -> Option<Found> {
    if bytes.len() <= HEADER_LEN || bytes[0] != RECORD_VERSION {
        return None;
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[HEADER_LEN..];
    let config = bincode_config().with_limit::<{ 64 << 20 }>();
    let (v, used) = bincode::serde::decode_from_slice::<JobV1, _>(body, config).ok()?;
    if crc32fast::hash(&body[..used]) != stored {
        return Some(Found::Damaged);
    }
    match from_v1(v, kinds) {
        Ok(job) => Some(Found::Job(job, HEADER_LEN + used)),
        Err(_) => Some(Found::Damaged),
    }
}
