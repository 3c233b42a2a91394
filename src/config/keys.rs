//! Every key of the configuration file and the environment variable that sets it
//! (issue 16 item 3): the one table README's environment section, `check-config` and
//! the tests read.
//!
//! Names: the Go connector's variable where it had one ([`Key::seed`]; read by
//! `env.rs`, with its own rules — seconds as plain numbers, `NODE_IDS` replacing the
//! node list, `XRAY_INBOUND_TAG`/`XRAY_PROTOCOL` as every node's default); otherwise
//! `CONNECTOR_` and the key's path in capitals, dots as `_`:
//! - `http.listen` → `CONNECTOR_HTTP_LISTEN`;
//! - a `[[nodes]]` entry's key, by node id: `nodes[].port` of node 7 →
//!   `CONNECTOR_NODES_7_PORT` (for a node of the file or of `NODE_IDS`);
//! - a job kind's key, by kind: `queue.kinds.webhook.ladder` →
//!   `CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER`.
//!
//! Values are written as in the file, without TOML quoting: durations `90s`/`1m 30s`,
//! booleans `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`), numbers, paths, and
//! lists (a ladder) comma-separated: `0s,1m,5m,30m`. A variable overrides the file's
//! value; an empty one counts as unset.
//!
//! The generic variables ([`overlay`]) are written into the file's TOML document
//! before it is read, so the file's checks apply to them unchanged; an error about
//! such a value names the variable (and the key), never a secret's value.

use std::collections::BTreeMap;

use super::{ConfigError, Env};
use crate::jobs;

/// How a value is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Str,
    Path,
    Duration,
    Bool,
    Int,
    Float,
    /// A list of strings (a ladder): comma-separated in a variable.
    List,
}

/// One key of the file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted path; `nodes[].k` for a `[[nodes]]` entry's key, `queue.kinds.*.k` for a
    /// job kind's.
    pub key: &'static str,
    pub ty: Type,
    /// The Go connector's variable for it, read by `env.rs` (None: `CONNECTOR_…`).
    pub seed: Option<&'static str>,
}

const fn k(key: &'static str, ty: Type) -> Key {
    Key {
        key,
        ty,
        seed: None,
    }
}

const fn s(key: &'static str, ty: Type, seed: &'static str) -> Key {
    Key {
        key,
        ty,
        seed: Some(seed),
    }
}

use Type::*;

/// Every key of the file. A test holds this to serde's own list of fields of each
/// section, so a new key without a variable fails it.
pub const KEYS: &[Key] = &[
    s("data_dir", Path, "DATA_DIR"),
    k("shutdown_timeout", Duration),
    k("admin.socket", Path),
    s("panel.base_url", Str, "PANEL_BASE_URL"),
    s("panel.internal_api_key", Str, "INTERNAL_API_KEY"),
    s("panel.internal_api_key_file", Path, "INTERNAL_API_KEY_FILE"),
    s("panel.timeout", Duration, "HTTP_TIMEOUT_SECONDS"),
    s("sync.interval", Duration, "INTERVAL_SECONDS"),
    s("sync.output_dir", Path, "OUTPUT_DIR"),
    k("sync.max_removal_ratio", Float),
    k("sync.confirm_after", Duration),
    s("apply.mode", Str, "APPLY_MODE"),
    s("apply.cmd", Str, "APPLY_CMD"),
    k("apply.timeout", Duration),
    s("xray.api", Str, "XRAY_API_ADDR"),
    s("xray.flavor", Str, "XRAY_FLAVOR"),
    k("xray.email_template", Str),
    k("xray.timeout", Duration),
    k("xray.concurrency", Int),
    s("xray.access_log", Path, "XRAY_ACCESS_LOG"),
    s("xray.cut_connections", Bool, "XRAY_CUT_CONNECTIONS"),
    s("nodes[].id", Int, "NODE_IDS"),
    k("nodes[].inbound_tag", Str),
    k("nodes[].protocol", Str),
    k("nodes[].flow", Str),
    k("nodes[].cipher", Str),
    k("nodes[].port", Int),
    s("traffic.enabled", Bool, "ENABLE_TRAFFIC_REPORT"),
    s(
        "traffic.interval",
        Duration,
        "TRAFFIC_REPORT_INTERVAL_SECONDS",
    ),
    k("traffic.max_items", Int),
    k("queue.dedupe_window", Duration),
    k("queue.kinds.*.ladder", List),
    k("queue.kinds.*.on_exhausted", Str),
    k("queue.kinds.*.concurrency", Int),
    k("queue.kinds.*.lease_ahead", Int),
    k("queue.kinds.*.lease_timeout", Duration),
    k("queue.kinds.*.keep_done", Duration),
    k("webhook.providers_dir", Path),
    k("webhook.ca_file", Path),
    k("webhook.timeout", Duration),
    k("webhook.per_relay_concurrency", Int),
    k("webhook.reload_interval", Duration),
    k("http.listen", Str),
    k("http.token", Str),
    k("http.token_file", Path),
    k("http.max_body_bytes", Int),
    k("http.max_connections", Int),
    k("http.header_timeout", Duration),
    k("http.idle_timeout", Duration),
];

/// The variable for `key` (a [`Key::key`]) of node `node` or job kind `kind` where the
/// key has one: `CONNECTOR_NODES_7_PORT`, `CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER`,
/// `CONNECTOR_HTTP_LISTEN`.
pub fn var_name(key: &str, node: Option<u64>, kind: Option<&str>) -> String {
    let path = match (
        key.strip_prefix("nodes[]."),
        key.strip_prefix("queue.kinds.*."),
    ) {
        (Some(rest), _) => format!("nodes.{}.{rest}", node.unwrap_or(0)),
        (_, Some(rest)) => format!("queue.kinds.{}.{rest}", kind.unwrap_or("KIND")),
        _ => key.to_string(),
    };
    format!("CONNECTOR_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// How the table shows a key's variable: the seed's name, or the `CONNECTOR_…` pattern
/// with `{ID}` / `{KIND}` where a node id or a kind goes.
pub fn var_pattern(k: &Key) -> String {
    match k.seed {
        Some(s) => s.to_string(),
        None => var_name(k.key, None, None)
            .replace("_NODES_0_", "_NODES_{ID}_")
            .replace("_KINDS_KIND_", "_KINDS_{KIND}_"),
    }
}

/// One variable written into the document: which, and where (the path as serde and
/// the checks name it: `nodes[0].port`, `queue.kinds.webhook.ladder`).
#[derive(Debug, Clone)]
pub struct Overlaid {
    pub var: String,
    pub path: String,
    /// The key as `check-config` shows it: `nodes.7.port` for node 7.
    pub shown: String,
}

/// Writes every set `CONNECTOR_…` variable into `doc` (the file's document, or an empty
/// one), as the file would hold it. `node_ids`: the nodes `NODE_IDS` names, which get a
/// `[[nodes]]` entry when a variable of theirs is set and the file has none.
pub fn overlay(
    doc: &mut toml::Table,
    env: &dyn Env,
    node_ids: &[u64],
) -> Result<Vec<Overlaid>, ConfigError> {
    let mut out = Vec::new();
    for key in KEYS.iter().filter(|k| k.seed.is_none()) {
        if let Some(field) = key.key.strip_prefix("nodes[].") {
            let mut ids: Vec<u64> = file_node_ids(doc);
            for id in node_ids {
                if !ids.contains(id) {
                    ids.push(*id);
                }
            }
            for id in ids {
                let var = var_name(key.key, Some(id), None);
                let Some(value) = read(env, &var, key.ty)? else {
                    continue;
                };
                let nodes = doc
                    .entry("nodes")
                    .or_insert_with(|| toml::Value::Array(Vec::new()));
                let Some(nodes) = nodes.as_array_mut() else {
                    // The file's own error (nodes is not an array) is reported when read.
                    continue;
                };
                let at = match nodes
                    .iter()
                    .position(|n| n.get("id").and_then(toml::Value::as_integer) == Some(id as i64))
                {
                    Some(i) => i,
                    None => {
                        let mut t = toml::Table::new();
                        t.insert("id".into(), toml::Value::Integer(id as i64));
                        nodes.push(toml::Value::Table(t));
                        nodes.len() - 1
                    }
                };
                if let Some(t) = nodes[at].as_table_mut() {
                    t.insert(field.to_string(), value);
                }
                out.push(Overlaid {
                    var,
                    path: format!("nodes[{at}].{field}"),
                    shown: format!("nodes.{id}.{field}"),
                });
            }
        } else if let Some(field) = key.key.strip_prefix("queue.kinds.*.") {
            for kind in jobs::ALL {
                let var = var_name(key.key, None, Some(kind.as_str()));
                if let Some(value) = read(env, &var, key.ty)? {
                    let path = format!("queue.kinds.{}.{field}", kind.as_str());
                    insert(doc, &path, value);
                    out.push(Overlaid {
                        var,
                        shown: path.clone(),
                        path,
                    });
                }
            }
        } else {
            let var = var_name(key.key, None, None);
            if let Some(value) = read(env, &var, key.ty)? {
                insert(doc, key.key, value);
                out.push(Overlaid {
                    var,
                    path: key.key.to_string(),
                    shown: key.key.to_string(),
                });
            }
        }
    }
    Ok(out)
}

fn file_node_ids(doc: &toml::Table) -> Vec<u64> {
    doc.get("nodes")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| n.get("id")?.as_integer())
                .filter_map(|i| u64::try_from(i).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `a.b.c = value`, making the tables on the way (a non-table in the way is replaced:
/// the variable wins over the file).
fn insert(doc: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or(path);
    let mut t = doc;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert(last.to_string(), value);
}

fn env_err(var: &str, reason: String) -> ConfigError {
    ConfigError {
        file: None,
        key: var.to_string(),
        reason,
    }
}

/// The variable's value as the file would hold it; `None` when unset or empty. A value
/// that is not UTF-8, or not of the key's type, is an error naming the variable (its
/// value is never quoted: it may be a secret).
fn read(env: &dyn Env, var: &str, ty: Type) -> Result<Option<toml::Value>, ConfigError> {
    if env.is_not_unicode(var) {
        return Err(env_err(
            var,
            "is set to a value that is not valid UTF-8 (not shown); set it to UTF-8 text, or unset it".into(),
        ));
    }
    let Some(v) = env.var(var) else {
        return Ok(None);
    };
    let t = v.trim();
    Ok(Some(match ty {
        Str | Path | Duration => toml::Value::String(v),
        Bool => toml::Value::Boolean(match t.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err(env_err(var, "is not true or false".into())),
        }),
        Int => toml::Value::Integer(
            t.parse::<i64>()
                .map_err(|_| env_err(var, "is not a whole number".into()))?,
        ),
        Float => toml::Value::Float(
            t.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| env_err(var, "is not a number".into()))?,
        ),
        List => toml::Value::Array(
            t.split(',')
                .map(|p| toml::Value::String(p.trim().to_string()))
                .collect(),
        ),
    }))
}

/// An error about a value in the document that came from a variable names the variable
/// (and the key): `CONNECTOR_HTTP_LISTEN (http.listen): …`.
pub fn blame(e: ConfigError, overlaid: &[Overlaid]) -> ConfigError {
    let from = overlaid.iter().find(|o| {
        e.key == o.path
            || e.key
                .strip_prefix(o.path.as_str())
                .is_some_and(|rest| rest.starts_with('[') || rest.starts_with('.'))
    });
    match from {
        Some(o) => ConfigError {
            file: None,
            key: format!("{} ({})", o.var, e.key),
            reason: e.reason,
        },
        None => e,
    }
}

/// Which variable set which key (`check-config` shows it): the generic ones overlaid,
/// and the seed's that are set.
pub fn sources(overlaid: &[Overlaid], env: &dyn Env) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = overlaid
        .iter()
        .map(|o| (o.shown.clone(), o.var.clone()))
        .collect();
    for (var, key, _) in super::ENV_VARS {
        if env.var(var).is_some() {
            m.insert(key.to_string(), var.to_string());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_key_path() {
        assert_eq!(var_name("http.listen", None, None), "CONNECTOR_HTTP_LISTEN");
        assert_eq!(
            var_name("nodes[].port", Some(7), None),
            "CONNECTOR_NODES_7_PORT"
        );
        assert_eq!(
            var_name("queue.kinds.*.ladder", None, Some("webhook")),
            "CONNECTOR_QUEUE_KINDS_WEBHOOK_LADDER"
        );
        let port = KEYS.iter().find(|k| k.key == "nodes[].port").unwrap();
        assert_eq!(var_pattern(port), "CONNECTOR_NODES_{ID}_PORT");
        let ladder = KEYS
            .iter()
            .find(|k| k.key == "queue.kinds.*.ladder")
            .unwrap();
        assert_eq!(var_pattern(ladder), "CONNECTOR_QUEUE_KINDS_{KIND}_LADDER");
    }

    #[test]
    fn every_seed_variable_is_in_the_table_and_every_key_once() {
        for (var, key, _) in super::super::ENV_VARS {
            let listed = KEYS.iter().any(|k| k.seed == Some(var))
                || ["XRAY_INBOUND_TAG", "XRAY_PROTOCOL"].contains(var);
            assert!(listed, "{var} ({key}) is not a seed variable of KEYS");
        }
        let mut seen = std::collections::BTreeSet::new();
        for k in KEYS {
            assert!(seen.insert(k.key), "{} twice", k.key);
        }
    }
}
