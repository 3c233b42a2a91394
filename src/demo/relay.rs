//! The demo's relay: the HTTPS relay simulator the tests use (`crate::sim::relay`),
//! taking ProxyCast Connect callbacks at `/proxycast/callback`, with a certificate for
//! `localhost` signed by a CA made at start. The CA is written to a file the agent
//! trusts through `webhook.ca_file`, as an operator would for a relay behind a private
//! CA.
//!
//! It answers the planned statuses in order (the demo plans `500, 500`), then `200`;
//! this module reads what it recorded as the demo tells it: when each attempt came,
//! what it answered, whether the `webhook-signature` checks out with the relay's
//! secret, and the body.

use std::time::Instant;

use crate::peers::relays::SigningKey;
use crate::sim::relay::{Answer, Receiver, Recorded};

/// One callback as the relay got it.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub at: Instant,
    pub status: u16,
    pub webhook_id: String,
    /// The Standard Webhooks signature matched the relay's secret.
    pub signed: bool,
    pub user_agent: String,
    pub body: String,
}

pub(crate) struct Relay {
    receiver: Receiver,
    key: SigningKey,
    /// The CA that signed the relay's certificate (PEM).
    pub ca_pem: String,
}

impl Relay {
    /// Serves HTTPS until dropped; checks signatures with `secret` (`whsec_…`).
    pub(crate) fn start(secret: &str) -> anyhow::Result<Relay> {
        let key = SigningKey::parse(secret).map_err(anyhow::Error::msg)?;
        let receiver = Receiver::try_start("connector demo CA")?;
        Ok(Relay {
            ca_pem: receiver.ca_pem.clone(),
            receiver,
            key,
        })
    }

    /// `https://localhost:{port}/proxycast/callback`.
    pub(crate) fn callback_url(&self) -> String {
        self.receiver.url("/proxycast/callback")
    }

    /// The next callbacks are answered with these statuses, then `200` again.
    pub(crate) fn plan(&self, statuses: &[u16]) {
        self.receiver
            .plan(statuses.iter().map(|s| Answer::Status(*s)));
    }

    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        self.receiver
            .requests()
            .iter()
            .map(|r| self.attempt(r))
            .collect()
    }

    fn attempt(&self, r: &Recorded) -> Attempt {
        let text = |name: &str| r.header(name).unwrap_or("").to_string();
        let (id, timestamp) = (text("webhook-id"), text("webhook-timestamp"));
        let signed = timestamp.parse::<u64>().is_ok_and(|ts| {
            let expected = crate::jobs::webhook::sign::signature(&self.key, &id, ts, &r.body);
            text("webhook-signature").split(' ').any(|s| s == expected)
        });
        let status = match r.answer {
            Answer::Status(s) | Answer::RetryAfter(s, _) | Answer::Redirect(s, _) => s,
            Answer::Hold => 200,
        };
        Attempt {
            at: r.at,
            status,
            webhook_id: id,
            signed,
            user_agent: text("user-agent"),
            body: r.body_text(),
        }
    }
}
