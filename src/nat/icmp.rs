//! ICMP echo: answered locally for the virtual hosts, relayed through
//! unprivileged ping sockets for everything else, over IPv4 and IPv6.
//!
//! A ping socket (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`, or
//! `AF_INET6` with `IPPROTO_ICMPV6`) lets an unprivileged process send echo
//! requests; the kernel rewrites the echo identifier to the socket's own
//! (and computes the checksum), so rnet keeps one socket per guest address
//! and identifier and writes the guest's identifier back into each reply.
//! The kernel only grants such sockets, of either family, to groups inside
//! `net.ipv4.ping_group_range`; when it refuses, rnet says so once.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::UdpSocket;
use smoltcp::time::Instant;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::nat::{guest_view, guest_view6};
use crate::phy::tap::TapTx;
use crate::stack::Stack;
use crate::wire::emit::{self, Header, ICMP_OFFSET, ICMP6_OFFSET};

/// ICMP and ICMPv6 echo reply types.
const ECHO_REPLY: u8 = 0;
const ECHO6_REPLY: u8 = 129;

/// One guest echo identifier and its ping socket.
pub struct IcmpFlow {
    /// The guest's address; the ping socket has its family.
    pub guest: IpAddr,
    /// The guest's echo identifier.
    pub ident: u16,
    /// The ping socket.
    pub socket: UdpSocket,
    /// Last echo in either direction.
    pub last_active: Instant,
}

impl IcmpFlow {
    /// Opens a ping socket of `guest`'s family, bound to `bind` if it is
    /// an address of that family.
    /// `EACCES` means `ping_group_range` excludes us.
    pub fn open(guest: IpAddr, ident: u16, bind: Option<IpAddr>, now: Instant) -> io::Result<Self> {
        let (domain, proto) = match guest {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let s = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(proto))?;
        if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == guest.is_ipv4()) {
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        Ok(Self {
            guest,
            ident,
            socket: UdpSocket::from_std(s.into()),
            last_active: now,
        })
    }

    /// Sends the guest's echo request (the whole ICMP message) to `dst`.
    pub fn send(&mut self, dst: IpAddr, icmp: &[u8], now: Instant) -> io::Result<()> {
        self.last_active = now;
        match self.socket.send_to(icmp, SocketAddr::new(dst, 0)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Relays echo replies to the guest.
    pub fn to_guest(&mut self, cfg: &Config, stack: &mut Stack, mut tx: TapTx<'_>, now: Instant) {
        let Some(guest_mac) = stack.guest_mac() else {
            return;
        };
        let (off, max) = match self.guest {
            IpAddr::V4(_) => (ICMP_OFFSET, stack.mtu.saturating_sub(20)),
            IpAddr::V6(_) => (ICMP6_OFFSET, stack.mtu.saturating_sub(40)),
        };
        for _ in 0..64 {
            let h = Header {
                eth_src: stack.mac,
                eth_dst: guest_mac,
                ident: stack.next_ident(),
            };
            let mut more = true;
            let (socket, guest, ident) = (&self.socket, self.guest, self.ident);
            let sent = tx.build(|buf| {
                let end = (off + max).min(buf.len());
                let Some(room) = buf.get_mut(off..end) else {
                    more = false;
                    return 0;
                };
                match socket.recv_from(room) {
                    Ok((n, from)) => {
                        let Some(msg) = buf.get_mut(off..off + n).filter(|m| m.len() >= 8) else {
                            return 0;
                        };
                        // The kernel passes only replies to this socket's
                        // identifier; put the guest's back (the frame
                        // builders redo the checksum).
                        msg[4..6].copy_from_slice(&ident.to_be_bytes());
                        match guest {
                            IpAddr::V4(g) if msg[0] == ECHO_REPLY => match guest_view(cfg, from) {
                                Some(src) => emit::icmp_frame(buf, &h, *src.ip(), g, n),
                                None => 0,
                            },
                            IpAddr::V6(g) if msg[0] == ECHO6_REPLY => {
                                match guest_view6(cfg, from) {
                                    Some(src) => emit::icmp6_frame(buf, &h, *src.ip(), g, n, 64),
                                    None => 0,
                                }
                            }
                            _ => 0,
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(_) => {
                        more = false;
                        0
                    }
                }
            });
            if sent {
                self.last_active = now;
            }
            if !more {
                return;
            }
        }
    }
}

/// The kernel's current `net.ipv4.ping_group_range`, for the log message.
pub fn ping_group_range() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
