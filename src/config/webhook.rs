//! `[webhook]` and `[http]`: relay callbacks (SPEC §3 webhook) and the local HTTP
//! listener that takes events in (SPEC §4). Kept in their own file so the sections
//! other kinds add stay apart.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Secret, Webhook};

/// `[http]`: the local listener (`POST /v1/webhooks/connect`).
#[derive(Debug, Clone)]
pub struct Http {
    /// `None`: no listener (`listen = ""`).
    pub listen: Option<SocketAddr>,
    /// Bearer token required on `POST /v1/webhooks/connect`, when set.
    pub token: Option<Secret>,
    /// Where the token was read from, when it came from a file.
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted; larger is `413`.
    pub max_body_bytes: usize,
    /// Connections served at once; at the limit the oldest one with no request in
    /// progress is closed to make room, or (none idle) accepting waits.
    pub max_connections: usize,
    /// A request's headers must arrive within this, counted from the connection's
    /// opening or the end of the previous answer (so it is also the keep-alive limit).
    pub header_timeout: Duration,
    /// A connection on which a read or a write makes no progress for this long is
    /// closed (a body that stops arriving, a client that does not read its answer).
    pub idle_timeout: Duration,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9460))),
            token: None,
            token_file: None,
            max_body_bytes: 64 * 1024,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    providers_dir: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    per_relay_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    reload_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
}

type KeyError = (String, String);

/// The most `http.max_connections` may be: each connection holds a file descriptor,
/// and the daemon keeps the rest of its open-file limit for itself.
const MAX_CONNECTIONS: usize = 1_000_000;

fn positive(key: &str, d: Duration) -> Result<Duration, KeyError> {
    if d.is_zero() {
        Err((key.into(), "must be more than 0s".into()))
    } else {
        Ok(d)
    }
}

/// Applies the file's `[webhook]` section.
pub(super) fn apply_webhook(w: &mut Webhook, raw: RawWebhook) -> Result<(), KeyError> {
    if let Some(d) = raw.providers_dir {
        w.providers_dir = d;
    }
    // An empty string is "none", as the example file writes it.
    w.ca_file = match raw.ca_file {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => {
            if let Err(e) = std::fs::metadata(&p) {
                return Err((
                    "webhook.ca_file".into(),
                    format!("cannot read {}: {e}", p.display()),
                ));
            }
            Some(p)
        }
        None => w.ca_file.take(),
    };
    if let Some(t) = raw.timeout {
        w.timeout = positive("webhook.timeout", t)?;
    }
    if let Some(c) = raw.per_relay_concurrency {
        if c == 0 {
            return Err((
                "webhook.per_relay_concurrency".into(),
                "must be at least 1".into(),
            ));
        }
        w.per_relay_concurrency = c;
    }
    if let Some(i) = raw.reload_interval {
        w.reload_interval = positive("webhook.reload_interval", i)?;
    }
    Ok(())
}

/// Applies the file's `[http]` section; `warnings` gets a token file others can read.
pub(super) fn apply_http(
    h: &mut Http,
    raw: RawHttp,
    file: &Path,
    warnings: &mut Vec<String>,
) -> Result<(), KeyError> {
    if let Some(l) = raw.listen {
        h.listen = parse_listen(&l).map_err(|r| ("http.listen".to_string(), r.to_string()))?;
    }
    if raw.token.as_deref().is_some_and(|t| !t.trim().is_empty()) && raw.token_file.is_some() {
        return Err((
            "http.token_file".into(),
            "set either token or token_file, not both".into(),
        ));
    }
    if let Some(t) = raw.token {
        let t = t.trim();
        h.token = (!t.is_empty()).then(|| Secret::new(t));
        if h.token.is_some() && super::raw::readable_by_others(file) {
            warnings.push(format!(
                "{} holds http.token and is readable by other users; chmod 600 it",
                file.display()
            ));
        }
    }
    if let Some(f) = raw.token_file {
        let text = std::fs::read_to_string(&f).map_err(|e| {
            (
                "http.token_file".to_string(),
                format!("cannot read {}: {e}", f.display()),
            )
        })?;
        let t = text.lines().next().unwrap_or("").trim();
        if t.is_empty() {
            return Err((
                "http.token_file".into(),
                format!("{} is empty", f.display()),
            ));
        }
        if super::raw::readable_by_others(&f) {
            warnings.push(format!(
                "{} holds the HTTP bearer token and is readable by other users; chmod 600 it",
                f.display()
            ));
        }
        h.token = Some(Secret::new(t));
        h.token_file = Some(f);
    }
    if let Some(m) = raw.max_body_bytes {
        if m < 1024 {
            return Err((
                "http.max_body_bytes".into(),
                format!("{m} is too small (at least 1024)"),
            ));
        }
        h.max_body_bytes = m;
    }
    if let Some(n) = raw.max_connections {
        if !(1..=MAX_CONNECTIONS).contains(&n) {
            return Err((
                "http.max_connections".into(),
                format!("{n} is not between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        h.max_connections = n;
    }
    if let Some(t) = raw.header_timeout {
        h.header_timeout = positive("http.header_timeout", t)?;
    }
    if let Some(t) = raw.idle_timeout {
        h.idle_timeout = positive("http.idle_timeout", t)?;
    }
    Ok(())
}

/// `host:port`, or empty for no listener.
fn parse_listen(s: &str) -> Result<Option<SocketAddr>, super::Invalid> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        super::Invalid(format!("`{s}` is not an address to listen on (expected e.g. \"127.0.0.1:9460\", or \"\" for none)"))
    })
}

/// The two sections for `check-config`; the token prints as `"***"`.
pub(super) fn render(w: &Webhook, h: &Http, o: &mut String) -> std::fmt::Result {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let d = |d: Duration| q(&humantime::format_duration(d).to_string());
    writeln!(
        o,
        "\n[webhook]\nproviders_dir = {}\nca_file = {}\ntimeout = {}\nper_relay_concurrency = {}\nreload_interval = {}",
        q(&w.providers_dir.display().to_string()),
        q(&w.ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()),
        d(w.timeout),
        w.per_relay_concurrency,
        d(w.reload_interval)
    )?;
    writeln!(
        o,
        "\n[http]\nlisten = {}",
        q(&h.listen.map(|a| a.to_string()).unwrap_or_default())
    )?;
    match (&h.token, &h.token_file) {
        (Some(_), Some(f)) => writeln!(o, "token_file = {}", q(&f.display().to_string()))?,
        (Some(_), None) => writeln!(o, "token = \"***\"")?,
        (None, _) => writeln!(
            o,
            "# token is not set: POST /v1/webhooks/connect takes no bearer token"
        )?,
    }
    writeln!(o, "max_body_bytes = {}", h.max_body_bytes)?;
    writeln!(
        o,
        "max_connections = {}\nheader_timeout = {}\nidle_timeout = {}",
        h.max_connections,
        d(h.header_timeout),
        d(h.idle_timeout)
    )
}
