//! Configuration: defaults, then the TOML file, then environment variables (the Go
//! connector's names included), validated into typed settings. Every error names the
//! file (or "environment"), the key and the reason, in one line, and never quotes the
//! value of a secret-bearing key ([`is_secret_key`]) or a TOML source line.
//!
//! - `raw.rs`: the file's shape (serde), unknown keys refused.
//! - `env.rs`: the environment variables and how each maps onto a key.
//! - `render.rs`: `connector check-config`'s output, secrets masked.

mod env;
pub mod keys;
mod raw;
mod render;
mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::jobs;
use crate::queue;

pub use env::ENV_VARS;
pub use render::{render, render_json};
// What is never shown, and the peers' own settings and vocabulary, are defined where
// they are used (config may import the peers; they must not import config).
pub use crate::peers::panel::PanelSettings as Panel;
pub use crate::peers::relays::WebhookSettings as Webhook;
pub use crate::peers::xray::Flavor;
pub use crate::peers::xray::account::Protocol;
pub use crate::redact::{Secret, ShownUrl, is_secret_key, redact_url, without_value};
pub use webhook::Http;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// Queue database and admin socket live here.
    pub data_dir: PathBuf,
    pub panel: Panel,
    pub sync: Sync,
    pub apply: Apply,
    pub xray: Option<Xray>,
    pub nodes: Vec<Node>,
    pub traffic: Traffic,
    pub queue: queue::Settings,
    /// `[admin] socket`: the admin socket's path, when not `{data_dir}/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// `[webhook]`: relay callbacks.
    pub webhook: Webhook,
    /// `[http]`: the local listener.
    pub http: Http,
    /// How long running attempts may take to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Problems that do not stop the program (a token file readable by others).
    pub warnings: Vec<String>,
    /// Which environment variable set which key (`nodes.7.port` for a node's key):
    /// `check-config` shows it.
    pub env_sources: std::collections::BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        let mut queue = jobs::settings();
        // A node's syncs use one live job per node, not idempotency keys, so done ones
        // are only history: an hour of it, not a day of one job per interval.
        queue.kind_mut(jobs::NODE_SYNC).keep_done = Some(Duration::from_secs(3600));
        Config {
            file: None,
            data_dir: PathBuf::from("./data"),
            panel: Panel::default(),
            sync: Sync::default(),
            apply: Apply::default(),
            xray: None,
            nodes: Vec::new(),
            traffic: Traffic::default(),
            queue,
            admin_socket: None,
            webhook: Webhook::default(),
            http: Http::default(),
            shutdown_timeout: Duration::from_secs(30),
            warnings: Vec::new(),
            env_sources: Default::default(),
        }
    }
}

/// The admin socket's file name under `data_dir`, unless `[admin] socket` says otherwise.
const ADMIN_SOCKET_NAME: &str = "admin.sock";

impl Config {
    /// Where the queue database lives.
    pub fn queue_path(&self) -> PathBuf {
        self.data_dir.join("queue")
    }

    /// Where the daemon serves its admin API (`queuectl` while it runs).
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ADMIN_SOCKET_NAME))
    }

    pub fn node(&self, id: u64) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

#[derive(Debug, Clone)]
pub struct Sync {
    pub interval: Duration,
    pub output_dir: PathBuf,
    /// A sync that would drop more than this share of a node's users is held. 1.0: off.
    pub max_removal_ratio: f64,
    /// A held sync is applied once the panel has repeated it this long.
    pub confirm_after: Duration,
}

impl Default for Sync {
    fn default() -> Self {
        Sync {
            interval: Duration::from_secs(10),
            output_dir: PathBuf::from("./out"),
            max_removal_ratio: 1.0,
            confirm_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    XrayGrpc,
    Cmd,
    None,
}

impl ApplyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyMode::XrayGrpc => "xray-grpc",
            ApplyMode::Cmd => "cmd",
            ApplyMode::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Apply {
    pub mode: ApplyMode,
    /// `APPLY_CMD` as written (placeholders unsubstituted).
    pub cmd: String,
    /// `cmd` split into words, as it will be run (no shell).
    pub argv: Vec<String>,
    /// How long one run of `cmd` may take.
    pub timeout: Duration,
}

impl Default for Apply {
    fn default() -> Self {
        Apply {
            mode: ApplyMode::None,
            cmd: String::new(),
            argv: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Xray {
    pub api: String,
    pub flavor: Flavor,
    /// A user's email in the core: `{uuid}`, or `{node_id}:{uuid}` when several nodes
    /// share one core. Users whose email has this shape are the agent's to manage;
    /// others (added by hand, in the core's config) are left alone.
    pub email_template: String,
    /// How long one API call may take.
    pub timeout: Duration,
    /// Adds and removes in flight at once on the API channel.
    pub concurrency: usize,
    /// The core's access log (`log.access`), which ties each accepted connection's
    /// source address to a user's email: what lets a removal cut open connections.
    pub access_log: Option<PathBuf>,
    /// After a removal, destroy the removed users' established TCP connections on the
    /// node's inbound port (needs `access_log` and `CAP_NET_ADMIN`).
    pub cut_connections: bool,
}

impl Default for Xray {
    fn default() -> Self {
        Xray {
            api: "127.0.0.1:10085".into(),
            flavor: Flavor::Xray,
            email_template: "{uuid}".into(),
            timeout: Duration::from_secs(10),
            concurrency: 32,
            access_log: None,
            cut_connections: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: u64,
    /// With `{node_id}` already substituted.
    pub inbound_tag: String,
    pub protocol: Protocol,
    /// vless: the flow of users whose panel entry names none (e.g. `xtls-rprx-vision`).
    pub flow: String,
    /// shadowsocks: the cipher users are added with.
    pub cipher: Option<crate::peers::xray::account::Cipher>,
    /// The inbound's listening port, for cutting connections where the core cannot
    /// tell it (V2Ray 4 has no ListInbounds); Xray's own answer wins when it has one.
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Traffic {
    pub enabled: bool,
    pub interval: Duration,
    pub max_items: usize,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            enabled: true,
            interval: Duration::from_secs(60),
            max_items: 5000,
        }
    }
}

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or `None` when the value came from the environment.
    pub file: Option<PathBuf>,
    /// Dotted key (`queue.kinds.webhook.ladder[1]`) or environment variable name.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: {}: {}", file.display(), self.key, self.reason),
            None => write!(f, "environment: {}: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads environment variables; a trait so tests can pass a map.
pub trait Env {
    /// The value, `None` when unset or empty.
    fn var(&self, name: &str) -> Option<String>;

    /// True when `name` is set to something that is not UTF-8: an error naming the
    /// variable, never a value silently ignored.
    fn is_not_unicode(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var_os(name)
            .and_then(|v| v.into_string().ok())
            .filter(|v| !v.is_empty())
    }

    fn is_not_unicode(&self, name: &str) -> bool {
        std::env::var_os(name).is_some_and(|v| v.to_str().is_none())
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned().filter(|v| !v.is_empty())
    }
}

/// Loads the configuration: defaults, then `file` (if given), then the environment,
/// then the checks that span keys.
pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut pending = Pending::default();
    let mut doc = match file {
        Some(path) => raw::read_doc(path)?,
        None => toml::Table::new(),
    };
    // NODE_IDS's nodes may have `CONNECTOR_NODES_{ID}_…` variables; a bad list is
    // reported by env::apply, naming it.
    let node_ids = env
        .var("NODE_IDS")
        .and_then(|v| parse_node_ids(&v).ok())
        .unwrap_or_default();
    let overlaid = keys::overlay(&mut doc, env, &node_ids)?;
    if file.is_some() || !overlaid.is_empty() {
        raw::apply_doc(&mut cfg, doc, &mut pending, file).map_err(|e| keys::blame(e, &overlaid))?;
        // A token from the environment is not the file's to protect.
        if overlaid.iter().any(|o| o.path == "http.token") {
            cfg.warnings.retain(|w| !w.contains(" holds http.token "));
        }
    }
    cfg.file = file.map(Path::to_path_buf);
    env::apply(&mut cfg, env, &mut pending)?;
    cfg.env_sources = keys::sources(&overlaid, env);
    finish(&mut cfg, pending, env)?;
    Ok(cfg)
}

/// What the file and the environment said that is resolved only once both are read.
#[derive(Debug, Default)]
struct Pending {
    /// `apply.mode` when set explicitly; otherwise it follows from `[xray]` / `cmd`.
    mode: Option<ApplyMode>,
    nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone)]
struct NodeSpec {
    id: u64,
    inbound_tag: Option<String>,
    protocol: Option<Protocol>,
    flow: Option<String>,
    cipher: Option<crate::peers::xray::account::Cipher>,
    port: Option<u16>,
}

impl NodeSpec {
    fn bare(id: u64) -> Self {
        NodeSpec {
            id,
            inbound_tag: None,
            protocol: None,
            flow: None,
            cipher: None,
            port: None,
        }
    }
}

/// Cross-key defaults and checks, after file and environment.
fn finish(cfg: &mut Config, pending: Pending, env: &dyn Env) -> Result<(), ConfigError> {
    let file = cfg.file.clone();
    let at = |key: &str, reason: String| ConfigError {
        file: file.clone(),
        key: key.into(),
        reason,
    };
    let tag_default = env
        .var("XRAY_INBOUND_TAG")
        .unwrap_or_else(|| "node-{node_id}".into());
    let proto_default = match env.var("XRAY_PROTOCOL") {
        Some(p) => Protocol::parse(&p).map_err(|e| ConfigError {
            file: None,
            key: "XRAY_PROTOCOL".into(),
            reason: e.to_string(),
        })?,
        None => Protocol::Vless,
    };
    cfg.nodes = pending
        .nodes
        .iter()
        .map(|n| Node {
            id: n.id,
            inbound_tag: n
                .inbound_tag
                .as_deref()
                .unwrap_or(&tag_default)
                .replace("{node_id}", &n.id.to_string()),
            protocol: n.protocol.unwrap_or(proto_default),
            flow: n.flow.clone().unwrap_or_default(),
            cipher: n.cipher,
            port: n.port,
        })
        .collect();
    let explicit_mode = pending.mode;
    // SPEC: xray-grpc when [xray] is set, cmd when APPLY_CMD is set, else none.
    cfg.apply.mode = explicit_mode.unwrap_or(if cfg.xray.is_some() {
        ApplyMode::XrayGrpc
    } else if !cfg.apply.cmd.is_empty() {
        ApplyMode::Cmd
    } else {
        ApplyMode::None
    });
    match cfg.apply.mode {
        ApplyMode::Cmd if cfg.apply.argv.is_empty() => {
            return Err(at(
                "apply.cmd",
                "apply.mode is \"cmd\" but no command is set (APPLY_CMD)".into(),
            ));
        }
        ApplyMode::XrayGrpc => {
            let x = cfg.xray.get_or_insert_with(Xray::default);
            if !x.email_template.contains("{uuid}") {
                return Err(at(
                    "xray.email_template",
                    format!(
                        "`{}` has no {{uuid}}: every user would get the same email",
                        x.email_template
                    ),
                ));
            }
            if cfg.nodes.len() > 1 && !x.email_template.contains("{node_id}") {
                let mut tags: Vec<&str> =
                    cfg.nodes.iter().map(|n| n.inbound_tag.as_str()).collect();
                tags.sort_unstable();
                tags.dedup();
                if tags.len() < cfg.nodes.len() {
                    return Err(at(
                        "xray.email_template",
                        "several nodes share an inbound tag: use an email_template with {node_id} (\"{node_id}:{uuid}\") so their users stay apart".into(),
                    ));
                }
            }
            if x.cut_connections && x.access_log.is_none() {
                return Err(at(
                    "xray.cut_connections",
                    "needs xray.access_log (XRAY_ACCESS_LOG): the core's access log is what ties a connection to its user".into(),
                ));
            }
            for n in &cfg.nodes {
                if n.protocol == Protocol::Shadowsocks && x.flavor == Flavor::V2ray {
                    return Err(at(
                        "nodes.protocol",
                        format!(
                            "node {}: V2Ray's shadowsocks inbound is single-user; its users cannot be managed over the API",
                            n.id
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    if let Some(x) = &cfg.xray
        && cfg.traffic.enabled
        && cfg.nodes.len() > 1
        && !x.email_template.contains("{node_id}")
    {
        cfg.warnings.push(format!(
            "traffic: {} nodes share one core but xray.email_template has no {{node_id}}: a user's counters cannot be told apart per node, so all traffic is reported for node {} (use \"{{node_id}}:{{uuid}}\")",
            cfg.nodes.len(),
            cfg.nodes[0].id
        ));
    }
    if let Some(addr) = cfg.http.listen
        && !addr.ip().is_loopback()
        && cfg.http.token.is_none()
    {
        cfg.warnings.push(format!(
            "http.listen is {addr}, which other hosts can reach, and http.token is not set: anyone who can connect may submit webhook events and trigger node syncs; set http.token (or http.token_file), or listen on 127.0.0.1"
        ));
    }
    if !cfg.nodes.is_empty() && cfg.panel.internal_api_key.is_none() {
        return Err(at(
            "panel.internal_api_key",
            "required when nodes are configured (set INTERNAL_API_KEY, panel.internal_api_key or panel.internal_api_key_file)".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in &cfg.nodes {
        if !seen.insert(n.id) {
            return Err(at("nodes", format!("node {} is listed twice", n.id)));
        }
    }
    Ok(())
}

/// Why one value is not acceptable: the reason a [`ConfigError`] gives for its key or
/// variable. Says what is wrong without echoing a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Parses a humantime duration, or a plain number of seconds (the Go connector's
/// `*_SECONDS` variables).
pub fn parse_duration(s: &str) -> Result<Duration, Invalid> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        Invalid(format!(
            "`{s}` is not a duration ({e}); use e.g. \"10s\", \"5m\", \"1h30m\""
        ))
    })
}

/// `panel.base_url` / `PANEL_BASE_URL`. The value is echoed only masked: it may carry
/// a password (`http://admin:pass@panel/`).
fn parse_base_url(s: &str) -> Result<String, Invalid> {
    let url = url::Url::parse(s.trim()).map_err(|e| {
        Invalid(format!("not a URL ({e}); expected e.g. \"http://127.0.0.1:3000\" or \"https://panel.example/prefix\""))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        // Only the scheme: in `admin:pass@host` the "scheme" is the user name and the
        // rest, the password included, is a path.
        return Err(Invalid(format!(
            "must start with http:// or https:// (it starts with `{}:`)",
            url.scheme()
        )));
    }
    let shown = redact_url(&url);
    if url.host().is_none() {
        return Err(Invalid(format!("`{shown}` has no host")));
    }
    // Request paths (`/api/internal/...`) are appended to the base: after a query or a
    // fragment they would end up inside it.
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Invalid(format!(
            "`{shown}` has a {}: panel.base_url (PANEL_BASE_URL) takes no query or fragment, request paths are appended to it; remove everything from the `{}` on",
            if url.query().is_some() {
                "query"
            } else {
                "fragment"
            },
            if url.query().is_some() { '?' } else { '#' },
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// `xray.api`: `host:port` as the gRPC client dials it (`127.0.0.1:10085`,
/// `[::1]:10085`, `localhost:10085`).
fn parse_xray_api(s: &str) -> Result<String, Invalid> {
    let s = s.trim();
    let bad = |why: &str| {
        Invalid(format!(
            "`{s}` is not a host:port address ({why}); expected e.g. \"127.0.0.1:10085\" or \"[::1]:10085\""
        ))
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
        Ok(_) => {}
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between the brackets"))?;
    } else if host.contains(':') {
        return Err(bad("an IPv6 address goes in brackets"));
    } else {
        url::Host::parse(host).map_err(|e| bad(&format!("bad host: {e}")))?;
    }
    Ok(s.to_string())
}

/// A key or token sent in an HTTP header: printable ASCII. Says what is wrong without
/// the value.
fn header_safe(s: &str) -> Result<(), Invalid> {
    if s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Ok(())
    } else {
        Err(Invalid("holds a character that cannot be sent in an HTTP header (only printable ASCII; the value is not shown)".into()))
    }
}

/// Checks that `data_dir` can hold the queue, and with `create` creates it: a
/// directory this process may write. `check-config` checks without creating; the
/// daemon creates. The error names `DATA_DIR` when the environment set it.
pub fn prepare_data_dir(cfg: &Config, env: &dyn Env, create: bool) -> Result<(), ConfigError> {
    let (file, key) = if env.var("DATA_DIR").is_some() {
        (None, "DATA_DIR")
    } else {
        (cfg.file.clone(), "data_dir")
    };
    let dir = &cfg.data_dir;
    let err = |reason: String| ConfigError {
        file: file.clone(),
        key: key.into(),
        reason: format!(
            "{reason}; set {key} to a directory the agent can create and write (it holds the queue database)"
        ),
    };
    // The directory, or the nearest ancestor that exists: where the queue would go.
    let mut probe = dir.as_path();
    loop {
        match std::fs::metadata(probe) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(err(format!(
                    "cannot use {}: {} is not a directory",
                    dir.display(),
                    probe.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match probe.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(p) => probe = p,
                    None => {
                        probe = Path::new(".");
                        break;
                    }
                }
            }
            Err(e) => return Err(err(format!("cannot use {}: {e}", dir.display()))),
        }
    }
    if let Err(e) = writable(probe) {
        return Err(err(format!(
            "cannot write in {}: {e}",
            if probe == dir.as_path() {
                dir.display().to_string()
            } else {
                format!("{} (to create {})", probe.display(), dir.display())
            }
        )));
    }
    if create {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// access(2) with W_OK|X_OK: may this process create files in `dir`?
fn writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn parse_node_ids(s: &str) -> Result<Vec<u64>, Invalid> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u64>()
                .map_err(|_| Invalid(format!("`{p}` is not a node id (expected e.g. 1,2,3)")))
        })
        .collect()
}

fn split_cmd(cmd: &str) -> Result<Vec<String>, Invalid> {
    shlex::split(cmd).ok_or_else(|| Invalid(format!("`{cmd}` has an unclosed quote")))
}
