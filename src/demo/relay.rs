//! The demo's relay: an HTTPS endpoint taking ProxyCast Connect callbacks, on
//! 127.0.0.1 port 0 inside the demo's process, with a certificate for `localhost`
//! signed by a CA made at start. The CA is written to a file the agent trusts through
//! `webhook.ca_file`, as an operator would for a relay behind a private CA.
//!
//! It answers the planned statuses in order (the demo plans `500, 500`), then `200`,
//! and records every attempt: when it came, what it answered, whether the
//! `webhook-signature` checks out with the relay's secret, and the body.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::peers::relays::SigningKey;

/// One callback as the relay got it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub status: u16,
    pub webhook_id: String,
    /// The Standard Webhooks signature matched the relay's secret.
    pub signed: bool,
    pub user_agent: String,
    pub body: String,
}

struct Inner {
    plan: VecDeque<u16>,
    attempts: Vec<Attempt>,
}

struct Shared {
    key: SigningKey,
    inner: Mutex<Inner>,
}

pub struct Relay {
    pub addr: SocketAddr,
    /// The CA that signed the relay's certificate (PEM).
    pub ca_pem: String,
    shared: Arc<Shared>,
}

/// A CA named `ca_name` and a certificate for `localhost` and 127.0.0.1 that it signed:
/// (CA PEM, the certificate chain, its key). The webhook tests' receiver uses it too.
pub fn localhost_certificate(
    ca_name: &str,
) -> anyhow::Result<(String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok((
        ca_cert.pem(),
        vec![leaf_cert.der().clone()],
        PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    ))
}

impl Relay {
    /// Serves HTTPS until `stop`; checks signatures with `secret` (`whsec_…`).
    pub async fn start(secret: &str, stop: CancellationToken) -> anyhow::Result<Relay> {
        let key = SigningKey::parse(secret).map_err(anyhow::Error::msg)?;
        let (ca_pem, chain, leaf_key) = localhost_certificate("connector demo CA")?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, leaf_key)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let shared = Arc::new(Shared {
            key,
            inner: Mutex::new(Inner {
                plan: VecDeque::new(),
                attempts: Vec::new(),
            }),
        });
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let app = axum::Router::new()
            .fallback(callback)
            .with_state(shared.clone());
        let listener = TlsListener {
            tcp,
            acceptor,
            addr,
        };
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        Ok(Relay {
            addr,
            ca_pem,
            shared,
        })
    }

    /// `https://localhost:{port}/proxycast/callback`.
    pub fn callback_url(&self) -> String {
        format!("https://localhost:{}/proxycast/callback", self.addr.port())
    }

    /// The next callbacks are answered with these statuses, then `200` again.
    pub fn plan(&self, statuses: &[u16]) {
        self.lock().plan.extend(statuses);
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// TCP connections after their TLS handshake (one at a time: a demo relay gets a
/// handful of callbacks; a handshake that stalls is dropped after a few seconds).
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(stream);
            if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn callback(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, timestamp) = (text("webhook-id"), text("webhook-timestamp"));
    let signed = timestamp.parse::<u64>().is_ok_and(|ts| {
        let expected = crate::jobs::webhook::sign::signature(&shared.key, &id, ts, &body);
        text("webhook-signature").split(' ').any(|s| s == expected)
    });
    let status = {
        let mut g = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let status = g.plan.pop_front().unwrap_or(200);
        g.attempts.push(Attempt {
            at: Instant::now(),
            status,
            webhook_id: id,
            signed,
            user_agent: text("user-agent"),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        status
    };
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}
