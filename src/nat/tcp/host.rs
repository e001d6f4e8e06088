//! The host side of a TCP flow: the non-blocking connect towards the routed
//! target, and how its failure is reported to the guest (ICMP or a reset).

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use smoltcp::wire::Icmpv4DstUnreachable;
use socket2::{Domain, Protocol, Socket, Type};

/// How a failed host connect is reported to an IPv6 guest.
pub fn connect_error_reply6(e: &io::Error) -> Option<crate::wire::emit::Unreach6> {
    use crate::wire::emit::Unreach6;
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(Unreach6::NoRoute),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) => Some(Unreach6::Address),
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Unreach6::AdminProhibited),
        _ => None,
    }
}

/// How a failed host connect is reported to the guest.
pub fn connect_error_reply(e: &io::Error) -> Option<Icmpv4DstUnreachable> {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(Icmpv4DstUnreachable::NetUnreachable),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) => {
            Some(Icmpv4DstUnreachable::HostUnreachable)
        }
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Icmpv4DstUnreachable::CommProhibited),
        // Refused and everything else: a reset.
        _ => None,
    }
}

/// A non-blocking connect to `target`, optionally from `bind` (an address
/// of `target`'s family; loopback targets included).
pub(super) fn connect(target: SocketAddr, bind: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let domain = Domain::for_address(target);
    let s = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}
