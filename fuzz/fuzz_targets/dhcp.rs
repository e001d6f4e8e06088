//! The DHCP server (`DhcpServer::handle`, sans-IO) on arbitrary datagrams.
//!
//! Input: `MODE` then the rest.
//!
//! - `MODE` even: the rest is one datagram for a server on 10.0.2.0/24.
//! - `MODE` odd: a conversation. `MODE >> 1` picks the network's prefix
//!   length (so tiny and empty pools are reached too), then records
//!   `DT LEN_HI LEN_LO BYTES...` follow: `DT` seconds pass (times 64 when
//!   its top bit is set, so leases and offers expire), then the datagram is
//!   handled by the same server.
//!
//! Checks: no panic; a reply fits the buffer and REPLY_LEN; the lease table
//! never holds more clients than the pool has addresses; an address bound
//! to a client lies inside the network.

#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rnet::services::dhcp::{DhcpConfig, DhcpServer, MAX_POOL, REPLY_LEN};

fn epoch() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn handle(server: &mut DhcpServer, msg: &[u8], now: Instant, out: &mut [u8]) {
    if let Ok(Some(r)) = server.handle(msg, now, out) {
        assert!(r.len <= REPLY_LEN, "reply of {} bytes", r.len);
    }
    assert!(server.lease_count() <= MAX_POOL as usize);
    let cfg = server.config().clone();
    if msg.len() >= 34 {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&msg[28..34]);
        if let Some(ip) = server.bound_addr(mac, now) {
            let mask = u32::MAX.checked_shl(32 - u32::from(cfg.prefix_len)).unwrap_or(0);
            assert_eq!(
                u32::from(ip) & mask,
                u32::from(cfg.network) & mask,
                "bound address {ip} outside {}/{}",
                cfg.network,
                cfg.prefix_len
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut out = [0u8; REPLY_LEN];
    if mode & 1 == 0 {
        let mut server = DhcpServer::new(DhcpConfig::new(Ipv4Addr::new(10, 0, 2, 0), 24, 65520));
        handle(&mut server, rest, epoch(), &mut out);
        return;
    }
    let prefix = (mode >> 1) % 33;
    let mut server = DhcpServer::new(DhcpConfig::new(Ipv4Addr::new(10, 0, 2, 0), prefix, 1500));
    let mut now = epoch();
    let mut rest = rest;
    while rest.len() >= 3 {
        let dt = u64::from(rest[0] & 0x7f) * if rest[0] & 0x80 != 0 { 64 } else { 1 };
        now += Duration::from_secs(dt);
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let body = &rest[3..];
        let take = len.min(body.len());
        handle(&mut server, &body[..take], now, &mut out);
        rest = &body[take..];
    }
});
