//! The configuration file's shape. Unknown keys are refused (a typo must not silently
//! leave a default in force); each value is checked where it is read, so an error can
//! name its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    ApplyMode, Config, ConfigError, Flavor, Invalid, NodeSpec, Pending, Protocol, Secret, Xray,
    header_safe, is_secret_key, parse_base_url, parse_xray_api, split_cmd, without_value,
};
use crate::queue::{JobKind, OnExhausted};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
    #[serde(default)]
    panel: RawPanel,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    apply: RawApply,
    xray: Option<RawXray>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    traffic: RawTraffic,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    webhook: super::webhook::RawWebhook,
    #[serde(default)]
    http: super::webhook::RawHttp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Empty: the default, `{data_dir}/admin.sock`.
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPanel {
    base_url: Option<String>,
    internal_api_key: Option<String>,
    internal_api_key_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    output_dir: Option<PathBuf>,
    max_removal_ratio: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    confirm_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApply {
    mode: Option<String>,
    cmd: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawXray {
    api: Option<String>,
    flavor: Option<String>,
    email_template: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    concurrency: Option<usize>,
    access_log: Option<PathBuf>,
    cut_connections: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: u64,
    inbound_tag: Option<String>,
    protocol: Option<String>,
    flow: Option<String>,
    cipher: Option<String>,
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    max_items: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    #[serde(default, with = "humantime_serde")]
    dedupe_window: Option<Duration>,
    #[serde(default)]
    kinds: BTreeMap<String, RawKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    ladder: Option<Vec<String>>,
    on_exhausted: Option<OnExhausted>,
    concurrency: Option<usize>,
    lease_ahead: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    lease_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keep_done: Option<Duration>,
}

/// Reads `path` as a TOML document (not yet checked against the file's shape).
pub(super) fn read_doc(path: &Path) -> Result<toml::Table, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        file: Some(path.to_path_buf()),
        key: key.to_string(),
        reason,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| err("(file)", format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| err("(syntax)", syntax_error(&text, &e)))
}

/// Applies `doc` (the file's document with the environment's `CONNECTOR_…` values
/// written in, or only those) to `cfg`; `path` is the file, if any.
pub(super) fn apply_doc(
    cfg: &mut Config,
    doc: toml::Table,
    pending: &mut Pending,
    path: Option<&Path>,
) -> Result<(), ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        file: path.map(Path::to_path_buf),
        key: key.to_string(),
        reason,
    };
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            let message = one_line(e.inner().message());
            // serde quotes the value it got (`integer `12345``): never a secret's.
            let reason = if is_secret_key(&key) {
                without_value(&message)
            } else {
                message
            };
            err(if key == "." { "(top level)" } else { &key }, reason)
        })?;
    let file = path.unwrap_or(Path::new(""));
    if raw.panel.internal_api_key.is_some() && path.is_some() && readable_by_others(file) {
        cfg.warnings.push(format!(
            "{} holds panel.internal_api_key and is readable by other users; chmod 600 it",
            file.display()
        ));
    }
    apply_raw(cfg, raw, pending, file).map_err(|(key, reason)| err(&key, reason))
}

/// True when group or others may read the file.
pub(super) fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// A TOML syntax error in one line: where (line, column, and the key when the line
/// assigns one) and why. toml's own rendering quotes the source line, which may hold a
/// secret (`internal_api_key = "…` missing its closing quote), so it is never used;
/// toml's `message()` describes the error without quoting the input.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let at = span.start.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..line_start].matches('\n').count() + 1;
    let column = text[line_start..at].chars().count() + 1;
    let line = text[line_start..].split('\n').next().unwrap_or("");
    // A duplicate key's span is the key itself (a name, not a value).
    let key = if message.starts_with("duplicate key") {
        bare_key(text.get(span.clone()).unwrap_or("").trim())
    } else {
        assigned_key(line)
            .filter(|(_, eq)| column > *eq)
            .map(|(k, _)| k)
    };
    let key = key.map(|k| match table_above(&text[..line_start]) {
        Some(t) => format!(", key `{t}.{k}`"),
        None => format!(", key `{k}`"),
    });
    format!(
        "line {line_no}, column {column}{}: {message}",
        key.unwrap_or_default()
    )
}

/// A bare TOML key (`a_b-c`, dotted `a.b`); anything else is not named in errors.
fn bare_key(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.split('.').all(|p| {
            let p = p.trim();
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    ok.then(|| s.split('.').map(str::trim).collect::<Vec<_>>().join("."))
}

/// `key = …` on this line: the key and the column of `=` (1-based).
fn assigned_key(line: &str) -> Option<(String, usize)> {
    let eq = line.find('=')?;
    let key = bare_key(line[..eq].trim())?;
    Some((key, line[..eq].chars().count() + 1))
}

/// The last `[table]` / `[[array]]` header before this point.
fn table_above(before: &str) -> Option<String> {
    before.lines().rev().find_map(|l| {
        let l = l.trim();
        let inner = l.strip_prefix('[')?;
        let inner = inner.strip_prefix('[').unwrap_or(inner);
        let end = inner.find(']')?;
        bare_key(inner[..end].trim())
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

type KeyError = (String, String);

fn positive(key: &str, d: Duration) -> Result<Duration, KeyError> {
    if d.is_zero() {
        Err((key.into(), "must be more than 0s".into()))
    } else {
        Ok(d)
    }
}

fn apply_raw(
    cfg: &mut Config,
    raw: RawConfig,
    pending: &mut Pending,
    path: &Path,
) -> Result<(), KeyError> {
    super::webhook::apply_webhook(&mut cfg.webhook, raw.webhook)?;
    super::webhook::apply_http(&mut cfg.http, raw.http, path, &mut cfg.warnings)?;
    if let Some(d) = raw.data_dir {
        cfg.data_dir = d;
    }
    if let Some(d) = raw.shutdown_timeout {
        cfg.shutdown_timeout = d;
    }
    if let Some(s) = raw.admin.socket.filter(|s| !s.as_os_str().is_empty()) {
        cfg.admin_socket = Some(s);
    }

    let p = raw.panel;
    if let Some(u) = p.base_url {
        cfg.panel.base_url =
            parse_base_url(&u).map_err(|r| ("panel.base_url".into(), r.to_string()))?;
    }
    if let (Some(_), Some(_)) = (&p.internal_api_key, &p.internal_api_key_file) {
        return Err((
            "panel.internal_api_key_file".into(),
            "set either internal_api_key or internal_api_key_file, not both".into(),
        ));
    }
    if let Some(k) = p.internal_api_key {
        header_safe(k.trim()).map_err(|r| ("panel.internal_api_key".to_string(), r.to_string()))?;
        cfg.panel.internal_api_key = Some(Secret::new(k.trim()));
    }
    if let Some(f) = p.internal_api_key_file {
        cfg.panel.internal_api_key = Some(
            read_key_file(&f, &mut cfg.warnings)
                .map_err(|r| ("panel.internal_api_key_file".into(), r.to_string()))?,
        );
        cfg.panel.internal_api_key_file = Some(f);
    }
    if let Some(t) = p.timeout {
        cfg.panel.timeout = positive("panel.timeout", t)?;
    }

    let s = raw.sync;
    if let Some(i) = s.interval {
        cfg.sync.interval = positive("sync.interval", i)?;
    }
    if let Some(o) = s.output_dir {
        cfg.sync.output_dir = o;
    }
    if let Some(r) = s.max_removal_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err((
                "sync.max_removal_ratio".into(),
                format!("{r} is not between 0.0 and 1.0 (1.0 turns the guard off)"),
            ));
        }
        cfg.sync.max_removal_ratio = r;
    }
    if let Some(c) = s.confirm_after {
        cfg.sync.confirm_after = c;
    }

    let a = raw.apply;
    if let Some(m) = a.mode {
        pending.mode = Some(parse_mode(&m).map_err(|r| ("apply.mode".into(), r.to_string()))?);
    }
    if let Some(c) = a.cmd {
        cfg.apply.argv = split_cmd(&c).map_err(|r| ("apply.cmd".into(), r.to_string()))?;
        cfg.apply.cmd = c;
    }
    if let Some(t) = a.timeout {
        cfg.apply.timeout = positive("apply.timeout", t)?;
    }

    if let Some(x) = raw.xray {
        let d = Xray::default();
        cfg.xray = Some(Xray {
            timeout: match x.timeout {
                Some(t) => positive("xray.timeout", t)?,
                None => d.timeout,
            },
            concurrency: match x.concurrency {
                Some(0) => return Err(("xray.concurrency".into(), "must be at least 1".into())),
                Some(c) => c,
                None => d.concurrency,
            },
            api: match x.api {
                Some(a) => {
                    parse_xray_api(&a).map_err(|r| ("xray.api".to_string(), r.to_string()))?
                }
                None => d.api,
            },
            flavor: match x.flavor.as_deref() {
                None | Some("xray") => Flavor::Xray,
                Some("v2ray") => Flavor::V2ray,
                Some(other) => {
                    return Err((
                        "xray.flavor".into(),
                        format!("`{other}` is not a flavor (expected xray or v2ray)"),
                    ));
                }
            },
            email_template: x.email_template.unwrap_or(d.email_template),
            access_log: x.access_log.filter(|p| !p.as_os_str().is_empty()),
            cut_connections: x.cut_connections.unwrap_or(d.cut_connections),
        });
    }

    for (i, n) in raw.nodes.into_iter().enumerate() {
        let protocol = match n.protocol {
            Some(p) => Some(
                Protocol::parse(&p).map_err(|e| (format!("nodes[{i}].protocol"), e.to_string()))?,
            ),
            None => None,
        };
        let cipher = match n.cipher {
            Some(c) => Some(
                crate::peers::xray::account::Cipher::parse(&c)
                    .map_err(|e| (format!("nodes[{i}].cipher"), e.to_string()))?,
            ),
            None => None,
        };
        if n.port == Some(0) {
            return Err((
                format!("nodes[{i}].port"),
                "must be a port from 1 to 65535".into(),
            ));
        }
        pending.nodes.push(NodeSpec {
            id: n.id,
            inbound_tag: n.inbound_tag,
            protocol,
            flow: n.flow,
            cipher,
            port: n.port,
        });
    }

    let t = raw.traffic;
    if let Some(e) = t.enabled {
        cfg.traffic.enabled = e;
    }
    if let Some(i) = t.interval {
        cfg.traffic.interval = positive("traffic.interval", i)?;
    }
    if let Some(m) = t.max_items {
        if m == 0 {
            return Err(("traffic.max_items".into(), "must be at least 1".into()));
        }
        cfg.traffic.max_items = m;
    }

    if let Some(w) = raw.queue.dedupe_window {
        cfg.queue.dedupe_window = w;
    }
    for (name, k) in raw.queue.kinds {
        let prefix = format!("queue.kinds.{name}");
        let kind: JobKind =
            crate::jobs::kind_named(&name).map_err(|e| (prefix.clone(), e.to_string()))?;
        let s = cfg.queue.kind_mut(kind);
        if let Some(ladder) = k.ladder {
            if ladder.is_empty() {
                return Err((
                    format!("{prefix}.ladder"),
                    "must have at least one rung".into(),
                ));
            }
            s.ladder = ladder
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    humantime::parse_duration(r).map_err(|e| {
                        (
                            format!("{prefix}.ladder[{i}]"),
                            format!("`{r}` is not a duration ({e}); use e.g. \"30s\", \"5m\""),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(p) = k.on_exhausted {
            s.on_exhausted = p;
        }
        if let Some(c) = k.concurrency {
            if c == 0 {
                return Err((format!("{prefix}.concurrency"), "must be at least 1".into()));
            }
            s.concurrency = c;
        }
        if let Some(a) = k.lease_ahead {
            s.lease_ahead = a;
        }
        if let Some(l) = k.lease_timeout {
            s.lease_timeout = positive(&format!("{prefix}.lease_timeout"), l)?;
        }
        if let Some(d) = k.keep_done {
            s.keep_done = Some(d);
        }
    }
    Ok(())
}

pub(super) fn parse_mode(s: &str) -> Result<ApplyMode, Invalid> {
    match s {
        "xray-grpc" => Ok(ApplyMode::XrayGrpc),
        "cmd" => Ok(ApplyMode::Cmd),
        "none" => Ok(ApplyMode::None),
        other => Err(Invalid(format!(
            "`{other}` is not an apply mode (expected xray-grpc, cmd or none)"
        ))),
    }
}

/// Why the panel's key file is not usable. Never says what the key is.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeyFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty", path.display())]
    Empty { path: std::path::PathBuf },
    #[error("the key in {} {reason}", path.display())]
    NotSendable {
        path: std::path::PathBuf,
        #[source]
        reason: Invalid,
    },
}

/// Reads a key file (first line, trimmed), warning when others can read it.
pub(super) fn read_key_file(
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<Secret, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let key = text.lines().next().unwrap_or("").trim();
    if key.is_empty() {
        return Err(KeyFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    header_safe(key).map_err(|reason| KeyFileError::NotSendable {
        path: path.to_path_buf(),
        reason,
    })?;
    if readable_by_others(path) {
        warnings.push(format!(
            "{} holds the panel's internal API key and is readable by other users; chmod 600 it",
            path.display()
        ));
    }
    Ok(Secret::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde's own list of a section's fields: the "expected one of …" of the error an
    /// unknown field gets.
    fn fields(doc: &str) -> Vec<String> {
        let value: toml::Value = toml::from_str(doc).unwrap();
        let e = serde_path_to_error::deserialize::<_, RawConfig>(value).unwrap_err();
        let message = e
            .inner()
            .message()
            .split('\n')
            .next()
            .unwrap_or("")
            .to_string();
        let list = message
            .split_once("expected one of ")
            .or_else(|| message.split_once("expected "))
            .unwrap_or_else(|| panic!("no field list in {message:?}"))
            .1;
        list.split(", ")
            .flat_map(|f| f.split(" or "))
            .map(|f| {
                f.trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .to_string()
            })
            .filter(|f| !f.is_empty())
            .collect()
    }

    /// Every field of every section of the file is in `keys::KEYS` (so it has an
    /// environment variable), and nothing else is: a new key without one fails here.
    #[test]
    fn every_key_of_the_file_has_an_environment_variable() {
        let sections: [(&str, &str); 12] = [
            ("", "zz_probe = 1"),
            ("admin", "[admin]\nzz_probe = 1"),
            ("panel", "[panel]\nzz_probe = 1"),
            ("sync", "[sync]\nzz_probe = 1"),
            ("apply", "[apply]\nzz_probe = 1"),
            ("xray", "[xray]\nzz_probe = 1"),
            ("nodes[]", "[[nodes]]\nid = 1\nzz_probe = 1"),
            ("traffic", "[traffic]\nzz_probe = 1"),
            ("queue", "[queue]\nzz_probe = 1"),
            ("queue.kinds.*", "[queue.kinds.webhook]\nzz_probe = 1"),
            ("webhook", "[webhook]\nzz_probe = 1"),
            ("http", "[http]\nzz_probe = 1"),
        ];
        let tables: Vec<&str> = sections.iter().map(|(s, _)| *s).collect();
        let mut from_serde = std::collections::BTreeSet::new();
        for (section, doc) in sections {
            for f in fields(doc) {
                let key = if section.is_empty() {
                    f
                } else {
                    format!("{section}.{f}")
                };
                // A field that is itself a section is checked as one.
                let as_table = key
                    .replace("queue.kinds", "queue.kinds.*")
                    .replace("nodes", "nodes[]");
                if !tables.contains(&key.as_str()) && !tables.contains(&as_table.as_str()) {
                    from_serde.insert(key);
                }
            }
        }
        let listed: std::collections::BTreeSet<String> = super::super::keys::KEYS
            .iter()
            .map(|k| k.key.to_string())
            .collect();
        assert_eq!(
            from_serde, listed,
            "the file's keys (left) and config::keys::KEYS (right) differ: give a new key its row there"
        );
    }
}
