//! The on-disk format, pinned by fixtures (SPEC §2: "fixtures of every released version
//! that tests decode"; the format is described in `queue-schema/README.md`).
//!
//! `queue-schema/fixtures/v1/*.bin` are record values exactly as this version stores
//! them. By default these tests decode every committed fixture, compare every field with
//! the values below, and re-encode it to the same bytes; they also rebuild each record
//! by hand from the README's rules (without bincode) and check the README's annotated
//! example. So a change to the format, intended or not, fails here.
//!
//! `UPDATE_FIXTURES=1 cargo test --test it schema::` rewrites the fixtures and the manifest
//! from the values below. Do that only while a version is unreleased: a released
//! version's fixtures never change; a new layout gets `fixtures/v2/` and a decode arm
//! that reads v1 (see the README, "Versions").

use std::collections::BTreeSet;
use std::path::PathBuf;

use connector::jobs;
use connector::queue::record::{
    Quarantined, RecordError, decode_job, decode_quarantined, decode_state, encode_job,
    encode_quarantined, encode_state,
};
use connector::queue::{Attempt, DeadReason, Job, Outcome, Stored};

/// 2026-01-01T00:00:00Z, in ms since the Unix epoch.
const T0: u64 = 1_767_225_600_000;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("queue-schema/fixtures/v1")
}

enum Value {
    Job(Job),
    Quarantined(Quarantined),
    State(Vec<u8>),
}

struct Fixture {
    file: &'static str,
    /// The key the value is stored under.
    key: Vec<u8>,
    what: &'static str,
    value: Value,
}

impl Value {
    fn encode(&self) -> Vec<u8> {
        match self {
            Value::Job(j) => encode_job(j),
            Value::Quarantined(q) => encode_quarantined(q),
            Value::State(s) => encode_state(s),
        }
    }
}

fn job_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'j'];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn attempt(number: u32, started_ms: u64, duration_ms: u64, outcome: Outcome) -> Attempt {
    Attempt {
        number,
        started_ms,
        duration_ms,
        outcome,
        note: None,
    }
}

fn failed(error: &str) -> Outcome {
    Outcome::Failed {
        error: error.into(),
    }
}

fn pending_job() -> Job {
    Job {
        id: 1,
        kind: jobs::WEBHOOK,
        key: "evt-0001".into(),
        payload: br#"{"relay_id":"myrelay","status":"success"}"#.to_vec(),
        created_ms: T0,
        stored: Stored::Pending { due_ms: T0 },
        attempts: 0,
        history: vec![],
    }
}

/// Every fixture of version 1, with the values it must decode to.
fn fixtures() -> Vec<Fixture> {
    let damaged = {
        let mut raw = encode_job(&pending_job());
        raw[10] ^= 0xff;
        raw
    };
    let reason = decode_job(&damaged, &jobs::ALL)
        .expect_err("a flipped body byte fails the checksum")
        .to_string();
    let mut quarantine_key = vec![b'c'];
    quarantine_key.extend_from_slice(&job_key(7));
    let mut state_key = vec![b's'];
    state_key.extend_from_slice(b"node/1/applied");

    vec![
        Fixture {
            file: "job-pending.bin",
            key: job_key(1),
            what: "webhook job, pending (ready at T0), never attempted; the README's example",
            value: Value::Job(pending_job()),
        },
        Fixture {
            file: "job-running.bin",
            key: job_key(2),
            what: "traffic_report job, running its 2nd attempt after a failed 1st",
            value: Value::Job(Job {
                id: 2,
                kind: jobs::TRAFFIC_REPORT,
                key: "report-7f3a9c".into(),
                payload: br#"{"report_id":"7f3a9c","node_id":1,"items":[]}"#.to_vec(),
                created_ms: T0 + 1_000,
                stored: Stored::Running {
                    started_ms: T0 + 61_500,
                    lease_until_ms: T0 + 181_500,
                },
                attempts: 2,
                history: vec![attempt(
                    1,
                    T0 + 1_000,
                    5_000,
                    failed("HTTP 503 Service Unavailable"),
                )],
            }),
        },
        Fixture {
            file: "job-done.bin",
            key: job_key(3),
            what: "xray_apply job, done; its history has every outcome; binary payload",
            value: Value::Job(Job {
                id: 3,
                kind: jobs::XRAY_APPLY,
                key: "node-1".into(),
                payload: vec![0x00, 0x01, 0x02, 0xfe, 0xff],
                created_ms: T0 + 2_000,
                stored: Stored::Done {
                    at_ms: T0 + 2_400_000,
                },
                attempts: 4,
                history: vec![
                    attempt(1, T0 + 2_000, 30, failed("grpc: connection refused")),
                    attempt(
                        2,
                        T0 + 62_000,
                        1_200,
                        Outcome::Interrupted {
                            reason: "the process stopped during the attempt".into(),
                        },
                    ),
                    attempt(3, T0 + 70_000, 600_000, Outcome::LeaseExpired),
                    Attempt {
                        note: Some("APPLY_CMD exit status 0; stdout: applied 3 users".into()),
                        ..attempt(4, T0 + 2_399_000, 1_000, Outcome::Succeeded)
                    },
                ],
            }),
        },
        Fixture {
            file: "job-dead.bin",
            key: job_key(4),
            what: "node_sync job, dead (ladder used up), empty payload",
            value: Value::Job(Job {
                id: 4,
                kind: jobs::NODE_SYNC,
                key: "sync-1".into(),
                payload: vec![],
                created_ms: T0,
                stored: Stored::Dead {
                    at_ms: T0 + 2_160_000,
                    reason: DeadReason::Exhausted,
                },
                attempts: 4,
                history: vec![
                    attempt(1, T0, 10_000, failed("timeout after 10s")),
                    attempt(2, T0 + 70_000, 10_000, failed("timeout after 10s")),
                    attempt(3, T0 + 380_000, 120, failed("HTTP 500")),
                    attempt(4, T0 + 2_150_000, 10_000, failed("timeout after 10s")),
                ],
            }),
        },
        Fixture {
            file: "job-cancelled.bin",
            key: job_key(5),
            what: "webhook job, dead (cancelled by an operator while running)",
            value: Value::Job(Job {
                id: 5,
                kind: jobs::WEBHOOK,
                key: "evt-0005".into(),
                payload: b"{}".to_vec(),
                created_ms: T0,
                stored: Stored::Dead {
                    at_ms: T0 + 5_000,
                    reason: DeadReason::Cancelled,
                },
                attempts: 1,
                history: vec![attempt(
                    1,
                    T0 + 1_000,
                    4_000,
                    Outcome::Interrupted {
                        reason: "cancelled by an operator".into(),
                    },
                )],
            }),
        },
        Fixture {
            file: "job-wide.bin",
            key: job_key(300),
            what: "traffic_report job with wide values: id 300, 70000 attempts, a 300-byte \
                   payload, a non-ASCII key (every varint width)",
            value: Value::Job(Job {
                id: 300,
                kind: jobs::TRAFFIC_REPORT,
                key: "überweisung-✓".into(),
                payload: (0..300u32).map(|i| (i % 256) as u8).collect(),
                created_ms: 0,
                stored: Stored::Pending { due_ms: u64::MAX },
                attempts: 70_000,
                history: vec![
                    attempt(69_999, 65_535, 65_536, failed("")),
                    attempt(70_000, 250, 251, failed(&"x".repeat(251))),
                ],
            }),
        },
        Fixture {
            file: "quarantined.bin",
            key: quarantine_key,
            what: "quarantine entry: job 7's record, moved aside because a body byte was flipped",
            value: Value::Quarantined(Quarantined {
                key: job_key(7),
                reason,
                at_ms: T0 + 3_600_000,
                raw: damaged,
            }),
        },
        Fixture {
            file: "state.bin",
            key: state_key,
            what: "state value (body owned by xray_apply; opaque to the queue)",
            value: Value::State(br#"{"generation":3,"users":2,"at":1767225600000}"#.to_vec()),
        },
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn manifest(fixtures: &[Fixture]) -> String {
    let mut out = String::from(
        "# queue-schema fixtures, record version 1 (generated by tests/schema.rs)\n\
         # file\tkey (hex)\twhat\n",
    );
    for f in fixtures {
        out.push_str(&format!("{}\t{}\t{}\n", f.file, hex(&f.key), f.what));
    }
    out
}

fn update_requested() -> bool {
    std::env::var_os("UPDATE_FIXTURES").is_some_and(|v| v == "1")
}

/// With `UPDATE_FIXTURES=1`, rewrites the fixtures and the manifest (only if changed),
/// once per run, before any test reads them.
fn maybe_update() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if update_requested() {
            write_fixtures();
        }
    });
}

fn write_fixtures() {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = fixtures();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            std::fs::write(&path, bytes).unwrap();
            eprintln!("rewrote {}", path.display());
        }
    };
    for f in &fixtures {
        write(f.file, &f.value.encode());
    }
    write("manifest.tsv", manifest(&fixtures).as_bytes());
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate fixtures with UPDATE_FIXTURES=1)",
            path.display()
        )
    })
}

#[test]
fn committed_fixtures_decode_to_the_expected_values_and_reencode_identically() {
    maybe_update();
    for f in fixtures() {
        let bytes = read_fixture(f.file);
        match &f.value {
            Value::Job(expected) => {
                let job =
                    decode_job(&bytes, &jobs::ALL).unwrap_or_else(|e| panic!("{}: {e}", f.file));
                assert_eq!(&job, expected, "{}", f.file);
                assert_eq!(encode_job(&job), bytes, "{} re-encodes", f.file);
                assert_eq!(f.key, job_key(job.id), "{} is filed under its id", f.file);
            }
            Value::Quarantined(expected) => {
                let q = decode_quarantined(&bytes).unwrap_or_else(|e| panic!("{}: {e}", f.file));
                assert_eq!(&q, expected, "{}", f.file);
                assert_eq!(encode_quarantined(&q), bytes, "{} re-encodes", f.file);
                // What was moved aside still fails the way the reason says.
                assert_eq!(
                    decode_job(&q.raw, &jobs::ALL).unwrap_err().to_string(),
                    q.reason
                );
            }
            Value::State(expected) => {
                let s = decode_state(&bytes).unwrap_or_else(|e| panic!("{}: {e}", f.file));
                assert_eq!(&s, expected, "{}", f.file);
                assert_eq!(encode_state(&s), bytes, "{} re-encodes", f.file);
            }
        }
    }
}

#[test]
fn the_fixture_set_and_its_manifest_are_complete() {
    maybe_update();
    let fixtures = fixtures();
    let expected: BTreeSet<String> = fixtures
        .iter()
        .map(|f| f.file.to_string())
        .chain(["manifest.tsv".to_string()])
        .collect();
    let found: BTreeSet<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        found, expected,
        "fixtures/v1 holds exactly the listed files"
    );
    let committed = String::from_utf8(read_fixture("manifest.tsv")).unwrap();
    assert_eq!(committed, manifest(&fixtures));
}

// ---- the README's rules, applied by hand ----

/// bincode 2 `config::standard()` varint for unsigned integers (README, "Encoding").
fn varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=250 => out.push(v as u8),
        251..=0xffff => {
            out.push(251);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(252);
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        _ => {
            out.push(253);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn bytes_field(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn envelope(body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend(body);
    out
}

/// JobV1 built field by field from the README's table.
fn job_by_hand(job: &Job) -> Vec<u8> {
    let mut b = Vec::new();
    varint(&mut b, job.id);
    b.push(job.kind.code());
    bytes_field(&mut b, job.key.as_bytes());
    bytes_field(&mut b, &job.payload);
    varint(&mut b, job.created_ms);
    match job.stored {
        Stored::Pending { due_ms } => {
            varint(&mut b, 0);
            varint(&mut b, due_ms);
        }
        Stored::Running {
            started_ms,
            lease_until_ms,
        } => {
            varint(&mut b, 1);
            varint(&mut b, started_ms);
            varint(&mut b, lease_until_ms);
        }
        Stored::Done { at_ms } => {
            varint(&mut b, 2);
            varint(&mut b, at_ms);
        }
        Stored::Dead { at_ms, reason } => {
            varint(&mut b, 3);
            varint(&mut b, at_ms);
            b.push(match reason {
                DeadReason::Exhausted => 1,
                DeadReason::Cancelled => 2,
            });
        }
    }
    varint(&mut b, u64::from(job.attempts));
    varint(&mut b, job.history.len() as u64);
    for a in &job.history {
        varint(&mut b, u64::from(a.number));
        varint(&mut b, a.started_ms);
        varint(&mut b, a.duration_ms);
        match &a.outcome {
            Outcome::Succeeded => varint(&mut b, 0),
            Outcome::Failed { error } => {
                varint(&mut b, 1);
                bytes_field(&mut b, error.as_bytes());
            }
            Outcome::LeaseExpired => varint(&mut b, 2),
            Outcome::Interrupted { reason } => {
                varint(&mut b, 3);
                bytes_field(&mut b, reason.as_bytes());
            }
        }
        match &a.note {
            None => b.push(0),
            Some(note) => {
                b.push(1);
                bytes_field(&mut b, note.as_bytes());
            }
        }
    }
    envelope(b)
}

#[test]
fn the_readme_rules_rebuild_every_fixture_byte_for_byte() {
    maybe_update();
    for f in fixtures() {
        let by_hand = match &f.value {
            Value::Job(job) => job_by_hand(job),
            Value::Quarantined(q) => {
                let mut b = Vec::new();
                bytes_field(&mut b, &q.key);
                bytes_field(&mut b, q.reason.as_bytes());
                varint(&mut b, q.at_ms);
                bytes_field(&mut b, &q.raw);
                envelope(b)
            }
            Value::State(s) => envelope(s.clone()),
        };
        assert_eq!(
            hex(&by_hand),
            hex(&read_fixture(f.file)),
            "{}: the README's description and the bytes disagree",
            f.file
        );
    }
}

/// The annotated dump in the README, `job-pending.bin` byte for byte.
#[test]
fn the_readme_example_is_job_pending_bin() {
    maybe_update();
    let readme = std::fs::read_to_string(fixture_dir().join("../../README.md"))
        .expect("queue-schema/README.md");
    let start = readme
        .find("<!-- example: job-pending.bin -->")
        .expect("README marks its example");
    let block = &readme[start..];
    let block = &block[block.find("```text").unwrap() + 7..];
    let block = &block[..block.find("```").unwrap()];
    // Each line: hex bytes, then `#` and a comment.
    let hex_in_readme: String = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert_eq!(hex_in_readme, hex(&read_fixture("job-pending.bin")));
}

#[test]
fn a_newer_or_unknown_version_is_refused_not_misread() {
    maybe_update();
    let newer = RecordError::NewerVersion {
        found: 2,
        supported: 1,
    };
    let zero = RecordError::UnknownVersion;
    for f in fixtures() {
        let mut bytes = read_fixture(f.file);
        bytes[0] = 0;
        match f.value {
            Value::Job(_) => {
                assert_eq!(decode_job(&bytes, &jobs::ALL).unwrap_err(), zero);
                bytes[0] = 2;
                assert_eq!(decode_job(&bytes, &jobs::ALL).unwrap_err(), newer);
            }
            Value::Quarantined(_) => {
                assert_eq!(decode_quarantined(&bytes).unwrap_err(), zero);
                bytes[0] = 2;
                assert_eq!(decode_quarantined(&bytes).unwrap_err(), newer);
            }
            Value::State(_) => {
                assert_eq!(decode_state(&bytes).unwrap_err(), zero);
                bytes[0] = 2;
                assert_eq!(decode_state(&bytes).unwrap_err(), newer);
            }
        }
    }
}
