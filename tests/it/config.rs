//! Configuration: the example file is the defaults, and bad values name file, key, reason.

use crate::support::agent;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use connector::config::{self, ConfigError};
use connector::jobs;
use connector::queue::OnExhausted;
use serde_json::{Value, json};

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
    let s = jobs::settings();
    assert_eq!(s.dedupe_window, Duration::from_secs(24 * 3600));
    for kind in jobs::ALL {
        let secs: Vec<u64> = s.kind(kind).ladder.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 60, 300, 1800], "{kind}");
    }
    assert_eq!(s.kind(jobs::WEBHOOK).on_exhausted, OnExhausted::Dead);
    assert_eq!(s.kind(jobs::NODE_SYNC).on_exhausted, OnExhausted::Dead);
    assert_eq!(
        s.kind(jobs::TRAFFIC_REPORT).on_exhausted,
        OnExhausted::RepeatLast
    );
    assert_eq!(
        s.kind(jobs::XRAY_APPLY).on_exhausted,
        OnExhausted::RepeatLast
    );
}

#[test]
fn ladder_and_policy_from_file() {
    let cfg = load_text(
        "[queue]\ndedupe_window = \"1h\"\n[queue.kinds.webhook]\nladder = [\"0s\", \"1h30m\"]\non_exhausted = \"repeat-last\"\n",
    )
    .unwrap();
    let k = cfg.queue.kind(jobs::WEBHOOK);
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

/// Credentials in the panel's URL (issue 12, item 9): `check-config` (the real binary)
/// and the config's `Debug` show the password and query values masked; a trailing slash
/// and a path prefix are kept as a prefix that request paths join onto.
#[test]
fn a_password_in_the_panel_url_is_masked_by_check_config() {
    let cfg = config::load(
        None,
        &env_of(&[(
            "PANEL_BASE_URL",
            "http://admin:pa55-secret@panel.example:8080/panel/",
        )]),
    )
    .unwrap();
    assert_eq!(
        cfg.panel.base_url,
        "http://admin:pa55-secret@panel.example:8080/panel"
    );
    assert!(!format!("{cfg:?}").contains("pa55-secret"));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_connector"))
        .arg("check-config")
        .env_clear()
        .env(
            "PANEL_BASE_URL",
            "http://admin:pa55-secret@panel.example:8080/panel/",
        )
        .env("INTERNAL_API_KEY", "k-123-secret")
        .env("DATA_DIR", dir.path().join("data"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("base_url = \"http://admin:***@panel.example:8080/panel\""),
        "{shown}"
    );
    assert!(
        !shown.contains("pa55-secret") && !shown.contains("k-123-secret"),
        "{shown}"
    );
}

/// A panel base URL with a query or a fragment would swallow the request paths appended
/// to it: refused, in the file and in the environment, naming the key, echoing neither
/// the query's value nor the password; `connector check-config` exits 2.
#[test]
fn a_panel_url_with_a_query_or_fragment_is_refused_without_echoing_it() {
    for url in [
        "http://admin:pa55-secret@panel.example/?token=q-secret",
        "http://panel.example/api?q-secret",
        "http://admin:pa55-secret@panel.example/#q-secret",
        "http://panel.example/?",
    ] {
        let file = load_text(&format!("[panel]\nbase_url = {url:?}\n")).unwrap_err();
        let env = config::load(None, &env_of(&[("PANEL_BASE_URL", url)])).unwrap_err();
        for (e, key) in [(file, "panel.base_url"), (env, "PANEL_BASE_URL")] {
            let text = e.to_string();
            assert_eq!(e.key, key, "{text}");
            assert!(text.contains("takes no query or fragment"), "{text}");
            assert!(
                !text.contains("q-secret") && !text.contains("pa55-secret"),
                "{text}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_connector"))
        .arg("check-config")
        .env_clear()
        .env(
            "PANEL_BASE_URL",
            "http://admin:pa55-secret@panel.example/?token=q-secret",
        )
        .env("DATA_DIR", dir.path().join("data"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("PANEL_BASE_URL"), "{stderr}");
    assert!(
        stderr.contains("http://admin:***@panel.example/?token=***"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("q-secret") && !stderr.contains("pa55-secret"),
        "{stderr}"
    );
    // Not a URL at all: refused without echoing it (where its secrets are is unknown).
    let e = config::load(None, &env_of(&[("PANEL_BASE_URL", "admin:pa55-secret@")])).unwrap_err();
    assert!(!e.to_string().contains("pa55-secret"), "{e}");
}

// ---- secrets, the environment, and what the agent can use (issue 12) ----

/// Runs the real `connector ARGS` in `dir` with a clean environment plus `env`:
/// (exit code, stderr as bytes). One that has not exited by the deadline is killed and
/// fails the test: it ran on a config it should have refused.
fn connector_run(dir: &Path, args: &[&str], env: &[(&str, &OsStr)]) -> (Option<i32>, Vec<u8>) {
    let mut cmd = agent::connector(dir);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        let _ = tx.send(b);
    });
    match rx.recv_timeout(agent::WAIT) {
        Ok(err) => (child.wait().unwrap().code(), err),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "connector {args:?} with {env:?} was still running after {:?}",
                agent::WAIT
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A config for `run` that starts without any peer: no nodes, listener on port 0.
fn runnable_config(dir: &Path, data_dir: &Path) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    agent::write_private(
        &path,
        &format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[webhook]\nproviders_dir = {:?}\n",
            data_dir,
            dir.join("providers")
        ),
    );
    path
}

#[test]
fn config_errors_never_show_a_secret() {
    // (file text, the secret in it, key, what the reason says)
    let cases = [
        // A syntax error on the key's own line: toml would quote that line.
        (
            "[panel]\ninternal_api_key = \"TOMLSECRET-1\n",
            "TOMLSECRET-1",
            "(syntax)",
            "line 2, column 33, key `panel.internal_api_key`: invalid basic string",
        ),
        (
            "[panel]\ninternal_api_key = \"\"\"TOMLSECRET-2\nmore\n",
            "TOMLSECRET-2",
            "(syntax)",
            "line 4, column 1: invalid multi-line basic string",
        ),
        (
            "[http]\ntoken = 'TOMLSECRET-3\n",
            "TOMLSECRET-3",
            "(syntax)",
            "key `http.token`",
        ),
        (
            "[panel]\nbase_url = \"http://admin:TOMLSECRET-4@127.0.0.1/\n",
            "TOMLSECRET-4",
            "(syntax)",
            "key `panel.base_url`",
        ),
        // A wrong type: serde would quote the value.
        (
            "[panel]\ninternal_api_key = 12345\n",
            "12345",
            "panel.internal_api_key",
            "expected a string",
        ),
        (
            "[http]\ntoken = 987654\n",
            "987654",
            "http.token",
            "expected a string",
        ),
        // A duplicate key: toml would quote the second line.
        (
            "[panel]\ninternal_api_key = \"TOMLSECRET-5\"\ninternal_api_key = \"TOMLSECRET-5\"\n",
            "TOMLSECRET-5",
            "(syntax)",
            "line 3, column 1, key `panel.internal_api_key`: duplicate key",
        ),
        // A key that cannot go into a header, said without the key.
        (
            "[panel]\ninternal_api_key = \"TOMLSECRET-6\\u0007\"\n",
            "TOMLSECRET-6",
            "panel.internal_api_key",
            "printable ASCII",
        ),
    ];
    for (text, secret, key, reason) in cases {
        let e = load_text(text).expect_err(text);
        let line = e.to_string();
        assert!(!line.contains(secret), "{text:?} shows its secret: {line}");
        assert_eq!(e.key, key, "{text:?}: {line}");
        assert!(e.reason.contains(reason), "{text:?}: {line}");
        assert!(line.contains("c.toml: ") && !line.contains('\n'), "{line}");
    }

    // The same through the real binary: what an operator sees on stderr.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    agent::write_private(&path, "[panel]\ninternal_api_key = \"TOMLSECRET-7\n");
    let (code, err) = connector_run(
        dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    let err = String::from_utf8_lossy(&err);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("TOMLSECRET-7"), "{err}");
    assert!(
        err.contains(&format!("{}: (syntax): line 2", path.display()))
            && err.contains("panel.internal_api_key"),
        "{err}"
    );

    // Environment values of the wrong form.
    for value in ["ENVSECRET-1\u{1}x", "ENVSECRET-2\nx", "ENVSECRET-3\u{e9}"] {
        let e = config::load(None, &env_of(&[("INTERNAL_API_KEY", value)])).unwrap_err();
        assert_eq!(e.key, "INTERNAL_API_KEY", "{e}");
        assert!(!e.to_string().contains("ENVSECRET"), "{e}");
    }
}

#[test]
fn non_utf8_environment_values_are_errors_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = runnable_config(dir.path(), &dir.path().join("data"));
    let config = config.to_str().unwrap();
    let cases: [(&str, &[u8]); 6] = [
        ("DATA_DIR", b"\xff"),
        ("NODE_IDS", b"1,\xff"),
        ("INTERNAL_API_KEY", b"NONUTF8SECRET\xff"),
        ("OUTPUT_DIR", b"/tmp/out-\xfe"),
        ("CONNECTOR_HTTP_TOKEN", b"NONUTF8SECRET\xff"),
        ("CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER", b"0s,\xff"),
    ];
    for (name, value) in cases {
        let env = [(name, OsStr::from_bytes(value))];
        for args in [
            &["check-config", "--config", config][..],
            &["run", "--config", config][..],
        ] {
            let (code, err) = connector_run(dir.path(), args, &env);
            let shown = String::from_utf8_lossy(&err);
            assert_eq!(code, Some(2), "{name} {args:?}: {shown}");
            assert!(
                shown.contains(&format!("environment: {name}: ")) && shown.contains("UTF-8"),
                "{name} {args:?}: {shown}"
            );
            assert!(
                !contains(&err, value) && !shown.contains("NONUTF8SECRET"),
                "{name}'s value was echoed: {shown}"
            );
        }
    }
    assert!(
        !dir.path().join("data").exists(),
        "nothing ran: no queue was created"
    );
}

#[test]
fn a_data_dir_the_agent_cannot_use_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let unusable = blocker.join("data");
    let config = runnable_config(dir.path(), &unusable);
    let config = config.to_str().unwrap();
    for args in [
        &["check-config", "--config", config][..],
        &["run", "--config", config][..],
    ] {
        let (code, err) = connector_run(dir.path(), args, &[]);
        let err = String::from_utf8_lossy(&err);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{config}: data_dir: "))
                && err.to_lowercase().contains("not a directory"),
            "{args:?}: {err}"
        );
    }
    // Set from the environment, the variable is named.
    let fine = runnable_config(dir.path(), &dir.path().join("data"));
    let (code, err) = connector_run(
        dir.path(),
        &["run", "--config", fine.to_str().unwrap()],
        &[("DATA_DIR", unusable.as_os_str())],
    );
    let err = String::from_utf8_lossy(&err);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("environment: DATA_DIR: "), "{err}");
}

#[test]
fn the_core_api_address_is_checked_at_config_time() {
    for bad in [
        "garbage",
        "127.0.0.1",
        "127.0.0.1:0",
        "host:port",
        ":10085",
        "::1:10085",
        "a b:1",
    ] {
        let e = config::load(None, &env_of(&[("XRAY_API_ADDR", bad)])).unwrap_err();
        assert_eq!(e.key, "XRAY_API_ADDR", "{bad}: {e}");
        assert!(e.reason.contains("host:port"), "{bad}: {e}");
        let e = load_text(&format!("[xray]\napi = {bad:?}\n")).unwrap_err();
        assert_eq!(e.key, "xray.api", "{bad}: {e}");
    }
    for good in [
        "127.0.0.1:10085",
        "[::1]:10085",
        "localhost:10085",
        "xray.internal:8080",
    ] {
        let cfg = config::load(None, &env_of(&[("XRAY_API_ADDR", good)])).unwrap();
        assert_eq!(cfg.xray.unwrap().api, good);
    }
}

#[test]
fn a_listener_other_hosts_can_reach_without_a_token_is_warned_about() {
    let warned = |c: &config::Config| {
        c.warnings
            .iter()
            .any(|w| w.contains("http.listen") && w.contains("http.token"))
    };
    let c = load_text("[http]\nlisten = \"0.0.0.0:9460\"\n").unwrap();
    assert!(warned(&c), "{:?}", c.warnings);
    let c = load_text("[http]\nlisten = \"[::]:9460\"\n").unwrap();
    assert!(warned(&c), "{:?}", c.warnings);
    let c = load_text("[http]\nlisten = \"0.0.0.0:9460\"\ntoken = \"t-123456\"\n").unwrap();
    assert!(!warned(&c), "{:?}", c.warnings);
    let c = load_text("[http]\nlisten = \"127.0.0.1:9460\"\n").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn the_key_and_the_key_file_together_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    agent::write_private(&key, "from-file\n");
    let env = env_of(&[
        ("INTERNAL_API_KEY", "from-env"),
        ("INTERNAL_API_KEY_FILE", key.to_str().unwrap()),
    ]);
    let e = config::load(None, &env).unwrap_err();
    assert_eq!(e.key, "INTERNAL_API_KEY", "{e}");
    assert!(e.reason.contains("INTERNAL_API_KEY_FILE"), "{e}");
    assert!(!e.to_string().contains("from-env"), "{e}");
    let e = load_text(&format!(
        "[panel]\ninternal_api_key = \"k\"\ninternal_api_key_file = {key:?}\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "panel.internal_api_key_file", "{e}");
}

// ---- every key from the environment (issue 16 item 3) ----

/// A value for `key` (a row of `config::keys::KEYS`) that the agent takes, in two
/// variants where keys exclude each other (a key or its file; vless's flow or
/// shadowsocks's cipher), and what `check-config --json` shows for it. A key without a
/// sample fails the test: give it one.
fn sample(key: &str, variant: usize, dir: &Path) -> Option<(String, Value)> {
    let path = |name: &str| dir.join(name).display().to_string();
    let s = |v: &str| Some((v.to_string(), json!(v)));
    match (key, variant) {
        ("data_dir", _) => s(&path("data")),
        ("shutdown_timeout", _) => s("17s"),
        ("admin.socket", _) => s(&path("admin-elsewhere.sock")),
        ("panel.base_url", _) => Some((
            "http://127.0.0.1:3999".into(),
            json!("http://127.0.0.1:3999/"),
        )),
        ("panel.internal_api_key", 0) => Some(("ENVSECRET-panel".into(), json!("***"))),
        ("panel.internal_api_key_file", 1) => s(&path("panel.key")),
        ("panel.internal_api_key" | "panel.internal_api_key_file", _) => None,
        ("panel.timeout", _) => s("19s"),
        ("sync.interval", _) => s("23s"),
        ("sync.output_dir", _) => s(&path("out")),
        ("sync.max_removal_ratio", _) => Some(("0.25".into(), json!(0.25))),
        ("sync.confirm_after", _) => s("29s"),
        ("apply.mode", _) => s("xray-grpc"),
        ("apply.cmd", _) => s("/bin/true {node_id}"),
        ("apply.timeout", _) => s("31s"),
        ("xray.api", _) => s("127.0.0.1:10999"),
        // V2Ray takes no shadowsocks users over its API: the shadowsocks variant is Xray.
        ("xray.flavor", 0) => s("v2ray"),
        ("xray.flavor", _) => s("xray"),
        ("xray.email_template", _) => s("{node_id}.{uuid}"),
        ("xray.timeout", _) => s("37s"),
        ("xray.concurrency", _) => Some(("3".into(), json!(3))),
        ("xray.access_log", _) => s(&path("access.log")),
        ("xray.cut_connections", _) => Some(("true".into(), json!(true))),
        ("nodes[].id", _) => Some(("7".into(), json!(7))),
        ("nodes[].inbound_tag", _) => s("tag-seven"),
        ("nodes[].protocol", 0) => s("vless"),
        ("nodes[].protocol", _) => s("shadowsocks"),
        ("nodes[].flow", 0) => s("xtls-rprx-vision"),
        ("nodes[].cipher", 1) => s("aes-256-gcm"),
        ("nodes[].flow" | "nodes[].cipher", _) => None,
        ("nodes[].port", _) => Some(("4433".into(), json!(4433))),
        ("traffic.enabled", _) => Some(("true".into(), json!(true))),
        ("traffic.interval", _) => s("41s"),
        ("traffic.max_items", _) => Some(("77".into(), json!(77))),
        ("queue.dedupe_window", _) => s("2h"),
        ("queue.kinds.*.ladder", _) => Some(("1s, 2s,3s".into(), json!(["1s", "2s", "3s"]))),
        ("queue.kinds.*.on_exhausted", _) => s("repeat-last"),
        ("queue.kinds.*.concurrency", _) => Some(("6".into(), json!(6))),
        ("queue.kinds.*.lease_ahead", _) => Some(("9".into(), json!(9))),
        ("queue.kinds.*.lease_timeout", _) => s("3m"),
        ("queue.kinds.*.keep_done", _) => s("5h"),
        ("webhook.providers_dir", _) => s(&path("providers")),
        ("webhook.ca_file", _) => s(&path("ca.pem")),
        ("webhook.timeout", _) => s("43s"),
        ("webhook.per_relay_concurrency", _) => Some(("5".into(), json!(5))),
        ("webhook.reload_interval", _) => s("47s"),
        ("http.listen", _) => s("127.0.0.1:9461"),
        ("http.token", 0) => Some(("ENVSECRET-http".into(), json!("***"))),
        ("http.token_file", 1) => s(&path("http.token")),
        ("http.token" | "http.token_file", _) => None,
        ("http.max_body_bytes", _) => Some(("12345".into(), json!(12345))),
        ("http.max_connections", _) => Some(("99".into(), json!(99))),
        ("http.header_timeout", _) => s("53s"),
        ("http.idle_timeout", _) => s("59s"),
        (other, _) => panic!("no sample value for {other}: add one to tests/it/config.rs"),
    }
}

/// Every key of `config::keys::KEYS` set by its environment variable alone (no file),
/// read back from `connector check-config --json`: the value, and which variable set
/// it. The table is the code's own (held to the file's fields by a unit test), so a new
/// key is set here without this test knowing it.
#[test]
fn every_key_is_set_from_the_environment_and_check_config_says_by_which_variable() {
    use connector::config::keys::{KEYS, var_name};
    let kinds: Vec<&str> = connector::jobs::ALL.iter().map(|k| k.as_str()).collect();
    for variant in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("panel.key"), "FILESECRET-panel\n").unwrap();
        agent::write_private(&dir.path().join("http.token"), "FILESECRET-http\n");
        std::fs::set_permissions(
            dir.path().join("panel.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.pem"), receiver_ca()).unwrap();
        std::fs::write(dir.path().join("access.log"), "").unwrap();
        // (variable, value, where in the JSON, what it must show, the key `env` names)
        let mut rows: Vec<(String, String, Vec<String>, Value, String)> = Vec::new();
        for k in KEYS {
            let Some((value, shown)) = sample(k.key, variant, dir.path()) else {
                continue;
            };
            if let Some(field) = k.key.strip_prefix("nodes[].") {
                if let Some(seed) = k.seed {
                    rows.push((
                        seed.into(),
                        value,
                        vec!["nodes".into(), "7".into(), field.into()],
                        shown,
                        "[[nodes]]".into(),
                    ));
                } else {
                    rows.push((
                        var_name(k.key, Some(7), None),
                        value,
                        vec!["nodes".into(), "7".into(), field.into()],
                        shown,
                        format!("nodes.7.{field}"),
                    ));
                }
            } else if let Some(field) = k.key.strip_prefix("queue.kinds.*.") {
                for kind in &kinds {
                    rows.push((
                        var_name(k.key, None, Some(kind)),
                        value.clone(),
                        vec![
                            "queue".into(),
                            "kinds".into(),
                            kind.to_string(),
                            field.into(),
                        ],
                        shown.clone(),
                        format!("queue.kinds.{kind}.{field}"),
                    ));
                }
            } else {
                let var = k
                    .seed
                    .map_or_else(|| var_name(k.key, None, None), String::from);
                rows.push((
                    var,
                    value,
                    k.key.split('.').map(String::from).collect(),
                    shown,
                    k.key.to_string(),
                ));
            }
        }
        let mut cmd = agent::connector(dir.path());
        cmd.args(["check-config", "--json"]);
        for (var, value, ..) in &rows {
            cmd.env(var, value);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "variant {variant}: {stderr}\n{stdout}"
        );
        for text in [&stdout, &stderr] {
            assert!(!text.contains("SECRET-"), "a secret was shown:\n{text}");
        }
        let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        for (var, _, at, shown, key) in &rows {
            let mut got = &v;
            for part in at {
                got = match (got, part.parse::<u64>()) {
                    (Value::Array(nodes), Ok(id)) => nodes
                        .iter()
                        .find(|n| n["id"] == id)
                        .unwrap_or_else(|| panic!("no node {id} in {stdout}")),
                    _ => &got[part.as_str()],
                };
            }
            assert_eq!(got, shown, "{var}: {at:?} in\n{stdout}");
            assert_eq!(
                v["env"][key.as_str()],
                json!(var),
                "check-config does not say {var} set {key}:\n{stdout}"
            );
        }
    }
}

/// A CA certificate for `webhook.ca_file` (it is read and checked at load).
fn receiver_ca() -> String {
    crate::support::receiver::Receiver::start().ca_pem.clone()
}

/// A bad value names the variable and the key; a secret's is never shown.
#[test]
fn bad_key_variables_name_the_variable_and_never_show_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    agent::write_private(&token_file, "FILETOKEN\n");
    let token_file = token_file.to_str().unwrap();
    let cases: [(&[(&str, &str)], &str); 7] = [
        (
            &[("CONNECTOR_HTTP_MAX_CONNECTIONS", "many")],
            "CONNECTOR_HTTP_MAX_CONNECTIONS: is not a whole number",
        ),
        (
            &[("CONNECTOR_HTTP_LISTEN", "nowhere")],
            "CONNECTOR_HTTP_LISTEN (http.listen): `nowhere` is not an address",
        ),
        (
            &[("CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER", "0s,soon")],
            "CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER (queue.kinds.webhook.ladder[1]): `soon` is not a duration",
        ),
        (
            &[("CONNECTOR_XRAY_CONCURRENCY", "0")],
            "CONNECTOR_XRAY_CONCURRENCY (xray.concurrency)",
        ),
        (
            &[("CONNECTOR_TRAFFIC_MAX_ITEMS", "-3")],
            "CONNECTOR_TRAFFIC_MAX_ITEMS (traffic.max_items)",
        ),
        (
            &[
                ("CONNECTOR_HTTP_TOKEN", "BADSECRET"),
                ("CONNECTOR_HTTP_TOKEN_FILE", token_file),
            ],
            "(http.token_file): set either token or token_file, not both",
        ),
        (
            &[("XRAY_CUT_CONNECTIONS", "maybe")],
            "environment: XRAY_CUT_CONNECTIONS: ",
        ),
    ];
    for (vars, says) in cases {
        let mut cmd = agent::connector(dir.path());
        cmd.args(["check-config"]).envs(vars.iter().copied());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {stderr}");
        assert!(stderr.contains(says), "{vars:?}: {stderr}");
        assert!(
            !stderr.contains("BADSECRET") && !stderr.contains("FILETOKEN"),
            "a secret was shown: {stderr}"
        );
    }
}

/// README's configuration table names every key's variable (the seed's, or the
/// `CONNECTOR_…` pattern with `{ID}`/`{K}`).
#[test]
fn readme_lists_every_key_variable() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for k in connector::config::keys::KEYS {
        let var = connector::config::keys::var_pattern(k).replace("{KIND}", "{K}");
        assert!(
            readme
                .lines()
                .any(|l| l.starts_with("| `") && l.contains(&format!("`{var}"))),
            "README's configuration table does not name {var} ({})",
            k.key
        );
    }
}
