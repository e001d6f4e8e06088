//! The guest-facing side of rnet: one smoltcp [`Interface`] on the TAP,
//! the virtual hosts it stands for (gateway, DNS), and the frames rnet
//! builds itself.
//!
//! # Theory of operation
//!
//! Every frame read from the TAP is first looked at by
//! [`classify`](crate::wire::classify), which
//! validates it and decides who handles it. smoltcp only ever sees ARP for
//! the virtual hosts and TCP segments, and it sees each TCP segment together
//! with the one-socket [`SocketSet`] of the flow it belongs to, so the cost
//! of a frame does not depend on how many flows exist (smoltcp matches a
//! segment against every socket of the set it is given). UDP and ICMP never
//! enter smoltcp: rnet parses them and answers with frames built by
//! [`emit`](crate::wire::emit), which is cheaper than a smoltcp socket per guest port.
//!
//! The interface runs with AnyIP, so a TCP socket may listen on any
//! destination the guest dials; ARP is filtered before smoltcp so that only
//! the gateway and DNS addresses are ever claimed.

pub mod ndp;
use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::config::Config;
use crate::phy::device::FrameDevice;
use crate::phy::tap::TapTx;
use crate::wire::emit;

/// The MAC address rnet's virtual hosts answer with (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// Addresses of the virtual network.
#[derive(Clone, Copy, Debug)]
pub struct NetAddrs {
    /// The network.
    pub cidr: crate::config::Ipv4Cidr,
    /// Gateway (net + 2).
    pub gateway: Ipv4Addr,
    /// DNS forwarder (net + 3).
    pub dns: Ipv4Addr,
    /// Addresses standing for the host ([`Config::host_aliases`]).
    pub host_aliases: [Option<Ipv4Addr>; crate::config::MAX_HOST_ALIASES],
    /// IPv6 addresses, when IPv6 is on.
    pub v6: Option<V6Addrs>,
}

/// rnet's IPv6 addresses on the virtual link.
#[derive(Clone, Copy, Debug)]
pub struct V6Addrs {
    /// The /64 prefix (network address).
    pub prefix: Ipv6Addr,
    /// Gateway (prefix::2 unless configured).
    pub gateway: Ipv6Addr,
    /// DNS forwarder (prefix::3).
    pub dns: Ipv6Addr,
    /// The router's link-local address (fe80::2), source of RAs.
    pub link_local: Ipv6Addr,
}

/// rnet's link-local address.
pub const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

impl V6Addrs {
    /// Whether `ip` is one of rnet's own addresses (gateway, DNS, link-local).
    pub fn is_virtual(&self, ip: Ipv6Addr) -> bool {
        ip == self.gateway || ip == self.dns || ip == self.link_local
    }

    /// Whether `ip` lies in the /64.
    pub fn in_prefix(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) >> 64 == u128::from(self.prefix) >> 64
    }

    /// Whether `ip` may be a guest's source address for NATed traffic.
    pub fn is_guest_source(&self, ip: Ipv6Addr) -> bool {
        self.in_prefix(ip) && !self.is_virtual(ip) && ip != self.prefix
    }
}

impl NetAddrs {
    /// Derives the addresses from a configuration.
    pub fn from_config(cfg: &Config) -> Self {
        let mut host_aliases = [None; crate::config::MAX_HOST_ALIASES];
        for (slot, a) in host_aliases.iter_mut().zip(cfg.host_aliases()) {
            *slot = Some(*a);
        }
        Self {
            cidr: cfg.cidr(),
            gateway: cfg.gateway(),
            dns: cfg.dns(),
            host_aliases,
            v6: cfg.ipv6_prefix().map(|prefix| V6Addrs {
                prefix,
                gateway: cfg.ipv6_gateway().unwrap_or(prefix),
                dns: cfg.ipv6_dns().unwrap_or(prefix),
                link_local: LINK_LOCAL,
            }),
        }
    }

    /// Whether `ip` is one of rnet's own virtual hosts.
    pub fn is_virtual(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway || ip == self.dns || self.host_aliases.contains(&Some(ip))
    }

    /// Whether `ip` may be a guest's source address.
    pub fn is_guest_source(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip)
            && !self.is_virtual(ip)
            && ip != self.cidr.network()
            && ip != self.cidr.broadcast()
    }
}

/// The smoltcp interface plus what rnet knows about the guest link.
pub struct Stack {
    /// The smoltcp interface (AnyIP, Ethernet).
    pub iface: Interface,
    /// rnet's MAC on the virtual link.
    pub mac: EthernetAddress,
    /// The guest's MAC, learned from its frames.
    pub guest_mac: Option<EthernetAddress>,
    /// IP MTU of the link.
    pub mtu: usize,
    /// Addresses of the virtual network.
    pub addrs: NetAddrs,
    ip_ident: u16,
}

impl Stack {
    /// Creates the interface for `cfg`, transmitting through `tx`.
    pub fn new(cfg: &Config, tx: TapTx<'_>, now: Instant) -> Self {
        let mac = EthernetAddress(GATEWAY_MAC);
        let addrs = NetAddrs::from_config(cfg);
        let mtu = cfg.mtu() as usize;
        let mut dev = FrameDevice::new(None, tx, mtu);
        let mut ic = IfaceConfig::new(HardwareAddress::Ethernet(mac));
        ic.random_seed = seed();
        let mut iface = Interface::new(ic, &mut dev, now);
        iface.set_any_ip(true);
        let prefix = addrs.cidr.prefix();
        iface.update_ip_addrs(|a| {
            // Five addresses fit (smoltcp's iface-max-addr-count-5).
            let _ = a.push(IpCidr::new(addrs.gateway.into(), prefix));
            let _ = a.push(IpCidr::new(addrs.dns.into(), prefix));
            if let Some(v6) = addrs.v6 {
                let _ = a.push(IpCidr::new(v6.gateway.into(), 64));
                let _ = a.push(IpCidr::new(v6.dns.into(), 64));
                let _ = a.push(IpCidr::new(v6.link_local.into(), 64));
            }
        });
        Self {
            iface,
            mac,
            guest_mac: None,
            mtu,
            addrs,
            ip_ident: 1,
        }
    }

    /// Feeds one frame to smoltcp together with the socket set that owns it.
    pub fn ingress(&mut self, now: Instant, frame: &[u8], tx: TapTx<'_>, sockets: &mut SocketSet) {
        let mut dev = FrameDevice::new(Some(frame), tx, self.mtu);
        self.iface.poll_ingress_single(now, &mut dev, sockets);
    }

    /// Lets the sockets of `sockets` transmit what they have queued;
    /// `guest_mss` is the flow's real MSS when rnet enlarged the one smoltcp
    /// saw (see [`rewrite_syn_mss`]).
    pub fn egress(
        &mut self,
        now: Instant,
        mut tx: TapTx<'_>,
        sockets: &mut SocketSet,
        guest_mss: Option<u16>,
    ) {
        // Each round emits at most one segment per socket; bound the rounds
        // so one flow cannot monopolise the loop (its timer brings it back).
        for _ in 0..256 {
            let mut dev = FrameDevice::new(None, tx.reborrow(), self.mtu).with_guest_mss(guest_mss);
            if self.iface.poll_egress(now, &mut dev, sockets) == smoltcp::iface::PollResult::None {
                break;
            }
        }
    }

    /// Next IPv4 identification value for frames rnet builds.
    pub fn next_ident(&mut self) -> u16 {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        self.ip_ident
    }

    /// The link-layer destination for a frame to the guest, if known.
    pub fn guest_mac(&self) -> Option<EthernetAddress> {
        self.guest_mac
    }
}

/// The MSS rnet puts in a guest's IPv6 SYN when offloads are on: the most
/// an IPv6 packet of 65,535 bytes can carry, so smoltcp builds segments of
/// up to 64 KiB that leave as GSO frames.
pub const LARGE_MSS6: u16 = 65535 - 40 - 20;

/// Replaces the MSS option of the TCP SYN (or SYN-ACK) in the IPv6 packet
/// `ip` with [`LARGE_MSS6`] and returns the guest's own value, or None
/// when `ip` is no such segment or carries no MSS option.
///
/// smoltcp 0.14 can ask the device to segment IPv4 only; for IPv6 it keeps
/// segments to the smaller of the link MTU and the peer's MSS. Showing it a
/// large MSS and cutting its segments to the guest's real one in the
/// device is the same offload by other means. The checksum is left as is:
/// the classifier has already checked it, and smoltcp, with offloads on,
/// does not look at it.
pub fn rewrite_syn_mss(ip: &mut [u8]) -> Option<u16> {
    let tcp = ip.get_mut(40..)?;
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return None;
    }
    let hlen = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    let mut i = 20;
    while i < hlen {
        match tcp[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*tcp.get(i + 1)?);
                if len < 2 || i + len > hlen {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    tcp[i + 2..i + 4].copy_from_slice(&LARGE_MSS6.to_be_bytes());
                    return Some(old);
                }
                i += len;
            }
        }
    }
    None
}

/// A per-process seed for smoltcp's initial sequence numbers and ports.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// smoltcp's clock, from the monotonic clock.
pub fn now() -> Instant {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    Instant::from_micros(start.elapsed().as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 header (zeros will do) and a TCP header with `flags` and
    /// `opts`.
    fn segment(flags: u8, opts: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 20];
        p[40 + 12] = (((20 + opts.len()) / 4) as u8) << 4;
        p[40 + 13] = flags;
        p.extend_from_slice(opts);
        p
    }

    #[test]
    fn syn_mss_is_enlarged_and_the_old_one_returned() {
        // NOP, NOP, SACK-permitted, MSS 1440, window scale 7, NOP: the
        // order Linux does not use, so the walk over options is exercised.
        let opts = [1, 1, 4, 2, 2, 4, 0x05, 0xa0, 3, 3, 7, 1];
        for flags in [0x02, 0x12] {
            let mut p = segment(flags, &opts);
            assert_eq!(rewrite_syn_mss(&mut p), Some(1440));
            assert_eq!(&p[64..68], &[2, 4, 0xff, 0xc3], "65475");
            assert_eq!(&p[60..64], &opts[..4], "options before MSS intact");
            assert_eq!(&p[68..], &opts[8..], "options after MSS intact");
        }
    }

    #[test]
    fn other_segments_are_left_alone() {
        let mss = [2, 4, 0x05, 0xa0];
        let mut ack = segment(0x10, &mss);
        assert_eq!(rewrite_syn_mss(&mut ack), None);
        assert_eq!(&ack[60..], &mss);
        let mut no_mss = segment(0x02, &[1, 1, 4, 2]);
        assert_eq!(rewrite_syn_mss(&mut no_mss), None);
        // An option running past the header, a zero length, a short packet.
        for bad in [vec![2u8, 9, 0, 0], vec![5, 0, 1, 1]] {
            let mut p = segment(0x02, &bad);
            assert_eq!(rewrite_syn_mss(&mut p), None, "{bad:?}");
        }
        assert_eq!(rewrite_syn_mss(&mut [0u8; 50]), None);
    }
}
