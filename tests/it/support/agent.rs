//! The real `connector` binary driven end to end (issues 3 and 4): a temporary
//! directory with a config file, a real HTTP panel (`connector::sim::panel`) whose answers a
//! test changes while the agent runs, and the agent started as a child process with
//! `--log-format json`, whose log lines a test waits on. The apply is either a small
//! `sh` hook logging every run (`cmd` mode, the default), or a real core's gRPC API
//! (`xray-grpc` mode: [`Opts::xray`]).
//!
//! `support::agent` in the tests; a bench includes it by path next to the panel and
//! `wait.rs` (it uses `super::panel` and `super::wait`).
//!
//! Nothing here waits by sleeping. A test waits for an event — a JSON log line on the
//! agent's stderr, a request reaching the panel, a marker file the hook writes — each
//! with a generous deadline; a deadline that passes fails the test with the agent's
//! stderr (every run), the panel's requests and the hook's log.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::panel::{Panel, Request};
use super::wait::{self, Reaped};
/// The key the agent sends and the panel accepts (unless a test rotates it).
pub const TOKEN: &str = "s3cret-internal-key";
/// Deadline for any one awaited event. Generous: only a hang should ever reach it.
pub const WAIT: Duration = Duration::from_secs(30);

// ---- the apply hook ----

/// The hook: `sh hook.sh {node_id} {uuids_file} {uuids_json}`. Every run appends
/// `start`, then `fail` or `ok`, to `hook.log`, and an `ok` run copies the txt file it
/// was given to `seen-{n}.txt`. Control files next to it:
/// - `fail_until` (a number N): runs 1..=N exit 3 with `boom {n}` on stderr;
/// - `block`: the run writes its pid to `started` and waits until `release` exists.
pub const HOOK: &str = r#"#!/bin/sh
d="$(dirname "$0")"
n=$(( $(cat "$d/runs" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/runs"
echo "start n=$n pid=$$ argc=$# node=$1 txt=$2 json=$3" >> "$d/hook.log"
if [ -e "$d/block" ] && [ ! -e "$d/release" ]; then
  echo "$$" > "$d/started.tmp" && mv "$d/started.tmp" "$d/started"
  while [ ! -e "$d/release" ]; do sleep 0.02; done
fi
if [ -e "$d/fail_until" ] && [ "$n" -le "$(cat "$d/fail_until")" ]; then
  echo "boom $n" >&2
  echo "fail n=$n" >> "$d/hook.log"
  exit 3
fi
cp "$2" "$d/seen-$n.txt"
echo "ok n=$n node=$1 txt=$2 json=$3" >> "$d/hook.log"
"#;

/// One line of the hook's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookLine {
    /// `start`, `fail` or `ok`.
    pub event: String,
    pub n: u32,
    /// `key=value` words after `n`.
    pub fields: Vec<(String, String)>,
}

impl HookLine {
    pub fn field(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

// ---- the fixture ----

/// Settings of a test's config file (`sync.interval` is always 200ms).
pub struct Opts {
    pub nodes: Vec<u64>,
    pub panel_timeout: &'static str,
    /// `[queue.kinds.xray_apply] ladder`, when set.
    pub apply_ladder: Option<&'static str>,
    /// `[queue.kinds.node_sync] ladder`, when set.
    pub sync_ladder: Option<&'static str>,
    pub shutdown_timeout: Option<&'static str>,
    /// `sync.max_removal_ratio` and `sync.confirm_after`, when set.
    pub removal_guard: Option<(f64, &'static str)>,
    /// `xray-grpc` mode instead of the hook: the body of the `[xray]` section, e.g.
    /// `api = "127.0.0.1:10085"\nflavor = "xray"\n`.
    pub xray: Option<String>,
    /// More keys of a node's `[[nodes]]` entry, e.g. `inbound_tag = "in-1"\n`.
    pub node_keys: std::collections::BTreeMap<u64, String>,
    /// TOML appended at the end of the file: whole sections, e.g. `[traffic]`.
    pub extra: String,
    /// More keys of the `[http]` section, e.g. `header_timeout = "1s"\n`.
    pub http: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            nodes: vec![1],
            panel_timeout: "5s",
            apply_ladder: None,
            sync_ladder: None,
            shutdown_timeout: None,
            removal_guard: None,
            xray: None,
            node_keys: Default::default(),
            extra: String::new(),
            http: String::new(),
        }
    }
}

/// A temporary directory with a config, an output dir, the hook, a panel, and (while
/// started) the agent.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub panel: Panel,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
    /// stderr of earlier runs of the agent in this test.
    pub past: Vec<String>,
}

impl Rig {
    pub fn new(opts: Opts) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let panel = Panel::start(TOKEN);
        let hook_dir = dir.path().join("hook");
        std::fs::create_dir_all(&hook_dir).unwrap();
        std::fs::write(hook_dir.join("hook.sh"), HOOK).unwrap();
        let mut text = format!(
            "data_dir = {data:?}\n{shutdown}\
             [http]\nlisten = \"127.0.0.1:0\"\n{http}\
             [panel]\nbase_url = {url:?}\ninternal_api_key = {TOKEN:?}\ntimeout = {timeout:?}\n\
             [sync]\ninterval = \"200ms\"\noutput_dir = {out:?}\n{guard}{apply}",
            data = dir.path().join("data"),
            shutdown = opts
                .shutdown_timeout
                .map(|t| format!("shutdown_timeout = {t:?}\n"))
                .unwrap_or_default(),
            http = opts.http,
            url = panel.base_url(),
            timeout = opts.panel_timeout,
            out = dir.path().join("out"),
            guard = opts
                .removal_guard
                .map(|(r, c)| format!("max_removal_ratio = {r}\nconfirm_after = {c:?}\n"))
                .unwrap_or_default(),
            apply = match &opts.xray {
                Some(xray) => format!("[xray]\n{xray}"),
                None => format!(
                    "[apply]\ncmd = {cmd:?}\ntimeout = \"20s\"\n",
                    cmd = hook_cmd(&hook_dir)
                ),
            },
        );
        for id in &opts.nodes {
            text.push_str(&format!("[[nodes]]\nid = {id}\n"));
            if let Some(keys) = opts.node_keys.get(id) {
                text.push_str(keys);
            }
        }
        if let Some(ladder) = opts.apply_ladder {
            text.push_str(&format!("[queue.kinds.xray_apply]\nladder = {ladder}\n"));
        }
        if let Some(ladder) = opts.sync_ladder {
            text.push_str(&format!("[queue.kinds.node_sync]\nladder = {ladder}\n"));
        }
        text.push_str(&opts.extra);
        let config = dir.path().join("connector.toml");
        write_private(&config, &text);
        Rig {
            dir,
            panel,
            config,
            daemon: None,
            past: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn hook_dir(&self) -> PathBuf {
        self.path("hook")
    }

    pub fn files(&self, node: u64) -> NodeFiles {
        NodeFiles::new(&self.path("out"), node)
    }

    /// `connector run --config … --log-format json`, with a clean environment.
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    /// As [`Rig::start`], `adjust` changing the command first (a resource limit, say).
    pub fn start_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        assert!(self.daemon.is_none(), "the agent is already running");
        let mut cmd = connector(self.dir.path());
        cmd.arg("run").arg("--config").arg(&self.config);
        adjust(&mut cmd);
        self.daemon = Some(Daemon::spawn(cmd));
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the agent is running")
    }

    /// The number of stderr lines of the current run so far: a cursor for `wait_log`.
    pub fn mark(&self) -> usize {
        self.daemon().lines.len()
    }

    /// Waits for a JSON log line after `from` that satisfies `pred`; returns its index
    /// and the line.
    #[track_caller]
    pub fn wait_log(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        match self.daemon().lines.wait(from, WAIT, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v))
        }) {
            Ok((i, line)) => (i, serde_json::from_str(&line).unwrap()),
            Err(()) => self.fail(&format!("the agent never logged {what}")),
        }
    }

    /// The HTTP listener's address (`http.listen` is port 0), from its log line.
    #[track_caller]
    pub fn http_addr(&self) -> std::net::SocketAddr {
        let (_, v) = self.wait_log(0, "http listener ready", |v| {
            v["message"] == "http listener ready"
        });
        match v["addr"].as_str().map(str::parse) {
            Some(Ok(addr)) => addr,
            _ => self.fail(&format!("no address in {v}")),
        }
    }

    /// Waits for the `applied` line of `node` at `generation`.
    #[track_caller]
    pub fn wait_applied(&self, from: usize, node: u64, generation: u64) -> usize {
        self.wait_log(
            from,
            &format!("`applied` for node {node} generation {generation}"),
            |v| v["message"] == "applied" && v["node"] == node && v["generation"] == generation,
        )
        .0
    }

    /// Waits for a request of `node` after the first `after` that the panel answered
    /// `answered`; returns its index and the request.
    #[track_caller]
    pub fn wait_request(&self, after: usize, node: u64, answered: &str) -> (usize, Request) {
        match self
            .panel
            .wait_request(after, WAIT, |r| r.node == node && r.answered == answered)
        {
            Ok(found) => found,
            Err(e) => self.fail(&format!(
                "no request of node {node} answered {answered:?}: {e}"
            )),
        }
    }

    /// Waits until the panel has answered `count` more requests of `node` with
    /// `answered`. When the next request of a node comes, its last sync has ended: one
    /// node's syncs never overlap.
    #[track_caller]
    pub fn wait_syncs(&self, node: u64, answered: &str, count: usize) -> Vec<Request> {
        let mut after = self.panel.request_count();
        let mut got = Vec::new();
        for _ in 0..count {
            let (i, r) = self.wait_request(after, node, answered);
            after = i + 1;
            got.push(r);
        }
        got
    }

    /// Waits until `path` exists (a marker the hook writes).
    #[track_caller]
    pub fn wait_file(&self, path: &Path) {
        // Polling a condition, not a pause: the hook signals only through files.
        self.wait_until(&format!("{} to appear", path.display()), || path.exists());
    }

    /// Waits until `done` is true, at most `WAIT`; fails the test naming `what`.
    #[track_caller]
    pub fn wait_until(&self, what: &str, done: impl FnMut() -> bool) {
        if let Err(e) = wait::wait_until(WAIT, what, done) {
            self.fail(&e);
        }
    }

    /// SIGTERM; the exit code, waiting at most `WAIT`.
    #[track_caller]
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            let _ = d.child.kill();
        }
        let _ = self.wait_exit();
    }

    /// Whether the agent has exited (without reaping it for `wait_exit`'s sake: the
    /// status stays available).
    pub fn exited(&mut self) -> bool {
        let d = self.daemon.as_mut().expect("the agent is running");
        matches!(d.child.try_wait(), Ok(Some(_)))
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.daemon().child.id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {pid} failed");
    }

    #[track_caller]
    pub fn wait_exit(&mut self) -> Option<i32> {
        let d = self.daemon.as_mut().expect("the agent is running");
        let code = match wait::wait_exit(&mut d.child, WAIT) {
            Ok(status) => status.code(),
            Err(_) => self.fail("the agent did not exit"),
        };
        let d = self.daemon.take().unwrap();
        // The reader thread ends at EOF; take everything it read.
        d.lines.wait_closed(WAIT);
        self.past.push(d.lines.text());
        code
    }

    pub fn hook_log(&self) -> Vec<HookLine> {
        let text = std::fs::read_to_string(self.hook_dir().join("hook.log")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let mut words = l.split_whitespace();
                let event = words.next().unwrap_or("").to_string();
                let fields: Vec<(String, String)> = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let n = fields
                    .iter()
                    .find(|(k, _)| k == "n")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                HookLine { event, n, fields }
            })
            .collect()
    }

    pub fn hook_runs(&self, event: &str) -> Vec<HookLine> {
        self.hook_log()
            .into_iter()
            .filter(|l| l.event == event)
            .collect()
    }

    /// The txt file the hook's run `n` was given, as it read it.
    pub fn seen_by_hook(&self, n: u32) -> String {
        std::fs::read_to_string(self.hook_dir().join(format!("seen-{n}.txt"))).unwrap_or_default()
    }

    /// `queuectl --config … ARGS`: through the agent's admin socket while it runs, else
    /// on the database.
    pub fn queuectl(&self, args: &[&str]) -> Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
        scrub(&mut cmd);
        cmd.arg("--config").arg(&self.config).args(args);
        let out = cmd.output().unwrap();
        if !out.status.success() {
            self.fail(&format!(
                "queuectl {args:?} failed: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            self.fail(&format!(
                "queuectl {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// The jobs of a kind, newest last.
    pub fn jobs(&self, kind: &str) -> Vec<Value> {
        let v = self.queuectl(&["list", "--kind", kind, "--limit", "1000", "--json"]);
        v.as_array().cloned().unwrap_or_default()
    }

    /// Fails the test with everything that happened.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.report())
    }

    pub fn report(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.past.iter().enumerate() {
            s.push_str(&format!("\n--- agent stderr (run {})\n{p}", i + 1));
        }
        if let Some(d) = &self.daemon {
            s.push_str(&format!("\n--- agent stderr (running)\n{}", d.lines.text()));
        }
        s.push_str(&format!("\n--- panel requests\n{}", self.panel.dump()));
        let hook = std::fs::read_to_string(self.hook_dir().join("hook.log")).unwrap_or_default();
        s.push_str(&format!("\n--- hook log\n{hook}---"));
        s
    }

    /// Kills a hook left blocked by a killed agent (it runs in its own process group).
    pub fn kill_blocked_hook(&self) {
        let started = self.hook_dir().join("started");
        let Some(pid) = std::fs::read_to_string(&started)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return;
        };
        // Only this test's hook: its pid may have been reused since.
        let script = self.hook_dir().join("hook.sh");
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(script.to_str().unwrap()));
        if ours {
            // The hook is its own process group leader: this kills it and its `sleep`.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_file(started);
    }

    /// Asserts what every sync request carried: the agent's token.
    #[track_caller]
    pub fn assert_token_always_sent(&self) {
        for r in self.panel.requests() {
            if r.token.as_deref() != Some(TOKEN) {
                self.fail(&format!("a request without the right token: {r}"));
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The agent first (its `Reaped` child is killed as it drops), then its hook.
        drop(self.daemon.take());
        self.kill_blocked_hook();
    }
}

/// `APPLY_CMD` for the hook (quoted: it is split into words, not run by a shell).
pub fn hook_cmd(hook_dir: &Path) -> String {
    format!(
        "sh '{}' {{node_id}} {{uuids_file}} {{uuids_json}}",
        hook_dir.join("hook.sh").display()
    )
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Removes every variable the agent reads, so the test's environment cannot leak in.
pub fn scrub(cmd: &mut Command) {
    for (name, _, _) in connector::config::ENV_VARS {
        cmd.env_remove(name);
    }
    // Every `CONNECTOR_…` key variable (config::keys) too.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONNECTOR_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("CONNECTOR_CONFIG")
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE");
}

/// The `connector` binary, JSON logs, run in `cwd` with a clean environment.
pub fn connector(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_connector"));
    scrub(&mut cmd);
    cmd.current_dir(cwd).arg("--log-format").arg("json");
    cmd
}

// ---- the running agent ----

/// Lines read from a child's stderr on a thread (so the child never blocks on a full
/// pipe), and a condition variable to wait for one.
#[derive(Default)]
pub struct Lines {
    pub inner: Mutex<(Vec<String>, bool)>,
    pub changed: Condvar,
}

impl Lines {
    pub fn read_from(stream: impl std::io::Read + Send + 'static) -> Arc<Lines> {
        let lines = Arc::new(Lines::default());
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                l.lock().0.push(line);
                l.changed.notify_all();
            }
            l.lock().1 = true;
            l.changed.notify_all();
        });
        lines
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<String>, bool)> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    pub fn text(&self) -> String {
        self.lock().0.join("\n")
    }

    pub fn all(&self) -> Vec<String> {
        self.lock().0.clone()
    }

    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String), ()> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        let mut checked = from;
        loop {
            while checked < g.0.len() {
                if pred(&g.0[checked]) {
                    return Ok((checked, g.0[checked].clone()));
                }
                checked += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if g.1 || left.is_zero() {
                return Err(());
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.1 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

pub struct Daemon {
    /// Killed and reaped when the daemon is dropped: a failed test leaves no agent.
    pub child: Reaped,
    pub lines: Arc<Lines>,
}

impl Daemon {
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let lines = Lines::read_from(child.stderr.take().unwrap());
        Daemon {
            child: Reaped(child),
            lines,
        }
    }

    /// As [`Daemon::spawn`], but the lines are the child's stdout (`queuectl tail`);
    /// its stderr is dropped.
    pub fn spawn_with_stdout(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let lines = Lines::read_from(child.stdout.take().unwrap());
        Daemon {
            child: Reaped(child),
            lines,
        }
    }
}

/// A finished run of a binary; printed whole when an expectation fails.
pub struct Run {
    pub cmd: String,
    pub code: Option<i32>,
    pub stderr: String,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\n--- command\n{}\n--- exit code\n{:?}\n--- stderr\n{}\n---",
            self.cmd, self.code, self.stderr
        )
    }
}

impl Run {
    /// Runs `cmd` to its end (at most `WAIT`; then it is killed and the test fails).
    pub fn of(cmd: Command) -> Run {
        let shown = format!("{cmd:?}");
        let mut d = Daemon::spawn(cmd);
        let status = match wait::wait_exit(&mut d.child, WAIT) {
            Ok(status) => status,
            // Killed as `d` drops.
            Err(_) => panic!(
                "{shown} did not exit within {WAIT:?}; its stderr:\n{}",
                d.lines.text()
            ),
        };
        d.lines.wait_closed(WAIT);
        Run {
            cmd: shown,
            code: status.code(),
            stderr: d.lines.text(),
        }
    }

    /// stderr lines that are not JSON log lines: what the program said to a person.
    pub fn plain_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_err())
            .collect()
    }
}

// ---- output files ----

pub struct NodeFiles {
    pub dir: PathBuf,
    pub txt: PathBuf,
    pub json: PathBuf,
}

/// What a file was at one moment: rewritten files get a new inode (rename) and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub ino: u64,
    pub mtime_ns: i128,
    pub bytes: Vec<u8>,
}

impl NodeFiles {
    pub fn new(out: &Path, node: u64) -> NodeFiles {
        let dir = out.join(format!("node-{node}"));
        NodeFiles {
            txt: dir.join("allowed-uuids.txt"),
            json: dir.join("allowed-uuids.json"),
            dir,
        }
    }

    pub fn stamp(&self) -> [FileStamp; 2] {
        [&self.txt, &self.json].map(|p| {
            let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            FileStamp {
                ino: m.ino(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                bytes: std::fs::read(p).unwrap(),
            }
        })
    }

    /// Both files, checked against each other and against `expected` (sorted).
    pub fn check(&self, node: u64, expected: &[String]) -> Result<(), String> {
        let txt = std::fs::read_to_string(&self.txt).map_err(|e| e.to_string())?;
        let json = std::fs::read_to_string(&self.json).map_err(|e| e.to_string())?;
        let want_txt: String = expected.iter().map(|u| format!("{u}\n")).collect();
        if txt != want_txt {
            return Err(format!("txt is\n{txt}\nexpected\n{want_txt}"));
        }
        let v: Value = serde_json::from_str(&json).map_err(|e| format!("json: {e}: {json}"))?;
        let uuids: Vec<&str> = v["uuids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if v["node_id"] != node || v["count"] != expected.len() || uuids != expected {
            return Err(format!(
                "json is {json}; expected node {node}, {expected:?}"
            ));
        }
        let fetched = v["fetched_at"].as_str().unwrap_or("");
        let at = humantime::parse_rfc3339_weak(fetched)
            .map_err(|e| format!("fetched_at {fetched:?} is not RFC 3339: {e}"))?;
        let age = SystemTime::now()
            .duration_since(at)
            .unwrap_or(Duration::ZERO);
        if age > Duration::from_secs(600) {
            return Err(format!("fetched_at {fetched} is not recent"));
        }
        Ok(())
    }

    /// Names in the node's directory other than the two files (temp files left over).
    pub fn strays(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "allowed-uuids.txt" && n != "allowed-uuids.json")
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn uuids(n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    v.sort();
    v
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}
