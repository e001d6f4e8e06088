//! ICMP echo: answered locally for the virtual hosts, relayed through
//! unprivileged ping sockets for everything else.
//!
//! A ping socket (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`) lets an
//! unprivileged process send echo requests; the kernel rewrites the echo
//! identifier to the socket's own, so rnet keeps one socket per guest
//! identifier and writes the guest's identifier back into each reply. The
//! kernel only grants such sockets to groups inside
//! `net.ipv4.ping_group_range`; when it refuses, rnet says so once.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use mio::net::UdpSocket;
use smoltcp::time::Instant;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::nat::guest_view;
use crate::stack::Stack;
use crate::stack::emit::{self, Header, ICMP_OFFSET};
use crate::tap::TapTx;

/// One guest echo identifier and its ping socket.
pub struct IcmpFlow {
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The guest's echo identifier.
    pub ident: u16,
    /// The ping socket.
    pub socket: UdpSocket,
    /// Last echo in either direction.
    pub last_active: Instant,
}

impl IcmpFlow {
    /// Opens a ping socket. `EACCES` means `ping_group_range` excludes us.
    pub fn open(
        guest: Ipv4Addr,
        ident: u16,
        bind: Option<Ipv4Addr>,
        now: Instant,
    ) -> io::Result<Self> {
        let s = Socket::new(
            Domain::IPV4,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::ICMPV4),
        )?;
        if let Some(ip) = bind {
            s.bind(&SocketAddr::from((ip, 0)).into())?;
        }
        Ok(Self {
            guest,
            ident,
            socket: UdpSocket::from_std(s.into()),
            last_active: now,
        })
    }

    /// Sends the guest's echo request (the whole ICMP message) to `dst`.
    pub fn send(&mut self, dst: Ipv4Addr, icmp: &[u8], now: Instant) -> io::Result<()> {
        self.last_active = now;
        match self.socket.send_to(icmp, SocketAddr::from((dst, 0))) {
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
        let max = stack.mtu.saturating_sub(20);
        for _ in 0..64 {
            let h = Header {
                eth_src: stack.mac,
                eth_dst: guest_mac,
                ident: stack.next_ident(),
            };
            let mut more = true;
            let (socket, guest, ident) = (&self.socket, self.guest, self.ident);
            let sent = tx.build(|buf| {
                let end = (ICMP_OFFSET + max).min(buf.len());
                match socket.recv_from(&mut buf[ICMP_OFFSET..end]) {
                    Ok((n, from)) => {
                        let Some(src) = guest_view(cfg, from) else {
                            return 0;
                        };
                        let Ok(mut icmp) =
                            Icmpv4Packet::new_checked(&mut buf[ICMP_OFFSET..ICMP_OFFSET + n])
                        else {
                            return 0;
                        };
                        if icmp.msg_type() != Icmpv4Message::EchoReply {
                            return 0;
                        }
                        icmp.set_echo_ident(ident);
                        emit::icmp_frame(buf, &h, *src.ip(), guest, n)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(_) => {
                        more = false;
                        0
                    }
                }
            });
            if sent {
                stack.frames_out += 1;
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
