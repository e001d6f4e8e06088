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
//! Datagrams are moved in batches (see [`crate::nat::udpio`]): the guest's
//! consecutive same-size datagrams of one flow leave in one `UDP_SEGMENT`
//! send, and one `recvmmsg` (with `UDP_GRO` trains) drains a host socket;
//! what it returned goes to the guest through a [`TrainOut`], which joins
//! same-flow, same-size datagrams into one USO super-frame where the TAP
//! takes them, and writes one frame per datagram otherwise.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use smoltcp::time::Instant;

use crate::config::{Config, UdpFilter};
use crate::nat::local::LocalAddrs;
use crate::nat::udpio::{self, Counters, RecvBatch};
use crate::nat::{guest_view, guest_view6, inbound_allowed};
use crate::phy::tap::TapTx;
use crate::stack::Stack;
use crate::wire::emit::{self, Header, UDP_PAYLOAD_OFFSET, UDP6_PAYLOAD_OFFSET};

/// `recvmmsg` batches moved to the guest per wake-up before yielding to
/// other work.
const BUDGET: usize = 4;
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
        udpio::enable_gro(std::os::fd::AsFd::as_fd(&socket));
        Ok(Self {
            guest,
            socket,
            last_active: now,
            indexed_at: now,
            peers: HashSet::new(),
            views: HashMap::new(),
        })
    }

    /// Notes that a guest datagram goes to `target` (the engine sends it,
    /// possibly batched with the next ones); `shown` is what the guest
    /// addressed when that differs from what its answers will come from
    /// (a hairpin to a published port).
    pub fn note_send(&mut self, target: SocketAddr, shown: Option<SocketAddr>, now: Instant) {
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
    #[allow(clippy::too_many_arguments)]
    pub fn to_guest(
        &mut self,
        cfg: &Config,
        local: &LocalAddrs,
        stack: &mut Stack,
        rx: &mut RecvBatch,
        tx: TapTx<'_>,
        io: &mut Counters,
        now: Instant,
    ) -> ToGuest {
        let mut out = ToGuest::default();
        if stack.guest_mac().is_none() {
            return out;
        }
        let mut train = TrainOut::new(tx);
        for _ in 0..BUDGET {
            // An error is a queued ICMP error surfacing here.
            let n = rx
                .recv(std::os::fd::AsFd::as_fd(&self.socket))
                .unwrap_or_default();
            if n == 0 {
                train.finish(stack, io);
                return out;
            }
            io.recv_calls += 1;
            self.last_active = now;
            for i in 0..n {
                let m = rx.msgs()[i];
                if !self.admits(cfg, local, m.from) {
                    out.filtered += 1;
                    continue;
                }
                let shown = match (self.guest, self.views.get(&m.from)) {
                    (SocketAddr::V4(_), Some(v @ SocketAddr::V4(_)))
                    | (SocketAddr::V6(_), Some(v @ SocketAddr::V6(_))) => Some(*v),
                    (SocketAddr::V4(_), _) => guest_view(cfg, m.from).map(SocketAddr::V4),
                    (SocketAddr::V6(_), _) => guest_view6(cfg, m.from).map(SocketAddr::V6),
                };
                if let Some(src) = shown {
                    train.push(stack, io, src, self.guest, rx.payload(i), m.seg);
                }
            }
            if n < udpio::BATCH {
                train.finish(stack, io);
                return out;
            }
        }
        train.finish(stack, io);
        out.more = true;
        out
    }
}

/// Where a UDP payload goes in a frame to `dst`, and the most one frame
/// may carry.
fn layout(dst: SocketAddr, room: usize) -> (usize, usize) {
    match dst {
        SocketAddr::V4(_) => (
            UDP_PAYLOAD_OFFSET,
            udpio::MAX_PAYLOAD.min(room - UDP_PAYLOAD_OFFSET),
        ),
        SocketAddr::V6(_) => (
            UDP6_PAYLOAD_OFFSET,
            (65535 - 8).min(room - UDP6_PAYLOAD_OFFSET),
        ),
    }
}

/// The train being gathered in the TAP's transmit buffer.
#[derive(Clone, Copy)]
struct Open {
    src: SocketAddr,
    dst: SocketAddr,
    seg: usize,
    len: usize,
    count: usize,
    closed: bool,
}

/// Datagrams on their way to the guest: with USO, consecutive ones of one
/// flow and size gather in the TAP's transmit buffer and leave as one
/// super-frame; without, each leaves as its own frame.
pub struct TrainOut<'a> {
    tx: TapTx<'a>,
    open: Option<Open>,
}

impl<'a> TrainOut<'a> {
    /// Nothing gathered yet.
    pub fn new(tx: TapTx<'a>) -> Self {
        Self { tx, open: None }
    }

    /// Adds one received message `data` from `src` (as the guest sees it)
    /// to guest endpoint `dst`: one datagram, or a `UDP_GRO` train of
    /// `seg`-byte ones. Families of `src` and `dst` must match (others are
    /// skipped).
    pub fn push(
        &mut self,
        stack: &mut Stack,
        io: &mut Counters,
        src: SocketAddr,
        dst: SocketAddr,
        data: &[u8],
        seg: usize,
    ) {
        if src.is_ipv4() != dst.is_ipv4() {
            return;
        }
        let (off, cap) = layout(dst, self.tx.buf_len());
        let seg = if seg == 0 || seg > data.len() {
            data.len()
        } else {
            seg
        };
        io.datagrams_in += data.len().div_ceil(seg.max(1)).max(1) as u64;
        if data.len() > cap {
            return;
        }
        if self.tx.uso() && !data.is_empty() {
            let nseg = data.len().div_ceil(seg);
            let joins = self.open.is_some_and(|t| {
                (t.src, t.dst) == (src, dst)
                    && !t.closed
                    && (seg == t.seg || (nseg == 1 && data.len() < t.seg))
                    && t.len + data.len() <= cap
                    && t.count + nseg <= udpio::MAX_SEGMENTS
            });
            if !joins {
                self.flush(stack, io);
            }
            let t = self.open.get_or_insert(Open {
                src,
                dst,
                seg,
                len: 0,
                count: 0,
                closed: false,
            });
            let at = off + t.len;
            self.tx.buf_mut()[at..at + data.len()].copy_from_slice(data);
            t.len += data.len();
            t.count += nseg;
            t.closed = data.len() % t.seg != 0;
            return;
        }
        self.flush(stack, io);
        if data.is_empty() {
            self.open = Some(Open {
                src,
                dst,
                seg: 0,
                len: 0,
                count: 1,
                closed: true,
            });
            self.flush(stack, io);
            return;
        }
        for piece in data.chunks(seg) {
            self.tx.buf_mut()[off..off + piece.len()].copy_from_slice(piece);
            self.open = Some(Open {
                src,
                dst,
                seg: piece.len(),
                len: piece.len(),
                count: 1,
                closed: true,
            });
            self.flush(stack, io);
        }
    }

    /// Writes what is gathered.
    pub fn finish(&mut self, stack: &mut Stack, io: &mut Counters) {
        self.flush(stack, io);
    }

    fn flush(&mut self, stack: &mut Stack, io: &mut Counters) {
        let Some(t) = self.open.take() else { return };
        let Some(guest_mac) = stack.guest_mac() else {
            return;
        };
        let h = Header {
            eth_src: stack.mac,
            eth_dst: guest_mac,
            ident: stack.next_ident(),
        };
        let frame = |buf: &mut [u8]| match (t.src, t.dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => emit::udp_frame(buf, &h, s, d, t.len),
            (SocketAddr::V6(s), SocketAddr::V6(d)) => emit::udp6_frame(buf, &h, s, d, t.len),
            _ => 0,
        };
        // A super-frame's checksum is the pseudo-header sum the TAP layer
        // puts there: summing the whole train first would be wasted.
        let train = |buf: &mut [u8]| match (t.src, t.dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                emit::udp_frame_unsummed(buf, &h, s, d, t.len)
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                emit::udp6_frame_unsummed(buf, &h, s, d, t.len)
            }
            _ => 0,
        };
        if t.count <= 1 {
            self.tx.build(frame);
        } else if self.tx.build_udp_train(t.seg as u16, train) {
            io.uso_out += 1;
            io.uso_out_datagrams += t.count as u64;
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
