//! Connection tracking: which source addresses the agent's users are connected from, so
//! that a removal can cut their established connections ([`super::cut`]).
//!
//! A watcher of `xray_apply`: the daemon runs [`follow`] under its supervisor when
//! `xray.access_log` is set. It follows the core's access log from its end
//! ([`LogFollower`]) and puts each accepted connection of one of *our* users (an email
//! with some node's `email_template` shape: config-file users are never tracked) in the
//! [`Tracker`]: source address → email.
//!
//! Keyed by source, not by email: a source address:port is one connection at a time,
//! so when the kernel reuses a port for another user's connection, the newer line wins
//! and a cut of the first user cannot reach the second.
//!
//! Bounded: entries whose socket no longer exists are dropped against the kernel's own
//! table (a sock_diag dump of the nodes' inbound ports, [`crate::peers::kernel`]) every
//! [`PRUNE_EVERY`] and whenever the map reaches its limit; past the limit with every
//! entry alive, new lines are counted and dropped. Its size is the gauge
//! `connector_connections_tracked`; `connector_access_log_following` is 0 while the log
//! is missing or unreadable.
//!
//! The log is polled, not watched with inotify: a poll sees a rename and a new file, a
//! truncation, and a log that does not exist yet all the same way (stat the path,
//! compare with the open file), on every filesystem, with no watch to re-arm; and a cut
//! does not wait for it — it reads the log to its end itself first
//! ([`Tracking::catch_up`]).
//!
//! Reads: the access log, the kernel's socket table. Writes: nothing (memory only).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::peers::kernel;
use crate::peers::xray::access_log;
use crate::peers::xray::email::EmailShape;

/// How often the log is read when it has nothing new.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// How often entries are checked against the kernel's socket table.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Most entries kept (about 64 bytes each: ~32 MB at the limit).
pub const MAX_TRACKED: usize = 500_000;
/// A line longer than this is no access log line: skipped, not buffered.
const MAX_LINE: usize = 16 * 1024;

/// Source address → email of our users' accepted connections.
#[derive(Debug)]
pub struct Tracker {
    inner: Mutex<Inner>,
    shapes: Vec<EmailShape>,
    limit: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_source: HashMap<SocketAddr, Entry>,
    /// One copy of each email, shared by its entries.
    emails: HashSet<Arc<str>>,
    /// Bumped by each prune: entries newer than the prune's dump are kept.
    epoch: u64,
    /// Lines dropped because the map was full of live connections.
    dropped: u64,
    /// Accepted lines of users that are not ours (config users), left out.
    foreign: u64,
}

#[derive(Debug)]
struct Entry {
    email: Arc<str>,
    epoch: u64,
}

impl Tracker {
    /// A tracker of the users whose emails have one of `shapes`.
    pub fn new(shapes: Vec<EmailShape>, limit: usize) -> Tracker {
        Tracker {
            inner: Mutex::new(Inner::default()),
            shapes,
            limit: limit.max(1),
        }
    }

    /// The tracker of `config`'s nodes' users.
    pub fn for_config(config: &Config) -> Tracker {
        let template = config
            .xray
            .as_ref()
            .map_or("{uuid}", |x| x.email_template.as_str());
        let shapes = config
            .nodes
            .iter()
            .filter_map(|n| EmailShape::new(template, n.id))
            .collect();
        Tracker::new(shapes, MAX_TRACKED)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `email` (lower case) is one of ours.
    fn ours(&self, email: &str) -> bool {
        self.shapes.iter().any(|s| s.uuid_of(email).is_some())
    }

    /// Takes one access log line. Returns false when the map is full (the caller prunes
    /// and offers it again).
    pub fn line(&self, line: &str) -> bool {
        let Some(a) = access_log::parse(line) else {
            return true;
        };
        let email = a.email.to_lowercase();
        if !self.ours(&email) {
            // The source now carries a config user's connection: a stale entry of ours
            // for it must not make a cut reach that connection.
            let mut g = self.lock();
            g.foreign += 1;
            g.by_source.remove(&kernel::canonical(a.source));
            return true;
        }
        self.insert(a.source, &email)
    }

    /// Records that `source` is a connection of `email` (ours, lower case). False when
    /// the map is full and `source` is new.
    pub fn insert(&self, source: SocketAddr, email: &str) -> bool {
        let source = kernel::canonical(source);
        let mut g = self.lock();
        if g.by_source.len() >= self.limit && !g.by_source.contains_key(&source) {
            return false;
        }
        let email = match g.emails.get(email) {
            Some(e) => e.clone(),
            None => {
                let e: Arc<str> = Arc::from(email);
                g.emails.insert(e.clone());
                e
            }
        };
        let epoch = g.epoch;
        g.by_source.insert(source, Entry { email, epoch });
        true
    }

    /// Counts a line dropped because the map stayed full.
    fn drop_line(&self) {
        self.lock().dropped += 1;
        metrics::counter!("connector_connections_untracked_total").increment(1);
    }

    /// The tracked sources of each of `emails` (lower case).
    pub fn sources_of(&self, emails: &[String]) -> BTreeMap<String, Vec<SocketAddr>> {
        let g = self.lock();
        let mut out: BTreeMap<String, Vec<SocketAddr>> =
            emails.iter().map(|e| (e.clone(), Vec::new())).collect();
        for (src, e) in &g.by_source {
            if let Some(v) = out.get_mut(&*e.email) {
                v.push(*src);
            }
        }
        out
    }

    /// Forgets `sources` (their sockets were cut).
    pub fn forget(&self, sources: &[SocketAddr]) {
        let mut g = self.lock();
        for s in sources {
            g.by_source.remove(s);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_source.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lines dropped because the map was full of live connections.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Starts a prune: entries recorded from now on survive it.
    pub fn prune_begin(&self) -> u64 {
        let mut g = self.lock();
        let before = g.epoch;
        g.epoch += 1;
        before
    }

    /// Keeps the entries whose source is the remote end of a socket in `live` (a dump
    /// taken after [`Tracker::prune_begin`] returned `began`), and those recorded since.
    pub fn prune_end(&self, began: u64, live: &HashSet<SocketAddr>) -> usize {
        let mut g = self.lock();
        let before = g.by_source.len();
        g.by_source
            .retain(|src, e| e.epoch > began || live.contains(src));
        g.emails.retain(|e| Arc::strong_count(e) > 1);
        let keep = g.by_source.len() * 2;
        g.by_source.shrink_to(keep);
        let removed = before - g.by_source.len();
        metrics::gauge!("connector_connections_tracked").set(g.by_source.len() as f64);
        removed
    }

    /// Updates the size gauge.
    pub fn publish(&self) {
        metrics::gauge!("connector_connections_tracked").set(self.len() as f64);
    }
}

/// Where the log stands, for the start-up message, `/healthz` and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogState {
    /// Not opened yet.
    Starting,
    /// Being read.
    Following,
    /// The file does not exist: the core does not log there (or not yet).
    Missing,
    /// It exists and cannot be read: why.
    Unreadable(String),
}

impl LogState {
    pub fn problem(&self, path: &Path) -> Option<String> {
        match self {
            LogState::Starting | LogState::Following => None,
            LogState::Missing => Some(format!(
                "the core's access log {} does not exist: connections cannot be tied to users until the core writes it (set \"log\": {{\"access\": \"{}\"}} in the core's config)",
                path.display(),
                path.display()
            )),
            LogState::Unreadable(why) => Some(format!(
                "the core's access log {} cannot be read: {why}",
                path.display()
            )),
        }
    }
}

/// Follows one log file by path: from its end at the first open, then from the start of
/// each new file (a rotation by rename, or the file appearing), and from the start again
/// after a truncation.
///
/// After a rename, the old file is still read as long as it grows and the new one does
/// not: a core that keeps its file open (Xray and V2Ray do not reopen on a signal) goes
/// on writing there until it is restarted.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    current: Option<Reader>,
    /// The file renamed away, while the writer may still write to it.
    previous: Option<(Reader, std::time::Instant)>,
    pub state: LogState,
}

/// How long a renamed-away file that stopped growing is still read.
const ROTATED_GRACE: Duration = Duration::from_secs(300);

/// One open file and the position in it.
#[derive(Debug)]
struct Reader {
    file: File,
    /// (device, inode).
    id: (u64, u64),
    offset: u64,
    partial: Vec<u8>,
    /// The rest of an over-long line is being skipped.
    skipping: bool,
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        (m.dev(), m.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        (0, 0)
    }
}

impl Reader {
    fn open(path: &Path, from_end: bool) -> io::Result<Reader> {
        let mut file = File::open(path)?;
        let m = file.metadata()?;
        let offset = if from_end {
            file.seek(SeekFrom::End(0))?
        } else {
            0
        };
        Ok(Reader {
            file,
            id: file_id(&m),
            offset,
            partial: Vec::new(),
            skipping: false,
        })
    }

    fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.offset = 0;
        self.partial.clear();
        self.skipping = false;
        Ok(())
    }

    /// Reads to the end, handing each complete line to `each`: (lines, bytes read).
    fn drain(&mut self, each: &mut dyn FnMut(&str)) -> io::Result<(usize, u64)> {
        let mut buf = [0u8; 64 * 1024];
        let (mut lines, mut bytes) = (0, 0);
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => return Ok((lines, bytes)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.offset += n as u64;
            bytes += n as u64;
            let mut rest = &buf[..n];
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let (head, tail) = rest.split_at(nl);
                rest = &tail[1..];
                if self.skipping || self.partial.len() + head.len() > MAX_LINE {
                    self.skipping = false;
                    self.partial.clear();
                    continue;
                }
                let line: &[u8] = if self.partial.is_empty() {
                    head
                } else {
                    self.partial.extend_from_slice(head);
                    &self.partial
                };
                if let Ok(s) = std::str::from_utf8(line) {
                    each(s.trim_end_matches('\r'));
                    lines += 1;
                }
                self.partial.clear();
            }
            if !self.skipping {
                self.partial.extend_from_slice(rest);
                if self.partial.len() > MAX_LINE {
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
    }
}

impl LogFollower {
    pub fn new(path: PathBuf) -> LogFollower {
        LogFollower {
            path,
            current: None,
            previous: None,
            state: LogState::Starting,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what is new, handing each complete line to `each`; returns the number of
    /// lines. Never fails: a problem is kept in [`LogFollower::state`].
    pub fn poll(&mut self, each: &mut dyn FnMut(&str)) -> usize {
        let mut lines = 0;
        if let Some((old, last_growth)) = &mut self.previous {
            match old.drain(each) {
                Ok((n, bytes)) => {
                    lines += n;
                    if bytes > 0 {
                        *last_growth = std::time::Instant::now();
                    } else if last_growth.elapsed() > ROTATED_GRACE {
                        self.previous = None;
                    }
                }
                Err(_) => self.previous = None,
            }
        }
        let mut moved = self.drain_current(each);
        // Then look at the path: a new file, a truncation, or none at all.
        match std::fs::metadata(&self.path) {
            Ok(m) => {
                let id = file_id(&m);
                match &mut self.current {
                    None => {
                        // What the log held when the agent started is history; a file
                        // that appears later is all new.
                        let from_end = self.state == LogState::Starting;
                        self.reopen(from_end);
                    }
                    Some(r) if r.id != id => {
                        // Rotated: the old file was read to its end above, and is still
                        // read while its writer has not moved to the new one.
                        let old = self.current.take();
                        lines += moved;
                        moved = 0;
                        self.reopen(false);
                        self.previous = old.map(|r| (r, std::time::Instant::now()));
                    }
                    Some(r) if m.len() < r.offset => {
                        // Truncated in place (copytruncate).
                        if let Err(e) = r.rewind() {
                            self.state = LogState::Unreadable(e.to_string());
                            self.current = None;
                        }
                    }
                    Some(_) => {}
                }
                moved += self.drain_current(each);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.current.is_none() {
                    self.state = LogState::Missing;
                }
            }
            Err(e) => {
                if self.current.is_none() {
                    self.state = LogState::Unreadable(e.to_string());
                }
            }
        }
        if moved > 0 {
            // The writer writes the current file: a renamed one is done.
            self.previous = None;
        }
        lines + moved
    }

    fn reopen(&mut self, from_end: bool) {
        match Reader::open(&self.path, from_end) {
            Ok(r) => {
                self.current = Some(r);
                self.state = LogState::Following;
            }
            Err(e) => self.state = LogState::Unreadable(e.to_string()),
        }
    }

    fn drain_current(&mut self, each: &mut dyn FnMut(&str)) -> usize {
        let Some(r) = &mut self.current else {
            return 0;
        };
        match r.drain(each) {
            Ok((n, _)) => n,
            Err(e) => {
                self.state = LogState::Unreadable(e.to_string());
                self.current = None;
                0
            }
        }
    }
}

/// The tracker and its log, shared by the follower task and the cuts.
#[derive(Debug)]
pub struct Tracking {
    pub tracker: Tracker,
    log: Mutex<LogFollower>,
    /// The nodes' inbound ports, as last learnt (the config's `port`, then the core's
    /// ListInbounds): what a prune dumps.
    ports: Mutex<BTreeMap<u64, Vec<u16>>>,
    /// When the map was last pruned for being full.
    full_prune: Mutex<Option<std::time::Instant>>,
}

impl Tracking {
    pub fn new(tracker: Tracker, log: PathBuf, ports: BTreeMap<u64, Vec<u16>>) -> Tracking {
        Tracking {
            tracker,
            log: Mutex::new(LogFollower::new(log)),
            ports: Mutex::new(ports),
            full_prune: Mutex::new(None),
        }
    }

    /// From `config` (`xray.access_log` set).
    pub fn for_config(config: &Config) -> Option<Tracking> {
        let path = config.xray.as_ref()?.access_log.clone()?;
        let ports = config
            .nodes
            .iter()
            .filter_map(|n| Some((n.id, vec![n.port?])))
            .collect();
        Some(Tracking::new(Tracker::for_config(config), path, ports))
    }

    /// Reads the log to its current end (blocking: file reads). Returns the lines read.
    pub fn catch_up(&self) -> usize {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.poll(&mut |line| {
            if self.tracker.line(line) {
                return;
            }
            // Full: make room against the kernel's table (at most once a second: a map
            // full of live connections stays full), then try once more.
            let mut last = self
                .full_prune
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last = Some(std::time::Instant::now());
                drop(last);
                if let Err(e) = self.prune() {
                    tracing::debug!(error = %e, "cannot prune the full tracker");
                }
                if self.tracker.line(line) {
                    return;
                }
            }
            self.tracker.drop_line();
        })
    }

    pub fn log_state(&self) -> LogState {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state
            .clone()
    }

    pub fn log_path(&self) -> PathBuf {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .path()
            .to_path_buf()
    }

    /// Records `node`'s inbound ports as the core tells them.
    pub fn set_ports(&self, node: u64, ports: Vec<u16>) {
        self.ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node, ports);
    }

    pub fn ports(&self) -> Vec<u16> {
        let g = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<u16> = g.values().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Drops the entries whose socket is gone (blocking: one sock_diag dump of the
    /// nodes' inbound ports; of every established socket while no port is known).
    pub fn prune(&self) -> Result<usize, kernel::KernelError> {
        let ports = self.ports();
        let began = self.tracker.prune_begin();
        let live: HashSet<SocketAddr> = kernel::established(&ports)?
            .into_iter()
            .map(|s| s.remote)
            .collect();
        Ok(self.tracker.prune_end(began, &live))
    }
}

/// The follower task: reads the log every [`POLL_EVERY`] and prunes every
/// [`PRUNE_EVERY`], until `stop`. A problem with the log is said when it starts (and
/// when it ends), not at every poll.
pub async fn follow(tracking: Arc<Tracking>, stop: CancellationToken) {
    let mut said = LogState::Starting;
    let mut last_prune = tokio::time::Instant::now();
    let mut prune_failed = false;
    loop {
        let t = tracking.clone();
        let prune_now = last_prune.elapsed() >= PRUNE_EVERY;
        let (state, pruned) = match tokio::task::spawn_blocking(move || {
            t.catch_up();
            let pruned = prune_now.then(|| t.prune());
            (t.log_state(), pruned)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "access log follower: a read failed");
                (LogState::Starting, None)
            }
        };
        if prune_now {
            last_prune = tokio::time::Instant::now();
        }
        match pruned {
            Some(Err(e)) if !prune_failed => {
                prune_failed = true;
                tracing::warn!(error = %e, "tracked connections cannot be checked against the kernel's socket table; they are kept until it answers");
            }
            Some(Ok(_)) => prune_failed = false,
            _ => {}
        }
        let following = if state == LogState::Following {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("connector_access_log_following").set(following);
        if state != said && state != LogState::Starting {
            match state.problem(&tracking.log_path()) {
                Some(p) => tracing::warn!("{p}"),
                None => {
                    tracing::info!(path = %tracking.log_path().display(), "following the core's access log")
                }
            }
            said = state;
        }
        tracking.tracker.publish();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const U1: &str = "5d7c2b1e-8f3a-4e6b-9c0d-1a2b3c4d5e6f";
    const U2: &str = "6e8d3c2f-9a4b-4f7c-8d1e-2b3c4d5e6f70";

    fn tracker() -> Tracker {
        Tracker::new(vec![EmailShape::new("{node_id}:{uuid}", 1).unwrap()], 4)
    }

    fn line(src: &str, email: &str) -> String {
        format!(
            "2026/12/05 15:04:51.011036 from {src} accepted tcp:1.1.1.1:80 [in >> direct] email: {email}\n"
        )
    }

    #[test]
    fn only_ours_latest_line_wins_and_bounded() {
        let t = tracker();
        assert!(t.line(&line("127.0.0.1:1000", &format!("1:{U1}"))));
        assert!(t.line(&line("127.0.0.1:1001", &format!("1:{}", U1.to_uppercase()))));
        // A config user and another node's user are not ours.
        assert!(t.line(&line("127.0.0.1:1002", "alice")));
        assert!(t.line(&line("127.0.0.1:1003", &format!("2:{U1}"))));
        assert_eq!(t.len(), 2);
        // The port reused by another user: the newer line wins.
        assert!(t.line(&line("127.0.0.1:1001", &format!("1:{U2}"))));
        let s = t.sources_of(&[format!("1:{U1}"), format!("1:{U2}")]);
        assert_eq!(
            s[&format!("1:{U1}")],
            vec!["127.0.0.1:1000".parse().unwrap()]
        );
        assert_eq!(s[&format!("1:{U2}")].len(), 1);
        // A config user's connection from a source we had: no longer ours.
        assert!(t.line(&line("127.0.0.1:1009", &format!("1:{U2}"))));
        assert!(t.line(&line("127.0.0.1:1009", "alice")));
        assert!(t.sources_of(&[format!("1:{U2}")])[&format!("1:{U2}")].len() == 1);
        assert!(t.line(&line("127.0.0.1:1004", &format!("1:{U2}"))));
        assert!(t.line(&line("[::ffff:127.0.0.1]:1005", &format!("1:{U2}"))));
        assert!(!t.line(&line("127.0.0.1:1006", &format!("1:{U2}"))), "full");
        assert_eq!(t.len(), 4);
        assert!(
            t.sources_of(&[format!("1:{U2}")])[&format!("1:{U2}")]
                .contains(&"127.0.0.1:1005".parse().unwrap()),
            "mapped addresses are kept as IPv4"
        );
        // A prune keeps the live and what came in after its dump began.
        let began = t.prune_begin();
        assert!(t.line(&line("127.0.0.1:1000", &format!("1:{U1}"))));
        let live: HashSet<SocketAddr> = ["127.0.0.1:1004".parse().unwrap()].into();
        assert_eq!(t.prune_end(began, &live), 2);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lock().emails.len(), 2);
    }

    #[test]
    fn follows_from_the_end_through_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut f = LogFollower::new(path.clone());
        let mut got = Vec::new();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(f.state, LogState::Missing);
        // A log that appears after the start is all new.
        std::fs::write(&path, "first\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(f.state, LogState::Following);
        assert_eq!(got, ["first"]);
        got.clear();
        // One that exists at the start is read from its end.
        let mut late = LogFollower::new(path.clone());
        let mut none = Vec::new();
        late.poll(&mut |l| none.push(l.to_string()));
        assert!(none.is_empty());
        assert_eq!(late.state, LogState::Following);
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"a\nb").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(got, ["a"]);
        w.write_all(b"c\n").unwrap();
        // Rotation by rename: the old file's tail, then the new file from its start.
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        w.write_all(b"last of old\n").unwrap();
        std::fs::write(&path, "").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        // A writer that keeps the renamed file open is still followed …
        w.write_all(b"still old\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        // … until the new file is written.
        std::fs::write(&path, "new 1\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        w.write_all(b"old, no longer read\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(got, ["a", "bc", "last of old", "still old", "new 1"]);
        // Truncation in place, then shorter writes.
        std::fs::write(&path, "").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        std::fs::write(&path, "t\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(got.last().map(String::as_str), Some("t"));
        // An over-long line is skipped whole; the next one reads.
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(&vec![b'x'; MAX_LINE * 3]).unwrap();
        w.write_all(b"\nafter\n").unwrap();
        f.poll(&mut |l| got.push(l.to_string()));
        assert_eq!(got.last().map(String::as_str), Some("after"));
        assert!(got.iter().all(|l| l.len() < MAX_LINE));
    }
}
