//! The event loop's side of port publishing (see [`crate::ports`] for the
//! theory): what needs the flow slab, the stack or the epoll registry. The
//! rules, the published-UDP client table and the hairpin lookup are
//! [`Publisher`]'s, the agent of the fast path [`FastPath`]'s; here their
//! answers become flows: listeners in the slab, accepted connections as
//! stack or spliced flows, UDP datagrams carried both ways, and the
//! requests other threads send to change the rules.
//!
//! [`Publisher`]: crate::ports::listeners::Publisher
//! [`FastPath`]: crate::ports::fastpath::FastPath

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use mio::{Interest, Token};
use smoltcp::time::{Duration, Instant};
use tracing::{debug, info, warn};

use super::{Engine, FIRST_FLOW, Flow, Slot};
use crate::nat::tcp::TcpFlow;
use crate::nat::udp::TrainOut;
use crate::nat::udpio;
use crate::ports::fastpath::{Conn, Outcome};
use crate::ports::listeners::{Command, Listener, Publisher, Rule, published_target};
use crate::ports::{PortError, PortInfo, PortSpec, Proto};
use crate::stats::DropReason;

/// Connections accepted per listener wake-up before other work runs.
const ACCEPT_BUDGET: usize = 64;

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
                    let _ = reply.send(self.ports.list());
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
        let (id, given) = match adopt {
            Some((id, fds)) => (id, Some(fds.into_iter())),
            None => (self.ports.next_id(), None),
        };
        let shown_guest = Publisher::check(&spec, &self.cfg)?;
        let (slots, bound_port) = self.open_listeners(spec, id, given)?;
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
        let rule = Rule {
            info: info.clone(),
            slots,
        };
        self.ports.insert(rule, adopted);
        Ok(info)
    }

    /// Puts a listener for each host port of `spec` (bound, or adopted from
    /// `given`) in the slab under rule `id`; all or nothing. Returns the
    /// slots and the first host port bound.
    fn open_listeners(
        &mut self,
        spec: PortSpec,
        id: u64,
        mut given: Option<std::vec::IntoIter<OwnedFd>>,
    ) -> Result<(Vec<(usize, u64)>, u16), PortError> {
        let mut slots: Vec<(usize, u64)> = Vec::with_capacity(spec.count as usize);
        let mut bound_port = spec.host_port;
        let mut failed = None;
        for i in 0..spec.count {
            let (listener, port) = match Listener::open(spec, i, given.as_mut()) {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if i == 0 {
                bound_port = port;
            }
            let flow = match listener {
                Listener::Tcp(l) => Flow::TcpListen(l),
                Listener::Udp(u) => Flow::UdpListen(u),
            };
            match self.add_flow(flow, id) {
                Some(slot) => slots.push(slot),
                None => {
                    let addr = SocketAddr::new(spec.host_ip, spec.host_port.wrapping_add(i));
                    failed = Some(PortError::Bind {
                        spec,
                        addr,
                        source: io::Error::other("epoll refused the socket"),
                    });
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for (idx, _) in slots {
                self.remove(idx);
            }
            return Err(e);
        }
        Ok((slots, bound_port))
    }

    /// Withdraws a rule: its listeners close; established connections stay
    /// until they end.
    fn remove_rule(&mut self, id: u64) -> Result<(), PortError> {
        let rule = self.ports.remove(id)?;
        for (idx, sid) in rule.slots {
            if self.flows.get(idx).is_some_and(|s| s.id == sid) {
                self.remove(idx);
            }
        }
        info!(id, rule = %rule.info.spec, "withdrawn");
        crate::supervise::forget_rule(id);
        Ok(())
    }

    /// Publishes the rules given at start-up; the first failure is returned.
    pub(crate) fn publish_initial(&mut self) -> Result<(), PortError> {
        if let Some(w) = self.worker.take() {
            self.ports.continue_from(w.next_rule);
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

    /// Where guest traffic to `dst` goes when it is one of rnet's own
    /// published ports (see [`Publisher::hairpin`]).
    pub(super) fn hairpin(&self, proto: Proto, dst: SocketAddr) -> Option<SocketAddr> {
        self.ports.hairpin(&self.cfg, &self.local, proto, dst)
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
                let conn = Conn {
                    stream,
                    peer,
                    client: c4,
                    guest: g4,
                    rule,
                };
                if let Err(conn) = self.fast.submit(conn) {
                    self.fast_outcomes(vec![Outcome::Stack(conn)]);
                }
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
        let cap = self.limits.udp_clients;
        for (peer, guest, client) in seen {
            if self
                .ports
                .udp_client_seen((guest, client), (idx, lid), peer, now, cap)
            {
                self.limit_reached("published-UDP clients");
            }
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
        let Some((slot, id, client)) = self.ports.udp_client((src, dst), now) else {
            return false;
        };
        let Some(Slot {
            flow: Flow::UdpListen(l),
            id: sid,
            ..
        }) = self.flows.get(slot)
        else {
            self.ports.forget_udp_client((src, dst));
            return false;
        };
        if *sid != id {
            self.ports.forget_udp_client((src, dst));
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

    /// Forgets published-UDP conversations idle for the UDP timeout.
    pub(super) fn sweep_udp_returns(&mut self, now: Instant) {
        let idle = Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
        self.ports.sweep_udp_clients(now, idle);
    }

    /// Starts the launcher and the first agent that make the fast path
    /// possible, and moves the TCP rules published so far onto it. Blocks
    /// (up to a few seconds) for the agent: this runs at start-up.
    pub(super) fn start_agent(&mut self) {
        if !self.fast.start(self.poll.registry()) {
            return;
        }
        for (id, slots) in self.ports.tcp_v4_rules() {
            if self.route_rule(&slots)
                && let Some(info) = self.ports.set_fast(id)
            {
                info!(id, rule = %info.spec, path = "fast", "published port moved to the fast path");
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
        let all_v4 = slots
            .iter()
            .all(|(idx, _)| match self.flows.get(*idx).map(|s| &s.flow) {
                Some(Flow::TcpListen(l)) => l.guest_v4(&self.cfg).is_some(),
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

    /// The agent's or the launcher's socket is readable.
    pub(super) fn agent_event(&mut self, token: Token, now: Instant) {
        let mut out = Vec::new();
        self.fast
            .on_event(token, self.poll.registry(), &self.stats, now, &mut out);
        self.fast_outcomes(out);
    }

    /// Deadlines of the agent's requests and restarts; run every loop turn.
    pub(super) fn agent_tick(&mut self, now: Instant) {
        let mut out = Vec::new();
        self.fast.tick(self.poll.registry(), now, &mut out);
        self.fast_outcomes(out);
    }

    /// Starts the flows of the connections the fast path settled.
    fn fast_outcomes(&mut self, out: Vec<Outcome>) {
        for o in out {
            match o {
                Outcome::Stack(c) => {
                    self.accept_stack(c.stream, c.peer, c.guest.into(), c.client.into(), c.rule)
                }
                Outcome::Splice {
                    conn,
                    fd,
                    transparent,
                } => {
                    let client = transparent.then_some(conn.client);
                    self.start_splice(conn.stream, conn.peer, fd, client, conn.guest, conn.rule);
                }
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
        let flow = match crate::ports::splice::SpliceFlow::new(stream, fd) {
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
        self.ports.splice_alias.insert(midx, alias);
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
