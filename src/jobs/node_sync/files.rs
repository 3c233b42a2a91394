//! The output files of the Go connector: `{output_dir}/node-{id}/allowed-uuids.txt`
//! (sorted, one per line) and `allowed-uuids.json`, each replaced atomically (temp file
//! in the same directory, fsync, rename, fsync the directory), so a reader — the
//! operator's hook, a config generator — sees the old file or the new one, never half.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::users::Users;
use crate::queue::{Millis, rfc3339};

/// The two files of one node.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub dir: PathBuf,
    pub txt: PathBuf,
    pub json: PathBuf,
}

impl NodeFiles {
    pub fn new(output_dir: &Path, node_id: u64) -> Self {
        let dir = output_dir.join(format!("node-{node_id}"));
        NodeFiles {
            txt: dir.join("allowed-uuids.txt"),
            json: dir.join("allowed-uuids.json"),
            dir,
        }
    }

    /// Writes both files. On error, each file is either the old one or the new one.
    ///
    /// Streamed into the files, not built in memory first: at 100,000 users the two
    /// texts are 8 MB, and a `String` per user was another 6 MB (issue 15).
    pub fn write(&self, node_id: u64, users: &Users, fetched_at: Millis) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        /// The UUIDs as a JSON list of strings (lowercase, hyphenated).
        struct Uuids<'a>(&'a [uuid::Uuid]);
        impl Serialize for Uuids<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|u| u.hyphenated()))
            }
        }
        #[derive(Serialize)]
        struct Json<'a> {
            node_id: u64,
            count: usize,
            uuids: Uuids<'a>,
            fetched_at: String,
        }
        let json = Json {
            node_id,
            count: users.len(),
            uuids: Uuids(users.uuids()),
            fetched_at: rfc3339(fetched_at),
        };
        replace(&self.json, |w| {
            serde_json::to_writer(w, &json).map_err(std::io::Error::other)
        })?;
        replace(&self.txt, |w| {
            let mut buf = uuid::Uuid::encode_buffer();
            for u in users.uuids() {
                w.write_all(u.hyphenated().encode_lower(&mut buf).as_bytes())?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        sync_dir(&self.dir)
    }
}

/// Replaces `path` with what `fill` writes, atomically.
fn replace(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".allowed-uuids.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    {
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, tmp.as_file());
        fill(&mut w)?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Readable by the hook and the core, like a file the Go connector wrote.
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
    }
    Ok(())
}
