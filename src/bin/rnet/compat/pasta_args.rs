//! pasta's command line: its options (through the getopt work-alike of
//! [`super::args`], stopping at the first positional as pasta's option
//! string does, so `pasta -f sh -c CMD` runs `sh -c CMD`), the three
//! invocation shapes, and the `-t/-u/-T/-U` port spec grammar.
//!
//! Values are checked here only for shape; how they map onto rnet's
//! configuration is [`super::pasta`]'s business.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::args::{ArgError, Getopt, GetoptEnd, LongOpt, c_long};

/// What pasta is asked to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// New user and network namespaces running this command (empty: a shell).
    Command(Vec<String>),
    /// The user and network namespaces of a running process.
    Pid(i32),
    /// A network namespace file (a `NAME` is looked up in /run/netns), and
    /// optionally the user namespace that owns it.
    Netns {
        path: PathBuf,
        userns: Option<PathBuf>,
    },
}

/// Which address, if any, stands for the host's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLoopback {
    /// The gateway (pasta's default).
    Gateway,
    /// Nothing (`--no-map-gw`, `--map-host-loopback none`).
    Off,
    /// This address (`--map-host-loopback ADDR`).
    Addr(Ipv4Addr),
}

/// Everything the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastaOptions {
    pub foreground: bool,
    pub pid_file: Option<PathBuf>,
    pub quiet: bool,
    /// 0: normal, 1: `-d`, 2: `--trace`.
    pub debug: u8,
    pub log_file: Option<PathBuf>,
    pub pcap: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    pub netmask: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    pub gateway6: Option<Ipv6Addr>,
    pub mac: Option<[u8; 6]>,
    pub config_net: bool,
    pub ns_ifname: Option<String>,
    pub ipv4_only: bool,
    pub ipv6_only: bool,
    pub host_loopback: HostLoopback,
    pub map_guest_addr: Option<Ipv4Addr>,
    pub dns_forward: Option<Ipv4Addr>,
    pub dns_host: Option<IpAddr>,
    pub outbound: Option<Ipv4Addr>,
    pub outbound6: Option<Ipv6Addr>,
    pub outbound_if4: Option<String>,
    pub outbound_if6: Option<String>,
    pub no_tcp: bool,
    pub no_udp: bool,
    pub no_icmp: bool,
    pub no_dhcp: bool,
    pub no_ndp: bool,
    pub no_dhcpv6: bool,
    pub no_ra: bool,
    /// `-D`: the DNS servers announced to the guest (None: rnet's
    /// forwarders; `-D none` empties the list).
    pub dns: Option<Vec<IpAddr>>,
    /// `-S`: the search domains announced (checked, trailing dots dropped;
    /// `-S none` empties the list).
    pub search: Vec<String>,
    /// `-t`, `-u`: host to namespace.
    pub tcp: Vec<PortForward>,
    pub udp: Vec<PortForward>,
    /// `-T`, `-U`: the namespace's loopback to the host.
    pub tcp_ns: Vec<PortForward>,
    pub udp_ns: Vec<PortForward>,
    pub shape: Shape,
    /// Accepted options rnet does not act on, to log once.
    pub ignored: Vec<String>,
}

impl Default for PastaOptions {
    fn default() -> Self {
        PastaOptions {
            foreground: false,
            pid_file: None,
            quiet: false,
            debug: 0,
            log_file: None,
            pcap: None,
            mtu: None,
            address: None,
            address6: None,
            netmask: None,
            gateway: None,
            gateway6: None,
            mac: None,
            config_net: false,
            ns_ifname: None,
            ipv4_only: false,
            ipv6_only: false,
            host_loopback: HostLoopback::Gateway,
            map_guest_addr: None,
            dns_forward: None,
            dns_host: None,
            outbound: None,
            outbound6: None,
            outbound_if4: None,
            outbound_if6: None,
            no_tcp: false,
            no_udp: false,
            no_icmp: false,
            no_dhcp: false,
            no_ndp: false,
            no_dhcpv6: false,
            no_ra: false,
            dns: None,
            search: Vec::new(),
            tcp: Vec::new(),
            udp: Vec::new(),
            tcp_ns: Vec::new(),
            udp_ns: Vec::new(),
            shape: Shape::Command(Vec::new()),
            ignored: Vec::new(),
        }
    }
}

/// What the command line asks for.
pub type Parsed = super::args::Parsed<PastaOptions>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Debug,
    Quiet,
    Foreground,
    Stderr,
    LogFile,
    LogSize,
    Help,
    Version,
    Pcap,
    PidFile,
    Mtu,
    Address,
    Netmask,
    MacAddr,
    Gateway,
    Interface,
    Outbound,
    OutboundIf4,
    OutboundIf6,
    Dns,
    Search,
    NoTcp,
    NoUdp,
    NoIcmp,
    NoDhcp,
    NoNdp,
    NoDhcpv6,
    NoRa,
    NoMapGw,
    MapGw,
    MapHostLoopback,
    MapGuestAddr,
    DnsForward,
    DnsHost,
    Ipv4Only,
    Ipv6Only,
    OneOff,
    TcpPorts,
    UdpPorts,
    TcpNs,
    UdpNs,
    Userns,
    Netns,
    NsIfname,
    ConfigNet,
    NoNetnsQuit,
    NetnsOnly,
    /// Accepted with a value and ignored (logged).
    IgnoredValue(&'static str),
    /// Accepted without a value and ignored (logged).
    IgnoredFlag(&'static str),
}

/// pasta's long options (those rnet acts on, and those it accepts).
const LONG: &[LongOpt<Opt>] = &[
    ("debug", false, Opt::Debug),
    ("quiet", false, Opt::Quiet),
    ("foreground", false, Opt::Foreground),
    ("stderr", false, Opt::Stderr),
    ("log-file", true, Opt::LogFile),
    ("log-size", true, Opt::LogSize),
    ("help", false, Opt::Help),
    ("version", false, Opt::Version),
    ("pcap", true, Opt::Pcap),
    ("pid", true, Opt::PidFile),
    ("mtu", true, Opt::Mtu),
    ("address", true, Opt::Address),
    ("netmask", true, Opt::Netmask),
    ("mac-addr", true, Opt::MacAddr),
    ("gateway", true, Opt::Gateway),
    ("interface", true, Opt::Interface),
    ("outbound", true, Opt::Outbound),
    ("outbound-if4", true, Opt::OutboundIf4),
    ("outbound-if6", true, Opt::OutboundIf6),
    ("dns", true, Opt::Dns),
    ("search", true, Opt::Search),
    ("no-tcp", false, Opt::NoTcp),
    ("no-udp", false, Opt::NoUdp),
    ("no-icmp", false, Opt::NoIcmp),
    ("no-dhcp", false, Opt::NoDhcp),
    ("no-ndp", false, Opt::NoNdp),
    ("no-dhcpv6", false, Opt::NoDhcpv6),
    ("no-ra", false, Opt::NoRa),
    ("no-map-gw", false, Opt::NoMapGw),
    ("map-gw", false, Opt::MapGw),
    ("map-host-loopback", true, Opt::MapHostLoopback),
    ("map-guest-addr", true, Opt::MapGuestAddr),
    ("dns-forward", true, Opt::DnsForward),
    ("dns-host", true, Opt::DnsHost),
    ("ipv4-only", false, Opt::Ipv4Only),
    ("ipv6-only", false, Opt::Ipv6Only),
    ("one-off", false, Opt::OneOff),
    ("tcp-ports", true, Opt::TcpPorts),
    ("udp-ports", true, Opt::UdpPorts),
    ("tcp-ns", true, Opt::TcpNs),
    ("udp-ns", true, Opt::UdpNs),
    ("userns", true, Opt::Userns),
    ("netns", true, Opt::Netns),
    ("ns-ifname", true, Opt::NsIfname),
    ("config-net", false, Opt::ConfigNet),
    ("no-netns-quit", false, Opt::NoNetnsQuit),
    ("netns-only", false, Opt::NetnsOnly),
    ("trace", false, Opt::IgnoredFlag("--trace")),
    ("runas", true, Opt::IgnoredValue("--runas")),
    ("hostname", true, Opt::IgnoredValue("--hostname")),
    ("fqdn", true, Opt::IgnoredValue("--fqdn")),
    (
        "no-copy-routes",
        false,
        Opt::IgnoredFlag("--no-copy-routes"),
    ),
    ("no-copy-addrs", false, Opt::IgnoredFlag("--no-copy-addrs")),
    (
        "host-lo-to-ns-lo",
        false,
        Opt::IgnoredFlag("--host-lo-to-ns-lo"),
    ),
    ("no-dhcp-dns", false, Opt::IgnoredFlag("--no-dhcp-dns")),
    (
        "no-dhcp-search",
        false,
        Opt::IgnoredFlag("--no-dhcp-search"),
    ),
    ("dhcp-dns", false, Opt::IgnoredFlag("--dhcp-dns")),
    ("dhcp-search", false, Opt::IgnoredFlag("--dhcp-search")),
    ("freebind", false, Opt::IgnoredFlag("--freebind")),
    ("no-splice", false, Opt::IgnoredFlag("--no-splice")),
];

/// The short options (pasta's `+dqfel:hF:I:p:P:m:a:n:M:g:i:o:D:S:H:46t:u:T:U:`).
fn short(c: char) -> Option<(bool, Opt)> {
    Some(match c {
        'd' => (false, Opt::Debug),
        'q' => (false, Opt::Quiet),
        'f' => (false, Opt::Foreground),
        'e' => (false, Opt::Stderr),
        'l' => (true, Opt::LogFile),
        'h' => (false, Opt::Help),
        'F' => (true, Opt::IgnoredValue("-F")),
        'I' => (true, Opt::NsIfname),
        'p' => (true, Opt::Pcap),
        'P' => (true, Opt::PidFile),
        'm' => (true, Opt::Mtu),
        'a' => (true, Opt::Address),
        'n' => (true, Opt::Netmask),
        'M' => (true, Opt::MacAddr),
        'g' => (true, Opt::Gateway),
        'i' => (true, Opt::Interface),
        'o' => (true, Opt::Outbound),
        'D' => (true, Opt::Dns),
        'S' => (true, Opt::Search),
        'H' => (true, Opt::IgnoredValue("-H")),
        '4' => (false, Opt::Ipv4Only),
        '6' => (false, Opt::Ipv6Only),
        '1' => (false, Opt::OneOff),
        't' => (true, Opt::TcpPorts),
        'u' => (true, Opt::UdpPorts),
        'T' => (true, Opt::TcpNs),
        'U' => (true, Opt::UdpNs),
        _ => return None,
    })
}

fn bad(msg: impl Into<String>) -> ArgError {
    ArgError::plain(msg)
}

fn ipv4(v: &str, what: &str) -> Result<Ipv4Addr, ArgError> {
    v.parse()
        .map_err(|_| bad(format!("Invalid {what}: {v} (expected an IPv4 address)")))
}

/// `-n`: a prefix length (`24`) or a dotted mask (`255.255.255.0`).
pub fn parse_netmask(v: &str) -> Result<u8, String> {
    if let Some(n) = c_long(v) {
        return u8::try_from(n)
            .ok()
            .filter(|n| *n <= 32)
            .ok_or_else(|| format!("Invalid netmask: {v} (prefix length 0-32)"));
    }
    let m: Ipv4Addr = v
        .parse()
        .map_err(|_| format!("Invalid netmask: {v} (a prefix length or a dotted mask)"))?;
    let bits = u32::from(m);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(format!("Invalid netmask: {v} (not contiguous)"));
    }
    Ok(bits.leading_ones() as u8)
}

/// Parses the arguments after the program name.
pub fn parse(prog: &str, args: &[OsString]) -> Result<Parsed, ArgError> {
    let mut o = PastaOptions::default();
    let mut netns: Option<String> = None;
    let mut userns: Option<PathBuf> = None;
    let apply = |opt: Opt, value: Option<String>| {
        apply_opt(
            &mut o,
            &mut netns,
            &mut userns,
            opt,
            value.unwrap_or_default(),
        )
    };
    let getopt = Getopt {
        prog,
        long: LONG,
        short,
        stop_at_positional: true,
    };
    let positionals = match getopt.run(args, apply)? {
        GetoptEnd::Done(p) => p,
        GetoptEnd::Early(p) => return Ok(p),
    };
    check_exclusive(&o)?;
    o.shape = shape(netns, userns, positionals)?;
    Ok(Parsed::Run(Box::new(o)))
}

/// Applies one option and its value (empty for a flag); `Some` ends
/// parsing (`--help`, `--version`).
fn apply_opt(
    o: &mut PastaOptions,
    netns: &mut Option<String>,
    userns: &mut Option<PathBuf>,
    opt: Opt,
    v: String,
) -> Result<Option<Parsed>, ArgError> {
    if apply_addr(o, opt, &v)? {
        return Ok(None);
    }
    let port_spec = |v: &str, flag: &str| {
        parse_port_forward(v).map_err(|e| bad(format!("Invalid {flag} spec {v:?}: {e}")))
    };
    match opt {
        Opt::Debug => o.debug = o.debug.max(1),
        Opt::Quiet => o.quiet = true,
        Opt::Foreground => o.foreground = true,
        Opt::Stderr => {}
        Opt::LogFile => o.log_file = Some(v.into()),
        Opt::LogSize => {
            c_long(&v)
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(format!("Invalid log file size: {v}")))?;
        }
        Opt::Help => return Ok(Some(Parsed::Help)),
        Opt::Version => return Ok(Some(Parsed::Version)),
        Opt::Pcap => o.pcap = Some(v.into()),
        Opt::PidFile => o.pid_file = Some(v.into()),
        Opt::Mtu => {
            o.mtu = Some(
                c_long(&v)
                    .filter(|m| (68..=65520).contains(m))
                    .ok_or_else(|| bad(format!("Invalid MTU: {v} (68-65520)")))?
                    as u32,
            );
        }
        Opt::NoTcp => o.no_tcp = true,
        Opt::NoUdp => o.no_udp = true,
        Opt::NoIcmp => o.no_icmp = true,
        Opt::NoDhcp => o.no_dhcp = true,
        Opt::NoNdp => o.no_ndp = true,
        Opt::NoDhcpv6 => o.no_dhcpv6 = true,
        Opt::NoRa => o.no_ra = true,
        Opt::NoMapGw => o.host_loopback = HostLoopback::Off,
        Opt::MapGw => o.host_loopback = HostLoopback::Gateway,
        Opt::Ipv4Only => o.ipv4_only = true,
        Opt::Ipv6Only => o.ipv6_only = true,
        Opt::OneOff => o.ignored.push("--one-off".into()),
        Opt::TcpPorts => o.tcp.push(port_spec(&v, "-t")?),
        Opt::UdpPorts => o.udp.push(port_spec(&v, "-u")?),
        Opt::TcpNs => o.tcp_ns.push(port_spec(&v, "-T")?),
        Opt::UdpNs => o.udp_ns.push(port_spec(&v, "-U")?),
        Opt::Userns => *userns = Some(v.into()),
        Opt::Netns => *netns = Some(v),
        Opt::NsIfname => o.ns_ifname = Some(v),
        Opt::ConfigNet => o.config_net = true,
        Opt::NoNetnsQuit => o.ignored.push("--no-netns-quit".into()),
        Opt::NetnsOnly => o.ignored.push("--netns-only".into()),
        Opt::IgnoredValue(name) => o.ignored.push(format!("{name} {v}")),
        Opt::IgnoredFlag(name) => {
            if name == "--trace" {
                o.debug = 2;
            }
            o.ignored.push(name.into());
        }
        // Handled by apply_addr.
        _ => {}
    }
    Ok(None)
}

/// Applies an option that sets an address, a mask, DNS or search
/// domains; returns whether `opt` was one.
/// Sets a one-per-family address option. As in pasta, the last one given
/// wins; an earlier, different one is logged as having no effect, so that a
/// launch script that passes two sees which one counts.
fn replace<T: PartialEq + std::fmt::Display + Copy>(
    slot: &mut Option<T>,
    new: T,
    flag: &str,
    ignored: &mut Vec<String>,
) {
    if let Some(old) = slot.replace(new)
        && old != new
    {
        ignored.push(format!("{flag} {old} (replaced by the later {flag} {new})"));
    }
}

fn apply_addr(o: &mut PastaOptions, opt: Opt, v: &str) -> Result<bool, ArgError> {
    let v = v.to_string();
    match opt {
        Opt::Address => match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => replace(&mut o.address, a, "-a", &mut o.ignored),
            Ok(IpAddr::V6(a)) => replace(&mut o.address6, a, "-a", &mut o.ignored),
            Err(_) => return Err(bad(format!("Invalid address: {v}"))),
        },
        Opt::Netmask => o.netmask = Some(parse_netmask(&v).map_err(bad)?),
        Opt::MacAddr => {
            o.mac = Some(
                super::args::parse_mac(&v)
                    .ok_or_else(|| bad(format!("Invalid MAC address: {v}")))?,
            );
        }
        Opt::Gateway => match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => replace(&mut o.gateway, a, "-g", &mut o.ignored),
            Ok(IpAddr::V6(a)) => replace(&mut o.gateway6, a, "-g", &mut o.ignored),
            Err(_) => return Err(bad(format!("Invalid gateway address: {v}"))),
        },
        Opt::Interface => o.ignored.push(format!("-i {v}")),
        Opt::Outbound => match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => o.outbound = Some(a),
            Ok(IpAddr::V6(a)) => o.outbound6 = Some(a),
            Err(_) => return Err(bad(format!("Invalid outbound address: {v}"))),
        },
        Opt::OutboundIf4 => o.outbound_if4 = Some(v),
        Opt::OutboundIf6 => o.outbound_if6 = Some(v),
        Opt::Dns => {
            let list = o.dns.get_or_insert_with(Vec::new);
            if v == "none" {
                list.clear();
            } else {
                list.push(
                    v.parse()
                        .map_err(|_| bad(format!("Invalid DNS address: {v}")))?,
                );
            }
        }
        Opt::Search => {
            // A space-separated list, as pasta takes it.
            for d in v.split_whitespace() {
                if d == "none" {
                    o.search.clear();
                    continue;
                }
                let d = rnet::config::validate_domain(d)
                    .map_err(|e| bad(format!("Invalid search domain: {e}")))?;
                o.search.push(d);
            }
        }
        Opt::MapHostLoopback => {
            o.host_loopback = if v == "none" {
                HostLoopback::Off
            } else {
                HostLoopback::Addr(ipv4(&v, "--map-host-loopback address")?)
            };
        }
        Opt::MapGuestAddr => {
            o.map_guest_addr = if v == "none" {
                None
            } else {
                Some(ipv4(&v, "--map-guest-addr address")?)
            };
        }
        Opt::DnsForward => o.dns_forward = Some(ipv4(&v, "--dns-forward address")?),
        Opt::DnsHost => {
            o.dns_host = Some(
                v.parse()
                    .map_err(|_| bad(format!("Invalid --dns-host address: {v}")))?,
            );
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Options that exclude each other.
fn check_exclusive(o: &PastaOptions) -> Result<(), ArgError> {
    if o.ipv4_only && o.ipv6_only {
        return Err(bad(
            "Options ipv4-only and ipv6-only are mutually exclusive",
        ));
    }
    if o.quiet && o.debug > 0 {
        return Err(bad("Options --quiet and --debug are mutually exclusive"));
    }
    Ok(())
}

/// What pasta attaches to: `--netns` (with `--userns`), a PID, or a
/// command to start.
fn shape(
    netns: Option<String>,
    userns: Option<PathBuf>,
    positionals: Vec<String>,
) -> Result<Shape, ArgError> {
    Ok(match (netns, positionals.first()) {
        (Some(_), Some(p)) => {
            return Err(bad(format!(
                "Both --netns and PID or command given ({p}); use one"
            )));
        }
        (Some(n), None) => Shape::Netns {
            path: if n.contains('/') {
                n.into()
            } else {
                PathBuf::from("/run/netns").join(n)
            },
            userns,
        },
        (None, Some(p)) if positionals.len() == 1 && p.bytes().all(|b| b.is_ascii_digit()) => {
            let pid = c_long(p)
                .filter(|n| (1..=i64::from(i32::MAX)).contains(n))
                .ok_or_else(|| bad(format!("Invalid PID: {p}")))?;
            if userns.is_some() {
                return Err(bad("--userns needs --netns (a PID brings its own)"));
            }
            Shape::Pid(pid as i32)
        }
        (None, _) => {
            if userns.is_some() {
                return Err(bad("--userns needs --netns"));
            }
            Shape::Command(positionals)
        }
    })
}

/// One `-t/-u/-T/-U` option's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortForward {
    /// `none`: nothing.
    None,
    /// `auto`: follow the namespace's (or host's) listening sockets.
    Auto,
    /// Explicit ports.
    Ports(PortSet),
}

/// One contiguous mapping: `count` host ports from `host` to guest ports
/// from `guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
    pub count: u16,
}

/// `[ADDR[%IF]/]PORTS`, before exclusions are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet {
    /// The address to bind (default: every address).
    pub addr: Option<IpAddr>,
    /// The interface to bind to (`%IF`).
    pub iface: Option<String>,
    /// `all`, or nothing but exclusions: every non-ephemeral port.
    pub all: bool,
    /// Explicit mappings, in the order given.
    pub maps: Vec<PortMap>,
    /// `~` exclusions, as inclusive ranges.
    pub excluded: Vec<(u16, u16)>,
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
    let num = |p: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{p:?} is not a port number"));
        }
        match p.parse::<u32>() {
            Ok(n @ 1..=65535) => Ok(n as u16),
            _ => Err(format!("port {p} is out of range (1-65535)")),
        }
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let a = num(s)?;
            (a, a)
        }
    };
    if b < a {
        return Err(format!("range {s} ends before it starts"));
    }
    Ok((a, b))
}

/// Parses one port option's value: `none`, `auto`, or
/// `[ADDR[%IF]/]SPEC[,SPEC]...` where SPEC is `all`,
/// `PORT[-END][:TARGET[-END]]` or `~PORT[-END]`.
pub fn parse_port_forward(s: &str) -> Result<PortForward, String> {
    match s {
        "none" => return Ok(PortForward::None),
        "auto" => return Ok(PortForward::Auto),
        "" => return Err("empty".into()),
        _ => {}
    }
    let (addr, iface, list) = match s.split_once('/') {
        Some((a, rest)) => {
            let (a, iface) = match a.split_once('%') {
                Some((a, i)) if !i.is_empty() => (a, Some(i.to_string())),
                Some(_) => return Err("empty interface name after '%'".into()),
                None => (a, None),
            };
            let addr = if a.is_empty() {
                None
            } else {
                Some(
                    a.parse::<IpAddr>()
                        .map_err(|_| format!("{a:?} is not an IP address"))?,
                )
            };
            (addr, iface, rest)
        }
        None => (None, None, s),
    };
    let mut set = PortSet {
        addr,
        iface,
        all: false,
        maps: Vec::new(),
        excluded: Vec::new(),
    };
    for item in list.split(',') {
        if item == "all" {
            set.all = true;
        } else if let Some(x) = item.strip_prefix('~') {
            set.excluded.push(port_range(x)?);
        } else {
            let (h, g) = match item.split_once(':') {
                Some((h, g)) => (port_range(h)?, Some(port_range(g)?)),
                None => (port_range(item)?, None),
            };
            let (gf, gl) = g.unwrap_or(h);
            if gl - gf != h.1 - h.0 {
                return Err(format!(
                    "{item}: the target range must be as long as the port range"
                ));
            }
            set.maps.push(PortMap {
                host: h.0,
                guest: gf,
                count: h.1 - h.0 + 1,
            });
        }
    }
    if set.maps.is_empty() {
        // Only exclusions (or `all`): everything else.
        set.all = true;
    }
    Ok(PortForward::Ports(set))
}

impl PortSet {
    /// The mappings to publish, with exclusions cut out. `all` stands for
    /// every port outside the ephemeral range `ephemeral` (inclusive).
    pub fn expand(&self, ephemeral: (u16, u16)) -> Vec<PortMap> {
        let mut base = self.maps.clone();
        if self.all {
            let (lo, hi) = ephemeral;
            if lo > 1 {
                base.push(PortMap {
                    host: 1,
                    guest: 1,
                    count: lo - 1,
                });
            }
            if hi < 65535 {
                base.push(PortMap {
                    host: hi + 1,
                    guest: hi + 1,
                    count: 65535 - hi,
                });
            }
        }
        let excluded = |p: u16| self.excluded.iter().any(|&(a, b)| (a..=b).contains(&p));
        let mut out: Vec<PortMap> = Vec::new();
        for m in base {
            let mut run: Option<PortMap> = None;
            for i in 0..m.count {
                let (h, g) = (m.host + i, m.guest + i);
                if excluded(h) {
                    out.extend(run.take());
                    continue;
                }
                match &mut run {
                    Some(r) => r.count += 1,
                    None => {
                        run = Some(PortMap {
                            host: h,
                            guest: g,
                            count: 1,
                        })
                    }
                }
            }
            out.extend(run);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::compat::args::{expect_err, expect_run, parse_strs};

    fn p(args: &[&str]) -> Result<Parsed, ArgError> {
        parse_strs(parse, "pasta", args)
    }

    fn run(args: &[&str]) -> PastaOptions {
        expect_run(parse, "pasta", args)
    }

    fn err(args: &[&str]) -> String {
        expect_err(parse, "pasta", args)
    }

    fn map(host: u16, guest: u16, count: u16) -> PortMap {
        PortMap { host, guest, count }
    }

    #[test]
    fn podman_argv() {
        let o = run(&[
            "--config-net",
            "-t",
            "127.0.0.1/8080-8081:80-81",
            "-t",
            "9090:90",
            "-u",
            "none",
            "--dns-forward",
            "169.254.1.1",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            "/run/user/1000/netns/netns-x",
            "--map-guest-addr",
            "169.254.1.2",
        ]);
        assert!(o.config_net && o.quiet);
        assert_eq!(o.host_loopback, HostLoopback::Off);
        assert_eq!(o.dns_forward, Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(o.map_guest_addr, Some(Ipv4Addr::new(169, 254, 1, 2)));
        assert_eq!(o.tcp.len(), 2);
        assert_eq!(o.udp, vec![PortForward::None]);
        assert_eq!(
            o.shape,
            Shape::Netns {
                path: "/run/user/1000/netns/netns-x".into(),
                userns: None
            }
        );
    }

    #[test]
    fn rootlesskit_argv() {
        let base = [
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=10.0.2.100",
            "--netmask=24",
            "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3",
            "--no-map-gw",
            "--tcp-ports=auto",
            "--udp-ports=auto",
        ];
        let mut a = base.to_vec();
        a.push("4242");
        let o = run(&a);
        assert_eq!(o.shape, Shape::Pid(4242));
        assert_eq!(o.ns_ifname.as_deref(), Some("tap0"));
        assert_eq!(o.mtu, Some(65520));
        assert_eq!(o.address, Some(Ipv4Addr::new(10, 0, 2, 100)));
        assert_eq!(o.netmask, Some(24));
        assert_eq!(o.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(o.tcp, vec![PortForward::Auto]);
        assert_eq!(o.udp, vec![PortForward::Auto]);
        let mut a = base.to_vec();
        a.extend(["--userns=/proc/42/ns/user", "--netns=/tmp/rk/netns"]);
        assert_eq!(
            run(&a).shape,
            Shape::Netns {
                path: "/tmp/rk/netns".into(),
                userns: Some("/proc/42/ns/user".into())
            }
        );
    }

    #[test]
    fn shapes() {
        assert_eq!(run(&[]).shape, Shape::Command(vec![]));
        // Options end at the command; its own options are its own.
        let o = run(&["-f", "sh", "-c", "exit 3"]);
        assert!(o.foreground);
        assert_eq!(
            o.shape,
            Shape::Command(vec!["sh".into(), "-c".into(), "exit 3".into()])
        );
        assert_eq!(
            run(&["--netns", "ctr1"]).shape,
            Shape::Netns {
                path: "/run/netns/ctr1".into(),
                userns: None
            }
        );
        assert_eq!(run(&["-1", "--", "12"]).shape, Shape::Pid(12));
        assert!(err(&["--netns", "x", "12"]).contains("Both --netns"));
        assert!(err(&["--userns", "/x", "12"]).contains("--userns"));
    }

    #[test]
    fn getopt_texts() {
        assert_eq!(
            err(&["--map-guest-adr", "1.2.3.4"]),
            "pasta: unrecognized option '--map-guest-adr'"
        );
        assert_eq!(err(&["-x"]), "pasta: invalid option -- 'x'");
        assert_eq!(err(&["-t"]), "pasta: option requires an argument -- 't'");
        assert_eq!(
            err(&["--netns"]),
            "pasta: option '--netns' requires an argument"
        );
        assert_eq!(
            err(&["--config-net=1"]),
            "pasta: option '--config-net' doesn't allow an argument"
        );
        assert!(err(&["--no-d"]).contains("is ambiguous"));
        assert_eq!(p(&["--help"]), Ok(Parsed::Help));
        assert_eq!(p(&["-h"]), Ok(Parsed::Help));
        assert_eq!(p(&["--version"]), Ok(Parsed::Version));
        assert!(err(&["-4", "-6"]).contains("mutually exclusive"));
    }

    #[test]
    fn values() {
        let o = run(&[
            "-a",
            "192.0.2.10",
            "-a",
            "2001:db8::10",
            "-n",
            "255.255.255.0",
            "-g",
            "192.0.2.1",
            "-m",
            "1500",
            "-o",
            "192.0.2.77",
            "--outbound-if4",
            "eth0",
            "-D",
            "192.0.2.53",
            "-S",
            "example.test",
            "--map-host-loopback",
            "192.0.2.9",
            "--dns-host",
            "127.0.0.1",
            "-p",
            "/tmp/x.pcap",
            "-P",
            "/tmp/x.pid",
            "-l",
            "/tmp/x.log",
            "--no-icmp",
            "-d",
            "1",
        ]);
        assert_eq!(o.address, Some(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!(o.address6, Some("2001:db8::10".parse().unwrap()));
        assert_eq!(o.netmask, Some(24));
        assert_eq!(o.mtu, Some(1500));
        assert_eq!(o.outbound, Some(Ipv4Addr::new(192, 0, 2, 77)));
        assert_eq!(o.outbound_if4.as_deref(), Some("eth0"));
        assert_eq!(
            o.host_loopback,
            HostLoopback::Addr(Ipv4Addr::new(192, 0, 2, 9))
        );
        assert_eq!(o.dns, Some(vec!["192.0.2.53".parse().unwrap()]));
        assert_eq!(o.search, vec!["example.test".to_string()]);
        let d = run(&[
            "-D",
            "192.0.2.1",
            "-D",
            "none",
            "-D",
            "fd00::53",
            "-S",
            "a.test. b.test",
        ]);
        assert_eq!(d.dns, Some(vec!["fd00::53".parse().unwrap()]));
        assert_eq!(d.search, vec!["a.test".to_string(), "b.test".to_string()]);
        assert_eq!(run(&["-D", "none"]).dns, Some(vec![]));
        assert_eq!(
            run(&["-S", "x.test", "-S", "none"]).search,
            Vec::<String>::new()
        );
        let g = run(&["-a", "fd12:3456::10", "-g", "fd12:3456::1"]);
        assert_eq!(g.address6, Some("fd12:3456::10".parse().unwrap()));
        assert_eq!(g.gateway6, Some("fd12:3456::1".parse().unwrap()));
        assert_eq!((g.address, g.gateway), (None, None));
        // One address per family: the last wins (as in pasta) and the
        // replaced one is reported; one of each family is not a repeat.
        let twice = run(&[
            "-a",
            "10.0.2.5",
            "-a",
            "fd12::5",
            "-a",
            "10.0.2.100",
            "-g",
            "10.0.2.2",
            "-g",
            "10.0.2.2",
        ]);
        assert_eq!(twice.address, Some(Ipv4Addr::new(10, 0, 2, 100)));
        assert_eq!(twice.address6, Some("fd12::5".parse().unwrap()));
        assert_eq!(
            twice.ignored,
            vec!["-a 10.0.2.5 (replaced by the later -a 10.0.2.100)".to_string()]
        );
        assert!(o.no_icmp && o.debug == 1);
        assert_eq!(o.pid_file, Some("/tmp/x.pid".into()));
        assert_eq!(
            run(&["--map-host-loopback", "none"]).host_loopback,
            HostLoopback::Off
        );
        for (bad, text) in [
            (vec!["-m", "0"], "Invalid MTU"),
            (vec!["-n", "33"], "Invalid netmask"),
            (vec!["-n", "255.0.255.0"], "not contiguous"),
            (vec!["-a", "nope"], "Invalid address"),
            (vec!["--dns-forward", "::1"], "IPv4"),
            (vec!["-D", "nope"], "Invalid DNS address"),
            (vec!["-S", "a..b"], "Invalid search domain"),
            (vec!["-t", "80-70"], "ends before"),
            (vec!["-q", "-d"], "mutually exclusive"),
        ] {
            assert!(err(&bad).contains(text), "{bad:?}: {}", err(&bad));
        }
    }

    #[test]
    fn netmasks() {
        for (s, n) in [("24", 24), ("0", 0), ("32", 32), ("255.255.0.0", 16)] {
            assert_eq!(parse_netmask(s), Ok(n), "{s}");
        }
        for s in ["-1", "33", "x", "255.0.0.255"] {
            assert!(parse_netmask(s).is_err(), "{s}");
        }
    }

    #[test]
    fn port_specs() {
        let eph = (32768, 60999);
        type Case<'a> = (&'a str, Option<IpAddr>, Option<&'a str>, Vec<PortMap>);
        let cases: &[Case] = &[
            ("22", None, None, vec![map(22, 22, 1)]),
            ("8080:80", None, None, vec![map(8080, 80, 1)]),
            ("8080-8089", None, None, vec![map(8080, 8080, 10)]),
            ("8080-8081:80-81", None, None, vec![map(8080, 80, 2)]),
            (
                "22,80-81,443:8443",
                None,
                None,
                vec![map(22, 22, 1), map(80, 80, 2), map(443, 8443, 1)],
            ),
            (
                "127.0.0.1/8080",
                Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                None,
                vec![map(8080, 8080, 1)],
            ),
            (
                "::1%lo/22",
                Some("::1".parse().unwrap()),
                Some("lo"),
                vec![map(22, 22, 1)],
            ),
            ("%lo/22", None, Some("lo"), vec![map(22, 22, 1)]),
            (
                "8000-8009,~8003-8004",
                None,
                None,
                vec![map(8000, 8000, 3), map(8005, 8005, 5)],
            ),
            (
                "2000-2003:3000-3003,~2001",
                None,
                None,
                vec![map(2000, 3000, 1), map(2002, 3002, 2)],
            ),
            (
                "~1-1000,~61000-65534",
                None,
                None,
                vec![map(1001, 1001, 31767), map(65535, 65535, 1)],
            ),
            (
                "all",
                None,
                None,
                vec![map(1, 1, 32767), map(61000, 61000, 4536)],
            ),
        ];
        for (spec, addr, iface, want) in cases {
            let PortForward::Ports(set) = parse_port_forward(spec).unwrap() else {
                panic!("{spec}: not ports");
            };
            assert_eq!(&set.addr, addr, "{spec}");
            assert_eq!(set.iface.as_deref(), *iface, "{spec}");
            assert_eq!(&set.expand(eph), want, "{spec}");
        }
        assert_eq!(parse_port_forward("none"), Ok(PortForward::None));
        assert_eq!(parse_port_forward("auto"), Ok(PortForward::Auto));
        for bad in [
            "", "0", "65536", "80-", "-80", "x", "80:81-82", "80-81:90", "1.2.3/80", "lo%/80",
            "80,,81", "~",
        ] {
            assert!(parse_port_forward(bad).is_err(), "{bad}");
        }
    }
}
