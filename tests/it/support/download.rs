//! A long download through a client core's socks5 port, read on a thread of its own:
//! how many bytes arrived (checked to be the target's `x`s) and how it ended. What the
//! ban tests watch to see a connection cut, or left alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deadline of waits for traffic: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);

/// A long download read on a thread of its own: its bytes (checked to be the target's
/// `x`s, byte for byte) and how it ended.
pub struct Download {
    pub name: String,
    state: Arc<Mutex<DlState>>,
}

#[derive(Default)]
struct DlState {
    bytes: u64,
    /// A byte that was not the target's.
    wrong: bool,
    ended: Option<(Instant, Result<(), String>)>,
}

impl Download {
    pub fn start(name: &str, socks: SocketAddr, url: String) -> Download {
        let state = Arc::new(Mutex::new(DlState::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let got = rt.block_on(async {
                let proxy =
                    reqwest::Proxy::all(format!("socks5h://{socks}")).map_err(|e| e.to_string())?;
                let client = reqwest::Client::builder()
                    .proxy(proxy)
                    .pool_max_idle_per_host(0)
                    .build()
                    .map_err(|e| e.to_string())?;
                let mut resp = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                if !resp.status().is_success() {
                    return Err(format!("answered {}", resp.status()));
                }
                while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{e:?}"))? {
                    let mut g = s.lock().unwrap();
                    g.bytes += chunk.len() as u64;
                    g.wrong |= chunk.iter().any(|&b| b != b'x');
                }
                Ok(())
            });
            s.lock().unwrap().ended = Some((Instant::now(), got));
        });
        Download {
            name: name.to_string(),
            state,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap().bytes
    }

    pub fn ended(&self) -> Option<(Instant, Result<(), String>)> {
        self.state.lock().unwrap().ended.clone()
    }

    /// Waits until `n` more bytes arrived; panics if it ends or stalls first.
    #[track_caller]
    pub fn wait_flowing(&self, n: u64) {
        let (t, from) = (Instant::now(), self.bytes());
        while self.bytes() < from + n {
            if let Some((_, how)) = self.ended() {
                panic!(
                    "{}: ended ({how:?}) after {} bytes",
                    self.name,
                    self.bytes()
                );
            }
            assert!(
                t.elapsed() < WAIT,
                "{}: stalled at {}",
                self.name,
                self.bytes()
            );
            // Polling a counter another thread advances.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the end; when and how.
    #[track_caller]
    pub fn wait_end(&self, within: Duration) -> (Instant, Result<(), String>) {
        let t = Instant::now();
        loop {
            if let Some(e) = self.ended() {
                return e;
            }
            assert!(
                t.elapsed() < within,
                "{}: still running after {within:?} ({} bytes)",
                self.name,
                self.bytes()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the whole body: `chunks` KiB, every byte the target's.
    #[track_caller]
    pub fn wait_complete(&self, chunks: u64) {
        let (_, how) = self.wait_end(WAIT * 2);
        let g = self.state.lock().unwrap();
        assert_eq!(
            how,
            Ok(()),
            "{}: did not complete ({} bytes)",
            self.name,
            g.bytes
        );
        assert_eq!(g.bytes, chunks * 1024, "{}: not the whole body", self.name);
        assert!(!g.wrong, "{}: a byte that is not the target's", self.name);
    }
}
