//! Networks in CIDR notation and the outbound policy built from them: the
//! one parser of CIDRs and allow-lists that rnet's command line, the
//! slirp4netns and pasta modes and embedders all use.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::*;

/// An IPv4 network in CIDR notation (`10.0.2.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub(super) addr: Ipv4Addr,
    pub(super) prefix: u8,
}

impl Ipv4Cidr {
    /// A CIDR from an address and a prefix length (0..=32); host bits are kept.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, ConfigError> {
        if prefix > 32 {
            return Err(ConfigError::Cidr(format!(
                "{addr}/{prefix}: prefix length must be 0-32"
            )));
        }
        Ok(Self { addr, prefix })
    }

    /// The address part as written.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network mask as a number.
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The address `n` hosts above the network address (`nth(2)` is .2 of a /24).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()).wrapping_add(n))
    }

    /// The broadcast address of the network.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }
}

/// Checks a `--cidr` value of the virtual network like slirp4netns does
/// (strict dotted quad, prefix length 1-25, a network address) and returns
/// the network and prefix length; the error is slirp4netns's exact message.
/// rnet's `--cidr` and the slirp4netns mode both use it.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let invalid = || format!("invalid CIDR: {s}");
    let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
    let octets: Vec<&str> = addr.split('.').collect();
    let shape_ok = octets.len() == 4
        && octets
            .iter()
            .all(|o| (1..=3).contains(&o.len()) && o.bytes().all(|b| b.is_ascii_digit()))
        && (1..=2).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_digit());
    if !shape_ok {
        return Err(invalid());
    }
    let mut bytes = [0u8; 4];
    for (b, o) in bytes.iter_mut().zip(&octets) {
        // inet_pton rejects values above 255 and leading zeros.
        let v: u16 = o.parse().map_err(|_| invalid())?;
        if v > 255 || (o.len() > 1 && o.starts_with('0')) {
            return Err(format!("invalid network address: {addr}"));
        }
        *b = v as u8;
    }
    let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
    if !(1..=25).contains(&prefix) {
        return Err("prefix length needs to be 1-25".into());
    }
    let net = Ipv4Addr::from(bytes);
    let mask = u32::MAX << (32 - prefix);
    if u32::from(net) & mask != u32::from(net) {
        return Err(
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24".into(),
        );
    }
    Ok((net, prefix))
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = ConfigError;

    /// Parses `A.B.C.D/N`; a bare address means `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| ConfigError::Cidr(format!("{s}: not an IPv4 address")))?;
        let prefix = match p {
            None => 32,
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| ConfigError::Cidr(format!("{s}: bad prefix length")))?,
        };
        Self::new(addr, prefix)
    }
}

/// An IPv6 network in CIDR notation (`2001:db8::/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    pub(super) addr: Ipv6Addr,
    pub(super) prefix: u8,
}

impl Ipv6Cidr {
    /// A CIDR from an address and a prefix length (0..=128).
    pub fn new(addr: Ipv6Addr, prefix: u8) -> Result<Self, ConfigError> {
        if prefix > 128 {
            return Err(ConfigError::Cidr(format!(
                "{addr}/{prefix}: prefix length must be 0-128"
            )));
        }
        Ok(Self { addr, prefix })
    }

    /// The address part as written.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u128 {
        if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = ConfigError;

    /// Parses `ADDR/N`; a bare address means `/128`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| ConfigError::Cidr(format!("{s}: not an IPv6 address")))?;
        let prefix = match p {
            None => 128,
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| ConfigError::Cidr(format!("{s}: bad prefix length")))?,
        };
        Self::new(addr, prefix)
    }
}

/// An IPv4 or IPv6 network (outbound allow-list entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpCidr {
    /// An IPv4 network.
    V4(Ipv4Cidr),
    /// An IPv6 network.
    V6(Ipv6Cidr),
}

impl IpCidr {
    /// Whether `ip` lies inside this network (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpCidr::V4(c), IpAddr::V4(a)) => c.contains(a),
            (IpCidr::V6(c), IpAddr::V6(a)) => c.contains(a),
            _ => false,
        }
    }
}

impl From<Ipv4Cidr> for IpCidr {
    fn from(c: Ipv4Cidr) -> Self {
        IpCidr::V4(c)
    }
}

impl From<Ipv6Cidr> for IpCidr {
    fn from(c: Ipv6Cidr) -> Self {
        IpCidr::V6(c)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpCidr::V4(c) => c.fmt(f),
            IpCidr::V6(c) => c.fmt(f),
        }
    }
}

impl FromStr for IpCidr {
    type Err = ConfigError;

    /// Parses an IPv4 or IPv6 CIDR (by the presence of `:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(IpCidr::V6)
        } else {
            s.parse().map(IpCidr::V4)
        }
    }
}

/// Where NATed guest traffic may go, besides the gateway and the DNS forwarder.
///
/// Link-local destinations (IPv4 169.254.0.0/16, where cloud metadata
/// services live, and IPv6 fe80::/10) are refused unless an entry *names*
/// them: an entry counts for a link-local address only when the entry's
/// whole network lies inside that link-local range (`169.254.169.254/32`,
/// `169.254.0.0/16`, `fe80::/10`, `fe80::1/128`). A broader entry that
/// merely contains them (`0.0.0.0/0`, `::/0`, `128.0.0.0/1`) does not, and
/// [`OutboundPolicy::Any`] never does. The same rule applies to sources of
/// datagrams arriving for the guest's UDP flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Any destination outside the loopback, link-local, host-local and
    /// special ranges.
    Any,
    /// Only destinations inside one of these networks (empty: none at all).
    Only(Vec<IpCidr>),
}

/// IPv4 link-local, 169.254.0.0/16.
const LINK_LOCAL4: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};
/// IPv6 link-local, fe80::/10.
const LINK_LOCAL6: Ipv6Cidr = Ipv6Cidr {
    addr: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
    prefix: 10,
};

/// Whether `ip` is link-local (169.254.0.0/16 or fe80::/10).
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => LINK_LOCAL4.contains(a),
        IpAddr::V6(a) => LINK_LOCAL6.contains(a),
    }
}

impl IpCidr {
    /// Whether this entry names link-local addresses explicitly: its whole
    /// network lies inside 169.254.0.0/16 or fe80::/10.
    fn names_link_local(&self) -> bool {
        match self {
            IpCidr::V4(c) => c.prefix >= LINK_LOCAL4.prefix && LINK_LOCAL4.contains(c.addr),
            IpCidr::V6(c) => c.prefix >= LINK_LOCAL6.prefix && LINK_LOCAL6.contains(c.addr),
        }
    }
}

impl OutboundPolicy {
    /// Whether a NATed flow to `ip` is allowed by this policy (link-local
    /// addresses only by an entry that names them; see the type's docs).
    pub fn allows(&self, ip: impl Into<IpAddr>) -> bool {
        let ip = ip.into();
        let link_local = is_link_local(ip);
        match self {
            OutboundPolicy::Any => !link_local,
            OutboundPolicy::Only(nets) => nets
                .iter()
                .any(|n| n.contains(ip) && (!link_local || n.names_link_local())),
        }
    }
}

impl OutboundPolicy {
    /// Parses an outbound allow-list as the user gives it, on rnet's
    /// command line (`--outbound-allow`, repeatable) or in compatibility
    /// mode's `RNET_OUTBOUND_ALLOW`: each value is `none` or IPv4 and IPv6
    /// CIDRs (a bare address is one host) separated by commas, with spaces
    /// around them ignored. No value at all means [`OutboundPolicy::Any`];
    /// `none` contributes nothing, so `none` alone allows nothing.
    pub fn parse<'a>(
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<OutboundPolicy, ConfigError> {
        let mut given = false;
        let mut nets = Vec::new();
        for v in values {
            given = true;
            nets.extend(OutboundPolicy::parse_value(v)?);
        }
        Ok(if given {
            OutboundPolicy::Only(nets)
        } else {
            OutboundPolicy::Any
        })
    }

    /// The networks of one value of an allow-list (see [`Self::parse`]):
    /// `none` or comma-separated CIDRs; `none` contributes nothing.
    pub fn parse_value(v: &str) -> Result<Vec<IpCidr>, ConfigError> {
        v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "none")
            .map(str::parse::<IpCidr>)
            .collect()
    }
}

impl fmt::Display for OutboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboundPolicy::Any => f.write_str("any"),
            OutboundPolicy::Only(v) if v.is_empty() => f.write_str("none"),
            OutboundPolicy::Only(v) => {
                let parts: Vec<String> = v.iter().map(|c| c.to_string()).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}
