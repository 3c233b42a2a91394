//! The two command lines. Each parses its arguments, loads config, and calls the
//! library; `src/bin/*.rs` only call `main` here. `connector doctor`'s checks live here
//! too ([`doctor`]): they read the config and every peer, so nothing below may hold them.
//!
//! Exit codes (both binaries): 0 success, 1 runtime failure (`doctor`: a check
//! failed), 2 configuration or usage error, 3 (`queuectl`) the database is held by
//! another process but no daemon answers on the admin socket, 4 the queue database is
//! damaged so that it cannot be opened (the one-line error names it and says to run
//! `queuectl salvage`; restarting cannot help).

pub mod connector;
pub(crate) mod doctor;
pub mod queuectl;

use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError, ProcessEnv};

/// Exit code for a configuration or usage error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when the queue database is too damaged to open.
pub const EXIT_DAMAGED: u8 = 4;

/// Finds the config file: `--config`, else `CONNECTOR_CONFIG`, else none.
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CONNECTOR_CONFIG").map(PathBuf::from))
}

/// Loads the config for a command line, from the process environment.
pub fn load_config(flag: Option<&Path>) -> Result<Config, ConfigError> {
    config::load(config_path(flag).as_deref(), &ProcessEnv)
}
