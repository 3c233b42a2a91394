//! `connector doctor [--config FILE] [--json]`: the live setup checked up front, one
//! line per check, so that a wrong key, an unknown node, a core without its API or
//! stats policy, a missing access log or a busy port shows up before the daemon runs
//! instead of later as a failing job.
//!
//! Each check is `✓` (fine), `!` (cannot be told for sure, or works with a caveat) or
//! `✗` (will fail), with what is wrong and the fix. Exit 0 when no check failed, 1
//! otherwise. A configuration that does not load is not a check line: it is the one-line
//! `config error` every subcommand prints, exit 2, as `check-config` does (nothing else
//! can be checked without it; with `--json`, stdout still gets a one-item array).
//!
//! Reads, never writes, except a probe file in `data_dir` (created and removed) and the
//! queue's own recovery when it opens a stopped daemon's database (what the daemon's
//! next start would do). Sends the panel one `GET` per node, and the core only reads
//! plus one `RemoveUser` of an email no one has, on a tag no inbound has (which tells a
//! HandlerService that answers from one that is not there, and cannot change anything).
//!
//! - `local.rs`: the config, `data_dir`, the queue, the HTTP listener's address, the
//!   relays' provider files.
//! - `panel.rs`: the panel, its key, each node, each answer's shape.
//! - `core.rs`: the core's API, flavour, services, inbounds, traffic counters, and what
//!   cutting connections needs (the access log, `CAP_NET_ADMIN`).
//!
//! The checks read the peers and the config; nothing below `cli` imports them.

mod core;
mod local;
mod panel;

use std::process::ExitCode;

use serde::Serialize;

use crate::config::Config;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Ok,
    /// Cannot be told for sure, or works with a caveat: does not fail the run.
    Warn,
    Fail,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
        }
    }
}

/// One line of the report (one item of `--json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    /// What was checked: `panel key`, `node 1 inbound`, ….
    pub check: String,
    pub status: Status,
    /// What was found. Never a secret: URLs are masked, keys and tokens never shown.
    pub detail: String,
    /// What to do about it (`null` when nothing).
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `✓ check: detail`, `✗ check: detail — fix: …`.
    fn line(&self) -> String {
        match &self.fix {
            Some(fix) => format!(
                "{} {}: {} — fix: {fix}",
                self.status.mark(),
                self.check,
                self.detail
            ),
            None => format!("{} {}: {}", self.status.mark(), self.check, self.detail),
        }
    }
}

/// Runs every check against `config`, in the order an operator fixes things: the
/// agent's own files and ports, the panel, the core, the relays.
pub(crate) async fn run(config: &Config) -> Vec<Check> {
    let mut out = local::config(config);
    out.push(local::data_dir(config));
    out.push(local::queue(config).await);
    out.push(local::listener(config).await);
    out.extend(panel::checks(config).await);
    out.extend(core::checks(config).await);
    out.extend(local::providers(config));
    out
}

/// `connector doctor`: `config` is what the command line loaded (or its error).
pub(crate) fn main(config: Result<Config, crate::config::ConfigError>, json: bool) -> ExitCode {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            crate::say!("connector: config error: {e}");
            if json {
                let item = Check::fail(
                    "config",
                    e.to_string(),
                    "fix the key named (connector check-config shows the effective values)",
                );
                print(&(serde_json::to_string_pretty(&[item]).unwrap_or_default() + "\n"));
            }
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            crate::say!("connector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checks = runtime.block_on(run(&config));
    if json {
        // A list of plain strings and enums: serialising it cannot fail.
        print(&(serde_json::to_string_pretty(&checks).unwrap_or_default() + "\n"));
    } else {
        let mut text = String::new();
        for c in &checks {
            text.push_str(&c.line());
            text.push('\n');
        }
        let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
        let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
        text.push_str(&match (failed, warned) {
            (0, 0) => format!("all {} checks passed\n", checks.len()),
            (0, w) => format!("no check failed ({w} to look at)\n"),
            (f, _) => format!("{f} of {} checks failed\n", checks.len()),
        });
        print(&text);
    }
    if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// To stdout; a closed stdout (`doctor | head`) is not an error.
fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
}
