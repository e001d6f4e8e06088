//! UDP flows: one host socket per guest endpoint.
//!
//! # Theory of operation
//!
//! A guest `ip:port` gets one unconnected host socket the first time it
//! sends; every datagram from that endpoint leaves through it with
//! `sendto` to the routed destination, and anything arriving on it is sent
//! back to that guest endpoint, with the sender's address as source (host
//! loopback shown as the gateway). That is endpoint-independent mapping:
//! the host port stays the same whoever the guest talks to, which is what
//! STUN-style protocols and VXLAN expect. A flow that has been idle for the
//! configured timeout is closed.
//!
//! Datagrams go straight from the host socket into the TAP frame buffer
//! (received at the payload offset, headers written around them).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use smoltcp::time::Instant;

use crate::config::Config;
use crate::nat::{guest_view, guest_view6};
use crate::stack::Stack;
use crate::stack::emit::{self, Header, UDP_PAYLOAD_OFFSET, UDP6_PAYLOAD_OFFSET};
use crate::tap::TapTx;

/// Datagrams moved to the guest per wake-up before yielding to other work.
const BUDGET: usize = 64;

/// One guest UDP endpoint and its host socket.
pub struct UdpFlow {
    /// The guest endpoint (IPv4 or IPv6; the host socket has its family).
    pub guest: SocketAddr,
    /// The host socket (unconnected).
    pub socket: UdpSocket,
    /// Last datagram in either direction.
    pub last_active: Instant,
}

impl UdpFlow {
    /// Opens the host socket for `guest`, bound to `bind` if given (an
    /// address of the guest's family).
    pub fn open(guest: SocketAddr, bind: Option<IpAddr>, now: Instant) -> io::Result<Self> {
        let local = match (guest, bind) {
            (SocketAddr::V4(_), Some(ip @ IpAddr::V4(_))) => SocketAddr::new(ip, 0),
            (SocketAddr::V6(_), Some(ip @ IpAddr::V6(_))) => SocketAddr::new(ip, 0),
            (SocketAddr::V4(_), _) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            (SocketAddr::V6(_), _) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(local)?;
        Ok(Self {
            guest,
            socket,
            last_active: now,
        })
    }

    /// Sends one guest datagram to `target`. A full socket buffer drops it,
    /// as a congested link would.
    pub fn send(&mut self, target: SocketAddr, payload: &[u8], now: Instant) -> io::Result<()> {
        self.last_active = now;
        match self.socket.send_to(payload, target) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves datagrams that arrived for the guest onto the TAP. Returns
    /// whether more may be waiting.
    pub fn to_guest(
        &mut self,
        cfg: &Config,
        stack: &mut Stack,
        mut tx: TapTx<'_>,
        now: Instant,
    ) -> bool {
        let Some(guest_mac) = stack.guest_mac() else {
            return false;
        };
        let v6 = self.guest.is_ipv6();
        let (max, off) = if v6 {
            (stack.mtu.saturating_sub(48), UDP6_PAYLOAD_OFFSET)
        } else {
            (stack.mtu.saturating_sub(28), UDP_PAYLOAD_OFFSET)
        };
        for _ in 0..BUDGET {
            let h = Header {
                eth_src: stack.mac,
                eth_dst: guest_mac,
                ident: stack.next_ident(),
            };
            let mut more = true;
            let guest = self.guest;
            let socket = &self.socket;
            let sent = tx.build(|buf| {
                let end = (off + max).min(buf.len());
                let Some(room) = buf.get_mut(off..end) else {
                    more = false;
                    return 0;
                };
                match socket.recv_from(room) {
                    Ok((n, from)) => match guest {
                        SocketAddr::V4(g) => match guest_view(cfg, from) {
                            Some(src) => emit::udp_frame(buf, &h, src, g, n),
                            None => 0,
                        },
                        SocketAddr::V6(g) => match guest_view6(cfg, from) {
                            Some(src) => emit::udp6_frame(buf, &h, src, g, n),
                            None => 0,
                        },
                    },
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(_) => {
                        // WouldBlock, or a queued ICMP error surfacing here.
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
                return false;
            }
        }
        true
    }
}
