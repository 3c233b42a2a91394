//! Serving the HTTP listener's routes ([`super::http`]) under limits, so that clients
//! that connect and then send nothing, or send a request slowly, cannot take the
//! daemon's file descriptors or memory (SPEC §4 "Faults the agent survives").
//!
//! - **Connections**: at most `http.max_connections` are served at once. A connection
//!   over the limit closes the oldest connection that has no request in progress (an
//!   idle keep-alive or one whose headers have not all arrived), so a health probe
//!   still gets in while idle clients hold every slot; when every connection has a
//!   request in progress, accepting waits and the kernel's backlog holds the rest.
//! - **Header timeout** (`http.header_timeout`): hyper's HTTP/1 `header_read_timeout`:
//!   a request's headers must arrive within it, from the connection's opening or the
//!   end of the previous answer. It is also how long an idle keep-alive connection is
//!   kept.
//! - **Idle timeout** (`http.idle_timeout`): a read or a write that makes no progress
//!   for that long closes the connection (a body that stops arriving, a client that
//!   does not read its answer).
//! - **File descriptors**: [`raise_fd_limit`] lifts the soft open-file limit to the
//!   hard one at start, and [`connection_limit`] keeps `max_connections` well below
//!   it, so the queue, the admin socket and the peers always have descriptors.
//! - **Shutdown**: accepting stops at once; connections with nothing of a request
//!   received are closed; a request in progress, or whose headers are still arriving,
//!   is answered (the routes still work: the queue is open until the listener has
//!   stopped), with `Connection: close`; whatever is still open at `shutdown_timeout`
//!   is dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Descriptors kept for everything but HTTP connections: the queue's files, the admin
/// socket and its clients, the panel's and relays' connections, the hooks' pipes.
const FD_RESERVE: u64 = 256;

/// How long accepting pauses after an error (a full descriptor table, say), so a
/// persistent error does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often shutdown looks for connections that have become quiet.
const SHUTDOWN_LOOK: Duration = Duration::from_millis(50);

/// The listener's limits (`[http]`), and how long shutdown waits for requests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The `[http]` keys, and the daemon's `shutdown_timeout`.
    pub fn new(http: &crate::config::Http, shutdown_timeout: Duration) -> Limits {
        Limits {
            max_connections: http.max_connections,
            header_timeout: http.header_timeout,
            idle_timeout: http.idle_timeout,
            shutdown_timeout,
        }
    }
}

/// Raises the soft open-file limit (RLIMIT_NOFILE) to the hard limit; returns the soft
/// limit now in force, or `None` when it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // An unlimited hard limit is refused for RLIMIT_NOFILE (the kernel's
            // nr_open caps it): then the soft limit stays as it was.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        Some(lim.rlim_cur)
    }
}

/// `max_connections`, lowered (with a warning) when it would leave fewer than
/// [`FD_RESERVE`] descriptors of the open-file limit `fd_limit` to the rest of the daemon.
pub fn connection_limit(max_connections: usize, fd_limit: Option<u64>) -> usize {
    let Some(fds) = fd_limit else {
        return max_connections;
    };
    let room = fds.saturating_sub(FD_RESERVE).max(fds / 2).max(1);
    if max_connections as u64 <= room {
        return max_connections;
    }
    let lowered = usize::try_from(room).unwrap_or(max_connections);
    tracing::warn!(
        configured = max_connections,
        using = lowered,
        open_file_limit = fds,
        "http.max_connections leaves too few file descriptors under the open-file limit; using less (raise LimitNOFILE / ulimit -n, or lower http.max_connections)"
    );
    lowered
}

/// Serves `router` on `listener` under `limits` until `stop`, then shuts down as the
/// module says.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Open::default());
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    let mut saturated = false;
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "http listener: cannot accept a connection");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => {
                saturated = false;
                p
            }
            Err(_) => {
                if !saturated {
                    // Once per episode: a flood would otherwise log a line per connection.
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "http listener at http.max_connections: closing idle connections to make room"
                    );
                    saturated = true;
                }
                open.close_oldest_idle();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let id = next_id;
        next_id += 1;
        let slot = open.insert(id);
        let mut io = tokio_io_timeout::TimeoutStream::new(tcp);
        io.set_read_timeout(Some(limits.idle_timeout));
        io.set_write_timeout(Some(limits.idle_timeout));
        let io = Counted {
            inner: Box::pin(io),
            read: slot.read.clone(),
        };
        let (router, served, stopping) = (router.clone(), slot.clone(), stop.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (router, stopping) = (router.clone(), stopping.clone());
            let busy = Busy::enter(&served);
            async move {
                let _busy = busy;
                let mut answer = router.oneshot(req).await?;
                if stopping.is_cancelled() {
                    // The last answer on this connection: the client opens a new one
                    // (to the next run) rather than sending into one being closed.
                    answer
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(answer)
            }
        });
        let conn = http.serve_connection(TokioIo::new(io), service);
        let open = open.clone();
        conns.spawn(async move {
            let _permit = permit;
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                _ = slot.close.cancelled() => {
                    tracing::debug!("idle http connection closed");
                }
            }
            open.remove(id);
        });
    }
    // No more accepting: connections still in the backlog are refused from here on.
    drop(listener);
    let deadline = tokio::time::Instant::now() + limits.shutdown_timeout;
    loop {
        // A connection turns quiet (its answer written, nothing more sent) without
        // telling anyone: look again every SHUTDOWN_LOOK.
        open.close_quiet();
        if conns.is_empty() {
            break;
        }
        tokio::select! {
            Some(_) = conns.join_next() => {}
            _ = tokio::time::sleep(SHUTDOWN_LOOK) => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    timeout = %humantime::format_duration(limits.shutdown_timeout),
                    open = conns.len(),
                    "http requests still in progress at the shutdown timeout were dropped"
                );
                break;
            }
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// A connection's stream, counting the bytes read from it (see [`Slot::quiet`]).
struct Counted<S> {
    inner: Pin<Box<S>>,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::AcqRel);
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Open {
    slots: Mutex<BTreeMap<u64, Slot>>,
}

#[derive(Clone, Default)]
struct Slot {
    /// Requests of this connection in progress.
    busy: Arc<AtomicUsize>,
    /// Bytes read from the connection so far.
    read: Arc<AtomicU64>,
    /// `read` when its last request's answer was ready (0 before the first).
    read_at_rest: Arc<AtomicU64>,
    /// Cancelled to close the connection.
    close: CancellationToken,
}

impl Slot {
    fn idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0 && !self.close.is_cancelled()
    }

    /// Idle, and nothing of a next request has arrived: closing it loses nobody's
    /// request. (A client that has sent half a request is not quiet: at shutdown it
    /// gets to finish it, within the header timeout, and have its answer.)
    fn quiet(&self) -> bool {
        self.idle()
            && self.read.load(Ordering::Acquire) == self.read_at_rest.load(Ordering::Acquire)
    }
}

impl Open {
    fn insert(&self, id: u64) -> Slot {
        let slot = Slot::default();
        self.lock().insert(id, slot.clone());
        slot
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the oldest connection with no request in progress, if any.
    fn close_oldest_idle(&self) {
        if let Some(slot) = self.lock().values().find(|s| s.idle()) {
            slot.close.cancel();
        }
    }

    /// Closes every quiet connection.
    fn close_quiet(&self) {
        for slot in self.lock().values().filter(|s| s.quiet()) {
            slot.close.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Slot>> {
        // The map stays consistent whatever panicked while holding it.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request in progress, counted while it lives.
struct Busy(Slot);

impl Busy {
    fn enter(slot: &Slot) -> Busy {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Whatever was read up to its answer belonged to it (head and body).
        let read = self.0.read.load(Ordering::Acquire);
        self.0.read_at_rest.store(read, Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_leaves_room_for_the_daemon() {
        assert_eq!(connection_limit(1024, None), 1024);
        assert_eq!(connection_limit(1024, Some(65536)), 1024);
        assert_eq!(connection_limit(1024, Some(1024)), 768);
        // A tiny limit: half of it.
        assert_eq!(connection_limit(1024, Some(300)), 150);
    }

    #[test]
    fn the_oldest_idle_connection_is_closed_first() {
        let open = Open::default();
        let a = open.insert(1);
        let b = open.insert(2);
        let c = open.insert(3);
        let _busy = Busy::enter(&a);
        open.close_oldest_idle();
        assert!(
            !a.close.is_cancelled(),
            "a request in progress is never closed"
        );
        assert!(b.close.is_cancelled());
        assert!(!c.close.is_cancelled());
        open.close_oldest_idle();
        assert!(c.close.is_cancelled());
        open.remove(2);
        open.remove(3);
        open.close_oldest_idle();
        assert!(!a.close.is_cancelled());
    }

    #[test]
    fn at_shutdown_only_connections_with_nothing_pending_are_closed() {
        let open = Open::default();
        let silent = open.insert(1);
        let half_sent = open.insert(2);
        let answered = open.insert(3);
        let in_progress = open.insert(4);
        half_sent.read.store(30, Ordering::Release);
        answered.read.store(80, Ordering::Release);
        drop(Busy::enter(&answered));
        in_progress.read.store(80, Ordering::Release);
        let _busy = Busy::enter(&in_progress);
        open.close_quiet();
        assert!(silent.close.is_cancelled());
        assert!(answered.close.is_cancelled());
        assert!(!half_sent.close.is_cancelled());
        assert!(!in_progress.close.is_cancelled());
    }
}
