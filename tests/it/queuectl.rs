//! `queuectl` end to end: the real binary on a real queue database, prepared in a
//! temporary directory through the library (and, for the lock test, held by the real
//! `connector` daemon).
//!
//! The fixture's config sets `ladder = ["0s"]` and `on_exhausted = "dead"` for webhook
//! and node_sync, so one failed attempt makes a job dead without a virtual clock. Jobs
//! that must look old are written through a clock set ten days back.
//!
//! The queue is prepared in a child process (this test binary run again, as
//! [`prepare_child`]), never in this one: dropping a sled database does not release its
//! lock at once (background threads keep the file open a little longer; sled #1289),
//! and a child spawned by another test meanwhile would inherit the descriptor too. A
//! process that has exited holds nothing, so `queuectl` then always finds the queue
//! free.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connector::jobs;
use connector::queue::{Clock, JobKind, JobState, Queue};
use serde_json::Value;

use crate::support::wait::Reaped;

// ---- running binaries ----

/// What one run of a binary did; on a failed expectation it prints all of it.
struct Run {
    cmd: String,
    code: Option<i32>,
    stdout: String,
    /// stderr without `queue_line`.
    stderr: String,
    /// queuectl's first stderr line saying which queue it used
    /// (`queuectl: database at …` / `queuectl: daemon at …`), if it printed one.
    queue_line: Option<String>,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\n--- command\n{}\n--- exit code\n{:?}\n--- stdout\n{}\n--- stderr\n{}{}\n---",
            self.cmd,
            self.code,
            self.stdout,
            self.queue_line
                .as_deref()
                .map(|l| format!("{l}\n"))
                .unwrap_or_default(),
            self.stderr
        )
    }
}

impl Run {
    /// Asserts exit code 0.
    #[track_caller]
    fn ok(self) -> Run {
        self.code(0)
    }

    #[track_caller]
    fn code(self, expected: i32) -> Run {
        assert_eq!(self.code, Some(expected), "unexpected exit code{self}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}){self}"))
    }

    /// Asserts stderr is exactly one line, containing `needle`.
    #[track_caller]
    fn one_error_line(self, needle: &str) -> Run {
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "stderr is not one line{self}"
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}{self}"
        );
        self
    }

    #[track_caller]
    fn stdout_has(self, needle: &str) -> Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}{self}"
        );
        self
    }
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A command with a clean environment for the queue (no DATA_DIR from outside).
fn bin(path: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(path);
    cmd.env_remove("DATA_DIR")
        .env_remove("CONNECTOR_CONFIG")
        .env_remove(PREPARE_ENV)
        .env("RUST_LOG", "info");
    cmd
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(cmd)))
}

fn run(mut cmd: Command) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn(&mut cmd).wait_with_output().unwrap();
    let (queue_line, stderr) = split_queue_line(&String::from_utf8_lossy(&out.stderr));
    Run {
        cmd: command_line(&cmd),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        queue_line,
    }
}

/// Splits off queuectl's "which queue" line from the rest of its stderr.
fn split_queue_line(stderr: &str) -> (Option<String>, String) {
    match stderr.split_once('\n') {
        Some((first, rest))
            if first.starts_with("queuectl: database at ")
                || first.starts_with("queuectl: daemon at ") =>
        {
            (Some(first.to_string()), rest.to_string())
        }
        _ => (None, stderr.to_string()),
    }
}

/// The first row of a human table whose first cell is `first`, split on blanks.
fn row<'a>(r: &'a Run, first: &str) -> Vec<&'a str> {
    r.stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row starting with {first:?}{r}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|j| j["id"].as_u64().expect("an id"))
        .collect()
}

// ---- the fixture ----

/// A temporary data dir with a config file and (once prepared) a queue.
struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// idempotency key → job id
    ids: BTreeMap<String, u64>,
}

impl Fixture {
    /// The config and an empty data dir (no queue yet).
    fn empty() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = dir.path().join("connector.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\n\
                 [queue.kinds.webhook]\nladder = [\"0s\"]\non_exhausted = \"dead\"\n\n\
                 [queue.kinds.node_sync]\nladder = [\"0s\"]\non_exhausted = \"dead\"\n",
                data.to_str().unwrap()
            ),
        )
        .unwrap();
        Fixture {
            dir,
            config,
            ids: BTreeMap::new(),
        }
    }

    /// The ten jobs of [`Prepare::Jobs`].
    fn seeded() -> Fixture {
        let mut fx = Fixture::empty();
        fx.ids = fx.prepare(&Prepare::Jobs);
        fx
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn id(&self, key: &str) -> u64 {
        self.ids[key]
    }

    /// Runs `what` on this fixture's queue in a child process; returns the ids of the
    /// jobs it wrote, by key.
    fn prepare(&self, what: &Prepare) -> BTreeMap<String, u64> {
        let mut cmd = bin(std::env::current_exe().unwrap());
        cmd.args([
            "queuectl::prepare_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PREPARE_ENV, what.to_env())
        .env(CONFIG_ENV, &self.config);
        let r = run(cmd).ok();
        let line = r
            .stdout
            .lines()
            .find_map(|l| l.split_once(PREPARED).map(|(_, ids)| ids))
            .unwrap_or_else(|| panic!("the child did not report its ids{r}"));
        serde_json::from_str(line).unwrap()
    }

    /// `queuectl --config FIXTURE args...`
    fn queuectl(&self, args: &[&str]) -> Run {
        let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
        cmd.arg("--config").arg(&self.config).args(args);
        run(cmd)
    }
}

// ---- preparing a queue, in a child process ----

const PREPARE_ENV: &str = "QUEUECTL_TEST_PREPARE";
const CONFIG_ENV: &str = "QUEUECTL_TEST_CONFIG";
const PREPARED: &str = "prepared: ";

/// What [`prepare_child`] writes into a queue.
enum Prepare {
    /// Ten jobs over the four kinds and every state but running:
    ///
    /// | key | kind | state |
    /// |---|---|---|
    /// | old-1, old-2 | webhook | dead (exhausted) ten days ago |
    /// | evt-a, evt-b | webhook | dead (exhausted) now |
    /// | evt-c | webhook | ready |
    /// | node-1 | node_sync | dead (exhausted) |
    /// | node-2 | node_sync | done |
    /// | apply-1 | xray_apply | scheduled (in 1h) |
    /// | rep-1 | traffic_report | scheduled (failed once; a binary payload) |
    /// | rep-2 | traffic_report | ready |
    Jobs,
    /// 300 ready webhook jobs with 4 KiB payloads: an export far larger than a pipe.
    Big,
    /// Overwrites the last byte of this job's record behind the queue's back.
    Corrupt(u64),
}

impl Prepare {
    fn to_env(&self) -> String {
        match self {
            Prepare::Jobs => "jobs".into(),
            Prepare::Big => "big".into(),
            Prepare::Corrupt(id) => format!("corrupt {id}"),
        }
    }

    fn from_env(s: &str) -> Prepare {
        match s.split_once(' ') {
            None if s == "jobs" => Prepare::Jobs,
            None if s == "big" => Prepare::Big,
            Some(("corrupt", id)) => Prepare::Corrupt(id.parse().unwrap()),
            _ => panic!("unknown {PREPARE_ENV}={s:?}"),
        }
    }
}

/// Not a test of its own: the child process [`Fixture::prepare`] runs. Without its
/// environment variable it does nothing.
#[test]
fn prepare_child() {
    let Ok(what) = std::env::var(PREPARE_ENV) else {
        return;
    };
    let config_file = PathBuf::from(std::env::var(CONFIG_ENV).unwrap());
    let config = connector::config::load(Some(&config_file), &BTreeMap::<String, String>::new())
        .expect("the fixture's config loads");
    let path = config.queue_path();
    let ids = match Prepare::from_env(&what) {
        Prepare::Corrupt(id) => {
            // The key layout (`j` + big-endian id) is documented in queue-schema/.
            let db = sled::open(&path).unwrap();
            let mut key = vec![b'j'];
            key.extend_from_slice(&id.to_be_bytes());
            let mut raw = db.get(&key).unwrap().expect("the record").to_vec();
            *raw.last_mut().unwrap() ^= 0xff;
            db.insert(&key, raw).unwrap();
            db.flush().unwrap();
            BTreeMap::new()
        }
        what => {
            let clock = Arc::new(ShiftedClock::default());
            let (q, _) = Queue::open(&path, config.queue.clone(), clock.clone()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                match what {
                    Prepare::Big => big(&q).await,
                    _ => jobs(&q, &clock).await,
                }
            })
        }
    };
    println!("{PREPARED}{}", serde_json::to_string(&ids).unwrap());
}

async fn jobs(q: &Queue, clock: &ShiftedClock) -> BTreeMap<String, u64> {
    let mut ids = BTreeMap::new();
    let mut put = |key: &str, id: u64| ids.insert(key.to_string(), id);
    clock.set_back(Duration::from_secs(10 * 24 * 3600));
    put("old-1", dead(q, jobs::WEBHOOK, "old-1", "HTTP 503").await);
    put("old-2", dead(q, jobs::WEBHOOK, "old-2", "HTTP 503").await);
    clock.set_back(Duration::ZERO);
    put(
        "evt-a",
        dead(q, jobs::WEBHOOK, "evt-a", "connection refused").await,
    );
    put("evt-b", dead(q, jobs::WEBHOOK, "evt-b", "HTTP 500").await);
    put("evt-c", enqueue(q, jobs::WEBHOOK, "evt-c", None).await);
    put(
        "node-1",
        dead(q, jobs::NODE_SYNC, "node-1", "timeout after 10s").await,
    );
    let id = enqueue(q, jobs::NODE_SYNC, "node-2", None).await;
    let l = q.lease(jobs::NODE_SYNC, 1).await.unwrap();
    assert_eq!(l[0].job.id, id);
    q.ack(l[0].token()).await.unwrap();
    put("node-2", id);
    let later = q.now() + 3_600_000;
    put(
        "apply-1",
        enqueue(q, jobs::XRAY_APPLY, "apply-1", Some(later)).await,
    );
    let e = q
        .enqueue(jobs::TRAFFIC_REPORT, "rep-1", vec![0xde, 0xad], None)
        .await
        .unwrap();
    let l = q.lease(jobs::TRAFFIC_REPORT, 1).await.unwrap();
    assert_eq!(l[0].job.id, e.job.id);
    q.fail(l[0].token(), "panel 502", None).await.unwrap();
    put("rep-1", e.job.id);
    put(
        "rep-2",
        enqueue(q, jobs::TRAFFIC_REPORT, "rep-2", None).await,
    );
    ids
}

async fn big(q: &Queue) -> BTreeMap<String, u64> {
    let filler = "x".repeat(4096);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let q = q.clone();
        let payload = format!("{{\"filler\":\"{filler}\"}}").into_bytes();
        tasks.spawn(async move {
            let key = format!("big-{i}");
            let e = q.enqueue(jobs::WEBHOOK, &key, payload, None).await.unwrap();
            (key, e.job.id)
        });
    }
    tasks.join_all().await.into_iter().collect()
}

async fn enqueue(q: &Queue, kind: JobKind, key: &str, not_before: Option<u64>) -> u64 {
    let payload = format!("{{\"key\":\"{key}\"}}").into_bytes();
    let e = q.enqueue(kind, key, payload, not_before).await.unwrap();
    assert!(!e.duplicate);
    e.job.id
}

/// Enqueues a job and fails its one attempt (the fixture's ladder has one rung).
async fn dead(q: &Queue, kind: JobKind, key: &str, error: &str) -> u64 {
    let id = enqueue(q, kind, key, None).await;
    let l = q.lease(kind, 1).await.unwrap();
    assert_eq!(l[0].job.id, id);
    let job = q.fail(l[0].token(), error, None).await.unwrap();
    assert_eq!(job.state(q.now()), JobState::Dead);
    id
}

/// The wall clock, or the wall clock some time back (to write jobs that look old).
#[derive(Debug, Default)]
struct ShiftedClock {
    back_ms: AtomicU64,
}

impl ShiftedClock {
    fn set_back(&self, by: Duration) {
        self.back_ms.store(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now_ms(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        now - self.back_ms.load(Ordering::SeqCst)
    }
}

// ---- stats ----

#[test]
fn stats_counts_jobs_by_kind_and_state() {
    let fx = Fixture::seeded();
    let r = fx.queuectl(&["stats"]).ok();
    assert_eq!(
        row(&r, "KIND"),
        [
            "KIND",
            "SCHEDULED",
            "READY",
            "RUNNING",
            "DONE",
            "DEAD",
            "TOTAL"
        ]
    );
    assert_eq!(
        row(&r, "webhook"),
        ["webhook", "0", "1", "0", "0", "4", "5"]
    );
    assert_eq!(
        row(&r, "node_sync"),
        ["node_sync", "0", "0", "0", "1", "1", "2"]
    );
    assert_eq!(
        row(&r, "xray_apply"),
        ["xray_apply", "1", "0", "0", "0", "0", "1"]
    );
    assert_eq!(
        row(&r, "traffic_report"),
        ["traffic_report", "1", "1", "0", "0", "0", "2"]
    );
    assert_eq!(row(&r, "total"), ["total", "2", "2", "0", "1", "5", "10"]);
    let r = r
        .stdout_has("oldest ready job: due ")
        .stdout_has("quarantined records: 0");
    assert!(r.stderr.is_empty(), "{r}");
    assert_eq!(
        r.queue_line,
        Some(format!(
            "queuectl: database at {} (no daemon running)",
            fx.data_dir().join("queue").display()
        )),
        "one line says which queue was used{r}"
    );

    let r = fx.queuectl(&["stats", "--json"]).ok();
    let v = r.json();
    assert_eq!(v["jobs"]["webhook"]["dead"], 4, "{r}");
    assert_eq!(v["jobs"]["traffic_report"]["scheduled"], 1, "{r}");
    assert_eq!(v["totals"]["ready"], 2, "{r}");
    assert_eq!(v["totals"]["done"], 1, "{r}");
    assert!(v["oldest_ready"].is_string(), "{r}");
    assert_eq!(v["quarantined"], 0, "{r}");
    assert_eq!(v["quarantined_records"], serde_json::json!([]), "{r}");
}

// ---- list ----

#[test]
fn list_filters_by_state_and_kind() {
    let fx = Fixture::seeded();
    let dead = fx.queuectl(&["list", "--state", "dead", "--json"]).ok();
    let want: Vec<u64> = ["old-1", "old-2", "evt-a", "evt-b", "node-1"]
        .map(|k| fx.id(k))
        .to_vec();
    assert_eq!(ids(&dead.json()), want, "{dead}");

    let r = fx
        .queuectl(&["list", "--state", "dead", "--kind", "webhook", "--json"])
        .ok();
    let v = r.json();
    assert_eq!(ids(&v).len(), 4, "{r}");
    for job in v.as_array().unwrap() {
        assert_eq!(job["kind"], "webhook", "{r}");
        assert_eq!(job["dead_reason"], "exhausted", "{r}");
    }

    let r = fx
        .queuectl(&["list", "--kind", "traffic_report", "--json"])
        .ok();
    assert_eq!(ids(&r.json()), [fx.id("rep-1"), fx.id("rep-2")], "{r}");

    // For people: a table, the reason a job is dead, and its last error.
    let r = fx
        .queuectl(&["list", "--kind", "webhook", "--state", "dead"])
        .ok();
    assert_eq!(
        row(&r, "ID"),
        [
            "ID", "KIND", "STATE", "ATTEMPTS", "AT", "KEY", "LAST", "ERROR"
        ]
    );
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("evt-a"))
        .unwrap_or_else(|| panic!("no evt-a row{r}"));
    assert!(line.contains("dead (exhausted)"), "{r}");
    assert!(line.ends_with("connection refused"), "{r}");

    let r = fx.queuectl(&["list", "--state", "bogus"]).code(2);
    assert!(r.stderr.contains("unknown state `bogus`"), "{r}");
    let r = fx.queuectl(&["list", "--kind", "email"]).code(2);
    assert!(r.stderr.contains("unknown job kind `email`"), "{r}");
}

#[test]
fn list_pages_with_limit_and_after() {
    let fx = Fixture::seeded();
    let mut all: Vec<u64> = fx.ids.values().copied().collect();
    all.sort();
    assert_eq!(all.len(), 10);

    let mut seen = Vec::new();
    let mut after: Option<u64> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["list", "--json", "--limit", "3"];
        let after_s = after.map(|a| a.to_string());
        if let Some(a) = &after_s {
            args.extend(["--after", a.as_str()]);
        }
        let r = fx.queuectl(&args).ok();
        let page = ids(&r.json());
        assert!(page.len() <= 3, "{r}");
        if page.is_empty() {
            break;
        }
        pages += 1;
        after = page.last().copied();
        seen.extend(page);
    }
    assert_eq!(seen, all);
    assert_eq!(pages, 4);

    // The human table says how to get the next page.
    let r = fx.queuectl(&["list", "--limit", "2"]).ok();
    let r = r.stdout_has(&format!(
        "(more jobs match: add --after {} for the next page)",
        all[1]
    ));
    assert_eq!(r.stdout.lines().count(), 4, "header, 2 rows, hint{r}");
    let r = fx.queuectl(&["list", "--limit", "0"]).ok();
    assert_eq!(r.stdout.lines().count(), 11, "header and all 10 rows{r}");
    let r = fx
        .queuectl(&["list", "--after", &all[9].to_string()])
        .ok()
        .stdout_has("no jobs match");
    assert_eq!(r.stdout.lines().count(), 1, "{r}");
}

// ---- show ----

#[test]
fn show_prints_the_job_and_its_attempt_history() {
    let fx = Fixture::seeded();
    let id = fx.id("evt-a");
    let r = fx
        .queuectl(&["show", &id.to_string()])
        .ok()
        .stdout_has(&format!("job {id}\n"))
        .stdout_has("evt-a")
        .stdout_has("dead (exhausted)")
        .stdout_has("payload:")
        .stdout_has("{\"key\":\"evt-a\"}")
        .stdout_has("attempt history:");
    assert_eq!(
        row(&r, "#"),
        ["#", "STARTED", "DURATION", "OUTCOME", "DETAIL"]
    );
    let attempt = row(&r, "1");
    assert!(attempt[1].ends_with('Z'), "an RFC 3339 start time{r}");
    assert_eq!(attempt[3..], ["failed", "connection", "refused"], "{r}");

    let r = fx
        .queuectl(&["show", &fx.id("rep-1").to_string(), "--json"])
        .ok();
    let v = r.json();
    assert_eq!(v["state"], "scheduled", "{r}");
    assert_eq!(v["attempts"], 1, "{r}");
    assert_eq!(v["payload_hex"], "dead", "{r}");
    assert_eq!(v["last_error"], "panel 502", "{r}");
    let h = &v["history"][0];
    assert_eq!(h["number"], 1, "{r}");
    assert_eq!(h["outcome"], "failed", "{r}");
    assert_eq!(h["error"], "panel 502", "{r}");
    assert!(h["duration_ms"].is_u64(), "{r}");
    assert!(
        humantime::parse_rfc3339(h["started"].as_str().unwrap()).is_ok(),
        "{r}"
    );

    let r = fx
        .queuectl(&["show", &fx.id("evt-c").to_string()])
        .ok()
        .stdout_has("attempt history: none yet");
    assert!(r.stdout.contains("due:"), "{r}");

    fx.queuectl(&["show", "999"])
        .code(1)
        .one_error_line("queuectl: job 999 not found");
}

// ---- retry ----

#[test]
fn retry_one_job_and_every_dead_job_of_a_kind() {
    let fx = Fixture::seeded();
    let evt_a = fx.id("evt-a").to_string();
    fx.queuectl(&["retry", &evt_a])
        .ok()
        .stdout_has(&format!("job {evt_a} (webhook, key evt-a) is ready"));
    let r = fx.queuectl(&["show", &evt_a, "--json"]).ok();
    assert_eq!(r.json()["state"], "ready", "{r}");
    assert_eq!(r.json()["attempts"], 1, "history is kept{r}");

    // A done job cannot be retried.
    fx.queuectl(&["retry", &fx.id("node-2").to_string()])
        .code(1)
        .one_error_line("is done: cannot retry it");

    let r = fx
        .queuectl(&["retry", "--dead", "--kind", "webhook", "--json"])
        .ok();
    assert_eq!(r.json()["retried"], 3, "old-1, old-2, evt-b{r}");
    assert_eq!(r.json()["left_dead"], 0, "{r}");
    let v = fx.queuectl(&["stats", "--json"]).ok().json();
    assert_eq!(v["jobs"]["webhook"]["dead"], 0);
    assert_eq!(v["jobs"]["webhook"]["ready"], 5);
    assert_eq!(v["jobs"]["node_sync"]["dead"], 1, "other kinds untouched");

    fx.queuectl(&["retry", "--dead"])
        .ok()
        .stdout_has("retried 1 dead job;");
    assert_eq!(
        fx.queuectl(&["stats", "--json"]).ok().json()["totals"]["dead"],
        0
    );

    // Usage errors: nothing to retry named, or --kind without --dead.
    fx.queuectl(&["retry"]).code(2);
    fx.queuectl(&["retry", "--kind", "webhook"]).code(2);
    fx.queuectl(&["retry", &evt_a, "--dead"]).code(2);
}

// ---- cancel ----

#[test]
fn cancel_makes_a_pending_job_dead() {
    let fx = Fixture::seeded();
    let id = fx.id("evt-c").to_string();
    fx.queuectl(&["cancel", &id])
        .ok()
        .stdout_has(&format!("job {id} (webhook, key evt-c) cancelled"));
    let r = fx.queuectl(&["show", &id, "--json"]).ok();
    assert_eq!(r.json()["state"], "dead", "{r}");
    assert_eq!(r.json()["dead_reason"], "cancelled", "{r}");
    fx.queuectl(&["show", &id])
        .ok()
        .stdout_has("dead (cancelled)");

    fx.queuectl(&["cancel", &id])
        .code(1)
        .one_error_line("is dead: cannot cancel it");
    let r = fx
        .queuectl(&["cancel", &fx.id("apply-1").to_string(), "--json"])
        .ok();
    assert_eq!(r.json()["dead_reason"], "cancelled", "{r}");
}

// ---- purge ----

#[test]
fn purge_dead_older_than_keeps_recent_ones() {
    let fx = Fixture::seeded();
    let r = fx
        .queuectl(&["purge", "--dead", "--older-than", "7d", "--json"])
        .ok();
    assert_eq!(r.json()["purged"], 2, "old-1 and old-2{r}");
    assert_eq!(r.json()["state"], "dead", "{r}");
    let r = fx.queuectl(&["list", "--state", "dead", "--json"]).ok();
    assert_eq!(
        ids(&r.json()),
        ["evt-a", "evt-b", "node-1"].map(|k| fx.id(k)),
        "{r}"
    );
    fx.queuectl(&["show", &fx.id("old-1").to_string()])
        .code(1)
        .one_error_line("not found");

    fx.queuectl(&["purge", "--done"])
        .ok()
        .stdout_has("purged 1 done job\n");
    fx.queuectl(&["purge", "--dead", "--older-than", "1h"])
        .ok()
        .stdout_has("purged 0 dead jobs that finished over 1h ago");
    let v = fx.queuectl(&["stats", "--json"]).ok().json();
    assert_eq!(v["totals"]["done"], 0);
    assert_eq!(v["totals"]["dead"], 3);
    assert_eq!(v["totals"]["ready"], 2, "pending jobs untouched");

    fx.queuectl(&["purge"]).code(2);
    fx.queuectl(&["purge", "--dead", "--done"]).code(2);
    fx.queuectl(&["purge", "--dead", "--older-than", "a week"])
        .code(2);
}

// ---- export ----

#[test]
fn export_writes_one_json_job_per_line() {
    let fx = Fixture::seeded();
    let r = fx.queuectl(&["export"]).ok();
    let mut exported = Vec::new();
    for line in r.stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}{r}"));
        assert!(v["kind"].is_string() && v["state"].is_string(), "{r}");
        assert!(v["history"].is_array(), "{r}");
        exported.push(v["id"].as_u64().unwrap());
    }
    let mut all: Vec<u64> = fx.ids.values().copied().collect();
    all.sort();
    assert_eq!(exported, all, "every job once, in id order{r}");
    assert!(r.stderr.is_empty(), "{r}");
}

#[test]
fn export_into_a_closed_pipe_exits_quietly() {
    let fx = Fixture::empty();
    // Far more than a pipe buffer (64 KiB), so the writer must meet the closed end.
    fx.prepare(&Prepare::Big);

    let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
    cmd.arg("--config")
        .arg(&fx.config)
        .arg("export")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut cmd);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("{\"id\":1,"), "{first:?}");
    drop(stdout); // `| head -1`
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let (queue_line, stderr) = split_queue_line(&stderr);
    assert!(queue_line.is_some(), "{stderr}");
    assert_eq!(stderr, "", "a broken pipe is not an error");
}

// ---- quarantine ----

#[test]
fn quarantined_records_show_in_stats_and_list() {
    let fx = Fixture::seeded();
    let id = fx.id("evt-c");
    fx.prepare(&Prepare::Corrupt(id));
    // Reading the jobs finds it unreadable and moves it aside (and logs that).
    let r = fx.queuectl(&["list", "--json"]).ok();
    assert!(!ids(&r.json()).contains(&id), "{r}");
    assert!(r.stderr.contains("quarantine"), "{r}");

    let key = format!("j/{id}");
    let r = fx
        .queuectl(&["stats"])
        .ok()
        .stdout_has("quarantined records: 1 (unreadable");
    let q = row(&r, &key);
    assert!(q.join(" ").contains("checksum mismatch"), "{r}");

    let v = fx.queuectl(&["stats", "--json"]).ok().json();
    assert_eq!(v["quarantined"], 1);
    assert_eq!(v["quarantined_records"][0]["key"], key.as_str());

    let r = fx.queuectl(&["list", "--quarantined", "--json"]).ok();
    assert_eq!(r.json()[0]["key"], key.as_str(), "{r}");
    assert!(
        r.json()[0]["reason"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{r}"
    );
    fx.queuectl(&["list", "--quarantined"])
        .ok()
        .stdout_has(&key);
    fx.queuectl(&["show", &id.to_string()])
        .code(1)
        .one_error_line(&format!("job {id} is quarantined"));
}

// ---- errors ----

/// A running daemon answers on its admin socket, so queuectl works while it runs
/// (`tests/it/admin.rs` compares every command with its offline output). Exit 3 is left
/// for a database held by a process that does not answer there: here, a daemon looked
/// for at the wrong socket.
#[test]
fn a_database_held_by_a_daemon_that_does_not_answer_is_exit_3() {
    let fx = Fixture::seeded();
    let mut daemon = Daemon::start(&fx.config);

    let r = fx.queuectl(&["stats", "--json"]).ok();
    assert_eq!(r.json()["totals"]["ready"], 2, "{r}");
    assert_eq!(
        r.queue_line,
        Some(format!(
            "queuectl: daemon at {}",
            fx.data_dir().join("admin.sock").display()
        )),
        "{r}"
    );

    let elsewhere = fx.dir.path().join("nobody-here.sock");
    let r = fx
        .queuectl(&["stats", "--socket", elsewhere.to_str().unwrap()])
        .code(3)
        .one_error_line("is held by another process, but no daemon running");
    for path in [fx.data_dir().join("queue"), elsewhere] {
        assert!(r.stderr.contains(&path.display().to_string()), "{r}");
    }
    assert!(r.stdout.is_empty(), "{r}");
    fx.queuectl(&[
        "cancel",
        &fx.id("evt-c").to_string(),
        "--socket",
        fx.dir.path().join("nobody-here.sock").to_str().unwrap(),
    ])
    .code(3)
    .one_error_line("held by another process");

    assert_eq!(daemon.stop(), Some(0), "SIGTERM is a clean stop");
    let v = fx.queuectl(&["stats", "--json"]).ok().json();
    assert_eq!(v["totals"]["ready"], 2, "nothing was changed while locked");
}

/// `salvage` reads the database files itself, so it works only on a stopped queue:
/// while the daemon runs it refuses (exit 3, whichever socket it is given) and writes
/// nothing. Stopped, it copies every job of an undamaged queue (the damaged ones are
/// `tests/it/corruption.rs`), and never writes into a directory that holds something.
#[test]
fn salvage_refuses_a_running_daemon_and_copies_a_stopped_queue() {
    let fx = Fixture::seeded();
    let to = fx.dir.path().join("salvaged").join("queue");
    let to_s = to.to_str().unwrap();
    let mut daemon = Daemon::start(&fx.config);
    fx.queuectl(&["salvage", "--to", to_s])
        .code(3)
        .one_error_line("salvage works only on a stopped queue; stop connector first");
    let elsewhere = fx.dir.path().join("nobody-here.sock");
    fx.queuectl(&[
        "salvage",
        "--to",
        to_s,
        "--socket",
        elsewhere.to_str().unwrap(),
    ])
    .code(3)
    .one_error_line("is in use by another process");
    assert!(!to.exists(), "nothing is written while the daemon runs");
    assert_eq!(daemon.stop(), Some(0));

    let r = fx.queuectl(&["salvage", "--to", to_s, "--json"]).ok();
    let v = r.json();
    assert_eq!(v["jobs_kept"], 10, "{r}");
    assert_eq!(v["lost"], 0, "{r}");
    assert_eq!(v["fsck_clean"], true, "{r}");
    assert_eq!(v["sled"], "opened", "{r}");
    let human = fx
        .queuectl(&[
            "salvage",
            "--to",
            fx.dir.path().join("again").to_str().unwrap(),
        ])
        .ok()
        .stdout_has("kept: 10 jobs")
        .stdout_has("lost: no job ids are missing");
    assert!(human.stdout.contains("next: "), "{human}");

    fx.queuectl(&["salvage", "--to", to_s])
        .code(1)
        .one_error_line("is not empty: give a new directory");
    let export = |data_dir: &Path| {
        let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
        cmd.arg("--data-dir").arg(data_dir).arg("export");
        run(cmd).ok().stdout
    };
    assert_eq!(
        export(&fx.data_dir()),
        export(to.parent().unwrap()),
        "the salvaged queue holds the same jobs"
    );
}

/// The real `connector run`, killed on drop if a test fails before stopping it.
struct Daemon {
    child: Reaped,
    /// stderr lines, read on a thread so the daemon never blocks on a full pipe.
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut cmd = bin(env!("CARGO_BIN_EXE_connector"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut cmd);
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child: Reaped(child),
            lines,
            seen: Vec::new(),
        };
        d.wait_for("admin socket open");
        d
    }

    /// Blocks until the daemon logs a line containing `needle` (a generous deadline
    /// only guards against a hang; the wait ends as soon as the line comes).
    fn wait_for(&mut self, needle: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(e) => panic!(
                    "daemon never logged {needle:?} ({e}); its stderr:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// SIGTERM, then its exit code.
    fn stop(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let kill = run({
            let mut cmd = Command::new("kill");
            cmd.args(["-TERM", &pid]);
            cmd
        });
        assert_eq!(kill.code, Some(0), "{kill}");
        let status = self.child.wait().unwrap();
        status.code()
    }
}

#[test]
fn a_data_dir_without_a_queue_is_an_error_not_an_empty_queue() {
    let fx = Fixture::seeded();
    let nowhere = fx.dir.path().join("nowhere");
    let nowhere_s = nowhere.to_str().unwrap();
    // --data-dir wins over the config's data_dir (which holds a queue).
    for args in [
        vec!["--data-dir", nowhere_s, "stats"],
        vec!["--data-dir", nowhere_s, "list", "--json"],
        vec!["--data-dir", nowhere_s, "retry", "--dead"],
    ] {
        fx.queuectl(&args).code(1).one_error_line(&format!(
            "queuectl: no queue at {} (wrong --data-dir?)",
            nowhere.join("queue").display()
        ));
    }
    assert!(!nowhere.exists(), "queuectl must not create a queue");

    // And --data-dir pointing at the real one works without the config.
    let r = run({
        let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
        cmd.arg("--data-dir")
            .arg(fx.data_dir())
            .args(["stats", "--json"]);
        cmd
    })
    .ok();
    assert_eq!(r.json()["totals"]["dead"], 5, "{r}");
}

#[test]
fn a_bad_config_is_exit_2_with_one_line() {
    let fx = Fixture::seeded();
    let bad = fx.dir.path().join("bad.toml");
    std::fs::write(&bad, "[queue.kinds.webhook]\nladder = [\"0s\", \"soon\"]\n").unwrap();
    let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
    cmd.arg("--config").arg(&bad).arg("stats");
    let r = run(cmd)
        .code(2)
        .one_error_line("queue.kinds.webhook.ladder[1]");
    assert!(r.stderr.starts_with("queuectl: config error: "), "{r}");
    assert!(r.stderr.contains(bad.to_str().unwrap()), "{r}");
    assert!(r.stdout.is_empty(), "{r}");

    let mut cmd = bin(env!("CARGO_BIN_EXE_queuectl"));
    cmd.arg("--config")
        .arg(fx.dir.path().join("missing.toml"))
        .arg("stats");
    run(cmd).code(2).one_error_line("missing.toml");
}
