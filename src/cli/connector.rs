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
    /// Validate the configuration and print the effective values.
    CheckConfig,
    /// See it work in a minute: the agent against a simulated panel and relay (and a
    /// real Xray core when python has the `xray` module), in a temporary directory with
    /// a config of its own (`--config` is not read).
    Demo {
        /// Keep the temporary directory (config, log, the core's files) afterwards.
        #[arg(long)]
        keep: bool,
    },
}

pub fn main() -> ExitCode {
    // The Go connector took `-once`; clap reads single-dash words as short flags.
    let args = Args::parse_from(
        std::env::args_os().map(|a| if a == "-once" { "--once".into() } else { a }),
    );
    // Its own temporary config and a log file of its own: no --config, no stderr logs.
    if let Some(Command::Demo { keep }) = args.command {
        return crate::demo::main(crate::demo::Options { keep });
    }
    telemetry::init(args.log_format);
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
    let create = !matches!(command, Command::CheckConfig);
    if let Err(e) = crate::config::prepare_data_dir(&config, &crate::config::ProcessEnv, create) {
        eprintln!("connector: config error: {e}");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    if let Command::CheckConfig = command {
        for w in &config.warnings {
            crate::say!("connector: warning: {w}");
        }
        for w in crate::jobs::xray_apply::cut::doctor(&config) {
            crate::say!("connector: warning: {w}");
        }
        // A closed stdout (`check-config | head`) ends the listing, not with a panic.
        let _ = std::io::Write::write_all(
            &mut std::io::stdout(),
            crate::config::render(&config).as_bytes(),
        );
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
