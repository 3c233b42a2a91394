//! Memory of the real daemon: RSS of `connector` syncing 4 nodes of 100,000 users each
//! from a local panel, against the baseline of the same daemon with 4 empty nodes, in
//! the same run. After the lists were written and five more sync rounds (304-less, full
//! bodies) went by, VmRSS is read every 20 ms for three more rounds: its least (between
//! syncs: what the daemon keeps) and its most (while four syncs are in flight), then
//! VmHWM (the peak of the whole run). One reading right after a request, as this bench
//! took before, lands inside a sync and sits anywhere between the two.
//!
//! `cargo bench --bench daemon_rss`; `DAEMON_RSS_BIN=/path/to/connector` measures that
//! build instead (another commit's, for a before/after in the same run).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;

const NODES: u64 = 4;

struct Panel {
    bodies: Vec<Vec<u8>>,
    requests: AtomicUsize,
}

async fn allowed(State(p): State<Arc<Panel>>, Path(id): Path<u64>) -> Vec<u8> {
    p.requests.fetch_add(1, Ordering::SeqCst);
    p.bodies[(id - 1) as usize].clone()
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn measure(users: usize) -> (u64, u64, u64, Duration) {
    let bodies = (1..=NODES)
        .map(|n| {
            let list: Vec<String> = (0..users as u64)
                .map(|i| {
                    uuid::Uuid::from_u64_pair(n, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_string()
                })
                .collect();
            serde_json::to_vec(&list).unwrap()
        })
        .collect();
    let panel = Arc::new(Panel {
        bodies,
        requests: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/api/internal/nodes/{id}/allowed-uuids", get(allowed))
        .with_state(panel.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let bin = std::env::var_os("DAEMON_RSS_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_connector").into());
    let mut child = tokio::process::Command::new(bin)
        .env("PANEL_BASE_URL", format!("http://{addr}"))
        .env("INTERNAL_API_KEY", "bench")
        .env("NODE_IDS", "1,2,3,4")
        .env("INTERVAL_SECONDS", "1")
        .env("APPLY_MODE", "none")
        .env("OUTPUT_DIR", dir.path().join("out"))
        .env("DATA_DIR", dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    // All four lists written, then five more full rounds.
    let written = |n: u64| {
        std::fs::read_to_string(dir.path().join(format!("out/node-{n}/allowed-uuids.json")))
            .map(|t| t.contains(&format!("\"count\":{users}")))
            .unwrap_or(false)
    };
    while !(1..=NODES).all(written) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "daemon never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let synced = started.elapsed();
    let target = panel.requests.load(Ordering::SeqCst) + 5 * NODES as usize;
    while panel.requests.load(Ordering::SeqCst) < target {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut least, mut most) = (u64::MAX, 0);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let rss = status_kb(pid, "VmRSS:");
        (least, most) = (least.min(rss), most.max(rss));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hwm = status_kb(pid, "VmHWM:");
    let _ = child.kill().await;
    server.abort();
    (least, most, hwm, synced)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!(
            "daemon_rss: {} with {NODES} nodes, apply none, interval 1s",
            std::env::var("DAEMON_RSS_BIN").unwrap_or_else(|_| "connector".into())
        );
        for users in [0, 100_000] {
            let (least, most, hwm, synced) = measure(users).await;
            println!(
                "daemon_rss: {NODES} x {users:>7} users: VmRSS between syncs {:>6.1} MiB, during {:>6.1} MiB, VmHWM {:>6.1} MiB, first sync of all nodes {:?}{}",
                least as f64 / 1024.0,
                most as f64 / 1024.0,
                hwm as f64 / 1024.0,
                synced,
                if users == 0 { "  (baseline)" } else { "" }
            );
        }
    });
}
