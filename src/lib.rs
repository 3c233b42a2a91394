//! `connector`: a node agent for proxy operators and API relays.
//!
//! # Layout
//!
//! - [`queue`]: the durable job queue (sled inside, nowhere else). Every unit of work
//!   is a job in it: idempotency keys, the retry ladder, leases, crash recovery, and
//!   the operator operations `queuectl` calls.
//! - [`jobs`]: the job kinds, one folder each: what produces its jobs (the sync
//!   schedule, the traffic collector), its handler, its state records and their keys,
//!   and its watchers (the core watcher), saying what it reads and writes; and the one
//!   codec of their state records (`jobs::state`).
//! - [`peers`]: clients of the outside world: the panel, the apply hook.
//! - [`daemon`]: the long-running process: opens the queue, builds the peers and job
//!   kinds, runs their producers, watchers and worker pools under one supervisor that
//!   names each task (and `/healthz` a task that died), the HTTP listener, the disk
//!   probe, shutdown, `--once`.
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
pub mod queue;
pub mod telemetry;
