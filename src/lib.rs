//! `connector`: a node agent for proxy operators and API relays.
//!
//! # Layout
//!
//! - [`queue`]: the durable job queue (sled inside, nowhere else). Every unit of work
//!   is a job in it: idempotency keys, the retry ladder, leases, crash recovery, and
//!   the operator operations `queuectl` calls. A crate of its own (`connector-queue`,
//!   still in `src/queue/`), so it cannot import the product: job kinds are data it is
//!   given (code, name, ladder, concurrency), and it reports attempts to an observer
//!   the daemon passes in.
//! - [`jobs`]: the job kinds, one folder each: what produces its jobs (the sync
//!   schedule, the traffic collector), its handler, its state records and their keys,
//!   and its watchers (the core watcher), saying what it reads and writes; and the one
//!   codec of their state records (`jobs::state`). `jobs/mod.rs` declares the kinds
//!   themselves (on-disk codes, names) and their default settings.
//! - [`peers`]: clients of the outside world, knowing nothing of the jobs: the panel,
//!   the Xray/V2Ray core's API (and its vocabulary: flavours, protocols, emails, counter
//!   names, access-log lines), the relays, the kernel's socket table (sock_diag), the
//!   operator's apply hook.
//! - [`daemon`]: the long-running process: opens the queue, builds the peers and job
//!   kinds, runs their producers, watchers and worker pools under one supervisor that
//!   names each task (and `/healthz` a task that died), the HTTP listener, the disk
//!   probe, shutdown, `--once`.
//! - [`config`]: the configuration file and environment, validated into typed settings.
//! - [`redact`]: what is never shown (secrets, URLs' credentials); imports nothing of
//!   the crate, so every layer may use it.
//! - [`telemetry`]: logging (`RUST_LOG`, `--log-format text|json`).
//! - [`admin`]: the daemon's admin API (gRPC over a Unix socket) that `queuectl` uses
//!   while the daemon runs, and the operations it shares with an offline `queuectl`.
//! - [`demo`]: `connector demo`, a first run that shows the agent at work against
//!   simulators in a temporary directory.
//! - `sim` (hidden): the peers the demo and the tests run the agent against (the core
//!   launcher, the panel,
//!   the HTTPS relay), one of each for both; not a product API.
//! - [`cli`]: the two command lines, `connector` (with `doctor`, the live checks of a
//!   setup) and `queuectl`; `src/bin/` only calls into them.

pub(crate) mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub(crate) mod demo;
pub mod jobs;
pub mod peers;
/// The queue is its own crate (`src/queue/`, package `connector-queue`) so that it
/// cannot import the product; it keeps its place at `connector::queue`.
pub use connector_queue as queue;
pub(crate) mod redact;
#[doc(hidden)]
pub mod sim;
pub mod telemetry;

/// The module graph stays acyclic (`scripts/deps.sh` prints it and fails on a cycle):
/// here so that every `cargo test` run checks it.
#[cfg(test)]
mod deps {
    #[test]
    fn no_cycle_between_modules() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let out = std::process::Command::new("sh")
            .arg(format!("{dir}/scripts/deps.sh"))
            .arg(format!("{dir}/src"))
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "module dependency cycle:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
