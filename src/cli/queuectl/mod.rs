//! `queuectl`: see and repair the queue, while the daemon runs or while it is stopped.
//!
//! # Layout
//!
//! This file parses the command line, loads the config, finds the queue
//! (`backend.rs`), dispatches to one file per subcommand, and turns failures into exit
//! codes. It also holds the output helpers every subcommand shares: [`Out`] (human text
//! or `--json`) and [`Table`]. Each subcommand builds a request, gets the reply from the
//! [`Backend`] (the daemon or the database: the same messages either way) and renders
//! it; so a command prints the same thing live and offline.
//!
//! | file | command | touches |
//! |---|---|---|
//! | `stats.rs` | `stats` | reads counts and the quarantine |
//! | `list.rs` | `list` | reads jobs (or the quarantine) |
//! | `show.rs` | `show ID` | reads one job |
//! | `retry.rs` | `retry ID` / `retry --dead` | makes dead or scheduled jobs ready |
//! | `cancel.rs` | `cancel ID` | makes a pending or running job dead |
//! | `purge.rs` | `purge --dead/--done` | deletes finished jobs |
//! | `export.rs` | `export` | reads every job, JSON lines to stdout |
//! | `held.rs` | `held` | reads node syncs held by the removal guard |
//! | `confirm.rs` | `confirm NODE` | confirms one held sync |
//! | `accept_loss.rs` | `accept-loss` | opens a queue that lost writes; records the loss |
//! | `bans.rs` | `bans` | reads recent removals and whether they bit |
//! | `traffic.rs` | `traffic` | reads traffic reports: pending and delivered bytes per node |
//! | `tail.rs` | `tail` | follows job events (daemon only) |
//! | `fsck.rs` | `fsck [--repair]` | checks every record and index; repairs them |
//! | `salvage.rs` | `salvage --to DIR` | copies what still passes its checksum out of a damaged database (offline only) |
//! | `backend.rs` | | finds the daemon or the database; one method per command |
//! | `relays.rs` | `relays` | reads webhook stats per relay and ref, and the provider files |
//! | `workers.rs` | `workers`, `pause KIND`, `resume KIND` | the daemon's worker pools (daemon only; in memory, nothing on disk) |
//!
//! Adding a command: `src/admin/mod.rs` says the five steps (proto, operation, server,
//! backend, a file here).
//!
//! # Finding the queue
//!
//! The admin socket is `--socket`, else `[admin] socket`, else `{data_dir}/admin.sock`
//! (`--data-dir` wins over the config and `DATA_DIR`). A daemon answering there is used;
//! otherwise `queuectl` opens `{data_dir}/queue` itself. One line on stderr says which:
//! `queuectl: daemon at /var/lib/connector/admin.sock` or
//! `queuectl: database at /var/lib/connector/queue (no daemon running)`.
//! Offline, it never creates a queue (a typo in `--data-dir` must not look like an
//! empty queue), and opening recovers jobs a stopped daemon left running, exactly as
//! the daemon's next start would (logged as a warning).
//!
//! `tail`, `workers`, `pause` and `resume` need the daemon: events and worker pools
//! exist only in a running process. `salvage` never uses the daemon: it refuses while
//! one answers, and reads the database files itself. `accept-loss` is
//! offline by nature: only a database that refuses to open needs it, and then no daemon
//! can be running; with a daemon answering it lists the losses already accepted.
//!
//! # Exit codes
//!
//! 0 success (also when stdout is closed early: `queuectl export | head -1`), 1 runtime
//! failure (no queue, job not found, wrong state, storage error, a socket we may not
//! connect to; `fsck`: problems found and not repaired), 2 configuration or usage
//! error, 3 the database is held by another process but no daemon answers on the
//! socket (a daemon with another `[admin] socket`, or a hung one), 4 the database is
//! damaged so that it cannot be opened (the message says to run `queuectl salvage`).
//! See `src/cli/mod.rs`.

mod accept_loss;
pub(crate) mod backend;
mod bans;
mod cancel;
mod confirm;
mod export;
mod fsck;
mod held;
mod list;
mod purge;
mod relays;
mod retry;
mod salvage;
mod show;
mod stats;
mod tail;
mod traffic;
mod workers;

use std::fmt::Display;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::queue::Millis;
use crate::telemetry::{self, LogFormat};

pub(crate) use backend::Backend;
use backend::Need;

/// Exit code when another process holds the database and no daemon answers on the
/// socket (`src/cli/mod.rs`).
pub const EXIT_LOCKED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "queuectl",
    version,
    about = "See and repair the connector's job queue",
    long_about = "See and repair the connector's job queue.\n\n\
        Talks to the running daemon over its admin socket ({data_dir}/admin.sock, or \
        [admin] socket, or --socket); when no daemon answers there, opens the queue \
        database at {data_dir}/queue itself. One line on stderr says which.",
    after_help = "Exit codes: 0 success, 1 failure (fsck: problems found and not repaired), \
        2 configuration or usage error, 3 the database is held by another process but no \
        daemon answers on the admin socket, 4 the database is damaged (run `queuectl salvage`)."
)]
struct Args {
    /// Configuration file (TOML), as for `connector`; else CONNECTOR_CONFIG. Only
    /// `data_dir` and `[queue]` are used.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory holding the queue (`DIR/queue`); wins over the config and DATA_DIR.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The daemon's admin socket; default `[admin] socket`, else `{data_dir}/admin.sock`.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON for scripts instead of tables for people.
    #[arg(long, global = true)]
    json: bool,
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Jobs by kind and state, and the quarantined (unreadable) records.
    Stats(stats::Args),
    /// Jobs in id order, filtered and paged (or, with --quarantined, the quarantine).
    ///
    /// AT is when the job is due (scheduled, ready), when its lease ends (running), or
    /// when it finished (done, dead). Pages: --limit N (default 100, 0 for all), then
    /// --after the last id shown.
    List(list::Args),
    /// One job, with its attempt history.
    Show(show::Args),
    /// Make a dead (or scheduled) job ready now; or every dead job, with --dead.
    Retry(retry::Args),
    /// Cancel a pending or running job: it goes dead (reason `cancelled`).
    Cancel(cancel::Args),
    /// Delete finished jobs: dead or done, optionally only the old ones.
    Purge(purge::Args),
    /// Every job as JSON lines (one job view per line) on stdout.
    Export(export::Args),
    /// Node syncs held by the removal guard (sync.max_removal_ratio).
    Held(held::Args),
    /// Confirm a held sync of NODE: the next sync applies it.
    Confirm(confirm::Args),
    /// Open a queue that lost acknowledged writes (sled log damage) and record the loss.
    AcceptLoss(accept_loss::Args),
    /// Users removed from a core in the last 15 minutes, and whether each ban bit.
    Bans(bans::Args),
    /// Traffic reports per node: pending and delivered, with their bytes.
    Traffic(traffic::Args),
    /// Follow job events as they happen (needs the running daemon); Ctrl-C ends it.
    Tail(tail::Args),
    /// Check every record, index entry, idempotency entry and state record; with
    /// --repair, rebuild indexes and move unreadable records to quarantine (nothing is
    /// deleted). Exit 1 when problems were found and not repaired.
    Fsck(fsck::Args),
    /// Copy every record that still passes its checksum out of a damaged database
    /// into a new database at DIR, and report what was kept and lost (counts by kind
    /// and state, missing ids). Reads the damaged database and leaves it as it is;
    /// only while the daemon is stopped.
    Salvage(salvage::Args),
    /// Webhook callbacks per relay and ref: events by status; delivered, pending, dead.
    Relays(relays::Args),
    /// The daemon's worker pools: running, waiting, paused, stopped or stuck (needs the
    /// running daemon). The same conditions make /healthz answer 503.
    Workers(workers::Args),
    /// Pause one kind's workers: they lease nothing until resumed (attempts in flight
    /// finish; jobs keep queueing). In memory only: a restart runs them again.
    /// /healthz answers 503 while paused.
    Pause(workers::KindArgs),
    /// Resume one kind's paused workers.
    Resume(workers::KindArgs),
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let mut config = match super::load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queuectl: config error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("queuectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args.command, config, args.socket, args.json));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Locked { path, socket, why }) => {
            eprintln!(
                "queuectl: the queue at {} is held by another process, but {why} (admin socket {}): is the daemon's [admin] socket elsewhere (pass --socket), or is it hung?",
                path.display(),
                socket.display()
            );
            ExitCode::from(EXIT_LOCKED)
        }
        Err(Failure::Busy(why)) => {
            eprintln!("queuectl: {why}");
            ExitCode::from(EXIT_LOCKED)
        }
        Err(Failure::Damaged(e)) => {
            eprintln!("queuectl: {e}");
            ExitCode::from(super::EXIT_DAMAGED)
        }
        Err(Failure::NoQueue(path)) => {
            eprintln!(
                "queuectl: no queue at {} (wrong --data-dir?)",
                path.display()
            );
            ExitCode::FAILURE
        }
        // Already reported on stdout (fsck's problems).
        Err(Failure::Reported) => ExitCode::FAILURE,
        // The reader went away (`| head`): what it wanted, it got.
        Err(Failure::Other(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(Failure::Other(e)) => {
            eprintln!("queuectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command failed; decides the exit code.
pub(crate) enum Failure {
    /// Another process holds the database, and no daemon answers on the socket.
    Locked {
        path: PathBuf,
        socket: PathBuf,
        /// Why the socket was not used.
        why: String,
    },
    /// Another process holds the database (exit 3), said in full.
    Busy(String),
    /// The database cannot be opened: damaged (exit 4).
    Damaged(crate::queue::Error),
    /// Nothing at the queue path.
    NoQueue(PathBuf),
    /// The command printed its result and fails (exit 1) without another message.
    Reported,
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

async fn run(
    command: Command,
    config: crate::config::Config,
    socket: Option<PathBuf>,
    json: bool,
) -> Result<(), Failure> {
    if let Command::Salvage(a) = command {
        backend::refuse_live(&config, socket).await?;
        let stdout = io::stdout();
        let mut w = io::BufWriter::new(stdout.lock());
        let mut out = Out { json, w: &mut w };
        let result = salvage::run(a, &config, &mut out);
        w.flush()?;
        return result;
    }
    let need = match command {
        Command::Tail(_) => {
            Need::Daemon("tail needs a running daemon (job events happen only there)")
        }
        Command::Workers(_) | Command::Pause(_) | Command::Resume(_) => {
            Need::Daemon("worker pools exist only in a running daemon")
        }
        Command::AcceptLoss(_) => Need::AcceptLoss,
        _ => Need::Either,
    };
    let backend = backend::find(config, socket, need).await?;
    let stdout = io::stdout();
    let mut w = io::BufWriter::new(stdout.lock());
    let mut out = Out { json, w: &mut w };
    let b = &backend;
    let mut clean = true;
    match command {
        Command::Stats(a) => stats::run(a, b, &mut out).await?,
        Command::List(a) => list::run(a, b, &mut out).await?,
        Command::Show(a) => show::run(a, b, &mut out).await?,
        Command::Retry(a) => retry::run(a, b, &mut out).await?,
        Command::Cancel(a) => cancel::run(a, b, &mut out).await?,
        Command::Purge(a) => purge::run(a, b, &mut out).await?,
        Command::Export(a) => export::run(a, b, &mut out).await?,
        Command::Held(a) => held::run(a, b, &mut out).await?,
        Command::Confirm(a) => confirm::run(a, b, &mut out).await?,
        Command::AcceptLoss(a) => accept_loss::run(a, b, &mut out).await?,
        Command::Bans(a) => bans::run(a, b, &mut out).await?,
        Command::Tail(a) => tail::run(a, b, &mut out).await?,
        Command::Fsck(a) => clean = fsck::run(a, b, &mut out).await?,
        // Handled above, before any queue is opened.
        Command::Salvage(_) => {}
        Command::Traffic(a) => traffic::run(a, b, &mut out).await?,
        Command::Relays(a) => relays::run(a, b, &mut out).await?,
        Command::Workers(a) => workers::run(a, b, &mut out).await?,
        Command::Pause(a) => workers::pause(a, b, &mut out, true).await?,
        Command::Resume(a) => workers::pause(a, b, &mut out, false).await?,
    }
    w.flush()?;
    if clean {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// A job from a reply, for rendering.
pub(crate) fn job(j: crate::admin::pb::Job) -> anyhow::Result<crate::queue::Job> {
    j.try_into().map_err(|e: crate::admin::convert::WireError| {
        anyhow::anyhow!("the answer holds a job this queuectl cannot read: {e}")
    })
}

/// A job from a reply as `--json` and the tables show it, relative to `now`.
pub(crate) fn view(j: crate::admin::pb::Job, now: Millis) -> anyhow::Result<crate::queue::JobView> {
    Ok(crate::queue::JobView::new(&job(j)?, now))
}

// ---- output helpers ----

/// Where a subcommand writes its result: tables and sentences for people, or JSON.
pub(crate) struct Out<'a> {
    /// `--json` was given.
    pub json: bool,
    w: &'a mut dyn Write,
}

impl Out<'_> {
    /// One JSON document (pretty-printed; `jq -c` makes it one line).
    pub(crate) fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *self.w, value)?;
        writeln!(self.w)
    }

    /// One JSON value on one line (JSON lines).
    pub(crate) fn json_line<T: Serialize + ?Sized>(&mut self, value: &T) -> io::Result<()> {
        serde_json::to_writer(&mut *self.w, value)?;
        writeln!(self.w)
    }

    /// Pushes what was written to the reader now (`tail`: one event at a time).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    pub(crate) fn line(&mut self, text: impl Display) -> io::Result<()> {
        writeln!(self.w, "{text}")
    }

    pub(crate) fn table(&mut self, table: &Table) -> io::Result<()> {
        table.write(&mut *self.w)
    }

    pub(crate) fn table_indented(&mut self, table: &Table, indent: usize) -> io::Result<()> {
        table.write_indented(&mut *self.w, indent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// A plain aligned table: a header row, two spaces between columns, no trailing
/// blanks. Cells are made safe for a terminal (control characters escaped).
pub(crate) struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| printable(c)).collect());
    }

    /// Writes the table with each line prefixed by `indent` spaces.
    pub(crate) fn write_indented(&self, w: &mut dyn Write, indent: usize) -> io::Result<()> {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(widths.len()) {
                widths[i] = widths[i].max(width(cell));
            }
        }
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = " ".repeat(indent);
            let last = self.columns.len().saturating_sub(1);
            for (i, (_, align)) in self.columns.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                let pad = widths[i].saturating_sub(width(cell));
                match align {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                    Align::Left if i == last => line.push_str(cell),
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&" ".repeat(pad));
                    }
                }
                if i != last {
                    line.push_str("  ");
                }
            }
            writeln!(w, "{}", line.trim_end())?;
        }
        Ok(())
    }

    pub(crate) fn write(&self, w: &mut dyn Write) -> io::Result<()> {
        self.write_indented(w, 0)
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

/// Escapes control characters (a key or an error text could hold a newline or a
/// terminal escape sequence).
pub(crate) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` made printable and cut to `max` characters, with `…` when cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    let s = printable(s);
    if width(&s) <= max {
        return s;
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `1 job`, `3 jobs`.
pub(crate) fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// "in 5m" / "3h 2m ago" relative to `now`, to the second, for people.
pub(crate) fn relative(at: Millis, now: Millis) -> String {
    let secs = at.abs_diff(now) / 1000;
    let d = humantime::format_duration(std::time::Duration::from_secs(secs));
    match (secs, at > now) {
        (0, true) => "now".into(),
        (0, false) => "just now".into(),
        (_, true) => format!("in {d}"),
        (_, false) => format!("{d} ago"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_has_no_trailing_blanks() {
        let mut t = Table::new(&[("ID", Align::Right), ("KEY", Align::Left)]);
        t.row(vec!["7".into(), "a\nb".into()]);
        t.row(vec!["123".into(), "x".into()]);
        let mut buf = Vec::new();
        t.write(&mut buf).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            " ID  KEY\n  7  a\\nb\n123  x\n"
        );
    }

    #[test]
    fn clip_cuts_on_chars() {
        assert_eq!(clip("héllo wörld", 5), "héll…");
        assert_eq!(clip("short", 5), "short");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(61_000, 0), "in 1m 1s");
        assert_eq!(relative(0, 3_600_500), "1h ago");
        assert_eq!(relative(5, 5), "just now");
        assert_eq!(relative(900, 0), "now");
    }
}
