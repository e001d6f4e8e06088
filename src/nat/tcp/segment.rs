//! Header reads and edits on a guest TCP segment before smoltcp sees it:
//! its sequence numbers (for ring accounting) and cutting its payload off
//! (past the memory ceiling).

/// Cuts the payload off the guest TCP segment in the IP packet `ip`, so
/// that smoltcp takes its acknowledgement and window but no data (the
/// guest sends the bytes again, as after a loss); a FIN goes with the
/// payload it followed. Returns the new length of the IP packet, or None
/// (unchanged) if `ip` is not such a segment.
pub fn strip_payload(ip: &mut [u8]) -> Option<usize> {
    use smoltcp::wire::{IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket};
    let (hlen, total) = match ip.first()? >> 4 {
        4 => (
            usize::from(ip[0] & 0x0f) * 4,
            usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
        ),
        6 if *ip.get(6)? == 6 => (40, 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))),
        _ => return None,
    };
    let doff = usize::from(ip.get(hlen + 12)? >> 4) * 4;
    let new = hlen + doff;
    if doff < 20 || new > total.min(ip.len()) {
        return None;
    }
    ip[hlen + 13] &= !0x09; // FIN, PSH
    let (src, dst): (IpAddress, IpAddress) = if hlen == 40 {
        let mut p = Ipv6Packet::new_unchecked(&mut ip[..new]);
        p.set_payload_len(doff as u16);
        (p.src_addr().into(), p.dst_addr().into())
    } else {
        let mut p = Ipv4Packet::new_unchecked(&mut ip[..new]);
        p.set_total_len(new as u16);
        p.fill_checksum();
        (p.src_addr().into(), p.dst_addr().into())
    };
    TcpPacket::new_unchecked(&mut ip[hlen..new]).fill_checksum(&src, &dst);
    Some(new)
}

/// Sequence number, flags and payload length of the TCP segment in the IP
/// packet `ip` (no IPv6 extension headers).
pub(super) fn tcp_seq(ip: &[u8]) -> Option<(u32, u8, usize)> {
    let (hlen, total) = match ip.first()? >> 4 {
        4 => {
            let declared = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]);
            (usize::from(ip[0] & 0x0f) * 4, usize::from(declared))
        }
        6 if *ip.get(6)? == 6 => {
            let declared = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (
                40,
                if declared == 0 {
                    ip.len()
                } else {
                    40 + declared
                },
            )
        }
        _ => return None,
    };
    let tcp = ip.get(hlen..total.min(ip.len()))?;
    if tcp.len() < 20 {
        return None;
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some((seq, tcp[13], tcp.len().checked_sub(doff)?))
}
