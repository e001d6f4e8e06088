//! Frames rnet builds itself: UDP datagrams and ICMP messages to the guest.
//!
//! Each builder writes a complete Ethernet + IPv4 frame into a caller's
//! buffer (the TAP scratch buffer) and returns its length, so the payload
//! can be received straight into place (see [`UDP_PAYLOAD_OFFSET`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv4DstUnreachable, Icmpv4Message,
    Icmpv4Packet, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6Packet, UdpPacket,
};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options (all rnet builds).
pub const IPV4_LEN: usize = 20;
/// Where a UDP payload starts in a frame built by [`udp_frame`].
pub const UDP_PAYLOAD_OFFSET: usize = ETH_LEN + IPV4_LEN + 8;
/// Where an ICMP message starts in a frame built by [`icmp_frame`].
pub const ICMP_OFFSET: usize = ETH_LEN + IPV4_LEN;

/// Link-layer and IP identity of one frame.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    /// Source MAC (rnet's).
    pub eth_src: EthernetAddress,
    /// Destination MAC (the guest's).
    pub eth_dst: EthernetAddress,
    /// IPv4 identification.
    pub ident: u16,
}

fn ipv4(buf: &mut [u8], h: &Header, src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, len: usize) {
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.set_src_addr(h.eth_src);
    eth.set_dst_addr(h.eth_dst);
    eth.set_ethertype(EthernetProtocol::Ipv4);
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..]);
    ip.set_version(4);
    ip.set_header_len(IPV4_LEN as u8);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len((IPV4_LEN + len) as u16);
    ip.set_ident(h.ident);
    ip.clear_flags();
    ip.set_dont_frag(false);
    ip.set_more_frags(false);
    ip.set_frag_offset(0);
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();
}

/// Completes a UDP frame whose `payload_len` payload bytes are already at
/// [`UDP_PAYLOAD_OFFSET`]. Returns the frame length.
pub fn udp_frame(
    buf: &mut [u8],
    h: &Header,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload_len: usize,
) -> usize {
    let len = udp_frame_unsummed(buf, h, src, dst, payload_len);
    let mut udp = UdpPacket::new_unchecked(&mut buf[ETH_LEN + IPV4_LEN..len]);
    udp.fill_checksum(&(*src.ip()).into(), &(*dst.ip()).into());
    len
}

/// [`udp_frame`] without the UDP checksum, for a USO super-frame whose
/// checksum field the TAP layer sets to the pseudo-header sum.
pub fn udp_frame_unsummed(
    buf: &mut [u8],
    h: &Header,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload_len: usize,
) -> usize {
    let udp_len = 8 + payload_len;
    ipv4(buf, h, *src.ip(), *dst.ip(), IpProtocol::Udp, udp_len);
    let mut udp =
        UdpPacket::new_unchecked(&mut buf[ETH_LEN + IPV4_LEN..ETH_LEN + IPV4_LEN + udp_len]);
    udp.set_src_port(src.port());
    udp.set_dst_port(dst.port());
    udp.set_len(udp_len as u16);
    ETH_LEN + IPV4_LEN + udp_len
}

/// Completes an ICMP frame whose `icmp_len` bytes (header included, checksum
/// not yet valid) are already at [`ICMP_OFFSET`]. Returns the frame length.
pub fn icmp_frame(
    buf: &mut [u8],
    h: &Header,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_len: usize,
) -> usize {
    ipv4(buf, h, src, dst, IpProtocol::Icmp, icmp_len);
    let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[ICMP_OFFSET..ICMP_OFFSET + icmp_len]);
    icmp.fill_checksum();
    ICMP_OFFSET + icmp_len
}

/// Writes an ICMP echo reply carrying `ident`, `seq` and `data`.
pub fn echo_reply(
    buf: &mut [u8],
    h: &Header,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> usize {
    let len = 8 + data.len();
    if ICMP_OFFSET + len > buf.len() {
        return 0;
    }
    {
        let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[ICMP_OFFSET..ICMP_OFFSET + len]);
        icmp.set_msg_type(Icmpv4Message::EchoReply);
        icmp.set_msg_code(0);
        icmp.set_echo_ident(ident);
        icmp.set_echo_seq_no(seq);
        icmp.data_mut().copy_from_slice(data);
    }
    icmp_frame(buf, h, src, dst, len)
}

/// Writes an ICMP destination-unreachable for the offending packet `orig`
/// (its IP header and the first 8 bytes of payload are quoted, RFC 792).
/// `src` is the address that reports the error.
pub fn dst_unreachable(
    buf: &mut [u8],
    h: &Header,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    code: Icmpv4DstUnreachable,
    orig: &[u8],
) -> usize {
    let Ok(ip) = Ipv4Packet::new_checked(orig) else {
        return 0;
    };
    let quote = (ip.header_len() as usize + 8).min(orig.len());
    let len = 8 + quote;
    if ICMP_OFFSET + len > buf.len() {
        return 0;
    }
    {
        let msg = &mut buf[ICMP_OFFSET..ICMP_OFFSET + len];
        msg[..8].fill(0);
        msg[8..].copy_from_slice(&orig[..quote]);
        let mut icmp = Icmpv4Packet::new_unchecked(msg);
        icmp.set_msg_type(Icmpv4Message::DstUnreachable);
        icmp.set_msg_code(code.into());
    }
    icmp_frame(buf, h, src, dst, len)
}

/// IPv6 header length (rnet never builds extension headers).
pub const IPV6_LEN: usize = 40;
/// Where a UDP payload starts in a frame built by [`udp6_frame`].
pub const UDP6_PAYLOAD_OFFSET: usize = ETH_LEN + IPV6_LEN + 8;
/// Where an ICMPv6 message starts in a frame built by [`icmp6_frame`].
pub const ICMP6_OFFSET: usize = ETH_LEN + IPV6_LEN;
/// The IPv6 minimum MTU: ICMPv6 errors never exceed it (RFC 4443 2.4).
const IPV6_MIN_MTU: usize = 1280;

/// The Ethernet multicast address for an IPv6 multicast group (RFC 2464).
pub fn ipv6_multicast_mac(group: Ipv6Addr) -> EthernetAddress {
    let o = group.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

fn ipv6(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: IpProtocol,
    len: usize,
    hop_limit: u8,
) {
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.set_src_addr(h.eth_src);
    eth.set_dst_addr(h.eth_dst);
    eth.set_ethertype(EthernetProtocol::Ipv6);
    let mut ip = Ipv6Packet::new_unchecked(&mut buf[ETH_LEN..]);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0);
    ip.set_payload_len(len as u16);
    ip.set_next_header(proto);
    ip.set_hop_limit(hop_limit);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
}

/// Completes an IPv6 UDP frame whose `payload_len` payload bytes are
/// already at [`UDP6_PAYLOAD_OFFSET`]. Returns the frame length.
pub fn udp6_frame(
    buf: &mut [u8],
    h: &Header,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    payload_len: usize,
) -> usize {
    let len = udp6_frame_unsummed(buf, h, src, dst, payload_len);
    if len > 0 {
        // Mandatory over IPv6 (RFC 8200 8.1).
        let mut udp = UdpPacket::new_unchecked(&mut buf[ETH_LEN + IPV6_LEN..len]);
        udp.fill_checksum(&(*src.ip()).into(), &(*dst.ip()).into());
    }
    len
}

/// [`udp6_frame`] without the UDP checksum (see [`udp_frame_unsummed`]).
pub fn udp6_frame_unsummed(
    buf: &mut [u8],
    h: &Header,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    payload_len: usize,
) -> usize {
    let udp_len = 8 + payload_len;
    if ETH_LEN + IPV6_LEN + udp_len > buf.len() || udp_len > usize::from(u16::MAX) {
        return 0;
    }
    ipv6(buf, h, *src.ip(), *dst.ip(), IpProtocol::Udp, udp_len, 64);
    let mut udp =
        UdpPacket::new_unchecked(&mut buf[ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + udp_len]);
    udp.set_src_port(src.port());
    udp.set_dst_port(dst.port());
    udp.set_len(udp_len as u16);
    ETH_LEN + IPV6_LEN + udp_len
}

/// Completes an ICMPv6 frame whose `icmp_len` bytes are already at
/// [`ICMP6_OFFSET`] (checksum computed here). Returns the frame length.
pub fn icmp6_frame(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_len: usize,
    hop_limit: u8,
) -> usize {
    if ICMP6_OFFSET + icmp_len > buf.len() {
        return 0;
    }
    ipv6(buf, h, src, dst, IpProtocol::Icmpv6, icmp_len, hop_limit);
    let msg = &mut buf[ICMP6_OFFSET..ICMP6_OFFSET + icmp_len];
    msg[2..4].fill(0);
    let mut icmp = Icmpv6Packet::new_unchecked(msg);
    icmp.fill_checksum(&src, &dst);
    ICMP6_OFFSET + icmp_len
}

/// Writes an ICMPv6 echo reply carrying `ident`, `seq` and `data`.
pub fn echo6_reply(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> usize {
    let len = 8 + data.len();
    if ICMP6_OFFSET + len > buf.len() {
        return 0;
    }
    let msg = &mut buf[ICMP6_OFFSET..ICMP6_OFFSET + len];
    msg[0] = 129;
    msg[1] = 0;
    msg[4..6].copy_from_slice(&ident.to_be_bytes());
    msg[6..8].copy_from_slice(&seq.to_be_bytes());
    msg[8..].copy_from_slice(data);
    icmp6_frame(buf, h, src, dst, len, 64)
}

/// ICMPv6 destination-unreachable codes rnet sends (RFC 4443 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreach6 {
    /// No route to destination (the guest's connect: ENETUNREACH).
    NoRoute = 0,
    /// Administratively prohibited (EACCES).
    AdminProhibited = 1,
    /// Address unreachable (EHOSTUNREACH).
    Address = 3,
}

/// Writes an ICMPv6 destination-unreachable quoting as much of `orig` (an
/// IPv6 packet) as fits in the minimum MTU. `src` reports the error.
pub fn dst_unreachable6(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    code: Unreach6,
    orig: &[u8],
) -> usize {
    let quote = orig.len().min(IPV6_MIN_MTU - IPV6_LEN - 8);
    let len = 8 + quote;
    if ICMP6_OFFSET + len > buf.len() {
        return 0;
    }
    let msg = &mut buf[ICMP6_OFFSET..ICMP6_OFFSET + len];
    msg[..8].fill(0);
    msg[0] = 1;
    msg[1] = code as u8;
    msg[8..].copy_from_slice(&orig[..quote]);
    icmp6_frame(buf, h, src, dst, len, 64)
}

/// Writes a neighbour advertisement for `target` with its target
/// link-layer address option (RFC 4861 4.4). `flags` is the top byte:
/// 0x80 router, 0x40 solicited, 0x20 override.
pub fn neighbor_advert(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    flags: u8,
) -> usize {
    let len = 32;
    if ICMP6_OFFSET + len > buf.len() {
        return 0;
    }
    let msg = &mut buf[ICMP6_OFFSET..ICMP6_OFFSET + len];
    msg.fill(0);
    msg[0] = 136;
    msg[4] = flags;
    msg[8..24].copy_from_slice(&target.octets());
    msg[24] = 2;
    msg[25] = 1;
    msg[26..32].copy_from_slice(&h.eth_src.0);
    icmp6_frame(buf, h, src, dst, len, 255)
}

/// What a router advertisement announces.
#[derive(Clone, Copy, Debug)]
pub struct RouterAdvert<'a> {
    /// The on-link, autonomous /64.
    pub prefix: Ipv6Addr,
    /// Link MTU.
    pub mtu: u32,
    /// Recursive DNS servers (RDNSS, RFC 8106; left out when empty).
    pub dns: &'a [Ipv6Addr],
    /// DNS search list (DNSSL, RFC 8106; left out when empty): domain
    /// names in DNS wire format without compression
    /// (`crate::config::encode_domains`).
    pub search: &'a [u8],
    /// Router lifetime in seconds (also the lifetime of the DNS options).
    pub lifetime: u16,
}

/// Length of a router advertisement's fixed part: the ICMPv6 header with
/// hop limit, flags, lifetime and timers (16), source link-layer address
/// (8), MTU (8) and prefix information (32).
const RA_FIXED_LEN: usize = 16 + 8 + 8 + 32;

/// Bytes an RA has for its RDNSS and DNSSL options within the IPv6
/// minimum MTU (1280, less 40 bytes of IPv6 header), which every IPv6 link
/// carries; see [`ra_announce_len`].
pub const RA_ANNOUNCE_SPACE: usize = 1280 - IPV6_LEN - RA_FIXED_LEN;

/// Bytes of RDNSS and DNSSL options for `dns` servers and a search list of
/// `search_wire` bytes: RDNSS 8 plus 16 per server, DNSSL 8 plus the names
/// padded to a multiple of 8 (each left out when empty).
pub fn ra_announce_len(dns: usize, search_wire: usize) -> usize {
    let rdnss = if dns == 0 { 0 } else { 8 + 16 * dns };
    let dnssl = if search_wire == 0 {
        0
    } else {
        8 + search_wire.next_multiple_of(8)
    };
    rdnss + dnssl
}

/// Writes a router advertisement from `src` (link-local) to `dst`: source
/// link-layer address, MTU, prefix information, and the RDNSS and DNSSL
/// options when there is something to announce. Returns 0 (nothing sent)
/// when it does not fit `buf`, or the options do not fit
/// [`RA_ANNOUNCE_SPACE`] (which the configuration rules out).
pub fn router_advert(
    buf: &mut [u8],
    h: &Header,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ra: &RouterAdvert<'_>,
) -> usize {
    let extra = ra_announce_len(ra.dns.len(), ra.search.len());
    let len = RA_FIXED_LEN + extra;
    if extra > RA_ANNOUNCE_SPACE || ICMP6_OFFSET + len > buf.len() {
        return 0;
    }
    let m = &mut buf[ICMP6_OFFSET..ICMP6_OFFSET + len];
    m.fill(0);
    m[0] = 134;
    m[4] = 64; // current hop limit
    m[5] = 0; // no DHCPv6 (M, O clear)
    m[6..8].copy_from_slice(&ra.lifetime.to_be_bytes());
    // reachable time and retrans timer: unspecified (0).
    let o = &mut m[16..];
    // Source link-layer address.
    o[0] = 1;
    o[1] = 1;
    o[2..8].copy_from_slice(&h.eth_src.0);
    // MTU.
    o[8] = 5;
    o[9] = 1;
    o[12..16].copy_from_slice(&ra.mtu.to_be_bytes());
    // Prefix information: /64, on-link and autonomous.
    let p = &mut o[16..48];
    p[0] = 3;
    p[1] = 4;
    p[2] = 64;
    p[3] = 0xc0;
    p[4..8].copy_from_slice(&86_400u32.to_be_bytes());
    p[8..12].copy_from_slice(&14_400u32.to_be_bytes());
    p[16..32].copy_from_slice(&ra.prefix.octets());
    let lifetime = u32::from(ra.lifetime).to_be_bytes();
    let mut at = 48;
    if !ra.dns.is_empty() {
        // RDNSS: type 25, length in units of 8 bytes, reserved, lifetime,
        // then the addresses.
        let n = 8 + 16 * ra.dns.len();
        let r = &mut o[at..at + n];
        r[0] = 25;
        r[1] = (n / 8) as u8;
        r[4..8].copy_from_slice(&lifetime);
        for (slot, a) in r[8..].chunks_exact_mut(16).zip(ra.dns) {
            slot.copy_from_slice(&a.octets());
        }
        at += n;
    }
    if !ra.search.is_empty() {
        // DNSSL: type 31, as RDNSS, then the names padded with zeros.
        let n = 8 + ra.search.len().next_multiple_of(8);
        let r = &mut o[at..at + n];
        r[0] = 31;
        r[1] = (n / 8) as u8;
        r[4..8].copy_from_slice(&lifetime);
        r[8..8 + ra.search.len()].copy_from_slice(ra.search);
    }
    icmp6_frame(buf, h, src, dst, len, 255)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Ipv4Repr, UdpRepr};

    const H: Header = Header {
        eth_src: EthernetAddress([2, 0, 0, 0, 0, 2]),
        eth_dst: EthernetAddress([2, 0, 0, 0, 0, 100]),
        ident: 7,
    };

    #[test]
    fn v6_frames_are_valid() {
        let mut buf = vec![0u8; 2048];
        let src: Ipv6Addr = "fe80::2".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let ra = RouterAdvert {
            prefix: "fd00::".parse().unwrap(),
            mtu: 1500,
            dns: &["fd00::3".parse().unwrap()],
            search: &[],
            lifetime: 1800,
        };
        let n = router_advert(&mut buf, &H, src, dst, &ra);
        assert_eq!(n, ICMP6_OFFSET + 88);
        let icmp = Icmpv6Packet::new_checked(&buf[ICMP6_OFFSET..n]).unwrap();
        assert!(icmp.verify_checksum(&src, &dst));
        let caps = ChecksumCapabilities::default();
        let repr = smoltcp::wire::NdiscRepr::parse(&icmp).unwrap();
        match repr {
            smoltcp::wire::NdiscRepr::RouterAdvert {
                router_lifetime,
                mtu,
                prefix_info,
                ..
            } => {
                assert_eq!(router_lifetime.secs(), 1800);
                assert_eq!(mtu, Some(1500));
                let pi = prefix_info.unwrap();
                assert_eq!(pi.prefix_len, 64);
            }
            other => panic!("{other:?}"),
        }
        let _ = caps;
        let s6: SocketAddrV6 = "[fd00::3]:53".parse().unwrap();
        let d6: SocketAddrV6 = "[fd00::100]:4000".parse().unwrap();
        buf[UDP6_PAYLOAD_OFFSET..UDP6_PAYLOAD_OFFSET + 2].copy_from_slice(b"hi");
        let n = udp6_frame(&mut buf, &H, s6, d6, 2);
        let ip = Ipv6Packet::new_checked(&buf[ETH_LEN..n]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&(*s6.ip()).into(), &(*d6.ip()).into()));
        assert_eq!(udp.payload(), b"hi");
    }

    /// The options of an RA's ICMPv6 body, by type, read by hand.
    fn ra_options(icmp: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = &icmp[16..];
        while !o.is_empty() {
            let len = usize::from(o[1]) * 8;
            assert!(len >= 8 && len <= o.len(), "option length {len}");
            out.push((o[0], o[..len].to_vec()));
            o = &o[len..];
        }
        out
    }

    #[test]
    fn ra_rdnss_and_dnssl() {
        let mut buf = vec![0u8; 2048];
        let src: Ipv6Addr = "fe80::2".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let dns: [Ipv6Addr; 2] = ["fd12::53".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let mut search = Vec::new();
        crate::config::encode_domains(&["example.test".into(), "b.c".into()], &mut search);
        let ra = RouterAdvert {
            prefix: "fd12::".parse().unwrap(),
            mtu: 1500,
            dns: &dns,
            search: &search,
            lifetime: 1800,
        };
        let n = router_advert(&mut buf, &H, src, dst, &ra);
        // Fixed 64, RDNSS 8 + 32, DNSSL 8 + 19 bytes of names padded to 24.
        assert_eq!(n, ICMP6_OFFSET + 64 + 40 + 32);
        let icmp = &buf[ICMP6_OFFSET..n];
        assert!(
            Icmpv6Packet::new_checked(icmp)
                .unwrap()
                .verify_checksum(&src, &dst)
        );
        let opts = ra_options(icmp);
        let kinds: Vec<u8> = opts.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [1, 5, 3, 25, 31]);
        let rdnss = &opts[3].1;
        assert_eq!(rdnss[1], 5);
        assert_eq!(&rdnss[4..8], &1800u32.to_be_bytes());
        assert_eq!(&rdnss[8..24], &dns[0].octets());
        assert_eq!(&rdnss[24..40], &dns[1].octets());
        let dnssl = &opts[4].1;
        assert_eq!(dnssl[1], 4);
        assert_eq!(&dnssl[2..4], &[0, 0]);
        assert_eq!(&dnssl[4..8], &1800u32.to_be_bytes());
        let mut names = vec![7];
        names.extend_from_slice(b"example");
        names.push(4);
        names.extend_from_slice(b"test");
        names.extend_from_slice(&[0, 1, b'b', 1, b'c', 0]);
        names.resize(24, 0);
        assert_eq!(&dnssl[8..], &names[..]);
        // Nothing to announce: neither option.
        let bare = RouterAdvert {
            dns: &[],
            search: &[],
            ..ra
        };
        let n = router_advert(&mut buf, &H, src, dst, &bare);
        assert_eq!(n, ICMP6_OFFSET + 64);
        let kinds: Vec<u8> = ra_options(&buf[ICMP6_OFFSET..n])
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(kinds, [1, 5, 3]);
        // Options beyond the minimum MTU's room: nothing is built.
        let many = vec![dns[0]; 80];
        let big = RouterAdvert { dns: &many, ..ra };
        assert_eq!(router_advert(&mut buf, &H, src, dst, &big), 0);
        assert_eq!(ra_announce_len(1, 0), 24);
        assert_eq!(ra_announce_len(0, 19), 32);
        assert_eq!(ra_announce_len(0, 16), 24);
    }

    #[test]
    fn udp_frame_is_valid() {
        let mut buf = vec![0u8; 2048];
        buf[UDP_PAYLOAD_OFFSET..UDP_PAYLOAD_OFFSET + 5].copy_from_slice(b"hello");
        let src: SocketAddrV4 = "10.0.2.3:53".parse().unwrap();
        let dst: SocketAddrV4 = "10.0.2.100:4000".parse().unwrap();
        let n = udp_frame(&mut buf, &H, src, dst, 5);
        let eth = EthernetFrame::new_checked(&buf[..n]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let caps = ChecksumCapabilities::default();
        let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let u = UdpRepr::parse(&udp, &repr.src_addr.into(), &repr.dst_addr.into(), &caps).unwrap();
        assert_eq!((u.src_port, u.dst_port), (53, 4000));
        assert_eq!(udp.payload(), b"hello");
    }

    #[test]
    fn unreachable_quotes_original() {
        let mut orig = vec![0u8; 40];
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut orig[..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len(40);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(Ipv4Addr::new(10, 0, 2, 100));
            ip.set_dst_addr(Ipv4Addr::new(10, 0, 2, 2));
            ip.fill_checksum();
        }
        let mut buf = vec![0u8; 2048];
        let n = dst_unreachable(
            &mut buf,
            &H,
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::new(10, 0, 2, 100),
            Icmpv4DstUnreachable::NetUnreachable,
            &orig,
        );
        assert_eq!(n, ICMP_OFFSET + 8 + 28);
        let icmp = Icmpv4Packet::new_checked(&buf[ICMP_OFFSET..n]).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 0);
        assert_eq!(icmp.data(), &orig[..28]);
    }
}
