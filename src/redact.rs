//! What the agent never shows, in one place every layer may use (it imports nothing of
//! the crate): secrets ([`Secret`]), URLs ([`redact_url`], [`ShownUrl`]) and the values
//! of secret-bearing keys in error messages ([`is_secret_key`], [`without_value`]).
//!
//! URLs as they may be shown: in logs, errors, `check-config`, `queuectl`. Operators put
//! credentials in URLs (`http://admin:pass@panel/`, `?token=…`), so every place that
//! prints a URL prints it through [`redact_url`] or [`ShownUrl`]: the userinfo password
//! becomes `***`, every query value becomes `***` (the names stay, they say what was
//! set), and a fragment becomes `***`. Scheme, user name, host, port and path are kept:
//! they are what an operator needs to recognise the URL.

use std::fmt;

/// What replaces a secret part.
const MASK: &str = "***";

/// `url` with its password, query values and fragment replaced by `***`.
pub fn redact_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Fails only for URLs that cannot have a password (no host): then there was
        // none to hide, but drop the whole userinfo to be sure.
        if shown.set_password(Some(MASK)).is_err() {
            let _ = shown.set_username("");
        }
    }
    if let Some(query) = url.query() {
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}={MASK}"),
                // `?abcdef`: the whole pair may be the secret.
                None if pair.is_empty() => String::new(),
                None => MASK.to_string(),
            })
            .collect();
        shown.set_query(Some(&masked.join("&")));
    }
    if url.fragment().is_some() {
        shown.set_fragment(Some(MASK));
    }
    shown.to_string()
}

/// A URL given as text, displayed through [`redact_url`]. Text that is not a URL is
/// shown as `(not a valid URL)`: where its secrets are cannot be known.
#[derive(Debug, Clone, Copy)]
pub struct ShownUrl<'a>(pub &'a str);

impl fmt::Display for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match url::Url::parse(self.0) {
            Ok(url) => f.write_str(&redact_url(&url)),
            Err(_) => f.write_str("(not a valid URL)"),
        }
    }
}

/// A secret (API key, token): never printed. `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Whether a key (dotted path or variable name) holds a secret, or may (a URL's
/// password or query): its value never appears in an error.
pub fn is_secret_key(key: &str) -> bool {
    let last = key
        .rsplit('.')
        .next()
        .unwrap_or(key)
        .trim_end_matches(|c: char| c == ']' || c.is_ascii_digit() || c == '[')
        .to_ascii_lowercase();
    ["key", "token", "secret", "password", "url"]
        .iter()
        .any(|w| last.contains(w))
}

/// A serde error message fit for a secret-bearing key: `invalid type: integer
/// `12345`, expected a string` becomes `has the wrong type or value (not shown: this
/// key holds a secret); expected a string`. Unknown-field messages name only keys and
/// are kept.
pub fn without_value(message: &str) -> String {
    if message.starts_with("unknown field") || message.starts_with("missing field") {
        return message.to_string();
    }
    let expected = message
        .rfind(", expected ")
        .map(|i| format!("; {}", &message[i + 2..]))
        .unwrap_or_default();
    format!("has the wrong type or value (not shown: this key holds a secret){expected}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(s: &str) -> String {
        ShownUrl(s).to_string()
    }

    #[test]
    fn passwords_query_values_and_fragments_are_masked() {
        assert_eq!(
            shown("http://admin:pass@panel.example/?token=q"),
            "http://admin:***@panel.example/?token=***"
        );
        assert_eq!(
            shown("https://r.example:8443/cb?a=1&b=secret&c#frag"),
            "https://r.example:8443/cb?a=***&b=***&***#***"
        );
        assert_eq!(shown("http://h/p?abcdef"), "http://h/p?***");
        assert_eq!(shown("http://[::1]:3000/panel"), "http://[::1]:3000/panel");
        // A user name alone is not a secret.
        assert_eq!(shown("http://admin@h/"), "http://admin@h/");
        assert_eq!(shown("http://h:3000"), "http://h:3000/");
        assert_eq!(shown("not a url pass"), "(not a valid URL)");
    }

    #[test]
    fn percent_encoded_secrets_are_masked_too() {
        let s = shown("http://u:p%40ss@h/x?k=%73ecret");
        assert!(!s.contains("p%40ss") && !s.contains("ecret"), "{s}");
    }
}
