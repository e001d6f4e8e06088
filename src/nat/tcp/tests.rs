//! Unit tests of the ring memory and segment helpers.

use super::*;

#[test]
fn span_covers_and_wraps() {
    assert_eq!(span(0, 0), 0);
    assert_eq!(span(0, 1), 1);
    assert_eq!(span(CHUNK - 1, 2), 0b11);
    assert_eq!(span(RING_CAP - 1, 2), 1 | 1 << (CHUNKS - 1));
    assert_eq!(span(5, RING_CAP), (1u64 << CHUNKS) - 1);
    assert_eq!(span(3 * CHUNK, CHUNK), 1 << 3);
}

#[test]
fn strip_payload_keeps_a_valid_ack() {
    use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};
    let mut ip = vec![0u8; 20 + 20 + 100];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&140u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 2, 100]);
    ip[16..20].copy_from_slice(&[10, 0, 2, 2]);
    ip[20 + 4..20 + 8].copy_from_slice(&1000u32.to_be_bytes());
    ip[20 + 12] = 5 << 4;
    ip[20 + 13] = 0x19; // ACK PSH FIN
    assert_eq!(tcp_seq(&ip), Some((1000, 0x19, 100)));
    let n = strip_payload(&mut ip).unwrap();
    assert_eq!(n, 40);
    let p = Ipv4Packet::new_checked(&ip[..n]).unwrap();
    assert!(p.verify_checksum());
    let (s, d): (IpAddress, IpAddress) = (p.src_addr().into(), p.dst_addr().into());
    let t = TcpPacket::new_checked(&ip[20..n]).unwrap();
    assert!(t.verify_checksum(&s, &d));
    assert!(t.ack() && !t.fin() && !t.psh());
    assert_eq!(tcp_seq(&ip[..n]), Some((1000, 0x10, 0)));
}

#[test]
fn release_returns_pages() {
    let mut r = RingMem::new().unwrap();
    let s = r.storage();
    s[CHUNK * 2] = 7;
    s[CHUNK * 5 + 9] = 9;
    r.touched |= span(CHUNK * 2, 1) | span(CHUNK * 5 + 9, 1);
    assert_eq!(r.chunks(), 2);
    assert_eq!(r.release(1 << 2), 1);
    assert_eq!(s[CHUNK * 2], 0, "a released chunk reads as zero");
    assert_eq!(s[CHUNK * 5 + 9], 9, "other chunks keep their bytes");
    assert_eq!(r.chunks(), 1);
}
