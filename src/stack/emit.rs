//! Frames rnet builds itself: UDP datagrams and ICMP messages to the guest.
//!
//! Each builder writes a complete Ethernet + IPv4 frame into a caller's
//! buffer (the TAP scratch buffer) and returns its length, so the payload
//! can be received straight into place (see [`UDP_PAYLOAD_OFFSET`]).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv4DstUnreachable, Icmpv4Message,
    Icmpv4Packet, IpProtocol, Ipv4Packet, UdpPacket,
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
    let udp_len = 8 + payload_len;
    ipv4(buf, h, *src.ip(), *dst.ip(), IpProtocol::Udp, udp_len);
    let mut udp =
        UdpPacket::new_unchecked(&mut buf[ETH_LEN + IPV4_LEN..ETH_LEN + IPV4_LEN + udp_len]);
    udp.set_src_port(src.port());
    udp.set_dst_port(dst.port());
    udp.set_len(udp_len as u16);
    udp.fill_checksum(&(*src.ip()).into(), &(*dst.ip()).into());
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
