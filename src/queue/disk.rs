//! Guards around sled's own files, for two failures sled 0.34.7 does not handle:
//!
//! - **A torn snapshot.** sled writes `snap.<lsn>.generating` and renames it when
//!   complete. A kill in between leaves a partial file that sled then reads and refuses
//!   forever ("corrupted data"; spacejam/sled#1527). A `.generating` file is never a
//!   finished snapshot, so before opening we move it aside — to a name that does not
//!   start with `snap.`, which sled would still read — and keep it.
//! - **Silent loss in the log.** sled reads damage to log records that no snapshot
//!   covers yet as the torn tail of a crash and cuts the log there: acknowledged jobs
//!   would vanish without an error. So the flush thread keeps a high-water mark of
//!   issued job ids in `connector.hwm` beside sled's files (at most once a second, and
//!   at close), and `open` refuses a database that recovered fewer ids than the mark
//!   says were acknowledged, unless an operator accepts the loss.

use std::io::Write;
use std::path::{Path, PathBuf};

const HWM_FILE: &str = "connector.hwm";
const TORN_PREFIX: &str = "torn-";

/// Moves unfinished snapshot files aside; returns their new paths.
pub(crate) fn set_aside_torn_snapshots(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut moved = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(moved),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let to = dir.join(format!("{TORN_PREFIX}{name}"));
            std::fs::rename(entry.path(), &to)?;
            moved.push(to);
        }
    }
    Ok(moved)
}

/// The high-water mark: every job id below it was acknowledged at some point.
pub(crate) fn read_hwm(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(HWM_FILE)).ok()?;
    text.trim().strip_prefix("next_id=")?.parse().ok()
}

/// Replaces the high-water mark atomically.
pub(crate) fn write_hwm(dir: &Path, next_id: u64) -> std::io::Result<()> {
    let path = dir.join(HWM_FILE);
    let tmp = dir.join(format!("{HWM_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "next_id={next_id}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}
