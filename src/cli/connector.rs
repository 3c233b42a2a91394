//! `connector`: the daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "connector",
    version,
    about = "Node agent: durable jobs for panel sync, Xray apply, traffic reports and relay webhooks"
)]
struct Args {
    /// Configuration file (TOML). Environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Run one sync (and the applies it causes) for every node, then exit: 0 when all
    /// succeeded. `-once` (the Go connector's spelling) works too.
    #[arg(long)]
    once: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and print the effective values (secrets masked), and
    /// which environment variable set which key.
    CheckConfig {
        /// As JSON (`"env"`: key → the variable that set it).
        #[arg(long)]
        json: bool,
    },
    /// Check the live setup: config, data_dir and queue, the HTTP listener's address,
    /// the panel (key, each node, its answer), the core (API, flavour, services,
    /// inbounds, traffic counters, what cutting connections needs), the relays'
    /// provider files. One line per check; exit 0 when none failed, 1 otherwise, 2 for
    /// a config that does not load.
    Doctor {
        /// Print a JSON array of {check, status, detail, fix} instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// See it work in a minute: the agent against a simulated panel and relay and a
    /// real Xray core (found, or fetched once into the user's cache), in a temporary
    /// directory with a config of its own (`--config` is not read).
    Demo {
        /// Keep the temporary directory (config, log, the core's files) afterwards.
        #[arg(long)]
        keep: bool,
        /// Never download: without a core found (CONNECTOR_XRAY_PYTHON, CONNECTOR_XRAY_BIN,
        /// the checkout's or the cached venv, `xray` or `python3` with `xray` on PATH),
        /// run without it rather than `pip install` the pinned wheel into the cache.
        #[arg(long)]
        no_fetch: bool,
    },
}

pub fn main() -> ExitCode {
    // The Go connector took `-once`; clap reads single-dash words as short flags.
    let args = Args::parse_from(
        std::env::args_os().map(|a| if a == "-once" { "--once".into() } else { a }),
    );
    // Its own temporary config and a log file of its own: no --config, no stderr logs.
    if let Some(Command::Demo { keep, no_fetch }) = args.command {
        return crate::demo::main(crate::demo::Options { keep, no_fetch });
    }
    telemetry::init(args.log_format);
    // A data_dir that cannot be used is one of its checks, not a config error: it runs
    // before prepare_data_dir below.
    if let Some(Command::Doctor { json }) = args.command {
        return super::doctor::main(super::load_config(args.config.as_deref()), json);
    }
    let config = match super::load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            crate::say!("connector: config error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let command = args.command.unwrap_or(Command::Run);
    // A data_dir the agent cannot create or write is a config error (exit 2, naming the
    // key), not a runtime failure. check-config looks without creating it.
    let create = !matches!(command, Command::CheckConfig { .. });
    if let Err(e) = crate::config::prepare_data_dir(&config, &crate::config::ProcessEnv, create) {
        eprintln!("connector: config error: {e}");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    if let Command::CheckConfig { json } = command {
        for w in &config.warnings {
            crate::say!("connector: warning: {w}");
        }
        for w in crate::jobs::xray_apply::cut::doctor(&config) {
            crate::say!("connector: warning: {w}");
        }
        let text = if json {
            crate::config::render_json(&config)
        } else {
            crate::config::render(&config)
        };
        // A closed stdout (`check-config | head`) ends the listing, not with a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            crate::say!("connector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.once {
        return match runtime.block_on(crate::daemon::run_once(config)) {
            Ok(report) if report.ok() => {
                crate::say!("connector: {}", report.summary());
                ExitCode::SUCCESS
            }
            Ok(report) => {
                crate::say!("connector: {}", report.summary());
                ExitCode::FAILURE
            }
            Err(e) => failed(&e),
        };
    }
    match runtime.block_on(crate::daemon::run_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

/// One line on stderr; exit 4 when the queue database is damaged (a restart cannot
/// help: `queuectl salvage` can), else 1.
fn failed(e: &anyhow::Error) -> ExitCode {
    crate::say!("connector: {e:#}");
    let damaged = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::queue::Error>(),
            Some(crate::queue::Error::Damaged { .. })
        )
    });
    if damaged {
        ExitCode::from(super::EXIT_DAMAGED)
    } else {
        ExitCode::FAILURE
    }
}
