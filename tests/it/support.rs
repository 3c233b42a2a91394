//! Helpers shared by the integration tests: the simulators of the agent's peers (a
//! panel, an HTTPS relay, an HTTP capture, real proxy cores), the agent driven as a
//! child process, `/metrics` parsing, and waiting (`wait`).

pub mod agent;
pub mod capture;
pub mod download;
pub mod metrics;
pub mod netns;
pub mod wait;

/// The core launcher, shared with the demo and the benches.
pub use connector::sim::core as cores;
/// The panel simulator, shared with the demo and the benches.
pub use connector::sim::panel;
/// The HTTPS relay simulator, shared with the demo and the benches.
pub use connector::sim::relay as receiver;

use std::sync::Arc;
use std::time::Duration;

use connector::queue::{ManualClock, Queue, Settings};

/// A virtual start time: 2026-01-01T00:00:00Z.
pub const T0: u64 = 1_767_225_600_000;

pub fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

/// Opens a queue in `dir` on a manual clock.
pub fn open_manual(dir: &std::path::Path, settings: Settings, clock: &Arc<ManualClock>) -> Queue {
    let (q, _) = Queue::open(dir.join("queue"), settings, clock.clone()).expect("open queue");
    q
}
