//! Environment variables. They override the file; with no file at all, the Go
//! connector's variables alone configure a working agent.

use std::path::PathBuf;

use super::raw::{parse_mode, read_key_file};
use super::{
    Config, ConfigError, Env, Flavor, NodeSpec, Pending, Secret, Xray, header_safe, parse_base_url,
    parse_duration, parse_node_ids, parse_xray_api, split_cmd,
};

/// Every variable read: (name, key it sets, what it means). README's table is this.
pub const ENV_VARS: &[(&str, &str, &str)] = &[
    ("DATA_DIR", "data_dir", "queue database and admin socket"),
    (
        "PANEL_BASE_URL",
        "panel.base_url",
        "panel backend, e.g. http://127.0.0.1:3000",
    ),
    (
        "INTERNAL_API_KEY",
        "panel.internal_api_key",
        "sent as x-internal-token (required with nodes)",
    ),
    (
        "INTERNAL_API_KEY_FILE",
        "panel.internal_api_key_file",
        "file holding the key (first line)",
    ),
    (
        "HTTP_TIMEOUT_SECONDS",
        "panel.timeout",
        "panel request timeout: seconds or a duration",
    ),
    (
        "NODE_IDS",
        "[[nodes]]",
        "comma-separated node ids; replaces the file's node list",
    ),
    (
        "OUTPUT_DIR",
        "sync.output_dir",
        "where node-{id}/allowed-uuids.{txt,json} are written",
    ),
    (
        "INTERVAL_SECONDS",
        "sync.interval",
        "sync period per node: seconds or a duration",
    ),
    (
        "APPLY_CMD",
        "apply.cmd",
        "hook run after a change; {node_id} {uuids_file} {uuids_json}",
    ),
    ("APPLY_MODE", "apply.mode", "xray-grpc | cmd | none"),
    ("XRAY_API_ADDR", "xray.api", "Xray/V2Ray gRPC API address"),
    ("XRAY_FLAVOR", "xray.flavor", "xray | v2ray"),
    (
        "XRAY_ACCESS_LOG",
        "xray.access_log",
        "the core's access log file (log.access)",
    ),
    (
        "XRAY_CUT_CONNECTIONS",
        "xray.cut_connections",
        "true | false: cut a removed user's open connections",
    ),
    (
        "XRAY_INBOUND_TAG",
        "nodes[].inbound_tag",
        "default inbound tag; may contain {node_id}",
    ),
    (
        "XRAY_PROTOCOL",
        "nodes[].protocol",
        "default protocol: vless | vmess | trojan | shadowsocks",
    ),
    ("ENABLE_TRAFFIC_REPORT", "traffic.enabled", "true | false"),
    (
        "TRAFFIC_REPORT_INTERVAL_SECONDS",
        "traffic.interval",
        "seconds or a duration",
    ),
];

fn env_err(key: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        file: None,
        key: key.into(),
        reason: reason.to_string(),
    }
}

pub(super) fn apply(
    cfg: &mut Config,
    env: &dyn Env,
    pending: &mut Pending,
) -> Result<(), ConfigError> {
    // A value that is not UTF-8 would read as unset: refused, and never echoed.
    for (name, _, _) in ENV_VARS {
        if env.is_not_unicode(name) {
            return Err(env_err(
                name,
                "is set to a value that is not valid UTF-8 (not shown); set it to UTF-8 text, or unset it",
            ));
        }
    }
    let get = |name: &str| env.var(name);
    if let Some(v) = get("DATA_DIR") {
        cfg.data_dir = PathBuf::from(v);
    }
    if let Some(v) = get("PANEL_BASE_URL") {
        cfg.panel.base_url = parse_base_url(&v).map_err(|r| env_err("PANEL_BASE_URL", r))?;
    }
    if get("INTERNAL_API_KEY").is_some() && get("INTERNAL_API_KEY_FILE").is_some() {
        return Err(env_err(
            "INTERNAL_API_KEY",
            "INTERNAL_API_KEY and INTERNAL_API_KEY_FILE are both set: set only one (neither would silently win)",
        ));
    }
    if let Some(v) = get("INTERNAL_API_KEY_FILE") {
        let path = PathBuf::from(v);
        cfg.panel.internal_api_key = Some(
            read_key_file(&path, &mut cfg.warnings)
                .map_err(|r| env_err("INTERNAL_API_KEY_FILE", r))?,
        );
        cfg.panel.internal_api_key_file = Some(path);
    }
    if let Some(v) = get("INTERNAL_API_KEY") {
        header_safe(v.trim()).map_err(|r| env_err("INTERNAL_API_KEY", r))?;
        cfg.panel.internal_api_key = Some(Secret::new(v.trim()));
        cfg.panel.internal_api_key_file = None;
    }
    if let Some(v) = get("HTTP_TIMEOUT_SECONDS") {
        cfg.panel.timeout =
            nonzero(parse_duration(&v)).map_err(|r| env_err("HTTP_TIMEOUT_SECONDS", r))?;
    }
    if let Some(v) = get("NODE_IDS") {
        let ids = parse_node_ids(&v).map_err(|r| env_err("NODE_IDS", r))?;
        let from_file = std::mem::take(&mut pending.nodes);
        pending.nodes = ids
            .into_iter()
            .map(|id| {
                from_file
                    .iter()
                    .find(|n| n.id == id)
                    .cloned()
                    .unwrap_or(NodeSpec::bare(id))
            })
            .collect();
    }
    if let Some(v) = get("OUTPUT_DIR") {
        cfg.sync.output_dir = PathBuf::from(v);
    }
    if let Some(v) = get("INTERVAL_SECONDS") {
        cfg.sync.interval =
            nonzero(parse_duration(&v)).map_err(|r| env_err("INTERVAL_SECONDS", r))?;
    }
    if let Some(v) = get("APPLY_CMD") {
        cfg.apply.argv = split_cmd(&v).map_err(|r| env_err("APPLY_CMD", r))?;
        cfg.apply.cmd = v;
    }
    if let Some(v) = get("APPLY_MODE") {
        pending.mode = Some(parse_mode(&v).map_err(|r| env_err("APPLY_MODE", r))?);
    }
    let api = get("XRAY_API_ADDR");
    let flavor = get("XRAY_FLAVOR");
    let access_log = get("XRAY_ACCESS_LOG");
    let cut = get("XRAY_CUT_CONNECTIONS");
    if api.is_some() || flavor.is_some() || access_log.is_some() || cut.is_some() {
        let x = cfg.xray.get_or_insert_with(Xray::default);
        if let Some(p) = access_log {
            x.access_log = Some(PathBuf::from(p)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(v) = cut {
            x.cut_connections = parse_bool("XRAY_CUT_CONNECTIONS", &v)?;
        }
        if let Some(a) = api {
            x.api = parse_xray_api(&a).map_err(|r| env_err("XRAY_API_ADDR", r))?;
        }
        match flavor.as_deref() {
            None => {}
            Some("xray") => x.flavor = Flavor::Xray,
            Some("v2ray") => x.flavor = Flavor::V2ray,
            Some(other) => {
                return Err(env_err(
                    "XRAY_FLAVOR",
                    format!("`{other}` is not a flavor (expected xray or v2ray)"),
                ));
            }
        }
    }
    if let Some(v) = get("ENABLE_TRAFFIC_REPORT") {
        cfg.traffic.enabled = parse_bool("ENABLE_TRAFFIC_REPORT", &v)?;
    }
    if let Some(v) = get("TRAFFIC_REPORT_INTERVAL_SECONDS") {
        cfg.traffic.interval = nonzero(parse_duration(&v))
            .map_err(|r| env_err("TRAFFIC_REPORT_INTERVAL_SECONDS", r))?;
    }
    Ok(())
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(env_err(name, format!("`{v}` is not true or false"))),
    }
}

fn nonzero(
    d: Result<std::time::Duration, super::Invalid>,
) -> Result<std::time::Duration, super::Invalid> {
    match d {
        Ok(d) if d.is_zero() => Err(super::Invalid("must be more than 0 seconds".into())),
        other => other,
    }
}
