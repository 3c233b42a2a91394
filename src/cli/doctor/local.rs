//! The checks of the agent's own machine: the config as loaded, `data_dir`, the queue,
//! the HTTP listener's address, the relays' provider files.
//!
//! Reads: the config, `data_dir` (writes and removes one probe file there), the admin
//! socket (`Hello`), the queue database when no daemon holds it, `/healthz` of whatever
//! holds the listener's address, `webhook.providers_dir`.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Check;
use crate::cli::queuectl::backend::{self, Answer};
use crate::config::{self, Config, ProcessEnv, ShownUrl};
use crate::queue::{self, Queue, SystemClock};

/// Below this much free space under `data_dir`, the queue soon refuses new jobs.
const LOW_SPACE: u64 = 64 * 1024 * 1024;
/// How long whatever holds the listener's address has to answer `/healthz`.
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(3);

/// The config as loaded, secrets masked, and its warnings (`!` each).
pub(super) fn config(cfg: &Config) -> Vec<Check> {
    let source = match &cfg.file {
        Some(f) => format!("{} and the environment", f.display()),
        None => "the environment only (no config file)".into(),
    };
    let key = match (
        &cfg.panel.internal_api_key,
        &cfg.panel.internal_api_key_file,
    ) {
        (Some(k), Some(f)) => format!("{k} (from {})", f.display()),
        // `Secret` displays as `***`.
        (Some(k), None) => k.to_string(),
        (None, _) => "not set".into(),
    };
    let nodes: Vec<String> = cfg.nodes.iter().map(|n| n.id.to_string()).collect();
    let mut out = vec![Check::ok(
        "config",
        format!(
            "valid ({source}): panel {} key {key}, nodes [{}], apply {}",
            ShownUrl(&cfg.panel.base_url),
            nodes.join(", "),
            cfg.apply.mode.as_str()
        ),
    )];
    for w in &cfg.warnings {
        // The warning says what to do itself.
        out.push(Check {
            fix: None,
            ..Check::warn("config warning", w.clone(), "")
        });
    }
    if cfg.nodes.is_empty() {
        out.push(Check::warn(
            "config nodes",
            "no node is configured: nothing is synced",
            "add [[nodes]] entries, or set NODE_IDS=1,2",
        ));
    }
    out
}

/// `data_dir`: a directory this process can write in, with free space. A directory
/// that does not exist yet is fine when it can be created (the daemon creates it).
pub(super) fn data_dir(cfg: &Config) -> Check {
    const NAME: &str = "data_dir";
    let dir = &cfg.data_dir;
    let fix = format!(
        "set data_dir (DATA_DIR) to a directory on a writable disk that the user connector runs as can write, or make {} so",
        dir.display()
    );
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Check::fail(NAME, format!("{} is not a directory", dir.display()), fix);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Where it would be created: the nearest ancestor must take a new directory.
            return match config::prepare_data_dir(cfg, &ProcessEnv, false) {
                Ok(()) => Check::ok(
                    NAME,
                    format!(
                        "{} does not exist yet; the daemon creates it (its parent is writable)",
                        dir.display()
                    ),
                ),
                Err(e) => Check::fail(NAME, e.reason, fix),
            };
        }
        Err(e) => {
            return Check::fail(NAME, format!("cannot read {}: {e}", dir.display()), fix);
        }
    }
    // A real write, not access(2): as root, access() says yes to anything on a
    // writable file system, and only a write tells what the disk will do.
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let wrote = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(b"connector doctor\n")
                .and_then(|()| f.sync_all())
        });
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = wrote {
        return Check::fail(NAME, format!("cannot write in {}: {e}", dir.display()), fix);
    }
    match free_bytes(dir) {
        Ok(free) if free < LOW_SPACE => Check::fail(
            NAME,
            format!(
                "{} is writable but its disk has only {} free: the queue refuses new jobs when it fills",
                dir.display(),
                mib(free)
            ),
            "free space on that disk, or move data_dir (DATA_DIR) to a disk with room",
        ),
        Ok(free) => Check::ok(
            NAME,
            format!("{} is writable, {} free", dir.display(), mib(free)),
        ),
        Err(e) => Check::warn(
            NAME,
            format!(
                "{} is writable; its free space cannot be read: {e}",
                dir.display()
            ),
            "check the disk's free space by hand (df)",
        ),
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 10 * 1024 * 1024 * 1024 {
        format!("{} GiB", bytes / 1024 / 1024 / 1024)
    } else {
        format!("{} MiB", bytes / 1024 / 1024)
    }
}

/// Bytes an unprivileged user may still write on `dir`'s file system (statvfs).
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out pointer, both
    // outliving the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The queue: the running daemon answers on its admin socket, or the database opens.
/// sled takes a lock on open, so while a daemon runs only the socket can tell.
pub(super) async fn queue(cfg: &Config) -> Check {
    const NAME: &str = "queue";
    // Under a data_dir that is not a directory there is nothing to open: the data_dir
    // line says what is wrong, once.
    if std::fs::metadata(&cfg.data_dir).is_ok_and(|m| !m.is_dir()) {
        return Check::warn(
            NAME,
            "not checked: data_dir is not a directory",
            "fix data_dir first (see its line)",
        );
    }
    let socket = cfg.admin_socket();
    let not_live = match backend::hello(&socket).await {
        Answer::Daemon(h) => {
            return Check::ok(
                NAME,
                format!(
                    "a running daemon (pid {}, connector {}) holds {} and answers on its admin socket {}",
                    h.pid,
                    h.version,
                    h.queue_path,
                    socket.display()
                ),
            );
        }
        Answer::Absent => "no daemon runs".to_string(),
        Answer::NotAnswering(why) => format!(
            "something at the admin socket {} does not answer: {why}",
            socket.display()
        ),
    };
    let path = cfg.queue_path();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Check::fail(
                NAME,
                format!("{} is not a directory", path.display()),
                "move that file away: the queue database is a directory sled creates",
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::ok(
                NAME,
                format!(
                    "no queue database yet at {} ({not_live}); the daemon creates it",
                    path.display()
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read {}: {e}", path.display()),
                "give the user connector runs as access to data_dir",
            );
        }
    }
    // sled has no read-only open. Opening runs the queue's recovery (jobs a stopped
    // daemon left running are pending again), which the daemon's next start does too;
    // nothing else is written, and the database is closed again at once.
    let settings = cfg.queue.clone();
    let opened = tokio::task::spawn_blocking(move || {
        Queue::open_with(&path, settings, Arc::new(SystemClock), false)
            .map(|(q, _)| q.path().display().to_string())
            .map_err(|e| (path, e))
    })
    .await;
    match opened {
        Ok(Ok(path)) => Check::ok(NAME, format!("{path} opens ({not_live})")),
        Ok(Err((path, queue::Error::Locked { .. }))) => Check::fail(
            NAME,
            format!(
                "{} is locked by another process, and {not_live}",
                path.display()
            ),
            format!(
                "if a connector daemon runs with another admin socket, run doctor with its config; if it hangs, restart it (its socket is {})",
                socket.display()
            ),
        ),
        Ok(Err((_, e @ queue::Error::Damaged { .. }))) => Check::fail(
            NAME,
            e.to_string(),
            "queuectl salvage --to NEWDIR copies what passes its checksums; then point data_dir at it",
        ),
        Ok(Err((path, e))) => Check::fail(
            NAME,
            format!("{} does not open: {e}", path.display()),
            "see the error; queuectl fsck tells more",
        ),
        Err(e) => Check::fail(NAME, format!("the open did not finish: {e}"), "retry"),
    }
}

/// `http.listen`: free to bind, or held by our own daemon (it answers `/healthz` with
/// our JSON). Anything else there would make the daemon fail at start.
pub(super) async fn listener(cfg: &Config) -> Check {
    const NAME: &str = "http listener";
    let Some(addr) = cfg.http.listen else {
        return Check::ok(NAME, "off (http.listen = \"\")");
    };
    let fix = "stop what holds it, or set http.listen to a free address (\"\" for no listener)";
    let bound = std::net::TcpListener::bind(addr);
    match bound {
        Ok(l) => {
            drop(l);
            return Check::ok(NAME, format!("{addr} is free"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
        Err(e) => {
            return Check::fail(NAME, format!("cannot listen on {addr}: {e}"), fix);
        }
    }
    match our_daemon_at(addr).await {
        Ok(status) if status == "ok" => Check::ok(
            NAME,
            format!("{addr} is held by a running connector daemon (/healthz: ok)"),
        ),
        Ok(status) => Check::warn(
            NAME,
            format!("{addr} is held by a running connector daemon whose /healthz says {status}"),
            format!("curl http://{addr}/healthz names the problems"),
        ),
        Err(why) => Check::fail(
            NAME,
            format!("{addr} is held by another process ({why})"),
            fix,
        ),
    }
}

/// Whether `addr` answers `GET /healthz` as a connector daemon does
/// (`{"status","queue","workers","problems"}`): its `status`, or why it is not one.
async fn our_daemon_at(addr: std::net::SocketAddr) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(HEALTHZ_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let resp = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .map_err(|e| {
            format!(
                "it does not answer GET /healthz over HTTP: {}",
                e.without_url()
            )
        })?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("its /healthz answer broke off: {}", e.without_url()))?;
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("its /healthz answered {status} without connector's JSON"))?;
    let shape = ["status", "queue", "workers", "problems"]
        .iter()
        .all(|k| body.get(k).is_some());
    match body.get("status").and_then(|s| s.as_str()) {
        Some(s) if shape => Ok(s.to_string()),
        _ => Err(format!(
            "its /healthz answered {status} without connector's JSON"
        )),
    }
}

/// Each provider file: valid, its callback URL `https://`. One `✗` per bad file.
pub(super) fn providers(cfg: &Config) -> Vec<Check> {
    let dir = &cfg.webhook.providers_dir;
    let loaded = crate::peers::relays::load_dir(dir, None);
    if loaded.missing_dir {
        return vec![Check::ok(
            "providers",
            format!(
                "{} does not exist: no relays, no webhook deliveries",
                dir.display()
            ),
        )];
    }
    let mut out = Vec::new();
    for e in &loaded.errors {
        let name = e
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| e.path.display().to_string());
        let fix = if e.field == "webhook.callback_url" {
            "make callback_url an https:// URL (callbacks are only sent over TLS); the other providers still load".to_string()
        } else {
            format!(
                "fix {} in {}, or remove the file; the other providers still load",
                e.field,
                e.path.display()
            )
        };
        out.push(Check::fail(format!("provider {name}"), e.to_string(), fix));
    }
    let mut ids: Vec<&str> = loaded.by_id.keys().map(String::as_str).collect();
    ids.sort_unstable();
    let mut detail = format!(
        "{} loaded from {}{}",
        ids.len(),
        dir.display(),
        if ids.is_empty() {
            String::new()
        } else {
            format!(" ({})", ids.join(", "))
        }
    );
    if !loaded.without_webhook.is_empty() {
        detail.push_str(&format!(
            "; without a webhook: {}",
            loaded.without_webhook.join(", ")
        ));
    }
    out.push(Check::ok("providers", detail));
    out
}
