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
    let d = config::load(None, &no_env()).unwrap();
    assert_eq!(cfg.queue, d.queue);
    assert_eq!(cfg.data_dir, d.data_dir);
    assert_eq!(cfg.shutdown_timeout, d.shutdown_timeout);
    assert_eq!(cfg.panel.base_url, d.panel.base_url);
    assert_eq!(cfg.panel.timeout, d.panel.timeout);
    assert_eq!(cfg.sync.interval, d.sync.interval);
    assert_eq!(cfg.sync.output_dir, d.sync.output_dir);
    assert_eq!(cfg.sync.max_removal_ratio, d.sync.max_removal_ratio);
    assert_eq!(cfg.sync.confirm_after, d.sync.confirm_after);
    assert_eq!(cfg.apply.mode, d.apply.mode);
    assert_eq!(cfg.apply.timeout, d.apply.timeout);
    assert_eq!(cfg.traffic.interval, d.traffic.interval);
    assert_eq!(cfg.traffic.max_items, d.traffic.max_items);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
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

fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_go_connectors_environment_alone_configures_it() {
    let env = env_of(&[
        ("PANEL_BASE_URL", "http://127.0.0.1:3000/"),
        ("INTERNAL_API_KEY", "k-123-secret"),
        ("NODE_IDS", "1, 2,3"),
        ("OUTPUT_DIR", "/tmp/out"),
        ("INTERVAL_SECONDS", "5"),
        ("HTTP_TIMEOUT_SECONDS", "3"),
        ("APPLY_CMD", "bash './my apply.sh' {node_id} {uuids_file}"),
    ]);
    let cfg = config::load(None, &env).unwrap();
    assert_eq!(cfg.panel.base_url, "http://127.0.0.1:3000");
    assert_eq!(
        cfg.panel.internal_api_key.as_ref().unwrap().expose(),
        "k-123-secret"
    );
    assert_eq!(
        cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(cfg.nodes[1].inbound_tag, "node-2");
    assert_eq!(cfg.sync.output_dir, Path::new("/tmp/out"));
    assert_eq!(cfg.sync.interval, Duration::from_secs(5));
    assert_eq!(cfg.panel.timeout, Duration::from_secs(3));
    assert_eq!(cfg.apply.mode, config::ApplyMode::Cmd);
    assert_eq!(
        cfg.apply.argv,
        ["bash", "./my apply.sh", "{node_id}", "{uuids_file}"]
    );
    let shown = config::render(&cfg);
    assert!(!shown.contains("k-123-secret"), "{shown}");
    assert!(shown.contains("internal_api_key = \"***\""), "{shown}");
    assert!(!format!("{cfg:?}").contains("k-123-secret"));
}

#[test]
fn environment_errors_name_the_variable() {
    for (name, value, reason) in [
        ("INTERVAL_SECONDS", "often", "not a duration"),
        ("NODE_IDS", "1,two", "`two` is not a node id"),
        ("APPLY_MODE", "reload", "not an apply mode"),
        ("PANEL_BASE_URL", "ftp://x", "http"),
        ("ENABLE_TRAFFIC_REPORT", "maybe", "true or false"),
        ("HTTP_TIMEOUT_SECONDS", "0", "more than 0"),
    ] {
        let e = config::load(None, &env_of(&[(name, value)])).unwrap_err();
        assert_eq!(e.key, name);
        assert!(e.reason.contains(reason), "{e}");
        assert!(e.to_string().starts_with("environment: "), "{e}");
    }
}

#[test]
fn nodes_without_a_key_is_an_error() {
    let e = config::load(None, &env_of(&[("NODE_IDS", "1")])).unwrap_err();
    assert_eq!(e.key, "panel.internal_api_key");
}

#[test]
fn node_ids_replace_the_file_list_but_keep_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[panel]\ninternal_api_key_file = \"KEYFILE\"\n[[nodes]]\nid = 1\ninbound_tag = \"in-{node_id}\"\nprotocol = \"trojan\"\n[[nodes]]\nid = 9\n"
            .replace("KEYFILE", &dir.path().join("key").display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.path().join("key"), "from-file\n").unwrap();
    let cfg = config::load(Some(&path), &env_of(&[("NODE_IDS", "1,2")])).unwrap();
    assert_eq!(cfg.nodes.len(), 2);
    assert_eq!(cfg.nodes[0].inbound_tag, "in-1");
    assert_eq!(cfg.nodes[0].protocol, config::Protocol::Trojan);
    assert_eq!(cfg.nodes[1].protocol, config::Protocol::Vless);
    assert_eq!(
        cfg.panel.internal_api_key.as_ref().unwrap().expose(),
        "from-file"
    );
}

#[cfg(unix)]
#[test]
fn a_key_file_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "secret\n").unwrap();
    let env = env_of(&[("INTERNAL_API_KEY_FILE", key.to_str().unwrap())]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config::load(None, &env).unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("readable by other users"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(config::load(None, &env).unwrap().warnings.is_empty());
}

#[test]
fn apply_mode_follows_what_is_configured() {
    let cfg = config::load(None, &no_env()).unwrap();
    assert_eq!(cfg.apply.mode, config::ApplyMode::None);
    let e = load_text("[apply]\nmode = \"cmd\"\n").unwrap_err();
    assert_eq!(e.key, "apply.cmd");
    let e = load_text("[apply]\ncmd = \"echo 'unclosed\"\n").unwrap_err();
    assert_eq!(e.key, "apply.cmd");
    let e = load_text("[sync]\nmax_removal_ratio = 1.5\n").unwrap_err();
    assert_eq!(e.key, "sync.max_removal_ratio");
}

#[test]
fn webhook_and_http_sections() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let ex = config::load(Some(&path), &no_env()).unwrap();
    let d = config::load(None, &no_env()).unwrap();
    assert_eq!(ex.webhook.providers_dir, d.webhook.providers_dir);
    assert_eq!(ex.webhook.ca_file, None);
    assert_eq!(ex.webhook.timeout, Duration::from_secs(5));
    assert_eq!(ex.http.listen, d.http.listen);
    assert_eq!(ex.http.listen.unwrap().to_string(), "127.0.0.1:9460");
    assert!(ex.http.token.is_none());
    assert_eq!(ex.http.max_body_bytes, d.http.max_body_bytes);

    let e = load_text("[http]\nlisten = \"localhost\"\n").unwrap_err();
    assert_eq!(e.key, "http.listen", "{e}");
    let e = load_text("[webhook]\nper_relay_concurrency = 0\n").unwrap_err();
    assert_eq!(e.key, "webhook.per_relay_concurrency", "{e}");
    let e = load_text("[webhook]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
    assert_eq!(e.key, "webhook.ca_file", "{e}");
    let e = load_text("[webhook]\nprovider_dir = \"x\"\n").unwrap_err();
    assert_eq!(
        e.key, "webhook.provider_dir",
        "an unknown key is named: {e}"
    );

    // The listener's limits (issue 12): the example's values are the defaults, and a
    // value that would leave the listener unbounded or shut is refused naming its key.
    assert_eq!(ex.http.max_connections, 1024);
    assert_eq!(ex.http.max_connections, d.http.max_connections);
    assert_eq!(ex.http.header_timeout, Duration::from_secs(10));
    assert_eq!(ex.http.header_timeout, d.http.header_timeout);
    assert_eq!(ex.http.idle_timeout, Duration::from_secs(60));
    assert_eq!(ex.http.idle_timeout, d.http.idle_timeout);
    let c = load_text(
        "[http]\nmax_connections = 64\nheader_timeout = \"2s\"\nidle_timeout = \"1m30s\"\n",
    )
    .unwrap();
    assert_eq!(c.http.max_connections, 64);
    assert_eq!(c.http.header_timeout, Duration::from_secs(2));
    assert_eq!(c.http.idle_timeout, Duration::from_secs(90));
    let shown = config::render(&c);
    assert!(
        shown.contains("max_connections = 64")
            && shown.contains("header_timeout = \"2s\"")
            && shown.contains("idle_timeout = \"1m 30s\""),
        "{shown}"
    );
    for (text, key) in [
        ("max_connections = 0", "http.max_connections"),
        ("max_connections = 10000000", "http.max_connections"),
        ("header_timeout = \"0s\"", "http.header_timeout"),
        ("header_timeout = \"soon\"", "http.header_timeout"),
        ("idle_timeout = \"0s\"", "http.idle_timeout"),
    ] {
        let e = load_text(&format!("[http]\n{text}\n")).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }

    let c = load_text("[http]\nlisten = \"\"\ntoken = \"tok-123456\"\n").unwrap();
    assert!(c.http.listen.is_none());
    let shown = config::render(&c);
    assert!(
        !shown.contains("tok-123456") && shown.contains("token = \"***\""),
        "{shown}"
    );
}
