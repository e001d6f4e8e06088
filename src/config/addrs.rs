//! The addresses of the virtual network: those derived from the IPv4 CIDR
//! and the IPv6 prefix, their checks against each other, DNS upstreams,
//! and the search domains and servers announced to the guest.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

/// The default IPv6 prefix (`fd00::/64`) of rnet's own command line.
pub const DEFAULT_IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);

/// The address `n` above the /64 `prefix`.
pub(super) fn v6_nth(prefix: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix) | n)
}

/// Parses a `--dns-upstream` value: `IP`, `IP:PORT`, `[V6]:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(ConfigError::Dns(format!(
        "{s}: expected IP or IP:PORT (for IPv6 with a port: [ADDR]:PORT)"
    )))
}

impl ConfigBuilder {
    /// Checks the guest, gateway, DNS and host-alias addresses against the
    /// network and each other.
    pub(super) fn validate_addresses(&self) -> Result<(), ConfigError> {
        let c = self.cidr;
        let guest = self.guest_addr.unwrap_or_else(|| c.nth(100));
        let gateway = self.gateway_addr.unwrap_or_else(|| c.nth(2));
        let dns = self.dns_addr.unwrap_or_else(|| c.nth(3));
        let host_in_net = |ip: Ipv4Addr| c.contains(ip) && ip != c.network() && ip != c.broadcast();
        let unusable = |ip: Ipv4Addr| {
            ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast()
        };
        if !host_in_net(guest) {
            return Err(ConfigError::Conflict(format!(
                "guest address {guest} is not a host address of the network {}/{}",
                c.network(),
                c.prefix
            )));
        }
        if !host_in_net(gateway) || gateway == guest {
            return Err(ConfigError::Conflict(format!(
                "gateway {gateway} must be a host address of the network {}/{} other than the guest's {guest}",
                c.network(),
                c.prefix
            )));
        }
        if unusable(dns)
            || dns == guest
            || dns == gateway
            || dns == c.network()
            || dns == c.broadcast()
        {
            return Err(ConfigError::Conflict(format!(
                "DNS forwarder address {dns} must differ from the guest ({guest}) and the gateway ({gateway}) and be a unicast address"
            )));
        }
        if self.host_aliases.len() > MAX_HOST_ALIASES {
            return Err(ConfigError::Conflict(format!(
                "at most {MAX_HOST_ALIASES} host aliases, not {}",
                self.host_aliases.len()
            )));
        }
        for &a in &self.host_aliases {
            if unusable(a)
                || a == guest
                || a == gateway
                || a == dns
                || a == c.network()
                || a == c.broadcast()
            {
                return Err(ConfigError::Conflict(format!(
                    "host alias {a} must be a unicast address other than the guest ({guest}), gateway ({gateway}) and DNS forwarder ({dns})"
                )));
            }
        }
        Ok(())
    }
}

impl ConfigBuilder {
    /// Checks the IPv6 guest and gateway addresses against the prefix, the
    /// DNS forwarder (prefix::3) and each other.
    pub(super) fn validate_ipv6_addresses(&self) -> Result<(), ConfigError> {
        let Some(p) = self.ipv6 else {
            if let Some(a) = self.ipv6_guest_addr.or(self.ipv6_gateway_addr) {
                return Err(ConfigError::Conflict(format!(
                    "IPv6 address {a} given, but IPv6 is off: turn IPv6 on with its prefix {}/64",
                    ipv6_prefix_of(a)
                )));
            }
            return Ok(());
        };
        let guest = self.ipv6_guest_addr.unwrap_or_else(|| v6_nth(p, 0x100));
        let gateway = self.ipv6_gateway_addr.unwrap_or_else(|| v6_nth(p, 2));
        let dns = v6_nth(p, 3);
        for (what, a) in [("guest", guest), ("gateway", gateway)] {
            if ipv6_prefix_of(a) != p || a == p {
                return Err(ConfigError::Conflict(format!(
                    "IPv6 {what} address {a} is not a host address of the prefix {p}/64"
                )));
            }
            if a == dns {
                return Err(ConfigError::Conflict(format!(
                    "IPv6 {what} address {a} is the IPv6 DNS forwarder's (prefix::3); choose another"
                )));
            }
        }
        if guest == gateway {
            return Err(ConfigError::Conflict(format!(
                "IPv6 gateway {gateway} must differ from the guest's address"
            )));
        }
        Ok(())
    }
}

/// The /64 prefix (network address) an IPv6 address lies in.
pub fn ipv6_prefix_of(a: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(a) & !u128::from(u64::MAX))
}

/// Longest domain name accepted as a search domain (without the trailing
/// dot, as RFC 1035 limits a name to 255 bytes on the wire).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest label of a domain name (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Checks a search domain and returns it without a trailing dot: at most
/// [`MAX_DOMAIN_LEN`] characters of printable ASCII without spaces, in
/// dot-separated labels of 1 to [`MAX_LABEL_LEN`].
pub fn validate_domain(d: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| ConfigError::Domain(format!("{d:?}: {why}"));
    let name = d.strip_suffix('.').unwrap_or(d);
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(bad(&format!(
            "{} characters, at most {MAX_DOMAIN_LEN}",
            name.len()
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("only printable ASCII without spaces"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("empty label (two dots in a row, or a leading dot)"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad(&format!(
                "label {label:?} has {} characters, at most {MAX_LABEL_LEN}",
                label.len()
            )));
        }
    }
    Ok(name.to_string())
}

/// Appends `domains` (checked by [`validate_domain`]) in DNS wire format
/// without compression (RFC 1035 section 3.1: length-prefixed labels, each
/// name ending with the zero-length root label), as DHCP's option 119
/// (RFC 3397) and the DNSSL option (RFC 8106) carry them.
pub(crate) fn encode_domains(domains: &[String], out: &mut Vec<u8>) {
    for d in domains {
        for label in d.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }
}

/// Checks that the announced DNS servers are unicast and that they and the
/// search domains fit a DHCP reply and a router advertisement.
pub(super) fn validate_announced(dns: &[IpAddr], search: &[String]) -> Result<(), ConfigError> {
    for a in dns {
        let unusable = match a {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if unusable {
            return Err(ConfigError::Conflict(format!(
                "announced DNS server {a} is not a unicast address"
            )));
        }
    }
    let mut wire = Vec::new();
    encode_domains(search, &mut wire);
    let v4 = dns.iter().filter(|a| a.is_ipv4()).count();
    let v6 = dns.len() - v4;
    let dhcp = crate::services::dhcp::announce_len(v4, wire.len());
    if v4 * 4 > 255 || dhcp > crate::services::dhcp::ANNOUNCE_SPACE {
        return Err(ConfigError::Conflict(format!(
            "{v4} IPv4 DNS servers and {} search domains need {dhcp} bytes of DHCP options; a reply has room for {}: announce fewer",
            search.len(),
            crate::services::dhcp::ANNOUNCE_SPACE
        )));
    }
    let ra = crate::wire::emit::ra_announce_len(v6, wire.len());
    if ra > crate::wire::emit::RA_ANNOUNCE_SPACE {
        return Err(ConfigError::Conflict(format!(
            "{v6} IPv6 DNS servers and {} search domains need {ra} bytes of router advertisement options; it has room for {}: announce fewer",
            search.len(),
            crate::wire::emit::RA_ANNOUNCE_SPACE
        )));
    }
    Ok(())
}

/// Checks an IPv6 /64 prefix: a network address (low 64 bits zero) that is
/// unicast and neither loopback, link-local nor v4-mapped.
pub fn validate_ipv6_prefix(p: Ipv6Addr) -> Result<(), ConfigError> {
    let bits = u128::from(p);
    if bits & u128::from(u64::MAX) != 0 {
        return Err(ConfigError::Ipv6Prefix(format!(
            "{p}/64: host bits are set; the prefix needs to be a network address like {}/64",
            Ipv6Addr::from(bits & !u128::from(u64::MAX))
        )));
    }
    let seg0 = p.segments()[0];
    if p.is_unspecified()
        || p.is_multicast()
        || (seg0 & 0xffc0) == 0xfe80
        || p.to_ipv4_mapped().is_some()
        || bits >> 64 == 0
    {
        return Err(ConfigError::Ipv6Prefix(format!(
            "{p}/64: not a usable unicast prefix (unspecified, multicast, link-local or v4-mapped)"
        )));
    }
    Ok(())
}

/// Parses `--ipv6-prefix PREFIX/64` (the length must be 64; a bare prefix
/// means /64).
pub fn parse_ipv6_prefix(s: &str) -> Result<Ipv6Addr, ConfigError> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, l),
        None => (s, "64"),
    };
    let addr: Ipv6Addr = a
        .parse()
        .map_err(|_| ConfigError::Ipv6Prefix(format!("{s}: not an IPv6 address")))?;
    if len != "64" {
        return Err(ConfigError::Ipv6Prefix(format!(
            "{s}: only /64 prefixes are supported"
        )));
    }
    validate_ipv6_prefix(addr)?;
    Ok(addr)
}

/// Parses `aa:bb:cc:dd:ee:ff` (each part 1-2 hex digits).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}
