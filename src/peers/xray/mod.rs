//! A client of an Xray or V2Ray core's gRPC API: users of an inbound
//! (HandlerService) and counters and uptime (StatsService), for both flavours; who is
//! online where the core can tell ([`online`], Xray only).
//!
//! One HTTP/2 channel per core; calls are multiplexed on it, so callers bound their own
//! concurrency. The decode limit is raised to 64 MiB: a 100,000-user `GetInboundUsers`
//! answer is about 11 MB, past tonic's 4 MiB default.
//!
//! The requests that crash a core (XRAY-FACTS) cannot be made through this client: every
//! `AlterInbound` carries an operation, users are built by [`account::user`] (canonical
//! UUIDs, non-empty emails), and the caller checks the inbound's protocol first.

pub mod access_log;
pub mod account;
pub mod email;
pub mod online;
pub(crate) mod stats;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use account::CoreUser;

/// Which core: V2Ray lacks some of Xray's API (listing inbounds and their users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Xray,
    V2ray,
}

/// Largest answer accepted from a core.
pub const MAX_DECODE: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum XrayError {
    #[error("`{0}` is not an API address (expected host:port)")]
    BadAddress(String),
    #[error("cannot reach the core's API at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the core answered {method} with {code:?}: {message}")]
    Refused {
        method: &'static str,
        code: Code,
        message: String,
    },
}

impl XrayError {
    /// True when the core could not be reached at all (down, restarting).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, XrayError::Unreachable { .. })
    }
}

/// Whether an add created the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// "already exists": counts as success.
    Existed,
}

/// Whether a remove found the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Gone,
    /// "not found": counts as success.
    WasAbsent,
}

/// What `GetSysStats` tells about the core process's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SysStats {
    /// Whole seconds since the core started.
    pub uptime: u32,
    /// Bytes ever allocated by the Go runtime.
    pub total_alloc: u64,
    /// Allocations ever made.
    pub mallocs: u64,
}

impl SysStats {
    /// Whether `self`, read after `earlier`, cannot be the same process: a counter that
    /// only grows went down.
    pub fn went_back(&self, earlier: &SysStats) -> bool {
        self.uptime < earlier.uptime
            || self.total_alloc < earlier.total_alloc
            || self.mallocs < earlier.mallocs
    }
}

/// One inbound as `ListInbounds` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundInfo {
    /// `…proxy.vless.inbound.Config` and the like.
    pub proxy_type: String,
    /// The ports it listens on (empty when the core did not say).
    pub ports: Vec<u16>,
}

/// Most ports taken from one inbound's ranges: an inbound on a wider range is cut on
/// its first ports only (a listing of 65,535 ports would be no help either).
const MAX_PORTS: usize = 4096;

/// The ports of a `ReceiverConfig`; none when it is another message or does not decode.
fn ports_of(receiver: &wire::TypedMessage) -> Vec<u16> {
    if !receiver.r#type.ends_with("app.proxyman.ReceiverConfig") {
        return Vec::new();
    }
    let Ok(config) = wire::ReceiverConfig::decode(receiver.value.as_slice()) else {
        return Vec::new();
    };
    let mut ports = Vec::new();
    for r in config.port_list.map(|l| l.range).unwrap_or_default() {
        let (Ok(from), Ok(to)) = (u16::try_from(r.from), u16::try_from(r.to)) else {
            continue;
        };
        for p in from..=to.max(from) {
            if p != 0 && ports.len() < MAX_PORTS {
                ports.push(p);
            }
        }
    }
    ports
}

/// A core's API.
#[derive(Clone)]
pub struct XrayClient {
    grpc: tonic::client::Grpc<Channel>,
    flavor: Flavor,
    addr: String,
    /// Which online methods the core has, shared by the clones (one core).
    probes: Arc<online::Probes>,
}

impl std::fmt::Debug for XrayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XrayClient")
            .field("addr", &self.addr)
            .field("flavor", &self.flavor)
            .finish()
    }
}

impl XrayClient {
    /// A client for the API at `addr` (`host:port`). Connects on first use, and
    /// reconnects by itself after the core restarts.
    pub fn new(addr: &str, flavor: Flavor, timeout: Duration) -> Result<XrayClient, XrayError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| XrayError::BadAddress(addr.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        let grpc = tonic::client::Grpc::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_DECODE)
            .max_encoding_message_size(MAX_DECODE);
        Ok(XrayClient {
            grpc,
            flavor,
            addr: addr.to_string(),
            probes: Arc::default(),
        })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn call<Req, Resp>(
        &self,
        service: &str,
        method: &'static str,
        req: Req,
    ) -> Result<Resp, XrayError>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let path = format!("/{}app.{service}/{method}", account::prefix(self.flavor));
        let path = PathAndQuery::from_maybe_shared(path)
            .map_err(|_| XrayError::BadAddress(self.addr.clone()))?;
        let mut grpc = self.grpc.clone();
        let unreachable = |reason: String| XrayError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        grpc.ready()
            .await
            .map_err(|e| unreachable(crate::peers::chain(&e)))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        match grpc.unary(tonic::Request::new(req), path, codec).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) if status.code() == Code::Unavailable => {
                Err(unreachable(status.message().to_string()))
            }
            Err(status) => Err(XrayError::Refused {
                method,
                code: status.code(),
                message: status.message().to_string(),
            }),
        }
    }

    const HANDLER: &'static str = "proxyman.command.HandlerService";
    const STATS: &'static str = "stats.command.StatsService";

    /// Adds a user to the inbound `tag`. "already exists" is [`Added::Existed`].
    pub async fn add_user(&self, tag: &str, user: &CoreUser) -> Result<Added, XrayError> {
        let op = wire::AddUserOperation {
            user: Some(wire::User {
                level: user.level,
                email: user.email.clone(),
                account: Some(user.account.clone()),
            }),
        };
        match self
            .alter(tag, "AddUserOperation", op.encode_to_vec())
            .await
        {
            Ok(()) => Ok(Added::New),
            Err(XrayError::Refused { message, .. }) if message.contains("already exists") => {
                Ok(Added::Existed)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the user with `email` from the inbound `tag`. "not found" is
    /// [`Removed::WasAbsent`].
    pub async fn remove_user(&self, tag: &str, email: &str) -> Result<Removed, XrayError> {
        let op = wire::RemoveUserOperation {
            email: email.to_string(),
        };
        match self
            .alter(tag, "RemoveUserOperation", op.encode_to_vec())
            .await
        {
            Ok(()) => Ok(Removed::Gone),
            Err(XrayError::Refused { message, .. }) if message.contains("not found") => {
                Ok(Removed::WasAbsent)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the core has an inbound tagged `tag`, for cores that cannot list their
    /// inbounds (V2Ray 4): asked by removing an email no user has, which changes
    /// nothing; the core answers "handler not found" for a tag it does not have, and
    /// "not found" for the email (or "not a UserManager") when it has it.
    pub async fn inbound_exists(&self, tag: &str) -> Result<bool, XrayError> {
        let op = wire::RemoveUserOperation {
            email: "probe@connector-doctor.invalid".to_string(),
        };
        match self
            .alter(tag, "RemoveUserOperation", op.encode_to_vec())
            .await
        {
            Ok(()) => Ok(true),
            Err(
                e @ XrayError::Refused {
                    code: Code::Unimplemented,
                    ..
                },
            ) => Err(e),
            Err(XrayError::Refused { message, .. }) => Ok(!message.contains("handler not found")),
            Err(e) => Err(e),
        }
    }

    /// `AlterInbound` with one operation (never without: that crashes the core).
    async fn alter(&self, tag: &str, op: &str, value: Vec<u8>) -> Result<(), XrayError> {
        let req = wire::AlterInboundRequest {
            tag: tag.to_string(),
            operation: Some(wire::TypedMessage {
                r#type: format!("{}app.proxyman.command.{op}", account::prefix(self.flavor)),
                value,
            }),
        };
        self.call::<_, wire::AlterInboundResponse>(Self::HANDLER, "AlterInbound", req)
            .await
            .map(|_| ())
    }

    /// Every inbound's tag and proxy type (`…proxy.vless.inbound.Config`); `None` when
    /// the core cannot list them (V2Ray 4).
    pub async fn inbound_types(&self) -> Result<Option<BTreeMap<String, String>>, XrayError> {
        Ok(self
            .inbounds()
            .await?
            .map(|m| m.into_iter().map(|(t, i)| (t, i.proxy_type)).collect()))
    }

    /// Every inbound by tag: its proxy type and the ports it listens on; `None` when the
    /// core cannot list them (V2Ray 4).
    pub async fn inbounds(&self) -> Result<Option<BTreeMap<String, InboundInfo>>, XrayError> {
        match self
            .call::<_, wire::ListInboundsResponse>(
                Self::HANDLER,
                "ListInbounds",
                wire::ListInboundsRequest {
                    is_only_tags: false,
                },
            )
            .await
        {
            Ok(r) => Ok(Some(
                r.inbounds
                    .into_iter()
                    .map(|i| {
                        let info = InboundInfo {
                            proxy_type: i.proxy_settings.map(|p| p.r#type).unwrap_or_default(),
                            ports: i
                                .receiver_settings
                                .map(|r| ports_of(&r))
                                .unwrap_or_default(),
                        };
                        (i.tag, info)
                    })
                    .collect(),
            )),
            Err(XrayError::Refused {
                code: Code::Unimplemented,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The emails of every user of inbound `tag`, config-file users included; `None`
    /// when the core cannot list them (V2Ray 4).
    pub async fn inbound_emails(&self, tag: &str) -> Result<Option<Vec<String>>, XrayError> {
        match self
            .call::<_, wire::GetInboundUserResponse>(
                Self::HANDLER,
                "GetInboundUsers",
                wire::GetInboundUserRequest {
                    tag: tag.to_string(),
                    email: String::new(),
                },
            )
            .await
        {
            Ok(r) => Ok(Some(
                r.users
                    .into_iter()
                    .map(|u| u.email)
                    .filter(|e| !e.is_empty())
                    .collect(),
            )),
            Err(XrayError::Refused {
                code: Code::Unimplemented,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether inbound `tag` has a user with `email` (compared case-insensitively, as the
    /// core does); `None` when the core cannot say (V2Ray 4). One small answer: the core
    /// returns the one user, or one empty user when it has none by that email.
    pub async fn has_user(&self, tag: &str, email: &str) -> Result<Option<bool>, XrayError> {
        match self
            .call::<_, wire::GetInboundUserResponse>(
                Self::HANDLER,
                "GetInboundUsers",
                wire::GetInboundUserRequest {
                    tag: tag.to_string(),
                    email: email.to_string(),
                },
            )
            .await
        {
            Ok(r) => Ok(Some(
                r.users.iter().any(|u| u.email.eq_ignore_ascii_case(email)),
            )),
            Err(XrayError::Refused {
                code: Code::Unimplemented,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Seconds since the core started (1 right after a restart).
    pub async fn uptime(&self) -> Result<u32, XrayError> {
        Ok(self.sys_stats().await?.uptime)
    }

    /// The core process's uptime and its cumulative allocation counters: none of them
    /// ever goes down while one process runs, so any one that did means a restart.
    pub async fn sys_stats(&self) -> Result<SysStats, XrayError> {
        let r: wire::SysStatsResponse = self
            .call(Self::STATS, "GetSysStats", wire::SysStatsRequest {})
            .await?;
        Ok(SysStats {
            uptime: r.uptime,
            total_alloc: r.total_alloc,
            mallocs: r.mallocs,
        })
    }

    /// Counters whose name contains `pattern` (`""`: all), optionally reset.
    pub async fn query_stats(
        &self,
        pattern: &str,
        reset: bool,
    ) -> Result<Vec<(String, i64)>, XrayError> {
        let r: wire::QueryStatsResponse = self
            .call(
                Self::STATS,
                "QueryStats",
                wire::QueryStatsRequest {
                    pattern: pattern.to_string(),
                    reset,
                },
            )
            .await?;
        Ok(r.stat.into_iter().map(|s| (s.name, s.value)).collect())
    }
}
