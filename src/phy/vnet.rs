//! The virtio-net header that precedes every frame on a TAP opened with
//! offloads: its layout, the offload flags rnet asks the kernel for, and
//! the checksum work the header implies (partial checksums towards the
//! guest, inner checksums completed on the way in).
//!
//! [`crate::phy::tap`] owns the descriptor and moves the bytes; this module
//! says what the 12 (or 24) bytes in front of each frame mean.
//!
//! # Offloads
//!
//! When the TAP was opened with IFF_VNET_HDR and TUNSETOFFLOAD (checksum,
//! TSO4, TSO6), every frame in either direction is preceded by a 12-byte
//! virtio-net header ([`VnetHdr`]). The guest kernel then hands over TCP
//! segments of up to 64 KiB whatever the MTU, with the TCP or UDP checksum
//! left partial; the header says so, and [`RxMeta`] carries that to the
//! classifier, which skips checks the kernel vouches for. Towards the guest,
//! TCP segments from smoltcp leave with a partial checksum for the guest
//! kernel to complete (or skip, as it does for local delivery), and segments
//! larger than the guest's MSS go out as one GSO frame that the guest kernel
//! treats like a GRO-merged burst, so a 1500-byte MTU no longer means one
//! write and one trip through the guest's receive path per 1,460 bytes.
//!
//! UDP segmentation offload (`TUN_F_USO4`/`TUN_F_USO6`, Linux 6.2) is
//! asked for on top when the kernel has it (and `RNET_NO_USO=1` is not
//! set): the guest may then hand over one UDP super-frame (gso type
//! `UDP_L4`, [`RxMeta::udp_gso`]) that rnet sends on with one
//! `UDP_SEGMENT` send, and a train of same-size datagrams for the guest
//! leaves as one such frame ([`TapTx::build_udp_train`](crate::phy::tap::TapTx::build_udp_train)). A kernel without
//! USO keeps the other offloads.
//!
//! UDP-tunnel GSO (`TUN_F_UDP_TUNNEL_GSO` and `_CSUM`, Linux 6.17) is
//! asked for on top of USO (unless `RNET_NO_UDP_TUNNEL_GSO=1`), with the
//! 24-byte header it needs (`virtio_net_hdr_v1_hash_tunnel`: the 12 bytes
//! above, hash value and report, padding, then the outer transport and
//! inner network header offsets). A VXLAN device in the guest then hands
//! over one encapsulated 64 KiB TCP segment instead of ~45 datagrams of
//! 1,500 bytes, each its own read. [`Tap::read_frame`](crate::phy::tap::Tap::read_frame) cuts it at once
//! ([`crate::phy::tunnel`], inner checksums complete) and
//! returns the datagrams as USO super-frames of the outer flow (two when
//! they exceed one IP packet), which leave in `UDP_SEGMENT` sends like any
//! other. Without the kernel feature the guest segments in software and
//! every datagram is a read, as before.

use std::os::fd::{AsRawFd, BorrowedFd};

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::phy::tunnel::TunnelGso;

/// Length of the virtio-net header (`struct virtio_net_hdr_mrg_rxbuf`)
/// rnet asks for with TUNSETVNETHDRSZ.
pub const VNET_HDR_LEN: usize = 12;
/// Length of the header with the UDP-tunnel fields
/// (`struct virtio_net_hdr_v1_hash_tunnel`).
pub const VNET_TNL_HDR_LEN: usize = 24;

/// Largest frame rnet hands the kernel as one GSO frame: a 65535-byte IP
/// packet plus the Ethernet header.
pub const MAX_GSO_FRAME: usize = 65535 + 14;

/// The virtio-net header in front of each frame on an IFF_VNET_HDR TAP
/// (fields in the host's byte order, as the kernel uses for a TAP unless
/// told otherwise).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    /// `NEEDS_CSUM` / `DATA_VALID`.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, ... (plus the ECN bit).
    pub gso_type: u8,
    /// Length of the headers copied into every segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (from the start of the frame).
    pub csum_start: u16,
    /// Where the checksum goes (from `csum_start`).
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The L4 checksum is partial: the receiver completes it.
    pub const NEEDS_CSUM: u8 = 1;
    /// The kernel already validated the L4 checksum.
    pub const DATA_VALID: u8 = 2;
    /// Not a GSO frame.
    pub const GSO_NONE: u8 = 0;
    /// A TCP/IPv4 segment to be cut into `gso_size` pieces.
    pub const GSO_TCPV4: u8 = 1;
    /// A TCP/IPv6 segment to be cut into `gso_size` pieces.
    pub const GSO_TCPV6: u8 = 4;
    /// A UDP datagram train to be cut into `gso_size` datagrams (USO).
    pub const GSO_UDP_L4: u8 = 5;
    /// Bit set on top of the GSO type when the segment carries CWR.
    pub const GSO_ECN: u8 = 0x80;
    /// Bit set on top of the inner GSO type: the frame is a UDP tunnel
    /// over IPv4 (`GSO_UDP_TUNNEL_IPV4`).
    pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
    /// The same over IPv6.
    pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;

    /// Parses the header from its 12 bytes.
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// The header as the kernel reads it (`num_buffers` is zero).
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// How a TCP segment larger than the guest takes is to be cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// Payload bytes per piece, options already accounted for (smoltcp's
    /// segmentation request).
    Payload(u16),
    /// The guest's MSS; the segment's TCP options come off it.
    Mss(u16),
}

/// What the kernel said about the frame last read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxMeta {
    /// The TCP/UDP checksum need not be checked: the kernel either left it
    /// partial for us (the frame was built by the guest's own stack) or
    /// already validated it.
    pub l4_csum_vouched: bool,
    /// The frame is one TCP segment of a GSO burst and may exceed the MTU.
    pub gso: bool,
    /// The header announced a GSO type rnet did not ask for.
    pub unsupported: bool,
    /// A UDP super-frame (gso type `UDP_L4`) and its segment size, which
    /// may be 0 in a malformed header.
    pub udp_gso: Option<u16>,
}

/// `TUN_F_USO4` (linux/if_tun.h, 6.2): the TAP takes UDP/IPv4 super-frames.
pub const TUN_F_USO4: libc::c_uint = 0x20;
/// `TUN_F_USO6`: the same for IPv6.
pub const TUN_F_USO6: libc::c_uint = 0x40;
/// `TUN_F_UDP_TUNNEL_GSO` (linux/if_tun.h, 6.17): the TAP takes TSO/USO
/// super-frames inside a UDP tunnel.
pub const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x80;
/// `TUN_F_UDP_TUNNEL_GSO_CSUM`: the same when the outer UDP header carries
/// a checksum (Linux VXLAN's default).
pub const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);

/// Sets the virtio-net header length of a TAP descriptor.
pub(super) fn set_vnet_hdr_len(fd: BorrowedFd<'_>, len: usize) -> nix::Result<()> {
    let len = len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one C int through the pointer, which
    // lives for the call; on a descriptor that is not a TAP it fails.
    unsafe { tun_set_vnet_hdr_sz(fd.as_raw_fd(), &len) }.map(drop)
}

/// Adds UDP-tunnel GSO to a TAP that has USO, unless
/// `RNET_NO_UDP_TUNNEL_GSO=1`: the 24-byte header first (the kernel drops
/// tunnel frames it cannot describe in a shorter one), then the offload;
/// where the kernel refuses, the 12-byte header again. Whether it is on.
pub(super) fn try_tunnel_gso(fd: BorrowedFd<'_>) -> bool {
    if std::env::var_os("RNET_NO_UDP_TUNNEL_GSO").is_some_and(|v| v == "1") {
        tracing::debug!("UDP-tunnel GSO off (RNET_NO_UDP_TUNNEL_GSO=1)");
        return false;
    }
    if let Err(e) = set_vnet_hdr_len(fd, VNET_TNL_HDR_LEN) {
        tracing::debug!(error = %e, "no 24-byte virtio-net header: no UDP-tunnel GSO");
        return false;
    }
    let flags = libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | TUN_F_USO4
        | TUN_F_USO6
        | TUN_F_UDP_TUNNEL_GSO
        | TUN_F_UDP_TUNNEL_GSO_CSUM;
    // SAFETY: as in try_uso.
    match unsafe { tun_set_offload(fd.as_raw_fd(), flags as libc::c_int) } {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no UDP-tunnel GSO on this TAP");
            if let Err(e) = set_vnet_hdr_len(fd, VNET_HDR_LEN) {
                tracing::warn!(error = %e, "cannot restore the 12-byte virtio-net header");
            }
            false
        }
    }
}

/// Adds UDP segmentation offload to a TAP opened with the other offloads,
/// unless `RNET_NO_USO=1`; false (logged at debug) where the kernel or the
/// descriptor refuses.
pub(super) fn try_uso(fd: BorrowedFd<'_>) -> bool {
    if std::env::var_os("RNET_NO_USO").is_some_and(|v| v == "1") {
        tracing::debug!("UDP segmentation offload off (RNET_NO_USO=1)");
        return false;
    }
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6;
    // SAFETY: TUNSETOFFLOAD takes its flags by value; on a descriptor that
    // is not a TAP it fails (ENOTTY/EBADFD) without effect.
    match unsafe { tun_set_offload(fd.as_raw_fd(), flags as libc::c_int) } {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no UDP segmentation offload on this TAP");
            false
        }
    }
}

/// Prepares a frame from smoltcp for a TAP with offloads: for a TCP
/// segment, puts the pseudo-header sum in the checksum field and marks it
/// NEEDS_CSUM (the guest completes it, or skips it for local delivery as it
/// does for its own loopback traffic), and asks for segmentation when the
/// payload exceeds the piece size `gso` gives. Anything else (ARP, NDP)
/// leaves untouched with an empty header.
///
/// Hand-written rather than through smoltcp's packet views: smoltcp built
/// the frame a moment ago, so only offsets are read, and this runs once per
/// segment on the hot path.
pub(super) fn tcp_offload(frame: &mut [u8], gso: Option<Gso>) -> VnetHdr {
    let none = VnetHdr::default();
    let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
        return none;
    };
    let l3 = 14;
    let (ip_hlen, tcp_len, pseudo, gso_type) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(&frame[l3..]) else {
                return none;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return none;
            }
            let hl = usize::from(ip.header_len());
            let tcp_len = usize::from(ip.total_len()).saturating_sub(hl);
            let sum = pseudo_header_sum(&ip.src_addr().octets(), &ip.dst_addr().octets(), tcp_len);
            (hl, tcp_len, sum, VnetHdr::GSO_TCPV4)
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(&frame[l3..]) else {
                return none;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return none;
            }
            let tcp_len = usize::from(ip.payload_len());
            let sum = pseudo_header_sum(&ip.src_addr().octets(), &ip.dst_addr().octets(), tcp_len);
            (40, tcp_len, sum, VnetHdr::GSO_TCPV6)
        }
        _ => return none,
    };
    let l4 = l3 + ip_hlen;
    if tcp_len < 20 || frame.len() < l4 + tcp_len {
        return none;
    }
    let tcp_hlen = usize::from(frame[l4 + 12] >> 4) * 4;
    if !(20..=tcp_len).contains(&tcp_hlen) {
        return none;
    }
    frame[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let mut hdr = VnetHdr {
        flags: VnetHdr::NEEDS_CSUM,
        csum_start: l4 as u16,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let payload = tcp_len.saturating_sub(tcp_hlen);
    let size = match gso {
        Some(Gso::Payload(n)) => n,
        Some(Gso::Mss(mss)) => mss.saturating_sub((tcp_hlen - 20) as u16),
        None => 0,
    };
    if size > 0 && payload > usize::from(size) {
        hdr.gso_type = gso_type;
        hdr.gso_size = size;
        hdr.hdr_len = (l4 + tcp_hlen) as u16;
    }
    hdr
}

/// Prepares a UDP frame as a USO super-frame of `seg`-byte datagrams:
/// pseudo-header sum (over the whole train's length, which the kernel
/// adjusts per datagram) in the checksum field, NEEDS_CSUM, gso type
/// `UDP_L4`. A frame that is not UDP leaves with an empty header.
pub(super) fn udp_offload(frame: &mut [u8], seg: u16) -> VnetHdr {
    let (l4, udp_len, pseudo) = match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let Ok(ip) = Ipv4Packet::new_checked(&frame[14..]) else {
                return VnetHdr::default();
            };
            if ip.next_header() != IpProtocol::Udp {
                return VnetHdr::default();
            }
            let hl = usize::from(ip.header_len());
            let len = usize::from(ip.total_len()).saturating_sub(hl);
            let (s, d) = (ip.src_addr().octets(), ip.dst_addr().octets());
            (14 + hl, len, pseudo_sum(&s, &d, IpProtocol::Udp, len))
        }
        Some([0x86, 0xdd]) => {
            let Ok(ip) = Ipv6Packet::new_checked(&frame[14..]) else {
                return VnetHdr::default();
            };
            if ip.next_header() != IpProtocol::Udp {
                return VnetHdr::default();
            }
            let len = usize::from(ip.payload_len());
            let (s, d) = (ip.src_addr().octets(), ip.dst_addr().octets());
            (54, len, pseudo_sum(&s, &d, IpProtocol::Udp, len))
        }
        _ => return VnetHdr::default(),
    };
    if udp_len < 8 || frame.len() < l4 + udp_len || seg == 0 {
        return VnetHdr::default();
    }
    frame[l4 + 6..l4 + 8].copy_from_slice(&pseudo.to_be_bytes());
    VnetHdr {
        flags: VnetHdr::NEEDS_CSUM,
        gso_type: VnetHdr::GSO_UDP_L4,
        hdr_len: (l4 + 8) as u16,
        gso_size: seg,
        csum_start: l4 as u16,
        csum_offset: 6,
    }
}

/// Completes a partial checksum that lies inside the payload rnet forwards:
/// an encapsulated packet (a VXLAN datagram whose inner TCP segment the
/// guest kernel left for "the NIC") must leave rnet whole, or the far end
/// drops it. A partial checksum of the outer TCP or UDP header needs nothing:
/// rnet terminates that header and forwards only the payload.
pub(super) fn complete_inner_checksum(frame: &mut [u8], h: &VnetHdr) {
    let outer_l4 = match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(14).map(|b| 14 + usize::from(b & 0x0f) * 4),
        Some([0x86, 0xdd]) => Some(14 + 40),
        _ => None,
    };
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if outer_l4 == Some(start) || field + 2 > frame.len() {
        return;
    }
    // As the kernel does for any protocol: 0 goes out as 0xffff.
    let csum = match !fold(ones_sum(0, &frame[start..])) {
        0 => 0xffff,
        c => c,
    };
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
}

/// The folded (not inverted) one's-complement sum of a TCP pseudo-header,
/// which is what a partial checksum field holds (RFC 1071; smoltcp keeps its
/// own version private).
pub(super) fn pseudo_header_sum(src: &[u8], dst: &[u8], tcp_len: usize) -> u16 {
    pseudo_sum(src, dst, IpProtocol::Tcp, tcp_len)
}

/// The same for any protocol.
pub(super) fn pseudo_sum(src: &[u8], dst: &[u8], proto: IpProtocol, l4_len: usize) -> u16 {
    let len = l4_len as u32;
    let sum =
        ones_sum(ones_sum(0, src), dst) + u32::from(u8::from(proto)) + (len >> 16) + (len & 0xffff);
    fold(sum)
}

/// Adds `bytes`, as big-endian 16-bit words (an odd last byte padded with
/// zero), to the running one's-complement sum `sum`. Unfolded: 32 bits
/// hold the sum of any frame rnet handles.
pub(super) fn ones_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a running sum's carries back in (RFC 1071).
pub(super) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The tunnel part of a 24-byte header: None unless the frame is a TCP or
/// UDP super-frame inside a UDP tunnel over IPv4 or IPv6.
pub(super) fn tunnel_gso(hdr: &[u8; VNET_TNL_HDR_LEN]) -> Option<TunnelGso> {
    let u = |i: usize| usize::from(u16::from_ne_bytes([hdr[i], hdr[i + 1]]));
    let gso = hdr[1] & !VnetHdr::GSO_ECN;
    let outer = gso & (VnetHdr::GSO_UDP_TUNNEL_IPV4 | VnetHdr::GSO_UDP_TUNNEL_IPV6);
    if outer != VnetHdr::GSO_UDP_TUNNEL_IPV4 && outer != VnetHdr::GSO_UDP_TUNNEL_IPV6 {
        return None;
    }
    let inner_udp = match gso & !outer {
        VnetHdr::GSO_TCPV4 | VnetHdr::GSO_TCPV6 => false,
        VnetHdr::GSO_UDP_L4 => true,
        _ => return None,
    };
    Some(TunnelGso {
        outer_th: u(20),
        inner_nh: u(22),
        gso_size: u(4),
        inner_udp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, IpAddress, Ipv4Repr, Ipv6Repr, TcpPacket, TcpRepr,
        TcpSeqNumber,
    };

    /// The one's-complement sum a NIC completing a partial checksum takes,
    /// inverted, over `bytes`.
    fn completed(bytes: &[u8]) -> u16 {
        !fold(ones_sum(0, bytes))
    }

    /// A TCP segment with `payload` bytes in an Ethernet frame, its checksum
    /// filled in by smoltcp; IPv4 or IPv6.
    fn segment(v6: bool, payload: usize) -> Vec<u8> {
        let data = vec![0xa5u8; payload];
        let (src, dst): (IpAddress, IpAddress) = if v6 {
            (
                "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().into(),
                "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().into(),
            )
        } else {
            (
                std::net::Ipv4Addr::new(10, 0, 2, 2).into(),
                std::net::Ipv4Addr::new(10, 0, 2, 100).into(),
            )
        };
        let tcp = TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control: smoltcp::wire::TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &data,
        };
        let ip_len = if v6 { 40 } else { 20 };
        let mut frame = vec![0u8; 14 + ip_len + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        EthernetRepr {
            src_addr: EthernetAddress([0x52, 0x55, 10, 0, 2, 2]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            ethertype: if v6 {
                EthernetProtocol::Ipv6
            } else {
                EthernetProtocol::Ipv4
            },
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        match (src, dst) {
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut Ipv4Packet::new_unchecked(&mut frame[14..]), &caps),
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..])),
            _ => unreachable!(),
        }
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut frame[14 + ip_len..]),
            &src,
            &dst,
            &caps,
        );
        frame
    }

    #[test]
    fn partial_checksum_completes_to_the_full_one() {
        for v6 in [false, true] {
            for payload in [0, 1, 1459, 3000] {
                let mut frame = segment(v6, payload);
                let l4 = 14 + if v6 { 40 } else { 20 };
                let full = u16::from_be_bytes([frame[l4 + 16], frame[l4 + 17]]);
                let hdr = tcp_offload(&mut frame, Some(Gso::Payload(1460)));
                assert_eq!(hdr.flags, VnetHdr::NEEDS_CSUM);
                assert_eq!(usize::from(hdr.csum_start), l4);
                assert_eq!(hdr.csum_offset, 16);
                // What the guest kernel computes from the partial field.
                assert_eq!(completed(&frame[l4..]), full, "v6 {v6} payload {payload}");
                if payload > 1460 {
                    let want = if v6 {
                        VnetHdr::GSO_TCPV6
                    } else {
                        VnetHdr::GSO_TCPV4
                    };
                    assert_eq!(hdr.gso_type, want);
                    assert_eq!(hdr.gso_size, 1460);
                    assert_eq!(usize::from(hdr.hdr_len), l4 + 20);
                } else {
                    assert_eq!(hdr.gso_type, VnetHdr::GSO_NONE);
                }
            }
        }
    }

    #[test]
    fn frames_other_than_tcp_get_an_empty_header() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            tcp_offload(&mut arp, Some(Gso::Payload(1460))),
            VnetHdr::default()
        );
        let mut short = vec![0u8; 20];
        assert_eq!(tcp_offload(&mut short, None), VnetHdr::default());
        let mut udp = segment(false, 10);
        udp[14 + 9] = 17;
        assert_eq!(tcp_offload(&mut udp, None), VnetHdr::default());
        // A TCP data offset below the 20-byte header (found by fuzzing).
        let mut bad = segment(false, 10);
        bad[14 + 20 + 12] = 0x10;
        assert_eq!(
            tcp_offload(&mut bad, Some(Gso::Mss(1460))),
            VnetHdr::default()
        );
    }

    #[test]
    fn udp_train_header_and_partial_checksum() {
        use crate::wire::emit::{self, Header, UDP_PAYLOAD_OFFSET};
        let mut frame = vec![0u8; 2048];
        let h = Header {
            eth_src: EthernetAddress([2, 0, 0, 0, 0, 1]),
            eth_dst: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ident: 1,
        };
        for (i, b) in frame[UDP_PAYLOAD_OFFSET..UDP_PAYLOAD_OFFSET + 1000]
            .iter_mut()
            .enumerate()
        {
            *b = i as u8;
        }
        let len = emit::udp_frame(
            &mut frame,
            &h,
            "10.0.2.2:53".parse().unwrap(),
            "10.0.2.100:4000".parse().unwrap(),
            1000,
        );
        let full = u16::from_be_bytes([frame[40], frame[41]]);
        let hdr = udp_offload(&mut frame[..len], 400);
        assert_eq!(hdr.gso_type, VnetHdr::GSO_UDP_L4);
        assert_eq!(
            (hdr.gso_size, hdr.csum_start, hdr.csum_offset, hdr.hdr_len),
            (400, 34, 6, 42)
        );
        assert_eq!(hdr.flags, VnetHdr::NEEDS_CSUM);
        // Completing the partial field gives the full checksum back.
        assert_eq!(completed(&frame[34..len]), full);
        assert_eq!(udp_offload(&mut frame[..len], 0), VnetHdr::default());
        let mut tcp = segment(false, 10);
        assert_eq!(udp_offload(&mut tcp, 400), VnetHdr::default());
    }

    #[test]
    fn udp_l4_header_is_reported_with_its_size() {
        let mut tap_like = [0u8; VNET_HDR_LEN];
        tap_like[1] = VnetHdr::GSO_UDP_L4;
        tap_like[4..6].copy_from_slice(&0u16.to_ne_bytes());
        let h = VnetHdr::parse(&tap_like);
        assert_eq!((h.gso_type, h.gso_size), (VnetHdr::GSO_UDP_L4, 0));
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: VnetHdr::NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), h);
    }
}
