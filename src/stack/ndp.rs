//! IPv6 neighbour discovery and router advertisements on the virtual link:
//! rnet answers neighbour solicitations for its own addresses (gateway,
//! DNS, link-local), announces the /64 with its DNS servers and search
//! list (RFC 8106 RDNSS and DNSSL options) when the guest appears, when it
//! solicits, and every [`RA_INTERVAL`], and teaches smoltcp's neighbour
//! cache where a guest IPv6 address is (smoltcp would otherwise solicit
//! before its first SYN-ACK).
//!
//! All frames are built by [`emit`]; smoltcp only sees the synthetic
//! advertisements that fill its cache.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use smoltcp::iface::SocketSet;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::EthernetAddress;

use super::Stack;
use super::emit::{self, Header};
use crate::config::Config;
use crate::phy::tap::TapTx;

/// Time between unsolicited router advertisements.
pub const RA_INTERVAL: Duration = Duration::from_secs(60);
/// Router lifetime announced in router advertisements (seconds).
const RA_ROUTER_LIFETIME: u16 = 1800;
/// How long a guest address taught to smoltcp is not taught again (its
/// neighbour entries live 60 s).
const RELEARN: Duration = Duration::from_secs(20);
/// Guest addresses remembered as taught; past this the memory is reset.
const MAX_LEARNED: usize = 1024;

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// What the router side of the link keeps between frames.
pub struct Ndp {
    /// When the next unsolicited router advertisement is due (None until
    /// the guest has been seen).
    next_ra: Option<Instant>,
    /// The IPv6 DNS servers (RDNSS) router advertisements announce.
    dns: Vec<Ipv6Addr>,
    /// The search list (DNSSL), in DNS wire format.
    search: Vec<u8>,
    /// The link MTU announced.
    mtu: u32,
    /// Guest IPv6 addresses recently taught to smoltcp's neighbour cache.
    learned: HashMap<Ipv6Addr, Instant>,
}

impl Ndp {
    pub fn new(cfg: &Config) -> Self {
        let mut search = Vec::new();
        crate::config::encode_domains(cfg.search_domains(), &mut search);
        Self {
            next_ra: None,
            dns: cfg.dns_announced_v6().collect(),
            search,
            mtu: cfg.mtu(),
            learned: HashMap::new(),
        }
    }

    /// The guest sent its first frame: with IPv6 on, announce the router
    /// at once.
    pub fn guest_appeared(&mut self, stack: &Stack, now: Instant) {
        if stack.addrs.v6.is_some() {
            self.next_ra = Some(now);
        }
    }

    /// When [`Self::tick`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_ra
    }

    /// Sends the unsolicited router advertisement when due (and `enabled`).
    pub fn tick(&mut self, stack: &Stack, now: Instant, enabled: bool, tx: TapTx<'_>) {
        if enabled && self.next_ra.is_some_and(|at| now >= at) {
            self.router_advert(stack, tx);
            self.next_ra = Some(now + RA_INTERVAL);
        }
    }

    /// Sends a router advertisement to all nodes.
    pub fn router_advert(&self, stack: &Stack, mut tx: TapTx<'_>) {
        let Some(v6) = stack.addrs.v6 else {
            return;
        };
        let h = Header {
            eth_src: stack.mac,
            eth_dst: emit::ipv6_multicast_mac(ALL_NODES),
            ident: 0,
        };
        let ra = emit::RouterAdvert {
            prefix: v6.prefix,
            mtu: self.mtu,
            dns: &self.dns,
            search: &self.search,
            lifetime: RA_ROUTER_LIFETIME,
        };
        tx.build(|buf| emit::router_advert(buf, &h, v6.link_local, ALL_NODES, &ra));
    }

    /// Answers a neighbour solicitation from `src` (at `guest_mac`) for
    /// `target`, one of rnet's IPv6 addresses.
    pub fn neighbor_advert(
        &self,
        stack: &Stack,
        src: Ipv6Addr,
        target: Ipv6Addr,
        guest_mac: EthernetAddress,
        mut tx: TapTx<'_>,
    ) {
        let Some(v6) = stack.addrs.v6 else {
            return;
        };
        // Router flag for the gateway and the link-local router address: a
        // cleared flag would make the guest drop its routes via them.
        let router = if target == v6.dns { 0 } else { 0x80 };
        let (dst, eth_dst, flags) = if src.is_unspecified() {
            // Duplicate address detection: defend, to all nodes.
            (
                ALL_NODES,
                emit::ipv6_multicast_mac(ALL_NODES),
                router | 0x20,
            )
        } else {
            (src, guest_mac, router | 0x40 | 0x20)
        };
        let h = Header {
            eth_src: stack.mac,
            eth_dst,
            ident: 0,
        };
        tx.build(|buf| emit::neighbor_advert(buf, &h, target, dst, target, flags));
    }

    /// Teaches smoltcp where the guest address `ip` is, at most every
    /// 20 s per address.
    pub fn learn(
        &mut self,
        stack: &mut Stack,
        now: Instant,
        ip: Ipv6Addr,
        mac: EthernetAddress,
        tx: TapTx<'_>,
        sockets: &mut SocketSet,
    ) {
        if self.learned.get(&ip).is_some_and(|t| now < *t + RELEARN) {
            return;
        }
        if self.learned.len() >= MAX_LEARNED {
            self.learned.clear();
        }
        self.learned.insert(ip, now);
        let Some(v6) = stack.addrs.v6 else { return };
        // A synthetic neighbour advertisement from the guest, which smoltcp
        // takes into its cache and answers with nothing.
        let mut frame = [0u8; emit::ICMP6_OFFSET + 32];
        let h = Header {
            eth_src: mac,
            eth_dst: stack.mac,
            ident: 0,
        };
        let n = emit::neighbor_advert(&mut frame, &h, ip, v6.gateway, ip, 0x20);
        if n > 0 {
            stack.ingress(now, &frame[..n], tx, sockets);
        }
    }
}
