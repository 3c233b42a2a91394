//! Faults the agent survives (SPEC §4), against the real `connector` binary, a real
//! HTTP panel (`connector::sim::panel`) and a real HTTPS relay (`connector::sim::relay`):
//!
//! - a full disk: `data_dir` on a small tmpfs that the test fills (root only: it
//!   mounts; in CI, which runs as root, not being root fails the test);
//! - the queue database deleted underneath the running daemon.
//!
//! Nothing waits by sleeping: each step waits for an answer, a log line, a file, a
//! request reaching a server, with a deadline only a hang reaches.

use crate::support::agent;
use crate::support::panel;
use crate::support::receiver;
use crate::support::{cores, wait};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use agent::{Opts, Rig, WAIT};
use connector::jobs;
use panel::Answer;
use receiver::Receiver;
use serde_json::{Value, json};

/// An HTTP/1.1 exchange: (status, headers in lower case, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn event(id: &str) -> Vec<u8> {
    json!({
        "relay_id": "r1",
        "status": "success",
        "key": "sk-live-7Qm2ZbT9xWc4Lp0NfRj8VhYs",
        "client": {"version": "1.2.0", "platform": "linux"},
        "event_id": id,
    })
    .to_string()
    .into_bytes()
}

fn healthz(addr: SocketAddr) -> (u16, Value) {
    let (status, _, body) = http(addr, "GET", "/healthz", b"");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `connector_queue_writable` as `/metrics` shows it.
fn writable_gauge(addr: SocketAddr) -> Option<f64> {
    let (_, _, body) = http(addr, "GET", "/metrics", b"");
    body.lines()
        .find_map(|l| l.strip_prefix("connector_queue_writable "))
        .and_then(|v| v.trim().parse().ok())
}

/// True when the test may mount; false (after saying SKIPPED) when it cannot and is
/// not in CI. In CI it must.
fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root (it mounts a tmpfs) and CI=true: run the tests as root");
    }
    cores::skipped(test, "needs root to mount a tmpfs");
    false
}

/// A tmpfs mounted for the test; unmounted when dropped, even on failure.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs on {} failed", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the daemon may still hold files there while the rig is torn down.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem is full (or `limit` bytes).
fn fill(path: &Path, limit: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written = 0;
    while written < limit {
        let n = (limit - written).min(chunk.len() as u64) as usize;
        match f.write(&chunk[..n]) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// The rig of these tests: one node synced with the hook, a relay, the listener.
fn rig(receiver: &Receiver) -> Rig {
    let rig = Rig::new(Opts::default());
    let providers = rig.path("providers");
    std::fs::create_dir_all(&providers).unwrap();
    std::fs::write(rig.path("ca.pem"), &receiver.ca_pem).unwrap();
    std::fs::write(
        providers.join("r1.json"),
        json!({"id": "r1", "name": "relay", "webhook": {"callback_url": receiver.url("/cb")}})
            .to_string(),
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&rig.config).unwrap();
    text.push_str(&format!(
        "[webhook]\nproviders_dir = {providers:?}\nca_file = {ca:?}\nreload_interval = \"100ms\"\n",
        ca = rig.path("ca.pem")
    ));
    agent::write_private(&rig.config, &text);
    rig
}

fn delivered_ids(receiver: &Receiver) -> std::collections::BTreeSet<String> {
    receiver
        .requests()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect()
}

#[test]
fn a_full_disk_refuses_writes_keeps_syncing_survives_a_restart_and_resumes() {
    if !can_mount("a_full_disk_refuses_writes_keeps_syncing_survives_a_restart_and_resumes") {
        return;
    }
    let receiver = Receiver::start();
    let mut rig = rig(&receiver);
    let data = rig.path("data");
    let _tmpfs = Tmpfs::mount(&data, "16m");
    let first = agent::uuids(3);
    rig.panel.set(1, Answer::list(&first));
    // Leave a few MiB: the events fill them.
    fill(
        &data.join("filler-1"),
        free_bytes(&data).saturating_sub(4 * 1024 * 1024),
    );
    rig.start();
    let addr = rig.http_addr();
    rig.wait_file(&rig.files(1).txt);

    // Post until the agent refuses: a 503 that says when to come back.
    let mut acked: Vec<String> = Vec::new();
    let mut refused = None;
    for i in 0..50_000 {
        let id = format!("evt-{i}");
        let (status, headers, body) = http(addr, "POST", "/v1/webhooks/connect", &event(&id));
        match status {
            202 => acked.push(id),
            503 => {
                refused = Some((headers, body));
                break;
            }
            other => rig.fail(&format!("POST answered {other}: {body}")),
        }
    }
    let Some((headers, body)) = refused else {
        rig.fail("50000 events were accepted on a 4 MiB disk: never refused");
    };
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v.parse::<u64>().is_ok()),
        "a 503 without Retry-After: {headers:?} {body}"
    );
    assert!(
        !acked.is_empty(),
        "nothing was accepted before the disk filled"
    );
    // And the rest of the disk, by someone else.
    fill(&data.join("filler-2"), u64::MAX);

    // Up, unhealthy, and naming the disk.
    let (status, report) = healthz(addr);
    assert_eq!(status, 503, "{report}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("ENOSPC") && problems.contains(&data.display().to_string()),
        "/healthz does not name the full data_dir: {report}"
    );
    assert!(!rig.exited(), "the agent exited on a full disk");
    assert_eq!(
        writable_gauge(addr),
        Some(0.0),
        "connector_queue_writable on a full disk"
    );

    // Node sync goes on: a changed list reaches the output files (another filesystem)
    // and the hook.
    let second = agent::uuids(5);
    rig.panel.set(1, Answer::list(&second));
    rig.wait_until("the new list in the output files", || {
        rig.files(1).check(1, &second).is_ok()
    });
    rig.wait_until("the hook to apply the new list", || {
        rig.hook_runs("ok").last().is_some_and(|h| {
            rig.seen_by_hook(h.n) == agent::sorted(second.clone()).join("\n") + "\n"
        })
    });
    let (status, _, _) = http(addr, "POST", "/v1/webhooks/connect", &event("evt-full"));
    assert_eq!(status, 503, "an event was acknowledged on a full disk");

    // A restart on the full disk starts, serves /healthz, refuses writes. Whatever the
    // stop gave back (sled's last flush, the stats it could not fold) is taken again:
    // the disk is full when the agent starts, as it would be for a restart loop.
    assert_eq!(rig.stop(), Some(0), "the agent did not stop cleanly");
    fill(&data.join("filler-3"), u64::MAX);
    rig.start();
    let addr = rig.http_addr();
    // Opening gives space back (the queue's 1 MiB reserve, and sled may trim its log's
    // tail on recovery, by however much its last run left there): taken too, so that
    // the disk is full again whatever the open freed.
    rig.wait_until("/healthz to answer after the restart", || {
        healthz(addr).0 != 0
    });
    fill(&data.join("filler-4"), u64::MAX);
    rig.wait_until("/healthz 503 after the restart", || healthz(addr).0 == 503);
    assert!(
        !rig.exited(),
        "the agent exited after a restart on a full disk"
    );
    let (status, _, _) = http(addr, "POST", "/v1/webhooks/connect", &event("evt-full-2"));
    assert_eq!(status, 503, "an event was acknowledged on a full disk");
    let third = agent::uuids(2);
    rig.panel.set(1, Answer::list(&third));
    rig.wait_until("node sync after a restart on a full disk", || {
        rig.files(1).check(1, &third).is_ok()
    });

    // Space comes back: writes resume by themselves.
    for f in ["filler-4", "filler-3", "filler-2", "filler-1"] {
        std::fs::remove_file(data.join(f)).unwrap();
    }
    rig.wait_until("/healthz 200 once space is freed", || {
        healthz(addr).0 == 200
    });
    rig.wait_until("connector_queue_writable 1", || {
        writable_gauge(addr) == Some(1.0)
    });
    let (status, _, body) = http(addr, "POST", "/v1/webhooks/connect", &event("evt-after"));
    assert_eq!(status, 202, "{body}");
    acked.push("evt-after".into());

    // Every acknowledged event is delivered: none was lost.
    rig.wait_until("every acknowledged event at the relay", || {
        let got = delivered_ids(&receiver);
        acked.iter().all(|id| got.contains(id))
    });
}

#[test]
fn a_deleted_queue_stops_acknowledging_and_says_so() {
    let receiver = Receiver::start();
    let mut rig = rig(&receiver);
    rig.panel.set(1, Answer::list(&agent::uuids(2)));
    rig.start();
    let addr = rig.http_addr();
    for i in 0..5 {
        let (status, _, body) = http(
            addr,
            "POST",
            "/v1/webhooks/connect",
            &event(&format!("e{i}")),
        );
        assert_eq!(status, 202, "{body}");
    }
    let queue = rig.path("data/queue");
    let mark = rig.mark();
    std::fs::remove_dir_all(&queue).unwrap();
    let (_, line) = rig.wait_log(mark, "an error naming the deleted queue", |v| {
        v["level"] == "ERROR"
            && v.to_string().contains(&queue.display().to_string())
            && v.to_string().contains("deleted")
    });
    assert!(line.to_string().contains("deleted"), "{line}");
    let (status, report) = healthz(addr);
    assert_eq!(status, 503, "{report}");
    assert!(
        report["problems"]
            .to_string()
            .contains(&queue.display().to_string()),
        "/healthz does not name the deleted queue: {report}"
    );
    let (status, headers, body) = http(addr, "POST", "/v1/webhooks/connect", &event("late"));
    assert_eq!(
        status, 503,
        "an event was acknowledged into a deleted queue: {body}"
    );
    assert!(
        headers.iter().any(|(k, _)| k == "retry-after"),
        "{headers:?}"
    );
    assert!(!rig.exited());
}

/// The queue alone, where nothing probes the disk before sled meets ENOSPC: the failed
/// write poisons sled's handle; reads go on, nothing acknowledged is lost, and the probe
/// opens the database again once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_loses_nothing_acknowledged_and_the_queue_reopens_when_space_returns() {
    use connector::queue::{Queue, SystemClock};
    if !can_mount(
        "a_failed_write_loses_nothing_acknowledged_and_the_queue_reopens_when_space_returns",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, "8m");
    let path = data.join("queue");
    let open = || Queue::open(&path, jobs::settings(), std::sync::Arc::new(SystemClock));
    let (q, _) = open().unwrap();
    assert!(q.writability().writable());
    fill(&data.join("filler"), u64::MAX);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..200_000 {
        match q
            .enqueue(jobs::WEBHOOK, &format!("k{i}"), vec![7; 300], None)
            .await
        {
            Ok(e) => acked.push(e.job.id),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("200000 jobs fit on a full 8 MiB disk");
    eprintln!(
        "{} jobs acknowledged on the full disk, then: {refused}",
        acked.len()
    );
    assert!(!acked.is_empty(), "sled had no room at all: {refused}");
    assert!(refused.is_unwritable(), "{refused}");
    let w = q.writability();
    assert!(!w.writable());
    assert!(w.problem.unwrap().contains("ENOSPC"));
    // Refused at once from now on, and every acknowledged job still reads.
    assert!(
        q.enqueue(jobs::WEBHOOK, "again", vec![], None)
            .await
            .is_err()
    );
    for id in &acked {
        assert!(
            q.get(*id).unwrap().is_some(),
            "job {id} unreadable while refusing"
        );
    }
    // Still full: the probe keeps refusing.
    assert!(!tokio::task::block_in_place(|| q.probe()).writable());
    std::fs::remove_file(data.join("filler")).unwrap();
    let w = tokio::task::block_in_place(|| q.probe());
    assert!(w.writable(), "{w:?}");
    for id in &acked {
        assert!(q.get(*id).unwrap().is_some(), "job {id} lost by the reopen");
    }
    let after = q
        .enqueue(jobs::WEBHOOK, "after", vec![1], None)
        .await
        .unwrap();
    assert!(after.job.id > *acked.last().unwrap(), "an id was reused");
    drop(q);
    // The write combiner's tasks drop their clones of the queue a moment later.
    let (q, _) = tokio::task::spawn_blocking(move || {
        wait::when_unlocked(
            &path,
            || {
                Queue::open(
                    &path,
                    connector::jobs::settings(),
                    std::sync::Arc::new(SystemClock),
                )
            },
            |e| matches!(e, connector::queue::Error::Locked { .. }),
        )
    })
    .await
    .unwrap()
    .unwrap();
    for id in acked.iter().chain([&after.job.id]) {
        assert!(
            q.get(*id).unwrap().is_some(),
            "job {id} lost across a restart"
        );
    }
}
