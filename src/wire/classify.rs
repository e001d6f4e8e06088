//! First look at every guest frame: validate it and decide who handles it.
//!
//! This is the only place that parses untrusted bytes before they reach a
//! handler. It uses smoltcp's checked views (`new_checked`), never panics,
//! and turns everything it cannot use into a [`DropReason`] to be counted.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv4Message,
    Icmpv4Packet, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

use crate::stack::{NetAddrs, V6Addrs};
use crate::stats::DropReason;

/// What to do with one guest frame.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// An ARP request for a virtual host (or a reply to rnet): smoltcp answers.
    Arp,
    /// A TCP segment with a valid (or kernel-vouched) checksum.
    Tcp {
        /// Guest endpoint.
        src: SocketAddr,
        /// Destination the guest dialled.
        dst: SocketAddr,
        /// SYN without ACK: the start of a connection.
        syn_only: bool,
        /// The IP packet, for ICMP errors quoting it.
        ip: &'a [u8],
    },
    /// A UDP datagram with a verified checksum.
    Udp {
        /// Guest endpoint.
        src: SocketAddr,
        /// Destination endpoint.
        dst: SocketAddr,
        /// The datagram's payload.
        payload: &'a [u8],
        /// The IP packet, for ICMP errors quoting it.
        ip: &'a [u8],
    },
    /// A DHCP client message for the server on the gateway (from 0.0.0.0
    /// or the guest, port 68, to the gateway or broadcast, port 67).
    Dhcp {
        /// The BOOTP/DHCP message.
        payload: &'a [u8],
    },
    /// An ICMP echo request.
    Echo {
        /// Guest address.
        src: Ipv4Addr,
        /// Pinged address.
        dst: Ipv4Addr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq: u16,
        /// The whole ICMP message (header included).
        icmp: &'a [u8],
    },
    /// An ICMPv6 echo request.
    Echo6 {
        /// Guest address.
        src: Ipv6Addr,
        /// Pinged address.
        dst: Ipv6Addr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq: u16,
        /// The whole ICMPv6 message (header included).
        icmp: &'a [u8],
    },
    /// A neighbour solicitation for one of rnet's IPv6 addresses.
    NeighborSolicit {
        /// Who asks (unspecified for duplicate address detection).
        src: Ipv6Addr,
        /// The address asked about.
        target: Ipv6Addr,
    },
    /// A neighbour advertisement addressed to rnet: smoltcp learns from it.
    NeighborAdvert,
    /// A router solicitation: answered with a router advertisement.
    RouterSolicit,
    /// Nothing to do but count it.
    Drop(DropReason),
}

/// A classified frame plus the guest's link address it came from.
#[derive(Debug)]
pub struct Classified<'a> {
    /// Source MAC of the frame (the guest's, when valid).
    pub src_mac: EthernetAddress,
    /// What to do.
    pub verdict: Verdict<'a>,
}

/// Classifies one Ethernet frame from the guest. `l4_vouched` says the
/// guest kernel vouched for the TCP/UDP checksum (see [`crate::phy::vnet::RxMeta`]),
/// which then is not checked: it may be partial by design.
pub fn classify<'a>(
    frame: &'a [u8],
    our_mac: EthernetAddress,
    addrs: &NetAddrs,
    l4_vouched: bool,
) -> Classified<'a> {
    let drop = |r| Classified {
        src_mac: EthernetAddress([0; 6]),
        verdict: Verdict::Drop(r),
    };
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return drop(DropReason::Malformed);
    };
    let src_mac = eth.src_addr();
    let dst_mac = eth.dst_addr();
    if !src_mac.is_unicast() {
        return drop(DropReason::Malformed);
    }
    let verdict = match eth.ethertype() {
        EthernetProtocol::Arp => arp(&frame[14..], addrs),
        EthernetProtocol::Ipv4 if dst_mac == our_mac || dst_mac.is_broadcast() => {
            ipv4(&frame[14..], addrs, l4_vouched)
        }
        EthernetProtocol::Ipv4 => Verdict::Drop(DropReason::NotForUs),
        EthernetProtocol::Ipv6 => match &addrs.v6 {
            Some(v6) if dst_mac == our_mac || dst_mac.0[..2] == [0x33, 0x33] => {
                ipv6(&frame[14..], v6, l4_vouched)
            }
            Some(_) => Verdict::Drop(DropReason::NotForUs),
            None => Verdict::Drop(DropReason::Unsupported),
        },
        _ => Verdict::Drop(DropReason::Unsupported),
    };
    Classified { src_mac, verdict }
}

fn arp(bytes: &[u8], addrs: &NetAddrs) -> Verdict<'static> {
    let Ok(arp) = ArpPacket::new_checked(bytes) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if arp.hardware_len() != 6 || arp.protocol_len() != 4 {
        return Verdict::Drop(DropReason::Unsupported);
    }
    let sender = Ipv4Addr::from(<[u8; 4]>::try_from(arp.source_protocol_addr()).unwrap_or([0; 4]));
    let target = Ipv4Addr::from(<[u8; 4]>::try_from(arp.target_protocol_addr()).unwrap_or([0; 4]));
    // Gratuitous ARP and announcements (sender == target) would make smoltcp,
    // which answers for any address under AnyIP, claim the guest's own
    // address; only questions about the virtual hosts pass.
    if sender == target || !addrs.is_virtual(target) {
        return Verdict::Drop(DropReason::NotForUs);
    }
    // A guest claiming to be the gateway or the DNS host is ignored.
    if !addrs.is_guest_source(sender) {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    match arp.operation() {
        ArpOperation::Request | ArpOperation::Reply => Verdict::Arp,
        _ => Verdict::Drop(DropReason::Unsupported),
    }
}

fn ipv4<'a>(bytes: &'a [u8], addrs: &NetAddrs, l4_vouched: bool) -> Verdict<'a> {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if ip.version() != 4 {
        return Verdict::Drop(DropReason::Malformed);
    }
    if !ip.verify_checksum() {
        return Verdict::Drop(DropReason::BadChecksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Verdict::Drop(DropReason::Fragment);
    }
    let src = ip.src_addr();
    let dst = ip.dst_addr();
    let ip_bytes = &bytes[..ip.total_len() as usize];
    let payload = &ip_bytes[ip.header_len() as usize..];
    if let Some(v) = dhcp(&ip, payload, addrs, l4_vouched) {
        return v;
    }
    if !addrs.is_guest_source(src) {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(payload) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            if !l4_vouched && !tcp.verify_checksum(&src.into(), &dst.into()) {
                return Verdict::Drop(DropReason::BadChecksum);
            }
            Verdict::Tcp {
                src: SocketAddrV4::new(src, tcp.src_port()).into(),
                dst: SocketAddrV4::new(dst, tcp.dst_port()).into(),
                syn_only: tcp.syn() && !tcp.ack() && !tcp.rst(),
                ip: ip_bytes,
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(payload) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            if !l4_vouched && udp.checksum() != 0 && !udp.verify_checksum(&src.into(), &dst.into())
            {
                return Verdict::Drop(DropReason::BadChecksum);
            }
            if udp.dst_port() == 0 || udp.src_port() == 0 {
                return Verdict::Drop(DropReason::Malformed);
            }
            let len = udp.len() as usize;
            Verdict::Udp {
                src: SocketAddrV4::new(src, udp.src_port()).into(),
                dst: SocketAddrV4::new(dst, udp.dst_port()).into(),
                payload: &payload[8..len],
                ip: ip_bytes,
            }
        }
        IpProtocol::Icmp => {
            let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            if !icmp.verify_checksum() {
                return Verdict::Drop(DropReason::BadChecksum);
            }
            if icmp.msg_type() != Icmpv4Message::EchoRequest || icmp.msg_code() != 0 {
                return Verdict::Drop(DropReason::Unsupported);
            }
            Verdict::Echo {
                src,
                dst,
                ident: icmp.echo_ident(),
                seq: icmp.echo_seq_no(),
                icmp: payload,
            }
        }
        _ => Verdict::Drop(DropReason::Unsupported),
    }
}

/// Whether `ip` is link-local unicast (fe80::/10).
fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The solicited-node multicast group of `ip` (RFC 4291 2.7.1).
fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

fn ipv6<'a>(bytes: &'a [u8], v6: &V6Addrs, l4_vouched: bool) -> Verdict<'a> {
    let Ok(ip) = Ipv6Packet::new_checked(bytes) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if ip.version() != 6 {
        return Verdict::Drop(DropReason::Malformed);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let ip_bytes = &bytes[..40 + usize::from(ip.payload_len())];
    let payload = &ip_bytes[40..];
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    if dst.is_multicast() {
        // Only groups rnet belongs to: all nodes, all routers and the
        // solicited-node groups of its own addresses (MLD reports and the
        // guest's other multicast are not for us).
        let ours = [v6.gateway, v6.dns, v6.link_local]
            .iter()
            .any(|a| solicited_node(*a) == dst);
        if dst != all_nodes && dst != all_routers && !ours {
            return Verdict::Drop(DropReason::NotForUs);
        }
    } else if !v6.is_virtual(dst) && !v6.is_guest_source(src) {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    match ip.next_header() {
        IpProtocol::Icmpv6 => icmpv6(&ip, payload, v6),
        _ if dst.is_multicast() => Verdict::Drop(DropReason::NotForUs),
        _ if !v6.is_guest_source(src) => Verdict::Drop(DropReason::SpoofedSource),
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(payload) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            if !l4_vouched && !tcp.verify_checksum(&src.into(), &dst.into()) {
                return Verdict::Drop(DropReason::BadChecksum);
            }
            Verdict::Tcp {
                src: SocketAddrV6::new(src, tcp.src_port(), 0, 0).into(),
                dst: SocketAddrV6::new(dst, tcp.dst_port(), 0, 0).into(),
                syn_only: tcp.syn() && !tcp.ack() && !tcp.rst(),
                ip: ip_bytes,
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(payload) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            // The checksum is mandatory over IPv6.
            if !l4_vouched && !udp.verify_checksum(&src.into(), &dst.into()) {
                return Verdict::Drop(DropReason::BadChecksum);
            }
            if udp.dst_port() == 0 || udp.src_port() == 0 {
                return Verdict::Drop(DropReason::Malformed);
            }
            let len = udp.len() as usize;
            Verdict::Udp {
                src: SocketAddrV6::new(src, udp.src_port(), 0, 0).into(),
                dst: SocketAddrV6::new(dst, udp.dst_port(), 0, 0).into(),
                payload: &payload[8..len],
                ip: ip_bytes,
            }
        }
        // Extension headers (fragments included) are not handled.
        _ => Verdict::Drop(DropReason::Unsupported),
    }
}

fn icmpv6<'a>(ip: &Ipv6Packet<&[u8]>, payload: &'a [u8], v6: &V6Addrs) -> Verdict<'a> {
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(icmp) = Icmpv6Packet::new_checked(payload) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if !icmp.verify_checksum(&src, &dst) {
        return Verdict::Drop(DropReason::BadChecksum);
    }
    let ndp = ip.hop_limit() == 255 && icmp.msg_code() == 0;
    let link_src = src.is_unspecified() || is_link_local(src) || v6.is_guest_source(src);
    match payload.first().copied().unwrap_or(0) {
        128 if icmp.msg_code() == 0 && !dst.is_multicast() => {
            let link_local_ping = is_link_local(src) && dst == v6.link_local;
            if !(v6.is_guest_source(src) || link_local_ping) {
                return Verdict::Drop(DropReason::SpoofedSource);
            }
            let Some(hdr) = payload.get(4..8) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            Verdict::Echo6 {
                src,
                dst,
                ident: u16::from_be_bytes([hdr[0], hdr[1]]),
                seq: u16::from_be_bytes([hdr[2], hdr[3]]),
                icmp: payload,
            }
        }
        133 if ndp && link_src => Verdict::RouterSolicit,
        135 if ndp && link_src => {
            let Some(t) = payload.get(8..24) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(t).unwrap_or([0; 16]));
            // Only questions about rnet's own addresses (smoltcp, under
            // AnyIP, would claim any target, as with ARP).
            if !v6.is_virtual(target) {
                return Verdict::Drop(DropReason::NotForUs);
            }
            Verdict::NeighborSolicit { src, target }
        }
        136 if ndp && link_src && !dst.is_multicast() => {
            let Some(t) = payload.get(8..24) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(t).unwrap_or([0; 16]));
            // A guest claiming to be the gateway or the DNS host is ignored,
            // as with ARP.
            if v6.is_virtual(target) {
                return Verdict::Drop(DropReason::SpoofedSource);
            }
            Verdict::NeighborAdvert
        }
        _ => Verdict::Drop(DropReason::Unsupported),
    }
}

/// Recognises a DHCP client message, which may come from 0.0.0.0 before
/// the guest has an address.
fn dhcp<'a>(
    ip: &Ipv4Packet<&[u8]>,
    payload: &'a [u8],
    addrs: &NetAddrs,
    l4_vouched: bool,
) -> Option<Verdict<'a>> {
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let from_ok = src.is_unspecified() || addrs.is_guest_source(src);
    let to_ok = dst.is_broadcast() || dst == addrs.gateway;
    if !from_ok || !to_ok {
        return None;
    }
    let udp = UdpPacket::new_checked(payload).ok()?;
    if udp.src_port() != 68 || udp.dst_port() != 67 {
        return None;
    }
    if !l4_vouched && udp.checksum() != 0 && !udp.verify_checksum(&src.into(), &dst.into()) {
        return Some(Verdict::Drop(DropReason::BadChecksum));
    }
    Some(Verdict::Dhcp {
        payload: &payload[8..udp.len() as usize],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn addrs() -> NetAddrs {
        NetAddrs::from_config(&Config::builder().build().unwrap())
    }

    #[test]
    fn garbage_is_dropped_not_panicking() {
        let a = addrs();
        let mac = EthernetAddress([2, 0, 0, 0, 0, 2]);
        for len in 0..80 {
            let frame: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let c = classify(&frame, mac, &a, false);
            assert!(matches!(c.verdict, Verdict::Drop(_)), "len {len}: {c:?}");
        }
    }

    #[test]
    fn neighbor_discovery_is_filtered() {
        use crate::wire::emit::{self, Header};
        let cfg = Config::builder()
            .ipv6(Some(crate::config::DEFAULT_IPV6_PREFIX))
            .build()
            .unwrap();
        let a = NetAddrs::from_config(&cfg);
        let ours = EthernetAddress(crate::stack::GATEWAY_MAC);
        let h = Header {
            eth_src: EthernetAddress([2, 0, 0, 0, 0, 100]),
            eth_dst: ours,
            ident: 0,
        };
        let guest: Ipv6Addr = "fd00::100".parse().unwrap();
        let gw: Ipv6Addr = "fd00::2".parse().unwrap();
        let build = |kind: u8, target: Ipv6Addr| {
            let mut buf = vec![0u8; 256];
            let n = emit::neighbor_advert(&mut buf, &h, guest, gw, target, 0);
            buf[emit::ICMP6_OFFSET] = kind;
            let src = guest;
            let msg = &mut buf[emit::ICMP6_OFFSET..n];
            msg[2..4].fill(0);
            Icmpv6Packet::new_unchecked(msg).fill_checksum(&src, &gw);
            buf.truncate(n);
            buf
        };
        let na = build(136, guest);
        assert!(matches!(
            classify(&na, ours, &a, false).verdict,
            Verdict::NeighborAdvert
        ));
        let ns = build(135, gw);
        assert!(matches!(
            classify(&ns, ours, &a, false).verdict,
            Verdict::NeighborSolicit { target, .. } if target == gw
        ));
        // A question about any other address is not answered (AnyIP).
        let other = build(135, "fd00::7".parse().unwrap());
        assert!(matches!(
            classify(&other, ours, &a, false).verdict,
            Verdict::Drop(DropReason::NotForUs)
        ));
        // IPv6 off: unsupported, as before.
        let off = addrs();
        assert!(matches!(
            classify(&ns, ours, &off, false).verdict,
            Verdict::Drop(DropReason::Unsupported)
        ));
    }

    #[test]
    fn gratuitous_arp_is_ignored() {
        let a = addrs();
        let mut buf = [0u8; 28];
        let mut p = ArpPacket::new_unchecked(&mut buf[..]);
        p.set_hardware_type(smoltcp::wire::ArpHardware::Ethernet);
        p.set_protocol_type(EthernetProtocol::Ipv4);
        p.set_hardware_len(6);
        p.set_protocol_len(4);
        p.set_operation(ArpOperation::Request);
        p.set_source_hardware_addr(&[2, 0, 0, 0, 0, 100]);
        p.set_source_protocol_addr(&[10, 0, 2, 100]);
        p.set_target_protocol_addr(&[10, 0, 2, 100]);
        assert!(matches!(arp(&buf, &a), Verdict::Drop(DropReason::NotForUs)));
        let mut p = ArpPacket::new_unchecked(&mut buf[..]);
        p.set_target_protocol_addr(&[10, 0, 2, 2]);
        assert!(matches!(arp(&buf, &a), Verdict::Arp));
        // Spoofing the gateway as sender is refused.
        let mut p = ArpPacket::new_unchecked(&mut buf[..]);
        p.set_source_protocol_addr(&[10, 0, 2, 3]);
        assert!(matches!(
            arp(&buf, &a),
            Verdict::Drop(DropReason::SpoofedSource)
        ));
    }
}
