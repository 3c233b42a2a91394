//! The retry ladder: data from config, and the one function that reads it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kind::JobKind;

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
    /// How long one attempt may hold its lease before the job is ready again.
    pub lease_timeout: Duration,
    /// How long done jobs of this kind are kept; `None`: the dedupe window. Shorter than
    /// the window, it shortens how long a done job holds its idempotency key.
    pub keep_done: Option<Duration>,
}

impl KindSettings {
    /// SPEC §2 defaults: `0s, 1m, 5m, 30m`; `dead` for webhook and node_sync,
    /// `repeat-last` for traffic_report and xray_apply.
    pub fn default_for(kind: JobKind) -> Self {
        let ladder = vec![
            Duration::ZERO,
            Duration::from_secs(60),
            Duration::from_secs(5 * 60),
            Duration::from_secs(30 * 60),
        ];
        let (on_exhausted, concurrency, lease) = match kind {
            JobKind::NodeSync => (OnExhausted::Dead, 4, 120),
            JobKind::XrayApply => (OnExhausted::RepeatLast, 2, 600),
            JobKind::TrafficReport => (OnExhausted::RepeatLast, 2, 120),
            JobKind::Webhook => (OnExhausted::Dead, 32, 60),
        };
        Self {
            ladder,
            on_exhausted,
            concurrency,
            lease_timeout: Duration::from_secs(lease),
            keep_done: None,
        }
    }
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

/// The queue's settings, per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a done job keeps its idempotency key.
    pub dedupe_window: Duration,
    kinds: [KindSettings; 4],
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(24 * 3600),
            kinds: JobKind::ALL.map(KindSettings::default_for),
        }
    }
}

impl Settings {
    pub fn kind(&self, kind: JobKind) -> &KindSettings {
        &self.kinds[kind.code() as usize - 1]
    }

    pub fn kind_mut(&mut self, kind: JobKind) -> &mut KindSettings {
        &mut self.kinds[kind.code() as usize - 1]
    }
}
