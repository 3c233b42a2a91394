//! The cut (`xray.cut_connections`): right after the core confirmed a removal, destroy
//! the removed users' established TCP connections, so their open downloads and their
//! mux sessions end (a mux client's next session must authenticate again, and is
//! refused).
//!
//! Which sockets: a kernel dump (sock_diag) of the established TCP sockets whose local
//! port is the node's inbound port (Xray's `ListInbounds`, else `[[nodes]] port`), and of
//! those exactly the ones whose remote address the access log tied to a removed email
//! ([`super::connections`]): exact 4-tuples, never every connection from an IP. The log
//! is read to its end first, so a connection logged a moment ago is known.
//!
//! Only users the agent removes are cut (config-file users are never tracked), and only
//! at their removal: a user added again is not cut.
//!
//! Degrades loudly, never harms: without `CAP_NET_ADMIN` (EPERM) or on a kernel without
//! `CONFIG_INET_DIAG_DESTROY` (EOPNOTSUPP) it says so once (at start: [`Cutter::probe`])
//! and in `/healthz` and the metric `connector_cut_connections_available` (0); the
//! removal itself has already happened, and the ban records why nothing was cut.
//!
//! Reads: the tracker, the kernel's socket table. Writes: the kernel's sockets (destroys),
//! metrics `connector_connections_cut_total{node}`, `connector_cut_connections_available`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::bans::Cut;
use super::connections::{LogState, Tracking};
use crate::peers::kernel::{self, KernelError};
use crate::queue::Millis;

/// Whether this process can cut connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Not probed yet.
    Unknown,
    Available,
    /// Why not (an EPERM / EOPNOTSUPP, in words).
    Unavailable(String),
}

/// Cuts removed users' connections (one per daemon, shared with the apply handler).
#[derive(Debug)]
pub struct Cutter {
    pub tracking: Arc<Tracking>,
    availability: Mutex<Availability>,
}

impl Cutter {
    pub fn new(tracking: Arc<Tracking>) -> Cutter {
        Cutter {
            tracking,
            availability: Mutex::new(Availability::Unknown),
        }
    }

    pub fn availability(&self) -> Availability {
        self.availability
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records what the kernel said; a change is logged once and published.
    fn set(&self, a: Availability) {
        let mut g = self
            .availability
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *g == a {
            return;
        }
        match &a {
            Availability::Available => {
                tracing::info!("cutting removed users' connections: on");
                metrics::gauge!("connector_cut_connections_available").set(1.0);
            }
            Availability::Unavailable(why) => {
                tracing::warn!(
                    "cutting removed users' connections is unavailable: {why}; bans still remove users, but their open connections and mux sessions run on"
                );
                metrics::gauge!("connector_cut_connections_available").set(0.0);
            }
            Availability::Unknown => {}
        }
        *g = a;
    }

    /// Tries a destroy on a connection of the process's own (blocking): says once
    /// whether cuts will work.
    pub fn probe(&self) -> Availability {
        match kernel::probe() {
            Ok(()) => self.set(Availability::Available),
            Err(e) => self.set(Availability::Unavailable(e.to_string())),
        }
        self.availability()
    }

    /// What `/healthz` shows: `on`, or why cuts do not work (the log included).
    pub fn describe(&self) -> String {
        let log = self.tracking.log_state();
        let mut parts = Vec::new();
        match self.availability() {
            Availability::Available => parts.push("on".to_string()),
            Availability::Unknown => parts.push("not probed yet".to_string()),
            Availability::Unavailable(why) => parts.push(format!("unavailable: {why}")),
        }
        if let Some(p) = log.problem(&self.tracking.log_path()) {
            parts.push(p);
        }
        parts.join("; ")
    }

    /// Cuts the established connections of `emails` (removed from node `node_id`, whose
    /// inbound listens on `ports`). Blocking (netlink, file reads): run it off the
    /// runtime's threads. One [`Cut`] per email.
    pub fn cut(
        &self,
        node_id: u64,
        ports: &[u16],
        emails: &[String],
        now: Millis,
    ) -> BTreeMap<String, Cut> {
        let note_all = |note: String| -> BTreeMap<String, Cut> {
            emails
                .iter()
                .map(|e| {
                    let cut = Cut {
                        at: now,
                        connections: 0,
                        note: note.clone(),
                    };
                    (e.clone(), cut)
                })
                .collect()
        };
        if let Availability::Unavailable(why) = self.availability() {
            return note_all(format!("not cut: {why}"));
        }
        self.tracking.catch_up();
        let sources = self.tracking.tracker.sources_of(emails);
        if ports.is_empty() {
            return note_all(
                "not cut: the inbound's port is unknown (the core cannot tell it: set [[nodes]] port)"
                    .into(),
            );
        }
        let owner: HashMap<SocketAddr, &str> = sources
            .iter()
            .flat_map(|(e, v)| v.iter().map(move |s| (*s, e.as_str())))
            .collect();
        let victims: Vec<kernel::TcpSocket> = if owner.is_empty() {
            Vec::new()
        } else {
            match kernel::established(ports) {
                Ok(all) => all
                    .into_iter()
                    .filter(|s| owner.contains_key(&s.remote))
                    .collect(),
                Err(e) => return note_all(format!("not cut: {e}")),
            }
        };
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        let mut failed: Option<KernelError> = None;
        let mut cut_sources = Vec::new();
        match kernel::destroy_all(&victims) {
            Ok(results) => {
                for (sock, r) in victims.iter().zip(results) {
                    match r {
                        Ok(()) => {
                            *counts.entry(owner[&sock.remote]).or_default() += 1;
                            cut_sources.push(sock.remote);
                        }
                        // Closed between the dump and the destroy: nothing to cut.
                        Err(KernelError::Gone) => cut_sources.push(sock.remote),
                        Err(e) => failed = Some(e),
                    }
                }
            }
            Err(e) => failed = Some(e),
        }
        if let Some(e) = &failed
            && e.is_unavailable()
        {
            self.set(Availability::Unavailable(e.to_string()));
        }
        self.tracking.tracker.forget(&cut_sources);
        let log_problem = self.tracking.log_state().problem(&self.tracking.log_path());
        let mut out = BTreeMap::new();
        let mut total = 0u64;
        for email in emails {
            let n = counts.get(email.as_str()).copied().unwrap_or(0);
            total += u64::from(n);
            let tracked = sources.get(email).map_or(0, Vec::len);
            let note = match (&failed, n, tracked) {
                (Some(e), _, _) => format!("not all cut: {e}"),
                (None, 0, 0) => match (&log_problem, self.tracking.log_state()) {
                    (Some(p), _) => format!("not cut: {p}"),
                    (None, LogState::Starting) => "not cut: the access log is not read yet".into(),
                    _ => "no connection of this user in the access log since the agent started"
                        .into(),
                },
                (None, 0, _) => "its logged connections had already closed".into(),
                _ => String::new(),
            };
            tracing::info!(
                node = node_id,
                user = %email,
                connections = n,
                note = %note,
                "cut the removed user's connections"
            );
            out.insert(
                email.clone(),
                Cut {
                    at: now,
                    connections: n,
                    note,
                },
            );
        }
        metrics::counter!("connector_connections_cut_total", "node" => node_id.to_string())
            .increment(total);
        self.tracking.tracker.publish();
        out
    }
}

/// What `connector check-config` warns about cutting: the access log, the kernel's
/// answer to a probe (EPERM / EOPNOTSUPP), nodes whose port no one can tell.
pub fn doctor(config: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    let Some(x) = &config.xray else {
        return out;
    };
    if let Some(path) = &x.access_log {
        let mut f = super::connections::LogFollower::new(path.clone());
        f.poll(&mut |_| {});
        if let Some(p) = f.state.problem(path) {
            out.push(format!("xray.access_log: {p}"));
        }
    }
    if !x.cut_connections {
        return out;
    }
    if config.apply.mode != crate::config::ApplyMode::XrayGrpc {
        out.push(format!(
            "xray.cut_connections: has no effect with apply.mode = {} (only xray-grpc removes users itself)",
            config.apply.mode.as_str()
        ));
    }
    if let Err(e) = kernel::probe() {
        out.push(format!(
            "xray.cut_connections: {e}; bans will still remove users"
        ));
    }
    if x.flavor == crate::peers::xray::Flavor::V2ray {
        for n in config.nodes.iter().filter(|n| n.port.is_none()) {
            out.push(format!(
                "nodes[{}].port: not set, and V2Ray cannot tell the inbound's port: its removed users' connections will not be cut",
                n.id
            ));
        }
    }
    out
}
