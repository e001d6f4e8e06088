//! A minimal synchronous rtnetlink client for configuring an interface in the
//! current network namespace: link up, MTU, MAC, an IPv4 address and the
//! default route; and, for the port-publishing agent, policy-routing rules
//! and a `local` route in a table of their own. Each request asks for an ACK
//! and waits for it; a negative ACK comes back as the kernel's errno.
//!
//! A route through a gateway is refused (`EINVAL`, `ENETUNREACH`) while the
//! kernel does not yet see the gateway as on-link: just after the link came
//! up or its address was added, on a loaded machine. [`until_ready`] retries
//! such requests with a short backoff until a deadline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;

/// Size of the receive buffer; ACKs are tiny, this leaves room for echoes.
const RECV_BUF: usize = 64 * 1024;

/// How long [`until_ready`] keeps retrying.
pub const READY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors with which the kernel refuses a route whose link or gateway is
/// not ready yet (the link still coming up, the on-link prefix of a new
/// address not in place).
fn not_ready(e: Errno) -> bool {
    matches!(
        e,
        Errno::EINVAL | Errno::ENETUNREACH | Errno::EHOSTUNREACH | Errno::ENETDOWN
    )
}

/// Runs `op` until it succeeds, fails with an error that waiting cannot
/// change, or `deadline` has passed (backing off from 1 ms to 50 ms between
/// tries). The error comes with how many tries were refused as not ready
/// (0: refused for another reason at once).
pub fn until_ready<T>(
    deadline: std::time::Duration,
    mut op: impl FnMut() -> Result<T, Errno>,
) -> Result<T, (Errno, u32)> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    let mut refused = 0;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if not_ready(e) && start.elapsed() < deadline => {
                refused += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            Err(e) if not_ready(e) => return Err((e, refused + 1)),
            Err(e) => return Err((e, 0)),
        }
    }
}

/// A route netlink socket talking to the kernel of the current namespace.
pub struct RtNetlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Turns an I/O error from the socket into an errno.
fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl RtNetlink {
    /// Opens a NETLINK_ROUTE socket connected to the kernel.
    pub fn open() -> Result<Self, Errno> {
        let sock = Socket::new(NETLINK_ROUTE).map_err(|e| io_errno(&e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| io_errno(&e))?;
        Ok(RtNetlink {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `msg` with `extra_flags` (besides REQUEST|ACK) and waits for the
    /// kernel's ACK to it.
    fn request(&mut self, msg: RouteNetlinkMessage, extra_flags: u16) -> Result<(), Errno> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        loop {
            match self.sock.send(&out, 0) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(io_errno(&e)),
            }
        }
        loop {
            self.buf.clear();
            let n = match self.sock.recv(&mut self.buf, 0) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(io_errno(&e)),
            };
            if n > self.buf.len() {
                return Err(Errno::EMSGSIZE);
            }
            if let Some(result) = find_ack(&self.buf[..n], seq)? {
                return result;
            }
        }
    }

    /// Sets the administrative state of interface `index` to up.
    pub fn set_up(&mut self, index: u32) -> Result<(), Errno> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    /// Sets the MTU of interface `index`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Errno> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    /// Sets the hardware address of interface `index`.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), Errno> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    /// Adds (or replaces) `addr/prefix_len` on interface `index`.
    pub fn add_ipv4_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), Errno> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        if let Some(brd) = broadcast(addr, prefix_len) {
            msg.attributes.push(AddressAttribute::Broadcast(brd));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds (or replaces) the IPv4 default route via `gateway` on `index`.
    pub fn add_default_route_v4(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), Errno> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds (or replaces) `addr/prefix_len` on interface `index`, usable at
    /// once (no duplicate address detection).
    pub fn add_ipv6_address(
        &mut self,
        index: u32,
        addr: Ipv6Addr,
        prefix_len: u8,
    ) -> Result<(), Errno> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet6;
        msg.header.prefix_len = prefix_len;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V6(addr)));
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds (or replaces) the IPv6 default route via `gateway` on `index`.
    pub fn add_default_route_v6(&mut self, index: u32, gateway: Ipv6Addr) -> Result<(), Errno> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet6;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds (or replaces) `local 0.0.0.0/0 dev INDEX` in routing table
    /// `table`: whatever a rule sends to that table is delivered locally.
    pub fn add_local_default_route_v4(&mut self, table: u32, index: u32) -> Result<(), Errno> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 0;
        // Tables above 255 only fit the attribute; the header says "see it".
        msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Host;
        msg.header.kind = RouteType::Local;
        msg.attributes.push(RouteAttribute::Table(table));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds the rule `priority PRIO from IP ipproto tcp sport PORT lookup
    /// TABLE` for the TCP endpoint `from`. An identical rule already present
    /// is not duplicated: the kernel answers EEXIST, reported as success.
    /// Needs Linux 4.17 or newer (FRA_IP_PROTO, FRA_SPORT_RANGE); older
    /// kernels would silently drop those attributes, so callers check first.
    pub fn add_tcp_source_rule(
        &mut self,
        from: SocketAddrV4,
        table: u32,
        priority: u32,
    ) -> Result<(), Errno> {
        self.add_rule(tcp_source_rule(from, table, priority))
    }

    /// Removes the rule [`add_tcp_source_rule`](Self::add_tcp_source_rule)
    /// added; a rule that is not there (ENOENT) counts as removed.
    pub fn del_tcp_source_rule(
        &mut self,
        from: SocketAddrV4,
        table: u32,
        priority: u32,
    ) -> Result<(), Errno> {
        self.del_rule(tcp_source_rule(from, table, priority))
    }

    /// Adds `priority PRIO to IP ipproto tcp dport PORT lookup TABLE` for
    /// the TCP endpoint `to` (EEXIST counts as success).
    pub fn add_tcp_dest_rule(
        &mut self,
        to: SocketAddrV4,
        table: u32,
        priority: u32,
    ) -> Result<(), Errno> {
        self.add_rule(tcp_dest_rule(to, table, priority))
    }

    /// Removes the rule [`add_tcp_dest_rule`](Self::add_tcp_dest_rule)
    /// added (ENOENT counts as removed).
    pub fn del_tcp_dest_rule(
        &mut self,
        to: SocketAddrV4,
        table: u32,
        priority: u32,
    ) -> Result<(), Errno> {
        self.del_rule(tcp_dest_rule(to, table, priority))
    }

    /// Adds a policy rule; one already present is not an error.
    fn add_rule(&mut self, msg: RuleMessage) -> Result<(), Errno> {
        match self.request(RouteNetlinkMessage::NewRule(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(Errno::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Deletes a policy rule; one already gone is not an error.
    fn del_rule(&mut self, msg: RuleMessage) -> Result<(), Errno> {
        match self.request(RouteNetlinkMessage::DelRule(msg), 0) {
            Err(Errno::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// The rule message matching TCP segments to `to` (address and port).
fn tcp_dest_rule(to: SocketAddrV4, table: u32, priority: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.dst_len = 32;
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.action = RuleAction::ToTable;
    msg.attributes.extend([
        RuleAttribute::Priority(priority),
        RuleAttribute::Destination(IpAddr::V4(*to.ip())),
        RuleAttribute::IpProtocol(IpProtocol::Tcp),
        RuleAttribute::DestinationPortRange(RulePortRange {
            start: to.port(),
            end: to.port(),
        }),
        RuleAttribute::Table(table),
    ]);
    msg
}

/// The rule message matching TCP segments from `from` (address and port).
fn tcp_source_rule(from: SocketAddrV4, table: u32, priority: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.src_len = 32;
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.action = RuleAction::ToTable;
    let port = from.port();
    msg.attributes.extend([
        RuleAttribute::Priority(priority),
        RuleAttribute::Source(IpAddr::V4(*from.ip())),
        RuleAttribute::IpProtocol(IpProtocol::Tcp),
        RuleAttribute::SourcePortRange(RulePortRange {
            start: port,
            end: port,
        }),
        RuleAttribute::Table(table),
    ]);
    msg
}

/// Looks through one datagram of netlink messages for the ACK to `seq`:
/// `Ok(Some(Ok(())))` for a positive ACK, `Ok(Some(Err(errno)))` for a
/// negative one, `Ok(None)` if it is not in this datagram.
fn find_ack(mut data: &[u8], seq: u32) -> Result<Option<Result<(), Errno>>, Errno> {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            return Err(Errno::EBADMSG);
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len])
            .map_err(|_| Errno::EBADMSG)?;
        if msg.header.sequence_number == seq {
            match msg.payload {
                NetlinkPayload::Error(e) => {
                    return Ok(Some(match e.code {
                        None => Ok(()),
                        Some(code) => Err(Errno::from_raw(code.get().wrapping_neg())),
                    }));
                }
                NetlinkPayload::Done(_) => return Ok(Some(Ok(()))),
                _ => {}
            }
        }
        let aligned = (len + 3) & !3;
        data = data.get(aligned..).unwrap_or(&[]);
    }
    Ok(None)
}

/// The broadcast address of `addr/prefix_len`, for prefixes that have one.
fn broadcast(addr: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    if prefix_len >= 31 {
        return None;
    }
    let host_mask = u32::MAX >> prefix_len;
    Some(Ipv4Addr::from(u32::from(addr) | host_mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    fn encode_error(seq: u32, code: i32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut err = ErrorMessage::default();
        err.code = NonZeroI32::new(code);
        let mut msg =
            NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(err));
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        out
    }

    #[test]
    fn waits_only_for_readiness() {
        let mut n = 0;
        let r = until_ready(READY_DEADLINE, || {
            n += 1;
            if n < 4 { Err(Errno::EINVAL) } else { Ok(n) }
        });
        assert_eq!(r, Ok(4));
        let mut n = 0;
        let r: Result<(), _> = until_ready(READY_DEADLINE, || {
            n += 1;
            Err(Errno::EPERM)
        });
        assert_eq!((r, n), (Err((Errno::EPERM, 0)), 1), "not a readiness error");
        let r: Result<(), _> = until_ready(std::time::Duration::from_millis(20), || {
            Err(Errno::ENETUNREACH)
        });
        let (e, refused) = r.unwrap_err();
        assert_eq!(e, Errno::ENETUNREACH);
        assert!(refused >= 2, "{refused}");
    }

    #[test]
    fn ack_parsing() {
        assert_eq!(find_ack(&encode_error(3, 0), 3), Ok(Some(Ok(()))));
        assert_eq!(
            find_ack(&encode_error(3, -libc::EEXIST), 3),
            Ok(Some(Err(Errno::EEXIST)))
        );
        // Another sequence number is skipped; a later message matches.
        let mut two = encode_error(2, -libc::EPERM);
        two.extend(encode_error(5, 0));
        assert_eq!(find_ack(&two, 5), Ok(Some(Ok(()))));
        assert_eq!(find_ack(&encode_error(2, 0), 5), Ok(None));
        assert_eq!(find_ack(&[0xff; 20], 1), Err(Errno::EBADMSG));
    }

    #[test]
    fn tcp_source_rule_attributes() {
        let from: SocketAddrV4 = "10.0.2.100:8080".parse().expect("addr");
        let msg = tcp_source_rule(from, 0x524e, 100);
        assert_eq!(msg.header.src_len, 32);
        assert_eq!(msg.header.action, RuleAction::ToTable);
        for want in [
            RuleAttribute::Priority(100),
            RuleAttribute::Source(IpAddr::V4(*from.ip())),
            RuleAttribute::IpProtocol(IpProtocol::Tcp),
            RuleAttribute::SourcePortRange(RulePortRange {
                start: 8080,
                end: 8080,
            }),
            RuleAttribute::Table(0x524e),
        ] {
            assert!(msg.attributes.contains(&want), "{want:?} missing");
        }
    }

    #[test]
    fn broadcast_addresses() {
        let a = Ipv4Addr::new(10, 0, 2, 100);
        assert_eq!(broadcast(a, 24), Some(Ipv4Addr::new(10, 0, 2, 255)));
        assert_eq!(broadcast(a, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast(a, 31), None);
        assert_eq!(broadcast(a, 32), None);
    }
}
