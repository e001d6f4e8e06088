//! `classify` — the first look at every guest frame — on arbitrary bytes,
//! and the SYN MSS rewrite that walks TCP options in place.
//!
//! It must never panic, and every slice it hands back must lie inside the
//! frame it was given (the engine turns them into offsets).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rnet::Config;
use rnet::wire::classify::{Verdict, classify};
use rnet::stack::{GATEWAY_MAC, NetAddrs};
use smoltcp::wire::EthernetAddress;

fn addrs() -> &'static NetAddrs {
    static ADDRS: OnceLock<NetAddrs> = OnceLock::new();
    ADDRS.get_or_init(|| {
        let cfg = Config::builder()
            .ipv6(Some(rnet::config::DEFAULT_IPV6_PREFIX))
            .build()
            .expect("default config with IPv6");
        NetAddrs::from_config(&cfg)
    })
}

fn inside(frame: &[u8], part: &[u8]) {
    let start = part.as_ptr() as usize;
    let base = frame.as_ptr() as usize;
    assert!(
        start >= base && start + part.len() <= base + frame.len(),
        "classify returned a slice outside the frame"
    );
}

fuzz_target!(|frame: &[u8]| {
    // Both as a frame whose checksums are checked and as one the guest
    // kernel vouched for (offloads on).
    for vouched in [false, true] {
        check(frame, vouched);
    }
    // The SYN MSS rewrite (IPv6 with offloads) walks TCP options in place.
    if let Some(ip) = frame.get(14..) {
        let mut ip = ip.to_vec();
        if rnet::stack::rewrite_syn_mss(&mut ip).is_some() {
            assert_eq!(ip.len(), frame.len() - 14, "rewrite changed the length");
        }
    }
});

fn check(frame: &[u8], vouched: bool) {
    let c = classify(frame, EthernetAddress(GATEWAY_MAC), addrs(), vouched);
    match c.verdict {
        Verdict::Tcp { ip, .. } => inside(frame, ip),
        Verdict::Udp { payload, ip, .. } => {
            inside(frame, payload);
            inside(frame, ip);
        }
        Verdict::Dhcp { payload } => inside(frame, payload),
        Verdict::Echo { icmp, .. } => {
            inside(frame, icmp);
            // The engine reads the echo data from byte 8 of the message.
            assert!(icmp.len() >= 8, "echo request shorter than its header");
        }
        Verdict::Echo6 { icmp, .. } => {
            inside(frame, icmp);
            assert!(icmp.len() >= 8, "echo request shorter than its header");
        }
        Verdict::Arp
        | Verdict::NeighborSolicit { .. }
        | Verdict::NeighborAdvert
        | Verdict::RouterSolicit
        | Verdict::Drop(_) => {}
    }
}
