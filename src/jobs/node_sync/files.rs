//! The output files of the Go connector: `{output_dir}/node-{id}/allowed-uuids.txt`
//! (sorted, one per line) and `allowed-uuids.json`, each replaced atomically (temp file
//! in the same directory, fsync, rename, fsync the directory), so a reader — the
//! operator's hook, a config generator — sees the old file or the new one, never half.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::userlist::User;
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
    pub fn write(&self, node_id: u64, users: &[User], fetched_at: Millis) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut txt = String::with_capacity(users.len() * 37);
        for u in users {
            txt.push_str(
                u.uuid
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            );
            txt.push('\n');
        }
        #[derive(Serialize)]
        struct Json<'a> {
            node_id: u64,
            count: usize,
            uuids: Vec<&'a str>,
            fetched_at: String,
        }
        let strings: Vec<String> = users.iter().map(|u| u.uuid.to_string()).collect();
        let json = serde_json::to_vec(&Json {
            node_id,
            count: users.len(),
            uuids: strings.iter().map(String::as_str).collect(),
            fetched_at: rfc3339(fetched_at),
        })
        .map_err(std::io::Error::other)?;
        replace(&self.json, &json)?;
        replace(&self.txt, txt.as_bytes())?;
        sync_dir(&self.dir)
    }
}

/// Replaces `path` with `bytes` atomically.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".allowed-uuids.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
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
