//! The retry ladder: data from config, and the one function that reads it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kind::{self, JobKind};

/// What happens when a job has failed on every rung of its ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExhausted {
    /// Give up: the job goes `dead` (visible and retryable in `queuectl`).
    Dead,
    /// Keep retrying at the last rung, forever: for data that must never be dropped.
    RepeatLast,
}

/// How one kind of job is retried and run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSettings {
    /// `ladder[0]` delays the first attempt; after failure N the next attempt is due
    /// `ladder[N]` later. Never empty.
    pub ladder: Vec<Duration>,
    pub on_exhausted: OnExhausted,
    /// Attempts of this kind that may run at once.
    pub concurrency: usize,
    /// Jobs the worker loop leases ahead of a free slot, so that a slot its attempt
    /// gives back starts the next job at once instead of waiting for a lease to reach
    /// the disk (with many short attempts, that wait is most of a slot's time). A job
    /// leased ahead has its attempt counted like any lease; the loop gives it back
    /// uncounted ([`Queue::defer`](super::Queue::defer)) when paused or stopped, and
    /// starts it only while its lease is still held with half its time left. 0: lease
    /// only for free slots.
    pub lease_ahead: usize,
    /// How long one attempt may hold its lease before the job is ready again.
    pub lease_timeout: Duration,
    /// How long done jobs of this kind are kept; `None`: the dedupe window. Shorter than
    /// the window, it shortens how long a done job holds its idempotency key.
    pub keep_done: Option<Duration>,
}

/// The delay before the next attempt of a job that has now used `attempts` attempts,
/// the last of which failed; `None` when the job should go dead. A `retry_after` hint
/// (an HTTP `Retry-After`) can push the attempt later, never earlier.
///
/// This is the one place the ladder is read; swap its body to change the policy.
pub fn next_delay(
    settings: &KindSettings,
    attempts: u32,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let rung = match settings.ladder.get(attempts as usize) {
        Some(d) => *d,
        None => match settings.on_exhausted {
            OnExhausted::Dead => return None,
            OnExhausted::RepeatLast => settings.ladder.last().copied().unwrap_or_default(),
        },
    };
    Some(rung.max(retry_after.unwrap_or_default()))
}

/// The delay before a job whose attempt was interrupted (process killed, lease expired)
/// runs again: at once while ladder rungs remain, else as [`next_delay`] says. Counting
/// the interrupted attempt is what stops a job that kills the process from looping.
pub fn after_interruption(settings: &KindSettings, attempts: u32) -> Option<Duration> {
    if (attempts as usize) < settings.ladder.len() {
        Some(Duration::ZERO)
    } else {
        next_delay(settings, attempts, None)
    }
}

/// The queue's settings: the kinds of job it runs, and how each is retried and run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a done job keeps its idempotency key.
    pub dedupe_window: Duration,
    kinds: Vec<JobKind>,
    /// `per_kind[i]` is for `kinds[i]`.
    per_kind: Vec<KindSettings>,
}

/// What a kind the queue was not given runs with: no rungs, so a failed job goes dead
/// at once instead of retrying on settings nobody chose.
static UNGIVEN: KindSettings = KindSettings {
    ladder: Vec::new(),
    on_exhausted: OnExhausted::Dead,
    concurrency: 1,
    lease_ahead: 0,
    lease_timeout: Duration::from_secs(60),
    keep_done: None,
};

impl Settings {
    /// The queue runs exactly these kinds; a record of any other code is unreadable.
    pub fn new(
        dedupe_window: Duration,
        kinds: impl IntoIterator<Item = (JobKind, KindSettings)>,
    ) -> Self {
        let (kinds, per_kind) = kinds.into_iter().unzip();
        Self {
            dedupe_window,
            kinds,
            per_kind,
        }
    }

    /// The kinds, in the order given.
    pub fn kinds(&self) -> &[JobKind] {
        &self.kinds
    }

    pub fn by_code(&self, code: u8) -> Option<JobKind> {
        kind::by_code(&self.kinds, code)
    }

    pub fn named(&self, name: &str) -> Option<JobKind> {
        self.kinds.iter().copied().find(|k| k.as_str() == name)
    }

    pub fn kind(&self, kind: JobKind) -> &KindSettings {
        match self.kinds.iter().position(|&k| k == kind) {
            Some(i) => &self.per_kind[i],
            None => &UNGIVEN,
        }
    }

    /// A kind not given yet is added, with the settings of an ungiven kind.
    pub fn kind_mut(&mut self, kind: JobKind) -> &mut KindSettings {
        let i = match self.kinds.iter().position(|&k| k == kind) {
            Some(i) => i,
            None => {
                self.kinds.push(kind);
                self.per_kind.push(UNGIVEN.clone());
                self.kinds.len() - 1
            }
        };
        &mut self.per_kind[i]
    }
}
