//! Guest flows to host sockets: the address policy shared by every protocol,
//! and one module per protocol.
//!
//! [`route`] is the single place that decides where a guest destination
//! goes on the host, so that TCP, UDP and ICMP cannot disagree about what
//! the gateway means or which networks the allow-list admits, and
//! [`inbound_allowed`] the one that decides which host-side sources may
//! answer into a guest UDP flow.
//!
//! The order of the checks: the gateway (host loopback, by the loopback
//! switch), the DNS forwarder, addresses never forwarded (loopback,
//! multicast, the virtual network itself...), the host's own addresses
//! ([`local::LocalAddrs`], by the loopback switch as well), then the
//! outbound allow-list, which admits link-local addresses only when an
//! entry names them (see [`crate::config::OutboundPolicy`]). Connections
//! to ports rnet itself publishes are decided before this, by the engine
//! (hairpin: they go back to the guest whatever the loopback switch).

pub mod icmp;
pub mod local;
pub mod tcp;
pub mod udp;
pub mod udpio;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use smoltcp::wire::Icmpv4DstUnreachable;

use crate::config::Config;
use local::LocalAddrs;

/// Where a guest destination leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Open a host socket to this address.
    Host(SocketAddr),
    /// The DNS forwarder (net + 3, port 53).
    Dns,
    /// Refused; answer the guest as described.
    Deny(Deny),
}

/// Why a destination is refused, and how the guest learns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deny {
    /// The gateway while host loopback is off: ICMP net unreachable, as
    /// slirp4netns answers (the guest's connect says "Network is unreachable").
    HostLoopbackOff,
    /// Outside the outbound allow-list: ICMP administratively prohibited.
    NotAllowed,
    /// Loopback, broadcast, multicast or another unusable address.
    Special,
    /// DNS traffic while DNS is disabled: dropped silently (slirp4netns does
    /// the same, so a client times out as it would on a dead resolver).
    DnsDisabled,
}

impl Deny {
    /// The ICMP code that tells the guest, if any.
    pub fn icmp_code(self) -> Option<Icmpv4DstUnreachable> {
        match self {
            Deny::HostLoopbackOff => Some(Icmpv4DstUnreachable::NetUnreachable),
            Deny::NotAllowed => Some(Icmpv4DstUnreachable::CommProhibited),
            Deny::Special => Some(Icmpv4DstUnreachable::HostUnreachable),
            Deny::DnsDisabled => None,
        }
    }
}

impl Deny {
    /// The ICMPv6 destination-unreachable code that tells the guest, if any.
    pub fn icmp6_code(self) -> Option<crate::wire::emit::Unreach6> {
        use crate::wire::emit::Unreach6;
        match self {
            Deny::HostLoopbackOff => Some(Unreach6::NoRoute),
            Deny::NotAllowed => Some(Unreach6::AdminProhibited),
            Deny::Special => Some(Unreach6::Address),
            Deny::DnsDisabled => None,
        }
    }
}

/// Decides where a guest packet to `dst` goes, for either family.
pub fn route_any(cfg: &Config, local: &LocalAddrs, dst: SocketAddr) -> Route {
    match dst {
        SocketAddr::V4(d) => route(cfg, local, d),
        SocketAddr::V6(d) => route6(cfg, local, d),
    }
}

/// Whether a datagram from `from` may enter a guest UDP flow that has not
/// sent to it (endpoint-independent filtering): the same rule as a guest
/// destination, with the host's loopback and its own addresses admitted
/// only when host loopback is allowed.
pub fn inbound_allowed(cfg: &Config, local: &LocalAddrs, from: IpAddr) -> bool {
    let ip = match from {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() || local.contains(ip) {
        return cfg.allow_host_loopback();
    }
    let special = match ip {
        IpAddr::V4(a) => is_special(a),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    !special && cfg.outbound().allows(ip)
}

/// Decides where a guest IPv6 packet to `dst` goes: the IPv6 gateway is the
/// host's ::1 (with host loopback allowed), ::3 port 53 the DNS forwarder.
pub fn route6(cfg: &Config, local: &LocalAddrs, dst: SocketAddrV6) -> Route {
    let ip = *dst.ip();
    let (Some(prefix), Some(gw), Some(dns)) =
        (cfg.ipv6_prefix(), cfg.ipv6_gateway(), cfg.ipv6_dns())
    else {
        return Route::Deny(Deny::Special);
    };
    if ip == gw {
        return if cfg.allow_host_loopback() {
            Route::Host(SocketAddrV6::new(Ipv6Addr::LOCALHOST, dst.port(), 0, 0).into())
        } else {
            Route::Deny(Deny::HostLoopbackOff)
        };
    }
    if ip == dns {
        return match (dst.port(), cfg.disable_dns()) {
            (53, false) => Route::Dns,
            (53, true) => Route::Deny(Deny::DnsDisabled),
            _ => Route::Deny(Deny::Special),
        };
    }
    let in_prefix = u128::from(ip) >> 64 == u128::from(prefix) >> 64;
    if is_special6(ip) || in_prefix {
        return Route::Deny(Deny::Special);
    }
    if local.contains(ip.into()) && !cfg.allow_host_loopback() {
        return Route::Deny(Deny::HostLoopbackOff);
    }
    if !cfg.outbound().allows(ip) {
        return Route::Deny(Deny::NotAllowed);
    }
    Route::Host(SocketAddrV6::new(ip, dst.port(), 0, 0).into())
}

/// IPv6 addresses never forwarded: loopback, unspecified, multicast,
/// site-local, v4-mapped and v4-compatible, and the discard-only prefix.
/// (Link-local fe80::/10 is left to the allow-list, which admits it only
/// when an entry names it.)
fn is_special6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || s[0] & 0xffc0 == 0xfec0
        || ip.to_ipv4_mapped().is_some()
        || u128::from(ip) >> 32 == 0
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)
}

/// Maps a host-side IPv6 source address back to what the guest should see:
/// the host's ::1 appears as the IPv6 gateway.
pub fn guest_view6(cfg: &Config, from: SocketAddr) -> Option<SocketAddrV6> {
    match from {
        SocketAddr::V6(a) if a.ip().is_loopback() => cfg
            .ipv6_gateway()
            .map(|g| SocketAddrV6::new(g, a.port(), 0, 0)),
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none() => {
            Some(SocketAddrV6::new(*a.ip(), a.port(), 0, 0))
        }
        _ => None,
    }
}

/// Decides where a guest packet to `dst` goes.
pub fn route(cfg: &Config, local: &LocalAddrs, dst: SocketAddrV4) -> Route {
    let ip = *dst.ip();
    if ip == cfg.gateway() {
        return if cfg.allow_host_loopback() {
            Route::Host(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()).into())
        } else {
            Route::Deny(Deny::HostLoopbackOff)
        };
    }
    if ip == cfg.dns() {
        return match (dst.port(), cfg.disable_dns()) {
            (53, false) => Route::Dns,
            (53, true) => Route::Deny(Deny::DnsDisabled),
            _ => Route::Deny(Deny::Special),
        };
    }
    if cfg.host_aliases().contains(&ip) {
        return Route::Host(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()).into());
    }
    if is_special(ip) || cfg.cidr().contains(ip) {
        return Route::Deny(Deny::Special);
    }
    if local.contains(ip.into()) && !cfg.allow_host_loopback() {
        return Route::Deny(Deny::HostLoopbackOff);
    }
    if !cfg.outbound().allows(ip) {
        return Route::Deny(Deny::NotAllowed);
    }
    Route::Host(dst.into())
}

/// Addresses never forwarded: loopback, "this network", multicast,
/// broadcast and the reserved class E.
fn is_special(ip: Ipv4Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.octets()[0] == 0
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] >= 240
}

/// Maps a host-side source address back to what the guest should see:
/// the host's loopback appears as the gateway.
pub fn guest_view(cfg: &Config, from: SocketAddr) -> Option<SocketAddrV4> {
    match from {
        SocketAddr::V4(a) if a.ip().is_loopback() => {
            Some(SocketAddrV4::new(cfg.gateway(), a.port()))
        }
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| {
            if ip.is_loopback() {
                SocketAddrV4::new(cfg.gateway(), a.port())
            } else {
                SocketAddrV4::new(ip, a.port())
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OutboundPolicy;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn none() -> LocalAddrs {
        LocalAddrs::default()
    }

    #[test]
    fn host_addresses_follow_loopback_switch() {
        let local = LocalAddrs::fixed([
            ("198.18.0.1".parse().unwrap(), 32),
            ("fd43::1".parse().unwrap(), 128),
        ]);
        let p = Some("fd00::".parse().unwrap());
        let any =
            || OutboundPolicy::Only(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        let off = Config::builder().ipv6(p).outbound(any()).build().unwrap();
        assert_eq!(
            route(&off, &local, sa("198.18.0.1:80")),
            Route::Deny(Deny::HostLoopbackOff)
        );
        assert_eq!(
            route6(&off, &local, "[fd43::1]:80".parse().unwrap()),
            Route::Deny(Deny::HostLoopbackOff)
        );
        assert_eq!(
            route(&off, &local, sa("198.18.0.2:80")),
            Route::Host("198.18.0.2:80".parse().unwrap())
        );
        let on = Config::builder()
            .ipv6(p)
            .outbound(any())
            .allow_host_loopback(true)
            .build()
            .unwrap();
        assert_eq!(
            route(&on, &local, sa("198.18.0.1:80")),
            Route::Host("198.18.0.1:80".parse().unwrap())
        );
        // Link-local: refused unless an entry names it.
        assert_eq!(
            route(&on, &local, sa("169.254.169.254:80")),
            Route::Deny(Deny::NotAllowed)
        );
        assert_eq!(
            route6(&on, &local, "[fe80::1]:80".parse().unwrap()),
            Route::Deny(Deny::NotAllowed)
        );
        let named = Config::builder()
            .outbound(OutboundPolicy::Only(vec![
                "169.254.169.254/32".parse().unwrap(),
            ]))
            .build()
            .unwrap();
        assert_eq!(
            route(&named, &local, sa("169.254.169.254:80")),
            Route::Host("169.254.169.254:80".parse().unwrap())
        );
        // Inbound sources of UDP flows.
        assert!(!inbound_allowed(&off, &local, "127.0.0.1".parse().unwrap()));
        assert!(!inbound_allowed(
            &off,
            &local,
            "198.18.0.1".parse().unwrap()
        ));
        assert!(!inbound_allowed(
            &off,
            &local,
            "169.254.1.1".parse().unwrap()
        ));
        assert!(inbound_allowed(&off, &local, "198.18.0.2".parse().unwrap()));
        assert!(inbound_allowed(
            &on,
            &local,
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        let none_allowed = Config::builder()
            .outbound(OutboundPolicy::Only(vec![]))
            .build()
            .unwrap();
        assert!(!inbound_allowed(
            &none_allowed,
            &local,
            "198.18.0.2".parse().unwrap()
        ));
    }

    #[test]
    fn gateway_follows_loopback_switch() {
        let off = Config::builder().build().unwrap();
        assert_eq!(
            route(&off, &none(), sa("10.0.2.2:80")),
            Route::Deny(Deny::HostLoopbackOff)
        );
        let on = Config::builder().allow_host_loopback(true).build().unwrap();
        assert_eq!(
            route(&on, &none(), sa("10.0.2.2:80")),
            Route::Host("127.0.0.1:80".parse().unwrap())
        );
    }

    #[test]
    fn moved_dns_and_host_aliases() {
        let cfg = Config::builder()
            .dns_addr(Some(Ipv4Addr::new(169, 254, 1, 1)))
            .host_alias(Ipv4Addr::new(169, 254, 1, 2))
            .outbound(OutboundPolicy::Only(vec![]))
            .build()
            .unwrap();
        assert_eq!(route(&cfg, &none(), sa("169.254.1.1:53")), Route::Dns);
        assert_eq!(
            route(&cfg, &none(), sa("10.0.2.3:53")),
            Route::Deny(Deny::Special),
            "net + 3 is no longer the forwarder"
        );
        // An alias reaches the host's loopback whatever the gateway's switch.
        assert_eq!(
            route(&cfg, &none(), sa("169.254.1.2:8080")),
            Route::Host("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            route(&cfg, &none(), sa("10.0.2.2:80")),
            Route::Deny(Deny::HostLoopbackOff)
        );
        assert_eq!(
            route(&cfg, &none(), sa("169.254.1.3:80")),
            Route::Deny(Deny::NotAllowed)
        );
    }

    #[test]
    fn loopback_and_special_never_forwarded() {
        let cfg = Config::builder().allow_host_loopback(true).build().unwrap();
        for d in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "10.0.2.7:80",
        ] {
            assert_eq!(
                route(&cfg, &none(), sa(d)),
                Route::Deny(Deny::Special),
                "{d}"
            );
        }
    }

    #[test]
    fn allow_list_and_dns() {
        let cfg = Config::builder()
            .outbound(OutboundPolicy::Only(vec!["198.18.0.2/32".parse().unwrap()]))
            .build()
            .unwrap();
        assert_eq!(
            route(&cfg, &none(), sa("198.18.0.2:1")),
            Route::Host("198.18.0.2:1".parse().unwrap())
        );
        assert_eq!(
            route(&cfg, &none(), sa("198.18.0.3:1")),
            Route::Deny(Deny::NotAllowed)
        );
        assert_eq!(route(&cfg, &none(), sa("10.0.2.3:53")), Route::Dns);
        assert_eq!(
            route(&cfg, &none(), sa("10.0.2.3:54")),
            Route::Deny(Deny::Special)
        );
        let nodns = Config::builder().disable_dns(true).build().unwrap();
        assert_eq!(
            route(&nodns, &none(), sa("10.0.2.3:53")),
            Route::Deny(Deny::DnsDisabled)
        );
    }

    #[test]
    fn ipv6_routes() {
        let p = Some("fd00::".parse().unwrap());
        let s6 = |s: &str| -> SocketAddrV6 { s.parse().unwrap() };
        let off = Config::builder().ipv6(p).build().unwrap();
        assert_eq!(
            route6(&off, &none(), s6("[fd00::2]:80")),
            Route::Deny(Deny::HostLoopbackOff)
        );
        let on = Config::builder()
            .ipv6(p)
            .allow_host_loopback(true)
            .outbound(OutboundPolicy::Only(vec!["2001:db8::/32".parse().unwrap()]))
            .build()
            .unwrap();
        assert_eq!(
            route6(&on, &none(), s6("[fd00::2]:80")),
            Route::Host("[::1]:80".parse().unwrap())
        );
        assert_eq!(route6(&on, &none(), s6("[fd00::3]:53")), Route::Dns);
        assert_eq!(
            route6(&on, &none(), s6("[2001:db8::1]:80")),
            Route::Host("[2001:db8::1]:80".parse().unwrap())
        );
        assert_eq!(
            route6(&on, &none(), s6("[2001:db9::1]:80")),
            Route::Deny(Deny::NotAllowed)
        );
        for d in [
            "[::1]:80",
            "[::]:80",
            "[ff02::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[fd00::7]:80",
            "[fd00::3]:80",
        ] {
            assert_eq!(
                route6(&on, &none(), s6(d)),
                Route::Deny(Deny::Special),
                "{d}"
            );
        }
        assert_eq!(
            guest_view6(&on, "[::1]:9".parse().unwrap()),
            Some(s6("[fd00::2]:9"))
        );
    }

    #[test]
    fn host_loopback_shows_as_gateway() {
        let cfg = Config::builder().build().unwrap();
        assert_eq!(
            guest_view(&cfg, "127.0.0.1:9".parse().unwrap()),
            Some(sa("10.0.2.2:9"))
        );
        assert_eq!(
            guest_view(&cfg, "198.18.0.2:9".parse().unwrap()),
            Some(sa("198.18.0.2:9"))
        );
    }
}
