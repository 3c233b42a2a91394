//! The admin socket end to end (issue 7): the real `connector` daemon serving it, the
//! real `queuectl` talking to it.
//!
//! - every `queuectl` command prints the same through the daemon as on the stopped
//!   database (a copy of it, for the commands that change it);
//! - the socket is 0600 and its owner's only; a stale one is replaced, a live one
//!   refused, and it is gone after a clean stop;
//! - `tail` shows jobs as they move;
//! - `fsck` finds a corrupt record and a broken index entry, `--repair` fixes them, and
//!   the agent runs its jobs afterwards.
//!
//! Queues are prepared and damaged in a child process (this test binary run again as
//! [`child`]): a process that has exited holds no sled lock (see `tests/it/queuectl.rs`).

use crate::support::agent;
use crate::support::panel;
use crate::support::wait;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use agent::{Daemon, Lines, Opts, Rig, WAIT};
use connector::jobs;
use connector::jobs::node_sync::state::{self as sync_state, Held, SyncState};
use connector::jobs::node_sync::userlist::User;
use connector::jobs::xray_apply::bans::{self, Ban};
use connector::queue::record::decode_job;
use connector::queue::{Commit, ListFilter, Queue, Stored, SystemClock};
use panel::Answer;
use serde_json::Value;

// ---- running queuectl ----

/// One run of `queuectl`: stdout, stderr without the which-queue line, and that line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    queue_line: String,
}

fn queuectl(config: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
    agent::scrub(&mut cmd);
    cmd.arg("--config").arg(config).args(args);
    run(cmd)
}

fn run(mut cmd: Command) -> Out {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (queue_line, rest) = match stderr.split_once('\n') {
        Some((first, rest))
            if first.starts_with("queuectl: daemon at ")
                || first.starts_with("queuectl: database at ") =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (String::new(), stderr),
    };
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: rest,
        queue_line,
    }
}

/// `(…ago)`, `(in …)`, `(now)`, `(just now)` → `(REL)`: relative times move on
/// between two runs of the same command.
fn without_relative_times(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('(') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        match tail.find(')') {
            Some(close) => {
                let inner = &tail[1..close];
                let relative = inner.ends_with(" ago")
                    || inner.starts_with("in ")
                    || inner == "now"
                    || inner == "just now";
                out.push_str(if relative { "(REL)" } else { &tail[..=close] });
                rest = &tail[close + 1..];
            }
            None => {
                out.push_str(tail);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// RFC 3339 seconds (`2026-01-01T00:00:00Z`) → `TIME`: a change stamps the time it
/// was made, which differs between the live and the offline run.
fn without_timestamps(s: &str) -> String {
    let b = s.as_bytes();
    let shape = |i: usize| {
        b.len() >= i + 20
            && b[i..i + 20].iter().enumerate().all(|(j, &c)| match j {
                4 | 7 => c == b'-',
                10 => c == b'T',
                13 | 16 => c == b':',
                19 => c == b'Z',
                _ => c.is_ascii_digit(),
            })
    };
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if shape(i) {
            out.push_str("TIME");
            i += 20;
        } else {
            let c = s[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

// ---- a daemon without a rig ----

/// `connector run --config CONFIG --log-format json`, once its admin socket is open.
fn start_daemon(dir: &Path, config: &Path) -> Daemon {
    let mut cmd = agent::connector(dir);
    cmd.arg("run").arg("--config").arg(config);
    let d = Daemon::spawn(cmd);
    wait_line(&d.lines, "admin socket open");
    d
}

fn wait_line(lines: &Lines, needle: &str) -> String {
    match lines.wait(0, WAIT, |l| l.contains(needle)) {
        Ok((_, l)) => l,
        Err(()) => panic!("never saw {needle:?}; stderr:\n{}", lines.text()),
    }
}

fn stop(d: &mut Daemon) -> Option<i32> {
    let pid = d.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    match wait::wait_exit(&mut d.child, WAIT) {
        Ok(status) => status.code(),
        Err(_) => panic!("the daemon did not stop:\n{}", d.lines.text()),
    }
}

/// Kills the daemons it holds when a test fails before stopping them (each daemon's
/// child is `Reaped`).
struct Guard(Vec<Daemon>);

// ---- the child process ----

const CHILD_ENV: &str = "ADMIN_TEST_CHILD";
const CONFIG_ENV: &str = "ADMIN_TEST_CONFIG";
const RESULT: &str = "result: ";

/// Runs [`child`] with `what` on the queue of `config`; returns what it printed.
fn in_child(what: &str, config: &Path) -> Value {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "admin::child",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD_ENV, what)
    .env(CONFIG_ENV, config);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(RESULT).map(|(_, r)| r))
        .unwrap_or_else(|| panic!("child {what} printed no result:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Not a test of its own: what [`in_child`] runs. Without its variable it does nothing.
#[test]
fn child() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let config_file = PathBuf::from(std::env::var(CONFIG_ENV).unwrap());
    let config = connector::config::load(Some(&config_file), &BTreeMap::<String, String>::new())
        .expect("the test's config loads");
    let path = config.queue_path();
    let result = match what.as_str() {
        "rich" => rich(&path, &config),
        "damage" => damage(&path),
        other => panic!("unknown {CHILD_ENV}={other}"),
    };
    println!("{RESULT}{result}");
}

fn open(path: &Path, config: &connector::config::Config) -> Queue {
    // sled's threads may hold the lock of a just-dropped handle a moment longer.
    match wait::when_unlocked(
        path,
        || Queue::open(path, config.queue.clone(), Arc::new(SystemClock)),
        |e| matches!(e, connector::queue::Error::Locked { .. }),
    ) {
        Ok((q, _)) => q,
        Err(e) => panic!("{e}"),
    }
}

fn raw_sled(path: &Path) -> sled::Db {
    match wait::when_unlocked(path, || sled::open(path), wait::sled_locked) {
        Ok(db) => db,
        Err(e) => panic!("{e}"),
    }
}

fn job_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'j'];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A queue with a bit of everything, none of which an idle daemon (no nodes) touches:
///
/// | key | kind | state |
/// |---|---|---|
/// | n-dead-1, n-dead-2 | node_sync | dead (exhausted) |
/// | n-sched | node_sync | scheduled (in a day) |
/// | n-done | node_sync | done |
/// | a-sched | xray_apply | scheduled (in a day) |
/// | w-sched | webhook | scheduled (in a day; a binary payload) |
/// | w-corrupt | webhook | dead, then its record damaged and quarantined |
///
/// plus a held sync and a ban of node 1.
fn rich(path: &Path, config: &connector::config::Config) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ids = BTreeMap::new();
    rt.block_on(async {
        let q = open(path, config);
        let later = Some(q.now() + 24 * 3600 * 1000);
        for (kind, key, payload, due) in [
            (jobs::NODE_SYNC, "n-dead-1", &b"{\"node\":1}"[..], None),
            (jobs::NODE_SYNC, "n-dead-2", b"{\"node\":2}", None),
            (jobs::NODE_SYNC, "n-sched", b"{\"node\":3}", later),
            (jobs::NODE_SYNC, "n-done", b"{\"node\":4}", None),
            (jobs::XRAY_APPLY, "a-sched", b"{\"node\":1}", later),
            (jobs::WEBHOOK, "w-sched", b"\x00\x01binary", later),
            (jobs::WEBHOOK, "w-corrupt", b"{\"n\":1}", None),
        ] {
            let e = q.enqueue(kind, key, payload.to_vec(), due).await.unwrap();
            ids.insert(key.to_string(), e.job.id);
            if due.is_some() {
                continue;
            }
            let leased = q.lease(kind, 1).await.unwrap();
            assert_eq!(leased.len(), 1, "{key} leased");
            let token = leased[0].token();
            if key == "n-done" {
                q.ack(token).await.unwrap();
            } else {
                q.fail(token, &format!("{key}: HTTP 503"), None)
                    .await
                    .unwrap();
                if kind == jobs::WEBHOOK {
                    // webhook's ladder has more rungs: cancel makes it dead at once.
                    q.cancel(e.job.id).await.unwrap();
                }
            }
        }
        let user = |n: u128| User {
            uuid: uuid::Uuid::from_u128(n),
            email: None,
            flow: None,
            level: None,
        };
        let state = SyncState {
            etag: None,
            generation: 3,
            fetched_at: q.now(),
            users: (1..=4).map(user).collect(),
            held: Some(Held {
                users: vec![user(1)].into(),
                since: q.now() - 60_000,
                removed: 3,
                before: 4,
                confirmed: false,
            }),
        };
        let mut banned = bans::Bans::new();
        banned.insert(
            "gone@example".to_string(),
            Ban {
                removed_at: q.now() - 30_000,
                bytes_at_removal: 10,
                bytes_since: 2048,
                last_checked: q.now(),
                ..Ban::default()
            },
        );
        q.commit(Commit {
            state: vec![sync_state::put(1, &state), bans::put(1, &banned)],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    drop(rt);
    // Damage w-corrupt's record behind the queue's back, then let a read quarantine it
    // (so both runs see the same quarantine entry).
    let corrupt = ids["w-corrupt"];
    {
        let db = raw_sled(path);
        let mut raw = db.get(job_key(corrupt)).unwrap().unwrap().to_vec();
        *raw.last_mut().unwrap() ^= 0xff;
        db.insert(job_key(corrupt), raw).unwrap();
        db.flush().unwrap();
    }
    let q = open(path, config);
    assert_eq!(
        q.list(&ListFilter::default()).unwrap().len(),
        ids.len() - 1,
        "the damaged record is moved aside"
    );
    serde_json::to_value(ids).unwrap()
}

/// Damages a queue the agent ran (tests `fsck_…`): flips the last byte of the first
/// xray_apply job's record, and removes the index entry of node 2's newest sync job.
fn damage(path: &Path) -> Value {
    let db = raw_sled(path);
    let mut jobs = Vec::new();
    for entry in db.scan_prefix(b"j") {
        let (_, raw) = entry.unwrap();
        jobs.push(decode_job(&raw, &jobs::ALL).unwrap());
    }
    let apply = jobs
        .iter()
        .find(|j| j.kind == jobs::XRAY_APPLY)
        .expect("an xray_apply job");
    let sync = jobs
        .iter()
        .rev()
        .find(|j| j.kind == jobs::NODE_SYNC && j.key == connector::jobs::node_key(2))
        .expect("a sync job of node 2");
    let mut raw = db.get(job_key(apply.id)).unwrap().unwrap().to_vec();
    *raw.last_mut().unwrap() ^= 0xff;
    db.insert(job_key(apply.id), raw).unwrap();
    // The index layout is in queue-schema/README.md.
    let index = match sync.stored {
        Stored::Pending { due_ms } => {
            let mut k = vec![b'p', jobs::NODE_SYNC.code()];
            k.extend_from_slice(&due_ms.to_be_bytes());
            k.extend_from_slice(&sync.id.to_be_bytes());
            k
        }
        Stored::Running { .. } => {
            let mut k = vec![b'r'];
            k.extend_from_slice(&sync.id.to_be_bytes());
            k
        }
        Stored::Done { at_ms } | Stored::Dead { at_ms, .. } => {
            let state = if matches!(sync.stored, Stored::Done { .. }) {
                1
            } else {
                2
            };
            let mut k = vec![b'f', state];
            k.extend_from_slice(&at_ms.to_be_bytes());
            k.extend_from_slice(&sync.id.to_be_bytes());
            k
        }
    };
    assert!(
        db.remove(&index).unwrap().is_some(),
        "the index entry existed"
    );
    db.flush().unwrap();
    serde_json::json!({ "corrupt": apply.id, "unindexed": sync.id })
}

// ---- the fixture of the comparison ----

/// A temp dir with `data/` and a config with no nodes: the daemon runs, but changes
/// nothing in a queue prepared by [`rich`].
struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = dir.path().join("connector.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\
                 [sync]\nmax_removal_ratio = 0.5\nconfirm_after = \"10m\"\n\
                 [queue.kinds.node_sync]\nladder = [\"0s\"]\non_exhausted = \"dead\"\n"
            ),
        )
        .unwrap();
        Fixture { dir, config }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket(&self) -> PathBuf {
        self.data().join("admin.sock")
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// SPEC §2 and issue 7: every queuectl command works through the running daemon with
/// the same output as on the stopped database. The read-only commands run against the
/// same database; the commands that change it run, in order, once through the daemon
/// and once offline on a copy of the database taken before.
#[test]
fn every_command_prints_the_same_through_the_daemon_as_offline() {
    let fx = Fixture::new();
    let ids = in_child("rich", &fx.config);
    let id = |key: &str| ids[key].as_u64().unwrap().to_string();
    let before = fx.dir.path().join("data.before");
    copy_dir(&fx.data(), &before);

    let read_only: Vec<Vec<String>> = [
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["list", "--state", "dead"],
        vec!["list", "--kind", "node_sync", "--limit", "2"],
        vec!["list", "--quarantined"],
        vec!["list", "--quarantined", "--json"],
        vec!["show", &id("n-dead-1")],
        vec!["show", &id("w-sched"), "--json"],
        vec!["show", "999"],
        vec!["show", &id("w-corrupt")],
        vec!["export"],
        vec!["held"],
        vec!["held", "--json"],
        vec!["bans"],
        vec!["bans", "--json"],
        vec!["traffic"],
        vec!["traffic", "--json"],
        vec!["relays"],
        vec!["relays", "--json"],
        vec!["accept-loss"],
        vec!["fsck"],
        vec!["fsck", "--json"],
    ]
    .into_iter()
    .map(|a| a.into_iter().map(String::from).collect())
    .collect();
    let changes: Vec<Vec<String>> = [
        vec!["cancel", &id("n-sched")],
        vec!["cancel", &id("n-done")],
        vec!["retry", &id("n-dead-1"), "--json"],
        vec!["retry", "--dead", "--kind", "node_sync"],
        vec!["purge", "--done"],
        vec!["purge", "--dead", "--older-than", "7d", "--json"],
        vec!["confirm", "1"],
        vec!["confirm", "7"],
        vec!["held", "--json"],
        vec!["fsck", "--repair"],
        vec!["stats", "--json"],
    ]
    .into_iter()
    .map(|a| a.into_iter().map(String::from).collect())
    .collect();
    let run_all = |cmds: &[Vec<String>]| -> Vec<Out> {
        cmds.iter()
            .map(|a| {
                let args: Vec<&str> = a.iter().map(String::as_str).collect();
                queuectl(&fx.config, &args)
            })
            .collect()
    };

    let mut guard = Guard(vec![start_daemon(fx.dir.path(), &fx.config)]);
    let live_reads = run_all(&read_only);
    let live_changes = run_all(&changes);
    assert_eq!(stop(&mut guard.0[0]), Some(0), "a clean stop");
    assert!(
        !fx.socket().exists(),
        "the socket is removed at a clean stop"
    );

    copy_dir(&before, &fx.data());
    let offline_reads = run_all(&read_only);
    copy_dir(&before, &fx.data());
    let offline_changes = run_all(&changes);

    let live_line = format!("queuectl: daemon at {}", fx.socket().display());
    let offline_line = format!(
        "queuectl: database at {} (no daemon running)",
        fx.data().join("queue").display()
    );
    let mut failures = Vec::new();
    for (cmds, live, offline, stamps) in [
        (&read_only, &live_reads, &offline_reads, false),
        (&changes, &live_changes, &offline_changes, true),
    ] {
        for ((args, l), o) in cmds.iter().zip(live).zip(offline) {
            // A relative time's length also moves table columns: blanks are squeezed.
            let norm = |s: &str| {
                let s = without_relative_times(s);
                let s = if stamps { without_timestamps(&s) } else { s };
                s.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let (l_out, o_out) = (norm(&l.stdout), norm(&o.stdout));
            if l.code != o.code || l_out != o_out || l.stderr != o.stderr {
                failures.push(format!(
                    "queuectl {}\n--- live ({:?})\n{}{}--- offline ({:?})\n{}{}",
                    args.join(" "),
                    l.code,
                    l.stdout,
                    l.stderr,
                    o.code,
                    o.stdout,
                    o.stderr
                ));
            }
            if l.queue_line != live_line || o.queue_line != offline_line {
                failures.push(format!(
                    "queuectl {}: which queue: live {:?}, offline {:?}",
                    args.join(" "),
                    l.queue_line,
                    o.queue_line
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // And the outputs are what they should be, not merely equal.
    let by = |args: &[&str]| {
        let i = read_only
            .iter()
            .position(|a| a.iter().map(String::as_str).eq(args.iter().copied()))
            .unwrap();
        &live_reads[i]
    };
    let stats: Value = serde_json::from_str(&by(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(stats["totals"]["dead"], 2, "{stats}");
    assert_eq!(stats["totals"]["scheduled"], 3, "{stats}");
    assert_eq!(stats["quarantined"], 1, "{stats}");
    assert!(by(&["stats"]).stdout.contains("held syncs: 1 (node 1)"));
    assert_eq!(by(&["show", "999"]).code, Some(1));
    assert!(by(&["show", "999"]).stderr.contains("job 999 not found"));
    assert!(
        by(&["show", &id("w-corrupt")])
            .stderr
            .contains("is quarantined")
    );
    assert_eq!(by(&["export"]).stdout.lines().count(), 6);
    assert!(by(&["bans"]).stdout.contains("gone@example"));
    assert!(by(&["fsck"]).stdout.contains("no problems found"));
    let last: Value = serde_json::from_str(&live_changes.last().unwrap().stdout).unwrap();
    assert_eq!(
        last["totals"]["ready"], 3,
        "the dead syncs retried, the cancelled one too: {last}"
    );
    assert_eq!(last["totals"]["done"], 0, "done ones purged: {last}");
    assert_eq!(
        live_changes[1].code,
        Some(1),
        "a done job cannot be cancelled"
    );
    assert_eq!(live_changes[7].code, Some(1), "node 7 has no held sync");
}

// ---- the socket ----

/// The socket is 0600 and its owner's: another user cannot connect (checked as
/// `nobody` when the tests run as root, as in CI). A socket left by a killed daemon is
/// replaced at the next start; one a daemon answers on makes a second daemon refuse;
/// a clean stop removes it.
#[test]
fn the_socket_is_private_replaced_when_stale_refused_when_live() {
    let fx = Fixture::new();
    let mut guard = Guard(vec![start_daemon(fx.dir.path(), &fx.config)]);
    let sock = fx.socket();
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600, "mode {:o}", m.mode() & 0o777);
    let me = unsafe { libc::geteuid() };
    assert_eq!(m.uid(), me, "owned by the daemon's user");
    assert_eq!(queuectl(&fx.config, &["stats"]).code, Some(0));

    if me == 0 {
        // Let `nobody` reach the socket through the directories: only its mode stops it.
        for d in [fx.dir.path(), &fx.data()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
        agent::scrub(&mut cmd);
        cmd.arg("--socket")
            .arg(&sock)
            .arg("stats")
            .uid(65534)
            .gid(65534);
        let r = run(cmd);
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(r.stderr.contains("permission denied"), "{r:?}");
        assert!(r.stdout.is_empty(), "{r:?}");
    } else {
        eprintln!("not root: another user's connect is not tried; mode and owner are checked");
    }

    // A second daemon (another data_dir) configured onto the same socket refuses.
    let other = fx.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "data_dir = {:?}\n[admin]\nsocket = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n",
            fx.dir.path().join("data2"),
            sock
        ),
    )
    .unwrap();
    let mut cmd = agent::connector(fx.dir.path());
    cmd.arg("run").arg("--config").arg(&other);
    let r = agent::Run::of(cmd);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("another connector daemon is answering"),
        "{r}"
    );
    assert!(sock.exists(), "the live socket is left alone");

    // kill -9 leaves the socket behind; the next start replaces it.
    let _ = guard.0[0].child.kill();
    let _ = guard.0[0].child.wait();
    assert!(sock.exists(), "a killed daemon leaves its socket");
    guard.0.push(start_daemon(fx.dir.path(), &fx.config));
    wait_line(&guard.0[1].lines, "replacing a stale admin socket");
    let r = queuectl(&fx.config, &["stats", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.queue_line.starts_with("queuectl: daemon at "), "{r:?}");
    assert_eq!(stop(&mut guard.0[1]), Some(0));
    assert!(!sock.exists(), "a clean stop removes the socket");
}

// ---- tail ----

/// `queuectl tail --json` shows a job's enqueue, lease and completion as they happen,
/// ends cleanly when the daemon stops, and needs a daemon.
#[test]
fn tail_shows_jobs_as_they_move() {
    let mut rig = Rig::new(Opts::default());
    rig.start();
    rig.wait_log(0, "the admin socket", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("admin socket open"))
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_queuectl"));
    agent::scrub(&mut cmd);
    cmd.arg("--config")
        .arg(&rig.config)
        .args(["tail", "--json"]);
    let mut tail = Daemon::spawn_with_stdout(cmd);
    let events = |tail: &agent::Daemon| -> Vec<Value> {
        tail.lines
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    // tail is following once it shows an event (node 1's syncs fail on the panel's
    // 404 every interval): only then does the list that causes the apply appear.
    wait::wait_until(WAIT, "tail to show an event", || !events(&tail).is_empty())
        .unwrap_or_else(|e| panic!("{e}: {}", rig.report()));

    let users = agent::uuids(3);
    rig.panel.set(1, Answer::list(&users));
    let from = rig.mark();
    rig.wait_applied(from, 1, 1);

    // The apply the new list caused: enqueued, leased (attempt 1), done, in order.
    let apply_events = wait::wait_for(WAIT, "tail to show an xray_apply done", || {
        let apply: Vec<Value> = events(&tail)
            .into_iter()
            .filter(|e| e["kind"] == "xray_apply")
            .collect();
        apply.iter().any(|e| e["event"] == "done").then_some(apply)
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", events(&tail), rig.report()));
    let id = apply_events[0]["id"].clone();
    let names: Vec<&str> = apply_events
        .iter()
        .filter(|e| e["id"] == id)
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["enqueued", "leased", "done"], "{apply_events:#?}");
    let leased = apply_events
        .iter()
        .find(|e| e["event"] == "leased")
        .unwrap();
    assert_eq!(leased["attempt"], 1);
    assert!(
        events(&tail)
            .iter()
            .any(|e| e["kind"] == "node_sync" && e["event"] == "done"),
        "syncs are shown too"
    );

    assert_eq!(rig.stop(), Some(0));
    let status = tail.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "tail ends cleanly when the daemon stops"
    );
    assert_eq!(events(&tail).last().unwrap()["event"], "stopping");

    let r = queuectl(&rig.config, &["tail"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("tail needs a running daemon"), "{r:?}");
}

// ---- fsck ----

/// A corrupt job record and a missing index entry in a queue the agent ran: `fsck`
/// reports both by key (exit 1), `--repair` moves the record to quarantine and writes
/// the entry (exit 0), a second `fsck` is clean, and the agent syncs and applies both
/// nodes afterwards.
#[test]
fn fsck_reports_a_corrupt_record_and_a_broken_index_and_repairs_them() {
    let mut rig = Rig::new(Opts {
        nodes: vec![1, 2],
        ..Opts::default()
    });
    rig.panel.set(1, Answer::list(&agent::uuids(2)));
    rig.panel.set(2, Answer::list(&agent::uuids(2)));
    rig.start();
    rig.wait_applied(0, 1, 1);
    rig.wait_applied(0, 2, 1);
    assert_eq!(rig.stop(), Some(0));

    let damaged = in_child("damage", &rig.config);
    let corrupt = damaged["corrupt"].as_u64().unwrap();
    let unindexed = damaged["unindexed"].as_u64().unwrap();

    let r = queuectl(&rig.config, &["fsck"]);
    assert_eq!(r.code, Some(1), "problems found, not repaired: {r:?}");
    assert!(r.stdout.contains("2 problems found"), "{}", r.stdout);
    let r = queuectl(&rig.config, &["fsck", "--json"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{v:#}");
    let of = |key: String| {
        problems
            .iter()
            .find(|p| p["key"] == key)
            .unwrap_or_else(|| panic!("no problem for {key}: {v:#}"))
    };
    assert!(
        of(format!("j/{corrupt}"))["problem"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{v:#}"
    );
    assert!(
        of(format!("j/{unindexed}"))["problem"]
            .as_str()
            .unwrap()
            .contains("is missing"),
        "{v:#}"
    );

    let r = queuectl(&rig.config, &["fsck", "--repair"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("2 problems found; 2 repaired"),
        "{}",
        r.stdout
    );
    let r = queuectl(&rig.config, &["fsck"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("no problems found"), "{}", r.stdout);
    let q = rig.queuectl(&["list", "--quarantined", "--json"]);
    assert!(
        q.as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"] == format!("j/{corrupt}")),
        "the record is set aside, not deleted: {q:#}"
    );
    rig.queuectl(&["show", &unindexed.to_string(), "--json"]);

    // The other jobs still run: both nodes sync a new list and apply it.
    rig.start();
    let from = rig.mark();
    rig.panel.set(1, Answer::list(&agent::uuids(3)));
    rig.panel.set(2, Answer::list(&agent::uuids(3)));
    rig.wait_applied(from, 1, 2);
    rig.wait_applied(from, 2, 2);
    let r = queuectl(&rig.config, &["fsck"]);
    assert_eq!(r.code, Some(0), "live fsck after the run: {r:?}");
    assert_eq!(rig.stop(), Some(0));
}
