//! The queue's database handle and when it may take writes: a full disk, a failed
//! flush, a database deleted underneath the process (SPEC §4, "Faults the agent
//! survives").
//!
//! - **A full filesystem.** sled 0.34 refuses every write after one has failed (its
//!   "global error", reset only by opening the database again), and opening needs a
//!   little space too: sled rewrites the tail of its active log segment (up to one
//!   512 KiB segment) and writes a snapshot. So:
//!   - writes are refused *before* sled sees them while the filesystem has less than
//!     [`LOW_SPACE`] free ([`Refusal::NoSpace`]), so sled is rarely poisoned at all;
//!   - a flush that fails anyway (another process took the space first) poisons the
//!     handle: writes are refused, reads keep working from it, and once space is back
//!     the handle is dropped and the database opened again ([`Queue::probe`]).
//!     Nothing acknowledged is lost: an acknowledgement waits for a flush that
//!     succeeded, and a reopen reads exactly what was flushed;
//!   - a reserve file, `connector.reserve` ([`RESERVE_BYTES`]), is kept beside sled's
//!     files while space allows. When opening fails for want of space, it is deleted
//!     and the open tried again, so a restart on a full disk starts (and reads) rather
//!     than looping under systemd.
//! - **A deleted or replaced database.** The probe compares the directory's and the
//!   `db` file's device and inode with those opened. Once they differ, every write is
//!   refused for good ([`Refusal::Gone`]): sled would keep writing to an unlinked file
//!   and a restart would find nothing of it.
//!
//! [`Queue::probe`]: super::Queue::probe

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::commit::{self, GroupCommit};

/// Writes are refused while the filesystem has less free than this.
pub const LOW_SPACE: u64 = 1024 * 1024;
/// The reserve kept for an open on a full disk: two of sled's 512 KiB segments.
pub const RESERVE_BYTES: u64 = 1024 * 1024;
/// Free space needed to take writes again after a refusal: room for the reserve and
/// the low-space margin, so the state does not flap at the edge.
pub const RESUME_SPACE: u64 = LOW_SPACE + RESERVE_BYTES;

const RESERVE_FILE: &str = "connector.reserve";

/// One opened database: the sled handle and its flush thread.
pub(super) struct Store {
    pub(super) db: sled::Db,
    pub(super) commit: GroupCommit,
}

/// Which directory and file were opened (device, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    dir: (u64, u64),
    file: (u64, u64),
}

impl Identity {
    pub(super) fn of(path: &Path) -> std::io::Result<Identity> {
        let d = std::fs::metadata(path)?;
        let f = std::fs::metadata(path.join("db"))?;
        Ok(Identity {
            dir: (d.dev(), d.ino()),
            file: (f.dev(), f.ino()),
        })
    }
}

/// Why writes are refused now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The filesystem of the database is (nearly) full.
    NoSpace { free: Option<u64> },
    /// A flush failed for another reason; the handle is reopened at the next probe.
    Failed { message: String },
    /// The database directory or file was deleted or replaced while open.
    Gone { what: String },
}

impl Refusal {
    /// One line naming the path and what to do.
    pub fn describe(&self, path: &Path) -> String {
        let data_dir = path.parent().unwrap_or(path);
        match self {
            Refusal::NoSpace { free } => format!(
                "disk full: no space left on device (ENOSPC) for data_dir {} ({} free, {} needed): the queue database {} takes no writes, so nothing new is acknowledged (ingestion answers 503); node sync and apply go on from the last list; writes resume by themselves when space is freed",
                data_dir.display(),
                free.map_or_else(|| "unknown".to_string(), human_bytes),
                human_bytes(RESUME_SPACE),
                path.display()
            ),
            Refusal::Failed { message } => format!(
                "the queue database {} failed a write ({message}): nothing new is acknowledged until it is opened again (retried every few seconds)",
                path.display()
            ),
            Refusal::Gone { what } => format!(
                "the queue database {} was deleted or replaced while the daemon ran ({what}): nothing new is acknowledged, and jobs not yet done exist only in this process's memory; restore {} from a backup or restart the daemon to begin a new queue",
                path.display(),
                path.display()
            ),
        }
    }
}

pub(super) fn human_bytes(n: u64) -> String {
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path` (the
/// nearest existing ancestor, if `path` is gone).
pub(super) fn free_space(path: &Path) -> Option<u64> {
    let mut p: &Path = path;
    loop {
        match fs2::available_space(p) {
            Ok(n) => return Some(n),
            Err(_) => p = p.parent()?,
        }
    }
}

/// Deletes the reserve file; true when there was one.
pub(super) fn release_reserve(dir: &Path) -> bool {
    std::fs::remove_file(dir.join(RESERVE_FILE)).is_ok()
}

/// Creates the reserve file when it is missing and space allows (`free` ≥
/// [`RESUME_SPACE`]). Allocated, not written: `fallocate`, then renamed into place.
pub(super) fn ensure_reserve(dir: &Path, free: u64) -> std::io::Result<()> {
    use fs2::FileExt;
    let path = dir.join(RESERVE_FILE);
    if path.exists() || free < RESUME_SPACE {
        return Ok(());
    }
    let tmp = dir.join(format!("{RESERVE_FILE}.tmp"));
    let made = (|| {
        let f = std::fs::File::create(&tmp)?;
        f.allocate(RESERVE_BYTES)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Opens sled at `path`. When the filesystem is full and a reserve file is there, the
/// reserve is given up and the open tried again. `retry_locked`: after our own handle
/// was dropped (a reopen), sled's lock may be held a moment longer by readers that
/// still hold the old handle; wait for them, briefly.
pub(super) fn open_sled(path: &Path, retry_locked: bool) -> Result<sled::Db, sled::Error> {
    let open = || {
        sled::Config::new()
            .path(path)
            // We flush explicitly (group commit); sled's timer would only add fsyncs.
            .flush_every_ms(None)
            .cache_capacity(256 * 1024 * 1024)
            .open()
    };
    let mut tries = 0;
    loop {
        tries += 1;
        // Also before a second try: a failed open may leave a snapshot half written.
        for t in super::disk::set_aside_torn_snapshots(path)? {
            tracing::warn!(file = %t.display(), "an unfinished sled snapshot (from a kill or a full disk during its write) was moved aside; nothing is lost");
        }
        match open() {
            Err(sled::Error::Io(e)) if commit::is_no_space(&e) && release_reserve(path) => {
                tracing::warn!(
                    path = %path.display(),
                    reserve = %human_bytes(RESERVE_BYTES),
                    "the disk is full: the queue's reserve file was deleted so that the database can open; it is made again when space is freed"
                );
            }
            Err(sled::Error::Io(e)) if retry_locked && is_locked(&e) && tries < 100 => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

pub(super) fn is_locked(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// The data directory a queue path lives in (for messages).
pub(super) fn data_dir(path: &Path) -> PathBuf {
    path.parent().unwrap_or(path).to_path_buf()
}
