//! The simulated and real peers the demo (`connector demo`) and the tests run the agent
//! against: the launcher of real proxy cores (`core`), the
//! panel simulator (`panel`) and the HTTPS relay simulator (`relay`). One of each, shared by the demo,
//! the integration tests (`tests/it/support` re-exports them) and the benches.
//!
//! Not a product API: nothing the daemon or `queuectl` runs reaches this module, which
//! is public (and hidden from the docs) only so that the test and bench binaries can use
//! it. It may panic where a test would (a harness that cannot start a core has nothing
//! better to do), and touches only what it starts itself: child processes, temporary
//! directories, loopback ports.

// The tests, the benches and the demo each use a different part of it.
#![allow(dead_code)]

pub mod core;
pub mod panel;
pub mod relay;
