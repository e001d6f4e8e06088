//! The event loop's side of port publishing (see [`crate::ports`] for the
//! rules and the theory): host listeners living in the flow slab, accepted
//! connections turned into inbound flows, UDP datagrams carried both ways
//! (with the table of published-UDP clients, bounded by
//! `Limits::udp_clients` with least-recently-used eviction), the hairpin
//! lookup for guest traffic to rnet's own published ports, and the
//! requests other threads send to change the rules.
//!
//! # The fast path's agent ([`FastPath`])
//!
//! The loop never waits for the namespace agent ([`crate::ns::Agent`]): its
//! socket is non-blocking and watched by the loop (token [`AGENT`]), a
//! connection accepted on a fast listener is held while its request is out
//! (at most `MAX_OUTSTANDING` requests, each with a deadline of
//! `AGENT_DEADLINE`), and the answer starts the spliced flow. While the
//! agent is not ready, or when it is declared unhealthy (it closed its
//! socket, missed a deadline, broke the protocol or sent a descriptor that
//! fails [`crate::nat::splice::check_guest_socket`]), connections take the
//! stack path, held ones included; the trouble is logged once, the agent is
//! killed and, after a backoff (`BACKOFF_MIN` doubling up to
//! `BACKOFF_MAX`), a new one is asked of the launcher
//! ([`crate::ns::Launcher`], token [`LAUNCHER`]), forked before rnet's
//! sandbox because the sandbox forbids `fork` and `setns`. A descriptor
//! lost to a full descriptor table (`MSG_CTRUNC`) is not the agent's fault:
//! the pipes held in reserve are closed to make room, the loss is counted
//! and the connection takes the stack path.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use mio::net::{TcpListener, UdpSocket};
use mio::unix::SourceFd;
use mio::{Interest, Token};
use smoltcp::time::{Duration, Instant};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use super::{Engine, FIRST_FLOW, Flow, Slot};
use crate::nat::published_target;
use crate::nat::tcp::TcpFlow;
use crate::nat::udp::TrainOut;
use crate::nat::udpio;
use crate::ports::{IfName, PortError, PortInfo, PortSpec, Proto};
use crate::stats::DropReason;

/// Connections accepted per listener wake-up before other work runs.
const ACCEPT_BUDGET: usize = 64;

/// A request from another thread (control socket, library handle).
pub enum Command {
    /// Publish a rule.
    AddPort(PortSpec, mpsc::SyncSender<Result<PortInfo, PortError>>),
    /// Withdraw a rule; live connections are left to finish.
    RemovePort(u64, mpsc::SyncSender<Result<(), PortError>>),
    /// List the rules.
    ListPorts(mpsc::SyncSender<Vec<PortInfo>>),
    /// Report flows, counters and ports (see [`crate::status`]).
    Status(mpsc::SyncSender<serde_json::Value>),
}

/// A published rule and the listener slots that carry it.
pub struct Rule {
    pub(super) info: PortInfo,
    slots: Vec<(usize, u64)>,
}

/// A TCP listener for one host port.
pub struct TcpListen {
    pub(super) listener: TcpListener,
    /// The rule's guest address (None: the guest, in the client's family;
    /// see [`published_target`]).
    guest_ip: Option<IpAddr>,
    guest_port: u16,
    /// IPv4 connections go through the agent and splice(2) (the fast path).
    fast: bool,
}

impl TcpListen {
    /// The guest endpoint of IPv4 connections, which the fast path can
    /// carry; None for an IPv6 guest address.
    fn guest_v4(&self, guest: Ipv4Addr) -> Option<SocketAddrV4> {
        match self.guest_ip {
            None => Some(SocketAddrV4::new(guest, self.guest_port)),
            Some(IpAddr::V4(g)) => Some(SocketAddrV4::new(g, self.guest_port)),
            Some(IpAddr::V6(_)) => None,
        }
    }
}

/// A UDP socket for one host port.
pub struct UdpListen {
    pub(super) socket: UdpSocket,
    guest_ip: Option<IpAddr>,
    guest_port: u16,
}

/// Where the guest's answers to a published-UDP client go.
pub struct UdpReturn {
    pub(super) slot: usize,
    id: u64,
    client: SocketAddr,
    last: Instant,
    /// Its key in the recency index (updated at most once a second).
    indexed: Instant,
}

impl Engine {
    /// Serves the requests queued by other threads.
    pub(super) fn handle_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::AddPort(spec, reply) => {
                    let _ = reply.send(self.add_rule(spec));
                }
                Command::RemovePort(id, reply) => {
                    let _ = reply.send(self.remove_rule(id));
                }
                Command::ListPorts(reply) => {
                    let _ = reply.send(self.rules.values().map(|r| r.info.clone()).collect());
                }
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
            }
        }
    }

    /// Binds every host port of `spec` and starts listening; all or nothing.
    pub(crate) fn add_rule(&mut self, spec: PortSpec) -> Result<PortInfo, PortError> {
        self.add_rule_from(spec, None)
    }

    /// Publishes `spec` again under id `id` over listeners a previous data
    /// plane bound (see [`crate::supervise`]).
    pub(crate) fn adopt_rule(
        &mut self,
        id: u64,
        spec: PortSpec,
        fds: Vec<OwnedFd>,
    ) -> Result<PortInfo, PortError> {
        self.add_rule_from(spec, Some((id, fds)))
    }

    fn add_rule_from(
        &mut self,
        spec: PortSpec,
        adopt: Option<(u64, Vec<OwnedFd>)>,
    ) -> Result<PortInfo, PortError> {
        let adopted = adopt.is_some();
        let (id, mut given) = match adopt {
            Some((id, fds)) => (id, Some(fds.into_iter())),
            None => (self.next_rule, None),
        };
        if spec.host_port == 0 && spec.count != 1 {
            return Err(PortError::Unsupported(format!(
                "{spec}: host port 0 (any free port) only works for a single port"
            )));
        }
        if matches!(spec.guest_ip, Some(IpAddr::V6(_))) && self.cfg.ipv6_prefix().is_none() {
            return Err(PortError::Unsupported(format!(
                "{spec}: the guest address is IPv6, but IPv6 is off"
            )));
        }
        // What the rule shows as its guest address: a rule bound to one
        // IPv6 host address only ever takes IPv6 clients.
        let shown_guest = match (spec.guest_ip, spec.host_ip, self.cfg.ipv6_guest()) {
            (Some(g), _, _) => g,
            (None, IpAddr::V6(h), Some(g6))
                if !h.is_unspecified() && h.to_ipv4_mapped().is_none() =>
            {
                IpAddr::V6(g6)
            }
            _ => IpAddr::V4(self.cfg.guest()),
        };
        if spec.guest_port as u32 + spec.count as u32 > 65536
            || spec.host_port as u32 + spec.count as u32 > 65536
        {
            return Err(PortError::Unsupported(format!(
                "{spec}: range runs past port 65535"
            )));
        }
        let mut slots = Vec::with_capacity(spec.count as usize);
        let mut bound_port = spec.host_port;
        for i in 0..spec.count {
            let addr = SocketAddr::new(spec.host_ip, spec.host_port.wrapping_add(i));
            let guest_port = spec.guest_port + i;
            let bound = match given.as_mut() {
                Some(fds) => match fds.next() {
                    Some(fd) => Ok(adopt_listener(spec.proto, fd)),
                    None => Err(PortError::Bind {
                        spec,
                        addr,
                        source: io::Error::other("no listener kept for this port"),
                    }),
                },
                None => bind(spec.proto, addr, spec.iface).map_err(|e| bind_error(spec, addr, e)),
            };
            let flow = match bound {
                Ok(Bound::Tcp(listener)) => {
                    if i == 0 {
                        bound_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                    }
                    Flow::TcpListen(TcpListen {
                        listener,
                        guest_ip: spec.guest_ip,
                        guest_port,
                        fast: false,
                    })
                }
                Ok(Bound::Udp(socket)) => {
                    if i == 0 {
                        bound_port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
                    }
                    Flow::UdpListen(UdpListen {
                        socket,
                        guest_ip: spec.guest_ip,
                        guest_port,
                    })
                }
                Err(e) => {
                    for (idx, _) in slots {
                        self.remove(idx);
                    }
                    return Err(e);
                }
            };
            match self.add_flow(flow, id) {
                Some(slot) => slots.push(slot),
                None => {
                    for (idx, _) in slots {
                        self.remove(idx);
                    }
                    return Err(PortError::Bind {
                        spec,
                        addr,
                        source: io::Error::other("epoll refused the socket"),
                    });
                }
            }
        }
        if !adopted {
            self.next_rule += 1;
        }
        let mut shown = spec;
        shown.host_port = bound_port;
        let mut info = PortInfo {
            id,
            spec: shown,
            guest_ip: shown_guest,
            path: "stack",
        };
        // The fast path carries IPv4 guest connections only.
        if spec.proto == Proto::Tcp && shown_guest.is_ipv4() && self.route_rule(&slots) {
            info.path = "fast";
        }
        info!(id, rule = %shown, path = info.path, "published");
        if !adopted {
            let fds: Vec<_> = slots
                .iter()
                .filter_map(|(idx, _)| match self.flows.get(*idx).map(|s| &s.flow) {
                    Some(Flow::TcpListen(l)) => Some(l.listener.as_fd()),
                    Some(Flow::UdpListen(u)) => Some(u.socket.as_fd()),
                    _ => None,
                })
                .collect();
            crate::supervise::keep_rule(id, &shown, &fds);
        }
        self.rules.insert(
            id,
            Rule {
                info: info.clone(),
                slots,
            },
        );
        Ok(info)
    }

    /// Withdraws a rule: its listeners close; established connections stay
    /// until they end.
    fn remove_rule(&mut self, id: u64) -> Result<(), PortError> {
        let rule = self.rules.remove(&id).ok_or(PortError::NoSuchId(id))?;
        for (idx, sid) in rule.slots {
            if self.flows.get(idx).is_some_and(|s| s.id == sid) {
                self.remove(idx);
            }
        }
        info!(id, rule = %rule.info.spec, "withdrawn");
        crate::supervise::forget_rule(id);
        Ok(())
    }

    /// Accepts pending connections on listener `idx` and starts their flows.
    pub(super) fn accept_tcp(&mut self, idx: usize, _now: Instant) {
        for n in 0..ACCEPT_BUDGET {
            let Some(Slot {
                flow: Flow::TcpListen(l),
                id,
                rule,
                ..
            }) = self.flows.get(idx)
            else {
                return;
            };
            let (guest_ip, guest_port, lid, fast, rule) =
                (l.guest_ip, l.guest_port, *id, l.fast, *rule);
            let (stream, peer) = match l.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    self.stats.count_drop(DropReason::HostSocket);
                    return;
                }
            };
            if n + 1 == ACCEPT_BUDGET {
                // More may be waiting: come back after other work.
                self.mark_dirty(idx, lid);
            }
            let Some((guest, client)) = published_target(&self.cfg, guest_ip, guest_port, peer)
            else {
                // An IPv6 guest address while IPv6 is off: nothing to reach.
                self.stats.count_drop(DropReason::Unsupported);
                continue;
            };
            // The agent speaks IPv4: connections to an IPv6 guest address
            // take the stack, as do all while the agent is not ready.
            if let (SocketAddr::V4(g4), SocketAddr::V4(c4)) = (guest, client)
                && fast
                && self.fast.ready()
            {
                self.accept_fast(stream, peer, c4, g4, rule);
                continue;
            }
            self.accept_stack(stream, peer, guest, client, rule);
        }
    }

    /// Delivers datagrams from published-UDP clients to the guest, from the
    /// client's own address.
    pub(super) fn udp_from_clients(&mut self, idx: usize, now: Instant) {
        if self.stack.guest_mac().is_none() {
            // The guest has not spoken yet; nothing can be addressed to it.
            // Drain so the socket does not stay readable forever.
            if let Some(Slot {
                flow: Flow::UdpListen(l),
                ..
            }) = self.flows.get(idx)
            {
                let mut sink = [0u8; 64];
                while l.socket.recv_from(&mut sink).is_ok() {
                    self.stats.count_drop(DropReason::NoFlow);
                }
            }
            return;
        }
        let mut train = TrainOut::new(self.tap.tx());
        // Clients seen, in order (consecutive repeats folded), noted once
        // the frames are out.
        let mut seen: Vec<(SocketAddr, SocketAddr, SocketAddr)> = Vec::new();
        let mut more = true;
        let mut lid = 0;
        for _ in 0..4 {
            let Some(Slot {
                flow: Flow::UdpListen(l),
                id,
                ..
            }) = self.flows.get(idx)
            else {
                more = false;
                break;
            };
            let (guest_ip, guest_port) = (l.guest_ip, l.guest_port);
            lid = *id;
            let n = self.udp_rx.recv(l.socket.as_fd()).unwrap_or(0);
            if n == 0 {
                more = false;
                break;
            }
            self.udp_io.recv_calls += 1;
            for i in 0..n {
                let m = self.udp_rx.msgs()[i];
                let Some((guest, client)) =
                    published_target(&self.cfg, guest_ip, guest_port, m.from)
                else {
                    continue;
                };
                let data = self.udp_rx.payload(i);
                train.push(
                    &mut self.stack,
                    &mut self.udp_io,
                    client,
                    guest,
                    data,
                    m.seg,
                );
                if seen.last() != Some(&(m.from, guest, client)) {
                    seen.push((m.from, guest, client));
                }
            }
            if n < udpio::BATCH {
                more = false;
                break;
            }
        }
        train.finish(&mut self.stack, &mut self.udp_io);
        for (peer, guest, client) in seen {
            self.udp_client_seen((guest, client), idx, lid, peer, now);
        }
        if more && let Some(s) = self.flows.get(idx) {
            let id = s.id;
            self.mark_dirty(idx, id);
        }
    }

    /// Sends a guest datagram back to a published-UDP client if `(src, dst)`
    /// is such a conversation. Returns whether it was one.
    pub(super) fn udp_return_to_client(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Range<usize>,
        now: Instant,
    ) -> bool {
        let Some(ret) = self.udp_return.get_mut(&(src, dst)) else {
            return false;
        };
        ret.last = now;
        let (slot, id, client) = (ret.slot, ret.id, ret.client);
        self.udp_client_touch((src, dst));
        let Some(Slot {
            flow: Flow::UdpListen(l),
            id: sid,
            ..
        }) = self.flows.get(slot)
        else {
            self.forget_udp_client((src, dst));
            return false;
        };
        if *sid != id {
            self.forget_udp_client((src, dst));
            return false;
        }
        let data = &self.tap.split().0[payload];
        // One datagram, or a USO super-frame of several.
        let seg = self.rx_udp_gso.map_or(data.len(), usize::from);
        let (sent, r) = udpio::send_segments(l.socket.as_fd(), client, data, seg);
        self.udp_io
            .note_send(sent, data.len().div_ceil(seg.max(1)).max(1));
        if self.rx_udp_gso.is_some() {
            self.udp_io.uso_in += 1;
        }
        if let Err(e) = r {
            debug!(%client, error = %e, "udp reply to client failed");
        }
        true
    }

    /// Forgets published-UDP conversations idle for the UDP timeout,
    /// oldest first from the recency index.
    pub(super) fn sweep_udp_returns(&mut self, now: Instant) {
        let idle = Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
        while let Some(&(at, g, c)) = self.udp_return_lru.first() {
            if at + idle > now {
                break;
            }
            self.udp_return_lru.pop_first();
            match self.udp_return.get_mut(&(g, c)) {
                // Active since it was indexed: file it under its last use.
                Some(r) if r.last + idle > now => {
                    r.indexed = r.last;
                    self.udp_return_lru.insert((r.last, g, c));
                }
                _ => {
                    self.udp_return.remove(&(g, c));
                }
            }
        }
    }

    /// Records a datagram from a published-UDP client (`key`: guest
    /// endpoint, client as the guest sees it); a new client at the
    /// `udp_clients` bound evicts the least recently used one (counted as
    /// `limit`).
    fn udp_client_seen(
        &mut self,
        key: (SocketAddr, SocketAddr),
        slot: usize,
        id: u64,
        client: SocketAddr,
        now: Instant,
    ) {
        if let Some(r) = self.udp_return.get_mut(&key) {
            (r.slot, r.id, r.client, r.last) = (slot, id, client, now);
            self.udp_client_touch(key);
            return;
        }
        if self.udp_return.len() >= self.limits.udp_clients.max(1) {
            if let Some((_, g, c)) = self.udp_return_lru.pop_first() {
                self.udp_return.remove(&(g, c));
            }
            self.limit_reached("published-UDP clients");
        }
        self.udp_return.insert(
            key,
            UdpReturn {
                slot,
                id,
                client,
                last: now,
                indexed: now,
            },
        );
        self.udp_return_lru.insert((now, key.0, key.1));
    }

    /// Re-files a conversation in the recency index after use, at most once
    /// a second.
    fn udp_client_touch(&mut self, key: (SocketAddr, SocketAddr)) {
        let Some(r) = self.udp_return.get_mut(&key) else {
            return;
        };
        if r.last < r.indexed + Duration::from_secs(1) {
            return;
        }
        self.udp_return_lru.remove(&(r.indexed, key.0, key.1));
        r.indexed = r.last;
        self.udp_return_lru.insert((r.last, key.0, key.1));
    }

    fn forget_udp_client(&mut self, key: (SocketAddr, SocketAddr)) {
        if let Some(r) = self.udp_return.remove(&key) {
            self.udp_return_lru.remove(&(r.indexed, key.0, key.1));
        }
    }

    /// Forgets the conversations of published-UDP socket `slot`.
    pub(super) fn forget_udp_clients_of(&mut self, slot: usize) {
        self.udp_return.retain(|_, r| r.slot != slot);
        let map = &self.udp_return;
        self.udp_return_lru
            .retain(|(_, g, c)| map.contains_key(&(*g, *c)));
    }

    /// Where a guest connection or datagram to `dst` goes when `dst` is the
    /// host (the gateway or one of the host's own addresses) at a port rnet
    /// publishes for `proto`: that port's socket, reached over the host's
    /// loopback, whatever the loopback switch (hairpin, as a home router's
    /// NAT loopback). The published port then delivers it to the guest from
    /// the gateway address. A rule bound to one host address is reached at
    /// that address (its clients then appear as that address). None when
    /// `dst` is no such port.
    pub(super) fn hairpin(&self, proto: Proto, dst: SocketAddr) -> Option<SocketAddr> {
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let gateway = ip == IpAddr::V4(self.cfg.gateway())
            || self.cfg.ipv6_gateway().is_some_and(|g| ip == IpAddr::V6(g));
        if !gateway && (ip.is_loopback() || !self.local.contains(ip)) {
            return None;
        }
        let port = dst.port();
        let loopback = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        self.rules.values().find_map(|r| {
            let spec = &r.info.spec;
            let first = u32::from(spec.host_port);
            if spec.proto != proto
                || u32::from(port) < first
                || u32::from(port) >= first + u32::from(spec.count)
            {
                return None;
            }
            let target = match spec.host_ip {
                // [::] takes IPv4 clients too; 0.0.0.0 only IPv4.
                IpAddr::V6(h) if h.is_unspecified() => loopback,
                IpAddr::V4(h) if h.is_unspecified() && ip.is_ipv4() => loopback,
                h if h == ip => h,
                h if gateway && h.is_loopback() && h.is_ipv4() == ip.is_ipv4() => h,
                _ => return None,
            };
            Some(SocketAddr::new(target, port))
        })
    }

    /// Publishes the rules given at start-up; the first failure is returned.
    pub(crate) fn publish_initial(&mut self) -> Result<(), PortError> {
        if let Some(w) = self.worker.take() {
            self.next_rule = self.next_rule.max(w.next_rule);
            if let Some(kept) = w.kept {
                for k in kept {
                    let (id, spec) = (k.id, k.spec);
                    if let Err(e) = self.adopt_rule(id, spec, k.fds) {
                        warn!(id, rule = %spec, error = %e, "a published port was lost in the restart");
                    }
                }
                return Ok(());
            }
        }
        for spec in self.cfg.publish.clone() {
            self.add_rule(spec)?;
        }
        Ok(())
    }
}

/// A listener a previous data plane bound, as this one's.
fn adopt_listener(proto: Proto, fd: OwnedFd) -> Bound {
    match proto {
        Proto::Tcp => Bound::Tcp(TcpListener::from_std(std::net::TcpListener::from(fd))),
        Proto::Udp => Bound::Udp(UdpSocket::from_std(std::net::UdpSocket::from(fd))),
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind(proto: Proto, addr: SocketAddr, iface: Option<IfName>) -> io::Result<Bound> {
    let domain = Domain::for_address(addr);
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let s = Socket::new(domain, ty.nonblocking().cloexec(), Some(p))?;
    if let IpAddr::V6(ip) = addr.ip()
        && ip.is_unspecified()
    {
        // [::] also takes IPv4 clients, as users expect of a wildcard.
        s.set_only_v6(false)?;
    }
    if let Some(i) = iface {
        s.bind_device(Some(i.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("binding to interface {i}: {e}")))?;
    }
    match proto {
        Proto::Tcp => {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(Bound::Tcp(TcpListener::from_std(s.into())))
        }
        Proto::Udp => {
            s.bind(&addr.into())?;
            udpio::enable_gro(s.as_fd());
            Ok(Bound::Udp(UdpSocket::from_std(s.into())))
        }
    }
}

fn bind_error(spec: PortSpec, addr: SocketAddr, e: io::Error) -> PortError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => PortError::InUse {
            spec,
            port: addr.port(),
        },
        Some(libc::EMFILE) | Some(libc::ENFILE) => PortError::Unsupported(format!(
            "{spec}: cannot bind {addr}: too many open files; raise the open-file limit (ulimit -n, LimitNOFILE=) above the number of published ports"
        )),
        Some(libc::EACCES) if addr.port() < 1024 => PortError::Privileged {
            spec,
            port: addr.port(),
        },
        _ => PortError::Bind {
            spec,
            addr,
            source: e,
        },
    }
}

// ---------------------------------------------------------------------------
// The fast path's agent, seen from the event loop.

/// Token of the agent's control socket.
pub(super) const AGENT: Token = Token(4);
/// Token of the launcher's control socket.
pub(super) const LAUNCHER: Token = Token(5);

/// How long one agent request may stay unanswered before the agent is
/// declared stalled.
const AGENT_DEADLINE: Duration = Duration::from_millis(1500);
/// How long a new agent may take to be forked and to join the namespaces.
const AGENT_START_DEADLINE: Duration = Duration::from_secs(5);
/// Agent requests outstanding at most; more connections take the stack.
const MAX_OUTSTANDING: usize = 64;
/// First and longest wait before a new agent is asked for.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Releases kept for a later agent at most.
const MAX_DEFERRED: usize = 4096;
/// Descriptors held in reserve (pipes: two each) for the moment a
/// descriptor from the agent finds no free number.
const RESERVE_PIPES: usize = 2;

/// Where the agent of the fast path stands.
enum AgentState {
    /// No fast path (not asked for, or it cannot work here).
    Off,
    /// Serving requests.
    Ready(crate::ns::Agent),
    /// Forked, waiting for its "joined" report until the deadline.
    Joining(crate::ns::Agent, Instant),
    /// A new agent was asked of the launcher, until the deadline.
    Requested(Instant),
    /// Unhealthy: a new agent is asked for at this time.
    Backoff(Instant),
}

/// A request the agent has not answered yet.
struct Pending {
    what: PendingWhat,
    deadline: Instant,
}

enum PendingWhat {
    Connect {
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        /// The client as the guest sees it.
        client: SocketAddrV4,
        guest: SocketAddrV4,
        rule: u64,
        transparent: bool,
    },
    Release(SocketAddrV4),
}

/// The fast path's agent and everything the loop keeps about it. While the
/// agent is anything but ready, published TCP ports take the stack path.
pub struct FastPath {
    target: Option<crate::ns::Target>,
    launcher: Option<std::sync::Arc<crate::ns::Launcher>>,
    state: AgentState,
    /// Answers expected from the agent, oldest first (it answers in order).
    pending: VecDeque<Pending>,
    /// Consecutive agent failures (for the backoff).
    failures: u32,
    /// Agents started after the first.
    restarts: u64,
    /// Whether the current trouble was logged.
    warned: bool,
    reserve: Vec<OwnedFd>,
    next_refill: Instant,
    /// Per-connection reply rules to remove once an agent can take the
    /// request (their connection ended, or never got its socket, while no
    /// agent was ready): a rule left behind would divert the guest's
    /// replies to a later stack-path connection from the same client.
    deferred: Vec<SocketAddrV4>,
}

impl Default for FastPath {
    fn default() -> Self {
        FastPath {
            target: None,
            launcher: None,
            state: AgentState::Off,
            pending: VecDeque::new(),
            failures: 0,
            restarts: 0,
            warned: false,
            reserve: Vec::new(),
            next_refill: Instant::ZERO,
            deferred: Vec::new(),
        }
    }
}

impl FastPath {
    /// Asks for the fast path in `target`'s namespaces.
    pub(super) fn enable(&mut self, target: crate::ns::Target) {
        self.target = Some(target);
    }

    /// Whether the fast path exists at all (a launcher runs).
    fn enabled(&self) -> bool {
        self.launcher.is_some()
    }

    /// Whether a new connection can go through the agent now.
    fn ready(&self) -> bool {
        matches!(self.state, AgentState::Ready(_)) && self.pending.len() < MAX_OUTSTANDING
    }

    /// The earliest deadline the loop must wake up for.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let state = match &self.state {
            AgentState::Joining(_, at) | AgentState::Requested(at) | AgentState::Backoff(at) => {
                Some(*at)
            }
            _ => None,
        };
        let front = self.pending.front().map(|p| p.deadline);
        match (state, front) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Releases the reply rule of a transparent connection that ended;
    /// later if no agent can take the request now.
    pub(super) fn release(&mut self, client: SocketAddrV4) {
        if let AgentState::Ready(agent) = &mut self.state
            && self.pending.len() < 2 * MAX_OUTSTANDING
            && agent.submit(crate::ns::Submit::Release(client)).is_ok()
        {
            self.pending.push_back(Pending {
                what: PendingWhat::Release(client),
                deadline: crate::stack::now() + AGENT_DEADLINE,
            });
        } else {
            self.defer_release(client);
        }
    }

    fn defer_release(&mut self, client: SocketAddrV4) {
        if self.deferred.len() < MAX_DEFERRED {
            self.deferred.push(client);
        }
    }

    /// Sends deferred releases while the agent is ready and not busy.
    fn flush_deferred(&mut self) {
        while matches!(self.state, AgentState::Ready(_)) && self.pending.len() < MAX_OUTSTANDING {
            let Some(client) = self.deferred.pop() else {
                return;
            };
            let left = self.deferred.len();
            self.release(client);
            if self.deferred.len() > left {
                // Deferred again: the agent cannot take it now.
                return;
            }
        }
    }

    /// Keeps [`RESERVE_PIPES`] pipes open, trying at most once a second.
    fn refill_reserve(&mut self, now: Instant) {
        if self.reserve.len() >= 2 * RESERVE_PIPES || now < self.next_refill {
            return;
        }
        self.next_refill = now + Duration::from_secs(1);
        while self.reserve.len() < 2 * RESERVE_PIPES {
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    self.reserve.push(r);
                    self.reserve.push(w);
                }
                Err(_) => return,
            }
        }
    }

    /// The agent's part of the status report.
    pub(super) fn status(&self) -> serde_json::Value {
        let (state, pid) = match &self.state {
            AgentState::Off => ("off", None),
            AgentState::Ready(a) => ("ready", Some(a.pid())),
            AgentState::Joining(a, _) => ("starting", Some(a.pid())),
            AgentState::Requested(_) => ("starting", None),
            AgentState::Backoff(_) => ("restarting", None),
        };
        serde_json::json!({
            "state": state,
            "pid": pid,
            "restarts": self.restarts,
            "outstanding": self.pending.len(),
        })
    }
}

impl Engine {
    /// Starts the launcher and the first agent that make the fast path
    /// possible, and moves the TCP rules published so far onto it. Blocks
    /// (up to a few seconds) for the agent: this runs at start-up.
    pub(super) fn start_agent(&mut self) {
        let Some(target) = self.fast.target.take() else {
            return;
        };
        let started = crate::ns::Launcher::spawn(&target).and_then(|l| {
            let agent = l.spawn_agent()?;
            Ok((l, agent))
        });
        let (launcher, agent) = match started {
            Ok(x) => x,
            Err(e) => {
                warn!(
                    "fast path for published TCP ports unavailable ({e}); they use the stack path"
                );
                return;
            }
        };
        let reg = self.poll.registry();
        let registered = reg
            .register(
                &mut SourceFd(&launcher.raw_fd()),
                LAUNCHER,
                Interest::READABLE,
            )
            .and_then(|()| match agent.raw_fd() {
                Some(fd) => reg.register(&mut SourceFd(&fd), AGENT, Interest::READABLE),
                None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
            });
        if let Err(e) = registered {
            warn!(
                "fast path for published TCP ports unavailable (cannot watch the agent: {e}); they use the stack path"
            );
            return;
        }
        info!(
            pid = agent.pid(),
            launcher = launcher.pid(),
            "namespace agent ready"
        );
        self.fast.launcher = Some(launcher);
        self.fast.state = AgentState::Ready(agent);
        self.fast.refill_reserve(crate::stack::now());
        let ids: Vec<u64> = self.rules.keys().copied().collect();
        for id in ids {
            let Some(rule) = self.rules.get(&id) else {
                continue;
            };
            if rule.info.spec.proto != Proto::Tcp || !rule.info.guest_ip.is_ipv4() {
                continue;
            }
            let slots = rule.slots.clone();
            if self.route_rule(&slots)
                && let Some(rule) = self.rules.get_mut(&id)
            {
                rule.info.path = "fast";
                info!(id, rule = %rule.info.spec, path = "fast", "published port moved to the fast path");
            }
        }
    }

    /// Marks the listeners of a TCP rule as carried by the fast path
    /// (while the agent is healthy); false if there is no fast path or the
    /// guest address is IPv6.
    fn route_rule(&mut self, slots: &[(usize, u64)]) -> bool {
        if !self.fast.enabled() {
            return false;
        }
        let guest = self.cfg.guest();
        let all_v4 = slots
            .iter()
            .all(|(idx, _)| match self.flows.get(*idx).map(|s| &s.flow) {
                Some(Flow::TcpListen(l)) => l.guest_v4(guest).is_some(),
                _ => true,
            });
        if !all_v4 {
            return false;
        }
        for (idx, _) in slots {
            if let Some(Slot {
                flow: Flow::TcpListen(l),
                ..
            }) = self.flows.get_mut(*idx)
            {
                l.fast = true;
            }
        }
        true
    }

    /// Hands an accepted connection to the agent (the answer comes later,
    /// in [`Engine::agent_event`]); the stack path if it cannot take it.
    fn accept_fast(
        &mut self,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        client: SocketAddrV4,
        guest: SocketAddrV4,
        rule: u64,
    ) {
        let submitted = match &mut self.fast.state {
            AgentState::Ready(agent) if self.fast.pending.len() < MAX_OUTSTANDING => agent
                .submit(crate::ns::Submit::Transparent { client, guest })
                .is_ok(),
            _ => false,
        };
        if !submitted {
            self.accept_stack(stream, peer, guest.into(), client.into(), rule);
            return;
        }
        self.fast.pending.push_back(Pending {
            what: PendingWhat::Connect {
                stream,
                peer,
                client,
                guest,
                rule,
                transparent: true,
            },
            deadline: crate::stack::now() + AGENT_DEADLINE,
        });
    }

    /// The agent's or the launcher's socket is readable.
    pub(super) fn agent_event(&mut self, token: Token, now: Instant) {
        if token == LAUNCHER {
            self.launcher_event(now);
            return;
        }
        match &mut self.fast.state {
            AgentState::Joining(agent, _) => match agent.poll_joined() {
                Ok(false) => return,
                Ok(true) => {
                    let AgentState::Joining(agent, _) =
                        std::mem::replace(&mut self.fast.state, AgentState::Off)
                    else {
                        return;
                    };
                    info!(
                        pid = agent.pid(),
                        "namespace agent restarted; published TCP ports use the fast path again"
                    );
                    self.fast.restarts += 1;
                    self.fast.warned = false;
                    self.fast.state = AgentState::Ready(agent);
                }
                Err(e) => {
                    self.agent_unhealthy(&format!("a new agent failed: {e}"), now);
                    return;
                }
            },
            AgentState::Ready(_) => {}
            _ => return,
        }
        // Answers, in the order of the requests.
        loop {
            let AgentState::Ready(agent) = &mut self.fast.state else {
                return;
            };
            let reply = match agent.try_reply() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    self.agent_unhealthy(&e.to_string(), now);
                    return;
                }
            };
            let Some(p) = self.fast.pending.pop_front() else {
                self.agent_unhealthy("answered a request that was never sent", now);
                return;
            };
            self.agent_answered(p.what, reply, now);
        }
    }

    /// One answer of the agent to the request `what`.
    fn agent_answered(&mut self, what: PendingWhat, reply: crate::ns::Reply, now: Instant) {
        let PendingWhat::Connect {
            stream,
            peer,
            client,
            guest,
            rule,
            transparent,
        } = what
        else {
            return;
        };
        let fd = match reply {
            crate::ns::Reply::Ok { fd: Some(fd), .. } => fd,
            crate::ns::Reply::Ok {
                fd: None,
                fd_lost: true,
            } => {
                // No free descriptor number in rnet: free the reserve so
                // this connection (on the stack path) and the next ones
                // have room; the agent did nothing wrong.
                self.fast.reserve.clear();
                self.fast.next_refill = now + Duration::from_secs(1);
                self.stats.count_drop(DropReason::AgentFdLost);
                warn!(
                    "a descriptor from the namespace agent was lost (rnet is out of descriptors; raise its open-file limit); the connection takes the stack path"
                );
                if transparent {
                    self.fast.release(client);
                }
                self.accept_stack(stream, peer, guest.into(), client.into(), rule);
                return;
            }
            crate::ns::Reply::Ok { fd: None, .. } => {
                self.accept_stack(stream, peer, guest.into(), client.into(), rule);
                self.agent_unhealthy("reported success but sent no descriptor", now);
                return;
            }
            crate::ns::Reply::Refused(e) => {
                if transparent {
                    // The client's address cannot be reused right now
                    // (e.g. the same loopback port still in TIME-WAIT):
                    // connect without it.
                    debug!(%client, error = %e, "transparent connect failed; connecting plainly");
                    let again = match &mut self.fast.state {
                        AgentState::Ready(agent) => {
                            agent.submit(crate::ns::Submit::Plain(guest)).is_ok()
                        }
                        _ => false,
                    };
                    if again {
                        self.fast.pending.push_back(Pending {
                            what: PendingWhat::Connect {
                                stream,
                                peer,
                                client,
                                guest,
                                rule,
                                transparent: false,
                            },
                            deadline: now + AGENT_DEADLINE,
                        });
                    } else {
                        self.accept_stack(stream, peer, guest.into(), client.into(), rule);
                    }
                } else {
                    debug!(error = %e, "plain connect failed");
                    self.stats.count_drop(DropReason::HostSocket);
                }
                return;
            }
        };
        let expect_local = transparent.then_some(client);
        if let Err(why) = crate::nat::splice::check_guest_socket(&fd, expect_local, guest) {
            drop(fd);
            self.stats.count_drop(DropReason::AgentBadFd);
            self.accept_stack(stream, peer, guest.into(), client.into(), rule);
            self.agent_unhealthy(
                &format!("sent a descriptor that is not the socket asked for ({why:?})"),
                now,
            );
            return;
        }
        self.fast.failures = 0;
        self.start_splice(stream, peer, fd, transparent.then_some(client), guest, rule);
    }

    /// The launcher answered (a new agent), or went away.
    fn launcher_event(&mut self, now: Instant) {
        let Some(launcher) = self.fast.launcher.clone() else {
            return;
        };
        loop {
            match launcher.receive_agent() {
                Ok(None) => return,
                Ok(Some(agent)) => {
                    if !matches!(self.fast.state, AgentState::Requested(_)) {
                        // Not asked for (any more): let it go.
                        drop(agent);
                        continue;
                    }
                    let watched = agent.raw_fd().is_some_and(|fd| {
                        self.poll
                            .registry()
                            .register(&mut SourceFd(&fd), AGENT, Interest::READABLE)
                            .is_ok()
                    });
                    if !watched {
                        self.agent_unhealthy("cannot watch the new agent", now);
                        continue;
                    }
                    self.fast.state = AgentState::Joining(agent, now + AGENT_START_DEADLINE);
                }
                Err(e) => {
                    warn!(
                        "the namespace agent's launcher is gone ({e}); published TCP ports use the stack path from now on"
                    );
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&launcher.raw_fd()));
                    self.fast.launcher = None;
                    if !matches!(self.fast.state, AgentState::Ready(_)) {
                        self.fast.state = AgentState::Off;
                    }
                    return;
                }
            }
        }
    }

    /// Deadlines of the agent's requests and restarts; run every loop turn.
    pub(super) fn agent_tick(&mut self, now: Instant) {
        if !self.fast.enabled() {
            if let AgentState::Ready(_) = self.fast.state {
                // The launcher went; the agent may keep serving.
            } else {
                return;
            }
        }
        self.fast.refill_reserve(now);
        if !self.fast.deferred.is_empty() {
            self.fast.flush_deferred();
        }
        if self.fast.pending.front().is_some_and(|p| p.deadline <= now) {
            self.agent_unhealthy(
                &format!("did not answer within {} ms", AGENT_DEADLINE.total_millis()),
                now,
            );
        }
        match self.fast.state {
            AgentState::Joining(_, at) if at <= now => {
                self.agent_unhealthy("a new agent did not join the namespaces in time", now);
            }
            AgentState::Requested(at) if at <= now => {
                self.agent_unhealthy("the launcher did not start a new agent in time", now);
            }
            AgentState::Backoff(at) if at <= now => {
                let asked = self
                    .fast
                    .launcher
                    .as_ref()
                    .is_some_and(|l| l.request_agent().is_ok());
                self.fast.state = if asked {
                    AgentState::Requested(now + AGENT_START_DEADLINE)
                } else {
                    AgentState::Off
                };
            }
            _ => {}
        }
    }

    /// The agent died, stalled or misbehaved: it is killed, its waiting
    /// connections take the stack path, and a new one is asked for after a
    /// backoff. Logged once per incident.
    fn agent_unhealthy(&mut self, why: &str, now: Instant) {
        let old = std::mem::replace(&mut self.fast.state, AgentState::Off);
        let pid = match old {
            AgentState::Ready(mut a) | AgentState::Joining(mut a, _) => {
                if let Some(fd) = a.raw_fd() {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
                a.kill();
                Some(a.pid())
            }
            _ => None,
        };
        let backoff = BACKOFF_MIN
            .total_millis()
            .saturating_mul(1u64 << self.fast.failures.min(10))
            .min(BACKOFF_MAX.total_millis());
        self.fast.failures = self.fast.failures.saturating_add(1);
        if !self.fast.warned {
            self.fast.warned = true;
            warn!(
                ?pid,
                "namespace agent unhealthy: {why}; published TCP ports use the stack path until a new agent is ready"
            );
        } else {
            debug!(?pid, "namespace agent unhealthy again: {why}");
        }
        if self.fast.launcher.is_some() {
            self.fast.state = AgentState::Backoff(now + Duration::from_millis(backoff));
        }
        let pending: Vec<Pending> = self.fast.pending.drain(..).collect();
        for p in pending {
            match p.what {
                PendingWhat::Connect {
                    stream,
                    peer,
                    client,
                    guest,
                    rule,
                    transparent,
                } => {
                    // The agent may have added the client's rule before it
                    // stopped answering.
                    if transparent {
                        self.fast.defer_release(client);
                    }
                    self.accept_stack(stream, peer, guest.into(), client.into(), rule);
                }
                PendingWhat::Release(client) => self.fast.defer_release(client),
            }
        }
    }

    /// Starts the spliced flow of a connection whose guest side the agent
    /// opened (and rnet checked).
    fn start_splice(
        &mut self,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        fd: OwnedFd,
        transparent: Option<SocketAddrV4>,
        guest: SocketAddrV4,
        rule: u64,
    ) {
        let flow = match crate::nat::splice::SpliceFlow::new(stream, fd) {
            Ok(mut f) => {
                f.transparent_client = transparent;
                f.expected_peer = Some(guest.into());
                Box::new(f)
            }
            Err(e) => {
                debug!(error = %e, "cannot set up splice pipes");
                self.stats.count_drop(DropReason::HostSocket);
                if let Some(c) = transparent {
                    self.fast.release(c);
                }
                return;
            }
        };
        let Some((midx, mid)) = self.add_flow(Flow::Splice(flow), rule) else {
            if let Some(c) = transparent {
                self.fast.release(c);
            }
            return;
        };
        // The guest-side socket reports under an alias slot of its own.
        let alias = self.flows.insert_alias(midx, mid);
        let ok = match &mut self.flows[midx].flow {
            Flow::Splice(f) => self
                .poll
                .registry()
                .register(
                    &mut f.guest,
                    Token(alias + FIRST_FLOW),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok(),
            _ => false,
        };
        self.splice_alias.insert(midx, alias);
        if !ok {
            self.remove(midx);
            return;
        }
        debug!(%peer, %guest, path = "fast", "published connection");
        self.stats.tcp_opened.fetch_add(1, Ordering::Relaxed);
        self.stats.tcp_flows.fetch_add(1, Ordering::Relaxed);
        self.mark_dirty(midx, mid);
    }

    /// Starts a stack-path flow for an accepted connection.
    fn accept_stack(
        &mut self,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        guest: SocketAddr,
        client: SocketAddr,
        rule: u64,
    ) {
        let key = (guest, client);
        if self.flows.tcp_count() >= self.limits.tcp_flows {
            self.limit_reached("TCP flows");
            return;
        }
        if self.flows.tcp_slot(&key).is_some() {
            self.stats.count_drop(DropReason::HostSocket);
            return;
        }
        let flow = match TcpFlow::inbound(key, stream, peer, &mut self.stack.iface) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "cannot start inbound flow");
                return;
            }
        };
        debug!(%peer, %guest, "published connection");
        let Some((fidx, fid)) = self.add_tcp(Box::new(flow), rule) else {
            return;
        };
        self.mark_dirty(fidx, fid);
    }
}
