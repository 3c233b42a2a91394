//! What the agent tells its operator besides the queue itself:
//!
//! - logging (here): `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as
//!   text for people or JSON lines for log shippers. A line that cannot be written (the
//!   reader of a pipe went away: `| head`, a restarting journald) is dropped: a log
//!   consumer that goes away loses lines, never the agent ([`Stderr`]);
//! - [`metrics`]: the Prometheus metrics `GET /metrics` serves, every name in one place.

pub mod metrics;

use std::io::Write;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: escape codes in a journal or a file
    // make logs harder to read and to grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Stderr)
        // Its own report of a failed write goes to stderr with `eprintln!`, which
        // panics when stderr is a closed pipe.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// stderr for log lines, dropping what cannot be written instead of failing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // EPIPE, EIO, a closed descriptor: the line is lost, the caller goes on.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

/// Prints a line on stderr for a person (`connector: …`), never failing: a closed
/// pipe loses the line, not the process.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}
