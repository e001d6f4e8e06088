//! Frame dispatch: what happens to each frame the guest sends, on the
//! classifier's [`Verdict`].
//!
//! The verdict borrows the TAP's receive buffer. What rnet answers itself
//! (ARP, neighbour discovery, router solicitations, DHCP, echo to its own
//! addresses, refusals) is built from the verdict's slices with the stack,
//! the transmit half and the service state borrowed separately. The NAT
//! paths (TCP, UDP, relayed echo, DNS) also consult the published ports
//! (hairpins, replies to published-UDP clients) and the flow table, so they
//! take the verdict's places in the receive buffer (offsets, which stay
//! valid until the next read) and the whole engine; TCP needs the buffer
//! writable anyway (the SYN's MSS is rewritten, payload cut at the memory
//! budget).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Duration as StdDuration;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, Icmpv4DstUnreachable};
use tracing::{debug, info, warn};

use super::flows::Flow;
use super::{Engine, MAX_DNS_QUERIES, Slot, header};
use crate::config::Services;
use crate::nat::icmp::{self, IcmpFlow};
use crate::nat::tcp::{self, TcpFlow};
use crate::nat::udp::UdpFlow;
use crate::nat::udpio::{self, Push};
use crate::nat::{Deny, Route, route, route_any};
use crate::phy::tap::TapTx;
use crate::services::dhcp::DhcpServer;
use crate::services::dns::DnsQuery;
use crate::stack::Stack;
use crate::stats::{DropReason, Stats};
use crate::wire::classify::{Verdict, classify};
use crate::wire::emit::{self, Header};

/// Where `part` (a slice of `frame`) lies in it.
fn range_in(frame: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - frame.as_ptr() as usize;
    start..start + part.len()
}

/// Whether what the guest sent is for a service left on ([`Services`]).
fn serves(s: &Services, v: &Verdict<'_>) -> bool {
    match v {
        // New connections only: a published port's stack-path flow (the
        // guest answering a SYN) is not the guest opening one.
        Verdict::Tcp { syn_only, .. } => s.tcp || !*syn_only,
        Verdict::Udp { .. } => s.udp,
        Verdict::Echo { .. } | Verdict::Echo6 { .. } => s.icmp,
        Verdict::Dhcp { .. } => s.dhcp,
        Verdict::NeighborSolicit { .. } => s.ndp,
        Verdict::RouterSolicit => s.ra,
        Verdict::Drop(_) | Verdict::Arp | Verdict::NeighborAdvert => true,
    }
}

/// Answers a DHCP client message.
fn dhcp_reply(
    dhcp: &mut DhcpServer,
    stack: &mut Stack,
    msg: &[u8],
    mut tx: TapTx<'_>,
    stats: &Stats,
) {
    let h = Header {
        eth_src: stack.mac,
        eth_dst: EthernetAddress::BROADCAST,
        ident: stack.next_ident(),
    };
    let mut res = Ok(None);
    tx.build(|buf| {
        let Some(out) = buf.get_mut(emit::UDP_PAYLOAD_OFFSET..) else {
            return 0;
        };
        res = dhcp.handle(msg, std::time::Instant::now(), out);
        match &res {
            Ok(Some(r)) => {
                let h = Header {
                    eth_dst: EthernetAddress(r.dst_mac),
                    ..h
                };
                emit::udp_frame(buf, &h, r.src, r.dst, r.len)
            }
            _ => 0,
        }
    });
    match res {
        Ok(Some(r)) => debug!(kind = ?r.kind, addr = %r.yiaddr, "dhcp"),
        Ok(None) => {}
        Err(e) => {
            stats.count_drop(DropReason::Dhcp);
            debug!(error = %e, "dhcp message dropped");
        }
    }
}

/// A USO super-frame (datagrams of `seg` bytes) must be UDP and hold more
/// than one datagram of its segment size: anything else is forged.
fn uso_well_formed(seg: Option<u16>, v: &Verdict<'_>) -> bool {
    match (seg, v) {
        (None, _) => true,
        (Some(seg), Verdict::Udp { payload, .. }) => seg > 0 && payload.len() >= usize::from(seg),
        (Some(_), _) => false,
    }
}

impl Engine {
    /// The offload metadata of the frame of `len` bytes just read, or None
    /// (counted) when the frame cannot be from a well-behaved guest.
    fn admit(&mut self, len: usize) -> Option<crate::phy::vnet::RxMeta> {
        let meta = self.tap.rx_meta();
        if meta.unsupported {
            // A GSO type rnet never enabled (UDP fragmentation offload).
            self.stats.count_drop(DropReason::Unsupported);
            return None;
        }
        if len > self.stack.mtu + 14 && !meta.gso {
            // Larger than the link allows: the guest's TAP MTU was raised
            // behind rnet's back, or the frame is forged. (A TSO burst from
            // the guest kernel is one TCP segment of up to 64 KiB.)
            self.stats.count_drop(DropReason::Malformed);
            return None;
        }
        Some(meta)
    }

    /// Handles the frame of `len` bytes just read from the TAP.
    pub(super) fn on_frame(&mut self, len: usize, now: Instant) {
        let Some(meta) = self.admit(len) else {
            return;
        };
        let (rx, mut tx) = self.tap.split();
        let frame = &rx[..len];
        let c = classify(
            frame,
            self.stack.mac,
            &self.stack.addrs,
            meta.l4_csum_vouched,
        );
        let (v, src_mac) = (c.verdict, c.src_mac);
        if !matches!(v, Verdict::Drop(_)) {
            if self.stack.guest_mac.is_none() {
                self.ndp.guest_appeared(&self.stack, now);
            }
            self.stack.guest_mac = Some(src_mac);
        }
        if !serves(&self.cfg.services, &v) {
            self.stats.count_drop(DropReason::Policy);
            return;
        }
        self.rx_udp_gso = meta.udp_gso;
        if !uso_well_formed(meta.udp_gso, &v) {
            self.udp_io.uso_in_bad += 1;
            self.stats.count_drop(DropReason::Malformed);
            return;
        }
        match v {
            Verdict::Drop(r) => self.stats.count_drop(r),
            Verdict::Arp | Verdict::NeighborAdvert => {
                self.stack.ingress(now, frame, tx, &mut self.services)
            }
            Verdict::Dhcp { payload } => {
                dhcp_reply(&mut self.dhcp, &mut self.stack, payload, tx, &self.stats)
            }
            Verdict::NeighborSolicit { src, target } => {
                self.ndp
                    .neighbor_advert(&self.stack, src, target, src_mac, tx)
            }
            Verdict::RouterSolicit => self.ndp.router_advert(&self.stack, tx),
            Verdict::Echo {
                src,
                dst,
                ident,
                seq,
                icmp,
            } if self.stack.addrs.is_virtual(dst) => {
                let h = header(&mut self.stack);
                let Some(data) = icmp.get(8..) else { return };
                tx.build(|buf| emit::echo_reply(buf, &h, dst, src, ident, seq, data));
            }
            // Answered for rnet's own addresses, relayed through a ping
            // socket where the address policy allows, refused elsewhere.
            Verdict::Echo6 {
                src,
                dst,
                ident,
                seq,
                icmp,
            } if self.stack.addrs.v6.is_some_and(|v6| v6.is_virtual(dst)) => {
                let h = header(&mut self.stack);
                let Some(data) = icmp.get(8..) else { return };
                tx.build(|buf| emit::echo6_reply(buf, &h, dst, src, ident, seq, data));
            }
            Verdict::Echo {
                src,
                dst,
                icmp,
                ident,
                ..
            } => {
                let icmp = range_in(frame, icmp);
                match route(&self.cfg, &self.local, SocketAddrV4::new(dst, 0)) {
                    Route::Host(_) => self.relay_echo(src.into(), dst.into(), ident, icmp, now),
                    Route::Dns | Route::Deny(_) => self.deny(Deny::NotAllowed, src, dst, 14, len),
                }
            }
            Verdict::Echo6 {
                src,
                dst,
                icmp,
                ident,
                ..
            } => {
                let icmp = range_in(frame, icmp);
                match crate::nat::route6(&self.cfg, &self.local, SocketAddrV6::new(dst, 0, 0, 0)) {
                    Route::Host(_) => self.relay_echo(src.into(), dst.into(), ident, icmp, now),
                    Route::Dns | Route::Deny(_) => self.deny6(Deny::NotAllowed, src, 14, len),
                }
            }
            Verdict::Udp {
                src,
                dst,
                payload,
                ip,
            } => {
                let (payload, ip_off) = (range_in(frame, payload), range_in(frame, ip).start);
                self.on_udp(src, dst, payload, ip_off, len, now);
            }
            Verdict::Tcp {
                src,
                dst,
                syn_only,
                ip,
            } => {
                let ip_off = range_in(frame, ip).start;
                self.on_tcp(src, dst, syn_only, src_mac, ip_off, len, now);
            }
        }
    }

    /// A guest datagram (its payload at `payload` in the receive buffer).
    fn on_udp(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Range<usize>,
        ip_off: usize,
        len: usize,
        now: Instant,
    ) {
        let route = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(d)) => route(&self.cfg, &self.local, d),
            (SocketAddr::V6(_), SocketAddr::V6(d)) => crate::nat::route6(&self.cfg, &self.local, d),
            _ => return self.stats.count_drop(DropReason::Malformed),
        };
        if self.udp_return_to_client(src, dst, payload.clone(), now)
            || self.udp_hairpin(src, dst, payload.clone(), now)
        {
            return;
        }
        match route {
            Route::Host(target) => self.udp_out(src, target, None, payload, now),
            Route::Dns => self.dns_query(src, payload, now),
            Route::Deny(d) => self.deny_any(d, src.ip(), dst.ip(), ip_off, len),
        }
    }

    /// A guest TCP segment (its IP packet at `ip_off..len` in the receive
    /// buffer): to its flow, a new flow for a SYN, else a reset.
    #[allow(clippy::too_many_arguments)]
    fn on_tcp(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        syn_only: bool,
        src_mac: EthernetAddress,
        ip_off: usize,
        len: usize,
        now: Instant,
    ) {
        let mut guest_mss = None;
        if let SocketAddr::V6(s6) = src {
            let tx = self.tap.tx();
            let ip = *s6.ip();
            self.ndp
                .learn(&mut self.stack, now, ip, src_mac, tx, &mut self.services);
            if self.tap.offloads() {
                guest_mss = crate::stack::rewrite_syn_mss(&mut self.tap.rx_mut()[ip_off..len]);
            }
        }
        let Some(idx) = self.flows.tcp_slot(&(src, dst)) else {
            if syn_only {
                self.tcp_open(src, dst, len, ip_off, guest_mss, now);
            } else {
                // A stray segment: with no listener smoltcp answers RST.
                self.stats.count_drop(DropReason::NoFlow);
                let (rx, tx) = self.tap.split();
                self.stack.ingress(now, &rx[..len], tx, &mut self.services);
            }
            return;
        };
        let mut len = len;
        if !self
            .flows
            .charge_guest_data(idx, &self.tap.rx_mut()[ip_off..len])
        {
            // At the budget: take the ACK, not the data.
            if let Some(n) = tcp::strip_payload(&mut self.tap.rx_mut()[ip_off..len]) {
                len = ip_off + n;
                self.flows.note_stripped();
            }
        }
        let id = self.flows[idx].id;
        if let Some(f) = self.flows.tcp_mut(idx) {
            // On a published port: the guest's SYN-ACK.
            f.set_guest_mss(guest_mss);
            let (rx, tx) = self.tap.split();
            f.note_guest_segment(&rx[ip_off..len]);
            f.ingress(&mut self.stack, now, &rx[..len], tx);
        }
        self.flows.mark_dirty(idx, id);
    }

    /// Starts a TCP flow for the SYN in the current TAP frame.
    fn tcp_open(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        len: usize,
        ip_off: usize,
        guest_mss: Option<u16>,
        now: Instant,
    ) {
        let hairpin = self.hairpin(crate::ports::Proto::Tcp, dst);
        let route = match hairpin {
            Some(t) => Route::Host(t),
            None => route_any(&self.cfg, &self.local, dst),
        };
        if matches!(route, Route::Dns) {
            self.refresh_upstreams();
        }
        let (target, bind) = match route {
            // A hairpin goes to rnet's own listener on the host's loopback;
            // it needs no outbound source address.
            Route::Host(t) if hairpin.is_some() => (t, None),
            Route::Host(t) => (t, self.cfg.outbound_bind(t.ip())),
            Route::Dns => match self.upstreams.first() {
                Some(t) => (*t, None),
                None => {
                    self.stats.count_drop(DropReason::Policy);
                    return;
                }
            },
            Route::Deny(d) => {
                self.deny_any(d, src.ip(), dst.ip(), ip_off, len);
                return;
            }
        };
        if let Some(what) = self.flows.tcp_refusal(src.ip()) {
            self.limit_reached(what);
            // No listener exists for this SYN, so smoltcp answers RST.
            let (rx, tx) = self.tap.split();
            self.stack.ingress(now, &rx[..len], tx, &mut self.services);
            return;
        }
        let (rx, tx) = self.tap.split();
        let frame = &rx[..len];
        let ip = &frame[ip_off..];
        match TcpFlow::open((src, dst), target, bind, ip) {
            Ok(mut f) => {
                f.set_guest_mss(guest_mss);
                f.note_guest_segment(ip);
                f.ingress(&mut self.stack, now, frame, tx);
                debug!(guest = %src, dst = %dst, %target, "tcp flow");
                if let Some((idx, id)) = self.add_tcp(Box::new(f), 0) {
                    self.flows.mark_dirty(idx, id);
                }
            }
            Err(e) => {
                debug!(guest = %src, dst = %dst, error = %e, "host connect failed at once");
                match (src, dst) {
                    (SocketAddr::V4(s4), SocketAddr::V4(d4)) => {
                        match tcp::connect_error_reply(&e) {
                            Some(code) => self.icmp_error(code, *d4.ip(), *s4.ip(), ip_off, len),
                            None => {
                                // No listener exists, so smoltcp resets the SYN.
                                self.stack.ingress(now, frame, tx, &mut self.services);
                            }
                        }
                    }
                    (SocketAddr::V6(s6), SocketAddr::V6(d6)) => {
                        match tcp::connect_error_reply6(&e) {
                            Some(code) => self.icmp6_error(code, *d6.ip(), *s6.ip(), ip_off, len),
                            None => self.stack.ingress(now, frame, tx, &mut self.services),
                        }
                    }
                    _ => {}
                }
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    self.stats.count_drop(DropReason::HostSocket);
                }
            }
        }
    }

    /// ICMP unreachable for the packet at `ip_off` in the current TAP frame.
    fn icmp_error(
        &mut self,
        code: Icmpv4DstUnreachable,
        from: Ipv4Addr,
        to: Ipv4Addr,
        ip_off: usize,
        len: usize,
    ) {
        let h = header(&mut self.stack);
        let (rx, mut tx) = self.tap.split();
        let orig = &rx[ip_off..len];
        tx.build(|buf| emit::dst_unreachable(buf, &h, from, to, code, orig));
    }

    /// Refuses the guest packet at `ip_off..len` of the current TAP frame:
    /// counts it and answers per the policy.
    fn deny(&mut self, d: Deny, guest: Ipv4Addr, dst: Ipv4Addr, ip_off: usize, len: usize) {
        self.stats.count_drop(DropReason::Policy);
        debug!(%guest, %dst, reason = ?d, "refused");
        let Some(code) = d.icmp_code() else { return };
        // The gateway reports, as the router on the path would.
        let from = self.stack.addrs.gateway;
        self.icmp_error(code, from, guest, ip_off, len);
    }

    /// ICMPv6 unreachable for the packet at `ip_off` in the current TAP frame.
    fn icmp6_error(
        &mut self,
        code: emit::Unreach6,
        from: Ipv6Addr,
        to: Ipv6Addr,
        ip_off: usize,
        len: usize,
    ) {
        let h = header(&mut self.stack);
        let (rx, mut tx) = self.tap.split();
        let Some(orig) = rx.get(ip_off..len) else {
            return;
        };
        tx.build(|buf| emit::dst_unreachable6(buf, &h, from, to, code, orig));
    }

    /// [`Self::deny`] for an IPv6 guest packet; the gateway (::2) reports.
    fn deny6(&mut self, d: Deny, guest: Ipv6Addr, ip_off: usize, len: usize) {
        self.stats.count_drop(DropReason::Policy);
        debug!(%guest, reason = ?d, "refused (ipv6)");
        let (Some(code), Some(v6)) = (d.icmp6_code(), self.stack.addrs.v6) else {
            return;
        };
        self.icmp6_error(code, v6.gateway, guest, ip_off, len);
    }

    /// [`Self::deny`] or [`Self::deny6`] by family.
    fn deny_any(&mut self, d: Deny, guest: IpAddr, dst: IpAddr, ip_off: usize, len: usize) {
        match (guest, dst) {
            (IpAddr::V4(g), IpAddr::V4(t)) => self.deny(d, g, t, ip_off, len),
            (IpAddr::V6(g), _) => self.deny6(d, g, ip_off, len),
            _ => self.stats.count_drop(DropReason::Policy),
        }
    }

    /// Sends a guest datagram from `src` to `target` through the flow of
    /// `src`; `shown` is the destination the guest used when the answers
    /// come from elsewhere (a hairpin).
    fn udp_out(
        &mut self,
        src: SocketAddr,
        target: SocketAddr,
        shown: Option<SocketAddr>,
        payload: Range<usize>,
        now: Instant,
    ) {
        if self.flows.udp_slot(&src).is_none() {
            // Eviction may close the flow a batch is waiting for.
            self.flush_udp_batch();
            self.make_room_for_udp(src.ip());
        }
        let idx = match self.flows.udp_slot(&src) {
            Some(i) => i,
            None => match UdpFlow::open(src, self.cfg.outbound_bind(src.ip()), now) {
                Ok(f) => {
                    let r = self.flows.insert_udp(f, self.poll.registry());
                    let Some(idx) = self.registered(r) else {
                        return;
                    };
                    let at =
                        now + Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
                    self.flows.schedule(idx, at);
                    idx
                }
                Err(e) => {
                    self.stats.count_drop(DropReason::HostSocket);
                    let wall = std::time::Instant::now();
                    if self
                        .last_udp_open_warn
                        .is_none_or(|t| wall.duration_since(t) >= StdDuration::from_secs(10))
                    {
                        self.last_udp_open_warn = Some(wall);
                        warn!(guest = %src, error = %e, "cannot open a UDP socket; the datagram is dropped (counted as `host_socket`; this message repeats at most every 10 s)");
                    }
                    return;
                }
            },
        };
        if let Flow::Udp(f) = &mut self.flows[idx].flow {
            f.note_send(target, shown, now);
        }
        match self.rx_udp_gso {
            Some(seg) => {
                // A super-frame from the guest: on in one segmented send.
                self.flush_udp_batch();
                let seg = usize::from(seg);
                let data = &self.tap.split().0[payload];
                if let Flow::Udp(f) = &self.flows[idx].flow {
                    let (sent, r) = udpio::send_segments(f.socket.as_fd(), target, data, seg);
                    self.udp_io.note_send(sent, data.len().div_ceil(seg));
                    self.udp_io.uso_in += 1;
                    if let Err(e) = r {
                        debug!(guest = %src, %target, error = %e, "udp send failed");
                        self.stats.count_drop(DropReason::HostSocket);
                    }
                }
            }
            None => {
                let data = &self.tap.split().0[payload.clone()];
                if self.udp_batch.push((idx, target), data) == Push::Flush {
                    self.flush_udp_batch();
                    let data = &self.tap.split().0[payload];
                    self.udp_batch.push((idx, target), data);
                }
            }
        }
        self.flows.udp_touch(idx);
    }

    /// Sends the gathered datagrams of one flow (one `UDP_SEGMENT` send
    /// where the kernel takes it).
    pub(super) fn flush_udp_batch(&mut self) {
        let Some(((idx, target), data, seg, n)) = self.udp_batch.take() else {
            return;
        };
        let Some(Slot {
            flow: Flow::Udp(f), ..
        }) = self.flows.get(idx)
        else {
            return;
        };
        let (sent, r) = udpio::send_segments(f.socket.as_fd(), target, data, seg);
        self.udp_io.note_send(sent, n);
        if let Err(e) = r {
            debug!(guest = %f.guest, %target, error = %e, "udp send failed");
            self.stats.count_drop(DropReason::HostSocket);
        }
    }

    /// Sends a guest datagram to a port rnet publishes back through that
    /// port (hairpin); false if `dst` is not one.
    fn udp_hairpin(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Range<usize>,
        now: Instant,
    ) -> bool {
        match self.hairpin(crate::ports::Proto::Udp, dst) {
            Some(mut target) => {
                // IPv4 flow sockets bound to --outbound-addr cannot send to
                // loopback; that address is the host's too, so the
                // published socket takes the datagram there.
                if let (Some(out), SocketAddr::V4(t)) = (self.cfg.outbound_addr(), target)
                    && t.ip().is_loopback()
                {
                    target = SocketAddr::from((out, t.port()));
                }
                self.udp_out(src, target, Some(dst), payload, now);
                true
            }
            None => false,
        }
    }

    /// Re-reads the upstreams if their resolv.conf changed (looked at most
    /// once a second). A file without nameservers keeps the old ones.
    pub(super) fn refresh_upstreams(&mut self) {
        let Some(w) = self.resolv.as_mut() else {
            return;
        };
        match w.poll(std::time::Instant::now()) {
            None => {}
            Some(Ok(ups)) if ups.is_empty() => {
                warn!(path = %w.path().display(), "resolv.conf now lists no nameserver; keeping the previous DNS upstreams");
            }
            Some(Ok(ups)) if ups != self.upstreams => {
                let list: Vec<String> = ups.iter().map(ToString::to_string).collect();
                info!(path = %w.path().display(), upstreams = %list.join(","), "resolv.conf changed; new DNS upstreams");
                self.upstreams = ups;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(path = %w.path().display(), error = %e, "resolv.conf changed but cannot be read; keeping the previous DNS upstreams");
            }
        }
    }

    fn dns_query(&mut self, src: SocketAddr, payload: Range<usize>, now: Instant) {
        self.refresh_upstreams();
        if self.stats.dns_queries.load(Ordering::Relaxed) as usize >= MAX_DNS_QUERIES {
            self.stats.count_drop(DropReason::HostSocket);
            return;
        }
        let query = &self.tap.split().0[payload];
        match DnsQuery::start(src, query, &self.upstreams) {
            Ok(q) => {
                let r = self.flows.insert_dns(q, self.poll.registry());
                let Some(idx) = self.registered(r) else {
                    return;
                };
                let at = now + Duration::from_micros(self.cfg.dns_timeout.as_micros() as u64);
                self.flows.schedule(idx, at);
            }
            Err(e) => {
                debug!(guest = %src, error = %e, "dns query not forwarded");
                self.stats.count_drop(DropReason::HostSocket);
            }
        }
    }

    /// Relays a guest echo request (the ICMP or ICMPv6 message at `icmp`
    /// in the current TAP frame) through the ping socket of its identifier.
    fn relay_echo(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        icmp: Range<usize>,
        now: Instant,
    ) {
        if self.flows.icmp_full(&(src, ident)) {
            self.limit_reached("ICMP echo identifiers");
            return;
        }
        let idx = match self.flows.icmp_slot(&(src, ident)) {
            Some(i) => i,
            None => match IcmpFlow::open(src, ident, self.cfg.outbound_bind(src), now) {
                Ok(f) => {
                    let r = self.flows.insert_icmp(f, self.poll.registry());
                    let Some(idx) = self.registered(r) else {
                        return;
                    };
                    let at =
                        now + Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
                    self.flows.schedule(idx, at);
                    idx
                }
                Err(e) => {
                    self.stats.count_drop(DropReason::HostSocket);
                    if !self.ping_warned {
                        self.ping_warned = true;
                        let gid = nix::unistd::getegid();
                        warn!(
                            error = %e,
                            "ICMP echo to {dst} cannot be relayed: the host's net.ipv4.ping_group_range ({}) does not admit rnet's group {gid}; allow it with `sysctl -w net.ipv4.ping_group_range=\"{gid} {gid}\"` (echo to the gateway is still answered; this is logged once)",
                            icmp::ping_group_range()
                        );
                    }
                    return;
                }
            },
        };
        let msg = &self.tap.split().0[icmp];
        if let Flow::Icmp(f) = &mut self.flows[idx].flow
            && let Err(e) = f.send(dst, msg, now)
        {
            debug!(%dst, error = %e, "echo not relayed");
            self.stats.count_drop(DropReason::HostSocket);
        }
    }
}
