//! Bans that did not bite. Removing a user refuses new connections, but the core's API
//! does not cut established ones (nor a client's mux session). So for a while after each
//! removal the agent watches the removed user, and an operator is told when a ban has
//! not bitten (a warning, `queuectl bans`, the gauge `connector_bans_not_biting`).
//!
//! Each check judges each ban by the best source of truth the core offers:
//! - **online** (Xray with `statsUserOnline` in the policy of the user's level): the
//!   core's own list of the user's open connections (`peers::xray::online`). The ban
//!   has not bitten while the user is *still online*, and bites once their last
//!   connection ends. The core never lists a client on a loopback address (a reverse
//!   proxy on the same host): a user it tracks but lists nowhere while their counters
//!   grew is judged by the counters for that check.
//! - **counters** (V2Ray, an older Xray, `statsUserOnline` off, a user the core never
//!   tracked): the user's traffic counters grew since the removal — which stays true
//!   for the rest of the watch.
//!
//! With `xray.cut_connections`, each ban also records what cutting the user's open
//! connections did ([`Cut`]): how many were cut and when, or why none was (no access
//! log line tied a connection to the user, cuts unavailable…).
//!
//! State `node/{id}/bans`: the kinds' state codec (`jobs::state`) of email → [`Ban`],
//! layout version [`LAYOUT`]; the version 1 layout (without the online fields and the
//! cut) and the JSON before it still read. Entries older than [`WATCH_FOR`] are dropped; a user the
//! panel allows again leaves the list.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::jobs::state::{self as codec, StateError};
use crate::peers::xray::online::Support;
use crate::peers::xray::{XrayClient, XrayError};
use crate::queue::{Millis, Queue, StateWrite, rfc3339};

/// The record's name under `node/{id}/`.
const RECORD: &str = "bans";

/// The record's layout: 2 added [`Ban::source`], [`Ban::online_ips`] and [`Ban::cut`].
pub const LAYOUT: u8 = 2;

/// How long a removed user is watched.
pub const WATCH_FOR: Duration = Duration::from_secs(15 * 60);

/// Online-list calls in flight at once, for users the core's list of everyone online
/// does not settle.
const ASK_AT_ONCE: usize = 8;

/// What a check judged a ban by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The user's traffic counters since the removal.
    #[default]
    Counters,
    /// The core's list of the user's open connections.
    Online,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Counters => "counters",
            Source::Online => "online",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub removed_at: Millis,
    /// uplink + downlink when the user was removed (0 when the core had no counter).
    pub bytes_at_removal: u64,
    /// Bytes counted since the removal, as of the last check.
    pub bytes_since: u64,
    /// The last check that wrote the record (one that finds nothing new does not).
    pub last_checked: Millis,
    /// What the last check judged the ban by.
    #[serde(default)]
    pub source: Source,
    /// With [`Source::Online`]: the addresses the core listed the user online from at
    /// the last check (none: not online).
    #[serde(default)]
    pub online_ips: Vec<String>,
    /// What cutting the user's open connections did; `None` with cutting off (or for a
    /// ban recorded before cuts existed).
    #[serde(default)]
    pub cut: Option<Cut>,
}

/// What cutting a removed user's established connections did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// When the cut ran (right after the removal succeeded on the core).
    pub at: Millis,
    /// Established TCP connections destroyed.
    pub connections: u32,
    /// Why nothing (or not everything) was cut; empty when all went well.
    pub note: String,
}

impl Ban {
    pub fn biting(&self) -> bool {
        match self.source {
            Source::Counters => self.bytes_since == 0,
            Source::Online => self.online_ips.is_empty(),
        }
    }
}

/// The layout-1 record (and the JSON before it).
#[derive(Deserialize)]
struct BanV1 {
    removed_at: Millis,
    bytes_at_removal: u64,
    bytes_since: u64,
    last_checked: Millis,
}

impl From<BanV1> for Ban {
    fn from(b: BanV1) -> Ban {
        Ban {
            removed_at: b.removed_at,
            bytes_at_removal: b.bytes_at_removal,
            bytes_since: b.bytes_since,
            last_checked: b.last_checked,
            source: Source::Counters,
            online_ips: Vec::new(),
            cut: None,
        }
    }
}

pub type Bans = BTreeMap<String, Ban>;

pub fn key(node_id: u64) -> String {
    codec::node_key(node_id, RECORD)
}

/// Reads a bans record in any of its layouts.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Bans, StateError> {
    codec::decode_upgrading(key, bytes, LAYOUT, |old: BTreeMap<String, BanV1>| {
        old.into_iter().map(|(e, b)| (e, b.into())).collect()
    })
}

/// The node's watched bans; none when it has no record.
pub fn load(queue: &Queue, node_id: u64) -> Result<Bans, StateError> {
    let key = key(node_id);
    match queue.state(&key) {
        Ok(Some(bytes)) => decode(&key, &bytes),
        Ok(None) => Ok(Bans::new()),
        Err(source) => Err(StateError::Read { key, source }),
    }
}

/// Every node's watched bans, by node.
pub fn all(queue: &Queue) -> Result<Vec<(u64, Bans)>, StateError> {
    let scan = queue
        .state_scan(codec::NODE_PREFIX)
        .map_err(|source| StateError::Read {
            key: codec::NODE_PREFIX.to_string(),
            source,
        })?;
    let mut out = Vec::new();
    for (name, bytes) in scan {
        if let Some(node_id) = codec::node_of(&name, RECORD) {
            out.push((node_id, decode(&name, &bytes)?));
        }
    }
    Ok(out)
}

pub fn put(node_id: u64, bans: &Bans) -> StateWrite {
    codec::put_as(key(node_id), LAYOUT, bans)
}

/// uplink + downlink per user email, from `user>>>{email}>>>traffic>>>…` counters.
pub fn user_bytes(counters: &[(String, i64)]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, value) in counters {
        if let Some((email, _)) = crate::peers::xray::email::parse_counter(name) {
            *out.entry(email.to_lowercase()).or_default() += u64::try_from(*value).unwrap_or(0);
        }
    }
    out
}

/// What the core's online API says of watched users: email (lower case) → the
/// addresses it lists them online from (none: tracked, not online). A user absent from
/// it is one the core cannot tell about: their ban is judged by the counters.
pub type Online = BTreeMap<String, Vec<String>>;

/// Asks the core who of `watched` (email, source of its last check) is online. One call
/// lists everyone online (`GetUsersStats`); a user it does not list is asked about on
/// their own (`GetStatsOnlineIpList`) until the core is known to track them. A core
/// without either method answers nothing, at the cost of no call once known.
pub async fn online(core: &XrayClient, watched: &[(String, Source)]) -> Result<Online, XrayError> {
    let mut out = Online::new();
    let mut ask = Vec::new();
    match core.online_users().await? {
        Support::Answered(users) => {
            let users: Online = users
                .into_iter()
                .map(|(e, ips)| (e.to_lowercase(), ips))
                .collect();
            for (email, source) in watched {
                match users.get(email) {
                    Some(ips) if !ips.is_empty() => {
                        out.insert(email.clone(), ips.clone());
                    }
                    // Tracked at an earlier check: not listed now is not online.
                    _ if *source == Source::Online => {
                        out.insert(email.clone(), Vec::new());
                    }
                    _ => ask.push((email.clone(), *source)),
                }
            }
        }
        Support::Unsupported => ask.extend(watched.iter().cloned()),
    }
    // Owned, so the stream's futures are `Send` for any lifetime (the watcher is spawned).
    let answers: Vec<_> = futures_util::stream::iter(ask)
        .map(|(email, source)| {
            let core = core.clone();
            async move {
                let got = core.online_ips(&email).await;
                (email, source, got)
            }
        })
        .buffer_unordered(ASK_AT_ONCE)
        .collect()
        .await;
    for (email, source, got) in answers {
        match got? {
            Support::Answered(Some(ips)) => {
                out.insert(email, ips);
            }
            // Tracked before, unknown now: the core restarted, and the removed user
            // has not connected since (they cannot).
            Support::Answered(None) if source == Source::Online => {
                out.insert(email, Vec::new());
            }
            Support::Answered(None) | Support::Unsupported => {}
        }
    }
    Ok(out)
}

/// What one check of a node's bans found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Bans found not biting that were biting at the last check (to report).
    pub newly: Vec<(String, Ban)>,
    /// Bans found biting that were not at the last check: the user went offline.
    pub bit: Vec<(String, Ban)>,
    /// Whether the record changed beyond `last_checked` (worth writing): traffic grew,
    /// the online addresses or the source changed, or a ban's watch ended.
    pub changed: bool,
}

/// Updates the watched bans of one node with fresh counters and what the online API
/// said (empty where the core cannot tell).
pub fn check(
    bans: &mut Bans,
    bytes: &BTreeMap<String, u64>,
    online: &Online,
    now: Millis,
) -> Checked {
    let horizon = now.saturating_sub(WATCH_FOR.as_millis() as u64);
    let before = bans.len();
    bans.retain(|_, b| b.removed_at >= horizon);
    let mut out = Checked {
        changed: bans.len() != before,
        ..Checked::default()
    };
    for (email, ban) in bans.iter_mut() {
        let was = ban.clone();
        let current = bytes.get(email).copied().unwrap_or(ban.bytes_at_removal);
        let since = current.saturating_sub(ban.bytes_at_removal);
        let grew = since > ban.bytes_since;
        if grew {
            ban.bytes_since = since;
        }
        (ban.source, ban.online_ips) = match online.get(email) {
            Some(ips) if !ips.is_empty() => (Source::Online, ips.clone()),
            // Tracked, listed nowhere, yet traffic flowed: a client the core does not
            // list (one on loopback).
            Some(_) if grew => (Source::Counters, Vec::new()),
            Some(_) => (Source::Online, Vec::new()),
            None => (Source::Counters, Vec::new()),
        };
        if was.biting() && !ban.biting() {
            out.newly.push((email.clone(), ban.clone()));
        } else if !was.biting() && ban.biting() {
            out.bit.push((email.clone(), ban.clone()));
        }
        out.changed |= Ban {
            last_checked: was.last_checked,
            ..ban.clone()
        } != was;
        ban.last_checked = now;
    }
    out
}

/// One warning line for a ban that has not bitten.
pub fn warn(node_id: u64, email: &str, ban: &Ban) {
    match ban.source {
        Source::Online => tracing::warn!(
            node = node_id,
            user = email,
            removed_at = %rfc3339(ban.removed_at),
            source = ban.source.as_str(),
            online_ips = ?ban.online_ips,
            ips = ban.online_ips.len(),
            bytes_since = ban.bytes_since,
            "a removed user is still online: the core refuses their new connections but does not cut established ones (or a client's mux session); see `queuectl bans`"
        ),
        Source::Counters => tracing::warn!(
            node = node_id,
            user = email,
            removed_at = %rfc3339(ban.removed_at),
            source = ban.source.as_str(),
            bytes_since = ban.bytes_since,
            "a removed user still has traffic: the core refuses their new connections but does not cut established ones (or a client's mux session); see `queuectl bans`"
        ),
    }
}

/// One line for a ban that bites now: the core lists the user online no more.
pub fn bit(node_id: u64, email: &str, ban: &Ban) {
    tracing::info!(
        node = node_id,
        user = email,
        removed_at = %rfc3339(ban.removed_at),
        source = ban.source.as_str(),
        "a removed user is no longer online: the ban bites"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(b: &Ban) -> (u64, u64, u64, u64) {
        (
            b.removed_at,
            b.bytes_at_removal,
            b.bytes_since,
            b.last_checked,
        )
    }

    #[test]
    fn the_json_form_written_before_the_codec_still_reads() {
        let json =
            br#"{"a@x":{"removed_at":1,"bytes_at_removal":2,"bytes_since":3,"last_checked":4}}"#;
        let bans = decode("node/1/bans", json).unwrap();
        let ban = &bans["a@x"];
        assert_eq!(fields(ban), (1, 2, 3, 4));
        assert_eq!(ban.source, Source::Counters);
        assert!(ban.online_ips.is_empty());
        let StateWrite::Put(name, bytes) = put(1, &bans) else {
            panic!("a put");
        };
        assert_eq!(name, "node/1/bans");
        assert_eq!(bytes[0], LAYOUT);
        assert_eq!(decode(&name, &bytes).unwrap(), bans);
    }

    /// A record written by the build before the online fields (codec version 1, the
    /// bytes of its four-field `Ban`) reads, judged by the counters as it was.
    #[test]
    fn a_layout_one_record_still_reads() {
        #[derive(Serialize)]
        struct Old {
            removed_at: Millis,
            bytes_at_removal: u64,
            bytes_since: u64,
            last_checked: Millis,
        }
        let mut old = BTreeMap::new();
        for (email, n) in [("a@x", 10), ("b@x", 0)] {
            old.insert(
                email.to_string(),
                Old {
                    removed_at: 1,
                    bytes_at_removal: 2,
                    bytes_since: n,
                    last_checked: 4,
                },
            );
        }
        let bytes = codec::encode(&old);
        assert_eq!(bytes[0], 1, "what the build before wrote");
        let bans = decode("node/1/bans", &bytes).unwrap();
        assert_eq!(bans.len(), 2);
        assert_eq!(fields(&bans["a@x"]), (1, 2, 10, 4));
        assert_eq!(fields(&bans["b@x"]), (1, 2, 0, 4));
        assert!(!bans["a@x"].biting() && bans["b@x"].biting());
        assert!(bans.values().all(|b| b.source == Source::Counters));
        let e = decode("node/1/bans", &[LAYOUT + 1, 0]).unwrap_err();
        assert!(e.to_string().contains("node/1/bans"), "{e}");
    }

    #[test]
    fn counters_and_checks() {
        let c = vec![
            ("user>>>a@x>>>traffic>>>uplink".to_string(), 10),
            ("user>>>a@x>>>traffic>>>downlink".to_string(), 5),
            ("inbound>>>api>>>traffic>>>uplink".to_string(), 99),
        ];
        let none = Online::new();
        let bytes = user_bytes(&c);
        assert_eq!(bytes.get("a@x"), Some(&15));
        let mut bans = Bans::new();
        bans.insert(
            "a@x".into(),
            Ban {
                removed_at: 1_000,
                bytes_at_removal: 15,
                ..Ban::default()
            },
        );
        let quiet = check(&mut bans, &bytes, &none, 2_000);
        assert!(quiet.newly.is_empty() && !quiet.changed);
        let mut more = bytes.clone();
        more.insert("a@x".into(), 40);
        let grew = check(&mut bans, &more, &none, 3_000);
        assert_eq!(grew.newly.len(), 1);
        assert_eq!(grew.newly[0].1.bytes_since, 25);
        assert_eq!(grew.newly[0].1.source, Source::Counters);
        assert!(grew.changed);
        let again = check(&mut bans, &more, &none, 4_000);
        assert!(again.newly.is_empty(), "reported once");
        assert!(!again.changed, "nothing new to write");
        assert!(
            !bans["a@x"].biting(),
            "counters: not biting for the rest of the watch"
        );
        more.insert("a@x".into(), 50);
        let more_traffic = check(&mut bans, &more, &none, 5_000);
        assert!(more_traffic.newly.is_empty() && more_traffic.changed);
        let late = 1_000 + WATCH_FOR.as_millis() as u64 + 1;
        assert!(check(&mut bans, &more, &none, late + 1_000).changed);
        assert!(bans.is_empty(), "dropped after the watch");
    }

    #[test]
    fn online_judges_by_who_is_online_now() {
        let mut bans = Bans::new();
        bans.insert(
            "a@x".into(),
            Ban {
                removed_at: 1_000,
                bytes_at_removal: 15,
                ..Ban::default()
            },
        );
        let mut bytes = BTreeMap::from([("a@x".to_string(), 20)]);
        let online = Online::from([("a@x".to_string(), vec!["10.0.0.2".to_string()])]);
        let on = check(&mut bans, &bytes, &online, 2_000);
        assert_eq!(on.newly.len(), 1, "still online: reported");
        let ban = &bans["a@x"];
        assert_eq!((ban.source, ban.online_ips.len()), (Source::Online, 1));
        assert!(!ban.biting());
        // Listed nowhere, but traffic flowed since the last check: a client the core
        // does not list (loopback). Judged by the counters.
        bytes.insert("a@x".into(), 30);
        let tracked_off = Online::from([("a@x".to_string(), Vec::new())]);
        let lo = check(&mut bans, &bytes, &tracked_off, 3_000);
        assert!(lo.newly.is_empty() && lo.bit.is_empty() && lo.changed);
        assert_eq!(bans["a@x"].source, Source::Counters);
        assert!(!bans["a@x"].biting());
        // Listed nowhere and nothing flowed: offline, the ban bites (though the
        // counters grew after the removal).
        let off = check(&mut bans, &bytes, &tracked_off, 4_000);
        assert_eq!(off.bit.len(), 1, "went offline: said");
        assert!(off.changed);
        assert_eq!(bans["a@x"].source, Source::Online);
        assert!(bans["a@x"].biting());
        assert!(bans["a@x"].bytes_since > 0);
        let still = check(&mut bans, &bytes, &tracked_off, 5_000);
        assert!(!still.changed && still.bit.is_empty() && still.newly.is_empty());
        // Back online (a mux session's next stream): reported again.
        let back = check(&mut bans, &bytes, &online, 6_000);
        assert_eq!(back.newly.len(), 1);
        // The core cannot tell any more: the counters, as before.
        check(&mut bans, &bytes, &Online::new(), 7_000);
        assert_eq!(bans["a@x"].source, Source::Counters);
        assert!(!bans["a@x"].biting());
    }
}
