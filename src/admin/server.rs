//! The daemon's side of the admin API: the socket, and the service that dispatches each
//! method to [`ops`](super::ops).
//!
//! The socket's life: at start, a socket file nobody answers on (left by a daemon that
//! was killed) is replaced; one that answers belongs to another daemon, and this one
//! refuses to start; anything else at that path is left alone and refused. The new
//! socket is bound inside a fresh private directory (0700), made 0600, and renamed into
//! place, so it is never reachable with wider permissions (no process-wide umask is
//! changed: other threads may be creating files). At a clean stop, the file is removed
//! if it is still the one this daemon bound.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc};

use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::ops::{self, Ctx};
use super::{convert, pb};

/// How long a stop waits for calls in flight (an export, a repair) before cutting them.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error(
        "another connector daemon is answering on the admin socket {0}; stop it, or give this one another [admin] socket"
    )]
    Taken(PathBuf),
    #[error("{0} exists and is not a socket; not replacing it (remove it, or set [admin] socket)")]
    NotASocket(PathBuf),
    #[error("cannot create the admin socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The admin API's socket. The serving itself is a future ([`Serving`]) the daemon runs
/// as one of its supervised tasks; [`Server::stop`] makes it end, [`Server::close`]
/// removes the socket once it has.
pub(crate) struct Server {
    path: PathBuf,
    /// (device, inode) of the socket this daemon bound: only that file is removed.
    ino: (u64, u64),
    stop: CancellationToken,
}

/// Serves the admin API until [`Server::stop`].
pub(crate) type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

impl Server {
    /// Binds the socket at `path`; the returned future serves `ctx` until [`Server::stop`].
    pub(crate) fn start(ctx: Ctx, path: &Path) -> Result<(Server, Serving), ServeError> {
        let listener = bind(path)?;
        let ino = std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| ServeError::Io {
                path: path.to_path_buf(),
                what: "cannot read it back",
                source,
            })?;
        let stop = CancellationToken::new();
        let service = Service {
            ctx,
            stop: stop.clone(),
        };
        let serving = Box::pin(
            tonic::transport::Server::builder()
                .add_service(pb::admin_server::AdminServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        tracing::info!(socket = %path.display(), "admin socket open (queuectl works while the daemon runs)");
        Ok((
            Server {
                path: path.to_path_buf(),
                ino,
                stop,
            },
            serving,
        ))
    }

    /// Stops serving: open `tail` streams end; calls in flight get [`STOP_GRACE`] from
    /// the daemon before they are cut.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// Removes the socket, once serving has ended.
    pub(crate) fn close(self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the admin socket");
        }
    }
}

/// Binds a fresh socket at `path` with mode 0600 (see the module doc).
fn bind(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let io_err = |what| {
        move |source| ServeError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::Taken(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::warn!(socket = %path.display(), "replacing a stale admin socket (its daemon is gone)");
            }
            Err(e) => return Err(io_err("cannot tell whether a daemon answers on it")(e)),
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot look at the path")(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Short names: a socket path is limited to 107 bytes.
    let private = tempfile::Builder::new()
        .prefix(".adm")
        .rand_bytes(6)
        .tempdir_in(parent)
        .map_err(io_err("cannot create a private directory beside it"))?;
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot make the private directory 0700"))?;
    let tmp = private.path().join("s");
    let listener =
        std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("cannot bind it"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot make it 0600"))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot move it into place"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("cannot make it non-blocking"))?;
    tokio::net::UnixListener::from_std(listener).map_err(io_err("cannot register it"))
}

/// The service: each method hands its request to [`ops`].
struct Service {
    ctx: Ctx,
    /// Cancelled when the daemon stops: ends `tail` streams, which never end otherwise.
    stop: CancellationToken,
}

type Reply<T> = Result<Response<T>, Status>;
type Stream<T> = ReceiverStream<Result<T, Status>>;

impl Service {
    /// A read that scans the database: on a blocking thread, so a large queue does not
    /// stall the daemon's workers.
    async fn blocking<Req, Rep>(
        &self,
        req: Request<Req>,
        op: fn(Ctx, Req) -> ops::Result<Rep>,
    ) -> Reply<Rep>
    where
        Req: Send + 'static,
        Rep: Send + 'static,
    {
        let ctx = self.ctx.clone();
        let req = req.into_inner();
        tokio::task::spawn_blocking(move || op(ctx, req))
            .await
            .map_err(|e| Status::internal(format!("the operation failed: {e}")))?
            .map(Response::new)
    }

    /// An operation that writes and waits for its flush.
    async fn unary<Req, Rep, F>(&self, req: Request<Req>, op: fn(Ctx, Req) -> F) -> Reply<Rep>
    where
        F: Future<Output = ops::Result<Rep>>,
    {
        op(self.ctx.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    /// Streams what `produce` sends, produced on a blocking thread. A client that goes
    /// away closes the channel, and `produce` then stops at its next send.
    fn stream<T: Send + 'static>(
        &self,
        produce: impl FnOnce(Ctx, &mpsc::Sender<Result<T, Status>>) -> ops::Result<()> + Send + 'static,
    ) -> Reply<Stream<T>> {
        let (tx, rx) = mpsc::channel(64);
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(status) = produce(ctx, &tx) {
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends one streamed item from a blocking thread; a gone client reads as a broken pipe.
fn send<T>(tx: &mpsc::Sender<Result<T, Status>>, item: T) -> io::Result<()> {
    tx.blocking_send(Ok(item))
        .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Service {
    async fn hello(&self, r: Request<pb::HelloRequest>) -> Reply<pb::HelloReply> {
        self.blocking(r, ops::hello).await
    }

    async fn stats(&self, r: Request<pb::StatsRequest>) -> Reply<pb::StatsReply> {
        self.blocking(r, ops::stats).await
    }

    type ListStream = Stream<pb::Job>;
    async fn list(&self, r: Request<pb::ListRequest>) -> Reply<Self::ListStream> {
        let req = r.into_inner();
        self.stream(move |ctx, tx| {
            for job in ops::list(ctx, req)? {
                if send(tx, job).is_err() {
                    break;
                }
            }
            Ok(())
        })
    }

    async fn quarantined(&self, r: Request<pb::QuarantinedRequest>) -> Reply<pb::QuarantinedReply> {
        self.blocking(r, ops::quarantined).await
    }

    async fn show(&self, r: Request<pb::JobId>) -> Reply<pb::Job> {
        self.blocking(r, ops::show).await
    }

    async fn retry(&self, r: Request<pb::JobId>) -> Reply<pb::Job> {
        self.unary(r, ops::retry).await
    }

    async fn retry_dead(&self, r: Request<pb::RetryDeadRequest>) -> Reply<pb::RetryDeadReply> {
        self.unary(r, ops::retry_dead).await
    }

    async fn cancel(&self, r: Request<pb::JobId>) -> Reply<pb::Job> {
        self.unary(r, ops::cancel).await
    }

    async fn purge(&self, r: Request<pb::PurgeRequest>) -> Reply<pb::PurgeReply> {
        self.unary(r, ops::purge).await
    }

    type ExportStream = Stream<pb::Job>;
    async fn export(&self, _: Request<pb::ExportRequest>) -> Reply<Self::ExportStream> {
        self.stream(|ctx, tx| ops::export(ctx, |job| send(tx, job)))
    }

    async fn held(&self, r: Request<pb::HeldRequest>) -> Reply<pb::HeldReply> {
        self.blocking(r, ops::held).await
    }

    async fn confirm(&self, r: Request<pb::ConfirmRequest>) -> Reply<pb::ConfirmReply> {
        self.unary(r, ops::confirm).await
    }

    async fn bans(&self, r: Request<pb::BansRequest>) -> Reply<pb::BansReply> {
        self.blocking(r, ops::bans).await
    }

    async fn traffic(&self, r: Request<pb::TrafficRequest>) -> Reply<pb::TrafficReply> {
        self.blocking(r, ops::traffic).await
    }

    async fn relays(&self, r: Request<pb::RelaysRequest>) -> Reply<pb::RelaysReply> {
        self.blocking(r, ops::relays).await
    }

    type TailStream = Stream<pb::TailEvent>;
    async fn tail(&self, _: Request<pb::TailRequest>) -> Reply<Self::TailStream> {
        let mut events = self.ctx.queue.subscribe();
        let queue = self.ctx.queue.clone();
        let stop = self.stop.clone();
        // Room for a burst; a client slower than that is told how much it missed.
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            use pb::tail_event::What;
            loop {
                let what = tokio::select! {
                    _ = stop.cancelled() => Some(What::Stopping(pb::Empty {})),
                    _ = tx.closed() => return,
                    e = events.recv() => match e {
                        Ok(e) => Some(What::Job(convert::event(&e))),
                        Err(broadcast::error::RecvError::Lagged(n)) => Some(What::Lagged(n)),
                        Err(broadcast::error::RecvError::Closed) => None,
                    },
                };
                let stopping = matches!(what, Some(What::Stopping(_)) | None);
                let event = pb::TailEvent {
                    at_ms: queue.now(),
                    what: Some(what.unwrap_or(What::Stopping(pb::Empty {}))),
                };
                if tx.send(Ok(event)).await.is_err() || stopping {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fsck(&self, r: Request<pb::FsckRequest>) -> Reply<pb::FsckReport> {
        self.unary(r, ops::fsck).await
    }

    async fn workers(&self, r: Request<pb::WorkersRequest>) -> Reply<pb::WorkersReply> {
        self.blocking(r, ops::workers).await
    }

    async fn pause(&self, r: Request<pb::PauseRequest>) -> Reply<pb::WorkersReply> {
        self.unary(r, ops::pause).await
    }
}
