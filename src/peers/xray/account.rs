//! The account of one user, per protocol, as the core wants it: a TypedMessage whose
//! type string depends on the flavour. Only canonical UUIDs and non-empty emails can be
//! built here, because the core accepts anything and some of it cannot be undone
//! (XRAY-FACTS: any string as a vless id; an empty email that can never be removed).

use base64::Engine;
use prost::Message;
use uuid::Uuid;

use super::Flavor;
use super::wire;

/// A name the core's API has no account for, or an account it must not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("`{0}` is not a protocol (expected vless, vmess, trojan or shadowsocks)")]
    UnknownProtocol(String),
    #[error(
        "`{0}` is not a cipher the API can add users with (aes-128-gcm, aes-256-gcm, chacha20-poly1305, xchacha20-poly1305, 2022-blake3-aes-128-gcm)"
    )]
    UnknownCipher(String),
    #[error("refusing to send an empty email: the core could never remove that user")]
    EmptyEmail,
    #[error(
        "V2Ray's shadowsocks inbound is single-user (\"proxy is not a UserManager\") and it has no Shadowsocks 2022: users cannot be added over its API"
    )]
    V2rayShadowsocks,
}

/// The protocol of an inbound: what kind of account each of its users gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Vless,
    Vmess,
    Trojan,
    Shadowsocks,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Vless => "vless",
            Protocol::Vmess => "vmess",
            Protocol::Trojan => "trojan",
            Protocol::Shadowsocks => "shadowsocks",
        }
    }

    pub fn parse(s: &str) -> Result<Self, AccountError> {
        match s {
            "vless" => Ok(Protocol::Vless),
            "vmess" => Ok(Protocol::Vmess),
            "trojan" => Ok(Protocol::Trojan),
            "shadowsocks" => Ok(Protocol::Shadowsocks),
            other => Err(AccountError::UnknownProtocol(other.to_string())),
        }
    }
}

/// Shadowsocks ciphers the API accepts per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
    Xchacha20Poly1305,
    /// Shadowsocks 2022 (Xray only): the per-user key is the UUID's 16 bytes, base64.
    Blake3Aes128Gcm,
}

impl Cipher {
    pub fn parse(s: &str) -> Result<Cipher, AccountError> {
        Ok(match s {
            "aes-128-gcm" => Cipher::Aes128Gcm,
            "aes-256-gcm" => Cipher::Aes256Gcm,
            "chacha20-poly1305" | "chacha20-ietf-poly1305" => Cipher::Chacha20Poly1305,
            "xchacha20-poly1305" | "xchacha20-ietf-poly1305" => Cipher::Xchacha20Poly1305,
            "2022-blake3-aes-128-gcm" => Cipher::Blake3Aes128Gcm,
            other => return Err(AccountError::UnknownCipher(other.to_string())),
        })
    }

    /// The classic ciphers' `cipher_type` code (the 2022 cipher has none: 0).
    fn cipher_type(self) -> i32 {
        match self {
            Cipher::Aes128Gcm => 5,
            Cipher::Aes256Gcm => 6,
            Cipher::Chacha20Poly1305 => 7,
            Cipher::Xchacha20Poly1305 => 8,
            Cipher::Blake3Aes128Gcm => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes-128-gcm",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::Chacha20Poly1305 => "chacha20-poly1305",
            Cipher::Xchacha20Poly1305 => "xchacha20-poly1305",
            Cipher::Blake3Aes128Gcm => "2022-blake3-aes-128-gcm",
        }
    }
}

/// What a node's inbound expects of each user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundKind {
    pub protocol: Protocol,
    /// vless: the flow given to users whose panel entry has none.
    pub flow: String,
    /// shadowsocks only.
    pub cipher: Option<Cipher>,
}

impl InboundKind {
    /// The `proxy_settings.type` that `ListInbounds` reports for such an inbound.
    pub fn inbound_type(&self, flavor: Flavor) -> String {
        let t = match (self.protocol, self.cipher) {
            (Protocol::Vless, _) => "proxy.vless.inbound.Config",
            (Protocol::Vmess, _) => "proxy.vmess.inbound.Config",
            (Protocol::Trojan, _) => "proxy.trojan.ServerConfig",
            (Protocol::Shadowsocks, Some(Cipher::Blake3Aes128Gcm)) => {
                "proxy.shadowsocks_2022.MultiUserServerConfig"
            }
            (Protocol::Shadowsocks, _) => "proxy.shadowsocks.ServerConfig",
        };
        format!("{}{t}", prefix(flavor))
    }
}

impl InboundKind {
    /// `vless`, `shadowsocks (aes-128-gcm)`, …: for messages.
    pub fn describe(&self) -> String {
        match (self.protocol, self.cipher) {
            (Protocol::Shadowsocks, Some(Cipher::Blake3Aes128Gcm)) => {
                "shadowsocks 2022 (2022-blake3-aes-128-gcm)".into()
            }
            (Protocol::Shadowsocks, c) => {
                format!("shadowsocks ({})", c.unwrap_or(Cipher::Aes128Gcm).as_str())
            }
            (p, _) => p.as_str().into(),
        }
    }
}

/// The protocol an inbound's `proxy_settings.type` names (`vless`, `shadowsocks 2022`,
/// …), or the type itself when it is none of the managed ones.
pub fn protocol_of(inbound_type: &str) -> &str {
    let t = inbound_type
        .strip_prefix("xray.")
        .or_else(|| inbound_type.strip_prefix("v2ray.core."))
        .unwrap_or(inbound_type);
    match t {
        "proxy.vless.inbound.Config" => "vless",
        "proxy.vmess.inbound.Config" => "vmess",
        "proxy.trojan.ServerConfig" => "trojan",
        "proxy.shadowsocks.ServerConfig" => "shadowsocks",
        "proxy.shadowsocks_2022.MultiUserServerConfig" => "shadowsocks 2022",
        "proxy.shadowsocks_2022.ServerConfig" => "single-user shadowsocks 2022",
        _ => inbound_type,
    }
}

/// `xray.` or `v2ray.core.`: the package prefix of every type and service.
pub fn prefix(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Xray => "xray.",
        Flavor::V2ray => "v2ray.core.",
    }
}

/// A user ready to be sent: validated email and account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreUser {
    pub email: String,
    pub level: u32,
    pub account: wire::TypedMessage,
}

/// Builds the user for `uuid` on an inbound of `kind`. `email` must be non-empty.
pub fn user(
    flavor: Flavor,
    kind: &InboundKind,
    uuid: Uuid,
    email: String,
    flow: Option<&str>,
    level: u32,
) -> Result<CoreUser, AccountError> {
    if email.trim().is_empty() {
        return Err(AccountError::EmptyEmail);
    }
    let id = uuid.hyphenated().to_string();
    let p = prefix(flavor);
    let (type_, value) = match kind.protocol {
        Protocol::Vless => (
            "proxy.vless.Account",
            wire::VlessAccount {
                id,
                flow: flow.unwrap_or(&kind.flow).to_string(),
                encryption: "none".into(),
            }
            .encode_to_vec(),
        ),
        Protocol::Vmess => (
            "proxy.vmess.Account",
            wire::VmessAccount {
                id,
                alter_id: 0,
                security_settings: Some(wire::SecurityConfig { r#type: 2 }),
            }
            .encode_to_vec(),
        ),
        Protocol::Trojan => (
            "proxy.trojan.Account",
            wire::TrojanAccount { password: id }.encode_to_vec(),
        ),
        Protocol::Shadowsocks => {
            if flavor == Flavor::V2ray {
                return Err(AccountError::V2rayShadowsocks);
            }
            match kind.cipher.unwrap_or(Cipher::Aes128Gcm) {
                Cipher::Blake3Aes128Gcm => (
                    "proxy.shadowsocks_2022.Account",
                    wire::Shadowsocks2022Account {
                        key: base64::engine::general_purpose::STANDARD.encode(uuid.as_bytes()),
                    }
                    .encode_to_vec(),
                ),
                classic => (
                    "proxy.shadowsocks.Account",
                    wire::ShadowsocksAccount {
                        password: id,
                        cipher_type: classic.cipher_type(),
                        iv_check: false,
                    }
                    .encode_to_vec(),
                ),
            }
        }
    };
    Ok(CoreUser {
        email,
        level,
        account: wire::TypedMessage {
            r#type: format!("{p}{type_}"),
            value,
        },
    })
}
