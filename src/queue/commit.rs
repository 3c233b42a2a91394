//! Group commit: many writers share one `flush`.
//!
//! A writer applies its batch (in memory, atomic), takes a ticket, and waits until a
//! flush that *started after* the ticket was taken has finished. One thread runs the
//! flushes back to back; every ticket taken while a flush runs is covered by the next
//! one. So with N concurrent writers there are far fewer than N fsyncs, and no writer
//! is told "done" before its bytes are on disk.
//!
//! sled's `flush` writes its log with `sync_file_range` on Linux: that survives the
//! process being killed, but not a power cut (it neither waits for the disk cache nor
//! syncs metadata). So after each flush we also `fdatasync` sled's data file through a
//! handle of our own; fsync acts on the inode, whichever descriptor asks.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::watch;

#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Set when a flush failed: the store can no longer promise durability.
    failed: Option<String>,
}

#[derive(Default)]
struct Tickets {
    issued: u64,
    shutdown: bool,
}

struct Shared {
    tickets: Mutex<Tickets>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
}

pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flush thread. `data_file` is sled's log file (`{path}/db`).
    pub(crate) fn start(db: sled::Db, data_file: File) -> std::io::Result<Self> {
        let (progress, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            tickets: Mutex::new(Tickets::default()),
            wake: Condvar::new(),
            progress,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("queue-flush".into())
            .spawn(move || flusher(db, data_file, thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Takes a ticket for everything written so far.
    pub(crate) fn ticket(&self) -> u64 {
        // A poisoned lock only means another thread panicked while holding two integers;
        // they are still consistent, so carry on.
        let mut t = self
            .shared
            .tickets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.issued += 1;
        self.shared.wake.notify_one();
        t.issued
    }

    /// Waits until the ticket's writes are on disk.
    pub(crate) async fn wait(&self, ticket: u64) -> Result<(), String> {
        let mut rx = self.shared.progress.subscribe();
        let p = rx
            .wait_for(|p| p.durable >= ticket || p.failed.is_some())
            .await
            .map_err(|_| "the flush thread is gone".to_string())?;
        match &p.failed {
            Some(e) if p.durable < ticket => Err(e.clone()),
            _ => Ok(()),
        }
    }
}

fn flusher(db: sled::Db, data_file: File, shared: Arc<Shared>) {
    loop {
        let target = {
            let mut t = shared
                .tickets
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            while t.issued == shared.progress.borrow().durable && !t.shutdown {
                t = shared.wake.wait(t).unwrap_or_else(PoisonError::into_inner);
            }
            if t.shutdown && t.issued == shared.progress.borrow().durable {
                break;
            }
            t.issued
        };
        match db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| data_file.sync_data().map_err(|e| format!("fdatasync: {e}")))
        {
            Ok(()) => shared.progress.send_modify(|p| p.durable = target),
            Err(e) => {
                tracing::error!(error = %e, "queue flush failed; writes can no longer be acknowledged");
                shared
                    .progress
                    .send_modify(|p| p.failed = Some(format!("flush failed: {e}")));
                break;
            }
        }
    }
    // Last flush on the way out, whatever is left.
    if let Err(e) = db.flush().map(|_| data_file.sync_data()) {
        tracing::error!(error = %e, "final queue flush failed");
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        {
            let mut t = self
                .shared
                .tickets
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            t.shutdown = true;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
