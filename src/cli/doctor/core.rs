//! The core: its API reachable and of the configured flavour, HandlerService and
//! StatsService answering, each node's inbound present with the configured protocol,
//! per-user traffic counters where users have traffic, and — when cuts are on — the
//! access log and `CAP_NET_ADMIN`.
//!
//! Reads: the core's API (`RemoveUser` of [`PROBE_EMAIL`] on [`PROBE_TAG`], which no
//! inbound has: it changes nothing and tells a HandlerService that answers from one
//! that is not there; `ListInbounds`, `GetInboundUsers`, `GetSysStats`, `QueryStats`
//! without reset), the synced user files (`{output_dir}/node-{id}/allowed-uuids.txt`,
//! for V2Ray, which cannot list its users), the end of `xray.access_log`,
//! `/proc/self/status`.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tonic::Code;

use super::Check;
use crate::config::{ApplyMode, Config, Flavor, Node, Xray};
use crate::jobs::node_sync::files::NodeFiles;
use crate::jobs::xray_apply::grpc::inbound_kind;
use crate::peers::xray::account::protocol_of;
use crate::peers::xray::email::{email_for, is_templated, parse_counter};
use crate::peers::xray::{SysStats, XrayClient, XrayError};

/// An inbound tag no one uses: the HandlerService probe's target.
const PROBE_TAG: &str = "connector-doctor-probe";
const PROBE_EMAIL: &str = "probe@connector-doctor.invalid";
/// How much of the access log's end is read for connection lines.
const LOG_TAIL: u64 = 256 * 1024;
/// `CAP_NET_ADMIN`'s bit in the capability sets (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

fn flavor_name(f: Flavor) -> &'static str {
    match f {
        Flavor::Xray => "xray",
        Flavor::V2ray => "v2ray",
    }
}

fn other(f: Flavor) -> Flavor {
    match f {
        Flavor::Xray => Flavor::V2ray,
        Flavor::V2ray => Flavor::Xray,
    }
}

/// How a service answered a probe.
enum Probe<T> {
    Answers(T),
    /// `Unimplemented`: the core has no such service under this flavour's package.
    Missing,
    Failed(XrayError),
}

impl<T> Probe<T> {
    fn answers(&self) -> bool {
        matches!(self, Probe::Answers(_))
    }
}

/// HandlerService: any answer but `Unimplemented` (the probe's "handler not found"
/// included) means it is there.
async fn handler(c: &XrayClient) -> Probe<()> {
    match c.remove_user(PROBE_TAG, PROBE_EMAIL).await {
        Ok(_) => Probe::Answers(()),
        Err(XrayError::Refused {
            code: Code::Unimplemented,
            ..
        }) => Probe::Missing,
        Err(XrayError::Refused { .. }) => Probe::Answers(()),
        Err(e) => Probe::Failed(e),
    }
}

async fn stats(c: &XrayClient) -> Probe<SysStats> {
    match c.sys_stats().await {
        Ok(s) => Probe::Answers(s),
        Err(XrayError::Refused {
            code: Code::Unimplemented,
            ..
        }) => Probe::Missing,
        Err(e) => Probe::Failed(e),
    }
}

pub(super) async fn checks(cfg: &Config) -> Vec<Check> {
    let Some(x) = &cfg.xray else {
        return vec![Check::ok(
            "core",
            format!(
                "not used (apply.mode = {}, no [xray] section)",
                cfg.apply.mode.as_str()
            ),
        )];
    };
    let mut out = Vec::new();
    let sys = api(cfg, x, &mut out).await;
    // What cuts need is checked whatever the API said: a missing log is its own fault.
    // When the running core started, at the earliest: what the access log's last write
    // is compared with. The uptime is in whole seconds (truncated), and the call took a
    // moment: two seconds of slack keep a log written in the core's first second "since".
    let boot = sys
        .and_then(|s| SystemTime::now().checked_sub(Duration::from_secs(u64::from(s.uptime) + 2)));
    if let Some(path) = &x.access_log {
        out.push(access_log(path, x.cut_connections, boot));
    }
    if x.cut_connections {
        out.push(net_admin());
    }
    out
}

/// The API, its services, each node's inbound and counters, onto `out`; the core's
/// `GetSysStats` when StatsService answered.
async fn api(cfg: &Config, x: &Xray, out: &mut Vec<Check>) -> Option<SysStats> {
    let grpc = cfg.apply.mode == ApplyMode::XrayGrpc;
    let client = match XrayClient::new(&x.api, x.flavor, x.timeout) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::fail(
                "core API",
                e.to_string(),
                "set xray.api (XRAY_API_ADDR) to host:port",
            ));
            return None;
        }
    };
    let name = flavor_name(x.flavor);
    let (h, s) = (handler(&client).await, stats(&client).await);
    let (h, s) = match (h, s) {
        (Probe::Failed(e), _) | (_, Probe::Failed(e)) if e.is_unreachable() => {
            out.push(Check::fail(
                "core API",
                e.to_string(),
                format!(
                    "start the core, or set xray.api (XRAY_API_ADDR) to its API address; its config needs \"api\": {{\"tag\": \"api\", \"services\": [\"HandlerService\", \"StatsService\"]}}, a dokodemo-door inbound on {} and a routing rule sending that inbound to the api tag",
                    x.api
                ),
            ));
            return None;
        }
        (Probe::Missing, Probe::Missing) => {
            // A core of the other flavour answers every call of ours Unimplemented: its
            // services live under another package (`xray.*` vs `v2ray.core.*`).
            let o = other(x.flavor);
            let theirs = XrayClient::new(&x.api, o, x.timeout).ok();
            let other_answers = match &theirs {
                Some(t) => handler(t).await.answers() || stats(t).await.answers(),
                None => false,
            };
            if other_answers {
                out.push(Check::fail(
                    "core flavor",
                    format!(
                        "the core at {} answers the {} API, not {name}: every call of xray.flavor = \"{name}\" answers Unimplemented",
                        x.api,
                        flavor_name(o)
                    ),
                    format!("set xray.flavor = \"{}\" (XRAY_FLAVOR)", flavor_name(o)),
                ));
            } else {
                out.push(Check::fail(
                    "core API",
                    format!(
                        "{} answers gRPC, but neither HandlerService nor StatsService (as xray or v2ray)",
                        x.api
                    ),
                    "list \"HandlerService\" and \"StatsService\" in the core's api.services, or point xray.api (XRAY_API_ADDR) at the core's API inbound",
                ));
            }
            return None;
        }
        hs => hs,
    };
    // The other way round, Xray answers V2Ray's package names too (measured: Xray 26
    // serves `v2ray.core.*` paths), so a core configured as v2ray that is Xray shows
    // itself otherwise: it lists its inbounds (V2Ray cannot), with `xray.*` types.
    if x.flavor == Flavor::V2ray
        && h.answers()
        && let Ok(Some(types)) = client.inbound_types().await
        && types.values().any(|t| t.starts_with("xray."))
    {
        out.push(Check::fail(
            "core flavor",
            format!(
                "the core at {} is Xray (it lists its inbounds, of xray.* types, which V2Ray cannot), but xray.flavor is \"v2ray\": users would be sent as v2ray.core.* accounts",
                x.api
            ),
            "set xray.flavor = \"xray\" (XRAY_FLAVOR)",
        ));
        return None;
    }
    out.push(Check::ok(
        "core API",
        format!("{} answers as {name}", x.api),
    ));
    match &h {
        Probe::Answers(()) => out.push(Check::ok("core HandlerService", "answers")),
        Probe::Missing if grpc => out.push(Check::fail(
            "core HandlerService",
            "not enabled: users cannot be added or removed (apply.mode = xray-grpc)",
            "add \"HandlerService\" to the core's api.services and restart it",
        )),
        Probe::Missing => out.push(Check::warn(
            "core HandlerService",
            "not enabled (not needed: apply.mode is not xray-grpc)",
            "nothing, unless apply.mode becomes xray-grpc",
        )),
        Probe::Failed(e) => out.push(Check::fail(
            "core HandlerService",
            e.to_string(),
            "see the core's log",
        )),
    }
    let sys = match s {
        Probe::Answers(sys) => {
            out.push(Check::ok(
                "core StatsService",
                format!(
                    "answers (the core has been up {})",
                    humantime::format_duration(Duration::from_secs(u64::from(sys.uptime)))
                ),
            ));
            Some(sys)
        }
        Probe::Missing => {
            out.push(Check::fail(
                "core StatsService",
                "not enabled: no traffic counters, no restart detection",
                "add \"StatsService\" to the core's api.services and \"stats\": {} to its config, then restart it",
            ));
            None
        }
        Probe::Failed(e) => {
            out.push(Check::fail(
                "core StatsService",
                e.to_string(),
                "check the core's \"stats\": {} section and its log",
            ));
            None
        }
    };
    for node in &cfg.nodes {
        if h.answers() {
            out.push(inbound(&client, node).await);
        }
        if sys.is_some() {
            out.push(counters(cfg, x, &client, node).await);
        }
    }
    sys
}

/// The node's inbound exists with the configured protocol (Xray's `ListInbounds`).
/// V2Ray cannot list its inbounds: the configured protocol is then all there is, and
/// a wrong one crashes the core at the first add (XRAY-FACTS), so it says so.
async fn inbound(client: &XrayClient, node: &Node) -> Check {
    let name = format!("node {} inbound", node.id);
    let tag = &node.inbound_tag;
    let kind = inbound_kind(node);
    match client.inbound_types().await {
        Ok(Some(types)) => match types.get(tag) {
            None => {
                let tags: Vec<&str> = types.keys().map(String::as_str).collect();
                Check::fail(
                    name,
                    format!(
                        "the core has no inbound tagged `{tag}` (it has: {})",
                        tags.join(", ")
                    ),
                    "set the node's inbound_tag (XRAY_INBOUND_TAG) to the tag in the core's config, or add that inbound to the core",
                )
            }
            Some(actual) if *actual != kind.inbound_type(client.flavor()) => Check::fail(
                name,
                format!(
                    "`{tag}` is a {} inbound ({actual}), but the node is configured for {}: adding such accounts to it would crash the core, so the apply refuses",
                    protocol_of(actual),
                    kind.describe()
                ),
                format!(
                    "set the node's protocol (XRAY_PROTOCOL) to the inbound's ({}), or inbound_tag to the {} inbound",
                    protocol_of(actual),
                    kind.describe()
                ),
            ),
            Some(_) => Check::ok(name, format!("`{tag}` is a {} inbound", kind.describe())),
        },
        // V2Ray: the tag can still be asked for, one at a time; the protocol cannot.
        Ok(None) => match client.inbound_exists(tag).await {
            Ok(false) => Check::fail(
                name,
                format!(
                    "the core has no inbound tagged `{tag}` (it answers \"handler not found\")"
                ),
                "set the node's inbound_tag (XRAY_INBOUND_TAG) to the tag in the core's config, or add that inbound to the core",
            ),
            found => Check::warn(
                name,
                format!(
                    "{}, but its protocol is unchecked: V2Ray cannot list its inbounds, so {} is taken on trust, and an account of another protocol crashes the core at the first add",
                    if found.is_ok() {
                        format!("`{tag}` exists")
                    } else {
                        format!("`{tag}` is unchecked")
                    },
                    kind.describe()
                ),
                format!(
                    "check by hand that the core's inbound `{tag}` is {}",
                    kind.describe()
                ),
            ),
        },
        Err(e) => Check::fail(name, e.to_string(), "see the core's log"),
    }
}

/// The emails of the users applied to `node`: Xray lists the inbound's users (those
/// the agent manages, by their email's shape); V2Ray cannot, so the last synced list
/// (the output file the apply works from) stands in. `None`: cannot be told.
async fn applied(
    cfg: &Config,
    x: &Xray,
    client: &XrayClient,
    node: &Node,
) -> Option<BTreeSet<String>> {
    if let Ok(Some(emails)) = client.inbound_emails(&node.inbound_tag).await {
        return Some(
            emails
                .into_iter()
                .filter(|e| is_templated(&x.email_template, node.id, e))
                .map(|e| e.to_ascii_lowercase())
                .collect(),
        );
    }
    let txt = std::fs::read_to_string(NodeFiles::new(&cfg.sync.output_dir, node.id).txt).ok()?;
    Some(
        txt.lines()
            .filter_map(|l| uuid::Uuid::parse_str(l.trim()).ok())
            .map(|u| email_for(&x.email_template, node.id, u).to_ascii_lowercase())
            .collect(),
    )
}

/// Per-user counters exist for applied users that have traffic.
///
/// The core creates `user>>>{email}>>>traffic>>>…` at a user's first connection, and
/// only when `policy.levels.0.statsUserUplink/Downlink` is on: with it off there are no
/// user counters at all, and with it on but nobody connected yet there are none
/// either. The two look the same in the counters, so the check looks for traffic
/// somewhere else: the inbound's own counters (`inbound>>>{tag}>>>traffic>>>…`, when
/// `policy.system.statsInboundUplink/Downlink` is on) having counted bytes, or the
/// access log (when `xray.access_log` is set) showing connections of applied users.
/// Traffic seen there with no user counter anywhere is the policy being off (`✗`);
/// no evidence either way is said as such (`!`). Any user counter at all — even of
/// users of other nodes — shows the policy is on.
async fn counters(cfg: &Config, x: &Xray, client: &XrayClient, node: &Node) -> Check {
    let name = format!("node {} traffic counters", node.id);
    let off = "policy.levels.0.statsUserUplink/statsUserDownlink is off in the core's config (or the users are not at level 0)";
    let fix_off = "set \"policy\": {\"levels\": {\"0\": {\"statsUserUplink\": true, \"statsUserDownlink\": true}}} (and \"stats\": {}) in the core's config and restart it; until then traffic reports stay empty";
    let Some(users) = applied(cfg, x, client, node).await else {
        return Check::warn(
            name,
            "unchecked: the core cannot list the node's users and no synced list is on disk yet",
            "run doctor again after the first sync",
        );
    };
    if users.is_empty() {
        return Check::ok(name, "no user is applied yet: nothing to count");
    }
    let all = match client.query_stats("user>>>", false).await {
        Ok(c) => c,
        Err(e) => return Check::fail(name, e.to_string(), "see the core's log"),
    };
    let with_counter: BTreeSet<String> = all
        .iter()
        .filter_map(|(n, _)| parse_counter(n))
        .map(|(e, _)| e.to_ascii_lowercase())
        .collect();
    let counted = users.iter().filter(|e| with_counter.contains(*e)).count();
    if counted > 0 {
        return Check::ok(
            name,
            format!(
                "{counted} of {} applied users have counters (the others have not connected since the core started)",
                users.len()
            ),
        );
    }
    if !with_counter.is_empty() {
        return Check::ok(
            name,
            format!(
                "none of the {} applied users has connected since the core started (other users' counters show per-user stats are on)",
                users.len()
            ),
        );
    }
    // No user counter anywhere: traffic seen elsewhere tells "off" from "no traffic".
    let inbound_bytes: i64 = client
        .query_stats(
            &format!("inbound>>>{}>>>traffic>>>", node.inbound_tag),
            false,
        )
        .await
        .map(|c| c.iter().map(|(_, v)| *v).sum())
        .unwrap_or(0);
    if inbound_bytes > 0 {
        return Check::fail(
            name,
            format!(
                "inbound `{}` has carried {inbound_bytes} bytes but no user has a traffic counter: {off}",
                node.inbound_tag
            ),
            fix_off,
        );
    }
    let logged = x
        .access_log
        .as_deref()
        .map(|p| connections_of(p, &users))
        .unwrap_or(0);
    if logged > 0 {
        return Check::fail(
            name,
            format!(
                "the access log shows {logged} connections of applied users but no user has a traffic counter: {off}"
            ),
            fix_off,
        );
    }
    Check::warn(
        name,
        format!(
            "none of the {} applied users has a traffic counter: either none has connected since the core started, or {off}",
            users.len()
        ),
        "run doctor again once a user has connected; with policy.system.statsInboundUplink/Downlink or xray.access_log on, doctor can tell the two apart",
    )
}

/// The end of a file, as text (at most [`LOG_TAIL`] bytes; the first line may be cut).
fn tail(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
    let mut buf = Vec::new();
    f.take(LOG_TAIL).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Lines of accepted connections: `… accepted tcp:… [tag >> out] email: a@x` (Xray) or
/// `… accepted tcp:… [out] email: a@x` (V2Ray); the email, when the line has one.
fn accepted(text: &str) -> impl Iterator<Item = Option<&str>> {
    text.lines().filter(|l| l.contains(" accepted ")).map(|l| {
        l.rsplit_once(" email: ")
            .map(|(_, e)| e.trim())
            .filter(|e| !e.is_empty())
    })
}

/// How many connections of `users` the access log's end shows.
fn connections_of(path: &Path, users: &BTreeSet<String>) -> usize {
    let Ok(text) = tail(path) else { return 0 };
    accepted(&text)
        .flatten()
        .filter(|e| users.contains(&e.to_ascii_lowercase()))
        .count()
}

/// The access log is readable and the core writes to it.
///
/// "Growing" cannot be watched over a short window without connections arriving in
/// it, so the check reads what the core wrote instead: the file must hold connection
/// lines (`accepted … email:`), and have been written since the running core started
/// (its uptime from StatsService). A log with no such line yet, or not written since
/// the core started, is `!`: no connection may have come in, or the core writes
/// elsewhere (`log.access` in its config is another path).
fn access_log(path: &Path, cut: bool, boot: Option<SystemTime>) -> Check {
    let name = "access log";
    let fail = |detail: String, fix: String| {
        if cut {
            Check::fail(name, detail, fix)
        } else {
            Check::warn(name, detail, fix)
        }
    };
    let needed = if cut {
        "cut_connections needs it: without it a removed user's open connections are not cut"
    } else {
        "doctor reads it to tell idle users from stats that are off"
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return fail(
                format!("cannot read {}: {e} ({needed})", path.display()),
                format!(
                    "set \"log\": {{\"access\": \"{}\"}} in the core's config and restart it, or point xray.access_log (XRAY_ACCESS_LOG) at the core's log.access file",
                    path.display()
                ),
            );
        }
    };
    let text = match tail(path) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                format!("cannot read {}: {e} ({needed})", path.display()),
                format!(
                    "make {} a file the user connector runs as can read (the core's log.access)",
                    path.display()
                ),
            );
        }
    };
    let lines = accepted(&text).count();
    let written = meta.modified().ok();
    let ago = written
        .and_then(|w| SystemTime::now().duration_since(w).ok())
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string() + " ago")
        .unwrap_or_else(|| "at an unknown time".into());
    if lines == 0 {
        return Check::warn(
            name,
            format!(
                "{} is readable but holds no connection line yet (last written {ago})",
                path.display()
            ),
            "check that it is the core's log.access; run doctor again after a client has connected",
        );
    }
    if let (Some(w), Some(b)) = (written, boot)
        && w < b
    {
        return Check::warn(
            name,
            format!(
                "{} holds {lines} connection lines but has not been written since the core started (last written {ago})",
                path.display()
            ),
            "check that the core's log.access is this file; run doctor again after a client has connected",
        );
    }
    Check::ok(
        name,
        format!(
            "{} is readable, {lines} connection lines at its end, last written {ago}",
            path.display()
        ),
    )
}

/// `CAP_NET_ADMIN` in this process's effective set, and SOCK_DESTROY working: tried on a
/// loopback connection of our own (the kernel answers EPERM or EOPNOTSUPP only for a
/// socket it found), as the daemon does at start.
fn net_admin() -> Check {
    use crate::peers::kernel::{self, KernelError};
    let name = "CAP_NET_ADMIN";
    let no_cap_fix = "run connector as root, or grant it: AmbientCapabilities=CAP_NET_ADMIN in its systemd unit (setcap cap_net_admin+ep on the binary); or set xray.cut_connections = false";
    match has_net_admin() {
        Ok(true) => match kernel::probe() {
            Ok(()) => Check::ok(
                name,
                "present, and the kernel destroys sockets (SOCK_DESTROY tried on a loopback connection of our own)",
            ),
            Err(KernelError::Unsupported) => Check::fail(
                name,
                "present, but this kernel cannot destroy sockets (EOPNOTSUPP: built without CONFIG_INET_DIAG_DESTROY); removed users are still removed, their open connections are not cut",
                "run on a kernel with CONFIG_INET_DIAG_DESTROY (the major distributions' kernels have it), or set xray.cut_connections = false",
            ),
            Err(KernelError::NoCapability) => Check::fail(
                name,
                "in the effective set, yet the kernel refused SOCK_DESTROY (EPERM): a container or namespace without the capability over its sockets",
                no_cap_fix,
            ),
            Err(e) => Check::warn(
                name,
                format!("present, but SOCK_DESTROY could not be tried: {e}"),
                "check that the agent may open netlink sockets (systemd: RestrictAddressFamilies must allow AF_NETLINK)",
            ),
        },
        Ok(false) => Check::fail(
            name,
            "missing: open connections of removed users cannot be cut (users are still removed)",
            no_cap_fix,
        ),
        Err(e) => Check::warn(
            name,
            format!("cannot read this process's capabilities: {e}"),
            "check by hand that connector runs with CAP_NET_ADMIN",
        ),
    }
}

/// Whether bit [`CAP_NET_ADMIN`] is set in `CapEff` of `/proc/self/status`.
fn has_net_admin() -> Result<bool, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    cap_eff_has(&status, CAP_NET_ADMIN)
}

fn cap_eff_has(status: &str, bit: u32) -> Result<bool, String> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .ok_or("/proc/self/status has no CapEff line")?;
    let set = u64::from_str_radix(hex, 16).map_err(|_| format!("CapEff `{hex}` is not hex"))?;
    Ok(set & (1 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_bit_12_is_net_admin() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff_has(root, CAP_NET_ADMIN), Ok(true));
        let none = "CapEff:\t0000000000000000\n";
        assert_eq!(cap_eff_has(none, CAP_NET_ADMIN), Ok(false));
        // CAP_NET_RAW (13) alone is not it.
        assert_eq!(
            cap_eff_has("CapEff:\t0000000000002000\n", CAP_NET_ADMIN),
            Ok(false)
        );
        assert_eq!(
            cap_eff_has("CapEff:\t0000000000001000\n", CAP_NET_ADMIN),
            Ok(true)
        );
        assert!(cap_eff_has("Name:\tx\n", CAP_NET_ADMIN).is_err());
    }

    #[test]
    fn access_log_lines_of_both_cores() {
        let text = "2026/12/05 15:04:51.011036 from 127.0.0.1:32964 accepted tcp:127.0.0.1:45867 [node-1 >> direct] email: a@x\n\
                    2026/12/05 15:05:01 127.0.0.1:37422 accepted tcp:127.0.0.1:33241 [direct] email: B@x\n\
                    2026/12/05 15:05:02 127.0.0.1:37423 accepted tcp:127.0.0.1:33241 [direct]\n\
                    2026/12/05 15:05:03 [Info] something else\n";
        let got: Vec<Option<&str>> = accepted(text).collect();
        assert_eq!(got, vec![Some("a@x"), Some("B@x"), None]);
    }
}
