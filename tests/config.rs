//! Configuration: the example file is the defaults, and bad values name file, key, reason.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use connector::config::{self, ConfigError};
use connector::queue::{JobKind, OnExhausted, Settings};

fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn load_text(text: &str) -> Result<config::Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    config::load(Some(&path), &no_env())
}

#[test]
fn example_file_equals_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let cfg = config::load(Some(&path), &no_env()).unwrap();
    assert_eq!(cfg.queue, Settings::default());
    assert_eq!(cfg.data_dir, Path::new("./data"));
}

#[test]
fn spec_defaults() {
    let s = Settings::default();
    assert_eq!(s.dedupe_window, Duration::from_secs(24 * 3600));
    for kind in JobKind::ALL {
        let secs: Vec<u64> = s.kind(kind).ladder.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 60, 300, 1800], "{kind}");
    }
    assert_eq!(s.kind(JobKind::Webhook).on_exhausted, OnExhausted::Dead);
    assert_eq!(s.kind(JobKind::NodeSync).on_exhausted, OnExhausted::Dead);
    assert_eq!(
        s.kind(JobKind::TrafficReport).on_exhausted,
        OnExhausted::RepeatLast
    );
    assert_eq!(
        s.kind(JobKind::XrayApply).on_exhausted,
        OnExhausted::RepeatLast
    );
}

#[test]
fn ladder_and_policy_from_file() {
    let cfg = load_text(
        "[queue]\ndedupe_window = \"1h\"\n[queue.kinds.webhook]\nladder = [\"0s\", \"1h30m\"]\non_exhausted = \"repeat-last\"\n",
    )
    .unwrap();
    let k = cfg.queue.kind(JobKind::Webhook);
    assert_eq!(k.ladder, [Duration::ZERO, Duration::from_secs(5400)]);
    assert_eq!(k.on_exhausted, OnExhausted::RepeatLast);
    assert_eq!(cfg.queue.dedupe_window, Duration::from_secs(3600));
}

#[test]
fn errors_name_file_key_and_reason() {
    let cases = [
        (
            "[queue.kinds.webhook]\nladder = [\"0s\", \"soon\"]\n",
            "queue.kinds.webhook.ladder[1]",
            "soon",
        ),
        (
            "[queue.kinds.webhook]\nladder = []\n",
            "queue.kinds.webhook.ladder",
            "at least one",
        ),
        (
            "[queue.kinds.mail]\nladder = [\"0s\"]\n",
            "queue.kinds.mail",
            "unknown job kind",
        ),
        (
            "[queue.kinds.webhook]\non_exhausted = \"drop\"\n",
            "queue.kinds.webhook.on_exhausted",
            "drop",
        ),
        (
            "[queue.kinds.webhook]\nconcurrency = 0\n",
            "queue.kinds.webhook.concurrency",
            "at least 1",
        ),
        (
            "[queue]\ndedupe_window = \"forever\"\n",
            "queue.dedupe_window",
            "forever",
        ),
        (
            "[queue]\ndedup_window = \"1h\"\n",
            "queue.dedup_window",
            "expected `dedupe_window`",
        ),
        ("data_dir = [\n", "(syntax)", ""),
    ];
    for (text, key, reason) in cases {
        let e = load_text(text).expect_err(text);
        assert_eq!(e.key, key, "{text}: {e}");
        assert!(e.reason.contains(reason), "{text}: {e}");
        let line = e.to_string();
        assert!(line.contains("c.toml") && !line.contains('\n'), "{line}");
    }
}

#[test]
fn env_overrides_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "data_dir = \"/from/file\"\n").unwrap();
    let env: BTreeMap<String, String> = [("DATA_DIR".to_string(), "/from/env".to_string())].into();
    let cfg = config::load(Some(&path), &env).unwrap();
    assert_eq!(cfg.data_dir, Path::new("/from/env"));
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let e = config::load(Some(Path::new("/nonexistent/c.toml")), &no_env()).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/c.toml: "), "{e}");
}
