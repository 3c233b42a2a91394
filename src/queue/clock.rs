//! Time as the queue sees it: milliseconds since the Unix epoch, behind a trait
//! so the retry ladder can be driven in virtual time by tests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Every time stored in a record is one of these.
pub type Millis = u64;

/// A source of "now" for the queue.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_ms(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        // A clock before 1970 is a broken machine; treat it as the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Shared by cloning the `Arc` it lives in.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Millis) -> Self {
        Self {
            now: AtomicU64::new(start),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, to: Millis) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }
}

/// Adds a duration to a timestamp, saturating instead of overflowing.
pub(crate) fn after(at: Millis, d: Duration) -> Millis {
    at.saturating_add(d.as_millis().min(u64::MAX as u128) as u64)
}

/// Formats a timestamp as RFC 3339 (UTC, seconds precision) for people and exports.
pub fn rfc3339(at: Millis) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}
