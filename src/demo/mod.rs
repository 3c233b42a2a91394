//! `connector demo`: a first run that explains itself.
//!
//! In a temporary directory, inside this one process, it starts a panel simulator
//! ([`panel`]), an HTTPS relay simulator with its own CA ([`relay`]), a small website
//! for the users to visit, and a real Xray core as a child process ([`core`]), found
//! (or fetched once into the user's cache) by [`find`]. Then it runs the real daemon
//! ([`crate::daemon::run`]) against them with a generated config, and walks through
//! what an operator cares about, checking each outcome from the outside, as an operator
//! would (the panel's records, the relay's, real connections through the core, the
//! core's own counters):
//!
//! 1. users synced from the panel and applied to the core's inbound over gRPC;
//! 2. a user the panel drops is removed, and the core refuses their next connection;
//! 3. traffic reported exactly: the panel's totals equal the core's counters, byte for
//!    byte;
//! 4. a relay callback delivered after the relay failed twice, on the retry ladder;
//! 5. what monitoring sees: `/healthz` answering 200, and the `/metrics` lines that
//!    counted the steps above (two failed deliveries and one delivered, the users
//!    applied, the bytes reported).
//!
//! When no core can be found or fetched it says what it tried and how to get one, and
//! runs with `apply.mode = "none"`: the sync (files) and the callback, not the apply,
//! ban or traffic steps.
//!
//! What it is not: not a test harness (the tests in `tests/` check far more, and
//! harder cases), and not a load generator (one website fetch per user, one download,
//! one event). Intervals are shortened to seconds so it ends within a minute; it says
//! so as it runs. Every wait is a condition polled against a deadline
//! ([`show::STEP_TIMEOUT`]); a step that does not reach its outcome stops the demo with
//! exit status 1, naming the step and what was seen, and keeps the directory.
//! Secrets (the panel key, the relay's signing secret, the listener's token) are made
//! at random and never printed.

pub(crate) mod core;
pub(crate) mod find;
pub(crate) mod relay;
pub(crate) mod show;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use tokio_util::sync::CancellationToken;

use self::core::Core;
use self::relay::Relay;
use self::show::{Check, STEP_TIMEOUT, ok, said, step, wait_for};
use crate::peers::xray::XrayClient;
use crate::sim::panel::{Answer, Panel};

use self::find::REPO_VENV;
/// The node the demo syncs.
const NODE: u64 = 1;
/// The relay the demo's callbacks go to.
const RELAY_ID: &str = "demo-relay";
/// The demo's shortened ladders (the real default is 0s, 1m, 5m, 30m).
const LADDER: &str = r#"["0s", "1s", "2s", "5s"]"#;
const SYNC_EVERY: &str = "1s";
const TRAFFIC_EVERY: &str = "2s";
/// What alice downloads in the traffic step.
const DOWNLOAD: usize = 1024 * 1024;
/// The API key the demo's ProxyCast client uses (made up; only its first 7 characters
/// may ever leave the agent).
const CLIENT_KEY: &str = "sk-demo-4f1c9a7e2b8d6053a1e9c7b5d3f2a8e6";

/// `connector demo`'s options.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// Keep the temporary directory after a successful run.
    pub keep: bool,
    /// Never make the cached venv (no download): without a core, run without it.
    pub no_fetch: bool,
}

/// Runs the demo; 0 when every step reached its outcome, 1 otherwise.
pub(crate) fn main(opts: Options) -> ExitCode {
    // Before anything changes directory: relative paths are the operator's.
    let lookup = find::Lookup::from_process(opts.no_fetch);
    let dir = match tempfile::Builder::new().prefix("connector-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("connector demo: cannot make a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = dir.path().join("connector.log");
    if let Err(e) = log_to(&log) {
        eprintln!("connector demo: cannot write {}: {e}", log.display());
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("connector demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    // On this (the main) thread: the core is spawned from here, and the kernel kills
    // it when this thread ends (PR_SET_PDEATHSIG).
    let result = runtime.block_on(run(dir.path(), &lookup));
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(done) => {
            summary(&done, started.elapsed());
            if opts.keep {
                let kept = dir.keep();
                println!(
                    "\nKept {} (connector.toml: the config the agent ran with; connector.log: its log).",
                    kept.display()
                );
            } else {
                println!(
                    "\nIt all ran in {} (removed now; `connector demo --keep` keeps it).",
                    dir.path().display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let kept = dir.keep();
            println!("\n✗ the demo stopped: {e:#}");
            println!(
                "  Kept {} for a look: connector.log is the agent's log, connector-xray-*/ the core's config and output.",
                kept.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// The agent's log goes to a file, so it does not drown what the demo says.
fn log_to(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// What the run showed, for the summary.
struct Done {
    core: Option<String>,
    /// One line per step: `✓` reached, `–` skipped (no core).
    steps: Vec<String>,
}

/// Random secrets; none is ever printed.
struct Secrets {
    panel_key: String,
    relay_secret: String,
    http_token: String,
}

impl Secrets {
    fn new() -> Secrets {
        let random = || uuid::Uuid::new_v4().simple().to_string();
        let mut key = uuid::Uuid::new_v4().as_bytes().to_vec();
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        Secrets {
            panel_key: random(),
            relay_secret: format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(key)
            ),
            http_token: random(),
        }
    }
}

/// The simulators, the core and the daemon: set up, walked through, stopped.
async fn run(dir: &Path, lookup: &find::Lookup) -> anyhow::Result<Done> {
    println!("connector demo: the real agent against a simulated panel and relay, in one process.");
    println!("Working directory: {}", dir.display());
    println!(
        "The agent's own log: {} (RUST_LOG sets its level).",
        dir.join("connector.log").display()
    );
    println!(
        "Intervals are seconds so this ends in a minute: sync every {SYNC_EVERY} (default 10s), \
         traffic every {TRAFFIC_EVERY} (default 60s), retry ladder {LADDER} \
         (the real ladder is 0s, 1m, 5m, 30m)."
    );
    let secrets = Secrets::new();
    let stop = CancellationToken::new();
    let result = set_up_and_walk(dir, lookup, &secrets, &stop).await;
    stop.cancel();
    result
}

async fn set_up_and_walk(
    dir: &Path,
    lookup: &find::Lookup,
    secrets: &Secrets,
    stop: &CancellationToken,
) -> anyhow::Result<Done> {
    let alice = uuid::Uuid::new_v4().to_string();
    let bob = uuid::Uuid::new_v4().to_string();
    let users = Users {
        names: BTreeMap::from([(alice.clone(), "alice"), (bob.clone(), "bob")]),
        alice,
        bob,
    };

    println!("\nSetting up");
    let panel = Panel::try_start(&secrets.panel_key)?;
    panel.set(NODE, Answer::list(&[&users.alice, &users.bob]));
    said(format!(
        "panel simulator   {}  node {NODE} allows alice and bob",
        panel.base_url()
    ));
    let relay = Relay::start(&secrets.relay_secret)?;
    let ca_file = dir.join("relay-ca.pem");
    std::fs::write(&ca_file, &relay.ca_pem)?;
    let providers = dir.join("providers");
    std::fs::create_dir_all(&providers)?;
    let provider = serde_json::json!({
        "id": RELAY_ID,
        "name": "Demo relay",
        "webhook": {"callback_url": relay.callback_url(), "secret": secrets.relay_secret},
    });
    write_private(
        &providers.join(format!("{RELAY_ID}.json")),
        &serde_json::to_string_pretty(&provider)?,
    )?;
    said(format!(
        "relay simulator   {}  (HTTPS; its CA is relay-ca.pem, trusted through webhook.ca_file)",
        relay.callback_url()
    ));
    let site = start_site(stop.clone()).await?;
    said(format!(
        "a website         http://{site}/  what the users visit through the node"
    ));

    let core = match find::find(lookup, &|line| said(line)) {
        Ok(peer) => {
            let core = Core::start(&peer, dir, &[users.alice.clone(), users.bob.clone()])
                .context("starting the Xray core")?;
            let how = match peer.runner {
                crate::sim::core::Runner::XrayRun => {
                    format!("`{} run -c FILE`", peer.program.display())
                }
                _ => peer.program.display().to_string(),
            };
            said(format!(
                "Xray core         {} via {how}: inbound {} (VLESS) on {}, API on {}",
                peer.version,
                self::core::INBOUND_TAG,
                core.inbound,
                core.api
            ));
            if !peer.version.contains(self::core::XRAY_WHEEL) {
                said(format!(
                    "                  (the project is pinned to {}; this one may behave differently)",
                    self::core::XRAY_WHEEL
                ));
            }
            Some(core)
        }
        Err(why) => {
            no_core(&why);
            None
        }
    };

    let http_port = self::core::free_ports(1)?[0];
    let config_path = dir.join("connector.toml");
    write_private(
        &config_path,
        &config_toml(dir, &panel, secrets, &ca_file, http_port, core.as_ref()),
    )?;
    let config = crate::config::load(Some(&config_path), &BTreeMap::<String, String>::new())
        .map_err(|e| anyhow::anyhow!("the demo's config: {e}"))?;
    said(format!(
        "connector daemon  in this process, config connector.toml, apply mode {}, listener 127.0.0.1:{http_port}",
        config.apply.mode.as_str()
    ));

    let shutdown = CancellationToken::new();
    let mut daemon = tokio::spawn(crate::daemon::run(config, shutdown.clone()));
    let world = World {
        dir: dir.to_path_buf(),
        panel,
        relay,
        site,
        core,
        users,
        http_port,
        http_token: secrets.http_token.clone(),
    };
    let walked = tokio::select! {
        walked = walk(&world) => walked,
        ended = &mut daemon => {
            return Err(match ended {
                Ok(Ok(())) => anyhow::anyhow!("the daemon stopped by itself"),
                Ok(Err(e)) => e.context("the daemon stopped"),
                Err(e) => anyhow::anyhow!("the daemon panicked: {e}"),
            });
        }
    };
    shutdown.cancel();
    let stopped = daemon.await;
    let steps = walked?;
    match stopped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("the daemon failed while stopping")),
        Err(e) => anyhow::bail!("the daemon panicked: {e}"),
    }
    println!(
        "\nThe daemon stopped cleanly (SIGTERM does the same: running attempts finish, the queue is flushed)."
    );
    Ok(Done {
        core: world.core.as_ref().map(|c| c.api.to_string()),
        steps,
    })
}

/// What the steps work with.
struct World {
    dir: PathBuf,
    panel: Panel,
    relay: Relay,
    site: std::net::SocketAddr,
    core: Option<Core>,
    users: Users,
    http_port: u16,
    http_token: String,
}

struct Users {
    alice: String,
    bob: String,
    names: BTreeMap<String, &'static str>,
}

impl Users {
    fn name<'a>(&'a self, uuid: &'a str) -> &'a str {
        self.names.get(uuid).copied().unwrap_or(uuid)
    }
}

/// Says why there is no core and how to get one.
fn no_core(why: &[String]) {
    said("Xray core         none found; tried:");
    for w in why {
        said(format!("                    - {w}"));
    }
    said("The demo runs without the apply step (apply.mode = \"none\": the agent writes the");
    said("user lists to files only), and skips the ban and traffic steps. To see them:");
    said(format!(
        "    python3 -m venv xray-venv && xray-venv/bin/pip install Xray-core=={}",
        self::core::XRAY_WHEEL
    ));
    said("    CONNECTOR_XRAY_PYTHON=xray-venv/bin/python connector demo");
    said("  or with an installed xray: CONNECTOR_XRAY_BIN=/usr/local/bin/xray connector demo");
    said(format!(
        "  or in the repository: `bash scripts/install-peers.sh` (makes {REPO_VENV}, found by itself)"
    ));
}

fn config_toml(
    dir: &Path,
    panel: &Panel,
    secrets: &Secrets,
    ca_file: &Path,
    http_port: u16,
    core: Option<&Core>,
) -> String {
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    let xray = match core {
        Some(c) => format!(
            "[apply]\nmode = \"xray-grpc\"\n\n[xray]\napi = \"{}\"\nflavor = \"xray\"\n\n\
             [traffic]\nenabled = true\ninterval = \"{TRAFFIC_EVERY}\"\n",
            c.api
        ),
        None => "[apply]\nmode = \"none\"\n\n[traffic]\nenabled = false\n".to_string(),
    };
    let kinds: String = ["node_sync", "xray_apply", "traffic_report", "webhook"]
        .iter()
        .map(|k| format!("\n[queue.kinds.{k}]\nladder = {LADDER}\n"))
        .collect();
    format!(
        "# Written by `connector demo`: the agent against the demo's simulators, with\n\
         # intervals and ladders in seconds. The real defaults are in config.example.toml.\n\
         data_dir = {data}\nshutdown_timeout = \"5s\"\n\n\
         [panel]\nbase_url = \"{panel}\"\ninternal_api_key = \"{key}\"\ntimeout = \"5s\"\n\n\
         [sync]\ninterval = \"{SYNC_EVERY}\"\noutput_dir = {out}\n\n\
         {xray}\n\
         [[nodes]]\nid = {NODE}\ninbound_tag = \"{tag}\"\nprotocol = \"vless\"\n\n\
         [webhook]\nproviders_dir = {providers}\nca_file = {ca}\nreload_interval = \"1s\"\n\n\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\ntoken = \"{token}\"\n{kinds}",
        data = q(dir.join("data")),
        panel = panel.base_url(),
        key = secrets.panel_key,
        out = q(dir.join("out")),
        tag = self::core::INBOUND_TAG,
        providers = q(dir.join("providers")),
        ca = q(ca_file.to_path_buf()),
        token = secrets.http_token,
    )
}

/// Written readable by this user only: it holds secrets.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// A tiny website: `GET /` a line of text, `GET /bytes/{n}` n bytes.
async fn start_site(stop: CancellationToken) -> anyhow::Result<std::net::SocketAddr> {
    use axum::extract::Path as UrlPath;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/",
            get(|| async { "hello from the website behind the node\n" }),
        )
        .route(
            "/bytes/{n}",
            get(|UrlPath(n): UrlPath<usize>| async move { vec![b'x'; n.min(64 << 20)] }),
        );
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    Ok(addr)
}

/// The five steps; returns the outcome lines for the summary.
async fn walk(w: &World) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let client = w
        .core
        .as_ref()
        .map(|c| {
            XrayClient::new(
                &c.api.to_string(),
                crate::config::Flavor::Xray,
                Duration::from_secs(5),
            )
        })
        .transpose()?;

    // 1. Sync and apply.
    step(1, "Users synced and applied");
    said(format!(
        "The agent asks the panel for node {NODE}'s users every {SYNC_EVERY} \
         (GET /api/internal/nodes/{NODE}/allowed-uuids, with the internal key)."
    ));
    let list = w.dir.join(format!("out/node-{NODE}/allowed-uuids.txt"));
    let both = [w.users.alice.clone(), w.users.bob.clone()];
    wait_for("the agent's first sync", STEP_TIMEOUT, || {
        let text = std::fs::read_to_string(&list).unwrap_or_default();
        let has_all = both.iter().all(|u| text.lines().any(|l| l == u));
        let seen = format!("{} holds {:?}", list.display(), text.trim());
        async move {
            if has_all {
                Check::Done(())
            } else {
                Check::NotYet(seen)
            }
        }
    })
    .await
    .context("step 1 (sync)")?;
    ok(format!(
        "synced: the panel answered the list; out/node-{NODE}/allowed-uuids.txt holds alice and bob \
         (written atomically, the Go connector's format)"
    ));
    if let (Some(core), Some(client)) = (&w.core, &client) {
        wait_for(
            "the agent to add alice and bob to the core",
            STEP_TIMEOUT,
            || inbound_has(client, &both, &[]),
        )
        .await
        .context("step 1 (apply)")?;
        ok(format!(
            "applied: inbound {} now lists alice and bob — added over the core's gRPC API \
             (HandlerService), no restart, no config file edited",
            self::core::INBOUND_TAG
        ));
        let page = format!("http://{}/", w.site);
        for uuid in &both {
            let socks = core.socks(uuid).context("a route for every user")?;
            let name = w.users.name(uuid);
            wait_for(
                &format!("{name} to get through the node"),
                STEP_TIMEOUT,
                || {
                    let page = page.clone();
                    async move {
                        match self::core::fetch_through(socks, &page).await {
                            Ok(_) => Check::Done(()),
                            Err(e) => Check::NotYet(format!("refused: {e}")),
                        }
                    }
                },
            )
            .await
            .context("step 1 (connect)")?;
        }
        ok(
            "alice and bob both get through: each fetched the website through the node as themselves",
        );
        done.push("✓ 1. users synced and applied: the panel's list is in the core".to_string());
    } else {
        said("apply: skipped (no core; apply.mode = \"none\" stops at the files)");
        done.push("– 1. users synced (apply skipped: no Xray core)".to_string());
    }

    // 2. A ban.
    step(2, "A ban refused");
    w.panel
        .set(NODE, Answer::list(std::slice::from_ref(&w.users.alice)));
    let banned_at = Instant::now();
    said("bob is removed on the panel (banned, expired, over quota: the agent needs no reason).");
    match (&w.core, &client) {
        (Some(core), Some(client)) => {
            wait_for(
                "the agent to remove bob from the core",
                STEP_TIMEOUT,
                || {
                    inbound_has(
                        client,
                        std::slice::from_ref(&w.users.alice),
                        std::slice::from_ref(&w.users.bob),
                    )
                },
            )
            .await
            .context("step 2 (removal)")?;
            ok(format!(
                "bob was removed on the panel → the agent's next sync saw it → it removed him from \
                 inbound {} over gRPC ({:.1}s after the panel dropped him)",
                self::core::INBOUND_TAG,
                banned_at.elapsed().as_secs_f64()
            ));
            let page = format!("http://{}/", w.site);
            let bob_socks = core.socks(&w.users.bob).context("bob's route")?;
            let refusal = wait_for("the core to refuse bob", STEP_TIMEOUT, || {
                let page = page.clone();
                async move {
                    match self::core::fetch_through(bob_socks, &page).await {
                        Ok(n) => Check::NotYet(format!("bob still got through ({n} bytes)")),
                        Err(e) => Check::Done(e),
                    }
                }
            })
            .await
            .context("step 2 (refusal)")?;
            ok(format!(
                "ban refused: bob's next connection is turned away by the core ({})",
                short(&refusal)
            ));
            let alice_socks = core.socks(&w.users.alice).context("alice's route")?;
            self::core::fetch_through(alice_socks, &page)
                .await
                .map_err(|e| anyhow::anyhow!("step 2: alice was refused too: {e}"))?;
            ok("alice still gets through");
            said(
                "(A connection bob already had open is not cut: the core's API cannot. README says what can.)",
            );
            done.push("✓ 2. ban refused: bob's new connections are turned away".to_string());
        }
        _ => {
            wait_for("the agent's next sync", STEP_TIMEOUT, || {
                let text = std::fs::read_to_string(&list).unwrap_or_default();
                let gone = !text.lines().any(|l| l == w.users.bob);
                async move {
                    if gone {
                        Check::Done(())
                    } else {
                        Check::NotYet("bob is still in the list".into())
                    }
                }
            })
            .await
            .context("step 2 (sync)")?;
            ok(
                "bob is gone from allowed-uuids.txt; with a core, the agent would now remove him from the inbound",
            );
            done.push("– 2. ban synced to the files (no core to refuse him)".to_string());
        }
    }

    // 3. Traffic.
    step(3, "Traffic reported exactly");
    match (&w.core, &client) {
        (Some(core), Some(client)) => {
            let alice_socks = core.socks(&w.users.alice).context("alice's route")?;
            let got = self::core::fetch_through(
                alice_socks,
                &format!("http://{}/bytes/{DOWNLOAD}", w.site),
            )
            .await
            .map_err(|e| anyhow::anyhow!("step 3: alice's download failed: {e}"))?;
            said(format!(
                "alice downloaded {} bytes through the node; bob's bytes are from step 1.",
                show::bytes(got as u64)
            ));
            said(format!(
                "Every {TRAFFIC_EVERY} the agent reads the core's per-user counters (never resetting them), \
                 and reports what grew to the panel (POST /api/internal/report-traffic, one report_id per \
                 batch); the panel counts each report_id once."
            ));
            let (counters, seen) = traffic_settled(client, &w.panel)
                .await
                .context("step 3 (traffic)")?;
            said(format!(
                "{:<7} {:>30} {:>30}",
                "user", "core counters (up / down)", "panel's totals (up / down)"
            ));
            // alice, then bob.
            let mut rows: Vec<_> = counters.iter().collect();
            rows.sort_by_key(|(uuid, _)| w.users.name(uuid).to_string());
            for (uuid, c) in rows {
                let p = seen.totals.get(uuid).copied().unwrap_or_default();
                said(format!(
                    "{:<7} {:>30} {:>30}  {}",
                    w.users.name(uuid),
                    format!("{} / {}", show::bytes(c[0]), show::bytes(c[1])),
                    format!("{} / {}", show::bytes(p[0]), show::bytes(p[1])),
                    if *c == p { "equal" } else { "DIFFERENT" }
                ));
            }
            ok(format!(
                "traffic reported exactly: the panel's totals equal the core's counters, byte for byte \
                 ({} report(s) taken, {} resent and not counted twice)",
                seen.reports, seen.duplicates
            ));
            done.push("✓ 3. traffic reported exactly: panel totals = core counters".to_string());
        }
        _ => {
            said("skipped: traffic comes from the core's counters, and there is no core.");
            done.push("– 3. traffic: skipped (no Xray core)".to_string());
        }
    }

    // 4. A callback.
    step(4, "A callback delivered after the relay failed twice");
    w.relay.plan(&[500, 500]);
    said(format!(
        "A ProxyCast client reports a connect to relay `{RELAY_ID}`: POST /v1/webhooks/connect on the \
         agent's listener. The relay will answer 500 twice."
    ));
    let accepted = post_event(w).await.context("step 4 (event)")?;
    ok(format!(
        "the agent took the event: 202, job {} — on disk before it answered, so a crash now loses nothing",
        accepted["job_id"]
    ));
    said(format!(
        "Delivery follows the retry ladder {LADDER} (the real one is 0s, 1m, 5m, 30m)."
    ));
    let attempts = wait_for(
        "the relay to get the callback through",
        STEP_TIMEOUT,
        || {
            let attempts = w.relay.attempts();
            async move {
                match attempts.iter().position(|a| a.status == 200) {
                    Some(_) => Check::Done(attempts),
                    None => Check::NotYet(format!(
                        "{} attempt(s), answered {:?}",
                        attempts.len(),
                        attempts.iter().map(|a| a.status).collect::<Vec<_>>()
                    )),
                }
            }
        },
    )
    .await
    .context("step 4 (delivery)")?;
    let first = attempts[0].at;
    for (i, a) in attempts.iter().enumerate() {
        said(format!(
            "attempt {} at +{:.1}s → the relay answered {}{}",
            i + 1,
            a.at.duration_since(first).as_secs_f64(),
            a.status,
            if a.signed {
                " (signature valid)"
            } else {
                " (signature INVALID)"
            }
        ));
    }
    check_delivery(&attempts, &accepted)?;
    let body: serde_json::Value = serde_json::from_str(&attempts[attempts.len() - 1].body)?;
    ok(format!(
        "callback delivered after 2 failures: the same webhook-id on every attempt (the relay can \
         deduplicate), signed with the relay's secret, User-Agent {:?}, and the client's API key cut \
         to {:?} — the full key never left the agent",
        attempts[0].user_agent,
        body["key_prefix"].as_str().unwrap_or("")
    ));
    done.push("✓ 4. callback delivered after 2 failures (500, 500, then 200)".to_string());

    // 5. What monitoring sees.
    step(5, "What Prometheus and a supervisor see");
    said(format!(
        "The same listener serves GET /healthz and GET /metrics (http://127.0.0.1:{}).",
        w.http_port
    ));
    let lines = observe(w).await.context("step 5")?;
    for l in &lines {
        said(format!("  {l}"));
    }
    ok(
        "healthy, and the metrics tell the story above: the relay's two failures and its delivery, \
        the users applied, the bytes reported",
    );
    done.push("✓ 5. /healthz 200; /metrics counted what happened".to_string());
    Ok(done)
}

/// `/healthz` and the lines of `/metrics` that show what the demo did; fails when the
/// agent is not healthy or the delivery counts are not 2 failed and 1 delivered.
async fn observe(w: &World) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://127.0.0.1:{}", w.http_port);
    let health = client.get(format!("{base}/healthz")).send().await?;
    let status = health.status().as_u16();
    let report: serde_json::Value = serde_json::from_slice(&health.bytes().await?)?;
    if status != 200 {
        anyhow::bail!("/healthz answered {status}: {report}");
    }
    let mut out = vec![format!("GET /healthz → 200 {}", report["workers"])];
    out.push("GET /metrics →".to_string());
    // The delivery's ack is recorded a moment after the relay's 200.
    let text = wait_for("the metrics to count the delivery", STEP_TIMEOUT, || {
        let (client, url) = (client.clone(), format!("{base}/metrics"));
        async move {
            let text = match client.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => return Check::NotYet(e.to_string()),
            };
            let has = |needle: &str| text.lines().any(|l| l.starts_with(needle));
            if has(&format!(
                "connector_webhook_deliveries_total{{relay=\"{RELAY_ID}\",outcome=\"delivered\"}} 1"
            )) && has(&format!(
                "connector_webhook_deliveries_total{{relay=\"{RELAY_ID}\",outcome=\"failed\"}} 2"
            )) {
                Check::Done(text)
            } else {
                Check::NotYet("no delivered=1 and failed=2 yet".into())
            }
        }
    })
    .await?;
    let shown = [
        "connector_node_users_applied",
        "connector_traffic_reported_bytes_total",
        "connector_webhook_deliveries_total",
        "connector_jobs{kind=\"webhook\",state=\"done\"}",
    ];
    out.extend(
        text.lines()
            .filter(|l| shown.iter().any(|s| l.starts_with(s)))
            .map(str::to_string),
    );
    Ok(out)
}

/// Whether the core's inbound lists every user of `want` and none of `gone`.
async fn inbound_has(client: &XrayClient, want: &[String], gone: &[String]) -> Check<()> {
    match client.inbound_emails(self::core::INBOUND_TAG).await {
        Ok(Some(emails)) => {
            let has = |u: &String| emails.iter().any(|e| e.eq_ignore_ascii_case(u));
            if want.iter().all(has) && !gone.iter().any(has) {
                Check::Done(())
            } else {
                Check::NotYet(format!(
                    "the inbound lists {} user(s): {emails:?}",
                    emails.len()
                ))
            }
        }
        Ok(None) => Check::NotYet("the core cannot list its users".into()),
        Err(e) => Check::NotYet(format!("the core's API: {e}")),
    }
}

/// What the panel has counted of the node's traffic.
struct Seen {
    /// uuid → [upload, download], each report counted once.
    totals: BTreeMap<String, [u64; 2]>,
    /// Distinct reports taken.
    reports: usize,
    /// Reports sent again and not counted twice.
    duplicates: usize,
}

/// Waits until the core's counters have stopped moving and the panel's totals equal
/// them; returns both.
async fn traffic_settled(
    client: &XrayClient,
    panel: &Panel,
) -> anyhow::Result<(BTreeMap<String, [u64; 2]>, Seen)> {
    // The counters of the previous poll: equal twice in a row means traffic stopped.
    let last = std::sync::Mutex::new(None::<BTreeMap<String, [u64; 2]>>);
    let last = &last;
    wait_for(
        "the panel's totals to catch up with the core's counters",
        STEP_TIMEOUT,
        || async move {
            let counters = match client.query_stats("user>>>", false).await {
                Ok(c) => user_counters(&c),
                Err(e) => return Check::NotYet(format!("the core's StatsService: {e}")),
            };
            let ledger = panel.ledger();
            let seen = Seen {
                totals: ledger.node(NODE),
                reports: ledger.reports.len(),
                duplicates: ledger.duplicates.len(),
            };
            let previous = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .replace(counters.clone());
            let steady = previous.as_ref() == Some(&counters);
            let equal =
                !counters.is_empty() && counters.iter().all(|(u, c)| seen.totals.get(u) == Some(c));
            if steady && equal {
                Check::Done((counters, seen))
            } else {
                Check::NotYet(format!("core {counters:?}, panel {:?}", seen.totals))
            }
        },
    )
    .await
}

/// `user>>>{email}>>>traffic>>>uplink|downlink` → email → [up, down].
fn user_counters(stats: &[(String, i64)]) -> BTreeMap<String, [u64; 2]> {
    let mut out: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    for (name, value) in stats {
        if let Some((email, dir)) = crate::peers::xray::email::parse_counter(name) {
            out.entry(email.to_ascii_lowercase()).or_default()[dir] =
                u64::try_from(*value).unwrap_or(0);
        }
    }
    out
}

/// Posts the connect event to the daemon's listener; the `202` body.
async fn post_event(w: &World) -> anyhow::Result<serde_json::Value> {
    let event = serde_json::json!({
        "relay_id": RELAY_ID,
        "status": "success",
        "ref": "demo",
        "key": CLIENT_KEY,
        "client": {"version": "1.4.0", "platform": "linux"},
    });
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .post(format!(
            "http://127.0.0.1:{}/v1/webhooks/connect",
            w.http_port
        ))
        .bearer_auth(&w.http_token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(event.to_string())
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?).unwrap_or_default();
    if status.as_u16() != 202 {
        anyhow::bail!("the listener answered {status}: {body}");
    }
    Ok(body)
}

/// The relay saw 500, 500, 200, one event id, valid signatures, and only the key's
/// prefix.
fn check_delivery(attempts: &[relay::Attempt], accepted: &serde_json::Value) -> anyhow::Result<()> {
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    if statuses != [500, 500, 200] {
        anyhow::bail!("step 4: the relay answered {statuses:?}, expected [500, 500, 200]");
    }
    let id = accepted["event_id"].as_str().unwrap_or("");
    if let Some(a) = attempts.iter().find(|a| a.webhook_id != id) {
        anyhow::bail!(
            "step 4: an attempt carried webhook-id {:?}, not {id:?}",
            a.webhook_id
        );
    }
    if attempts.iter().any(|a| !a.signed) {
        anyhow::bail!("step 4: a callback's signature did not verify with the relay's secret");
    }
    if attempts.iter().any(|a| a.body.contains(CLIENT_KEY)) {
        anyhow::bail!("step 4: the full API key reached the relay");
    }
    Ok(())
}

/// The innermost cause of an error chain `a: b: c` (`c`), at most 100 characters.
fn short(e: &str) -> String {
    let last = e.rsplit(": ").next().unwrap_or(e);
    last.chars().take(100).collect()
}

fn summary(done: &Done, took: Duration) {
    println!("\nDone in {:.1}s. What you saw:", took.as_secs_f64());
    for s in &done.steps {
        println!("  {s}");
    }
    if done.core.is_none() {
        println!("  (apply, ban and traffic need the Xray core: see above for how to get one)");
    }
    println!("\nRun the real thing:");
    println!(
        "  cp config.example.toml connector.toml   # set panel.base_url, the key, [[nodes]], [xray]"
    );
    println!(
        "  connector --config connector.toml       # the daemon (systemd unit: deploy/connector.service)"
    );
    println!(
        "  queuectl --config connector.toml stats  # the queue, live, while it runs (also: list, show, tail)"
    );
}
