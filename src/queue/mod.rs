//! The durable job queue. Everything the agent does is a job in here.
//!
//! # Design
//!
//! One sled database under `data_dir/queue`, one tree, prefixed keys (`keys.rs`, mirrored
//! in `queue-schema/README.md`):
//!
//! | key | value | what it is |
//! |---|---|---|
//! | `j` id | job envelope | the job: kind, key, payload, state, attempts |
//! | `p` kind due id | – | pending (scheduled or ready), ordered by due time |
//! | `r` id | kind, lease deadline | running (leased) |
//! | `f` state at id | kind | done or dead, ordered by when |
//! | `k` kind key | id | idempotency: the newest job of each key |
//! | `c` key | quarantine envelope | a record that could not be read, kept byte for byte |
//! | `m/schema`, `m/next_id` | u32, u64 | layout version, id counter |
//! | `m/k`, `m/d`, `m/counted` | u64 | kept counts of index entries by kind and state, pending ones by due time (`counts.rs`) |
//!
//! # Invariants
//!
//! - A job record and its index entries change together in one `apply_batch` (atomic);
//!   each job is in exactly one of `p`, `r`, `f`. The kept counts change in that same
//!   batch and equal a scan of the indexes (`counts.rs`: every write is a
//!   `counts::Batch`, which moves them by what it changes), so `stats` reads a few
//!   keys whatever the number of jobs.
//! - Workers' writes and an operator's cancel and retry go through the write combiner
//!   (`combine.rs`): one sled batch and one flush for every operation waiting.
//! - Every read-modify-write runs under one mutex (`write`), so a job is never leased
//!   twice at once and ids never collide. sled calls under it take microseconds.
//! - No mutating call returns before its batch is flushed (`commit.rs`, group commit).
//!   That includes `lease`: an attempt starts only once it is counted on disk, so a job
//!   that kills the process every time it runs uses up its ladder instead of looping.
//! - On open, jobs left `running` by a dead process are made ready at once, with the
//!   interrupted attempt counted (`ladder::after_interruption`).
//! - Done jobs keep their key for `dedupe_window`, then `maintain` deletes them. Dead
//!   jobs stay until an operator purges them.
//! - A record that fails its checksum or does not decode is moved under `c` with the
//!   reason, its index entries are dropped, and everything else keeps working.
//!
//! - Writes are refused ([`Error::Unwritable`], reads go on) on a full disk, after a
//!   failed flush, or once the database was deleted underneath us; [`Queue::probe`]
//!   notices each and takes writes again when it can, reopening sled after a failed
//!   write (`store.rs`). A write is durable only through the handle it was made on.
//! - Damage to sled's own files that sled reports, or panics on, is
//!   [`Error::Damaged`], naming the database (`unwind.rs` keeps sled's panics in); the
//!   way out is `salvage.rs`, which copies every record that still passes its checksum
//!   into a fresh database.
//!
//! sled never leaves this crate (`connector-queue`, re-exported by the product as
//! `connector::queue`): callers see [`Queue`], [`Job`] and [`Error`]. It knows nothing
//! of the product: job kinds are data it is given ([`JobKind`]: code and name, and per
//! kind a ladder and concurrency in [`Settings`]); a record of a code it was not given
//! is unreadable ([`RecordError::UnknownKind`]); the worker reports attempts to an
//! [`AttemptObserver`] it is given.

mod admin;
mod clock;
mod combine;
mod commit;
mod counts;
mod disk;
mod fsck;
mod keys;
mod kind;
mod ladder;
pub mod record;
mod salvage;
mod store;
mod txn;
mod unwind;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

pub use admin::{JobView, ListFilter, PurgeFilter, QuarantineView, Stats};
pub use clock::{Clock, ManualClock, Millis, SystemClock, rfc3339};
pub use fsck::{FsckProblem, FsckReport};
pub use kind::JobKind;
pub use ladder::{KindSettings, OnExhausted, Settings, after_interruption, next_delay};
pub use record::{Attempt, DeadReason, Job, Outcome, RecordError, Stored};
pub use salvage::{SalvageError, SalvageReport, salvage};
pub use store::{LOW_SPACE, RESERVE_BYTES, RESUME_SPACE, Refusal};
pub use txn::{Commit, Committed, Dedupe, NewJob, StateWrite};
pub use worker::{
    AttemptObserver, AttemptResult, Condition, Effects, Handler, NoObserver, Pool, PoolStatus,
    Pools, run_maintenance, run_pool, run_workers,
};

use commit::GroupCommit;
use counts::Batch;
use store::{Identity, Store};

/// The on-disk layout version this build writes and reads (`m/schema`).
pub const SCHEMA_VERSION: u32 = 1;
/// Longest idempotency key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the queue database {path} is locked by another process (is the connector daemon running? stop it, or use its admin socket)"
    )]
    Locked { path: PathBuf },
    #[error("cannot open the queue database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: StorageError,
    },
    #[error(
        "the queue database {path} has layout version {found}; this build reads up to {supported}: upgrade connector"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} holds data but no queue layout version: it is not a connector queue")]
    NotAQueue { path: PathBuf },
    #[error(
        "the queue database {path} is damaged: the storage engine cannot read it ({detail}). Stop connector, keep a copy of {path}, run `queuectl salvage --to NEW_DIR` (it copies every record that still passes its checksum into a fresh database and reports what was lost), then move {path} aside and NEW_DIR into its place"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("queue storage error: {0}{hint}", hint = damage_hint(.0))]
    Storage(#[source] StorageError),
    #[error("queue write was not made durable: {0}")]
    Durability(#[source] DurabilityError),
    #[error("job {0} not found")]
    NotFound(u64),
    #[error("job {id} is {state}: cannot {op} it")]
    InvalidState {
        id: u64,
        state: &'static str,
        op: &'static str,
    },
    #[error(
        "job {id} is no longer leased by this attempt (attempt {attempt}); its result was not recorded"
    )]
    LeaseLost { id: u64, attempt: u32 },
    #[error("job {id}'s key is now held by job {holder}: retry that one instead")]
    KeyTaken { id: u64, holder: u64 },
    #[error("invalid idempotency key: {0}")]
    InvalidKey(&'static str),
    #[error(
        "the queue database {path} lost acknowledged writes: job ids up to {acknowledged} were acknowledged, but it recovered only up to {recovered} (sled's log was damaged after its last snapshot). Nothing was changed; keep a copy of {path}, then run `queuectl accept-loss` to start with what is left, or `queuectl salvage --to NEW_DIR` to also copy what sled's raw files still hold"
    )]
    LostWrites {
        path: PathBuf,
        acknowledged: u64,
        recovered: u64,
    },
    #[error("cannot write the output: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot start the queue's flush thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Writes are refused for now ([`Refusal`]); reads keep working.
    #[error("{}", why.describe(path))]
    Unwritable { path: PathBuf, why: Refusal },
}

impl Error {
    /// True when the queue refused or could not make a write durable: the caller should
    /// answer "not now" (503), not treat it as a bug.
    pub fn is_unwritable(&self) -> bool {
        matches!(self, Error::Unwritable { .. } | Error::Durability(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the storage engine under the queue. Opaque, so the engine stays inside
/// this crate: callers get its message and its source chain, not its type.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StorageError(sled::Error);

impl StorageError {
    /// True when the engine says its own files are damaged.
    pub fn is_damage(&self) -> bool {
        matches!(
            self.0,
            sled::Error::Corruption { .. }
                | sled::Error::ReportableBug(_)
                | sled::Error::Unsupported(_)
        )
    }

    /// The I/O error underneath, if that is what it is.
    fn io(&self) -> Option<&std::io::Error> {
        match &self.0 {
            sled::Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a write was not made durable: what failed, and the error underneath when there
/// is one. One failed flush answers every write that waited for it, so the cause is
/// shared and the error is `Clone`.
#[derive(Debug, Clone)]
pub struct DurabilityError {
    /// Empty when the source says it all.
    what: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for DurabilityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cause is part of the message too (as in `Error::Open`): logs print only
        // the top error's message.
        match &self.source {
            None => f.write_str(&self.what),
            Some(e) if self.what.is_empty() => write!(f, "{e}"),
            Some(e) => write!(f, "{}: {e}", self.what),
        }
    }
}

impl std::error::Error for DurabilityError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl DurabilityError {
    /// A failure with no error underneath (the queue's own machinery went away).
    fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            source: None,
        }
    }

    /// A write of a group failed with `e`, which every write of the group reports.
    fn shared(e: Error) -> Self {
        Self {
            what: String::new(),
            source: Some(Arc::new(e)),
        }
    }

    /// `what` failed because of `source`.
    fn caused(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            what: what.into(),
            source: Some(Arc::new(source)),
        }
    }
}

/// Turns the engine's errors into the queue's, for `?` on sled calls. A private trait
/// rather than `From<sled::Error>`, so sled's type is not part of the public API.
trait Storage<T> {
    fn storage(self) -> Result<T>;
}

impl<T> Storage<T> for std::result::Result<T, sled::Error> {
    fn storage(self) -> Result<T> {
        self.map_err(|e| Error::Storage(StorageError(e)))
    }
}

/// What [`Error::Storage`] adds for damage: what to do about it.
fn damage_hint(e: &StorageError) -> &'static str {
    if e.is_damage() {
        " (the queue database is damaged: stop connector and run `queuectl salvage --to NEW_DIR`)"
    } else {
        ""
    }
}

/// What `enqueue` did.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    /// True when the key was already taken (see [`Dedupe`]): `job` is that existing job
    /// and nothing was created.
    pub duplicate: bool,
    /// True when an existing pending job took the new payload (`Dedupe::Replace`).
    pub replaced: bool,
}

/// Decodes the job stored under `key`, which must be that job's own key.
fn decode_at(key: &[u8], raw: &[u8], kinds: &[JobKind]) -> Result<Job, RecordError> {
    let job = record::decode_job(raw, kinds)?;
    if keys::parse_id(key) != Some(job.id) {
        return Err(RecordError::Body(format!(
            "record under {} says it is job {}",
            keys::display(key, kinds),
            job.id
        )));
    }
    Ok(job)
}

/// The write combiner answered an operation with another's kind of reply (a bug).
fn wrong_reply() -> Error {
    Error::Durability(DurabilityError::new(
        "write combiner: a reply of the wrong kind",
    ))
}

/// Marks an attempt succeeded; `note` (e.g. a hook's output) is kept on the attempt.
fn succeed(job: &mut Job, lease: LeaseToken, now: Millis, started: Millis, note: Option<&str>) {
    job.push_attempt(Attempt {
        number: lease.attempt,
        started_ms: started,
        duration_ms: now.saturating_sub(started),
        outcome: Outcome::Succeeded,
        note: note.map(record::bound_error),
    });
    job.stored = Stored::Done { at_ms: now };
}

/// Proof of a lease: which attempt of which job a worker is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken {
    pub id: u64,
    pub attempt: u32,
}

/// A job leased to a worker.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job: Job,
}

impl Leased {
    pub fn token(&self) -> LeaseToken {
        LeaseToken {
            id: self.job.id,
            attempt: self.job.attempts,
        }
    }
}

/// What `open` found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Jobs that were running when the last process died, now ready again.
    pub interrupted: u64,
    /// Of those, jobs whose ladder was used up and that went dead.
    pub exhausted: u64,
    /// Records moved to quarantine while recovering.
    pub quarantined: u64,
}

/// The derived state of a job at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Scheduled,
    Ready,
    Running,
    Done,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Scheduled,
        JobState::Ready,
        JobState::Running,
        JobState::Done,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Ready => "ready",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`JobState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state `{0}` (expected scheduled, ready, running, done or dead)")]
pub struct UnknownState(pub String);

impl std::str::FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        JobState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl Job {
    pub fn state(&self, now: Millis) -> JobState {
        match self.stored {
            Stored::Pending { due_ms } if due_ms <= now => JobState::Ready,
            Stored::Pending { .. } => JobState::Scheduled,
            Stored::Running { .. } => JobState::Running,
            Stored::Done { .. } => JobState::Done,
            Stored::Dead { .. } => JobState::Dead,
        }
    }
}

/// The queue. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open database and its flush thread (which owns its own handle on the db;
    /// dropping it flushes once more). Replaced when the database is opened again
    /// after a failed write (`store.rs`); `None` only while that reopen failed.
    store: RwLock<Option<Store>>,
    /// Bumped each time `store` is replaced: a write made on one handle is never
    /// called durable by another's flush ([`Queue::durable_since`]).
    epoch: AtomicU64,
    /// Why writes are refused now, if they are; and what was opened.
    status: Mutex<Status>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    settings: Settings,
    write: Mutex<WriteState>,
    wake: [Notify; 4],
    events: broadcast::Sender<Event>,
    /// Enqueues, leases and acks waiting to be written together (`combine.rs`).
    combine: Mutex<combine::Combine>,
}

/// Something that happened to a job, for subscribers (`--once`, `queuectl tail`, tests).
/// Sent after the change is durable. A slow subscriber may miss events (it is told it
/// lagged) and should then read the jobs it cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    pub kind: JobKind,
    pub key: String,
    pub what: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Enqueued,
    /// A pending job's payload was replaced (`Dedupe::Replace`).
    Replaced,
    Leased {
        attempt: u32,
    },
    Done,
    /// The attempt failed (or was interrupted); the next one is due at `due_ms`.
    Retry {
        due_ms: Millis,
    },
    Dead,
    /// An operator made a dead or scheduled job due now (`queuectl retry`).
    Retried {
        due_ms: Millis,
    },
    /// An operator cancelled a pending or running job; it is dead.
    Cancelled,
}

struct WriteState {
    next_id: u64,
}

#[derive(Default)]
struct Status {
    refusal: Option<Refusal>,
    /// The directory and `db` file opened, for the deletion check.
    identity: Option<Identity>,
    /// A write failed on the current handle: sled refuses all others until reopened.
    poisoned: bool,
}

/// Whether the queue takes writes, as [`Queue::probe`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writability {
    /// `None`: writes are taken.
    pub refusal: Option<Refusal>,
    /// Free bytes on the database's filesystem, when known.
    pub free: Option<u64>,
    /// One line naming the path and the cause (for `/healthz`), when refused.
    pub problem: Option<String>,
}

impl Writability {
    pub fn writable(&self) -> bool {
        self.refusal.is_none()
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens (or creates) the queue at `path` and recovers jobs a dead process left
    /// running. Fails with [`Error::Locked`] when another process holds the database.
    pub fn open(
        path: impl AsRef<Path>,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<(Queue, Recovery)> {
        Self::open_with(path, settings, clock, false)
    }

    /// [`Queue::open`], but a database that lost acknowledged writes
    /// ([`Error::LostWrites`]) is opened anyway when `accept_lost_writes`: the loss is
    /// recorded in the quarantine (so `queuectl stats` keeps showing it) and ids are
    /// never reused.
    ///
    /// Damage sled reports, or panics on (`unwind.rs`), is [`Error::Damaged`]: it names
    /// the database and says to run `queuectl salvage`.
    pub fn open_with(
        path: impl AsRef<Path>,
        settings: Settings,
        clock: Arc<dyn Clock>,
        accept_lost_writes: bool,
    ) -> Result<(Queue, Recovery)> {
        let path = path.as_ref().to_path_buf();
        guard_damage(&path, || {
            Self::open_unguarded(&path, settings, clock, accept_lost_writes)
        })
    }

    /// The body of [`Queue::open_with`]; may panic inside sled.
    fn open_unguarded(
        path: impl AsRef<Path>,
        settings: Settings,
        clock: Arc<dyn Clock>,
        accept_lost_writes: bool,
    ) -> Result<(Queue, Recovery)> {
        let path = path.as_ref().to_path_buf();
        let opened = Opened::open(&path, accept_lost_writes, false)?;
        let next_id = opened.next_id;
        let queue = Queue {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(opened.store)),
                epoch: AtomicU64::new(0),
                status: Mutex::new(Status {
                    identity: Identity::of(&path).ok(),
                    ..Status::default()
                }),
                path,
                clock,
                settings,
                write: Mutex::new(WriteState { next_id }),
                wake: Default::default(),
                events: broadcast::channel(4096).0,
                combine: Mutex::new(combine::Combine::default()),
            }),
        };
        if let Some((from, to)) = opened.lost {
            queue.record_lost_writes(from, to)?;
        }
        // The open's own writes. On a full disk they may fail: the queue then opens for
        // reading only, refuses writes, and takes them again once space is freed.
        let finished = queue.recover().and_then(|recovery| {
            let mut b = Batch::default();
            b.insert(keys::META_NEXT_ID, next_id.to_be_bytes());
            queue.with_db(|db| db.apply_batch(b.resolve(db)?))?;
            queue.with_db(|db| db.flush())?;
            opened
                .sync_file
                .sync_data()
                .map_err(|e| Error::Durability(DurabilityError::caused("fdatasync", e)))?;
            Ok(recovery)
        });
        let recovery = match finished {
            Ok(r) => r,
            Err(e)
                if e.to_string().contains("No space left on device")
                    || store::free_space(queue.path()).is_some_and(|f| f < LOW_SPACE) =>
            {
                tracing::error!(
                    path = %queue.path().display(),
                    error = %e,
                    "the queue database opened for reading only: the disk is full; writes are refused until space is freed"
                );
                let mut st = queue.status();
                st.poisoned = true;
                st.refusal = Some(Refusal::NoSpace {
                    free: store::free_space(queue.path()),
                });
                Recovery::default()
            }
            Err(e) => return Err(e),
        };
        queue.probe();
        Ok((queue, recovery))
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn now(&self) -> Millis {
        self.inner.clock.now_ms()
    }

    /// Flushes everything and waits for it. Dropping the last clone also flushes.
    pub async fn flush(&self) -> Result<()> {
        let epoch = self.epoch();
        self.durable_since(epoch).await
    }

    /// Adds a job unless its key is pending, running, or done within the dedupe window.
    /// Returns once the job is on disk.
    pub async fn enqueue(
        &self,
        kind: JobKind,
        key: &str,
        payload: Vec<u8>,
        not_before: Option<Millis>,
    ) -> Result<Enqueued> {
        self.enqueue_with(NewJob {
            kind,
            key: key.to_owned(),
            payload,
            not_before,
            dedupe: Dedupe::Window,
        })
        .await
    }

    /// Leases up to `max` jobs of `kind` that are due, oldest due first. Each lease counts
    /// as an attempt and is on disk before this returns.
    pub async fn lease(&self, kind: JobKind, max: usize) -> Result<Vec<Leased>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        match self.submit(combine::Op::Lease { kind, max }).await? {
            combine::Done::Leased(l) => Ok(l),
            _ => Err(wrong_reply()),
        }
    }

    /// Records a successful attempt: the job is done.
    pub async fn ack(&self, lease: LeaseToken) -> Result<Job> {
        match self.submit(combine::Op::Ack(lease)).await? {
            combine::Done::Finished(j) => Ok(j),
            _ => Err(wrong_reply()),
        }
    }

    /// Records a failed attempt. The next attempt is due on the kind's ladder (later if
    /// `retry_after` says so), or the job goes dead when the ladder is used up and the
    /// kind's policy is `dead`.
    pub async fn fail(
        &self,
        lease: LeaseToken,
        error: &str,
        retry_after: Option<Duration>,
    ) -> Result<Job> {
        let op = combine::Op::Fail {
            lease,
            error: error.to_owned(),
            retry_after,
        };
        match self.submit(op).await? {
            combine::Done::Finished(j) => Ok(j),
            _ => Err(wrong_reply()),
        }
    }

    /// Puts a leased job back, due at `due_ms`, as if this attempt had not happened: no
    /// attempt is recorded and none is used up on the ladder. For a job that finds it
    /// must wait for another (a node's older traffic report, delivered first) — waiting
    /// is not failing, and must not push the job up its ladder.
    pub async fn defer(&self, lease: LeaseToken, due_ms: Millis) -> Result<Job> {
        match self.submit(combine::Op::Defer { lease, due_ms }).await? {
            combine::Done::Finished(j) => Ok(j),
            _ => Err(wrong_reply()),
        }
    }

    /// A failed attempt, on the job: its attempt recorded, its next rung or death.
    fn failed(
        &self,
        job: &mut Job,
        lease: LeaseToken,
        now: Millis,
        started: Millis,
        error: &str,
        retry_after: Option<Duration>,
    ) {
        let settings = &self.inner.settings;
        job.push_attempt(Attempt {
            number: lease.attempt,
            started_ms: started,
            duration_ms: now.saturating_sub(started),
            outcome: Outcome::Failed {
                error: record::bound_error(error),
            },
            note: None,
        });
        job.stored = match next_delay(settings.kind(job.kind), job.attempts, retry_after) {
            Some(d) => Stored::Pending {
                due_ms: clock::after(now, d),
            },
            None => Stored::Dead {
                at_ms: now,
                reason: DeadReason::Exhausted,
            },
        };
    }

    /// Records the end of an attempt in `b`, reading the job as the group `g` left it;
    /// the caller holds the write lock.
    fn finish_locked(
        &self,
        b: &mut Batch,
        g: &mut combine::Group,
        lease: LeaseToken,
        update: impl FnOnce(&mut Job, Millis, Millis),
    ) -> Result<Job> {
        let now = self.now();
        let mut job = self
            .load_in(g, lease.id)?
            .ok_or(Error::NotFound(lease.id))?;
        let started = match job.stored {
            Stored::Running { started_ms, .. } if job.attempts == lease.attempt => started_ms,
            _ => {
                return Err(Error::LeaseLost {
                    id: lease.id,
                    attempt: lease.attempt,
                });
            }
        };
        update(&mut job, now, started);
        b.remove(keys::running(job.id));
        self.index_insert(b, &job);
        b.insert(keys::job(job.id), record::encode_job(&job));
        g.touch(&job);
        Ok(job)
    }

    /// Wakes workers and tells subscribers how an attempt ended.
    fn after_finish(&self, job: &Job) {
        let event = match &job.stored {
            Stored::Pending { due_ms } => {
                self.wake(job.kind);
                EventKind::Retry { due_ms: *due_ms }
            }
            Stored::Done { .. } => EventKind::Done,
            Stored::Dead { .. } => EventKind::Dead,
            Stored::Running { .. } => return,
        };
        self.emit(job, event);
    }

    /// Makes jobs whose lease ran out ready again (a hung attempt); the attempt counts.
    /// Returns how many.
    pub async fn reap_expired_leases(&self) -> Result<u64> {
        let epoch = self.epoch();
        let n = {
            let _w = self.lock();
            let now = self.now();
            self.requeue_running(|lease_until| lease_until <= now, || Outcome::LeaseExpired)?
                .interrupted
        };
        if n > 0 {
            self.durable_since(epoch).await?;
            for &kind in self.inner.settings.kinds() {
                self.wake(kind);
            }
        }
        Ok(n)
    }

    fn recover(&self) -> Result<Recovery> {
        let _w = self.lock();
        self.requeue_running(
            |_| true,
            || Outcome::Interrupted {
                reason: "the process stopped during the attempt".into(),
            },
        )
    }

    /// Moves running jobs selected by their lease deadline back to pending (or dead).
    fn requeue_running(
        &self,
        select: impl Fn(Millis) -> bool,
        outcome: impl Fn() -> Outcome,
    ) -> Result<Recovery> {
        let now = self.now();
        let mut rec = Recovery::default();
        let mut b = Batch::default();
        for entry in self.db()?.scan_prefix([keys::RUNNING]) {
            let (k, v) = entry.storage()?;
            let lease_until = keys::be_u64(v.get(1..).unwrap_or_default()).unwrap_or(0);
            if !select(lease_until) {
                continue;
            }
            let Some(id) = keys::parse_id(&k) else {
                b.remove(k);
                continue;
            };
            let Some(mut job) = self.load_locked(id)? else {
                b.remove(k);
                rec.quarantined += 1;
                continue;
            };
            b.remove(k);
            let Stored::Running { started_ms, .. } = job.stored else {
                continue;
            };
            job.push_attempt(Attempt {
                number: job.attempts,
                started_ms,
                duration_ms: now.saturating_sub(started_ms),
                outcome: outcome(),
                note: None,
            });
            rec.interrupted += 1;
            job.stored = match after_interruption(self.inner.settings.kind(job.kind), job.attempts)
            {
                Some(d) => Stored::Pending {
                    due_ms: clock::after(now, d),
                },
                None => {
                    rec.exhausted += 1;
                    Stored::Dead {
                        at_ms: now,
                        reason: DeadReason::Exhausted,
                    }
                }
            };
            self.index_insert(&mut b, &job);
            b.insert(keys::job(id), record::encode_job(&job));
        }
        self.apply(b)?;
        Ok(rec)
    }

    /// Adds the index entry that matches the job's stored state.
    fn index_insert(&self, b: &mut Batch, job: &Job) {
        match job.stored {
            Stored::Pending { due_ms } => b.insert(keys::pending(job.kind, due_ms, job.id), []),
            Stored::Running { lease_until_ms, .. } => b.insert(
                keys::running(job.id),
                keys::running_value(job.kind, lease_until_ms),
            ),
            Stored::Done { at_ms } => b.insert(
                keys::finished(keys::FINISHED_DONE, at_ms, job.id),
                [job.kind.code()],
            ),
            Stored::Dead { at_ms, .. } => b.insert(
                keys::finished(keys::FINISHED_DEAD, at_ms, job.id),
                [job.kind.code()],
            ),
        }
    }

    /// Removes the index entry that matches the job's stored state.
    fn index_remove(&self, b: &mut Batch, job: &Job) {
        match job.stored {
            Stored::Pending { due_ms } => b.remove(keys::pending(job.kind, due_ms, job.id)),
            Stored::Running { .. } => b.remove(keys::running(job.id)),
            Stored::Done { at_ms } => b.remove(keys::finished(keys::FINISHED_DONE, at_ms, job.id)),
            Stored::Dead { at_ms, .. } => {
                b.remove(keys::finished(keys::FINISHED_DEAD, at_ms, job.id))
            }
        }
    }

    /// When the next pending job of `kind` is due (`None`: nothing pending).
    pub fn next_due(&self, kind: JobKind) -> Result<Option<Millis>> {
        let first = self
            .db()?
            .scan_prefix([keys::PENDING, kind.code()])
            .keys()
            .next()
            .transpose()
            .storage()?;
        Ok(first
            .and_then(|k| keys::parse_pending(&k))
            .map(|(_, due, _)| due))
    }

    /// How many jobs of `kind` are leased now.
    pub fn running_count(&self, kind: JobKind) -> Result<usize> {
        let mut n = 0;
        for v in self.db()?.scan_prefix([keys::RUNNING]).values() {
            if v.storage()?.first() == Some(&kind.code()) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Resolves when a job of `kind` may have become due (enqueue, retry, requeue), or
    /// at once if that happened since the last call.
    pub async fn woken(&self, kind: JobKind) {
        self.inner.wake[kind.code() as usize - 1].notified().await
    }

    /// Wakes the workers of `kind`, e.g. after a test moved a virtual clock.
    pub fn wake(&self, kind: JobKind) {
        self.inner.wake[kind.code() as usize - 1].notify_one();
    }

    pub fn get(&self, id: u64) -> Result<Option<Job>> {
        match self.db()?.get(keys::job(id)).storage()? {
            None => Ok(None),
            Some(raw) => self.read_job(&keys::job(id), &raw),
        }
    }

    /// Decodes a job found under `key`, quarantining it (and reading `None`) when it is
    /// unreadable or says it is another job (a misdirected write is not trusted).
    fn read_job(&self, key: &[u8], raw: &[u8]) -> Result<Option<Job>> {
        match decode_at(key, raw, self.inner.settings.kinds()) {
            Ok(job) => Ok(Some(job)),
            Err(e) => {
                self.quarantine(key, raw, &e)?;
                Ok(None)
            }
        }
    }

    /// Job events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The newest job with this idempotency key, if any.
    pub fn find_key(&self, kind: JobKind, key: &str) -> Result<Option<Job>> {
        match self.db()?.get(keys::idem(kind, key)).storage()? {
            Some(v) => match keys::be_u64(&v) {
                Some(id) => self.get(id),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Visits jobs of `kind` whose idempotency key starts with `prefix` (the newest job
    /// of each key), in key order after `from`, or in reverse key order before `from`
    /// when `rev`; `from` itself is skipped. Stops when `visit` returns false. For job
    /// kinds whose keys sort in creation order (a node's traffic reports).
    pub fn scan_keys(
        &self,
        kind: JobKind,
        prefix: &str,
        from: Option<&str>,
        rev: bool,
        mut visit: impl FnMut(Job) -> bool,
    ) -> Result<()> {
        use std::ops::Bound;
        let lo = keys::idem(kind, prefix);
        // Keys are UTF-8, which never holds 0xFF: this sorts after every key with the prefix.
        let mut hi = lo.clone();
        hi.push(0xFF);
        let at = from.map(|k| keys::idem(kind, k));
        let range = match (&at, rev) {
            (Some(at), false) => (Bound::Excluded(at.clone()), Bound::Excluded(hi)),
            (Some(at), true) => (Bound::Included(lo), Bound::Excluded(at.clone())),
            (None, _) => (Bound::Included(lo), Bound::Excluded(hi)),
        };
        let mut iter = self.db()?.range::<Vec<u8>, _>(range);
        loop {
            let next = if rev { iter.next_back() } else { iter.next() };
            let Some(entry) = next else { return Ok(()) };
            let (_, v) = entry.storage()?;
            let Some(job) = keys::be_u64(&v)
                .map(|id| self.get(id))
                .transpose()?
                .flatten()
            else {
                continue;
            };
            if !visit(job) {
                return Ok(());
            }
        }
    }

    // ---- the store, and whether it takes writes (`store.rs`) ----

    /// Runs `f` on the current database handle.
    fn with_db<T>(&self, f: impl FnOnce(&sled::Db) -> sled::Result<T>) -> Result<T> {
        let store = self
            .inner
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match store.as_ref() {
            Some(s) => Ok(f(&s.db).storage()?),
            None => Err(self.unwritable()),
        }
    }

    /// A clone of the current database handle (for iterating).
    fn db(&self) -> Result<sled::Db> {
        self.with_db(|db| Ok(db.clone()))
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        // Plain data: still sound after a panic elsewhere.
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn unwritable(&self) -> Error {
        let why = self.status().refusal.clone().unwrap_or(Refusal::Failed {
            message: "the database is not open".into(),
        });
        Error::Unwritable {
            path: self.inner.path.clone(),
            why,
        }
    }

    /// Notes a failed flush of the current handle as the reason writes are refused.
    fn note_flush_failure(&self) {
        let failure = {
            let store = self
                .inner
                .store
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            store.as_ref().and_then(|s| s.commit.failure())
        };
        if let Some(f) = failure {
            let mut st = self.status();
            st.poisoned = true;
            if st.refusal.is_none() {
                st.refusal = Some(if f.no_space {
                    Refusal::NoSpace {
                        free: store::free_space(&self.inner.path),
                    }
                } else {
                    Refusal::Failed {
                        message: f.error.to_string(),
                    }
                });
            }
        }
    }

    /// Applies `b` to the database, unless writes are refused. The caller holds the
    /// write lock and later waits with [`Queue::durable_since`].
    fn apply(&self, b: Batch) -> Result<()> {
        self.note_flush_failure();
        if self.status().refusal.is_some() {
            return Err(self.unwritable());
        }
        if b.is_empty() {
            return Ok(());
        }
        match self.with_db(|db| db.apply_batch(b.resolve(db)?)) {
            Err(Error::Storage(e)) => {
                // sled refuses every write after a failed one: note it for the probe.
                if let Some(io) = e.io() {
                    let mut st = self.status();
                    st.poisoned = true;
                    st.refusal.get_or_insert(if commit::is_no_space(io) {
                        Refusal::NoSpace {
                            free: store::free_space(&self.inner.path),
                        }
                    } else {
                        Refusal::Failed {
                            message: e.to_string(),
                        }
                    });
                }
                Err(Error::Storage(e))
            }
            r => r,
        }
    }

    /// The current handle's epoch: read before a write, passed to `durable_since`.
    fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// Waits until everything written on the handle of `epoch` is on disk. Fails if
    /// the handle was replaced since (what was written on it is not on disk).
    async fn durable_since(&self, epoch: u64) -> Result<()> {
        let (waiter, ticket) = {
            let store = self
                .inner
                .store
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match store.as_ref() {
                Some(s) if self.epoch() == epoch => (s.commit.waiter(), s.commit.ticket()),
                _ => {
                    return Err(Error::Durability(DurabilityError::new(
                        "the database was opened again before this write was flushed",
                    )));
                }
            }
        };
        let r = waiter.wait(ticket).await.map_err(Error::Durability);
        if r.is_err() {
            self.note_flush_failure();
        }
        r
    }

    /// Whether the queue takes writes now (without probing the disk).
    pub fn writability(&self) -> Writability {
        self.note_flush_failure();
        let refusal = self.status().refusal.clone();
        Writability {
            problem: refusal.as_ref().map(|r| r.describe(&self.inner.path)),
            refusal,
            free: None,
        }
    }

    /// Looks at the disk: is the database still the one opened (not deleted or
    /// replaced)? Is there space? Refuses writes, or takes them again (reopening the
    /// database after a failed write), accordingly; logs each change. Blocking (a few
    /// `stat`s, and on recovery an open): the daemon calls it every second or so.
    pub fn probe(&self) -> Writability {
        self.note_flush_failure();
        let path = self.inner.path.clone();
        let free = store::free_space(&path);
        let before = self.status().refusal.clone();
        // Deleted or replaced: for good.
        if !matches!(before, Some(Refusal::Gone { .. })) {
            let opened = self.status().identity;
            let now = Identity::of(&path);
            let gone = match (&opened, &now) {
                (Some(_), Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
                    "{} or its db file no longer exists",
                    path.display()
                )),
                (Some(a), Ok(b)) if a != b => Some(format!(
                    "{} is now another directory or file than the one opened",
                    path.display()
                )),
                _ => None,
            };
            if let Some(what) = gone {
                self.status().refusal = Some(Refusal::Gone { what });
            }
        }
        let refusal = self.status().refusal.clone();
        match refusal {
            Some(Refusal::Gone { .. }) => {}
            _ if free.is_some_and(|f| f < LOW_SPACE) => {
                self.status().refusal = Some(Refusal::NoSpace { free });
            }
            Some(_) if free.is_none_or(|f| f >= RESUME_SPACE) => {
                let poisoned = self.status().poisoned || self.store_missing();
                let resumed = if poisoned { self.reopen() } else { Ok(()) };
                match resumed {
                    Ok(()) => {
                        let mut st = self.status();
                        st.refusal = None;
                        st.poisoned = false;
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "the queue database cannot be opened again yet; retrying at the next probe");
                    }
                }
            }
            Some(Refusal::NoSpace { .. }) => {
                self.status().refusal = Some(Refusal::NoSpace { free });
            }
            _ => {}
        }
        let after = self.status().refusal.clone();
        if after.is_none()
            && let Some(f) = free
            && let Err(e) = store::ensure_reserve(&path, f)
        {
            tracing::debug!(error = %e, "cannot make the queue's reserve file");
        }
        let changed = std::mem::discriminant(&before) != std::mem::discriminant(&after)
            || matches!((&before, &after), (Some(a), Some(b)) if std::mem::discriminant(a) != std::mem::discriminant(b));
        if changed {
            match &after {
                Some(r) => tracing::error!(
                    path = %path.display(),
                    data_dir = %store::data_dir(&path).display(),
                    free = free.unwrap_or(0),
                    "{}",
                    r.describe(&path)
                ),
                None => tracing::info!(
                    path = %path.display(),
                    free = free.unwrap_or(0),
                    "the queue database takes writes again"
                ),
            }
        }
        Writability {
            problem: after.as_ref().map(|r| r.describe(&path)),
            refusal: after,
            free,
        }
    }

    fn store_missing(&self) -> bool {
        self.inner
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Drops the current handle (sled refuses writes on it for good) and opens the
    /// database again. Holds the write lock: no write is made meanwhile.
    fn reopen(&self) -> Result<()> {
        let mut w = self.lock();
        let mut slot = self
            .inner
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        // Joins the old flush thread, whose last flush fails quietly (poisoned).
        drop(slot.take());
        let path = &self.inner.path;
        // A reopen reads sled's files again, and damage found there must not panic.
        let opened = guard_damage(path, || Opened::open(path, false, true))?;
        // Ids handed out to writes that never became durable are not reused.
        w.next_id = w.next_id.max(opened.next_id);
        self.status().identity = Identity::of(&self.inner.path).ok();
        *slot = Some(opened.store);
        tracing::info!(path = %self.inner.path.display(), "the queue database was opened again after a failed write; nothing acknowledged was lost");
        Ok(())
    }

    // ---- internals ----

    fn emit(&self, job: &Job, what: EventKind) {
        // No subscribers is fine.
        let _ = self.inner.events.send(Event {
            id: job.id,
            kind: job.kind,
            key: job.key.clone(),
            what,
        });
    }

    fn lock(&self) -> MutexGuard<'_, WriteState> {
        // Poisoning means a thread panicked between sled calls; every sled batch is
        // atomic, so the state behind the lock (an id counter) is still sound.
        self.inner
            .write
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads a job with the write lock held; a record that cannot be read is
    /// quarantined and reads as absent.
    fn load_locked(&self, id: u64) -> Result<Option<Job>> {
        let key = keys::job(id);
        match self.db()?.get(key).storage()? {
            None => Ok(None),
            Some(raw) => match decode_at(&key, &raw, self.inner.settings.kinds()) {
                Ok(job) => Ok(Some(job)),
                Err(e) => {
                    self.quarantine_locked(&key, &raw, &e)?;
                    Ok(None)
                }
            },
        }
    }

    /// Records an accepted loss in the quarantine, where `queuectl stats` shows it.
    fn record_lost_writes(&self, from: u64, to: u64) -> Result<()> {
        let reason = format!(
            "job ids {from}..={} were acknowledged but lost: sled's log was damaged after its last snapshot; the loss was accepted by an operator",
            to - 1
        );
        tracing::error!("{reason}");
        let key = format!("lost-writes/{from}-{}", to - 1).into_bytes();
        let q = record::Quarantined {
            key: key.clone(),
            reason,
            at_ms: self.now(),
            raw: Vec::new(),
        };
        let mut b = Batch::default();
        b.insert(keys::quarantine(&key), record::encode_quarantined(&q));
        let _w = self.lock();
        self.apply(b)
    }

    /// Moves an unreadable record aside (taking the write lock).
    fn quarantine(&self, key: &[u8], raw: &[u8], err: &RecordError) -> Result<()> {
        let _w = self.lock();
        // Someone may have rewritten it meanwhile; only move what we saw.
        if self.db()?.get(key).storage()?.as_deref() == Some(raw) {
            self.quarantine_locked(key, raw, err)?;
        }
        Ok(())
    }

    /// Moves the record under `key` to quarantine with `err` as its reason; a job's
    /// index entries go with it. The caller holds the write lock.
    fn quarantine_locked(&self, key: &[u8], raw: &[u8], err: &dyn std::fmt::Display) -> Result<()> {
        let mut b = Batch::default();
        self.quarantine_into(&mut b, key, raw, err)?;
        self.apply(b)
    }

    /// Adds to `b` the move of the record under `key` to quarantine (see
    /// [`Queue::quarantine_locked`]).
    fn quarantine_into(
        &self,
        b: &mut Batch,
        key: &[u8],
        raw: &[u8],
        err: &dyn std::fmt::Display,
    ) -> Result<()> {
        tracing::error!(
            key = %keys::display(key, self.inner.settings.kinds()),
            error = %err,
            "unreadable queue record moved to quarantine; the rest of the queue keeps working (see `queuectl stats`)"
        );
        let q = record::Quarantined {
            key: key.to_vec(),
            reason: err.to_string(),
            at_ms: self.now(),
            raw: raw.to_vec(),
        };
        b.insert(keys::quarantine(key), record::encode_quarantined(&q));
        b.remove(key);
        if key.first() == Some(&keys::JOB)
            && let Some(id) = keys::parse_id(key)
        {
            // The record cannot tell us its index entries; find them by id. Rare (only
            // on corruption), so a scan of the index keys is fine.
            b.remove(keys::running(id));
            for prefix in [keys::PENDING, keys::FINISHED] {
                for k in self.db()?.scan_prefix([prefix]).keys() {
                    let k = k.storage()?;
                    if k.len() == 18 && keys::be_u64(&k[10..]) == Some(id) {
                        b.remove(k);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A database opened and checked, before it becomes (again) a [`Queue`]'s.
struct Opened {
    store: Store,
    next_id: u64,
    /// Ids acknowledged but not recovered, when the loss was accepted.
    lost: Option<(u64, u64)>,
    /// sled's data file, to fdatasync the open's own writes.
    sync_file: std::fs::File,
}

/// Runs an open of sled's files: damage sled reports, or panics on, becomes
/// [`Error::Damaged`] naming the database (the first open and a reopen after a failed
/// write both read the files again).
fn guard_damage<T>(path: &Path, open: impl FnOnce() -> Result<T>) -> Result<T> {
    match unwind::guarded(open) {
        Ok(Err(Error::Storage(e) | Error::Open { source: e, .. })) if e.is_damage() => {
            Err(Error::Damaged {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        }
        Ok(result) => result,
        Err(panic) => Err(Error::Damaged {
            path: path.to_path_buf(),
            detail: format!("sled stopped at {panic}"),
        }),
    }
}

impl Opened {
    /// `reopening`: our previous handle was just dropped; wait briefly for sled's lock.
    fn open(path: &Path, accept_lost_writes: bool, reopening: bool) -> Result<Opened> {
        let path = path.to_path_buf();
        let acknowledged = disk::read_hwm(&path);
        let db = store::open_sled(&path, reopening).map_err(|source| match &source {
            sled::Error::Io(e) if store::is_locked(e) => Error::Locked { path: path.clone() },
            _ => Error::Open {
                path: path.clone(),
                source: StorageError(source),
            },
        })?;
        let stored_next = db
            .get(keys::META_NEXT_ID)
            .storage()?
            .and_then(|v| keys::be_u64(&v))
            .unwrap_or(1);
        let last_id = db
            .scan_prefix([keys::JOB])
            .keys()
            .next_back()
            .transpose()
            .storage()?
            .and_then(|k| keys::parse_id(&k))
            .unwrap_or(0);
        let recovered = stored_next.max(last_id + 1);
        let mut lost = None;
        if let Some(acknowledged) = acknowledged.filter(|&a| a > recovered) {
            if !accept_lost_writes {
                return Err(Error::LostWrites {
                    path,
                    acknowledged: acknowledged - 1,
                    recovered: recovered - 1,
                });
            }
            lost = Some((recovered, acknowledged));
        }
        match db.get(keys::META_SCHEMA).storage()? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found > SCHEMA_VERSION {
                    return Err(Error::NewerSchema {
                        path,
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None if db.is_empty() => {
                db.insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())
                    .storage()?;
            }
            None => return Err(Error::NotAQueue { path }),
        }
        // Counts kept by this build (`counts.rs`): computed once for a database from
        // before them, or one an older build enqueued into since.
        if !counts::current(&db)? {
            let started = std::time::Instant::now();
            let older = db.get(counts::COUNTED).storage()?.is_some();
            let had_jobs = db.get(keys::META_NEXT_ID).storage()?.is_some();
            let entries = match counts::recount(&db) {
                Ok(n) => n,
                // A full disk: the open goes on and refuses writes (see
                // `open_unguarded`); the reopen once space is freed counts again.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the queue's job counts yet; stats are not shown right until they can be");
                    0
                }
            };
            if had_jobs && entries > 0 {
                tracing::info!(
                    path = %path.display(),
                    entries,
                    took_ms = started.elapsed().as_millis() as u64,
                    "{}",
                    if older {
                        "the queue's job counts were computed again from its indexes, once: a connector that does not keep them wrote to this database since; they are kept from now on"
                    } else {
                        "the queue's job counts were computed from its indexes, once: this database is from a connector that did not keep them; they are kept from now on"
                    }
                );
            }
        }
        let data_file = std::fs::File::open(path.join("db")).map_err(|e| Error::Open {
            path: path.clone(),
            source: StorageError(e.into()),
        })?;
        let sync_file = data_file.try_clone().map_err(|e| Error::Open {
            path: path.clone(),
            source: StorageError(e.into()),
        })?;
        let commit =
            GroupCommit::start(db.clone(), data_file, path.clone()).map_err(Error::Thread)?;
        let next_id = lost.map_or(recovered, |(_, acknowledged)| acknowledged);
        Ok(Opened {
            store: Store { db, commit },
            next_id,
            lost,
            sync_file,
        })
    }
}
