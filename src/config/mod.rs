//! Configuration: defaults, then the TOML file, then environment variables, validated
//! into typed settings. Every error names the file, the key and the reason in one line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::queue::{self, JobKind, OnExhausted};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// Queue database and (later) admin socket live here.
    pub data_dir: PathBuf,
    pub queue: queue::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: None,
            data_dir: PathBuf::from("./data"),
            queue: queue::Settings::default(),
        }
    }
}

impl Config {
    /// Where the queue database lives.
    pub fn queue_path(&self) -> PathBuf {
        self.data_dir.join("queue")
    }
}

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    /// Dotted key (`queue.kinds.webhook.ladder[1]`) or environment variable name.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: {}: {}", file.display(), self.key, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads environment variables; a trait so tests can pass a map.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned().filter(|v| !v.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    queue: RawQueue,
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
    #[serde(default, with = "humantime_serde")]
    lease_timeout: Option<Duration>,
}

/// Loads the configuration: defaults, then `file` (if given), then the environment.
pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    if let Some(path) = file {
        let err = |key: &str, reason: String| ConfigError {
            file: Some(path.to_path_buf()),
            key: key.to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("(file)", format!("cannot read: {e}")))?;
        let value: toml::Value =
            toml::from_str(&text).map_err(|e| err("(syntax)", one_line(&e.to_string())))?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            err(
                if key == "." { "(top level)" } else { &key },
                one_line(&e.into_inner().to_string()),
            )
        })?;
        apply_raw(&mut cfg, raw).map_err(|(key, reason)| err(&key, reason))?;
        cfg.file = Some(path.to_path_buf());
    }
    apply_env(&mut cfg, env)?;
    Ok(cfg)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn apply_raw(cfg: &mut Config, raw: RawConfig) -> Result<(), (String, String)> {
    if let Some(d) = raw.data_dir {
        cfg.data_dir = d;
    }
    if let Some(w) = raw.queue.dedupe_window {
        cfg.queue.dedupe_window = w;
    }
    for (name, k) in raw.queue.kinds {
        let prefix = format!("queue.kinds.{name}");
        let kind: JobKind = name.parse().map_err(|e| (prefix.clone(), e))?;
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
        if let Some(l) = k.lease_timeout {
            if l.is_zero() {
                return Err((
                    format!("{prefix}.lease_timeout"),
                    "must be more than 0s".into(),
                ));
            }
            s.lease_timeout = l;
        }
    }
    Ok(())
}

fn apply_env(cfg: &mut Config, env: &dyn Env) -> Result<(), ConfigError> {
    if let Some(d) = env.var("DATA_DIR") {
        cfg.data_dir = PathBuf::from(d);
    }
    Ok(())
}

/// The effective configuration as TOML, for `connector check-config`.
pub fn render(cfg: &Config) -> String {
    let mut out = String::new();
    if let Some(f) = &cfg.file {
        out.push_str(&format!("# from {} and the environment\n", f.display()));
    } else {
        out.push_str("# from defaults and the environment (no config file)\n");
    }
    out.push_str(&format!(
        "data_dir = {}\n\n[queue]\ndedupe_window = \"{}\"\n",
        toml_str(&cfg.data_dir.display().to_string()),
        humantime::format_duration(cfg.queue.dedupe_window)
    ));
    for kind in JobKind::ALL {
        let k = cfg.queue.kind(kind);
        let ladder: Vec<String> = k
            .ladder
            .iter()
            .map(|d| format!("\"{}\"", humantime::format_duration(*d)))
            .collect();
        out.push_str(&format!(
            "\n[queue.kinds.{kind}]\nladder = [{}]\non_exhausted = \"{}\"\nconcurrency = {}\nlease_timeout = \"{}\"\n",
            ladder.join(", "),
            match k.on_exhausted {
                OnExhausted::Dead => "dead",
                OnExhausted::RepeatLast => "repeat-last",
            },
            k.concurrency,
            humantime::format_duration(k.lease_timeout)
        ));
    }
    out
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
