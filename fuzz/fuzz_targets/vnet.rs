//! The TAP's virtio-net header handling on arbitrary bytes: what the
//! kernel could hand rnet (a header plus a frame, including partial
//! checksums to complete inside an encapsulated payload), and the offload
//! header rnet builds for any frame it sends.
//!
//! # Input format
//!
//! `GSO_HI GSO_LO`: how the frame sent back is to be cut (0: not at all;
//! otherwise the top bit picks the guest's MSS over a payload size, and the
//! other 15 bits are the size), then the 12-byte virtio-net header and the
//! frame as the kernel would deliver them on one read.
//!
//! A `SOCK_SEQPACKET` socket pair stands in for the TAP: the target writes
//! the record to one end, reads it through [`Tap`] on the other, then sends
//! the frame back through the transmit path and reads that off the first end.
//! Nothing leaves the process.

#![no_main]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use rnet::phy::tap::{ReadOutcome, Tap};
use rnet::phy::vnet::{Gso, VNET_HDR_LEN};

struct Pair {
    guest: OwnedFd,
    tap: Tap,
}

fn pair() -> &'static Mutex<Pair> {
    static PAIR: std::sync::OnceLock<Mutex<Pair>> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let tap = Tap::with_vnet_hdr(b, true).expect("tap over the socket pair");
        Mutex::new(Pair { guest: a, tap })
    })
}

fuzz_target!(|data: &[u8]| {
    // Zero-length records read as end of file on a socket pair.
    if data.len() < 2 + VNET_HDR_LEN + 1 {
        return;
    }
    let gso = u16::from_be_bytes([data[0], data[1]]);
    let record = &data[2..];
    let mut p = pair().lock().expect("not poisoned");
    nix::unistd::write(p.guest.as_fd(), record).expect("write to the socket pair");
    let n = match p.tap.read_frame().expect("read") {
        ReadOutcome::Frame(n) => n,
        other => panic!("a written record must come back as a frame: {other:?}"),
    };
    assert!(n <= record.len() - VNET_HDR_LEN, "frame longer than written");
    let meta = p.tap.rx_meta();
    // A frame the kernel marks as GSO is always accepted up to 64 KiB; the
    // flags only ever come from the header.
    let _ = (meta.gso, meta.l4_csum_vouched, meta.unsupported);
    let (rx, mut tx) = p.tap.split();
    let frame = rx[..n].to_vec();
    let gso = match (gso & 0x8000 != 0, gso & 0x7fff) {
        (_, 0) => None,
        (true, n) => Some(Gso::Mss(n)),
        (false, n) => Some(Gso::Payload(n)),
    };
    let (_, sent) = tx.send_with(frame.len(), gso, |buf| buf.copy_from_slice(&frame));
    assert!(sent, "the socket pair takes every frame");
    let mut back = vec![0u8; VNET_HDR_LEN + frame.len() + 1];
    let got = nix::unistd::read(&p.guest, &mut back).expect("read back");
    assert_eq!(got, VNET_HDR_LEN + frame.len(), "header plus frame");
});
