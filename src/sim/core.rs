//! Real proxy cores for integration tests (issue 4): the Xray core from the PyPI wheel
//! `Xray-core` and V2Ray 4.34 from Debian, started as child processes from a JSON
//! config, a real *client* core (a second Xray) that carries traffic to them as a given
//! user, and a local HTTP target that the traffic reaches.
//!
//! `connector::sim::core`: `support::cores` in the tests, which re-exports it, and
//! `cores` in the benches; the demo's core spawns through it too. Install the peers with
//! `scripts/install-peers.sh` (CI does, through `scripts/test.sh`); start every test with
//! [`require_peer`], which skips loudly on a developer machine without them and fails
//! under `CI=true`, and mark it with the build's finding, so that `cargo test` counts it
//! as ignored, with the reason, where the core is missing (build.rs):
//!
//! ```ignore
//! #[cfg_attr(no_xray, ignore = "needs the real Xray core: scripts/test.sh installs it")]
//! #[test]
//! fn …() {
//!     let Some(_) = require_peer(Flavor::Xray) else { return };
//!     let alice = User::new("alice");
//!     let inbound = Inbound::new("node-1", Protocol::Vless, vec![alice.clone()]);
//!     let server = ServerConfig::new(Flavor::Xray).with(inbound.clone());
//!     let core = Core::start(Flavor::Xray, server.json());   // waits until it listens
//!     let target = Target::start();
//!     let client = Client::start(vec![inbound.route(&alice)]);
//!     assert_eq!(client.fetch(&alice.email, &target.url()).unwrap(), TARGET_BODY.as_bytes());
//! }
//! ```
//!
//! What the cores do that shapes this file (see ../shared/XRAY-FACTS.md):
//! - `xray.startFromJSON` blocks until SIGINT/SIGTERM and then returns, and the Go
//!   runtime keeps the process alive after that; our runner script exits then, but the
//!   harness always stops a core with SIGKILL.
//! - The wheel prints nothing when it cannot start: status 23 is a config it could not
//!   load, 255 a core that failed to start (a listen port taken, say). So every listen
//!   port is checked free before a start, and a failure prints the config.
//! - Xray 26's `freedom` outbound blackholes loopback targets unless its settings carry
//!   `finalRules` allowing them; V2Ray 4.34 reaches loopback as it is (and ignores the
//!   unknown key, so it gets none).
//! - A core that refuses a vmess or shadowsocks user *drains* the connection: it reads
//!   until the client gives up, so a refused fetch would always run into its timeout.
//!   Every fetch therefore carries an 8 KiB header, more than the drain reads, after
//!   which the core closes at once (measured: 10 s timeout → 10 ms empty reply).
//!
//! Nothing here sleeps to synchronise: a start waits until the core process itself
//! listens on every port of its config (read from `/proc`, so probing makes no noise in
//! the core's log) and its API port accepts a connection, each with a deadline. Each core's stdout and stderr go to files;
//! a failed wait panics with the config and every run's output, and a core, client or
//! target dropped while a test panics prints the same and keeps its directory.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

/// Deadline for a core to come up (it takes ~20 ms; only a hang should reach this).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of one fetch through a client core. Loopback answers take milliseconds,
/// and a refusal is an empty reply within ~1 s (trojan), so this is only a backstop.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The body `GET /` of a [`Target`] answers.
pub const TARGET_BODY: &str = "connector cores target: you got through\n";

/// The Xray wheel the tests were written against (`scripts/install-peers.sh` pins it).
pub const XRAY_WHEEL: &str = "1.8.26.13";

/// Runs the Xray core in the wheel from the config file given as its one argument.
pub const XRAY_RUNNER: &str = r#"
import os, sys
import xray
with open(sys.argv[1]) as f:
    config = f.read()
# Blocks until SIGINT/SIGTERM (or exits the process itself: 23 for a config it cannot
# load, 255 for a core that cannot start), then returns with the Go runtime still
# holding the process open: leave at once.
xray.startFromJSON(config)
os._exit(0)
"#;

// ---- the peers ----

/// Which core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// Xray 26 from the PyPI wheel, run by the venv's python.
    Xray,
    /// V2Ray 4.34 from Debian, `/usr/bin/v2ray`.
    V2ray,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Xray => "xray",
            Flavor::V2ray => "v2ray",
        })
    }
}

/// An installed core: the program to run and what it says its version is.
#[derive(Debug, Clone)]
pub struct Peer {
    pub flavor: Flavor,
    /// The venv's python (Xray) or the v2ray binary.
    pub program: PathBuf,
    pub version: String,
    /// How `program` is given the config.
    pub runner: Runner,
}

/// How a core's program is started with a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// A python with the wheel's `xray` module, running [`XRAY_RUNNER`] on the file.
    Wheel,
    /// An `xray` executable as operators install it: `xray run -c FILE`.
    XrayRun,
    /// V2Ray 4.34: `v2ray -config FILE`.
    V2ray,
}

/// The version of the `xray` module `python` imports; `Err` says what failed.
pub fn wheel_version(python: &Path) -> Result<String, String> {
    let out = Command::new(python)
        .args(["-c", "import xray; print(xray.__version__)"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!("{} has no `xray` module: {last}", python.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The installed core of `flavor`, found once per test binary; `Err` says what is
/// missing and where it was looked for.
pub fn peer(flavor: Flavor) -> Result<Peer, String> {
    static XRAY: OnceLock<Result<Peer, String>> = OnceLock::new();
    static V2RAY: OnceLock<Result<Peer, String>> = OnceLock::new();
    match flavor {
        Flavor::Xray => XRAY.get_or_init(find_xray).clone(),
        Flavor::V2ray => V2RAY.get_or_init(find_v2ray).clone(),
    }
}

/// `Some(peer)` when `flavor` is installed. When it is not: under `CI=true` this
/// panics (CI installs the peers, so a missing one is a broken set-up, never a pass);
/// elsewhere it prints a loud `SKIPPED` line ([`skipped`]) and returns `None`, and the test
/// returns early:
///
/// ```ignore
/// let Some(_) = require_peer(Flavor::V2ray) else { return };
/// ```
pub fn require_peer(flavor: Flavor) -> Option<Peer> {
    match peer(flavor) {
        Ok(p) => Some(p),
        Err(why) => {
            let test = std::thread::current()
                .name()
                .unwrap_or("this test")
                .to_string();
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{test} needs the real {flavor} core and CI=true: {why} \
                     (scripts/test.sh runs scripts/install-peers.sh first)"
                );
            }
            skipped(
                &test,
                &format!("{why} (run scripts/install-peers.sh as root)"),
            );
            None
        }
    }
}

/// Says that `test` was skipped and why, where a passing `cargo test` run shows it.
///
/// libtest captures `eprintln!` and prints it only for a failing test, so a skipped test
/// would pass in silence: this writes to the process's stderr itself, which libtest does
/// not capture, and the line shows among the `test … ok` lines.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!!!! SKIPPED {test}: {why} !!!!!\n"
    );
}

fn find_xray() -> Result<Peer, String> {
    let (python, from) = match std::env::var_os("CONNECTOR_XRAY_PYTHON") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "CONNECTOR_XRAY_PYTHON"),
        _ => {
            // Where `cargo test` runs us from (set at run time), else where we were built.
            let root = std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
            (
                root.join("target/peers/venv/bin/python"),
                "the default venv",
            )
        }
    };
    if !python.exists() {
        return Err(format!(
            "the Xray core is not installed: no python at {} ({from})",
            python.display()
        ));
    }
    let version = wheel_version(&python)
        .map_err(|e| format!("the Xray core is not installed ({from}): {e}"))?;
    if version != XRAY_WHEEL {
        return Err(format!(
            "{} ({from}) has Xray-core {version}, but the tests are pinned to {XRAY_WHEEL}",
            python.display()
        ));
    }
    Ok(Peer {
        flavor: Flavor::Xray,
        program: python,
        version: format!("Xray-core wheel {version}"),
        runner: Runner::Wheel,
    })
}

fn find_v2ray() -> Result<Peer, String> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("v2ray"))
            .find(|p| p.is_file())
    });
    let program = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/v2ray"));
    if !program.is_file() {
        return Err("V2Ray is not installed: no `v2ray` on PATH nor /usr/bin/v2ray".into());
    }
    let out = Command::new(&program)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || !version.starts_with("V2Ray") {
        return Err(format!(
            "`{} -version` did not answer like V2Ray: {:?} {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Peer {
        flavor: Flavor::V2ray,
        program,
        version,
        runner: Runner::V2ray,
    })
}

// ---- ports ----

/// A free TCP port on 127.0.0.1: the kernel picks it (bind to port 0), and this test
/// binary never hands out the same port twice, so two cores of one run cannot collide.
/// Another process could still take it before the core binds it; [`Core::start`]
/// checks every listen port just before starting and names a taken one.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The TCP ports that process `pid` itself listens on: its sockets (`/proc/PID/fd`)
/// that `/proc/PID/net/tcp{,6}` (its own network namespace's) shows in state LISTEN. Looking does not connect, so it leaves
/// nothing in the core's log; and a port some other process took after we chose it does
/// not pass for the core's.
fn listening_ports(pid: u32) -> HashSet<u16> {
    let owned: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = HashSet::new();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st … uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && owned.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or("");
                if let Ok(p) = u16::from_str_radix(port, 16) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

// ---- users and config builders ----

/// The protocols an inbound (and the client's outbound) can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Vless,
    Vmess,
    Trojan,
    /// Classic shadowsocks with this cipher (e.g. `aes-128-gcm`). Xray: one password per
    /// user. V2Ray: single-user inbounds only.
    Shadowsocks(&'static str),
    /// Shadowsocks 2022, `2022-blake3-aes-128-gcm` (Xray only): a server key per
    /// inbound, a 16-byte key per user.
    Shadowsocks2022,
}

impl Protocol {
    /// Every protocol the Xray flavour is tested with.
    pub const XRAY: [Protocol; 5] = [
        Protocol::Vless,
        Protocol::Vmess,
        Protocol::Trojan,
        Protocol::Shadowsocks("aes-128-gcm"),
        Protocol::Shadowsocks2022,
    ];
    /// Every protocol whose users V2Ray 4.34 can have added over its API.
    pub const V2RAY: [Protocol; 3] = [Protocol::Vless, Protocol::Vmess, Protocol::Trojan];

    /// The `protocol` of the inbound or outbound.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Vless => "vless",
            Protocol::Vmess => "vmess",
            Protocol::Trojan => "trojan",
            Protocol::Shadowsocks(_) | Protocol::Shadowsocks2022 => "shadowsocks",
        }
    }

    /// The shadowsocks cipher (`method`).
    pub fn cipher(self) -> Option<&'static str> {
        match self {
            Protocol::Shadowsocks(c) => Some(c),
            Protocol::Shadowsocks2022 => Some(SS2022_METHOD),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Shadowsocks(c) => write!(f, "shadowsocks/{c}"),
            Protocol::Shadowsocks2022 => write!(f, "shadowsocks/{SS2022_METHOD}"),
            p => f.write_str(p.name()),
        }
    }
}

const SS2022_METHOD: &str = "2022-blake3-aes-128-gcm";

/// A user: an email and a UUID, from which each protocol's secret is derived the way
/// connector derives it (src/peers/xray/account.rs): the UUID is the vless/vmess id
/// and the trojan and shadowsocks password; the shadowsocks-2022 key is its 16 bytes
/// in base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub email: String,
    pub uuid: Uuid,
    /// vless only, e.g. `xtls-rprx-vision` (which needs a TLS inbound: [`Inbound::tls`]).
    pub flow: Option<String>,
}

impl User {
    /// A user with a new random UUID.
    pub fn new(email: &str) -> User {
        User::with_uuid(email, Uuid::new_v4())
    }

    pub fn with_uuid(email: &str, uuid: Uuid) -> User {
        User {
            email: email.to_string(),
            uuid,
            flow: None,
        }
    }

    /// A user whose email is its UUID: what connector's default `email_template`
    /// (`{uuid}`) makes of a panel entry.
    pub fn panel(uuid: Uuid) -> User {
        User::with_uuid(&uuid.to_string(), uuid)
    }

    pub fn flow(mut self, flow: &str) -> User {
        self.flow = Some(flow.to_string());
        self
    }

    /// The id, password or key this user presents on `protocol`.
    pub fn secret(&self, protocol: Protocol) -> String {
        match protocol {
            Protocol::Shadowsocks2022 => base64(self.uuid.as_bytes()),
            _ => self.uuid.to_string(),
        }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, valid until 2126, for
/// TLS inbounds (vless with the vision flow needs TLS). Made with
/// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500
///  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1`.
const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBnDCCAUGgAwIBAgIUaSvJnq7ba2+T8TNqqdftz0sx89AwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMTEyMjcwNloYDzIxMjYxMDI4
MTIyNzA2WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQHPCn6iydKxUaAyEnoZqEhyfTR4bZrkPrPufsr0IZk/JUocqxU1rEw
DFEJJhjm/s6Lu5GxbzczxJV3JQ7tBONKo28wbTAdBgNVHQ4EFgQUdJ7s1knLR0Me
YmQ0uZBHGOVhb7QwHwYDVR0jBBgwFoAUdJ7s1knLR0MeYmQ0uZBHGOVhb7QwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSQAwRgIhAJDeOHOvZFO6jIyO99Y5XRWrnzDlBMhXZKQLaiC2LGNnAiEA
rX9swb+FZuGiOyRdcaEHpGoD144hoXZEGGPLSO1YYKY=
-----END CERTIFICATE-----";
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgtni3WElDgAoC5kZ3
t9naJNlrrq07tOdy4C92rypmtTuhRANCAAQHPCn6iydKxUaAyEnoZqEhyfTR4bZr
kPrPufsr0IZk/JUocqxU1rEwDFEJJhjm/s6Lu5GxbzczxJV3JQ7tBONK
-----END PRIVATE KEY-----";

fn pem_lines(pem: &str) -> Value {
    json!(pem.lines().collect::<Vec<_>>())
}

/// A server inbound on 127.0.0.1 (a free port is chosen when it is made), or on the
/// address given by [`Inbound::listen_on`].
#[derive(Debug, Clone)]
pub struct Inbound {
    pub tag: String,
    /// Where it listens: 127.0.0.1 unless [`Inbound::listen_on`] says otherwise.
    pub listen: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// The users the config file gives it (the API can add more).
    pub users: Vec<User>,
    /// TLS with [`TEST_CERT`] (Xray only).
    pub tls: bool,
    /// Shadowsocks 2022: the inbound's own key (16 random bytes, base64).
    pub server_key: String,
}

impl Inbound {
    pub fn new(tag: &str, protocol: Protocol, users: Vec<User>) -> Inbound {
        Inbound {
            tag: tag.to_string(),
            listen: Ipv4Addr::LOCALHOST,
            port: free_port(),
            protocol,
            users,
            tls: false,
            server_key: base64(Uuid::new_v4().as_bytes()),
        }
    }

    /// Serves TLS with a self-signed certificate for `localhost` (clients made by
    /// [`Inbound::route`] trust it).
    pub fn tls(mut self) -> Inbound {
        self.tls = true;
        self
    }

    /// Listens on `ip` instead (a veth address, for a client in another network
    /// namespace: the core's online-user API ignores loopback clients).
    pub fn listen_on(mut self, ip: Ipv4Addr) -> Inbound {
        self.listen = ip;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.listen, self.port))
    }

    /// How a [`Client`] reaches this inbound as `user` (who need not be one of its
    /// config users: the route of a user the core does not know is a refused user).
    /// The route's name is the user's email.
    pub fn route(&self, user: &User) -> Route {
        Route {
            name: user.email.clone(),
            inbound: self.clone(),
            user: user.clone(),
            mux: false,
        }
    }

    /// The inbound's JSON in `flavor`'s syntax. Panics (naming the reason) on what that
    /// flavour cannot do: V2Ray 4.34 has no shadowsocks 2022, a single user per
    /// shadowsocks inbound, no vless flow and (here) no TLS.
    pub fn json(&self, flavor: Flavor) -> Value {
        let level = |mut v: Value, u: &User| {
            v["email"] = json!(u.email);
            v["level"] = json!(0);
            v
        };
        let p = self.protocol;
        if flavor == Flavor::V2ray {
            assert!(
                p != Protocol::Shadowsocks2022,
                "inbound {}: V2Ray 4.34 has no shadowsocks 2022",
                self.tag
            );
            assert!(
                !self.tls,
                "inbound {}: TLS inbounds are Xray-only here",
                self.tag
            );
            assert!(
                self.users.iter().all(|u| u.flow.is_none()),
                "inbound {}: V2Ray 4.34's vless has no flow",
                self.tag
            );
        }
        let settings = match p {
            Protocol::Vless => json!({
                "decryption": "none",
                "clients": self.users.iter().map(|u| {
                    let mut c = level(json!({"id": u.secret(p)}), u);
                    if let Some(flow) = &u.flow {
                        c["flow"] = json!(flow);
                    }
                    c
                }).collect::<Vec<_>>(),
            }),
            Protocol::Vmess => json!({
                "clients": self.users.iter().map(|u| {
                    let mut c = level(json!({"id": u.secret(p)}), u);
                    if flavor == Flavor::V2ray {
                        // V2Ray 4 defaults alterId to 0 too, but says it: AEAD only.
                        c["alterId"] = json!(0);
                    }
                    c
                }).collect::<Vec<_>>(),
            }),
            Protocol::Trojan => json!({
                "clients": self.users.iter()
                    .map(|u| level(json!({"password": u.secret(p)}), u))
                    .collect::<Vec<_>>(),
            }),
            Protocol::Shadowsocks(cipher) if flavor == Flavor::V2ray => {
                let [u] = self.users.as_slice() else {
                    panic!(
                        "inbound {}: V2Ray's shadowsocks inbound takes exactly one user, not {}",
                        self.tag,
                        self.users.len()
                    );
                };
                level(
                    json!({"method": cipher, "password": u.secret(p), "network": "tcp,udp"}),
                    u,
                )
            }
            Protocol::Shadowsocks(cipher) => json!({
                "network": "tcp,udp",
                "clients": self.users.iter()
                    .map(|u| level(json!({"method": cipher, "password": u.secret(p)}), u))
                    .collect::<Vec<_>>(),
            }),
            Protocol::Shadowsocks2022 => json!({
                "method": SS2022_METHOD,
                "password": self.server_key,
                "network": "tcp,udp",
                "clients": self.users.iter()
                    .map(|u| level(json!({"password": u.secret(p)}), u))
                    .collect::<Vec<_>>(),
            }),
        };
        let mut inbound = json!({
            "tag": self.tag,
            "listen": self.listen.to_string(),
            "port": self.port,
            "protocol": p.name(),
            "settings": settings,
        });
        if self.tls {
            inbound["streamSettings"] = json!({
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {"certificates": [
                    {"certificate": pem_lines(TEST_CERT), "key": pem_lines(TEST_KEY)}
                ]},
            });
        }
        inbound
    }
}

/// The tag of the API inbound (and of the `api` section) in [`ServerConfig`]s.
pub const API_TAG: &str = "api";

/// A server core's config: its inbounds, the gRPC API (HandlerService and
/// StatsService) on a dokodemo-door inbound, per-user traffic counters, and a
/// `freedom` outbound that reaches loopback targets.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub flavor: Flavor,
    pub api_port: u16,
    pub inbounds: Vec<Inbound>,
    /// `debug`, `info` (the default: says why a connection was refused), `warning`, ….
    pub loglevel: &'static str,
    /// `log.access`: the core's access log (which source address is which user's).
    pub access_log: Option<PathBuf>,
    /// `statsUserOnline` in the level-0 policy: the core tracks each user's open
    /// connections for its online-user API (Xray). Off unless [`ServerConfig::online`].
    pub user_online: bool,
}

impl ServerConfig {
    pub fn new(flavor: Flavor) -> ServerConfig {
        ServerConfig {
            flavor,
            api_port: free_port(),
            inbounds: Vec::new(),
            loglevel: "info",
            access_log: None,
            user_online: false,
        }
    }

    /// The config with the core's access log at `path`.
    pub fn access_log(mut self, path: &Path) -> ServerConfig {
        self.access_log = Some(path.to_path_buf());
        self
    }

    /// With `statsUserOnline` on in the level-0 policy.
    pub fn online(mut self) -> ServerConfig {
        self.user_online = true;
        self
    }

    pub fn with(mut self, inbound: Inbound) -> ServerConfig {
        self.inbounds.push(inbound);
        self
    }

    pub fn api_addr(&self) -> SocketAddr {
        localhost(self.api_port)
    }

    pub fn inbound(&self, tag: &str) -> &Inbound {
        self.inbounds
            .iter()
            .find(|i| i.tag == tag)
            .unwrap_or_else(|| panic!("no inbound tagged {tag:?}"))
    }

    pub fn json(&self) -> Value {
        let mut inbounds = vec![json!({
            "tag": API_TAG,
            "listen": "127.0.0.1",
            "port": self.api_port,
            "protocol": "dokodemo-door",
            "settings": {"address": "127.0.0.1"},
        })];
        inbounds.extend(self.inbounds.iter().map(|i| i.json(self.flavor)));
        let freedom = match self.flavor {
            // Without this, Xray 26 silently drops connections to loopback targets.
            Flavor::Xray => json!({"finalRules": [{"action": "allow", "ip": ["127.0.0.0/8"]}]}),
            Flavor::V2ray => json!({}),
        };
        let mut log = json!({"loglevel": self.loglevel});
        if let Some(p) = &self.access_log {
            log["access"] = json!(p);
        }
        let mut level = json!({"statsUserUplink": true, "statsUserDownlink": true});
        if self.user_online {
            level["statsUserOnline"] = json!(true);
        }
        json!({
            "log": log,
            "api": {"tag": API_TAG, "services": ["HandlerService", "StatsService"]},
            "stats": {},
            "policy": {"levels": {"0": level}},
            "inbounds": inbounds,
            "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": freedom}],
            "routing": {"rules": [
                {"type": "field", "inboundTag": [API_TAG], "outboundTag": API_TAG}
            ]},
        })
    }
}

// ---- running a core ----

/// How one run of a core ended (or that it still runs).
#[derive(Debug)]
struct Run {
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    ended: Option<String>,
}

/// A running core: a child process started from a JSON config, whose output goes to
/// files in its own temporary directory. SIGKILLed when dropped.
pub struct Core {
    peer: Peer,
    config: Value,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    runs: Vec<Run>,
    /// Every inbound port of the config (the API's included).
    ports: Vec<u16>,
    api: Option<SocketAddr>,
    /// The network namespace it runs in (`ip netns exec`), if not ours.
    netns: Option<String>,
}

/// The Xray core (PyPI wheel) with a [`Core`]'s interface.
pub struct XrayCore;
/// V2Ray 4.34 (Debian) with a [`Core`]'s interface.
pub struct V2rayCore;

impl XrayCore {
    #[track_caller]
    pub fn start(config: Value) -> Core {
        Core::start(Flavor::Xray, config)
    }
}

impl V2rayCore {
    #[track_caller]
    pub fn start(config: Value) -> Core {
        Core::start(Flavor::V2ray, config)
    }
}

impl Core {
    /// Starts the core and waits until every inbound port listens and the API port (the
    /// inbound tagged `api`, if any) accepts a connection. Panics with the config and
    /// the core's output when it cannot.
    #[track_caller]
    pub fn start(flavor: Flavor, config: Value) -> Core {
        Core::launch(flavor, config, true, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Core::start`], with the failure (and everything needed to understand it) as
    /// `Err`.
    pub fn try_start(flavor: Flavor, config: Value) -> Result<Core, String> {
        Core::launch(flavor, config, false, None)
    }

    /// [`Core::start`] in the network namespace `netns` (`ip netns exec`; root). Its
    /// ports are in that namespace: nothing of ours can take them.
    #[track_caller]
    pub fn start_in(flavor: Flavor, config: Value, netns: &str) -> Core {
        Core::launch(flavor, config, true, Some(netns.to_string()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Core::try_start`] with a given peer (the demo's, found its own way), in a new
    /// directory under `parent`, which is kept when the start fails.
    pub fn try_start_peer(peer: Peer, config: Value, parent: &Path) -> Result<Core, String> {
        Core::launch_peer(peer, config, Some(parent), true, None)
    }

    /// Starts the core; on failure, keeps its directory (which the report names) when
    /// `keep` (the caller is about to panic).
    fn launch(
        flavor: Flavor,
        config: Value,
        keep: bool,
        netns: Option<String>,
    ) -> Result<Core, String> {
        Core::launch_peer(peer(flavor)?, config, None, keep, netns)
    }

    fn launch_peer(
        peer: Peer,
        config: Value,
        parent: Option<&Path>,
        keep: bool,
        netns: Option<String>,
    ) -> Result<Core, String> {
        let flavor = peer.flavor;
        let prefix = format!("connector-{flavor}-");
        let mut dir = tempfile::Builder::new();
        dir.prefix(&prefix);
        let dir = match parent {
            Some(p) => dir.tempdir_in(p),
            None => dir.tempdir(),
        }
        .map_err(|e| format!("a temporary directory for the {flavor} core: {e}"))?;
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
        std::fs::write(dir.path().join("config.json"), text)
            .map_err(|e| format!("writing the {flavor} core's config: {e}"))?;
        let inbounds = config["inbounds"].as_array().cloned().unwrap_or_default();
        let ports = inbounds
            .iter()
            .filter_map(|i| i["port"].as_u64())
            .map(|p| p as u16)
            .collect();
        let api = inbounds
            .iter()
            .find(|i| i["tag"] == API_TAG)
            .and_then(|i| i["port"].as_u64())
            .map(|p| localhost(p as u16));
        let mut core = Core {
            peer,
            config,
            dir: Some(dir),
            child: None,
            runs: Vec::new(),
            ports,
            api,
            netns,
        };
        match core.spawn() {
            Ok(()) => Ok(core),
            Err(why) => {
                let report = core.failure(&why);
                if keep && let Some(dir) = core.dir.take() {
                    let _ = dir.keep();
                }
                Err(report)
            }
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the core's directory").path()
    }

    pub fn flavor(&self) -> Flavor {
        self.peer.flavor
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The address of the API inbound (tagged `api`). Panics when the config has none.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .unwrap_or_else(|| panic!("the core's config has no inbound tagged {API_TAG:?}"))
    }

    /// The process id of the current run.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times the core was started (1 + restarts).
    pub fn starts(&self) -> usize {
        self.runs.len()
    }

    /// Whether the current run is still alive (an exit is recorded, with its status).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.ended(describe_exit(self.peer.flavor, status));
                false
            }
            Err(e) => panic!("waiting for the {} core: {e}", self.peer.flavor),
        }
    }

    /// SIGKILL, and waits until the process is gone (its ports are free then). A core
    /// that is not running is left alone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let how = match child.try_wait() {
                Ok(Some(status)) => describe_exit(self.peer.flavor, status),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    "SIGKILLed by the harness".to_string()
                }
            };
            self.ended(how);
        }
    }

    /// Kills the core and starts it again from the same config: what it was given over
    /// the API (users, counters) is gone. Waits until it is up, like [`Core::start`];
    /// when it does not come up, panics (and the core, dropped, prints its output).
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.spawn() {
            panic!("{} core did not restart: {why}", self.peer.flavor);
        }
    }

    fn ended(&mut self, how: String) {
        self.child = None;
        if let Some(run) = self.runs.last_mut()
            && run.ended.is_none()
        {
            run.ended = Some(how);
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the core is already running");
        // The wheel exits without a word when a port is taken: find out first (in
        // another namespace, nothing of ours can have it).
        for &port in self.ports.iter().filter(|_| self.netns.is_none()) {
            if let Err(e) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return Err(format!(
                    "port {port} of the config is taken before the core starts ({e}); \
                     another process has it"
                ));
            }
        }
        let n = self.runs.len() + 1;
        let config = self.dir().join("config.json");
        let stdout = self.dir().join(format!("run-{n}.stdout"));
        let stderr = self.dir().join(format!("run-{n}.stderr"));
        let mut cmd = match &self.netns {
            // `ip netns exec` joins the namespace and execs the core: same process.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()])
                    .arg(&self.peer.program);
                c
            }
            None => Command::new(&self.peer.program),
        };
        match self.peer.runner {
            Runner::Wheel => {
                let runner = self.dir().join("xray-runner.py");
                std::fs::write(&runner, XRAY_RUNNER)
                    .map_err(|e| format!("writing {}: {e}", runner.display()))?;
                cmd.arg(runner).arg(&config)
            }
            Runner::XrayRun => cmd.arg("run").arg("-c").arg(&config),
            Runner::V2ray => cmd.arg("-config").arg(&config),
        };
        let file = |p: &Path| {
            std::fs::File::create(p).map_err(|e| format!("creating {}: {e}", p.display()))
        };
        cmd.current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?);
        let child = spawn_reaped_on_exit(cmd)
            .map_err(|e| format!("cannot start {}: {e}", self.peer.program.display()))?;
        self.runs.push(Run {
            pid: child.id(),
            stdout,
            stderr,
            ended: None,
        });
        self.child = Some(child);
        self.wait_up()
    }

    /// Until every inbound port listens and the API port accepts a connection; `Err`
    /// says why not (the run's exit status is in [`Core::output`]).
    fn wait_up(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(self.exit_reason());
            }
            let pid = self.pid().expect("a running core has a pid");
            let up = listening_ports(pid);
            let pending: Vec<u16> = self
                .ports
                .iter()
                .copied()
                .filter(|p| !up.contains(p))
                .collect();
            let api_ok = || {
                self.api.is_none_or(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
                })
            };
            if pending.is_empty() && api_ok() {
                // Listening, but a failed start could still be on its way out.
                if self.is_running() {
                    return Ok(());
                }
                return Err(self.exit_reason());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the core did not come up within {START_TIMEOUT:?}: ports not listening: {pending:?}"
                ));
            }
            // Polling a port: a core says nothing else when it is up.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exit_reason(&self) -> String {
        let how = self.runs.last().and_then(|r| r.ended.as_deref());
        format!(
            "the core exited while starting: {}",
            how.unwrap_or("(no status)")
        )
    }

    /// What a failed start reports: the reason, then [`Core::dump`].
    fn failure(&mut self, what: &str) -> String {
        // Give the exit status a chance to be recorded.
        self.is_running();
        format!(
            "{flavor} core: {what}\n{dump}",
            flavor = self.peer.flavor,
            dump = self.dump()
        )
    }

    /// The stdout and stderr of every run so far (the last 200 lines of each).
    pub fn output(&self) -> String {
        let mut s = String::new();
        for (i, run) in self.runs.iter().enumerate() {
            let _ = writeln!(
                s,
                "--- run {} (pid {}): {}",
                i + 1,
                run.pid,
                run.ended.as_deref().unwrap_or("running")
            );
            for (name, path) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let _ = writeln!(s, "----- {name} ({}):", path.display());
                s.push_str(&tail(&text, 200));
            }
        }
        s
    }

    /// The stdout of the current (or last) run, in full: the access log (`accepted …
    /// email: …`, `rejected …`).
    pub fn log(&self) -> String {
        self.runs
            .last()
            .and_then(|r| std::fs::read_to_string(&r.stdout).ok())
            .unwrap_or_default()
    }

    /// Everything about this core, for a failure message: the peer, the config (clipped
    /// when huge; the file is kept), and every run's output.
    pub fn dump(&self) -> String {
        let config = serde_json::to_string_pretty(&self.config).unwrap_or_default();
        format!(
            "===== {flavor} core ({version}, {program}) in {dir}\n\
             ----- config ({dir}/config.json):\n{config}\n{output}=====",
            flavor = self.peer.flavor,
            version = self.peer.version,
            program = self.peer.program.display(),
            dir = self.dir().display(),
            config = clip(&config, 16_000),
            output = self.output(),
        )
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
            if let Some(dir) = self.dir.take() {
                eprintln!("(kept {})", dir.keep().display());
            }
        }
    }
}

/// Spawns `cmd` so that the kernel SIGKILLs it when this process (a test binary, the
/// demo) dies, however it
/// dies (`PR_SET_PDEATHSIG`): a killed or crashed test run leaves no core behind.
///
/// The signal fires when the *thread* that spawned the child ends, not the process, and
/// libtest runs each test on its own thread; so every core is spawned by one thread
/// that lives as long as the process, and a core may outlive the test that started it
/// (shared by several tests, say) without being killed under them.
pub fn spawn_reaped_on_exit(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cores-spawner".into())
            .spawn(move || {
                // Never returns while the process lives: the senders sit in a static.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("a thread to spawn the cores from");
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, reply))
        .expect("the spawner thread lives as long as the process");
    answer
        .recv()
        .expect("the spawner thread answers every request")
}

fn describe_exit(flavor: Flavor, status: ExitStatus) -> String {
    match (flavor, status.code(), status.signal()) {
        (Flavor::Xray, Some(23), _) => "exited with status 23: Xray could not load its config \
             (the wheel prints no reason; check the config)"
            .into(),
        (Flavor::Xray, Some(255), _) => "exited with status 255: the Xray core failed to start \
             (the wheel prints no reason; a listen port taken, say)"
            .into(),
        (_, Some(code), _) => format!("exited with status {code}"),
        (_, None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("ended: {status}"),
    }
}

/// The last `lines` lines of `text`, ending in a newline.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut s = String::new();
    if skip > 0 {
        let _ = writeln!(s, "[… {skip} earlier lines]");
    }
    for l in &all[skip..] {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// `text` with its middle cut out when longer than `max` bytes.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut head = max / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut from = text.len() - max / 2;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    format!(
        "{}\n[… {} bytes cut …]\n{}",
        &text[..head],
        from - head,
        &text[from..]
    )
}

/// Standard base64 with padding, as Xray wants keys.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---- the client ----

/// How the client reaches a server inbound as one user.
#[derive(Debug, Clone)]
pub struct Route {
    /// What the test calls it ([`Inbound::route`]: the user's email).
    pub name: String,
    pub inbound: Inbound,
    pub user: User,
    /// The client multiplexes its connections over one (`mux`): a removed user's new
    /// requests then ride the session that is already open (XRAY-FACTS).
    pub mux: bool,
}

impl Route {
    /// The route under another name (two routes of one client need different names).
    pub fn named(mut self, name: &str) -> Route {
        self.name = name.to_string();
        self
    }

    /// The route with client mux on (not with the vision flow, which forbids it).
    pub fn mux(mut self) -> Route {
        self.mux = true;
        self
    }

    /// The client's outbound for this route.
    fn outbound(&self, tag: &str) -> Value {
        let (i, u) = (&self.inbound, &self.user);
        let p = i.protocol;
        let address = i.listen.to_string();
        let address = address.as_str();
        let port = i.port;
        let settings = match p {
            Protocol::Vless => {
                let mut user = json!({"id": u.secret(p), "encryption": "none"});
                if let Some(flow) = &u.flow {
                    user["flow"] = json!(flow);
                }
                json!({"vnext": [{"address": address, "port": port, "users": [user]}]})
            }
            Protocol::Vmess => json!({"vnext": [{"address": address, "port": port,
                "users": [{"id": u.secret(p), "security": "auto"}]}]}),
            Protocol::Trojan => json!({"servers": [{"address": address, "port": port,
                "password": u.secret(p)}]}),
            Protocol::Shadowsocks(cipher) => json!({"servers": [{"address": address,
                "port": port, "method": cipher, "password": u.secret(p)}]}),
            Protocol::Shadowsocks2022 => json!({"servers": [{"address": address,
                "port": port, "method": SS2022_METHOD,
                "password": format!("{}:{}", i.server_key, u.secret(p))}]}),
        };
        let mut out = json!({"tag": tag, "protocol": p.name(), "settings": settings});
        if self.mux {
            out["mux"] = json!({"enabled": true, "concurrency": 8});
        }
        if i.tls {
            out["streamSettings"] = json!({
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {
                    "serverName": "localhost",
                    // Trust exactly the test certificate (Xray 26 no longer takes
                    // `allowInsecure`: the config does not load).
                    "disableSystemRoot": true,
                    "certificates": [{"usage": "verify", "certificate": pem_lines(TEST_CERT)}],
                },
            });
        }
        out
    }
}

/// A client core (Xray from the wheel) with one socks5 inbound per [`Route`], each
/// routed to its own outbound: one process carries any number of users. The client is
/// Xray whatever the server is, so a V2Ray test requires both peers.
pub struct Client {
    pub core: Core,
    routes: Vec<(Route, u16)>,
    /// Where its socks ports listen.
    listen: Ipv4Addr,
}

impl Client {
    /// Starts the client; every route gets a socks5 port on 127.0.0.1.
    #[track_caller]
    pub fn start(routes: Vec<Route>) -> Client {
        Client::launch(routes, None)
    }

    /// Starts the client in the network namespace `netns` (root), its socks5 ports on
    /// `listen` (the namespace's veth address, reachable from ours): the server core
    /// sees its connections come from that address, not from loopback.
    #[track_caller]
    pub fn start_in(netns: &str, listen: Ipv4Addr, routes: Vec<Route>) -> Client {
        Client::launch(routes, Some((netns, listen)))
    }

    #[track_caller]
    fn launch(routes: Vec<Route>, netns: Option<(&str, Ipv4Addr)>) -> Client {
        let listen = netns.map_or(Ipv4Addr::LOCALHOST, |(_, ip)| ip);
        let mut names = HashSet::new();
        for r in &routes {
            assert!(
                names.insert(r.name.as_str()),
                "two routes are named {:?}; rename one with Route::named",
                r.name
            );
        }
        let routes: Vec<(Route, u16)> = routes.into_iter().map(|r| (r, free_port())).collect();
        let mut inbounds = Vec::new();
        // Traffic no rule claims goes nowhere, never straight out.
        let mut outbounds = vec![json!({"tag": "unrouted", "protocol": "blackhole"})];
        let mut rules = Vec::new();
        for (i, (route, port)) in routes.iter().enumerate() {
            let (inb, out) = (format!("socks-{i}"), format!("to-{i}"));
            inbounds.push(json!({
                "tag": inb,
                "listen": listen.to_string(),
                "port": port,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": false},
            }));
            outbounds.push(route.outbound(&out));
            rules.push(json!({"type": "field", "inboundTag": [inb], "outboundTag": out}));
        }
        let config = json!({
            "log": {"loglevel": "info"},
            "inbounds": inbounds,
            "outbounds": outbounds,
            "routing": {"rules": rules},
        });
        let core = match netns {
            Some((ns, _)) => Core::start_in(Flavor::Xray, config, ns),
            None => Core::start(Flavor::Xray, config),
        };
        Client {
            core,
            routes,
            listen,
        }
    }

    /// The socks5 address of the route called `name`.
    #[track_caller]
    pub fn socks(&self, name: &str) -> SocketAddr {
        self.routes
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(_, p)| SocketAddr::from((self.listen, *p)))
            .unwrap_or_else(|| panic!("the client has no route named {name:?}"))
    }

    /// `GET url` through the route called `name`: `Ok(body)` when the user got through,
    /// `Err` when refused (the reason says how). A client core that died is not a
    /// refusal: that panics.
    #[track_caller]
    pub fn fetch(&mut self, name: &str, url: &str) -> Result<Vec<u8>, String> {
        let got = fetch_through(self.socks(name), url);
        if got.is_err() && !self.core.is_running() {
            panic!(
                "the client core died (fetching {url} as {name:?}): {:?}",
                got
            );
        }
        got
    }

    /// Fetches until the route gets through, for at most `timeout`; on success, how long
    /// it took. `Err` lists every attempt.
    pub fn wait_through(
        &mut self,
        name: &str,
        url: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        self.wait(name, url, timeout, true)
    }

    /// Fetches until the route is refused, for at most `timeout`; on success, how long
    /// it took. `Err` lists every attempt.
    pub fn wait_refused(
        &mut self,
        name: &str,
        url: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        self.wait(name, url, timeout, false)
    }

    fn wait(
        &mut self,
        name: &str,
        url: &str,
        timeout: Duration,
        through: bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let mut attempts = Vec::new();
        loop {
            let got = self.fetch(name, url);
            if got.is_ok() == through {
                return Ok(start.elapsed());
            }
            attempts.push(format!(
                "{:>8.3}s {}",
                start.elapsed().as_secs_f64(),
                match got {
                    Ok(body) => format!("got through ({} bytes)", body.len()),
                    Err(e) => format!("refused: {e}"),
                }
            ));
            if start.elapsed() > timeout {
                return Err(format!(
                    "{name:?} was not {} within {timeout:?}; attempts:\n{}",
                    if through { "let through" } else { "refused" },
                    tail(&attempts.join("\n"), 30)
                ));
            }
            // Each attempt is a new connection; space them a little.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The routes, then the client core's [`Core::dump`].
    pub fn dump(&self) -> String {
        format!(
            "client routes:\n{}\n{}",
            self.dump_routes(),
            self.core.dump()
        )
    }

    fn dump_routes(&self) -> String {
        let routes: Vec<String> = self
            .routes
            .iter()
            .map(|(r, p)| {
                format!(
                    "  socks {}:{p} -> {} {} inbound {:?} as {} ({}){}",
                    self.listen,
                    r.inbound.protocol,
                    r.inbound.addr(),
                    r.inbound.tag,
                    r.user.email,
                    r.name,
                    if r.mux { ", mux" } else { "" }
                )
            })
            .collect();
        routes.join("\n")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The core prints itself as it drops, next.
        if std::thread::panicking() {
            eprintln!("client routes:\n{}", self.dump_routes());
        }
    }
}

// ---- fetching through a client ----

/// Runs `fut` to completion on the harness's own tokio runtime (the tests themselves
/// are synchronous): for a test's own async calls, e.g. to a core's gRPC API.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    runtime().block_on(fut)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the cores harness")
    })
}

/// `GET url` through the socks5 proxy at `socks`, on a new connection, with
/// [`FETCH_TIMEOUT`]: `Ok(body)` on a `200`, else `Err` with the reason (an empty
/// reply or a reset is how a core refuses a user).
pub fn fetch_through(socks: SocketAddr, url: &str) -> Result<Vec<u8>, String> {
    fetch_through_timeout(socks, url, FETCH_TIMEOUT)
}

pub fn fetch_through_timeout(
    socks: SocketAddr,
    url: &str,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    // More than a draining core reads before it closes a refused connection.
    static PAD: OnceLock<String> = OnceLock::new();
    let pad = PAD.get_or_init(|| "p".repeat(8 * 1024));
    let client = proxied_client(socks, timeout)?;
    runtime().block_on(async {
        let resp = client
            .get(url)
            .header("x-pad", pad.as_str())
            .header(reqwest::header::CONNECTION, "close")
            .send()
            .await
            .map_err(|e| chain(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| chain(&e))?;
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        }
    })
}

/// A client that speaks through `socks` and never reuses a connection: every request is
/// a new connection through the client core, so a removed user meets the server afresh.
/// Kept per proxy: building one loads TLS roots, ~20 ms in a debug build.
fn proxied_client(socks: SocketAddr, timeout: Duration) -> Result<reqwest::Client, String> {
    static CLIENTS: OnceLock<
        Mutex<std::collections::HashMap<(SocketAddr, Duration), reqwest::Client>>,
    > = OnceLock::new();
    let mut clients = CLIENTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = clients.get(&(socks, timeout)) {
        return Ok(c.clone());
    }
    let proxy = reqwest::Proxy::all(format!("socks5h://{socks}")).map_err(|e| chain(&e))?;
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .map_err(|e| chain(&e))?;
    clients.insert((socks, timeout), client.clone());
    Ok(client)
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

// ---- the HTTP target ----

/// A local HTTP server the client's traffic reaches (through the server core's
/// `freedom` outbound), on 127.0.0.1 port 0:
/// - `GET /` answers [`TARGET_BODY`];
/// - `GET /bytes/{n}` answers `n` bytes (`x`), streamed in 16 KiB chunks;
/// - `GET /drip/{chunks}/{ms}` answers `chunks` chunks of 1 KiB, one every `ms`
///   milliseconds: a long-lived download, for "an established connection is not cut".
pub struct Target {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Target {
    pub fn start() -> Target {
        use axum::extract::{Path as UrlPath, State};
        use axum::routing::get;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the target");
        let hits = Arc::new(AtomicUsize::new(0));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("the target's address");
        let app = axum::Router::new()
            .route(
                "/",
                get(|State(h): State<Arc<AtomicUsize>>| async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    TARGET_BODY
                }),
            )
            .route(
                "/bytes/{n}",
                get(
                    |State(h): State<Arc<AtomicUsize>>, UrlPath(n): UrlPath<usize>| async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        let chunks = (0..n.div_ceil(16 * 1024)).map(move |i| {
                            let len = (n - i * 16 * 1024).min(16 * 1024);
                            Ok::<_, std::io::Error>(vec![b'x'; len])
                        });
                        axum::body::Body::from_stream(futures_stream(chunks, None))
                    },
                ),
            )
            .route(
                "/drip/{chunks}/{ms}",
                get(
                    |State(h): State<Arc<AtomicUsize>>,
                     UrlPath((chunks, ms)): UrlPath<(usize, u64)>| async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        let items = (0..chunks).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024]));
                        axum::body::Body::from_stream(futures_stream(
                            items,
                            Some(Duration::from_millis(ms)),
                        ))
                    },
                ),
            )
            .with_state(hits.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Target {
            addr,
            hits,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn bytes_url(&self, n: usize) -> String {
        format!("http://{}/bytes/{n}", self.addr)
    }

    pub fn drip_url(&self, chunks: usize, every: Duration) -> String {
        format!("http://{}/drip/{chunks}/{}", self.addr, every.as_millis())
    }

    /// Requests that reached the target.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Drips may still be streaming; do not wait for them.
            rt.shutdown_background();
        }
    }
}

/// The items of `iter` as a stream, one every `every` (or all at once).
fn futures_stream<I>(
    iter: I,
    every: Option<Duration>,
) -> impl futures_util::Stream<Item = I::Item> + Send + 'static
where
    I: Iterator + Send + 'static,
    I::Item: Send,
{
    futures_util::stream::unfold(iter, move |mut iter| async move {
        if let Some(d) = every {
            // Pacing a download, not waiting for an event.
            tokio::time::sleep(d).await;
        }
        iter.next().map(|item| (item, iter))
    })
}

// ---- calling a core's API by hand ----

/// The package prefix of the core's API types and services: `xray.` or `v2ray.core.`.
pub fn api_prefix(core: &Core) -> &'static str {
    match core.flavor() {
        Flavor::Xray => "xray.",
        Flavor::V2ray => "v2ray.core.",
    }
}

/// One unary call to the core's gRPC API on a fresh connection, for tests that call it
/// without the agent. `service` is e.g. `proxyman.command.HandlerService`.
pub fn api_call<Req, Resp>(
    core: &Core,
    service: &str,
    method: &str,
    req: Req,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let addr = core.api_addr();
    let path = format!("/{}app.{service}/{method}", api_prefix(core));
    let method = method.to_string();
    block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect to {addr}: {e:?}"))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| format!("{e:?}"))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_maybe_shared(path)
            .map_err(|e| e.to_string())?;
        grpc.unary(
            tonic::Request::new(req),
            path,
            tonic_prost::ProstCodec::<Req, Resp>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{method}: {:?}: {}", s.code(), s.message()))
    })
}

// ---- the API, by hand ----

/// The few API messages these tests send, written from ../shared/XRAY-FACTS.md (the
/// agent has its own, in proto/; these check the cores, not the agent).
pub mod api {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypedMessage {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct User {
        #[prost(uint32, tag = "1")]
        pub level: u32,
        #[prost(string, tag = "2")]
        pub email: String,
        #[prost(message, optional, tag = "3")]
        pub account: Option<TypedMessage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddUserOperation {
        #[prost(message, optional, tag = "1")]
        pub user: Option<User>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RemoveUserOperation {
        #[prost(string, tag = "1")]
        pub email: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AlterInboundRequest {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "2")]
        pub operation: Option<TypedMessage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VlessAccount {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub flow: String,
        #[prost(string, tag = "3")]
        pub encryption: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SysStatsResponse {
        #[prost(uint32, tag = "10")]
        pub uptime: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryStatsRequest {
        #[prost(string, tag = "1")]
        pub pattern: String,
        #[prost(bool, tag = "2")]
        pub reset: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stat {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int64, tag = "2")]
        pub value: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryStatsResponse {
        #[prost(message, repeated, tag = "1")]
        pub stat: Vec<Stat>,
    }
}

/// Every user's traffic counters on `core`, read without resetting them: email →
/// [uplink, downlink]. Through this file's own messages, not the agent's client.
pub fn user_counters(core: &Core) -> Result<std::collections::BTreeMap<String, [u64; 2]>, String> {
    let resp: api::QueryStatsResponse = api_call(
        core,
        "stats.command.StatsService",
        "QueryStats",
        api::QueryStatsRequest {
            pattern: "user>>>".into(),
            reset: false,
        },
    )?;
    let mut out = std::collections::BTreeMap::new();
    for s in resp.stat {
        let Some(rest) = s.name.strip_prefix("user>>>") else {
            continue;
        };
        let (email, dir) = if let Some(e) = rest.strip_suffix(">>>traffic>>>uplink") {
            (e, 0)
        } else if let Some(e) = rest.strip_suffix(">>>traffic>>>downlink") {
            (e, 1)
        } else {
            continue;
        };
        let slot: &mut [u64; 2] = out.entry(email.to_string()).or_default();
        slot[dir] = u64::try_from(s.value).unwrap_or(0);
    }
    Ok(out)
}
