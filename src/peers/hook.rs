//! The operator's apply hook (`APPLY_CMD`): placeholders substituted word by word, run
//! without a shell in its own process group, with a timeout that kills the whole group,
//! and the tail of its output kept for the job's record.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept per stream (the end of it: that is where errors are).
pub(crate) const OUTPUT_LIMIT: usize = 2048;

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HookRun {
    /// The exit code; `None` when killed by a signal or the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl HookRun {
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// A one-paragraph summary for the job's record.
    pub(crate) fn describe(&self, timeout: Duration) -> String {
        let status = match (self.timed_out, self.code) {
            (true, _) => format!(
                "killed after the {} timeout",
                humantime::format_duration(timeout)
            ),
            (false, Some(c)) => format!("exit status {c}"),
            (false, None) => "killed by a signal".into(),
        };
        let mut s = format!("APPLY_CMD {status}");
        for (name, text) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            let t = text.trim();
            if !t.is_empty() {
                s.push_str(&format!("; {name}: {t}"));
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("APPLY_CMD is empty")]
    Empty,
    #[error("cannot start APPLY_CMD `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("APPLY_CMD: waiting for it failed: {0}")]
    Wait(#[source] std::io::Error),
}

/// The words of `argv` with `{node_id}`, `{uuids_file}` and `{uuids_json}` substituted.
pub(crate) fn substitute(
    argv: &[String],
    node_id: u64,
    uuids_file: &Path,
    uuids_json: &Path,
) -> Vec<String> {
    let id = node_id.to_string();
    let file = uuids_file.display().to_string();
    let json = uuids_json.display().to_string();
    argv.iter()
        .map(|w| {
            w.replace("{node_id}", &id)
                .replace("{uuids_file}", &file)
                .replace("{uuids_json}", &json)
        })
        .collect()
}

/// Runs `argv` (already substituted) with a timeout.
pub(crate) async fn run(argv: &[String], timeout: Duration) -> Result<HookRun, HookError> {
    let (program, args) = argv.split_first().ok_or(HookError::Empty)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    let out = tail(child.stdout.take());
    let err = tail(child.stderr.take());
    let waited = tokio::time::timeout(timeout, async {
        let (status, stdout, stderr) = tokio::join!(child.wait(), out, err);
        (status, stdout, stderr)
    })
    .await;
    match waited {
        Ok((status, stdout, stderr)) => {
            let status = status.map_err(HookError::Wait)?;
            Ok(HookRun {
                code: status.code(),
                timed_out: false,
                stdout,
                stderr,
            })
        }
        Err(_) => {
            kill_group(pid);
            let _ = child.kill().await;
            Ok(HookRun {
                code: None,
                timed_out: true,
                stdout: String::new(),
                stderr: String::new(),
            })
        }
    }
}

/// Kills the hook's whole process group, so a shell's children die with it.
fn kill_group(pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg only sends a signal; the group id is the child's own pid
        // (process_group(0) above), so it cannot reach unrelated processes.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// Reads a stream to its end, keeping the last `OUTPUT_LIMIT` bytes.
async fn tail(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let mut cut = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > OUTPUT_LIMIT {
                    kept.drain(..kept.len() - OUTPUT_LIMIT);
                    cut = true;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&kept).into_owned();
    if cut { format!("…{text}") } else { text }
}
