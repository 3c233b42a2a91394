//! Integration tests, one binary: each suite is a module (`tests/it/<suite>.rs`, its
//! tests named `<suite>::…`), and the simulators and helpers they share are `support`
//! (`tests/it/support/`), compiled once for all of them.
//!
//! `tests/crash.rs` stays a binary of its own: it has its own `main` (no libtest
//! harness) and re-runs itself as the child it SIGKILLs at random points, which a
//! module of a libtest binary cannot do without a harness of its own.

mod admin;
mod bans_bite;
mod commit;
mod config;
mod cores;
mod corruption;
mod counts;
mod cut_connections;
mod demo;
mod deploy;
mod doctor;
mod faults;
mod monitoring;
mod node_sync;
mod online_bans;
mod operate;
mod queue_basic;
mod queue_model;
mod queuectl;
mod schema;
mod support;
mod traffic_report;
mod webhook;
mod workers;
mod xray_apply;
