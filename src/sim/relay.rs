//! A real HTTPS relay for the webhook tests and the demo: axum over rustls on 127.0.0.1 port 0, with
//! a certificate made at start (rcgen: a CA, and a `localhost` certificate it
//! signs), whose CA the agent trusts through `webhook.ca_file`. A test sets how the
//! next requests are answered ([`Answer`]), and every request is recorded with its
//! headers (in order, as they came) and its body, byte for byte.
//!
//! It runs on its own tokio runtime thread, so synchronous tests (driving the binary)
//! and async ones (driving the queue in-process) can both use it; waiting is on a
//! condition variable, never a sleep.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How the receiver answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This status, empty body.
    Status(u16),
    /// This status with a `Retry-After` header.
    RetryAfter(u16, String),
    /// Records the request, then holds it (no answer) until [`Receiver::release`];
    /// then `200`.
    Hold,
    /// This redirect status (`302`, `307`, …) with this `Location`.
    Redirect(u16, String),
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Lower-case names, in the order they came.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub answer: Answer,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Inner {
    plan: VecDeque<Answer>,
    /// When the plan is empty.
    default: Answer,
    requests: Vec<Recorded>,
    released: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    release: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    /// The CA that signed the receiver's certificate (PEM).
    pub ca_pem: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A CA named `ca_name` and a certificate for `localhost` and 127.0.0.1 that it signed:
/// (CA PEM, the certificate chain, its key).
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

/// TLS connections handed to axum; handshakes run on their own tasks.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor task ended with the runtime: nothing comes any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut g = shared.lock();
        let answer = g.plan.pop_front().unwrap_or_else(|| g.default.clone());
        g.requests.push(Recorded {
            at: Instant::now(),
            method: method.to_string(),
            path: uri.path().to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            answer: answer.clone(),
        });
        answer
    };
    shared.changed.notify_all();
    match answer {
        Answer::Status(s) => StatusCode::from_u16(s)
            .unwrap_or(StatusCode::IM_A_TEAPOT)
            .into_response(),
        Answer::RetryAfter(s, after) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT),
            [("retry-after", after)],
        )
            .into_response(),
        Answer::Redirect(s, location) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT),
            [("location", location)],
        )
            .into_response(),
        Answer::Hold => {
            loop {
                let notified = shared.release.notified();
                if shared.lock().released {
                    break;
                }
                notified.await;
            }
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    /// Starts a receiver answering `200` to everything (until told otherwise). Panics
    /// when it cannot (see [`Receiver::try_start`]).
    #[track_caller]
    pub fn start() -> Receiver {
        Receiver::try_start("connector test CA")
            .unwrap_or_else(|e| panic!("starting the HTTPS receiver: {e:#}"))
    }

    /// [`Receiver::start`], with a CA named `ca_name`, and the failure as `Err`. May be
    /// called from inside another tokio runtime (the demo's): it only enters its own.
    pub fn try_start(ca_name: &str) -> anyhow::Result<Receiver> {
        let (ca_pem, chain, key) = localhost_certificate(ca_name)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                plan: VecDeque::new(),
                default: Answer::Status(200),
                requests: Vec::new(),
                released: false,
            }),
            changed: Condvar::new(),
            release: tokio::sync::Notify::new(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // Bound here, not with `block_on`: async tests (and the demo) start receivers too.
        let std_tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_tcp.set_nonblocking(true)?;
        let addr = std_tcp.local_addr()?;
        let tcp = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(std_tcp)?
        };
        let (tx, rx) = mpsc::channel(64);
        runtime.spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        runtime.spawn(async move {
            let _ = axum::serve(TlsListener { rx, addr }, app).await;
        });
        Ok(Receiver {
            addr,
            ca_pem,
            shared,
            runtime: Some(runtime),
        })
    }

    /// `https://localhost:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Answers the next requests with these, in order (then the default again).
    pub fn plan(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.lock().plan.extend(answers);
    }

    pub fn set_default(&self, answer: Answer) {
        self.shared.lock().default = answer;
    }

    /// Lets held requests (and later ones planned `Hold`) answer `200`.
    pub fn release(&self) {
        self.shared.lock().released = true;
        self.shared.release.notify_waiters();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Blocks until at least `n` requests have come (at most `timeout`).
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<Recorded>, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while g.requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the receiver got {} request(s), expected {n}: {:#?}",
                    g.requests.len(),
                    g.requests
                ));
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(g.requests.clone())
    }

    /// [`Receiver::wait_requests`] for async tests (off the async threads).
    pub async fn wait_requests_async(
        self: &Arc<Self>,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Recorded>, String> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.wait_requests(n, timeout))
            .await
            .unwrap()
    }
}
