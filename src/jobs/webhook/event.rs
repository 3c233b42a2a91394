//! A ProxyCast Connect event as it comes in ([`ConnectEvent`]), the checks it must
//! pass, and what is kept of it: the job's [`Payload`], which is the callback's body
//! plus its `event_id`. The full API key never gets past [`validate`]: only its first
//! 7 characters are kept.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::peers::relays::{self, Registry};
use crate::queue::Millis;

/// How many characters of the key are kept and sent.
pub const KEY_PREFIX_CHARS: usize = 7;
const MAX_REF: usize = 128;
const MAX_EVENT_ID: usize = 128;
const MAX_VERSION: usize = 32;
const MAX_ERROR_CODE: usize = 64;
const MAX_ERROR_MESSAGE: usize = 1024;

/// An event as a client (the HTTP endpoint, or a program embedding the crate) gives
/// it. Every field is optional here so that a missing one is reported by name.
/// `Debug` never shows the key.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConnectEvent {
    pub relay_id: Option<String>,
    /// `success`, `cancelled` or `error`.
    pub status: Option<String>,
    /// The promotion code, if any.
    #[serde(rename = "ref")]
    pub ref_: Option<String>,
    /// The full API key; only its first 7 characters are kept.
    #[serde(default, deserialize_with = "secret")]
    pub key: Option<Secret>,
    /// Or only its prefix (cut to 7 characters too).
    pub key_prefix: Option<String>,
    pub client: Option<ClientInfo>,
    /// Required when `status` is `error`, refused otherwise.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The idempotency key (`webhook-id`); generated when absent.
    pub event_id: Option<String>,
    /// When it happened (RFC 3339 / ISO 8601); default: when it is accepted.
    pub timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientInfo {
    pub version: Option<String>,
    /// `macos`, `windows` or `linux`.
    pub platform: Option<String>,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Secret::new))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Success,
    Cancelled,
    Error,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Success, Status::Cancelled, Status::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Cancelled => "cancelled",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Macos,
    Windows,
    Linux,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub version: String,
    pub platform: Platform,
}

/// What a webhook job carries (JSON, so `queuectl show` prints it): the callback's
/// fields and the event id. Decoding ignores fields it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub event_id: String,
    pub relay_id: String,
    pub status: Status,
    #[serde(rename = "ref")]
    pub ref_: Option<String>,
    pub key_prefix: String,
    /// The event's time, ISO 8601 in UTC, fixed at ingestion: the same on every attempt.
    pub timestamp: String,
    pub client: Client,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// The callback body, fields in the documented order.
#[derive(Serialize)]
struct Body<'a> {
    event: &'static str,
    status: Status,
    relay_id: &'a str,
    #[serde(rename = "ref")]
    ref_: Option<&'a str>,
    key_prefix: &'a str,
    timestamp: &'a str,
    client: &'a Client,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        // Strings and enums always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Payload, crate::jobs::PayloadError> {
        serde_json::from_slice(bytes).map_err(|source| crate::jobs::PayloadError {
            what: "webhook job",
            source,
        })
    }

    /// The exact bytes POSTed to the relay: `event`, `status`, `relay_id`, `ref`
    /// (`null` when absent), `key_prefix`, `timestamp`, `client`, and `error_code` /
    /// `error_message` only on `status=error`.
    pub fn body(&self) -> Vec<u8> {
        let error = self.status == Status::Error;
        let body = Body {
            event: "connect",
            status: self.status,
            relay_id: &self.relay_id,
            ref_: self.ref_.as_deref(),
            key_prefix: &self.key_prefix,
            timestamp: &self.timestamp,
            client: &self.client,
            error_code: if error {
                Some(self.error_code.as_deref().unwrap_or(""))
            } else {
                None
            },
            error_message: if error {
                Some(self.error_message.as_deref().unwrap_or(""))
            } else {
                None
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Why an event was not accepted: an HTTP status, a stable code, the field at fault,
/// and words for people. Never holds the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    #[serde(skip)]
    pub status: u16,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub detail: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for Rejected {}

impl Rejected {
    pub fn field(field: &str, detail: impl Into<String>) -> Rejected {
        Rejected {
            status: 422,
            code: "invalid_field",
            field: Some(field.into()),
            detail: detail.into(),
        }
    }

    fn missing(field: &str) -> Rejected {
        Rejected {
            code: "missing_field",
            ..Rejected::field(field, "is required")
        }
    }

    pub fn malformed(detail: impl Into<String>) -> Rejected {
        Rejected {
            status: 400,
            code: "malformed_json",
            field: None,
            detail: detail.into(),
        }
    }
}

/// Parses a request body: `400` when it is not JSON (or not an object), `422` naming
/// the field when a field has the wrong type. Unknown fields are ignored (and never
/// stored).
pub fn parse_json(body: &[u8]) -> Result<ConnectEvent, Rejected> {
    // The common case, an object that deserialises as it is, without building a
    // `Value` tree first. Anything else (not an object, a field of the wrong type, a
    // field given twice) takes the path below, whose errors name the field; it accepts
    // every body this one does, with the same result.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(event) = serde_json::from_slice::<ConnectEvent>(body)
    {
        return Ok(event);
    }
    parse_value(body)
}

/// [`parse_json`] through a `serde_json::Value`, for errors that name the field.
fn parse_value(body: &[u8]) -> Result<ConnectEvent, Rejected> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Rejected::malformed(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Rejected::malformed("the body must be a JSON object"));
    }
    serde_path_to_error::deserialize::<_, ConnectEvent>(value).map_err(|e| {
        let field = e.path().to_string();
        // serde's message quotes the value it got: never for the key.
        let detail = if field.starts_with("key") {
            "must be a string".to_string()
        } else {
            e.into_inner().to_string()
        };
        Rejected::field(&field, detail)
    })
}

fn text(field: &str, v: Option<String>) -> Result<Option<String>, Rejected> {
    match v {
        Some(s) if s.chars().any(char::is_control) => Err(Rejected::field(
            field,
            "must not contain control characters",
        )),
        Some(s) if s.is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn bounded(field: &str, v: &str, max: usize) -> Result<(), Rejected> {
    if v.chars().count() > max {
        return Err(Rejected::field(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    Ok(())
}

/// Visible ASCII, no spaces: fit for an HTTP header.
fn token(field: &str, v: &str, max: usize) -> Result<(), Rejected> {
    bounded(field, v, max)?;
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Rejected::field(
            field,
            "may hold only visible ASCII characters, no spaces",
        ));
    }
    Ok(())
}

/// Checks an event against SPEC §3 and the registry; `now` is the default timestamp.
pub fn validate(e: ConnectEvent, registry: &Registry, now: Millis) -> Result<Payload, Rejected> {
    let relay_id = text("relay_id", e.relay_id)?.ok_or_else(|| Rejected::missing("relay_id"))?;
    relays::valid_id(&relay_id).map_err(|r| Rejected::field("relay_id", r.to_string()))?;
    if registry.get(&relay_id).is_none() {
        return Err(Rejected {
            code: "unknown_relay",
            ..Rejected::field(
                "relay_id",
                format!(
                    "no relay `{relay_id}` is registered (no valid {}/{relay_id}.json with a webhook section)",
                    registry.dir().display()
                ),
            )
        });
    }
    let status = match text("status", e.status)?.as_deref() {
        None => return Err(Rejected::missing("status")),
        Some("success") => Status::Success,
        Some("cancelled") => Status::Cancelled,
        Some("error") => Status::Error,
        Some(other) => {
            return Err(Rejected::field(
                "status",
                format!(
                    "`{}` is not a status (expected success, cancelled or error)",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    let ref_ = text("ref", e.ref_)?;
    if let Some(r) = &ref_ {
        bounded("ref", r, MAX_REF)?;
    }
    let key_prefix = key_prefix(e.key, e.key_prefix)?;
    let client = e.client.ok_or_else(|| Rejected::missing("client"))?;
    let version = text("client.version", client.version)?
        .ok_or_else(|| Rejected::missing("client.version"))?;
    token("client.version", &version, MAX_VERSION)?;
    let platform = match text("client.platform", client.platform)?.as_deref() {
        None => return Err(Rejected::missing("client.platform")),
        Some("macos") => Platform::Macos,
        Some("windows") => Platform::Windows,
        Some("linux") => Platform::Linux,
        Some(other) => {
            return Err(Rejected::field(
                "client.platform",
                format!(
                    "`{}` is not a platform (expected macos, windows or linux)",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    let error_code = text("error_code", e.error_code)?;
    let error_message = text("error_message", e.error_message)?;
    let (error_code, error_message) = if status == Status::Error {
        let code = error_code.ok_or_else(|| Rejected {
            code: "missing_field",
            ..Rejected::field("error_code", "is required when status is error")
        })?;
        token("error_code", &code, MAX_ERROR_CODE)?;
        if let Some(m) = &error_message {
            bounded("error_message", m, MAX_ERROR_MESSAGE)?;
        }
        (Some(code), Some(error_message.unwrap_or_default()))
    } else {
        if error_code.is_some() {
            return Err(Rejected::field(
                "error_code",
                "is only allowed when status is error",
            ));
        }
        if error_message.is_some() {
            return Err(Rejected::field(
                "error_message",
                "is only allowed when status is error",
            ));
        }
        (None, None)
    };
    let event_id = match text("event_id", e.event_id)? {
        Some(id) => {
            token("event_id", &id, MAX_EVENT_ID)?;
            id
        }
        None => format!("evt_{}", uuid::Uuid::new_v4().simple()),
    };
    let timestamp = match text("timestamp", e.timestamp)? {
        Some(t) => {
            iso8601(parse_timestamp(&t).map_err(|r| Rejected::field("timestamp", r.to_string()))?)
        }
        None => iso8601(now),
    };
    Ok(Payload {
        event_id,
        relay_id,
        status,
        ref_,
        key_prefix,
        timestamp,
        client: Client { version, platform },
        error_code,
        error_message,
    })
}

/// The first 7 characters of the key (or of `key_prefix`). A key of 7 characters or
/// fewer is refused: its "prefix" would be the whole key.
fn key_prefix(key: Option<Secret>, prefix: Option<String>) -> Result<String, Rejected> {
    let prefix = text("key_prefix", prefix)?;
    let from_key = match key {
        Some(k) => {
            let k = k.expose();
            if k.chars().any(char::is_control) {
                return Err(Rejected::field(
                    "key",
                    "must not contain control characters",
                ));
            }
            if k.is_empty() {
                None
            } else if k.chars().count() <= KEY_PREFIX_CHARS {
                return Err(Rejected::field(
                    "key",
                    format!(
                        "is too short to be an API key ({KEY_PREFIX_CHARS} characters or fewer): it would be sent whole; send key_prefix instead"
                    ),
                ));
            } else {
                Some(k.chars().take(KEY_PREFIX_CHARS).collect::<String>())
            }
        }
        None => None,
    };
    let from_prefix = prefix.map(|p| p.chars().take(KEY_PREFIX_CHARS).collect::<String>());
    match (from_key, from_prefix) {
        (Some(k), Some(p)) if k != p => Err(Rejected::field(
            "key_prefix",
            "does not match the first 7 characters of key",
        )),
        (Some(k), _) => Ok(k),
        (None, Some(p)) => Ok(p),
        (None, None) => Err(Rejected {
            code: "missing_field",
            ..Rejected::field("key", "is required (or key_prefix)")
        }),
    }
}

/// ISO 8601 in UTC: seconds, or milliseconds when there are any.
pub fn iso8601(at: Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(at);
    if at.is_multiple_of(1000) {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// RFC 3339 date-time with `Z` or a `±HH:MM` offset. One without an offset is refused:
/// taking it as UTC would shift a client's local time by hours without a word.
pub fn parse_timestamp(s: &str) -> Result<Millis, TimestampError> {
    let bad = || TimestampError::Form(s.to_string());
    let s = s.trim();
    // Split off a numeric offset after the time part.
    let (local, offset_secs) = match s.get(19..).and_then(|rest| rest.rfind(['+', '-'])) {
        Some(i) => {
            let at = 19 + i;
            let (l, off) = s.split_at(at);
            let sign = if off.starts_with('-') { -1i64 } else { 1 };
            let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let h: i64 = digits[..2].parse().map_err(|_| bad())?;
            let m: i64 = digits[2..].parse().map_err(|_| bad())?;
            if h > 23 || m > 59 {
                return Err(bad());
            }
            (l, sign * (h * 3600 + m * 60))
        }
        None if s.ends_with(['Z', 'z']) => (s, 0),
        None => {
            return Err(TimestampError::NoOffset(s.to_string()));
        }
    };
    let t = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TimestampError::Before1970(s.to_string()))?
        .as_millis() as i64;
    let utc = ms - offset_secs * 1000;
    u64::try_from(utc).map_err(|_| TimestampError::Before1970(s.to_string()))
}

/// Why a timestamp is refused; Display is the reason the rejection gives.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error(
        "`{0}` is not an RFC 3339 date-time with an offset (e.g. 2026-01-05T12:00:00Z or 2026-01-05T20:00:00+08:00)"
    )]
    Form(String),
    #[error(
        "`{0}` has no UTC offset: use RFC 3339 with `Z` or `±HH:MM` (e.g. 2026-01-05T12:00:00Z or 2026-01-05T20:00:00+08:00)"
    )]
    NoOffset(String),
    #[error("`{0}` is before 1970")]
    Before1970(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct parse accepts only what the `Value` path accepts, with the same result.
    #[test]
    fn the_direct_parse_agrees_with_the_value_path() {
        let shown = |r: &Result<ConnectEvent, Rejected>| match r {
            Ok(e) => format!(
                "{e:?} key={:?}",
                e.key.as_ref().map(|k| k.expose().to_string())
            ),
            Err(r) => format!("{r:?}"),
        };
        for body in [
            r#"{"relay_id":"r","status":"success","key":"sk-1234567890","client":{"version":"1","platform":"linux"}}"#,
            r#"  {"relay_id":"r","unknown":[1,{"a":2}],"ref":null,"client":null}"#,
            r#"{"relay_id":"r","relay_id":"s"}"#,
            r#"{"relay_id":1}"#,
            r#"{"key":5}"#,
            r#"["r","success"]"#,
            r#"{"relay_id":"r"} x"#,
            r#"{"relay_id":"café "q""}"#,
            "",
            "null",
        ] {
            assert_eq!(
                shown(&parse_json(body.as_bytes())),
                shown(&parse_value(body.as_bytes())),
                "{body}"
            );
        }
    }
    use crate::peers::relays::Provider;

    fn registry() -> Registry {
        Registry::from_providers([Provider {
            id: "myrelay".into(),
            name: None,
            callback_url: url::Url::parse("https://r.example/cb").unwrap(),
            secret: None,
            path: "myrelay.json".into(),
        }])
    }

    fn event(json: &str) -> Result<Payload, Rejected> {
        validate(parse_json(json.as_bytes())?, &registry(), 1_767_614_400_000)
    }

    const OK: &str = r#"{"relay_id":"myrelay","status":"success","ref":"promo2024","key":"sk-abcdef123456","client":{"version":"1.2.0","platform":"macos"},"event_id":"e1"}"#;

    #[test]
    fn the_body_is_exactly_the_documented_fields() {
        let p = event(OK).unwrap();
        assert_eq!(p.key_prefix, "sk-abcd");
        assert_eq!(
            String::from_utf8(p.body()).unwrap(),
            r#"{"event":"connect","status":"success","relay_id":"myrelay","ref":"promo2024","key_prefix":"sk-abcd","timestamp":"2026-01-05T12:00:00Z","client":{"version":"1.2.0","platform":"macos"}}"#
        );
        assert!(!String::from_utf8(p.encode()).unwrap().contains("sk-abcdef"));
        let e = event(r#"{"relay_id":"myrelay","status":"error","key_prefix":"sk-abcdefgh","client":{"version":"1.2.0","platform":"linux"},"error_code":"network_error","timestamp":"2026-01-05T20:00:00+08:00"}"#).unwrap();
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"event":"connect","status":"error","relay_id":"myrelay","ref":null,"key_prefix":"sk-abcd","timestamp":"2026-01-05T12:00:00Z","client":{"version":"1.2.0","platform":"linux"},"error_code":"network_error","error_message":""}"#
        );
        assert!(e.event_id.starts_with("evt_"));
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (r#"{"relay_id":"other"}"#, "relay_id", "unknown_relay"),
            (&OK.replace("success", "done"), "status", "invalid_field"),
            (
                &OK.replace(r#""status":"success","#, ""),
                "status",
                "missing_field",
            ),
            (
                &OK.replace("success", "error"),
                "error_code",
                "missing_field",
            ),
            (
                &OK.replace("macos", "bsd"),
                "client.platform",
                "invalid_field",
            ),
            (
                &OK.replace(r#""1.2.0""#, "12"),
                "client.version",
                "invalid_field",
            ),
            (
                &OK.replace(r#""sk-abcdef123456""#, "12345678"),
                "key",
                "invalid_field",
            ),
            (
                &OK.replace("sk-abcdef123456", "sk-abc"),
                "key",
                "invalid_field",
            ),
            (
                &OK.replace(r#""e1""#, r#""e 1""#),
                "event_id",
                "invalid_field",
            ),
        ];
        for (json, field, code) in cases {
            let r = event(json).unwrap_err();
            assert_eq!(
                (r.field.as_deref(), r.code),
                (Some(field), code),
                "{json}: {r}"
            );
            assert!(!r.detail.contains("12345678"), "{r}");
        }
        let r = event("{not json").unwrap_err();
        assert_eq!((r.status, r.code), (400, "malformed_json"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            parse_timestamp("2026-01-05T12:00:00Z"),
            Ok(1_767_614_400_000)
        );
        assert_eq!(
            parse_timestamp("2026-01-05T12:00:00.250Z"),
            Ok(1_767_614_400_250)
        );
        assert_eq!(
            parse_timestamp("2026-01-05T07:30:00-04:30"),
            Ok(1_767_614_400_000)
        );
        assert!(parse_timestamp("yesterday").is_err());
        let e = parse_timestamp("2026-01-05T12:00:00").unwrap_err();
        assert!(e.to_string().contains("no UTC offset"), "{e}");
        assert_eq!(iso8601(1_767_614_400_250), "2026-01-05T12:00:00.250Z");
    }
}
