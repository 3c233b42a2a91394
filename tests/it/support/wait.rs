//! Waiting, written once for every integration test (and the crash test, which
//! includes this file by path): for a condition, for a child to exit, for sled to let
//! go of its lock; and a child process that is killed when its owner drops.
//!
//! Polling here stands for an event the tests cannot subscribe to (a file appearing, a
//! child's state, another process's log); the deadline only guards against a hang, and
//! a wait ends as soon as its condition holds.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(10);

/// Calls `f` until it gives `Some`, at most `timeout` long; `Err` names `what`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `done` is true, at most `timeout` long; `Err` names `what`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    wait_for(timeout, what, || done().then_some(()))
}

/// Waits for `child` to exit, at most `timeout` long, and reaps it. On `Err` the child
/// is still running (the caller decides whether to kill it).
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
    wait_for(timeout, "the child to exit", || {
        child.try_wait().expect("try_wait on our own child")
    })
}

/// A child process killed and reaped when this drops (a test that fails midway leaves
/// no process behind); otherwise it is the child itself.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How long an open waits for sled's lock before the test fails.
pub const SLED_LOCK: Duration = Duration::from_secs(10);

/// Runs `open` (a sled or queue open at `path`) once sled's lock is free, again while
/// it fails because the database is `locked`, for at most [`SLED_LOCK`]; panics when
/// the lock is never released.
///
/// Free does not stay free for sure: a test that spawns a process while this one's
/// database is open lends the child a copy of sled's file between fork and exec, and
/// with it the lock. So a locked open waits for the lock again, then retries.
pub fn when_unlocked<T, E>(
    path: &Path,
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + SLED_LOCK;
    loop {
        if let Err(e) = sled_unlocked(path, deadline.saturating_duration_since(Instant::now())) {
            panic!("{e}");
        }
        match open() {
            Err(e) if locked(&e) && Instant::now() < deadline => {}
            r => return r,
        }
    }
}

/// Whether sled refused an open because another handle holds its lock.
pub fn sled_locked(e: &sled::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// Waits until nobody holds sled's lock on the database at `path` (its `db` file).
///
/// sled lets go of the lock when the last of its background tasks drops the file, a
/// moment after the last handle is dropped (spacejam/sled#1234): an open right then
/// fails as locked. This takes the same `flock` sled takes, blocking — an event, not a
/// retry loop — on a thread under a watchdog, so a lock never released fails the test
/// after `timeout` instead of hanging it. No `db` file yet: nothing to wait for.
pub fn sled_unlocked(path: &Path, timeout: Duration) -> Result<(), String> {
    let db = path.join("db");
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("opening {}: {e}", db.display())),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let locked = file.lock();
        // Released before the caller hears of it, so that its open finds no lock.
        drop(file);
        let _ = tx.send(locked);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("locking {}: {e}", db.display())),
        Err(_) => Err(format!(
            "sled still holds the lock on {} {timeout:?} after the last handle was dropped",
            path.display()
        )),
    }
}
