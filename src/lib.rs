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
//! - [`jobs`]: the job kinds, one module each, saying what it reads and writes; the
//!   kinds themselves (codes, names) and their default settings are in `jobs/mod.rs`.
//! - [`peers`]: clients of the outside world: the panel, the apply hook.
//! - [`daemon`]: the long-running process: producers, workers, shutdown, `--once`.
//! - [`config`]: the configuration file and environment, validated into typed settings.
//! - [`telemetry`]: logging (`RUST_LOG`, `--log-format text|json`).
//! - [`admin`]: the daemon's admin API (gRPC over a Unix socket) that `queuectl` uses
//!   while the daemon runs, and the operations it shares with an offline `queuectl`.
//! - [`demo`]: `connector demo`, a first run that shows the agent at work against
//!   simulators in a temporary directory.
//! - [`cli`]: the two command lines, `connector` and `queuectl`; `src/bin/` only calls
//!   into them.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod jobs;
pub mod peers;
/// The queue is its own crate (`src/queue/`, package `connector-queue`) so that it
/// cannot import the product; it keeps its place at `connector::queue`.
pub use connector_queue as queue;
pub mod telemetry;
