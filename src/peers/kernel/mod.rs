//! The real kernel, as a peer: its table of TCP sockets, read and cut over netlink
//! (`NETLINK_SOCK_DIAG`), what `ss` and `ss -K` do, without spawning either.
//!
//! - [`established`]: every established TCP socket (IPv4 and IPv6) whose local port is
//!   one asked for: one dump per address family, filtered here (the kernel's dump
//!   filter is a bytecode program; a port compare in user space is simpler and the
//!   dump of a busy node is a few MB at most).
//! - [`destroy`]: `SOCK_DESTROY` (message type 21) of one socket found by a dump, by
//!   its exact 4-tuple and the kernel's cookie, so a socket that closed and whose
//!   4-tuple was reused since the dump is not the one cut (the kernel answers
//!   `ENOENT`, [`KernelError::Gone`]).
//! - [`probe`]: whether this process may destroy sockets at all, tried on a socket
//!   pair of its own: `EPERM` is a missing `CAP_NET_ADMIN`, `EOPNOTSUPP` a kernel
//!   built without `CONFIG_INET_DIAG_DESTROY`.
//!
//! rust-netlink's `netlink-packet-sock-diag` builds and parses the messages (its
//! `SockDiagDestroy` wraps the request under type 21); `netlink-sys` is the socket.
//! The calls block (a netlink round trip is micro- to milliseconds): async callers run
//! them with `spawn_blocking`.
//!
//! Reads: the kernel's socket table. Writes: nothing but the sockets it destroys.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// Why a socket operation failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `EPERM`: destroying another process's socket needs `CAP_NET_ADMIN`.
    #[error(
        "the kernel refused to cut connections (EPERM): the agent lacks CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
    )]
    NoCapability,
    /// `EOPNOTSUPP`: the kernel was built without `CONFIG_INET_DIAG_DESTROY`.
    #[error(
        "this kernel cannot cut connections (EOPNOTSUPP): it was built without CONFIG_INET_DIAG_DESTROY"
    )]
    Unsupported,
    /// `ENOENT`: the socket closed (or changed) since it was found.
    #[error("the socket is gone")]
    Gone,
    #[error("netlink sock_diag: {0}")]
    Io(#[from] io::Error),
    /// The kernel's answer did not parse.
    #[error("netlink sock_diag: an answer that does not parse: {0}")]
    Decode(String),
}

impl KernelError {
    fn from_errno(code: i32) -> KernelError {
        match code {
            libc::EPERM | libc::EACCES => KernelError::NoCapability,
            libc::EOPNOTSUPP => KernelError::Unsupported,
            libc::ENOENT => KernelError::Gone,
            c => KernelError::Io(io::Error::from_raw_os_error(c)),
        }
    }

    /// True when no cut can ever succeed in this process (as opposed to one socket).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KernelError::NoCapability | KernelError::Unsupported)
    }
}

/// One established TCP socket, as the kernel's dump showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpSocket {
    /// The local end (the core's listening port), IPv4-mapped IPv6 shown as IPv4.
    pub local: SocketAddr,
    /// The peer, IPv4-mapped IPv6 shown as IPv4.
    pub remote: SocketAddr,
    family: u8,
    id: SocketId,
}

/// `a` with an IPv4-mapped IPv6 address shown as the IPv4 one: a dual-stack listener's
/// IPv4 connections are IPv6 sockets, the core logs their IPv4 source.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn open() -> Result<Socket, KernelError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    Ok(socket)
}

fn send<T: NetlinkSerializable + std::fmt::Debug>(
    socket: &Socket,
    flags: u16,
    inner: T,
) -> Result<(), KernelError> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// The established TCP sockets whose local port is in `ports` (all of them when
/// `ports` is empty).
pub(crate) fn established(ports: &[u16]) -> Result<Vec<TcpSocket>, KernelError> {
    let socket = open()?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        send(
            &socket,
            NLM_F_REQUEST | NLM_F_DUMP,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::ESTABLISHED,
                socket_id,
            }),
        )?;
        read_dump(&socket, |family, id| {
            if ports.is_empty() || ports.contains(&id.source_port) {
                out.push(TcpSocket {
                    local: canonical(SocketAddr::new(id.source_address, id.source_port)),
                    remote: canonical(SocketAddr::new(id.destination_address, id.destination_port)),
                    family,
                    id,
                });
            }
        })?;
    }
    Ok(out)
}

/// Reads one dump's answers to its end, handing each socket to `each`.
fn read_dump(socket: &Socket, mut each: impl FnMut(u8, SocketId)) -> Result<(), KernelError> {
    // A dump comes in datagrams of up to a page or so each; 64 KiB holds any of them.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n.min(buf.len()) {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..n])
                .map_err(|e| KernelError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => return Err(KernelError::from_errno(-code.get())),
                    None => return Ok(()),
                },
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    each(r.header.family, r.header.socket_id)
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Destroys `sock` (`SOCK_DESTROY`): both ends see the connection reset.
pub(crate) fn destroy(sock: &TcpSocket) -> Result<(), KernelError> {
    let socket = open()?;
    destroy_on(&socket, sock)
}

/// Destroys each of `socks` on one netlink socket; one result per socket, in order.
pub(crate) fn destroy_all(
    socks: &[TcpSocket],
) -> Result<Vec<Result<(), KernelError>>, KernelError> {
    let socket = open()?;
    Ok(socks.iter().map(|s| destroy_on(&socket, s)).collect())
}

fn destroy_on(socket: &Socket, sock: &TcpSocket) -> Result<(), KernelError> {
    send(
        socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: sock.family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: sock.id.clone(),
        })),
    )?;
    let mut buf = vec![0u8; 8 * 1024];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n.min(buf.len())])
        .map_err(|e| KernelError::Decode(e.to_string()))?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            Some(code) => Err(KernelError::from_errno(-code.get())),
            None => Ok(()),
        },
        other => Err(KernelError::Decode(format!(
            "expected an acknowledgement, got {other:?}"
        ))),
    }
}

/// Whether this process can destroy TCP sockets: tried on a connection it makes to
/// itself on the loopback (a kernel answers `EPERM` only for a socket it found, so a
/// probe needs a real one).
pub(crate) fn probe() -> Result<(), KernelError> {
    let listener = std::net::TcpListener::bind((IpAddr::from([127, 0, 0, 1]), 0))?;
    let port = listener.local_addr()?.port();
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (_server, _) = listener.accept()?;
    let client_port = client.local_addr()?.port();
    let found = established(&[client_port])?;
    let Some(sock) = found.iter().find(|s| s.remote.port() == port) else {
        return Err(KernelError::Decode(
            "the dump did not show the probe's own connection".into(),
        ));
    };
    destroy(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn canonical_shows_mapped_addresses_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    /// The real kernel: a dump finds a loopback connection by its port, and (as root)
    /// a destroy resets exactly it.
    #[test]
    fn dump_and_destroy_on_the_real_kernel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let keep = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_keep_srv, keep_peer) = listener.accept().unwrap();
        let mut cut = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_cut_srv, cut_peer) = listener.accept().unwrap();
        let found = established(&[port]).unwrap();
        let remotes: Vec<SocketAddr> = found.iter().map(|s| s.remote).collect();
        assert!(
            remotes.contains(&keep_peer) && remotes.contains(&cut_peer),
            "{found:?}"
        );
        assert!(found.iter().all(|s| s.local.port() == port));
        let victim = found.iter().find(|s| s.remote == cut_peer).unwrap();
        match destroy(victim) {
            Ok(()) => {
                let mut b = [0u8; 1];
                // The client end sees the reset (or EOF) of its server socket's destroy.
                let r = cut.read(&mut b);
                assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
                let left: Vec<SocketAddr> = established(&[port])
                    .unwrap()
                    .iter()
                    .map(|s| s.remote)
                    .collect();
                assert!(left.contains(&keep_peer) && !left.contains(&cut_peer));
                assert!(matches!(destroy(victim), Err(KernelError::Gone)));
            }
            // Not root, or a kernel without the option: the error says which.
            Err(e) => assert!(e.is_unavailable(), "{e}"),
        }
        drop(keep);
    }
}
