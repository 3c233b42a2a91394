//! Integration tests, one binary (see `tests/it/*.rs`). `tests/crash.rs` is separate:
//! it re-runs itself as the child it kills.

mod commit;
mod queue_basic;
mod support;
