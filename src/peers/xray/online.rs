//! Who is online, from the core itself: Xray's `GetUsersStats`, `GetStatsOnlineIpList`
//! and `GetAllOnlineUsers` (StatsService).
//!
//! The core tracks a user's open connections only where the user's level has
//! `statsUserOnline` in its policy, and never counts a client on a loopback address
//! (XRAY-FACTS). V2Ray and Xray before these methods answer UNIMPLEMENTED: that is
//! [`Support::Unsupported`], remembered per core (per [`XrayClient`] and its clones) so
//! it is asked once, and forgotten by [`XrayClient::reprobe`] when the core restarts
//! (it may be another build now).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use tonic::Code;

use super::{XrayClient, XrayError, wire};

/// What a core said to a method it may not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support<T> {
    Answered(T),
    /// The core has no such method (V2Ray, an older Xray).
    Unsupported,
}

/// The online-user methods, each probed on its own: they came in different releases
/// (`GetStatsOnlineIpList` Xray 25.2, `GetAllOnlineUsers` 25.12, `GetUsersStats` 26.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    UsersStats,
    IpList,
    AllOnline,
}

impl Method {
    const ALL: [Method; 3] = [Method::UsersStats, Method::IpList, Method::AllOnline];

    fn name(self) -> &'static str {
        match self {
            Method::UsersStats => "GetUsersStats",
            Method::IpList => "GetStatsOnlineIpList",
            Method::AllOnline => "GetAllOnlineUsers",
        }
    }
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

/// Which methods the core was found to have, shared by a client's clones.
#[derive(Debug, Default)]
pub struct Probes([AtomicU8; 3]);

impl Probes {
    fn get(&self, m: Method) -> u8 {
        self.0[m as usize].load(Ordering::Relaxed)
    }

    fn set(&self, m: Method, v: u8) {
        self.0[m as usize].store(v, Ordering::Relaxed);
    }
}

/// The name of a user's online map in the core: `user>>>{email}>>>online`.
pub fn map_name(email: &str) -> String {
    format!("user>>>{email}>>>online")
}

/// The email in an online map's name.
pub fn email_of_map(name: &str) -> Option<&str> {
    name.strip_prefix("user>>>")?.strip_suffix(">>>online")
}

impl XrayClient {
    /// Whether the core was found to have `m`: `None` until it was asked (or since
    /// [`XrayClient::reprobe`]).
    pub fn supports(&self, m: Method) -> Option<bool> {
        match self.probes.get(m) {
            YES => Some(true),
            NO => Some(false),
            _ => None,
        }
    }

    /// Forgets which online methods the core has: after a restart it may be another
    /// build. The next call of each asks again.
    pub fn reprobe(&self) {
        for m in Method::ALL {
            self.probes.set(m, UNKNOWN);
        }
    }

    /// One call of `m`, through the cache: a core known to lack it is not asked.
    async fn online_call<Req, Resp>(&self, m: Method, req: Req) -> Result<Support<Resp>, XrayError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        if self.probes.get(m) == NO {
            return Ok(Support::Unsupported);
        }
        match self.call(Self::STATS, m.name(), req).await {
            Ok(r) => {
                self.probes.set(m, YES);
                Ok(Support::Answered(r))
            }
            Err(XrayError::Refused {
                code: Code::Unimplemented,
                ..
            }) => {
                if self.probes.get(m) != NO {
                    tracing::info!(
                        core = self.addr(),
                        method = m.name(),
                        "the core has no {} (V2Ray, or an Xray before it); not asked again until it restarts",
                        m.name()
                    );
                }
                self.probes.set(m, NO);
                Ok(Support::Unsupported)
            }
            Err(e) => {
                // Any other answer means the method exists.
                if matches!(e, XrayError::Refused { .. }) {
                    self.probes.set(m, YES);
                }
                Err(e)
            }
        }
    }

    /// Every user with a connection open, and from which addresses (`GetUsersStats`):
    /// email, as the core spells it → addresses. One call for the whole core.
    pub async fn online_users(&self) -> Result<Support<BTreeMap<String, Vec<String>>>, XrayError> {
        let r: Support<wire::GetUsersStatsResponse> = self
            .online_call(
                Method::UsersStats,
                wire::GetUsersStatsRequest {
                    include_traffic: false,
                    reset: false,
                },
            )
            .await?;
        Ok(match r {
            Support::Unsupported => Support::Unsupported,
            Support::Answered(r) => Support::Answered(
                r.users
                    .into_iter()
                    .filter(|u| !u.email.is_empty())
                    .map(|u| {
                        let mut ips: Vec<String> = u.ips.into_iter().map(|e| e.ip).collect();
                        ips.sort();
                        (u.email, ips)
                    })
                    .collect(),
            ),
        })
    }

    /// The addresses `email` is online from now (`GetStatsOnlineIpList`): `Some(vec![])`
    /// when the core tracks the user and they have no connection open; `None` when the
    /// core never tracked them (never connected since it started, or their level lacks
    /// `statsUserOnline`: it cannot tell).
    pub async fn online_ips(&self, email: &str) -> Result<Support<Option<Vec<String>>>, XrayError> {
        let req = wire::GetStatsRequest {
            name: map_name(email),
            reset: false,
        };
        match self
            .online_call::<_, wire::GetStatsOnlineIpListResponse>(Method::IpList, req)
            .await
        {
            Ok(Support::Answered(r)) => {
                let mut ips: Vec<String> = r.ips.into_keys().collect();
                ips.sort();
                Ok(Support::Answered(Some(ips)))
            }
            Ok(Support::Unsupported) => Ok(Support::Unsupported),
            Err(XrayError::Refused {
                code: Code::NotFound,
                ..
            }) => Ok(Support::Answered(None)),
            Err(e) => Err(e),
        }
    }

    /// The emails of every user with a connection open (`GetAllOnlineUsers`).
    pub async fn online_emails(&self) -> Result<Support<Vec<String>>, XrayError> {
        let r: Support<wire::GetAllOnlineUsersResponse> = self
            .online_call(Method::AllOnline, wire::GetAllOnlineUsersRequest {})
            .await?;
        Ok(match r {
            Support::Unsupported => Support::Unsupported,
            Support::Answered(r) => {
                let mut v: Vec<String> = r
                    .users
                    .iter()
                    .filter_map(|n| email_of_map(n))
                    .map(str::to_string)
                    .collect();
                v.sort();
                Support::Answered(v)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names() {
        assert_eq!(map_name("a@x"), "user>>>a@x>>>online");
        assert_eq!(email_of_map("user>>>a@x>>>online"), Some("a@x"));
        assert_eq!(email_of_map("user>>>a@x>>>traffic>>>uplink"), None);
        assert_eq!(email_of_map("inbound>>>a>>>online"), None);
    }
}
