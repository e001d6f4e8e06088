//! The host's own addresses: every destination the kernel of rnet's network
//! namespace delivers locally (route type `local` in the `local` routing
//! table, IPv4 and IPv6), kept current as addresses come and go.
//!
//! # Theory of operation
//!
//! A guest that may not reach the host's loopback could otherwise reach the
//! same services through any other address of the host: traffic to them is
//! delivered on `lo` too. [`LocalAddrs`] holds the `local` routes (single
//! addresses and whole local prefixes, as `ip route add local PREFIX dev
//! lo` makes) and answers [`LocalAddrs::contains`] with one hash lookup
//! plus a scan of the (rare) shorter prefixes.
//!
//! Two netlink route sockets are opened when the engine is built, before
//! the sandbox forbids new netlink sockets: one subscribed to the IPv4 and
//! IPv6 address groups, registered in the event loop, and one that dumps
//! the routing tables. Any address notification (or a lost one, ENOBUFS)
//! triggers a new dump, so the set follows `ip addr add/del`, DHCP renewals
//! and interfaces going away. (A `local` route added by hand without an
//! address is picked up at the next address change: route notifications
//! are not followed, since on a busy node they would mean a dump per
//! route change.) Both sockets need only `sendto`/`recvfrom` and the dump
//! socket a receive timeout, which the sandbox allows.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Multicast groups of address changes (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR).
const ADDR_GROUPS: u32 = 0x10 | 0x100;
/// Receive buffer for dumps and notifications (a dump part is at most
/// 32 KiB; a larger one would show as a malformed message).
const BUF: usize = 128 * 1024;
/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// The set of host-local addresses and prefixes.
#[derive(Debug, Default)]
pub struct LocalAddrs {
    hosts: HashSet<IpAddr>,
    prefixes: Vec<(IpAddr, u8)>,
    sockets: Option<Sockets>,
}

#[derive(Debug)]
struct Sockets {
    events: Socket,
    dump: Socket,
    seq: u32,
}

impl LocalAddrs {
    /// Opens the netlink sockets and reads the current set.
    pub fn open() -> io::Result<Self> {
        let mut events = Socket::new(NETLINK_ROUTE)?;
        events.bind(&SocketAddr::new(0, ADDR_GROUPS))?;
        events.set_non_blocking(true)?;
        let mut dump = Socket::new(NETLINK_ROUTE)?;
        dump.bind_auto()?;
        dump.connect(&SocketAddr::new(0, 0))?;
        // The event loop waits for dumps: never for long.
        nix::sys::socket::setsockopt(
            &dump,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )?;
        let mut me = Self {
            sockets: Some(Sockets {
                events,
                dump,
                seq: 0,
            }),
            ..Self::default()
        };
        me.refresh()?;
        Ok(me)
    }

    /// A fixed set, for tests and for running without netlink.
    pub fn fixed(addrs: impl IntoIterator<Item = (IpAddr, u8)>) -> Self {
        let mut me = Self::default();
        for (a, p) in addrs {
            me.insert(a, p);
        }
        me
    }

    fn insert(&mut self, addr: IpAddr, prefix: u8) {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        if prefix >= full {
            self.hosts.insert(addr);
        } else {
            self.prefixes.push((addr, prefix));
        }
    }

    /// Whether the host delivers `ip` locally.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.hosts.contains(&ip) || self.prefixes.iter().any(|&(net, len)| within(ip, net, len))
    }

    /// How many addresses and prefixes are known.
    pub fn len(&self) -> usize {
        self.hosts.len() + self.prefixes.len()
    }

    /// Whether none are known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The descriptor to watch for address changes.
    pub fn event_fd(&self) -> Option<RawFd> {
        self.sockets.as_ref().map(|s| s.events.as_raw_fd())
    }

    /// Drains pending notifications; if there were any (or some were lost),
    /// reads the set again. Returns whether it did.
    pub fn on_event(&mut self) -> io::Result<bool> {
        let Some(s) = self.sockets.as_mut() else {
            return Ok(false);
        };
        let mut changed = false;
        let mut buf = Vec::with_capacity(BUF);
        loop {
            buf.clear();
            match s.events.recv(&mut buf, 0) {
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Overrun: notifications were lost, so re-read everything.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                Err(e) => return Err(e),
            }
        }
        if changed {
            self.refresh()?;
        }
        Ok(changed)
    }

    /// Reads every `local` route of the `local` table, both families.
    pub fn refresh(&mut self) -> io::Result<()> {
        let Some(s) = self.sockets.as_mut() else {
            return Ok(());
        };
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            s.seq = s.seq.wrapping_add(1);
            dump_local(&s.dump, s.seq, family, &mut found)?;
        }
        self.hosts.clear();
        self.prefixes.clear();
        for (a, p) in found {
            self.insert(a, p);
        }
        Ok(())
    }
}

fn within(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len.min(128))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Sends one RTM_GETROUTE dump request and collects the `local` routes of
/// the `local` table from the answer.
fn dump_local(
    sock: &Socket,
    seq: u32,
    family: AddressFamily,
    out: &mut Vec<(IpAddr, u8)>,
) -> io::Result<()> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    msg.header.table = RT_TABLE_LOCAL;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(msg)),
    );
    nl.finalize();
    let mut req = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut req);
    loop {
        match sock.send(&req, 0) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let mut buf = Vec::with_capacity(BUF);
    loop {
        buf.clear();
        let n = match sock.recv(&mut buf, 0) {
            Ok(n) => n.min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut data = &buf[..n];
        while data.len() >= 16 {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < 16 || len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink message",
                ));
            }
            let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len]) else {
                data = data.get((len + 3) & !3..).unwrap_or(&[]);
                continue;
            };
            if m.header.sequence_number == seq {
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(io::Error::from_raw_os_error(code.get().wrapping_neg()));
                        }
                        return Ok(());
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                        if let Some(entry) = local_entry(&r) {
                            out.push(entry);
                        }
                    }
                    _ => {}
                }
            }
            data = data.get((len + 3) & !3..).unwrap_or(&[]);
        }
    }
}

/// The destination of a `local` route in the `local` table.
fn local_entry(r: &RouteMessage) -> Option<(IpAddr, u8)> {
    if r.header.kind != RouteType::Local {
        return None;
    }
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != u32::from(RT_TABLE_LOCAL) {
        return None;
    }
    let len = r.header.destination_prefix_length;
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    match (dst, r.header.address_family) {
        (Some(d), _) => Some((d, len)),
        // A local default route: everything is local.
        (None, AddressFamily::Inet) => Some((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        (None, AddressFamily::Inet6) => Some((IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_prefixes() {
        let l = LocalAddrs::fixed([
            ("198.18.0.1".parse().unwrap(), 32),
            ("192.0.2.0".parse().unwrap(), 24),
            ("fd43::1".parse().unwrap(), 128),
        ]);
        assert!(l.contains("198.18.0.1".parse().unwrap()));
        assert!(l.contains("::ffff:198.18.0.1".parse().unwrap()));
        assert!(l.contains("192.0.2.77".parse().unwrap()));
        assert!(!l.contains("192.0.3.1".parse().unwrap()));
        assert!(l.contains("fd43::1".parse().unwrap()));
        assert!(!l.contains("fd43::2".parse().unwrap()));
    }

    #[test]
    fn reads_this_namespace() {
        // The loopback address is local in every namespace with lo up; a
        // namespace where netlink is unavailable says so instead.
        match LocalAddrs::open() {
            Ok(l) => {
                if l.is_empty() {
                    eprintln!("no local routes here (lo down?)");
                } else {
                    assert!(l.contains(Ipv4Addr::LOCALHOST.into()), "{l:?}");
                }
            }
            Err(e) => eprintln!("netlink unavailable: {e}"),
        }
    }
}
