//! Where `queuectl`'s answers come from: the running daemon, over its admin socket, or
//! the database, opened by `queuectl` itself when no daemon runs. Both run the same
//! operations ([`crate::admin::ops`]) and hand back the same messages, which one
//! renderer per subcommand prints: output is the same either way.
//!
//! Finding the queue: the socket is `--socket`, else `[admin] socket` of the config,
//! else `{data_dir}/admin.sock`. If a daemon answers there (a `Hello` within
//! [`HELLO_TIMEOUT`]), the daemon it is. Otherwise the database at `{data_dir}/queue` is
//! opened; if another process holds it (a daemon whose socket is elsewhere, or that does
//! not answer), that is [`Failure::Locked`], exit code 3. Either way one line on stderr
//! says which was used.
//!
//! Adding a command: one method here with its two arms (see `src/admin/mod.rs`).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Response, Status, Streaming};

use super::Failure;
use crate::admin::ops::{self, Ctx};
use crate::admin::pb::{self, admin_client::AdminClient};
use crate::config::Config;
use crate::queue::{self, Clock, Queue, SystemClock};

/// How long a daemon has to answer `Hello` before it counts as not answering.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message accepted from the daemon (one job with a large payload).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The daemon, or the database.
pub(crate) enum Backend {
    Local(Ctx),
    Live(Live),
}

pub(crate) struct Live {
    client: AdminClient<Channel>,
    socket: PathBuf,
    /// The daemon's connector version (from `Hello`), for "does not know" errors.
    version: String,
}

/// What a command needs from [`find`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// The daemon, or else the database.
    Either,
    /// The daemon only, for the reason given (`tail`: events exist only in a running
    /// process; `workers`, `pause`, `resume`: so do the worker pools).
    Daemon(&'static str),
    /// As [`Need::Either`], but a database that lost writes is opened anyway and the
    /// loss recorded (`accept-loss`).
    AcceptLoss,
}

/// Finds the queue (see the module doc) and says on stderr which one it uses.
pub(crate) async fn find(
    config: Config,
    socket_flag: Option<PathBuf>,
    need: Need,
) -> Result<Backend, Failure> {
    let socket = socket_flag.unwrap_or_else(|| config.admin_socket());
    let not_live = match connect(&socket).await {
        Ok(live) => {
            eprintln!("queuectl: daemon at {}", socket.display());
            return Ok(Backend::Live(live));
        }
        Err(NotLive::Refused(e)) => return Err(Failure::Other(e)),
        Err(NotLive::Absent) => "no daemon running".to_string(),
        Err(NotLive::Silent(why)) => {
            format!("the daemon at {} does not answer: {why}", socket.display())
        }
    };
    if let Need::Daemon(why) = need {
        return Err(Failure::Other(anyhow!(
            "{why}, but {not_live} (admin socket {}); start connector, or pass --socket if its socket is elsewhere",
            socket.display()
        )));
    }
    let queue = open_queue(&config, need == Need::AcceptLoss, &socket, &not_live)?;
    eprintln!(
        "queuectl: database at {} ({not_live})",
        queue.path().display()
    );
    Ok(Backend::Local(Ctx {
        queue,
        config: Arc::new(config),
        pools: None,
    }))
}

/// For commands that must not run beside a daemon (`salvage`): an error when one
/// answers on the socket.
pub(crate) async fn refuse_live(
    config: &Config,
    socket_flag: Option<PathBuf>,
) -> Result<(), Failure> {
    let socket = socket_flag.unwrap_or_else(|| config.admin_socket());
    match connect(&socket).await {
        Ok(_) => Err(Failure::Busy(format!(
            "the connector daemon is running (admin socket {}): salvage works only on a stopped queue; stop connector first",
            socket.display()
        ))),
        Err(NotLive::Refused(e)) => Err(Failure::Other(e)),
        Err(NotLive::Absent | NotLive::Silent(_)) => Ok(()),
    }
}

/// Why no daemon is used.
enum NotLive {
    /// Nothing listens at the socket path.
    Absent,
    /// Something listens but does not answer `Hello` (hung, or not a connector).
    Silent(String),
    /// Connecting was refused in a way the operator must see (permissions).
    Refused(anyhow::Error),
}

/// What answers on an admin socket (`connector doctor` asks without using it further).
pub(crate) enum Answer {
    /// A daemon answered `Hello`.
    Daemon(pb::HelloReply),
    /// Nothing listens at the path.
    Absent,
    /// Something listens but does not answer `Hello`, or connecting was refused: why.
    NotAnswering(String),
}

/// Says `Hello` to whatever listens at `socket`.
pub(crate) async fn hello(socket: &Path) -> Answer {
    match hello_client(socket).await {
        Ok((_, hello)) => Answer::Daemon(hello),
        Err(NotLive::Absent) => Answer::Absent,
        Err(NotLive::Silent(why)) => Answer::NotAnswering(why),
        Err(NotLive::Refused(e)) => Answer::NotAnswering(format!("{e:#}")),
    }
}

async fn connect(socket: &Path) -> Result<Live, NotLive> {
    let (client, hello) = hello_client(socket).await?;
    Ok(Live {
        client,
        socket: socket.to_path_buf(),
        version: hello.version,
    })
}

async fn hello_client(socket: &Path) -> Result<(AdminClient<Channel>, pb::HelloReply), NotLive> {
    // A first connection of our own, to tell "nothing there" from "not allowed".
    match tokio::net::UnixStream::connect(socket).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(NotLive::Absent);
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(NotLive::Refused(anyhow!(
                "cannot connect to the admin socket {}: permission denied (it is mode 0600: run queuectl as the user the daemon runs as)",
                socket.display()
            )));
        }
        Err(e) => {
            return Err(NotLive::Refused(anyhow!(
                "cannot connect to the admin socket {}: {e}",
                socket.display()
            )));
        }
    }
    let path = socket.to_path_buf();
    // The URI is required by tonic and never used: every connection is this socket.
    let channel =
        Endpoint::from_static("http://admin.sock")
            .connect_timeout(HELLO_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .map_err(|e| NotLive::Silent(format!("{e}")))?;
    let mut client = AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, client.hello(pb::HelloRequest {}))
        .await
        .map_err(|_| NotLive::Silent(format!("no answer within {}s", HELLO_TIMEOUT.as_secs())))?
        .map_err(|s| NotLive::Silent(s.message().to_string()))?
        .into_inner();
    tracing::debug!(pid = hello.pid, version = %hello.version, queue = %hello.queue_path, "daemon answered");
    Ok((client, hello))
}

/// Opens the existing queue; never creates one.
fn open_queue(
    config: &Config,
    accept_lost_writes: bool,
    socket: &Path,
    not_live: &str,
) -> Result<Queue, Failure> {
    let path = config.queue_path();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Failure::NoQueue(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Failure::NoQueue(path)),
        Err(e) => {
            return Err(Failure::Other(
                anyhow::Error::new(e).context(format!("cannot read {}", path.display())),
            ));
        }
    }
    match Queue::open_with(
        &path,
        config.queue.clone(),
        Arc::new(SystemClock),
        accept_lost_writes,
    ) {
        Ok((queue, recovery)) => {
            if recovery.interrupted > 0 {
                tracing::warn!(
                    interrupted = recovery.interrupted,
                    went_dead = recovery.exhausted,
                    "jobs left running by a stopped daemon are pending again (the interrupted attempt counts)"
                );
            }
            Ok(queue)
        }
        Err(queue::Error::Locked { path }) => Err(Failure::Locked {
            path,
            socket: socket.to_path_buf(),
            why: not_live.to_string(),
        }),
        Err(e @ queue::Error::Damaged { .. }) => Err(Failure::Damaged(e)),
        Err(e) => Err(Failure::Other(e.into())),
    }
}

impl Live {
    /// A failed call as the line `queuectl` prints: the daemon's own error message, or
    /// what went wrong with the connection.
    fn error(&self, s: Status) -> anyhow::Error {
        match s.code() {
            Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument | Code::Internal => {
                anyhow!("{}", s.message())
            }
            Code::Unimplemented => anyhow!(
                "the daemon at {} (connector {}) does not know this command; this queuectl is {}: restart the daemon with the same version",
                self.socket.display(),
                self.version,
                env!("CARGO_PKG_VERSION")
            ),
            _ => anyhow!(
                "the daemon at {} stopped answering: {}",
                self.socket.display(),
                s.message()
            ),
        }
    }
}

fn local_error(s: Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

impl Backend {
    /// A read: `local` on the open database, or `live` on the daemon.
    async fn read<Req, Rep, Fut>(
        &self,
        req: Req,
        local: fn(Ctx, Req) -> ops::Result<Rep>,
        live: impl FnOnce(AdminClient<Channel>, Req) -> Fut,
    ) -> anyhow::Result<Rep>
    where
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        match self {
            Backend::Local(ctx) => local(ctx.clone(), req).map_err(local_error),
            Backend::Live(l) => live(l.client.clone(), req)
                .await
                .map(Response::into_inner)
                .map_err(|s| l.error(s)),
        }
    }

    /// A write: as [`Backend::read`], but the local operation waits for its flush.
    async fn write<Req, Rep, F, Fut>(
        &self,
        req: Req,
        local: fn(Ctx, Req) -> F,
        live: impl FnOnce(AdminClient<Channel>, Req) -> Fut,
    ) -> anyhow::Result<Rep>
    where
        F: Future<Output = ops::Result<Rep>>,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        match self {
            Backend::Local(ctx) => local(ctx.clone(), req).await.map_err(local_error),
            Backend::Live(l) => live(l.client.clone(), req)
                .await
                .map(Response::into_inner)
                .map_err(|s| l.error(s)),
        }
    }

    /// Reads a server stream to its end, one call of `each` per item.
    async fn drain<T>(
        &self,
        l: &Live,
        stream: Result<Response<Streaming<T>>, Status>,
        mut each: impl FnMut(T) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut stream = stream.map_err(|s| l.error(s))?.into_inner();
        while let Some(item) = stream.message().await.map_err(|s| l.error(s))? {
            each(item)?;
        }
        Ok(())
    }

    pub(crate) async fn stats(&self) -> anyhow::Result<pb::StatsReply> {
        self.read(pb::StatsRequest {}, ops::stats, |mut c, r| async move {
            c.stats(r).await
        })
        .await
    }

    pub(crate) async fn list(&self, req: pb::ListRequest) -> anyhow::Result<Vec<pb::Job>> {
        match self {
            Backend::Local(ctx) => ops::list(ctx.clone(), req).map_err(local_error),
            Backend::Live(l) => {
                let mut jobs = Vec::new();
                let stream = l.client.clone().list(req).await;
                self.drain(l, stream, |j| {
                    jobs.push(j);
                    Ok(())
                })
                .await?;
                Ok(jobs)
            }
        }
    }

    pub(crate) async fn quarantined(&self) -> anyhow::Result<pb::QuarantinedReply> {
        self.read(
            pb::QuarantinedRequest {},
            ops::quarantined,
            |mut c, r| async move { c.quarantined(r).await },
        )
        .await
    }

    pub(crate) async fn show(&self, id: u64) -> anyhow::Result<pb::Job> {
        self.read(pb::JobId { id }, ops::show, |mut c, r| async move {
            c.show(r).await
        })
        .await
    }

    pub(crate) async fn retry(&self, id: u64) -> anyhow::Result<pb::Job> {
        self.write(pb::JobId { id }, ops::retry, |mut c, r| async move {
            c.retry(r).await
        })
        .await
    }

    pub(crate) async fn retry_dead(
        &self,
        req: pb::RetryDeadRequest,
    ) -> anyhow::Result<pb::RetryDeadReply> {
        self.write(req, ops::retry_dead, |mut c, r| async move {
            c.retry_dead(r).await
        })
        .await
    }

    pub(crate) async fn cancel(&self, id: u64) -> anyhow::Result<pb::Job> {
        self.write(pb::JobId { id }, ops::cancel, |mut c, r| async move {
            c.cancel(r).await
        })
        .await
    }

    pub(crate) async fn purge(&self, req: pb::PurgeRequest) -> anyhow::Result<pb::PurgeReply> {
        self.write(req, ops::purge, |mut c, r| async move { c.purge(r).await })
            .await
    }

    /// Every job in id order, one call of `each` per job; a broken pipe from `each`
    /// ends the export quietly.
    pub(crate) async fn export(
        &self,
        mut each: impl FnMut(pb::Job) -> io::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Backend::Local(ctx) => ops::export(ctx.clone(), each).map_err(local_error),
            Backend::Live(l) => {
                let stream = l.client.clone().export(pb::ExportRequest {}).await;
                let r = self
                    .drain(l, stream, |job| each(job).map_err(anyhow::Error::new))
                    .await;
                match r {
                    Err(e) if super::is_broken_pipe(&e) => Ok(()),
                    other => other,
                }
            }
        }
    }

    pub(crate) async fn held(&self) -> anyhow::Result<pb::HeldReply> {
        self.read(pb::HeldRequest {}, ops::held, |mut c, r| async move {
            c.held(r).await
        })
        .await
    }

    pub(crate) async fn confirm(&self, node_id: u64) -> anyhow::Result<pb::ConfirmReply> {
        self.write(
            pb::ConfirmRequest { node_id },
            ops::confirm,
            |mut c, r| async move { c.confirm(r).await },
        )
        .await
    }

    pub(crate) async fn bans(&self) -> anyhow::Result<pb::BansReply> {
        self.read(pb::BansRequest {}, ops::bans, |mut c, r| async move {
            c.bans(r).await
        })
        .await
    }

    pub(crate) async fn traffic(&self) -> anyhow::Result<pb::TrafficReply> {
        self.read(pb::TrafficRequest {}, ops::traffic, |mut c, r| async move {
            c.traffic(r).await
        })
        .await
    }

    pub(crate) async fn relays(&self) -> anyhow::Result<crate::jobs::webhook::stats::Report> {
        let r = self
            .read(pb::RelaysRequest {}, ops::relays, |mut c, r| async move {
                c.relays(r).await
            })
            .await?;
        serde_json::from_str(&r.report_json)
            .map_err(|e| anyhow::anyhow!("the relay stats do not decode: {e}"))
    }

    pub(crate) async fn fsck(&self, repair: bool) -> anyhow::Result<pb::FsckReport> {
        self.write(
            pb::FsckRequest { repair },
            ops::fsck,
            |mut c, r| async move { c.fsck(r).await },
        )
        .await
    }

    pub(crate) async fn workers(&self) -> anyhow::Result<pb::WorkersReply> {
        self.read(pb::WorkersRequest {}, ops::workers, |mut c, r| async move {
            c.workers(r).await
        })
        .await
    }

    pub(crate) async fn pause(&self, kind: &str, paused: bool) -> anyhow::Result<pb::WorkersReply> {
        let req = pb::PauseRequest {
            kind: kind.to_string(),
            paused,
        };
        self.write(req, ops::pause, |mut c, r| async move { c.pause(r).await })
            .await
    }

    /// Job events as they happen, until the daemon stops; `each` gets every one.
    pub(crate) async fn tail(
        &self,
        each: impl FnMut(pb::TailEvent) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            // `find` with `Need::Daemon` never returns a local backend.
            Backend::Local(_) => Err(anyhow!("tail needs a running daemon")),
            Backend::Live(l) => {
                let stream = l.client.clone().tail(pb::TailRequest {}).await;
                self.drain(l, stream, each).await
            }
        }
    }

    /// The clock answers are rendered against: this machine's, which is the daemon's
    /// too (a Unix socket does not leave the host).
    pub(crate) fn now(&self) -> queue::Millis {
        match self {
            Backend::Local(ctx) => ctx.queue.now(),
            Backend::Live(_) => SystemClock.now_ms(),
        }
    }
}
