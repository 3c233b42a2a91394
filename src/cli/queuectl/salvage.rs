//! `queuectl salvage --to DIR`: copy every record that still passes its checksum out of
//! a damaged queue database into a fresh one at DIR, and say what was kept and lost
//! (`src/queue/salvage.rs` says how).
//!
//! Writes: only DIR (a new directory, or an empty one); the damaged database is read
//! and left as it is. Offline only: it refuses while a daemon answers on the admin
//! socket, and while any process holds the database (exit 3). Afterwards the operator
//! moves the damaged directory aside and DIR into its place (or points `data_dir` at
//! DIR's parent, when DIR is named `queue`).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::{Align, Failure, Out, Table, count};
use crate::config::Config;
use crate::queue::{self, SalvageError, SalvageReport, SystemClock};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Where to write the salvaged database: a new (or empty) directory.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    report: &'a SalvageReport,
    /// What to do next.
    next: String,
}

pub(super) fn run(args: Args, config: &Config, out: &mut Out<'_>) -> Result<(), Failure> {
    let from = config.queue_path();
    if !from.is_dir() {
        return Err(Failure::NoQueue(from));
    }
    let report = match queue::salvage(&from, &args.to, config.queue.clone(), Arc::new(SystemClock))
    {
        Ok(r) => r,
        Err(SalvageError::NotAQueue { path }) => return Err(Failure::NoQueue(path)),
        Err(e @ SalvageError::Locked { .. }) => return Err(Failure::Busy(e.to_string())),
        Err(e) => return Err(Failure::Other(e.into())),
    };
    let next = format!(
        "keep {from} for now; move it aside and {to} into its place (`mv {from} {from}.damaged && mv {to} {from}`), then start connector",
        from = from.display(),
        to = args.to.display()
    );
    if out.json {
        out.json(&Json {
            report: &report,
            next,
        })?;
    } else {
        render(&report, &next, out)?;
    }
    if report.fsck_clean {
        Ok(())
    } else {
        Err(Failure::Other(anyhow::anyhow!(
            "the salvaged database at {} does not check clean: run `queuectl --data-dir … fsck` on it and report this",
            args.to.display()
        )))
    }
}

fn render(r: &SalvageReport, next: &str, out: &mut Out<'_>) -> std::io::Result<()> {
    out.line(format!(
        "salvaged {} into {}",
        r.source.display(),
        r.destination.display()
    ))?;
    out.line(format!(
        "sled: {} ({} read); raw files: {} bytes scanned, {} damaged record copies skipped",
        r.sled,
        count(r.sled_keys, "key"),
        r.scanned_bytes,
        r.damaged_copies
    ))?;
    out.line("")?;
    out.line(format!(
        "kept: {} ({} only in the raw files), {}, {}",
        count(r.jobs_kept, "job"),
        r.jobs_from_raw_files,
        count(r.state_records, "state record"),
        count(r.quarantine_records, "quarantined record")
    ))?;
    if !r.jobs.is_empty() {
        let mut t = Table::new(&[
            ("KIND", Align::Left),
            ("STATE", Align::Left),
            ("JOBS", Align::Right),
        ]);
        for c in &r.jobs {
            t.row(vec![
                c.kind.to_string(),
                c.state.to_string(),
                c.count.to_string(),
            ]);
        }
        out.table_indented(&t, 2)?;
    }
    let mark = r
        .high_water_mark
        .map_or("no high-water mark".to_string(), |h| {
            format!("high-water mark: ids below {h} were acknowledged")
        });
    if r.lost == 0 {
        out.line(format!("lost: no job ids are missing ({mark})"))?;
    } else {
        let ranges: Vec<String> = r
            .lost_ids
            .iter()
            .take(20)
            .map(|g| {
                if g.from == g.to {
                    g.from.to_string()
                } else {
                    format!("{}-{}", g.from, g.to)
                }
            })
            .collect();
        let more = if r.lost_ids.len() > 20 { ", …" } else { "" };
        out.line(format!(
            "lost: {} ({mark}): ids {}{more} (a job purged or swept on purpose is missing the same way)",
            count(r.lost, "job"),
            ranges.join(", ")
        ))?;
    }
    for k in &r.unreadable {
        out.line(format!("  unreadable, not copied: {}", super::printable(k)))?;
    }
    for k in &r.unknown_keys {
        out.line(format!(
            "  unknown key, not copied: {}",
            super::printable(k)
        ))?;
    }
    out.line(format!(
        "the salvaged database checks clean: {}; ids continue at {}",
        if r.fsck_clean { "yes" } else { "NO" },
        r.next_id
    ))?;
    out.line(format!("next: {next}"))
}
