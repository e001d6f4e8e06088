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
//! Filtering is separate from mapping: by default a datagram enters the
//! flow only from an address (any port) the flow has sent to
//! (address-dependent filtering, as Linux conntrack does), so another host
//! or a local user cannot inject into a guest's conversation; with
//! `--udp-filter endpoint-independent` any source that the address policy
//! admits ([`crate::nat::inbound_allowed`]) may. Filtered datagrams are
//! dropped and counted. Each flow remembers at most [`MAX_PEERS`]
//! addresses; past that an arbitrary older one is forgotten.
//!
//! A datagram to a port rnet itself publishes (hairpin) is sent to the
//! published socket on the host's loopback; its answers, which come from
//! there, are shown to the guest as coming from the address it sent to.
//!
//! Datagrams go straight from the host socket into the TAP frame buffer
//! (received at the payload offset, headers written around them).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use smoltcp::time::Instant;

use crate::config::{Config, UdpFilter};
use crate::nat::local::LocalAddrs;
use crate::nat::{guest_view, guest_view6, inbound_allowed};
use crate::stack::Stack;
use crate::stack::emit::{self, Header, UDP_PAYLOAD_OFFSET, UDP6_PAYLOAD_OFFSET};
use crate::tap::TapTx;

/// Datagrams moved to the guest per wake-up before yielding to other work.
const BUDGET: usize = 64;
/// Host addresses one flow remembers having sent to (for filtering).
pub const MAX_PEERS: usize = 1024;
/// Hairpin destinations one flow remembers (for the source it shows).
const MAX_VIEWS: usize = 64;

/// One guest UDP endpoint and its host socket.
pub struct UdpFlow {
    /// The guest endpoint (IPv4 or IPv6; the host socket has its family).
    pub guest: SocketAddr,
    /// The host socket (unconnected).
    pub socket: UdpSocket,
    /// Last datagram in either direction.
    pub last_active: Instant,
    /// When the flow was last placed in the engine's recency index.
    pub indexed_at: Instant,
    /// Host addresses the flow has sent to.
    peers: HashSet<IpAddr>,
    /// Host endpoint → what the guest addressed (hairpin only).
    views: HashMap<SocketAddr, SocketAddr>,
}

/// What one wake-up moved to the guest.
#[derive(Clone, Copy, Debug, Default)]
pub struct ToGuest {
    /// More datagrams may be waiting.
    pub more: bool,
    /// Datagrams dropped by the inbound filter.
    pub filtered: u64,
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
            indexed_at: now,
            peers: HashSet::new(),
            views: HashMap::new(),
        })
    }

    /// Sends one guest datagram to `target`; `shown` is what the guest
    /// addressed when that differs from what its answers will come from
    /// (a hairpin to a published port). A full socket buffer drops it, as
    /// a congested link would.
    pub fn send(
        &mut self,
        target: SocketAddr,
        shown: Option<SocketAddr>,
        payload: &[u8],
        now: Instant,
    ) -> io::Result<()> {
        self.last_active = now;
        let ip = unmapped(target.ip());
        if !self.peers.contains(&ip) {
            if self.peers.len() >= MAX_PEERS
                && let Some(old) = self.peers.iter().next().copied()
            {
                self.peers.remove(&old);
            }
            self.peers.insert(ip);
        }
        if let Some(shown) = shown {
            if self.views.len() >= MAX_VIEWS && !self.views.contains_key(&target) {
                self.views.clear();
            }
            self.views.insert(target, shown);
        }
        match self.socket.send_to(payload, target) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether a datagram from `from` may enter this flow.
    fn admits(&self, cfg: &Config, local: &LocalAddrs, from: SocketAddr) -> bool {
        let ip = unmapped(from.ip());
        self.peers.contains(&ip)
            || (cfg.udp_filter() == UdpFilter::EndpointIndependent
                && inbound_allowed(cfg, local, ip))
    }

    /// Moves datagrams that arrived for the guest onto the TAP, dropping
    /// (and counting) those the filter refuses.
    pub fn to_guest(
        &mut self,
        cfg: &Config,
        local: &LocalAddrs,
        stack: &mut Stack,
        mut tx: TapTx<'_>,
        now: Instant,
    ) -> ToGuest {
        let mut out = ToGuest::default();
        let Some(guest_mac) = stack.guest_mac() else {
            return out;
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
            let this = &*self;
            let filtered = &mut out.filtered;
            let sent = tx.build(|buf| {
                let end = (off + max).min(buf.len());
                let Some(room) = buf.get_mut(off..end) else {
                    more = false;
                    return 0;
                };
                match this.socket.recv_from(room) {
                    Ok((_, from)) if !this.admits(cfg, local, from) => {
                        *filtered += 1;
                        0
                    }
                    Ok((n, from)) => match (guest, this.views.get(&from)) {
                        (SocketAddr::V4(g), Some(SocketAddr::V4(shown))) => {
                            emit::udp_frame(buf, &h, *shown, g, n)
                        }
                        (SocketAddr::V6(g), Some(SocketAddr::V6(shown))) => {
                            emit::udp6_frame(buf, &h, *shown, g, n)
                        }
                        (guest, _) => match guest {
                            SocketAddr::V4(g) => match guest_view(cfg, from) {
                                Some(src) => emit::udp_frame(buf, &h, src, g, n),
                                None => 0,
                            },
                            SocketAddr::V6(g) => match guest_view6(cfg, from) {
                                Some(src) => emit::udp6_frame(buf, &h, src, g, n),
                                None => 0,
                            },
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
                return out;
            }
        }
        out.more = true;
        out
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
