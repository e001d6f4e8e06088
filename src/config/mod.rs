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
//!
//! Files: this one holds [`Config`], [`ConfigBuilder`] and [`ConfigError`];
//! `cidr.rs` the networks and the outbound policy (the one parser of CIDRs
//! and allow-lists every command line uses); `addrs.rs` the addresses
//! derived from them, their checks, DNS upstreams and announced DNS;
//! `options.rs` the limits, services and UDP filter.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

/// Default MTU of the TAP device: the largest an Ethernet TAP takes.
pub const DEFAULT_MTU: u32 = 65520;
/// Default time the event loop keeps polling after traffic.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// How many host aliases ([`ConfigBuilder::host_alias`]) a network may have.
pub const MAX_HOST_ALIASES: usize = 4;
/// Default TAP device name inside the namespace.
pub const DEFAULT_TAP: &str = "tap0";

mod addrs;
mod cidr;
mod options;
#[cfg(test)]
mod tests;

pub use addrs::*;
pub use cidr::*;
pub use options::*;

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
    pub(crate) publish_auto: Vec<crate::ports::auto::AutoPublish>,
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
    publish_auto: Vec<crate::ports::auto::AutoPublish>,
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
            pcap_cap: crate::phy::pcap::DEFAULT_CAP,
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
    pub fn publish_auto(mut self, rule: crate::ports::auto::AutoPublish) -> Self {
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
