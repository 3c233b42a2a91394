//! The four kinds of job the product runs. The set is closed: each kind has a one-byte
//! code that is part of the on-disk key layout (see `queue-schema/`), so codes are never
//! reused or renumbered.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Fetch one node's allowed-UUID list from the panel.
    NodeSync,
    /// Make one node's Xray/V2Ray inbound users equal the synced list.
    XrayApply,
    /// Deliver one batch of per-user traffic deltas to the panel.
    TrafficReport,
    /// Deliver one ProxyCast Connect callback to a relay.
    Webhook,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::NodeSync,
        JobKind::XrayApply,
        JobKind::TrafficReport,
        JobKind::Webhook,
    ];

    /// The on-disk code. Stable forever.
    pub fn code(self) -> u8 {
        match self {
            JobKind::NodeSync => 1,
            JobKind::XrayApply => 2,
            JobKind::TrafficReport => 3,
            JobKind::Webhook => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name used in config (`[queue.kinds.NAME]`), logs and `queuectl`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::NodeSync => "node_sync",
            JobKind::XrayApply => "xray_apply",
            JobKind::TrafficReport => "traffic_report",
            JobKind::Webhook => "webhook",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown job kind `{s}` (expected node_sync, xray_apply, traffic_report or webhook)")
            })
    }
}
