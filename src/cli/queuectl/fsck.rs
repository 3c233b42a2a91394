//! `queuectl fsck [--repair]`: checks every job record, index entry (pending, running,
//! finished), idempotency entry and state record of the queue, and reports each problem
//! by key with what it means and what `--repair` does about it (the table in
//! `src/queue/fsck.rs`).
//!
//! Without `--repair`: read-only. With it: rebuilds index and idempotency entries from
//! the job records, and moves unreadable records (and index entries whose job is
//! missing) to the quarantine, byte for byte; nothing is deleted. Live, it runs inside
//! the daemon under the queue's write lock: workers wait for it, nothing is lost.
//!
//! Exit 0 when the queue is clean or everything found was repaired; 1 when problems
//! were found and not repaired (or cannot be).

use serde::Serialize;

use super::{Align, Backend, Out, Table, clip, count};
use crate::admin::pb;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Fix what is found: rebuild indexes, move unreadable records to quarantine.
    #[arg(long)]
    repair: bool,
}

#[derive(Serialize)]
struct FsckJson<'a> {
    checked: Checked,
    problems: Vec<ProblemJson<'a>>,
    repaired: bool,
    /// True when nothing is left to fix (the exit code is 0).
    clean: bool,
}

#[derive(Serialize)]
struct Checked {
    jobs: u64,
    index_entries: u64,
    idempotency_entries: u64,
    state_records: u64,
    quarantined: u64,
}

#[derive(Serialize)]
struct ProblemJson<'a> {
    key: &'a str,
    problem: &'a str,
    fix: &'a str,
    repairable: bool,
}

/// Returns whether the queue is clean now (no problem left unrepaired).
pub(super) async fn run(args: Args, backend: &Backend, out: &mut Out<'_>) -> anyhow::Result<bool> {
    let r = backend.fsck(args.repair).await?;
    let left = r
        .problems
        .iter()
        .filter(|p| !r.repaired || !p.repairable)
        .count();
    if out.json {
        out.json(&FsckJson {
            checked: Checked {
                jobs: r.jobs,
                index_entries: r.index_entries,
                idempotency_entries: r.idempotency_entries,
                state_records: r.state_records,
                quarantined: r.quarantined,
            },
            problems: r.problems.iter().map(problem_json).collect(),
            repaired: r.repaired,
            clean: left == 0,
        })?;
        return Ok(left == 0);
    }
    out.line(format!(
        "checked: {} job records, {} index entries, {} idempotency entries, {} state records; {} in quarantine",
        r.jobs, r.index_entries, r.idempotency_entries, r.state_records, r.quarantined
    ))?;
    if r.problems.is_empty() {
        out.line("no problems found")?;
        return Ok(true);
    }
    out.line("")?;
    let mut t = Table::new(&[
        ("KEY", Align::Left),
        ("PROBLEM", Align::Left),
        (if r.repaired { "DONE" } else { "REPAIR" }, Align::Left),
    ]);
    for p in &r.problems {
        t.row(vec![clip(&p.key, 60), p.problem.clone(), p.fix.clone()]);
    }
    out.table(&t)?;
    out.line("")?;
    let found = count(r.problems.len() as u64, "problem");
    if r.repaired {
        let fixed = r.problems.iter().filter(|p| p.repairable).count() as u64;
        out.line(format!(
            "{found} found; {fixed} repaired (nothing was deleted: unreadable records are in `queuectl list --quarantined`)"
        ))?;
        if left > 0 {
            out.line(format!(
                "{} left as they are (see REPAIR/DONE)",
                count(left as u64, "problem")
            ))?;
        }
    } else {
        out.line(format!(
            "{found} found; run `queuectl fsck --repair` to fix them (nothing is deleted)"
        ))?;
    }
    Ok(left == 0)
}

fn problem_json(p: &pb::FsckProblem) -> ProblemJson<'_> {
    ProblemJson {
        key: &p.key,
        problem: &p.problem,
        fix: &p.fix,
        repairable: p.repairable,
    }
}
