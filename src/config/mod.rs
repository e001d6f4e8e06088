//! Validated settings for one virtual network.
//!
//! Everything the data plane and the namespace set-up need is decided here,
//! once, from typed values: the CLI (and any embedder) builds a [`Config`]
//! through [`ConfigBuilder`], which checks the combination and derives the
//! addresses of the virtual network from its CIDR.
//!
//! The default network is slirp4netns's: 10.0.2.0/24, gateway .2 (which may
//! stand for the host's loopback), DNS forwarder .3, guest .100; over IPv6
//! (when on) the /64 prefix's ::2, ::3 and ::100. The guest's and the
//! gateway's addresses can be set for either family. What the guest is
//! told about DNS (the servers, by default the forwarders, and the search
//! domains) is a setting of its own, checked here to fit a DHCP reply and
//! a router advertisement.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Default MTU of the TAP device: the largest an Ethernet TAP takes.
pub const DEFAULT_MTU: u32 = 65520;
/// Default time the event loop keeps polling after traffic.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// How many host aliases ([`ConfigBuilder::host_alias`]) a network may have.
pub const MAX_HOST_ALIASES: usize = 4;
/// Default TAP device name inside the namespace.
pub const DEFAULT_TAP: &str = "tap0";

/// An IPv4 network in CIDR notation (`10.0.2.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
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
    addr: Ipv6Addr,
    prefix: u8,
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

/// The default IPv6 prefix (`fd00::/64`) of rnet's own command line.
pub const DEFAULT_IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);

/// The address `n` above the /64 `prefix`.
fn v6_nth(prefix: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix) | n)
}

/// Bounds on the state a guest can make rnet hold. Each cap is global and
/// per guest address; reaching one refuses (TCP: RST) or evicts (UDP: the
/// least recently used flow), and is counted as a `limit` drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open TCP flows (outbound and published).
    pub tcp_flows: usize,
    /// TCP flows per guest address.
    pub tcp_flows_per_guest: usize,
    /// TCP flows whose host connect is still in progress.
    pub tcp_half_open: usize,
    /// UDP flows (one per guest endpoint).
    pub udp_flows: usize,
    /// UDP flows per guest address.
    pub udp_flows_per_guest: usize,
    /// ICMP echo identifiers relayed at once.
    pub icmp_flows: usize,
    /// Clients remembered per published UDP port set (the table that sends
    /// the guest's answers back to them); at the cap the least recently
    /// used conversation is forgotten.
    pub udp_clients: usize,
    /// Resident memory of all TCP flows' rings, in bytes. At the budget a
    /// flow takes no host data that needs more (the host side then waits on
    /// its TCP window) and drained rings give their memory back at once;
    /// paused flows resume when use falls below seven eighths of it. Guest
    /// data is cut off (to be sent again) only at a hard ceiling a quarter
    /// above it. The default (320 MiB, so at most 400 MiB of rings) keeps
    /// rnet under 512 MiB of RSS at the TCP flow cap, with about 2 KiB of
    /// bookkeeping per flow besides.
    pub memory_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tcp_flows: 32_768,
            tcp_flows_per_guest: 16_384,
            tcp_half_open: 1_024,
            udp_flows: 8_192,
            udp_flows_per_guest: 4_096,
            icmp_flows: 256,
            udp_clients: 4_096,
            memory_budget: 320 << 20,
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

/// What rnet serves to the guest, each on by default. Turning one off
/// drops what the guest sends for it (counted as `policy`). pasta's `--no-tcp`, `--no-udp`, `--no-icmp`,
/// `--no-dhcp`, `--no-ndp` and `--no-ra` map onto these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Services {
    /// TCP connections the guest opens (NAT and the DNS forwarder over
    /// TCP); connections to published ports still work.
    pub tcp: bool,
    /// Every UDP datagram the guest sends (NAT, the DNS forwarder, and its
    /// answers on published UDP ports, as with pasta's `--no-udp`).
    pub udp: bool,
    /// ICMP and ICMPv6 echo, to the gateway and relayed.
    pub icmp: bool,
    /// The DHCPv4 server.
    pub dhcp: bool,
    /// Answers to neighbour solicitations (IPv6's ARP).
    pub ndp: bool,
    /// Router advertisements, solicited and periodic.
    pub ra: bool,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            tcp: true,
            udp: true,
            icmp: true,
            dhcp: true,
            ndp: true,
            ra: true,
        }
    }
}

/// Which datagrams from the host side may enter a guest UDP flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UdpFilter {
    /// Only datagrams from addresses (any port) the flow has sent to, as
    /// Linux conntrack and most home routers do (the default).
    #[default]
    AddressDependent,
    /// Datagrams from any source the address policy admits (the outbound
    /// allow-list, and host loopback only with `--allow-host-loopback`):
    /// full-cone behaviour for peer-to-peer protocols that need it.
    EndpointIndependent,
}

impl FromStr for UdpFilter {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "address-dependent" => Ok(UdpFilter::AddressDependent),
            "endpoint-independent" => Ok(UdpFilter::EndpointIndependent),
            _ => Err(ConfigError::Conflict(format!(
                "UDP filter {s:?}: expected address-dependent or endpoint-independent"
            ))),
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
            for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if part != "none" {
                    nets.push(part.parse::<IpCidr>()?);
                }
            }
        }
        Ok(if given {
            OutboundPolicy::Only(nets)
        } else {
            OutboundPolicy::Any
        })
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

/// Errors found while validating settings; each names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A malformed network.
    #[error("invalid CIDR {0}")]
    Cidr(String),
    /// An MTU outside what a TAP and the stack can carry.
    #[error("MTU {0} is out of range: it must be between 68 and 65521")]
    Mtu(u32),
    /// An unusable TAP name.
    #[error("invalid TAP name {0:?}: it must be 1-15 characters without '/', whitespace or ':'")]
    TapName(String),
    /// A malformed DNS upstream.
    #[error("invalid DNS upstream {0}")]
    Dns(String),
    /// Options that contradict each other.
    #[error("{0}")]
    Conflict(String),
    /// An unusable IPv6 prefix.
    #[error("invalid IPv6 prefix {0}")]
    Ipv6Prefix(String),
    /// An unusable search domain.
    #[error("invalid search domain {0}")]
    Domain(String),
}

/// Complete, validated settings for a virtual network.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) tap_name: String,
    pub(crate) mtu: u32,
    pub(crate) configure: bool,
    pub(crate) cidr: Ipv4Cidr,
    pub(crate) guest_addr: Option<Ipv4Addr>,
    pub(crate) gateway_addr: Option<Ipv4Addr>,
    pub(crate) dns_addr: Option<Ipv4Addr>,
    pub(crate) host_aliases: Vec<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Addr>,
    pub(crate) ipv6_guest_addr: Option<Ipv6Addr>,
    pub(crate) ipv6_gateway_addr: Option<Ipv6Addr>,
    pub(crate) dns_announced: Vec<IpAddr>,
    pub(crate) search_domains: Vec<String>,
    pub(crate) allow_host_loopback: bool,
    pub(crate) outbound: OutboundPolicy,
    pub(crate) outbound_addr: Option<Ipv4Addr>,
    pub(crate) udp_filter: UdpFilter,
    pub(crate) services: Services,
    pub(crate) outbound_addr6: Option<Ipv6Addr>,
    pub(crate) dns_upstreams: Vec<SocketAddr>,
    pub(crate) disable_dns: bool,
    pub(crate) ready_fd: Option<RawFd>,
    pub(crate) exit_fd: Option<RawFd>,
    pub(crate) udp_idle_timeout: Duration,
    pub(crate) dns_timeout: Duration,
    pub(crate) api_socket: Option<PathBuf>,
    pub(crate) publish: Vec<crate::ports::PortSpec>,
    pub(crate) publish_auto: Vec<crate::autopub::AutoPublish>,
    pub(crate) fast_ports: bool,
    pub(crate) offloads: bool,
    pub(crate) busy_poll: Duration,
    pub(crate) pcap: Option<PathBuf>,
    pub(crate) pcap_cap: u64,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) mac: Option<[u8; 6]>,
    pub(crate) limits: Limits,
    pub(crate) sandbox: bool,
    pub(crate) seccomp: bool,
    pub(crate) supervise: bool,
}

impl Config {
    /// Starts a builder with the defaults described on each setter.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// How long the event loop keeps polling after traffic.
    pub fn busy_poll(&self) -> Duration {
        self.busy_poll
    }

    /// TAP device name inside the namespace.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }
    /// MTU of the TAP device.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }
    /// Whether rnet configures the TAP (addresses, route, MTU, lo up).
    pub fn configure(&self) -> bool {
        self.configure
    }
    /// The virtual IPv4 network.
    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }
    /// The gateway address (net + 2 unless set).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway_addr.unwrap_or_else(|| self.cidr.nth(2))
    }
    /// The DNS forwarder address (net + 3 unless set).
    pub fn dns(&self) -> Ipv4Addr {
        self.dns_addr.unwrap_or_else(|| self.cidr.nth(3))
    }
    /// The address configured on the guest's TAP (net + 100 unless set).
    pub fn guest(&self) -> Ipv4Addr {
        self.guest_addr.unwrap_or_else(|| self.cidr.nth(100))
    }
    /// Whether the guest's address was set explicitly (then DHCP offers
    /// only that address).
    pub fn guest_is_explicit(&self) -> bool {
        self.guest_addr.is_some()
    }
    /// Extra addresses that stand for the host's loopback (see
    /// [`ConfigBuilder::host_alias`]).
    pub fn host_aliases(&self) -> &[Ipv4Addr] {
        &self.host_aliases
    }
    /// The IPv6 /64 prefix (network address), when IPv6 is on.
    pub fn ipv6_prefix(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }
    /// The IPv6 gateway (prefix::2 unless set), when IPv6 is on.
    pub fn ipv6_gateway(&self) -> Option<Ipv6Addr> {
        self.ipv6
            .map(|p| self.ipv6_gateway_addr.unwrap_or_else(|| v6_nth(p, 2)))
    }
    /// The IPv6 DNS forwarder (prefix::3), when IPv6 is on.
    pub fn ipv6_dns(&self) -> Option<Ipv6Addr> {
        self.ipv6.map(|p| v6_nth(p, 3))
    }
    /// The IPv6 address configured on the guest's TAP (prefix::100 unless
    /// set), when IPv6 is on.
    pub fn ipv6_guest(&self) -> Option<Ipv6Addr> {
        self.ipv6
            .map(|p| self.ipv6_guest_addr.unwrap_or_else(|| v6_nth(p, 0x100)))
    }
    /// The DNS servers announced to the guest, in order: DHCP's option 6
    /// carries the IPv4 ones, router advertisements' RDNSS the IPv6 ones,
    /// and a resolv.conf rnet writes lists them all.
    pub fn dns_announced(&self) -> &[IpAddr] {
        &self.dns_announced
    }
    /// The announced IPv4 DNS servers, in order.
    pub fn dns_announced_v4(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.dns_announced.iter().filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }
    /// The announced IPv6 DNS servers, in order.
    pub fn dns_announced_v6(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.dns_announced.iter().filter_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }
    /// The DNS search domains announced to the guest (DHCP option 119,
    /// RDNSS's companion DNSSL), without trailing dots.
    pub fn search_domains(&self) -> &[String] {
        &self.search_domains
    }
    /// The text of a resolv.conf for the guest: a `nameserver` line per
    /// announced server and a `search` line when there are search domains.
    pub fn resolv_conf(&self) -> String {
        let mut t = String::new();
        for a in &self.dns_announced {
            t.push_str(&format!("nameserver {a}\n"));
        }
        if !self.search_domains.is_empty() {
            t.push_str(&format!("search {}\n", self.search_domains.join(" ")));
        }
        t
    }
    /// Whether the gateway reaches the host's 127.0.0.1.
    pub fn allow_host_loopback(&self) -> bool {
        self.allow_host_loopback
    }
    /// The outbound allow-list.
    pub fn outbound(&self) -> &OutboundPolicy {
        &self.outbound
    }
    /// Source address for outgoing IPv4 host sockets.
    pub fn outbound_addr(&self) -> Option<Ipv4Addr> {
        self.outbound_addr
    }
    /// Which host-side datagrams may enter a guest UDP flow.
    pub fn udp_filter(&self) -> UdpFilter {
        self.udp_filter
    }

    /// Source address for outgoing IPv6 host sockets.
    pub fn outbound_addr6(&self) -> Option<Ipv6Addr> {
        self.outbound_addr6
    }
    /// The address an outgoing host socket towards `dst` is bound to: the
    /// outbound address of `dst`'s family, for every destination (the host's
    /// loopback through the gateway included, as slirp4netns does).
    pub fn outbound_bind(&self, dst: IpAddr) -> Option<IpAddr> {
        match dst {
            IpAddr::V4(_) => self.outbound_addr.map(IpAddr::V4),
            IpAddr::V6(_) => self.outbound_addr6.map(IpAddr::V6),
        }
    }
    /// DNS upstreams in the order they are tried (empty: read /etc/resolv.conf).
    pub fn dns_upstreams(&self) -> &[SocketAddr] {
        &self.dns_upstreams
    }
    /// Whether DNS traffic to the forwarder is dropped.
    pub fn disable_dns(&self) -> bool {
        self.disable_dns
    }
    /// State bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }
    /// MAC address set on the TAP when configuring it.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }
    /// Ports published at start.
    pub fn published(&self) -> &[crate::ports::PortSpec] {
        &self.publish
    }
    /// Path of the control socket, if any.
    pub fn api_socket(&self) -> Option<&std::path::Path> {
        self.api_socket.as_deref()
    }
}

/// Builder for [`Config`]; [`ConfigBuilder::build`] validates.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    tap_name: String,
    mtu: u32,
    configure: bool,
    cidr: Ipv4Cidr,
    guest_addr: Option<Ipv4Addr>,
    gateway_addr: Option<Ipv4Addr>,
    dns_addr: Option<Ipv4Addr>,
    host_aliases: Vec<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    ipv6_guest_addr: Option<Ipv6Addr>,
    ipv6_gateway_addr: Option<Ipv6Addr>,
    dns_announced: Option<Vec<IpAddr>>,
    search_domains: Vec<String>,
    allow_host_loopback: bool,
    outbound: OutboundPolicy,
    outbound_addr: Option<Ipv4Addr>,
    udp_filter: UdpFilter,
    services: Services,
    outbound_addr6: Option<Ipv6Addr>,
    dns_upstreams: Vec<SocketAddr>,
    disable_dns: bool,
    ready_fd: Option<RawFd>,
    exit_fd: Option<RawFd>,
    udp_idle_timeout: Duration,
    dns_timeout: Duration,
    api_socket: Option<PathBuf>,
    publish: Vec<crate::ports::PortSpec>,
    publish_auto: Vec<crate::autopub::AutoPublish>,
    fast_ports: bool,
    offloads: bool,
    busy_poll: Duration,
    pcap: Option<PathBuf>,
    pcap_cap: u64,
    metrics_addr: Option<SocketAddr>,
    metrics_public: bool,
    mac: Option<[u8; 6]>,
    limits: Limits,
    sandbox: bool,
    seccomp: bool,
    supervise: bool,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self {
            tap_name: DEFAULT_TAP.to_string(),
            mtu: DEFAULT_MTU,
            configure: true,
            cidr: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 0, 2, 0),
                prefix: 24,
            },
            guest_addr: None,
            gateway_addr: None,
            dns_addr: None,
            host_aliases: Vec::new(),
            ipv6: None,
            ipv6_guest_addr: None,
            ipv6_gateway_addr: None,
            dns_announced: None,
            search_domains: Vec::new(),
            allow_host_loopback: false,
            outbound: OutboundPolicy::Any,
            outbound_addr: None,
            udp_filter: UdpFilter::default(),
            services: Services::default(),
            outbound_addr6: None,
            dns_upstreams: Vec::new(),
            disable_dns: false,
            ready_fd: None,
            exit_fd: None,
            udp_idle_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(2),
            api_socket: None,
            publish: Vec::new(),
            publish_auto: Vec::new(),
            fast_ports: true,
            offloads: true,
            busy_poll: DEFAULT_BUSY_POLL,
            pcap: None,
            pcap_cap: crate::pcap::DEFAULT_CAP,
            metrics_addr: None,
            metrics_public: false,
            mac: None,
            limits: Limits::default(),
            sandbox: false,
            seccomp: false,
            supervise: false,
        }
    }
}

impl ConfigBuilder {
    /// TAP device name (default `tap0`); an existing TAP of that name is reused.
    pub fn tap_name(mut self, name: impl Into<String>) -> Self {
        self.tap_name = name.into();
        self
    }
    /// MTU (default 65520).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }
    /// Whether to configure the TAP (default true).
    pub fn configure(mut self, yes: bool) -> Self {
        self.configure = yes;
        self
    }
    /// The virtual network (default 10.0.2.0/24).
    pub fn cidr(mut self, cidr: Ipv4Cidr) -> Self {
        self.cidr = cidr;
        self
    }
    /// The guest's address inside the virtual network (default net + 100).
    /// With an explicit address the network may be as small as a /30, and
    /// DHCP offers exactly this address.
    pub fn guest_addr(mut self, addr: Option<Ipv4Addr>) -> Self {
        self.guest_addr = addr;
        self
    }
    /// The gateway's address inside the virtual network (default net + 2).
    /// It is the guest's default route, answers ARP and ping, and stands
    /// for the host's loopback under [`ConfigBuilder::allow_host_loopback`].
    pub fn gateway_addr(mut self, addr: Option<Ipv4Addr>) -> Self {
        self.gateway_addr = addr;
        self
    }
    /// The DNS forwarder's address (default net + 3). It may lie outside
    /// the virtual network (for example the link-local 169.254.1.1), which
    /// the guest then reaches through its default route.
    pub fn dns_addr(mut self, addr: Option<Ipv4Addr>) -> Self {
        self.dns_addr = addr;
        self
    }
    /// An extra address that stands for the host itself (repeatable): TCP,
    /// UDP and ping to it reach the host's 127.0.0.1, like the gateway with
    /// [`ConfigBuilder::allow_host_loopback`], but independently of that
    /// setting. Like the gateway's mapping, it is an explicit grant and not
    /// subject to the outbound allow-list, which governs real destinations.
    pub fn host_alias(mut self, addr: Ipv4Addr) -> Self {
        if !self.host_aliases.contains(&addr) {
            self.host_aliases.push(addr);
        }
        self
    }
    /// IPv6 on the virtual link with this /64 prefix (default: off; rnet's
    /// own command line turns it on with fd00::/64). The gateway is
    /// prefix::2 (host ::1 under the same rule as the IPv4 gateway), the DNS
    /// forwarder prefix::3, the guest prefix::100.
    pub fn ipv6(mut self, prefix: Option<Ipv6Addr>) -> Self {
        self.ipv6 = prefix;
        self
    }
    /// The guest's IPv6 address (default prefix::100): configured on the
    /// TAP and shown for published ports. It must lie in the
    /// [`ConfigBuilder::ipv6`] prefix (see [`ipv6_prefix_of`] to derive the
    /// prefix from an address) and differ from the gateway and the DNS
    /// forwarder (prefix::3).
    pub fn ipv6_guest_addr(mut self, addr: Option<Ipv6Addr>) -> Self {
        self.ipv6_guest_addr = addr;
        self
    }
    /// The IPv6 gateway (default prefix::2): the guest's default route,
    /// answering neighbour solicitations and ping, and standing for the
    /// host's ::1 under [`ConfigBuilder::allow_host_loopback`], like the
    /// IPv4 gateway. It must lie in the [`ConfigBuilder::ipv6`] prefix.
    pub fn ipv6_gateway_addr(mut self, addr: Option<Ipv6Addr>) -> Self {
        self.ipv6_gateway_addr = addr;
        self
    }
    /// The DNS servers announced to the guest, IPv4 and IPv6 in one list
    /// (default: rnet's own forwarders, the IPv4 one and, with IPv6 on, the
    /// IPv6 one). DHCP's option 6 carries the IPv4 ones, router
    /// advertisements (RDNSS) the IPv6 ones, and the resolv.conf of a
    /// command rnet starts ([`Config::resolv_conf`]) all of them. An empty
    /// list announces none. Announcing an address does not make rnet serve
    /// DNS there: the forwarder stays at [`ConfigBuilder::dns_addr`].
    pub fn dns_announced(mut self, addrs: Vec<IpAddr>) -> Self {
        self.dns_announced = Some(addrs);
        self
    }
    /// DNS search domains announced to the guest (DHCP option 119, the
    /// DNSSL option of router advertisements, and the `search` line of a
    /// resolv.conf rnet writes). Each must be a domain name of at most 253
    /// characters with labels of 1-63 (a trailing dot is dropped); together
    /// with the DNS servers they must fit a DHCP reply.
    pub fn search_domains(mut self, domains: Vec<String>) -> Self {
        self.search_domains = domains;
        self
    }
    /// Let the gateway address reach the host's 127.0.0.1 (default false).
    pub fn allow_host_loopback(mut self, yes: bool) -> Self {
        self.allow_host_loopback = yes;
        self
    }
    /// Where other NATed traffic may go (default: anywhere public or private,
    /// never loopback).
    pub fn outbound(mut self, policy: OutboundPolicy) -> Self {
        self.outbound = policy;
        self
    }
    /// Bind outgoing IPv4 host sockets to this address.
    pub fn outbound_addr(mut self, addr: Option<Ipv4Addr>) -> Self {
        self.outbound_addr = addr;
        self
    }
    /// What rnet serves to the guest (default: everything; see
    /// [`Services`]).
    pub fn services(mut self, services: Services) -> Self {
        self.services = services;
        self
    }
    /// Which host-side datagrams may enter a guest UDP flow (default
    /// [`UdpFilter::AddressDependent`]).
    pub fn udp_filter(mut self, filter: UdpFilter) -> Self {
        self.udp_filter = filter;
        self
    }
    /// Bind outgoing IPv6 host sockets to this address.
    pub fn outbound_addr6(mut self, addr: Option<Ipv6Addr>) -> Self {
        self.outbound_addr6 = addr;
        self
    }
    /// DNS upstreams, tried in order (default: the nameservers of /etc/resolv.conf).
    pub fn dns_upstreams(mut self, ups: Vec<SocketAddr>) -> Self {
        self.dns_upstreams = ups;
        self
    }
    /// Drop all traffic to the DNS forwarder (default false).
    pub fn disable_dns(mut self, yes: bool) -> Self {
        self.disable_dns = yes;
        self
    }
    /// Write `1` to this fd once the network is usable, then close it.
    pub fn ready_fd(mut self, fd: Option<RawFd>) -> Self {
        self.ready_fd = fd;
        self
    }
    /// Exit when this fd reports hang-up.
    pub fn exit_fd(mut self, fd: Option<RawFd>) -> Self {
        self.exit_fd = fd;
        self
    }
    /// How long an idle UDP flow keeps its host socket (default 60 s).
    pub fn udp_idle_timeout(mut self, t: Duration) -> Self {
        self.udp_idle_timeout = t;
        self
    }
    /// How long to wait for one DNS upstream before trying the next (default 2 s).
    pub fn dns_timeout(mut self, t: Duration) -> Self {
        self.dns_timeout = t;
        self
    }

    /// Serve the control socket (slirp4netns-compatible JSON) at this path.
    pub fn api_socket(mut self, path: Option<PathBuf>) -> Self {
        self.api_socket = path;
        self
    }

    /// Publish a port at start (repeatable); start-up fails if it cannot be bound.
    pub fn publish(mut self, spec: crate::ports::PortSpec) -> Self {
        self.publish.push(spec);
        self
    }

    /// Publish the namespace's listening ports in this range automatically
    /// (repeatable; needs a PID target).
    pub fn publish_auto(mut self, rule: crate::autopub::AutoPublish) -> Self {
        self.publish_auto.push(rule);
        self
    }

    /// Carry published TCP ports on the fast path (an agent inside the
    /// namespace and splice(2)) when it can be set up (default true); false
    /// keeps every port on the userspace stack.
    pub fn fast_ports(mut self, yes: bool) -> Self {
        self.fast_ports = yes;
        self
    }

    /// Open the TAP with a virtio-net header and checksum/TSO offloads
    /// (default true): the guest hands over TCP segments of up to 64 KiB
    /// with checksums left partial, and rnet sends large segments back for
    /// the guest kernel to cut. Only applies when rnet opens the TAP itself.
    pub fn offloads(mut self, yes: bool) -> Self {
        self.offloads = yes;
        self
    }

    /// How long the event loop keeps polling, without sleeping, after
    /// traffic (default 50 µs; zero sleeps at once). A reply that arrives
    /// within it is handled without a wake-up, which roughly halves the
    /// round-trip time rnet adds; the cost is up to that much CPU time per
    /// burst of traffic. Ignored on a single-CPU machine.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.busy_poll = d;
        self
    }

    /// Write every frame crossing the TAP to this pcap file, rotating to
    /// `FILE.1` past `cap` bytes (default 100 MiB).
    pub fn pcap(mut self, path: Option<PathBuf>, cap: u64) -> Self {
        self.pcap = path;
        self.pcap_cap = cap;
        self
    }

    /// Serve Prometheus metrics over HTTP at `addr` (`GET /metrics`), on a
    /// thread of its own. Only loopback addresses are accepted unless
    /// `public` says otherwise: the metrics show traffic volumes and
    /// published ports, which other hosts have no business reading.
    pub fn metrics_addr(mut self, addr: Option<SocketAddr>, public: bool) -> Self {
        self.metrics_addr = addr;
        self.metrics_public = public;
        self
    }

    /// Once set up, isolate the process: a private mount namespace with an
    /// empty read-only root, no capabilities but those the data plane
    /// needs, no_new_privs (see [`crate::sandbox`]). Default false: it
    /// changes the whole calling process, and needs [`Network::attach`] to
    /// be called while the process has a single thread. `rnet` turns it on
    /// unless `--no-sandbox`.
    ///
    /// [`Network::attach`]: crate::Network::attach
    pub fn sandbox(mut self, yes: bool) -> Self {
        self.sandbox = yes;
        self
    }

    /// Once set up, install the seccomp allow-list (with no_new_privs and
    /// the capability drop; see [`crate::sandbox`]). Default false, for
    /// the same reasons as [`ConfigBuilder::sandbox`].
    pub fn seccomp(mut self, yes: bool) -> Self {
        self.seccomp = yes;
        self
    }

    /// Run the data plane in a worker process that a small supervisor
    /// restarts when it dies (see [`crate::supervise`]). Default false: the
    /// calling process becomes the supervisor, [`Network::attach`] returns
    /// in the worker, and the supervisor ends the process with the
    /// worker's exit code; so it must be called while the process has a
    /// single thread. `rnet attach` and the slirp4netns mode turn it on
    /// unless `--no-supervise`.
    ///
    /// [`Network::attach`]: crate::Network::attach
    pub fn supervise(mut self, yes: bool) -> Self {
        self.supervise = yes;
        self
    }

    /// MAC address set on the TAP when rnet configures it (default: the
    /// kernel's choice).
    pub fn mac(mut self, mac: Option<[u8; 6]>) -> Self {
        self.mac = mac;
        self
    }

    /// State bounds (see [`Limits`] for the defaults).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks the settings and returns the finished [`Config`].
    pub fn build(self) -> Result<Config, ConfigError> {
        if !(68..=65521).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        let n = &self.tap_name;
        if n.is_empty()
            || n.len() > 15
            || n.contains(['/', ':'])
            || n.chars().any(char::is_whitespace)
        {
            return Err(ConfigError::TapName(n.clone()));
        }
        // net + 100 must fit unless the guest's address is given.
        let max_prefix = if self.guest_addr.is_some() { 30 } else { 25 };
        if !(1..=max_prefix).contains(&self.cidr.prefix) {
            return Err(ConfigError::Cidr(format!(
                "{}: prefix length needs to be 1-{max_prefix}",
                self.cidr
            )));
        }
        if self.cidr.addr != self.cidr.network() {
            return Err(ConfigError::Cidr(format!(
                "{}: CIDR needs to be a network address like {}/{}",
                self.cidr,
                self.cidr.network(),
                self.cidr.prefix
            )));
        }
        if let Some(a) = self.metrics_addr
            && !self.metrics_public
            && !a.ip().is_loopback()
        {
            return Err(ConfigError::Conflict(format!(
                "--metrics-addr {a} is not a loopback address: metrics would be readable from other hosts; use 127.0.0.1 or [::1], or add --metrics-addr-public"
            )));
        }
        if let Some(p) = self.ipv6 {
            validate_ipv6_prefix(p)?;
            if self.mtu < 1280 {
                return Err(ConfigError::Conflict(format!(
                    "IPv6 needs an MTU of at least 1280 (MTU is {}); lower neither or turn IPv6 off",
                    self.mtu
                )));
            }
        }
        self.validate_addresses()?;
        self.validate_ipv6_addresses()?;
        let search_domains = self
            .search_domains
            .iter()
            .map(|d| validate_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        let dns_announced = match &self.dns_announced {
            Some(v) => v.clone(),
            None => {
                let mut v = vec![IpAddr::V4(
                    self.dns_addr.unwrap_or_else(|| self.cidr.nth(3)),
                )];
                if let Some(p) = self.ipv6 {
                    v.push(IpAddr::V6(v6_nth(p, 3)));
                }
                v
            }
        };
        validate_announced(&dns_announced, &search_domains)?;
        Ok(Config {
            tap_name: self.tap_name,
            mtu: self.mtu,
            configure: self.configure,
            cidr: self.cidr,
            guest_addr: self.guest_addr,
            gateway_addr: self.gateway_addr,
            dns_addr: self.dns_addr,
            host_aliases: self.host_aliases,
            ipv6: self.ipv6,
            ipv6_guest_addr: self.ipv6_guest_addr,
            ipv6_gateway_addr: self.ipv6_gateway_addr,
            dns_announced,
            search_domains,
            allow_host_loopback: self.allow_host_loopback,
            outbound: self.outbound,
            outbound_addr: self.outbound_addr,
            udp_filter: self.udp_filter,
            services: self.services,
            outbound_addr6: self.outbound_addr6,
            dns_upstreams: self.dns_upstreams,
            disable_dns: self.disable_dns,
            ready_fd: self.ready_fd,
            exit_fd: self.exit_fd,
            udp_idle_timeout: self.udp_idle_timeout,
            dns_timeout: self.dns_timeout,
            api_socket: self.api_socket,
            publish: self.publish,
            publish_auto: self.publish_auto,
            fast_ports: self.fast_ports,
            offloads: self.offloads,
            busy_poll: self.busy_poll,
            pcap: self.pcap,
            pcap_cap: self.pcap_cap,
            metrics_addr: self.metrics_addr,
            mac: self.mac,
            limits: self.limits,
            sandbox: self.sandbox,
            seccomp: self.seccomp,
            supervise: self.supervise,
        })
    }
}

impl ConfigBuilder {
    /// Checks the guest, gateway, DNS and host-alias addresses against the
    /// network and each other.
    fn validate_addresses(&self) -> Result<(), ConfigError> {
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
    fn validate_ipv6_addresses(&self) -> Result<(), ConfigError> {
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
fn validate_announced(dns: &[IpAddr], search: &[String]) -> Result<(), ConfigError> {
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
    let ra = crate::stack::emit::ra_announce_len(v6, wire.len());
    if ra > crate::stack::emit::RA_ANNOUNCE_SPACE {
        return Err(ConfigError::Conflict(format!(
            "{v6} IPv6 DNS servers and {} search domains need {ra} bytes of router advertisement options; it has room for {}: announce fewer",
            search.len(),
            crate::stack::emit::RA_ANNOUNCE_SPACE
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_allow_lists() {
        let c = |s: &str| s.parse::<IpCidr>().unwrap();
        assert_eq!(OutboundPolicy::parse([]), Ok(OutboundPolicy::Any));
        assert_eq!(
            OutboundPolicy::parse(["none"]),
            Ok(OutboundPolicy::Only(vec![]))
        );
        assert_eq!(
            OutboundPolicy::parse([""]),
            Ok(OutboundPolicy::Only(vec![]))
        );
        // Both families, comma lists with spaces, repeated values, bare
        // addresses.
        let p =
            OutboundPolicy::parse(["198.18.0.0/15, fd42::/64", "none,192.0.2.1", "::1"]).unwrap();
        assert_eq!(
            p,
            OutboundPolicy::Only(vec![
                c("198.18.0.0/15"),
                c("fd42::/64"),
                c("192.0.2.1/32"),
                c("::1/128")
            ])
        );
        assert!(p.allows("fd42::7".parse::<IpAddr>().unwrap()));
        assert!(p.allows(Ipv4Addr::new(198, 19, 1, 1)));
        assert!(!p.allows("fd43::7".parse::<IpAddr>().unwrap()));
        for bad in [
            "x",
            "10.0.0.0/33",
            "fd00::/129",
            "fd00::/x",
            "10.0.0.0/8,nope",
        ] {
            let e = OutboundPolicy::parse([bad]).unwrap_err().to_string();
            assert!(e.contains("invalid CIDR"), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_prefixes() {
        let p = parse_ipv6_prefix("fd00::/64").unwrap();
        let cfg = Config::builder().ipv6(Some(p)).build().unwrap();
        assert_eq!(cfg.ipv6_gateway(), Some("fd00::2".parse().unwrap()));
        assert_eq!(cfg.ipv6_dns(), Some("fd00::3".parse().unwrap()));
        assert_eq!(cfg.ipv6_guest(), Some("fd00::100".parse().unwrap()));
        for bad in [
            "fd00::1/64",
            "fd00::/48",
            "fe80::/64",
            "ff02::/64",
            "::/64",
            "x/64",
        ] {
            assert!(parse_ipv6_prefix(bad).is_err(), "{bad}");
        }
        assert!(Config::builder().ipv6(Some(p)).mtu(1000).build().is_err());
        let c: IpCidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::1".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn explicit_ipv6_addresses() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let guest = v6("fd12:3456::10");
        let prefix = ipv6_prefix_of(guest);
        assert_eq!(prefix, v6("fd12:3456::"));
        let c = Config::builder()
            .ipv6(Some(prefix))
            .ipv6_guest_addr(Some(guest))
            .ipv6_gateway_addr(Some(v6("fd12:3456::1")))
            .build()
            .unwrap();
        assert_eq!(c.ipv6_guest(), Some(guest));
        assert_eq!(c.ipv6_gateway(), Some(v6("fd12:3456::1")));
        assert_eq!(c.ipv6_dns(), Some(v6("fd12:3456::3")));
        // Only one given: the other keeps its default in the prefix.
        let c = Config::builder()
            .ipv6(Some(prefix))
            .ipv6_gateway_addr(Some(v6("fd12:3456::1")))
            .build()
            .unwrap();
        assert_eq!(c.ipv6_guest(), Some(v6("fd12:3456::100")));
        let b = || Config::builder().ipv6(Some(prefix));
        for (bad, text) in [
            (
                b().ipv6_guest_addr(Some(v6("fd12:3457::10"))),
                "not a host address",
            ),
            (
                b().ipv6_gateway_addr(Some(v6("fd12:3456::"))),
                "not a host address",
            ),
            (
                b().ipv6_gateway_addr(Some(v6("fd12:3456::3"))),
                "DNS forwarder",
            ),
            (b().ipv6_gateway_addr(Some(v6("fd12:3456::100"))), "differ"),
            (
                Config::builder().ipv6_guest_addr(Some(guest)),
                "IPv6 is off",
            ),
        ] {
            let e = bad.build().unwrap_err().to_string();
            assert!(e.contains(text), "{e}");
        }
    }

    #[test]
    fn search_domains_and_announced_dns() {
        assert_eq!(validate_domain("example.test.").unwrap(), "example.test");
        assert_eq!(validate_domain("a-b_c.x").unwrap(), "a-b_c.x");
        let label = "a".repeat(63);
        assert!(validate_domain(&label).is_ok());
        let e = validate_domain(&"a".repeat(64)).unwrap_err().to_string();
        assert!(e.contains("at most 63"), "{e}");
        let long = [label.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        let e = validate_domain(&long).unwrap_err().to_string();
        assert!(e.contains("at most 253"), "{e}");
        assert!(validate_domain(&long[..253]).is_ok());
        for bad in ["", ".", "a..b", ".a", "a b", "ä.test"] {
            let e = validate_domain(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid search domain"), "{bad}: {e}");
        }
        let mut w = Vec::new();
        encode_domains(&["a.bc".into(), "d".into()], &mut w);
        assert_eq!(w, [1, b'a', 2, b'b', b'c', 0, 1, b'd', 0]);

        // Defaults: the forwarders of both families.
        let c = Config::builder()
            .ipv6(Some(DEFAULT_IPV6_PREFIX))
            .build()
            .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(c.dns_announced(), &[ip("10.0.2.3"), ip("fd00::3")]);
        assert_eq!(c.resolv_conf(), "nameserver 10.0.2.3\nnameserver fd00::3\n");
        let c = Config::builder().build().unwrap();
        assert_eq!(c.resolv_conf(), "nameserver 10.0.2.3\n");
        let c = Config::builder()
            .dns_announced(vec![ip("192.0.2.53"), ip("2001:db8::53"), ip("192.0.2.54")])
            .search_domains(vec!["corp.test.".into(), "test".into()])
            .build()
            .unwrap();
        assert_eq!(
            c.dns_announced_v4().collect::<Vec<_>>(),
            [
                "192.0.2.53".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.54".parse().unwrap()
            ]
        );
        assert_eq!(c.dns_announced_v6().count(), 1);
        assert_eq!(c.search_domains(), &["corp.test", "test"]);
        assert_eq!(
            c.resolv_conf(),
            "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver 192.0.2.54\nsearch corp.test test\n"
        );
        let none = Config::builder().dns_announced(vec![]).build().unwrap();
        assert_eq!(none.resolv_conf(), "");
        // Bad entries and lists too long for a DHCP reply are refused.
        let e = Config::builder()
            .search_domains(vec!["a..b".into()])
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::Domain(_)), "{e}");
        let e = Config::builder()
            .dns_announced(vec![ip("0.0.0.0")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unicast"), "{e}");
        let e = Config::builder()
            .dns_announced(vec![ip("192.0.2.1"); 70])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("DHCP"), "{e}");
        let many: Vec<String> = (0..20).map(|i| format!("domain{i}.example.test")).collect();
        let e = Config::builder()
            .search_domains(many)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("announce fewer"), "{e}");
        let e = Config::builder()
            .ipv6(Some(DEFAULT_IPV6_PREFIX))
            .dns_announced(vec![ip("fd00::53"); 80])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("router advertisement"), "{e}");
    }

    #[test]
    fn cidr_parse_and_derive() {
        let c: Ipv4Cidr = "10.0.135.128/25".parse().unwrap();
        assert_eq!(c.nth(100), Ipv4Addr::new(10, 0, 135, 228));
        assert!(c.contains(Ipv4Addr::new(10, 0, 135, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 0, 135, 127)));
        assert_eq!(
            "1.2.3.4".parse::<Ipv4Cidr>().unwrap(),
            Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 32).unwrap()
        );
        assert!("1.2.3/8".parse::<Ipv4Cidr>().is_err());
        assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn builder_validates() {
        assert!(Config::builder().build().is_ok());
        assert_eq!(
            Config::builder().mtu(10).build().unwrap_err(),
            ConfigError::Mtu(10)
        );
        assert!(Config::builder().tap_name("a/b").build().is_err());
        let host: Ipv4Cidr = "10.0.2.100/24".parse().unwrap();
        assert!(Config::builder().cidr(host).build().is_err());
        let wide: Ipv4Cidr = "10.0.0.0/26".parse().unwrap();
        assert!(Config::builder().cidr(wide).build().is_err());
    }

    #[test]
    fn explicit_addresses() {
        let net: Ipv4Cidr = "192.168.7.0/24".parse().unwrap();
        let a = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let c = Config::builder()
            .cidr(net)
            .guest_addr(a("192.168.7.50"))
            .gateway_addr(a("192.168.7.1"))
            .dns_addr(a("169.254.1.1"))
            .host_alias("169.254.1.2".parse().unwrap())
            .build()
            .unwrap();
        assert_eq!(c.guest(), a("192.168.7.50").unwrap());
        assert_eq!(c.gateway(), a("192.168.7.1").unwrap());
        assert_eq!(c.dns(), a("169.254.1.1").unwrap());
        assert_eq!(c.host_aliases(), &[a("169.254.1.2").unwrap()]);
        // A /30 is fine with an explicit guest, not without.
        let small: Ipv4Cidr = "10.9.0.0/30".parse().unwrap();
        let b = Config::builder()
            .cidr(small)
            .gateway_addr(a("10.9.0.1"))
            .dns_addr(a("169.254.1.1"));
        assert!(b.clone().build().is_err());
        assert!(b.guest_addr(a("10.9.0.2")).build().is_ok());
        for bad in [
            Config::builder().guest_addr(a("10.0.3.1")),
            Config::builder().guest_addr(a("10.0.2.2")),
            Config::builder().gateway_addr(a("10.0.2.255")),
            Config::builder().dns_addr(a("10.0.2.2")),
            Config::builder().dns_addr(a("127.0.0.1")),
            Config::builder().host_alias("10.0.2.3".parse().unwrap()),
        ] {
            assert!(bad.build().is_err());
        }
    }

    #[test]
    fn policy() {
        let p = OutboundPolicy::Only(vec!["198.18.0.0/30".parse().unwrap()]);
        assert!(p.allows(Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!p.allows(Ipv4Addr::new(198, 18, 0, 4)));
        assert!(!OutboundPolicy::Only(vec![]).allows(Ipv4Addr::new(1, 1, 1, 1)));
    }

    #[test]
    fn link_local_only_when_named() {
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        let ll6: Ipv6Addr = "fe80::1".parse().unwrap();
        assert!(!OutboundPolicy::Any.allows(metadata));
        assert!(!OutboundPolicy::Any.allows(ll6));
        assert!(OutboundPolicy::Any.allows(Ipv4Addr::new(198, 18, 0, 1)));
        let only =
            |v: &[&str]| OutboundPolicy::Only(v.iter().map(|c| c.parse().unwrap()).collect());
        let broad = only(&["0.0.0.0/0", "::/0", "169.0.0.0/8", "fe80::/9"]);
        assert!(!broad.allows(metadata));
        assert!(!broad.allows(ll6));
        assert!(broad.allows(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(only(&["169.254.169.254/32"]).allows(metadata));
        assert!(!only(&["169.254.169.254/32"]).allows(Ipv4Addr::new(169, 254, 0, 1)));
        assert!(only(&["169.254.0.0/16"]).allows(metadata));
        assert!(only(&["fe80::/10"]).allows(ll6));
        assert!(only(&["fe80::1/128"]).allows(ll6));
        assert_eq!(
            "endpoint-independent".parse(),
            Ok(UdpFilter::EndpointIndependent)
        );
        assert!("full-cone".parse::<UdpFilter>().is_err());
    }

    #[test]
    fn upstream() {
        assert_eq!(
            parse_upstream("127.0.0.1").unwrap(),
            "127.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert!(parse_upstream("x").is_err());
    }
}
