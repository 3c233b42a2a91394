//! The outside world the agent talks to. Each peer is a client with typed errors that
//! say what went wrong in words an operator can act on, and never carry a secret.
//!
//! Peers import neither `config` nor `jobs`: each takes its own settings type
//! ([`panel::PanelSettings`], [`relays::WebhookSettings`]), which `config` fills in and
//! re-exports, and owns its vocabulary (the Xray flavour, protocols, ciphers, email
//! shape and counter names in [`xray`]), which `config` and the job kinds import.
//!
//! - [`panel`]: the panel's internal API (allowed users; traffic reports later).
//! - [`hook`]: the operator's `APPLY_CMD`.
//! - [`xray`]: an Xray or V2Ray core's gRPC API, and the names the agent gives things in
//!   a core ([`xray::email`]).
//! - [`kernel`]: the kernel's TCP socket table (sock_diag): find and cut connections.
//! - [`relays`]: relays' provider files and the client their callbacks go out through.

pub(crate) mod hook;
pub(crate) mod kernel;
pub mod panel;
pub mod relays;
pub mod xray;

/// Renders an error with its chain of causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
