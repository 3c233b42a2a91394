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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and print the effective values.
    CheckConfig,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let config = match super::load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connector: config error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    match args.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", crate::config::render(&config));
            ExitCode::SUCCESS
        }
        Command::Run => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("connector: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::daemon::run_until_signal(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("connector: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
