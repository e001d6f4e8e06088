//! UDP-tunnel GSO super-frames from the guest, cut as a NIC would.
//!
//! With `TUN_F_UDP_TUNNEL_GSO` on the TAP (see [`crate::phy::vnet`]), a VXLAN or
//! Geneve device in the guest hands over one outer UDP datagram carrying
//! an inner TCP segment (or UDP train) of up to 64 KiB, its segment size
//! and the offsets of the outer transport and inner network headers in the
//! virtio-net header. [`segment_tunnel`] cuts it into the datagrams the
//! guest would otherwise have sent one by one: per datagram the tunnel
//! header and inner headers, inner IP length and IPv4 identification,
//! TCP sequence number and flags adjusted, inner checksums complete (the
//! far end checks them). [`TunnelTrain`] keeps the result and hands it to
//! the TAP reader as USO super-frames of the outer flow, as many whole
//! datagrams per frame as one IP packet holds, so the engine sends each
//! with one `UDP_SEGMENT` send as it does the guest's own USO frames.

/// A UDP-tunnel GSO frame from the guest (a VXLAN or Geneve datagram whose
/// inner TCP segment or UDP train the guest kernel left for "the NIC" to
/// cut): where its parts start, from the start of the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelGso {
    /// The outer UDP header.
    pub outer_th: usize,
    /// The inner IP header (after the tunnel header and inner Ethernet).
    pub inner_nh: usize,
    /// Inner payload bytes per segment.
    pub gso_size: usize,
    /// The inner transport is UDP (a USO train), else TCP.
    pub inner_udp: bool,
}

/// Cuts the tunnel super-frame `frame` as the NIC would and writes the
/// outer UDP payloads of the resulting datagrams back to back into `out`:
/// each the tunnel header and inner headers, then `gso_size` inner payload
/// bytes (the last datagram may be shorter), inner IP lengths, IPv4
/// identification, TCP sequence numbers and flags adjusted per segment and
/// the inner IP and L4 checksums complete. Returns the bytes written and
/// the size of every datagram but the last; None for a frame that does
/// not parse or does not fit.
pub fn segment_tunnel(frame: &[u8], t: TunnelGso, out: &mut [u8]) -> Option<(usize, usize)> {
    use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
    let tunnel = t.outer_th.checked_add(8)?;
    let inner = frame.get(t.inner_nh..)?;
    if t.inner_nh < tunnel || t.gso_size == 0 || inner.is_empty() {
        return None;
    }
    let v4 = inner[0] >> 4 == 4;
    let (ip_len, proto) = if v4 {
        let ip = Ipv4Packet::new_checked(inner).ok()?;
        (usize::from(ip.header_len()), ip.next_header())
    } else {
        let ip = Ipv6Packet::new_checked(inner).ok()?;
        (40, ip.next_header())
    };
    let want = if t.inner_udp {
        IpProtocol::Udp
    } else {
        IpProtocol::Tcp
    };
    if proto != want {
        return None;
    }
    let l4 = t.inner_nh + ip_len;
    let l4_len = if t.inner_udp {
        8
    } else {
        usize::from(*frame.get(l4 + 12)? >> 4) * 4
    };
    let body = l4 + l4_len;
    let payload = frame.get(body..)?;
    if l4_len < if t.inner_udp { 8 } else { 20 } || payload.is_empty() {
        return None;
    }
    let head = &frame[tunnel..body];
    let nseg = payload.len().div_ceil(t.gso_size);
    if nseg * head.len() + payload.len() > out.len() {
        return None;
    }
    let (nh, th) = (t.inner_nh - tunnel, l4 - tunnel);
    let ident = if v4 {
        Ipv4Packet::new_unchecked(inner).ident()
    } else {
        0
    };
    let seq = if t.inner_udp {
        0
    } else {
        u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().ok()?)
    };
    let mut at = 0;
    for (i, chunk) in payload.chunks(t.gso_size).enumerate() {
        let d = &mut out[at..at + head.len() + chunk.len()];
        d[..head.len()].copy_from_slice(head);
        d[head.len()..].copy_from_slice(chunk);
        let l4_total = l4_len + chunk.len();
        let (src, dst): (IpAddress, IpAddress) = if v4 {
            let mut ip = Ipv4Packet::new_unchecked(&mut d[nh..]);
            ip.set_total_len((ip_len + l4_total) as u16);
            ip.set_ident(ident.wrapping_add(i as u16));
            ip.fill_checksum();
            (ip.src_addr().into(), ip.dst_addr().into())
        } else {
            let mut ip = Ipv6Packet::new_unchecked(&mut d[nh..]);
            ip.set_payload_len(l4_total as u16);
            (ip.src_addr().into(), ip.dst_addr().into())
        };
        let seg = &mut d[th..];
        if t.inner_udp {
            let mut udp = UdpPacket::new_unchecked(seg);
            udp.set_len(l4_total as u16);
            udp.fill_checksum(&src, &dst);
        } else {
            let last = i + 1 == nseg;
            // Sequence numbers advance by the payload before; FIN and PSH
            // belong to the last piece, CWR to the first.
            seg[4..8].copy_from_slice(&seq.wrapping_add((i * t.gso_size) as u32).to_be_bytes());
            if !last {
                seg[13] &= !0x09;
            }
            if i > 0 {
                seg[13] &= !0x80;
            }
            TcpPacket::new_unchecked(seg).fill_checksum(&src, &dst);
        }
        at += head.len() + chunk.len();
    }
    Some((at, head.len() + t.gso_size))
}

/// The datagrams of one cut super-frame, returned a frame at a time.
pub struct TunnelTrain {
    /// The outer Ethernet, IP and UDP headers.
    outer: [u8; 128],
    outer_len: usize,
    /// The outer UDP payloads, back to back.
    train: Box<[u8]>,
    len: usize,
    at: usize,
    /// Size of each datagram (the last may be shorter).
    dgram: usize,
}

impl Default for TunnelTrain {
    fn default() -> Self {
        Self::new()
    }
}

impl TunnelTrain {
    /// Room for the datagrams of a 64 KiB super-frame cut at any segment
    /// size down to a few hundred bytes.
    pub fn new() -> Self {
        Self {
            outer: [0; 128],
            outer_len: 0,
            train: vec![0u8; 2 * 65536].into_boxed_slice(),
            len: 0,
            at: 0,
            dgram: 0,
        }
    }

    /// Cuts `frame` (outer IPv4 or IPv6); false, keeping nothing, when it
    /// does not parse or a datagram would not fit one frame of `max_frame`
    /// bytes.
    pub fn cut(&mut self, frame: &[u8], t: TunnelGso, max_frame: usize) -> bool {
        let outer_len = t.outer_th + 8;
        // Outer Ethernet, the IP header (IPv6: 40 bytes at least), UDP.
        let least = match frame.get(12..14) {
            Some([0x08, 0x00]) => 14 + 20 + 8,
            Some([0x86, 0xdd]) => 14 + 40 + 8,
            _ => return false,
        };
        if outer_len < least || outer_len > self.outer.len() || frame.len() < outer_len {
            return false;
        }
        let Some((len, dgram)) = segment_tunnel(frame, t, &mut self.train) else {
            return false;
        };
        // Every frame must hold one whole datagram in one IP packet.
        if dgram > 65535 - (outer_len - 14) || outer_len + dgram > max_frame {
            return false;
        }
        self.outer[..outer_len].copy_from_slice(&frame[..outer_len]);
        (self.outer_len, self.len, self.at, self.dgram) = (outer_len, len, 0, dgram);
        true
    }

    /// Writes the next frame into `rx`: the outer headers (lengths and
    /// IPv4 header checksum set, the outer UDP checksum zero: rnet
    /// terminates that header) and as many whole datagrams as one IP packet
    /// holds. Its length and, when it holds several, their size (a USO
    /// super-frame); None when all were returned.
    pub fn next(&mut self, rx: &mut [u8]) -> Option<(usize, Option<u16>)> {
        use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
        if self.at >= self.len {
            return None;
        }
        let ol = self.outer_len;
        let ip_len = ol - 14 - 8;
        let room = (65535 - ip_len - 8).min(rx.len() - ol);
        let take = ((room / self.dgram).max(1) * self.dgram).min(self.len - self.at);
        rx[..ol].copy_from_slice(&self.outer[..ol]);
        rx[ol..ol + take].copy_from_slice(&self.train[self.at..self.at + take]);
        self.at += take;
        let n = ol + take;
        let udp_len = 8 + take;
        if rx[12..14] == [0x08, 0x00] {
            let mut ip = Ipv4Packet::new_unchecked(&mut rx[14..n]);
            ip.set_total_len((ip_len + udp_len) as u16);
            ip.fill_checksum();
        } else {
            let mut ip = Ipv6Packet::new_unchecked(&mut rx[14..n]);
            ip.set_payload_len((ip_len - 40 + udp_len) as u16);
        }
        rx[ol - 4..ol - 2].copy_from_slice(&(udp_len as u16).to_be_bytes());
        rx[ol - 2..ol].copy_from_slice(&[0, 0]);
        Some((n, (take > self.dgram).then_some(self.dgram as u16)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// A VXLAN super-frame as the guest hands it over: outer Ethernet,
    /// IPv4 and UDP, the VXLAN header, inner Ethernet, IPv4 and TCP (FIN,
    /// PSH and CWR set), then `payload` bytes of pattern.
    fn tunnel_frame(payload: usize) -> (Vec<u8>, TunnelGso) {
        use smoltcp::wire::{IpProtocol, Ipv4Address, Ipv4Packet};
        let mut f = vec![0u8; 14 + 20 + 8 + 8 + 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut outer = Ipv4Packet::new_unchecked(&mut f[14..34]);
        outer.set_version(4);
        outer.set_header_len(20);
        outer.set_next_header(IpProtocol::Udp);
        let inner_nh = 14 + 20 + 8 + 8 + 14;
        f[inner_nh - 2..inner_nh].copy_from_slice(&[0x08, 0x00]);
        let len = f.len() - inner_nh;
        let mut ip = Ipv4Packet::new_unchecked(&mut f[inner_nh..inner_nh + 20]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(len as u16);
        ip.set_ident(0xfffe);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr(Ipv4Address::new(10, 244, 0, 1));
        ip.set_dst_addr(Ipv4Address::new(10, 244, 0, 2));
        let th = inner_nh + 20;
        f[th + 4..th + 8].copy_from_slice(&0xffff_fc00u32.to_be_bytes());
        f[th + 12] = 5 << 4;
        f[th + 13] = 0x80 | 0x10 | 0x08 | 0x01;
        for (i, b) in f[th + 20..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let t = TunnelGso {
            outer_th: 34,
            inner_nh,
            gso_size: 1000,
            inner_udp: false,
        };
        (f, t)
    }

    #[test]
    fn tunnel_super_frame_is_cut_into_whole_vxlan_datagrams() {
        use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};
        let (f, t) = tunnel_frame(2500);
        let mut out = vec![0u8; 8192];
        let (len, dgram) = segment_tunnel(&f, t, &mut out).unwrap();
        let head = 8 + 14 + 20 + 20;
        assert_eq!((len, dgram), (3 * head + 2500, head + 1000));
        let mut seen = Vec::new();
        for (i, d) in out[..len].chunks(dgram).enumerate() {
            assert_eq!(d[..22], f[42..64], "tunnel and inner Ethernet headers");
            let ip = Ipv4Packet::new_checked(&d[22..]).unwrap();
            assert!(ip.verify_checksum(), "segment {i}");
            assert_eq!(usize::from(ip.total_len()), d.len() - 22);
            assert_eq!(ip.ident(), 0xfffeu16.wrapping_add(i as u16));
            let (s, dst) = (
                IpAddress::from(ip.src_addr()),
                IpAddress::from(ip.dst_addr()),
            );
            let tcp = TcpPacket::new_checked(&d[42..]).unwrap();
            assert!(tcp.verify_checksum(&s, &dst), "segment {i}");
            assert_eq!(
                tcp.seq_number().0 as u32,
                0xffff_fc00u32.wrapping_add(1000 * i as u32)
            );
            assert_eq!((tcp.fin(), tcp.psh()), (i == 2, i == 2), "segment {i}");
            assert_eq!(tcp.cwr(), i == 0, "segment {i}");
            assert!(tcp.ack());
            seen.extend_from_slice(tcp.payload());
        }
        assert_eq!(seen, f[f.len() - 2500..]);
    }

    #[test]
    fn tunnel_frames_that_do_not_parse_or_fit_are_refused() {
        let (f, t) = tunnel_frame(2500);
        let mut out = vec![0u8; 8192];
        assert!(
            segment_tunnel(&f, t, &mut out[..1000]).is_none(),
            "too small"
        );
        assert!(segment_tunnel(&f, TunnelGso { gso_size: 0, ..t }, &mut out).is_none());
        assert!(
            segment_tunnel(
                &f,
                TunnelGso {
                    inner_udp: true,
                    ..t
                },
                &mut out
            )
            .is_none()
        );
        assert!(segment_tunnel(&f, TunnelGso { inner_nh: 30, ..t }, &mut out).is_none());
        assert!(
            segment_tunnel(&f[..t.inner_nh + 30], t, &mut out).is_none(),
            "cut short"
        );
        assert!(
            segment_tunnel(
                &f,
                TunnelGso {
                    inner_nh: 9000,
                    ..t
                },
                &mut out
            )
            .is_none()
        );
        let mut short = f.clone();
        short[t.inner_nh + 20 + 12] = 2 << 4;
        assert!(
            segment_tunnel(&short, t, &mut out).is_none(),
            "TCP header under 20 bytes"
        );
        let mut tr = TunnelTrain::new();
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(
            !tr.cut(&v6, t, 65536),
            "an IPv6 outer header cannot end at 34"
        );
        assert!(!tr.cut(&f, TunnelGso { outer_th: 200, ..t }, 65536));
        assert!(tr.next(&mut vec![0u8; 65536]).is_none());
    }

    #[test]
    fn train_leaves_as_frames_of_whole_datagrams_within_one_ip_packet() {
        use smoltcp::wire::{Ipv4Packet, UdpPacket};
        // 64,000 bytes in 1,000-byte segments: 64 datagrams of 1,062
        // bytes, 67,968 in all: more than one IP packet holds.
        let (f, t) = tunnel_frame(64_000);
        let mut tr = TunnelTrain::new();
        assert!(tr.cut(&f, t, 65536 + 64));
        let mut rx = vec![0u8; 65536 + 64];
        let mut got = 0;
        let mut frames = 0;
        while let Some((n, seg)) = tr.next(&mut rx) {
            frames += 1;
            let ip = Ipv4Packet::new_checked(&rx[14..n]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(usize::from(ip.total_len()), n - 14);
            let udp = UdpPacket::new_checked(&rx[34..n]).unwrap();
            assert_eq!(usize::from(udp.len()), n - 34);
            let body = n - 42;
            assert_eq!(body % 1062, 0, "whole datagrams");
            assert_eq!(seg, (body > 1062).then_some(1062));
            got += body;
        }
        assert_eq!((frames, got), (2, 64 * 1062));
        assert!(tr.next(&mut rx).is_none());
    }
}
