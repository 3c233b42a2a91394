//! Relays (API relays using ProxyCast Connect) and their callback endpoints.
//!
//! - this file: the provider registry. Each relay is `{webhook.providers_dir}/{id}.json`:
//!
//!   ```json
//!   {"id": "myrelay", "name": "My relay",
//!    "webhook": {"callback_url": "https://api.myrelay.com/proxycast/callback",
//!                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}
//!   ```
//!
//!   `id` must equal the file name; `callback_url` must be `https://`; `secret` is
//!   optional (Standard Webhooks: `whsec_` + base64). Other top-level keys are the
//!   provider's own and are ignored; unknown keys *inside* `webhook` are errors (a
//!   misspelt `secret` must not silently turn signing off). A file without a `webhook`
//!   object is a provider that takes no callbacks — unless it has a key that looks like
//!   a misspelt `webhook` (`webhok`) or a top-level `callback_url` / `secret`: that is
//!   an error, not a relay gone silent. A `*.json` that is a directory, a dangling
//!   symlink, not a regular file, or larger than [`MAX_FILE_BYTES`] is an error too.
//!   An invalid file is reported with its path, the field and the reason (once: a
//!   reload repeats only what changed), and skipped; the others load. On a reload, an
//!   invalid file keeps the version loaded before it (fail static: a half-saved edit
//!   does not unregister a relay).
//!
//!   Reloaded on SIGHUP and when a file's name, size or mtime changes (checked every
//!   `webhook.reload_interval`), without a restart. Readers take a snapshot
//!   ([`Registry::get`]): a reload never changes a provider under an attempt.
//! - [`client`]: the HTTP client that delivers callbacks to them.

pub mod client;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::Deserialize;

/// `[webhook]`: where relays are registered and how callbacks are sent.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `{id}.json` per relay (SPEC §3).
    pub providers_dir: PathBuf,
    /// Extra CA certificates (PEM) trusted for `callback_url`, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// One callback request, connect to last byte.
    pub timeout: Duration,
    /// Callbacks in flight to one relay at once (all relays together: the webhook
    /// kind's `queue.kinds.webhook.concurrency`).
    pub per_relay_concurrency: usize,
    /// How often `providers_dir` is checked for changed files (SIGHUP reloads at once).
    pub reload_interval: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            providers_dir: PathBuf::from("./providers"),
            ca_file: None,
            timeout: Duration::from_secs(5),
            per_relay_concurrency: 8,
            reload_interval: Duration::from_secs(2),
        }
    }
}

/// Longest relay id: it names a file and goes into state keys.
pub const MAX_ID_LEN: usize = 64;

/// Largest provider file read: a registration is a few hundred bytes; a huge file is a
/// mistake (a log, a dump) and is not read into memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// One relay's registration.
#[derive(Clone)]
pub struct Provider {
    pub id: String,
    pub name: Option<String>,
    pub callback_url: url::Url,
    /// The signing key: the bytes `whsec_…` decodes to. Never printed.
    pub secret: Option<SigningKey>,
    /// The file it came from.
    pub path: PathBuf,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("callback_url", &redacted(&self.callback_url))
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

/// Why a signing key does not parse; Display is the reason a provider file reports.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("must be `whsec_` followed by base64 (Standard Webhooks form)")]
    Prefix,
    #[error("the part after `whsec_` is not valid base64")]
    Base64(#[source] base64::DecodeError),
    #[error("decodes to {0} bytes; use at least 16 random bytes (24 to 64 recommended)")]
    Short(usize),
}

/// Why a relay id is refused; Display is the reason.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("must be 1 to {MAX_ID_LEN} characters")]
    Length,
    #[error("may hold only letters, digits, `-`, `_` and `.` (not first)")]
    Characters,
}

/// A Standard Webhooks signing key (the decoded bytes of `whsec_…`).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Decodes `whsec_` + base64.
    pub fn parse(s: &str) -> Result<SigningKey, KeyError> {
        let Some(b64) = s.strip_prefix("whsec_") else {
            return Err(KeyError::Prefix);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(KeyError::Base64)?;
        if bytes.len() < 16 {
            return Err(KeyError::Short(bytes.len()));
        }
        Ok(SigningKey(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL fit for logs and `queuectl`: its password, query values and fragment masked
/// (relays put tokens there). The one rule for every URL shown: [`crate::redact::redact_url`].
pub fn redacted(url: &url::Url) -> String {
    crate::redact::redact_url(url)
}

/// A provider file that could not be used: its path, the field at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    pub path: PathBuf,
    /// `webhook.callback_url`, `id`, … or `(file)` / `(json)` for the whole file.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.path.display(),
            self.field,
            self.reason
        )
    }
}

impl std::error::Error for ProviderError {}

/// What one load of the directory found.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    pub by_id: HashMap<String, Arc<Provider>>,
    /// Files skipped (or, on a reload, kept at their previous version) and why.
    pub errors: Vec<ProviderError>,
    /// Files that register a provider without a `webhook` object.
    pub without_webhook: Vec<String>,
    /// The directory does not exist.
    pub missing_dir: bool,
}

/// A relay id is a file name and part of state keys: letters, digits, `-`, `_`, `.`.
pub fn valid_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(IdError::Length);
    }
    if id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(IdError::Characters);
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawProvider {
    id: Option<serde_json::Value>,
    name: Option<serde_json::Value>,
    webhook: Option<serde_json::Value>,
    /// The provider's own keys, ignored, but looked at for a misspelt `webhook`.
    #[serde(flatten)]
    others: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    callback_url: Option<String>,
    secret: Option<String>,
}

/// Reads one provider file. `Ok(None)`: a valid provider without a `webhook` object.
pub fn load_file(path: &Path) -> Result<Option<Provider>, ProviderError> {
    let err = |field: &str, reason: String| ProviderError {
        path: path.to_path_buf(),
        field: field.into(),
        reason,
    };
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| err("(file)", "the file name is not UTF-8".into()))?;
    let text = read_capped(path).map_err(|e| err("(file)", e.to_string()))?;
    let raw: RawProvider = serde_json::from_slice(&text)
        .map_err(|e| err("(json)", format!("not a JSON object: {e}")))?;
    let id = match raw.id {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(err("id", "must be a string".into())),
        None => return Err(err("id", "is missing".into())),
    };
    valid_id(&id).map_err(|r| err("id", format!("`{id}` {r}")))?;
    if id != stem {
        return Err(err(
            "id",
            format!(
                "`{id}` does not match the file name (expected `{stem}`; rename the file or fix the id)"
            ),
        ));
    }
    let name = match raw.name {
        Some(serde_json::Value::String(s)) => Some(s),
        None | Some(serde_json::Value::Null) => None,
        Some(_) => return Err(err("name", "must be a string".into())),
    };
    let webhook = match raw.webhook {
        None | Some(serde_json::Value::Null) => {
            if let Some((key, reason)) = misplaced_webhook(&raw.others) {
                return Err(err(&key, reason));
            }
            return Ok(None);
        }
        Some(v @ serde_json::Value::Object(_)) => {
            serde_path_to_error::deserialize::<_, RawWebhook>(v).map_err(|e| {
                let at = e.path().to_string();
                let message = e.into_inner().to_string();
                if at == "." {
                    err("webhook", message)
                } else if crate::redact::is_secret_key(&at) {
                    // serde quotes the value it got: never a secret's or a URL's.
                    err(
                        &format!("webhook.{at}"),
                        crate::redact::without_value(&message),
                    )
                } else {
                    err(&format!("webhook.{at}"), message)
                }
            })?
        }
        Some(_) => return Err(err("webhook", "must be an object".into())),
    };
    let Some(url) = webhook.callback_url else {
        return Err(err("webhook.callback_url", "is missing".into()));
    };
    let callback_url = url::Url::parse(url.trim())
        .map_err(|e| err("webhook.callback_url", format!("not a URL: {e}")))?;
    if callback_url.scheme() != "https" {
        return Err(err(
            "webhook.callback_url",
            format!(
                "must be https:// (got {}://): callbacks are only sent over TLS",
                callback_url.scheme()
            ),
        ));
    }
    if callback_url.host().is_none() {
        return Err(err("webhook.callback_url", "has no host".into()));
    }
    let secret = match webhook.secret.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(SigningKey::parse(s).map_err(|r| err("webhook.secret", r.to_string()))?),
    };
    Ok(Some(Provider {
        id,
        name,
        callback_url,
        secret,
        path: path.to_path_buf(),
    }))
}

/// Why a provider file could not be read; shown after its path and `(file)`.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("is a symbolic link to {}, which does not exist", .0.display())]
    DanglingLink(PathBuf),
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    #[error("is a directory, not a provider file")]
    Directory,
    #[error("is not a regular file")]
    NotAFile,
    #[error("is larger than {MAX_FILE_BYTES} bytes (1 MiB): not a provider file")]
    TooLarge,
}

/// Reads a provider file: a regular file (a symlink to one is fine) of at most
/// [`MAX_FILE_BYTES`]. Says what it is otherwise (a directory, a dangling link, a FIFO
/// that would block the reload).
fn read_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(match std::fs::read_link(path) {
                Ok(target) => ReadError::DanglingLink(target),
                Err(_) => ReadError::Io(e),
            });
        }
        Err(e) => return Err(ReadError::Io(e)),
    };
    if meta.is_dir() {
        return Err(ReadError::Directory);
    }
    if !meta.is_file() {
        return Err(ReadError::NotAFile);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut text))
        .map_err(ReadError::Io)?;
    // It may have grown since the metadata was read.
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(text)
}

/// A file without `webhook`: is there one misspelt (`webhok`, `Webhook`), or its
/// fields at the top level? Then it is a mistake, not a provider without callbacks.
fn misplaced_webhook(
    others: &serde_json::Map<String, serde_json::Value>,
) -> Option<(String, String)> {
    for key in others.keys() {
        if strsim::damerau_levenshtein(&key.to_ascii_lowercase(), "webhook") <= 2 {
            return Some((
                key.clone(),
                format!(
                    "unknown key `{key}`: did you mean `webhook`? Without a `webhook` object this relay takes no callbacks"
                ),
            ));
        }
        if key == "callback_url" || key == "secret" {
            return Some((
                key.clone(),
                format!(
                    "`{key}` belongs inside the `webhook` object ({{\"webhook\": {{\"{key}\": …}}}}); as it is, this relay takes no callbacks"
                ),
            ));
        }
    }
    None
}

/// Loads every `*.json` in `dir`. `previous`: the last load, whose version of a file
/// now invalid is kept.
pub fn load_dir(dir: &Path, previous: Option<&Providers>) -> Providers {
    let mut out = Providers::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.missing_dir = true;
            return out;
        }
        Err(e) => {
            out.errors.push(ProviderError {
                path: dir.to_path_buf(),
                field: "(directory)".into(),
                reason: format!("cannot read: {e}"),
            });
            // Keep what was loaded: an unreadable directory is not "no relays".
            if let Some(p) = previous {
                out.by_id = p.by_id.clone();
            }
            return out;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_provider_name(p))
        .collect();
    files.sort();
    for path in files {
        match load_file(&path) {
            Ok(Some(p)) => {
                out.by_id.insert(p.id.clone(), Arc::new(p));
            }
            Ok(None) => out.without_webhook.push(
                path.file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
            ),
            Err(e) => {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if let Some(old) = previous.and_then(|p| p.by_id.get(stem)) {
                    out.by_id.insert(stem.to_string(), old.clone());
                }
                out.errors.push(e);
            }
        }
    }
    out
}

/// `*.json`, not hidden (editors' swap and temp files start with a dot). Whatever it
/// is (a directory, a dangling link) is [`load_file`]'s to report.
fn is_provider_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "json")
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

/// What the directory looks like, to notice changes cheaply: name, size, mtime.
pub fn fingerprint(dir: &Path) -> Option<BTreeMap<PathBuf, (u64, SystemTime)>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter(|e| is_provider_name(&e.path()))
            .filter_map(|e| {
                // Through a symlink (config management links files in), else the link.
                let m = std::fs::metadata(e.path()).or_else(|_| e.metadata()).ok()?;
                Some((e.path(), (m.len(), m.modified().ok()?)))
            })
            .collect(),
    )
}

/// The live registry: a snapshot swapped whole on each reload.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    current: RwLock<Arc<Providers>>,
    /// Tells the webhook workers that relays exist (they wait until then).
    any: tokio::sync::watch::Sender<bool>,
}

impl Registry {
    /// Loads `dir` now, logging what was skipped.
    pub fn load(dir: &Path) -> Registry {
        let providers = load_dir(dir, None);
        let r = Registry {
            dir: dir.to_path_buf(),
            any: tokio::sync::watch::Sender::new(!providers.by_id.is_empty()),
            current: RwLock::new(Arc::new(Providers::default())),
        };
        r.install(providers, "loaded", None);
        r
    }

    /// A registry holding exactly these providers (tests, programs that embed the
    /// crate and keep relays elsewhere).
    pub fn from_providers(providers: impl IntoIterator<Item = Provider>) -> Registry {
        let by_id: HashMap<String, Arc<Provider>> = providers
            .into_iter()
            .map(|p| (p.id.clone(), Arc::new(p)))
            .collect();
        Registry {
            dir: PathBuf::new(),
            any: tokio::sync::watch::Sender::new(!by_id.is_empty()),
            current: RwLock::new(Arc::new(Providers {
                by_id,
                ..Default::default()
            })),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The provider registered as `id`, if any.
    pub fn get(&self, id: &str) -> Option<Arc<Provider>> {
        self.snapshot().by_id.get(id).cloned()
    }

    pub fn snapshot(&self) -> Arc<Providers> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the directory again; `why` goes into the log line (`SIGHUP`, `changed`).
    pub fn reload(&self, why: &str) -> Arc<Providers> {
        let previous = self.snapshot();
        let providers = load_dir(&self.dir, Some(&previous));
        self.install(providers, why, Some(&previous))
    }

    /// Resolves once at least one relay is registered.
    pub async fn wait_for_any(&self) {
        let mut rx = self.any.subscribe();
        let _ = rx.wait_for(|any| *any).await;
    }

    /// Puts `providers` in force and logs what changed: a file's error is logged when
    /// it is new since `previous`, not again at every reload.
    fn install(
        &self,
        providers: Providers,
        why: &str,
        previous: Option<&Providers>,
    ) -> Arc<Providers> {
        let providers = Arc::new(providers);
        // In force before it is logged: whoever reads the log line can rely on it.
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = providers.clone();
        self.any.send_replace(!providers.by_id.is_empty());
        if providers.missing_dir {
            tracing::info!(dir = %self.dir.display(), "webhook.providers_dir does not exist: no relays registered (create it and add {{id}}.json files; they are picked up without a restart)");
        }
        for e in &providers.errors {
            if previous.is_some_and(|p| p.errors.contains(e)) {
                continue;
            }
            let kept = e
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|id| providers.by_id.contains_key(id));
            if kept {
                tracing::error!(file = %e.path.display(), field = %e.field, reason = %e.reason, "invalid provider file; its previously loaded version stays in force");
            } else {
                tracing::error!(file = %e.path.display(), field = %e.field, reason = %e.reason, "invalid provider file skipped; the other relays load");
            }
        }
        let mut ids: Vec<&str> = providers.by_id.keys().map(String::as_str).collect();
        ids.sort_unstable();
        tracing::info!(
            dir = %self.dir.display(),
            relays = providers.by_id.len(),
            ids = %ids.join(","),
            skipped = providers.errors.len(),
            "providers {why}"
        );
        providers
    }

    /// Reloads on SIGHUP and when the directory's files change, until `stop`.
    ///
    /// The SIGHUP handler is installed here, before the future is first polled: a
    /// SIGHUP that arrives before a spawned task gets to run must not meet the default
    /// action, which ends the process.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let hup = hangup();
        self.watch_with(hup, every, stop)
    }

    async fn watch_with(
        self: Arc<Self>,
        mut hup: Hangup,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut seen = fingerprint(&self.dir);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                _ = recv_hangup(&mut hup) => "reloaded (SIGHUP)",
                _ = tick.tick() => {
                    let now = fingerprint(&self.dir);
                    if now == seen {
                        continue;
                    }
                    "reloaded (files changed)"
                }
            };
            seen = fingerprint(&self.dir);
            let registry = self.clone();
            // Reading a few small files; off the async threads all the same.
            let _ = tokio::task::spawn_blocking(move || registry.reload(why)).await;
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; provider files are still reloaded when they change");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

async fn recv_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h
        && s.recv().await.is_some()
    {
        return;
    }
    let _ = h;
    std::future::pending::<()>().await
}

/// The secret-free view of a provider for `queuectl relays` and logs.
pub fn describe(p: &Provider) -> String {
    format!(
        "{} -> {}{}",
        p.id,
        redacted(&p.callback_url),
        if p.secret.is_some() { " (signed)" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_bad_file_is_named_with_its_field_and_the_others_load() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "good.json",
            r#"{"id":"good","name":"G","api":"x","webhook":{"callback_url":"https://r.example/cb","secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}"#,
        );
        let plain = write(
            d.path(),
            "plain.json",
            r#"{"id":"plain","webhook":{"callback_url":"http://r.example/cb"}}"#,
        );
        write(
            d.path(),
            "typo.json",
            r#"{"id":"typo","webhook":{"callback_url":"https://r.example/cb","secrett":"x"}}"#,
        );
        write(d.path(), "other.json", r#"{"id":"nope","webhook":{}}"#);
        write(d.path(), "bare.json", r#"{"id":"bare"}"#);
        write(d.path(), "notes.txt", "ignored");
        let p = load_dir(d.path(), None);
        assert_eq!(p.by_id.keys().collect::<Vec<_>>(), ["good"]);
        assert!(p.by_id["good"].secret.is_some());
        assert_eq!(p.without_webhook, ["bare"]);
        let errs: Vec<(String, &str)> = p
            .errors
            .iter()
            .map(|e| {
                (
                    e.path.file_name().unwrap().to_string_lossy().into(),
                    e.field.as_str(),
                )
            })
            .collect();
        assert_eq!(
            errs,
            [
                ("other.json".to_string(), "id"),
                ("plain.json".to_string(), "webhook.callback_url"),
                ("typo.json".to_string(), "webhook.secrett"),
            ]
        );
        let shown = p.errors[1].to_string();
        assert!(shown.starts_with(&plain.display().to_string()), "{shown}");
        assert!(shown.contains("must be https://"), "{shown}");
        assert!(p.errors[2].reason.contains("secrett"), "{}", p.errors[2]);
    }

    #[test]
    fn a_wrong_typed_secret_or_url_is_named_without_its_value() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "s.json",
            r#"{"id":"s","webhook":{"callback_url":"https://r.example/cb","secret":918273645}}"#,
        );
        write(
            d.path(),
            "u.json",
            r#"{"id":"u","webhook":{"callback_url":["https://u:pw-5150@r.example/"]}}"#,
        );
        write(
            d.path(),
            "t.json",
            r#"{"id":"t","secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw","callback_url":"https://r.example/"}"#,
        );
        let p = load_dir(d.path(), None);
        let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["webhook.secret", "callback_url", "webhook.callback_url"]
        );
        for e in &p.errors {
            let shown = e.to_string();
            assert!(
                !shown.contains("918273645")
                    && !shown.contains("pw-5150")
                    && !shown.contains("MfKQ"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_reload_keeps_the_last_good_version_of_a_broken_file() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.json",
            r#"{"id":"a","webhook":{"callback_url":"https://a.example/"}}"#,
        );
        let first = load_dir(d.path(), None);
        write(
            d.path(),
            "a.json",
            r#"{"id":"a","webhook":{"callback_url":"#,
        );
        let second = load_dir(d.path(), Some(&first));
        assert_eq!(
            second.by_id["a"].callback_url.as_str(),
            "https://a.example/"
        );
        assert_eq!(second.errors.len(), 1);
        std::fs::remove_file(d.path().join("a.json")).unwrap();
        assert!(load_dir(d.path(), Some(&second)).by_id.is_empty());
    }

    #[test]
    fn secrets_and_url_tokens_are_not_printed() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{key:?}"), "***");
        let url = url::Url::parse("https://u:p@r.example/cb?token=abc#x").unwrap();
        assert_eq!(redacted(&url), "https://u:***@r.example/cb?token=***#***");
        assert!(SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(SigningKey::parse("whsec_!!").is_err());
    }
}
