//! pasta compatibility mode: rnet as a drop-in `pasta` for Podman 5/6 and
//! RootlessKit's `--net=pasta`.
//!
//! Selected when the program is invoked under the name `pasta` (a symlink)
//! or as `rnet pasta ARGS...`. The command line is [`super::pasta_args`];
//! this module maps it onto rnet's [`Config`] and runs it.
//!
//! # Shapes and lifetime
//!
//! - `pasta [OPTIONS] [COMMAND [ARG]...]`: new user and network namespaces
//!   running COMMAND (default `$SHELL`), through `rnet run`'s machinery;
//!   rnet stays in front and exits with the command's status.
//! - `pasta [OPTIONS] PID`: serves PID's namespaces until PID exits.
//! - `pasta [OPTIONS] --netns PATH|NAME [--userns PATH]`: serves the
//!   namespace file until it is deleted (or unmounted).
//!
//! With PID and `--netns`, rnet forks into the background once the
//! namespace is configured and its ports are bound: the child tells the
//! parent through a pipe (`1` ready, or `E` and the error text, which the
//! parent prints), and the parent exits 0 or 1. The child calls setsid(2)
//! and points its stdin/stdout/stderr at /dev/null (or the `-l` log
//! file) first, so a caller that reads the output until EOF is not held.
//! `-f` stays in front. `-P FILE` gets the serving process's pid before the
//! parent exits.
//!
//! # Watching the `--netns` file
//!
//! The serving process is sandboxed (an empty root), so it cannot look at
//! the file's path. Instead, before attaching, it forks a small confined
//! *anchor* ([`rnet::ns::anchor`]) that joins the namespace (the `--userns`
//! first, then the network namespace), `stat`s the path four times a
//! second and exits when it no longer names that namespace (its device and
//! inode changed: unmounted, or deleted, which is all Podman does to clean
//! up). rnet attaches through the namespace descriptors the anchor hands
//! back and watches the anchor's exit through its pidfd, as for a PID
//! target, and stops. The
//! anchor dies with rnet (`PR_SET_PDEATHSIG`), is undumpable, holds no
//! capability and no descriptor, and runs under a seccomp allow-list,
//! since the guest's root can see and signal it. It also gives `-t auto` a
//! process whose `/proc/PID/net` shows the namespace's sockets.
//!
//! # Addresses
//!
//! `-a/-n/-g` set the guest's address, prefix and gateway; any of them left
//! out is copied, as pasta does, from the host interface that carries the
//! first IPv4 default route (`/proc/net/route` for the route, the
//! interface's own address list for the address and prefix). The gateway
//! reaches the host's 127.0.0.1 unless `--no-map-gw` /
//! `--map-host-loopback none`; `--map-host-loopback ADDR` and
//! `--map-guest-addr ADDR` add addresses that reach the host. rnet serves
//! "the host at its own address" (pasta's `--map-guest-addr`) through the
//! host's loopback, like the gateway: a server the host runs on 127.0.0.1
//! or 0.0.0.0 answers. `--dns-forward ADDR` moves rnet's DNS forwarder to
//! ADDR (default net + 3). IPv6 addresses in `-a` and `-g` set the guest's
//! and the gateway's IPv6 addresses, and their /64 the IPv6 prefix
//! (default fd00::/64, guest ::100, gateway ::2, which reaches the host's
//! ::1 under the same rule as the IPv4 gateway). `-D` sets the DNS servers
//! announced to the guest (DHCP, router advertisements, and the
//! resolv.conf of a command pasta starts; default rnet's forwarders) and
//! `-S` the search domains announced the same way. These are general
//! [`Config`] settings (`guest_addr`, `gateway_addr`, `dns_addr`,
//! `host_alias`, `ipv6_guest_addr`, `ipv6_gateway_addr`, `dns_announced`,
//! `search_domains`).
//!
//! # What differs from pasta
//!
//! Published ports keep the client's address (a client on the host's
//! loopback appears as the gateway); `-T auto` / `-U auto` follow the
//! host's listening sockets every second, at most 128 ports per protocol,
//! leaving out rnet's own `-t/-u` ports and (UDP) the host's ephemeral
//! range ([`super::pasta_fwd`]); `%IF` in `-t/-u` binds the host
//! listener to that interface ([`PortSpec::iface`]), in `-T/-U` it is
//! refused; `-t all`
//! publishes every non-ephemeral port and fails if one is taken;
//! `--outbound-if4` binds to that interface's address; `--no-tcp`,
//! `--no-udp`, `--no-icmp`, `--no-dhcp`, `--no-ndp` and `--no-ra` turn off
//! what rnet serves to the guest ([`rnet::Services`]). As in slirp4netns mode, `RNET_OUTBOUND_ALLOW` and
//! `RNET_DNS_UPSTREAM` set the outbound allow-list and the DNS upstreams
//! (they win over `--dns-host`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{ForkResult, Pid};
use rnet::ports::auto::AutoPublish;
use rnet::{
    Config, ConfigBuilder, Ipv4Cidr, Network, OutboundPolicy, PortSpec, Proto, Target, config,
};
use tracing::{info, warn};

use super::args::ArgError;
use super::pasta_args::{self, HostLoopback, Parsed, PastaOptions, PortForward, Shape};
use super::pasta_fwd::{self, Reverse};

/// The pasta release whose interface this mode follows.
pub const PASTA_VERSION: &str = "2025_01_21";

/// How often the anchor looks at the `--netns` file.
const NETNS_POLL: Duration = Duration::from_millis(250);

/// Whether argv\[0\] names pasta (its base name is exactly `pasta`).
pub fn invoked_as_pasta(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "pasta")
}

/// Runs pasta mode with the arguments after the program name.
pub fn main(prog: &str, argv: &[OsString]) -> ExitCode {
    let o = match pasta_args::parse(prog, argv) {
        Ok(Parsed::Help) => {
            print!("{}", usage(prog));
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            print!("{}", version());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Run(o)) => o,
        Err(ArgError { message, usage: u }) => {
            eprintln!("{message}");
            if u {
                eprintln!("Try '{prog} --help' for more information.");
            }
            return ExitCode::FAILURE;
        }
    };
    let verbose = match o.debug {
        0 => 0,
        1 => 1,
        _ => 2,
    };
    crate::init_logging(verbose, o.quiet);
    let result = match &o.shape {
        Shape::Command(argv) => run_command(&o, argv),
        Shape::Pid(_) | Shape::Netns { .. } if o.foreground => serve(&o, None).map(|()| 0),
        Shape::Pid(_) | Shape::Netns { .. } => daemonize(&o),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// The `--help` text.
pub fn usage(prog: &str) -> String {
    format!(
        "\
Usage: {prog} [OPTION]... [COMMAND [ARG]...]
       {prog} [OPTION]... PID
       {prog} [OPTION]... --netns [PATH|NAME]
User-mode networking for network namespaces (rnet's pasta mode).

  -f, --foreground         stay in the foreground (default: background once ready)
  -P, --pid FILE           write the serving process's pid to FILE
  -q, --quiet              only warnings and errors
  -d, --debug              debug messages
      --trace              everything
  -e, --stderr             accepted (messages go to stderr until rnet is ready)
  -l, --log-file PATH      log to PATH once in the background
  -p, --pcap FILE          capture every frame to FILE (pcap)
  -m, --mtu MTU            MTU of the namespace's interface (default 65520)
  -a, --address ADDR       the namespace's IPv4 (default: the host's) or IPv6 address
                           (default fd00::100; its /64 becomes the IPv6 prefix)
  -n, --netmask MASK       its prefix length or dotted mask (default: the host's)
  -g, --gateway ADDR       its IPv4 (default: the host's) or IPv6 gateway (default prefix::2)
      --config-net         configure the interface: address, routes, MTU, link up
  -I, --ns-ifname NAME     the interface's name (default: the host's upstream interface)
  -4, --ipv4-only          no IPv6
  -6, --ipv6-only          accepted (rnet always serves IPv4)
      --no-map-gw          the gateway does not reach the host's loopback
      --map-host-loopback ADDR|none  the address that reaches the host's loopback
      --map-guest-addr ADDR  an address that reaches the host (host.containers.internal)
      --dns-forward ADDR   rnet's DNS forwarder listens at ADDR (default net + 3)
      --dns-host ADDR      the resolver the forwarder asks (default: /etc/resolv.conf)
  -o, --outbound ADDR      source address of outgoing host sockets
      --outbound-if4 NAME  bind outgoing host sockets to NAME's address
      --outbound-if6 NAME  accepted
  -t, --tcp-ports SPEC     publish host TCP ports into the namespace
  -u, --udp-ports SPEC     publish host UDP ports into the namespace
  -T, --tcp-ns SPEC        namespace's 127.0.0.1 TCP ports to the host's (no auto)
  -U, --udp-ns SPEC        namespace loopback UDP to host (ports or none)
      SPEC: none | auto | [ADDR[%IF]/]PORT[-END][:TARGET[-END]][,...] | all | ~PORT[-END]
      --netns PATH|NAME    serve this network namespace file (NAME: /run/netns/NAME)
      --userns PATH        join this user namespace first
      --no-tcp, --no-udp, --no-icmp, --no-dhcp, --no-ndp, --no-dhcpv6, --no-ra
  -D, --dns ADDR|none      DNS server announced by DHCP, RA and resolv.conf (repeatable;
                           default: rnet's forwarders; none: no server)
  -S, --search LIST|none   search domains announced the same way (space-separated)
  -h, --help               show this help and exit
      --version            show version and exit
"
    )
}

/// The `--version` text.
pub fn version() -> String {
    format!(
        "pasta {PASTA_VERSION}+rnet\nrnet {} (commit {})\n",
        env!("CARGO_PKG_VERSION"),
        option_env!("RNET_GIT_COMMIT").unwrap_or("unknown"),
    )
}

/// What pasta copies from the host when `-a/-n/-g` are left out: the
/// interface with the first IPv4 default route, its address and prefix, and
/// the route's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDefaults {
    pub ifname: String,
    pub addr: Option<(Ipv4Addr, u8)>,
    pub gateway: Ipv4Addr,
}

/// Finds the first IPv4 default route in `/proc/net/route`'s text:
/// (interface, gateway).
pub fn default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags ... Mask
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let flags = u32::from_str_radix(f[3], 16).ok()?;
        if flags & 1 == 0 {
            return None; // not RTF_UP
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        // The kernel prints the network-order word as a native number: its
        // native bytes are the address's bytes.
        Some((f[0].to_string(), Ipv4Addr::from(gw.to_ne_bytes())))
    })
}

fn host_defaults() -> Option<HostDefaults> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let (ifname, gateway) = default_route(&table)?;
    let addr = nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        if ifa.interface_name != ifname {
            return None;
        }
        let a = ifa.address.as_ref()?.as_sockaddr_in()?.ip();
        let m = ifa.netmask.as_ref()?.as_sockaddr_in()?.ip();
        Some((a, u32::from(m).leading_ones() as u8))
    });
    Some(HostDefaults {
        ifname,
        addr,
        gateway,
    })
}

/// The ephemeral port range (`all` leaves it out).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The IPv6 prefix: the /64 of `-a`/`-g`'s IPv6 addresses when given
/// (which must agree), else rnet's fd00::/64; none with `-4` or an MTU
/// below IPv6's 1280.
fn ipv6_prefix(o: &PastaOptions, mtu: u32) -> Result<Option<std::net::Ipv6Addr>, String> {
    let explicit = o.address6.or(o.gateway6);
    if o.ipv4_only {
        return match explicit {
            Some(a) => Err(format!("IPv6 address {a} given with -4/--ipv4-only")),
            None => Ok(None),
        };
    }
    if mtu < 1280 {
        return match explicit {
            Some(a) => Err(format!(
                "IPv6 address {a} given, but an MTU of {mtu} leaves IPv6 off (it needs 1280)"
            )),
            None => Ok(None),
        };
    }
    let prefix = match (o.address6, o.gateway6) {
        (Some(a), Some(g)) if config::ipv6_prefix_of(a) != config::ipv6_prefix_of(g) => {
            return Err(format!(
                "IPv6 gateway {g} is outside {}/64: give -g inside the /64 of -a {a}",
                config::ipv6_prefix_of(a)
            ));
        }
        (Some(a), _) | (None, Some(a)) => config::ipv6_prefix_of(a),
        (None, None) => config::DEFAULT_IPV6_PREFIX,
    };
    config::validate_ipv6_prefix(prefix).map_err(|e| {
        format!("-a/-g: {e} (rnet serves IPv6 on a /64 of global or unique local addresses)")
    })?;
    Ok(Some(prefix))
}

/// The library settings for these options (and the environment).
pub fn build_config(o: &PastaOptions) -> Result<Config, String> {
    let host = if o.address.is_none() || o.netmask.is_none() || o.gateway.is_none() {
        host_defaults()
    } else {
        None
    };
    let v4 = ipv4_network(o, host.as_ref())?;
    let outbound = match std::env::var(super::ENV_OUTBOUND_ALLOW) {
        Ok(v) => super::parse_outbound_allow(&v)?,
        Err(_) => OutboundPolicy::Any,
    };
    let upstreams = match (std::env::var(super::ENV_DNS_UPSTREAM), o.dns_host) {
        (Ok(v), _) => super::parse_dns_upstreams(&v)?,
        (Err(_), Some(h)) => vec![SocketAddr::new(h, 53)],
        (Err(_), None) => Vec::new(),
    };
    let outbound_addr = match (o.outbound, &o.outbound_if4) {
        (Some(a), _) => Some(a),
        (None, Some(ifname)) => Some(super::resolve_outbound_addr(ifname).map_err(|_| {
            format!("--outbound-if4 {ifname}: no such interface with an IPv4 address")
        })?),
        (None, None) => None,
    };
    let mtu = o.mtu.unwrap_or(config::DEFAULT_MTU);
    let tap = match (&o.ns_ifname, &host) {
        (Some(n), _) => n.clone(),
        (None, Some(h)) => h.ifname.clone(),
        (None, None) => {
            host_defaults().map_or_else(|| config::DEFAULT_TAP.to_string(), |h| h.ifname)
        }
    };
    let ipv6 = ipv6_prefix(o, mtu)?;
    let b = Config::builder()
        .tap_name(tap)
        .mtu(mtu)
        .configure(o.config_net)
        .cidr(v4.cidr)
        .guest_addr(Some(v4.addr))
        .gateway_addr(Some(v4.gateway))
        .dns_addr(Some(v4.dns))
        .outbound(outbound)
        .outbound_addr(outbound_addr)
        .dns_upstreams(upstreams)
        .ipv6(ipv6)
        .ipv6_guest_addr(o.address6)
        .ipv6_gateway_addr(o.gateway6)
        .search_domains(o.search.clone())
        .pcap(o.pcap.clone(), rnet::phy::pcap::DEFAULT_CAP)
        .fast_ports(true)
        .services(rnet::Services {
            tcp: !o.no_tcp,
            udp: !o.no_udp,
            icmp: !o.no_icmp,
            dhcp: !o.no_dhcp,
            ndp: !o.no_ndp,
            ra: !o.no_ra,
        })
        .sandbox(true)
        .seccomp(true);
    let b = with_host_addresses(b, o, v4.gateway);
    let b = with_port_forwards(b, o)?;
    reverse_ports(o)?;
    b.build().map_err(|e| e.to_string())
}

/// The IPv4 side of the virtual network: what `-a`, `-n`, `-g` and
/// `--dns-forward` give, the rest copied from the host's default route.
struct Ipv4Net {
    addr: Ipv4Addr,
    cidr: Ipv4Cidr,
    gateway: Ipv4Addr,
    dns: Ipv4Addr,
}

/// Works out and checks the IPv4 network (`host`: the host's defaults,
/// looked up when an option is missing).
fn ipv4_network(o: &PastaOptions, host: Option<&HostDefaults>) -> Result<Ipv4Net, String> {
    let no_host = |what: &str| {
        format!(
            "no {what} given and none to copy from the host (no interface with an IPv4 default route): pass -a ADDR -n PREFIX -g GATEWAY"
        )
    };
    let host_addr = host.and_then(|h| h.addr);
    let addr = match o.address {
        Some(a) => a,
        None => host_addr.map(|(a, _)| a).ok_or_else(|| no_host("-a"))?,
    };
    let prefix = match o.netmask {
        Some(n) => n,
        None => host_addr.map(|(_, p)| p).ok_or_else(|| no_host("-n"))?,
    };
    let gateway = match o.gateway {
        Some(g) => g,
        None => host.map(|h| h.gateway).ok_or_else(|| no_host("-g"))?,
    };
    if !(1..=30).contains(&prefix) {
        return Err(format!(
            "netmask /{prefix}: rnet needs a prefix length of 1-30 (room for the guest and the gateway)"
        ));
    }
    let cidr = Ipv4Cidr::new(addr, prefix).map_err(|e| e.to_string())?;
    let cidr = Ipv4Cidr::new(cidr.network(), prefix).map_err(|e| e.to_string())?;
    if !cidr.contains(gateway) {
        return Err(format!(
            "gateway {gateway} is outside {}/{prefix}: give -g inside the network of -a/-n",
            cidr.network()
        ));
    }
    let dns = o.dns_forward.unwrap_or_else(|| {
        let d = cidr.nth(3);
        if d != addr && d != gateway && cidr.contains(d) && d != cidr.broadcast() {
            d
        } else {
            Ipv4Addr::new(169, 254, 1, 1)
        }
    });
    Ok(Ipv4Net {
        addr,
        cidr,
        gateway,
        dns,
    })
}

/// How the guest reaches the host: `--no-map-gw`/`--map-gw` and
/// `--map-host-loopback` (the loopback switch and its alias),
/// `--map-guest-addr`; and the DNS servers announced (`-D`).
fn with_host_addresses(mut b: ConfigBuilder, o: &PastaOptions, gateway: Ipv4Addr) -> ConfigBuilder {
    b = match o.host_loopback {
        HostLoopback::Gateway => b.allow_host_loopback(true),
        HostLoopback::Off => b.allow_host_loopback(false),
        HostLoopback::Addr(a) if a == gateway => b.allow_host_loopback(true),
        HostLoopback::Addr(a) => b.allow_host_loopback(false).host_alias(a),
    };
    if let Some(a) = o.map_guest_addr {
        b = b.host_alias(a);
    }
    if let Some(d) = &o.dns {
        b = b.dns_announced(d.clone());
    }
    b
}

/// The `-t` (TCP) and `-u` (UDP) ports: published host ports, or
/// `--publish-auto` for `auto`.
fn with_port_forwards(mut b: ConfigBuilder, o: &PastaOptions) -> Result<ConfigBuilder, String> {
    let eph = ephemeral_range();
    for (proto, list) in [(Proto::Tcp, &o.tcp), (Proto::Udp, &o.udp)] {
        for f in list {
            match f {
                PortForward::None => {}
                PortForward::Auto => {
                    b = b.publish_auto(AutoPublish {
                        proto,
                        first: 1,
                        last: 65535,
                    })
                }
                PortForward::Ports(set) => {
                    let iface = set
                        .iface
                        .as_deref()
                        .map(|i| host_interface(i, if proto == Proto::Tcp { "-t" } else { "-u" }))
                        .transpose()?;
                    let host_ip = set.addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                    for m in set.expand(eph) {
                        b = b.publish(PortSpec {
                            proto,
                            host_ip,
                            host_port: m.host,
                            guest_ip: None,
                            guest_port: m.guest,
                            count: m.count,
                            iface,
                        });
                    }
                }
            }
        }
    }
    Ok(b)
}

/// The `-T` (TCP) and `-U` (UDP) ports: the namespace's loopback to the
/// host's loopback (`auto` is [`auto_reverse`]'s).
pub fn reverse_ports(o: &PastaOptions) -> Result<Vec<Reverse>, String> {
    let mut out = Vec::new();
    for (proto, opt, forwards) in [(Proto::Tcp, "-T", &o.tcp_ns), (Proto::Udp, "-U", &o.udp_ns)] {
        let auto = forwards.contains(&PortForward::Auto);
        let ports = forwards.iter().any(|f| matches!(f, PortForward::Ports(_)));
        if auto && ports {
            return Err(format!(
                "{opt} auto cannot be combined with other {opt} port specs"
            ));
        }
        for f in forwards {
            match f {
                PortForward::None | PortForward::Auto => {}
                PortForward::Ports(set) => {
                    if let Some(i) = &set.iface {
                        return Err(format!(
                            "{opt}: an interface (%{i}) cannot be given for the namespace's loopback ports"
                        ));
                    }
                    if set.addr.is_some_and(|a| !a.is_loopback()) {
                        return Err(format!(
                            "{opt}: rnet listens on the namespace's 127.0.0.1 only, not {}",
                            set.addr.map_or_else(String::new, |a| a.to_string())
                        ));
                    }
                    for m in set.expand(ephemeral_range()) {
                        for i in 0..m.count {
                            out.push(Reverse {
                                proto,
                                ns_port: m.host + i,
                                host_port: m.guest + i,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The interface of a `-t/-u ADDR%IF/PORT` spec, which must exist.
fn host_interface(name: &str, opt: &str) -> Result<rnet::ports::IfName, String> {
    let i = rnet::ports::IfName::new(name).map_err(|e| format!("{opt}: {e}"))?;
    if nix::net::if_::if_nametoindex(name).is_err() {
        return Err(format!("{opt}: no network interface {name:?} on the host"));
    }
    Ok(i)
}

/// `-T auto` / `-U auto`, if given: what to follow and what to leave out
/// (rnet's own published ports, from `-t/-u`).
pub fn auto_reverse(o: &PastaOptions) -> Option<pasta_fwd::AutoReverse> {
    let tcp = o.tcp_ns.contains(&PortForward::Auto);
    let udp = o.udp_ns.contains(&PortForward::Auto);
    if !tcp && !udp {
        return None;
    }
    let eph = ephemeral_range();
    let mut excluded = Vec::new();
    for (proto, list) in [(Proto::Tcp, &o.tcp), (Proto::Udp, &o.udp)] {
        for f in list {
            if let PortForward::Ports(set) = f {
                for m in set.expand(eph) {
                    excluded.extend((0..m.count).map(|i| (proto, m.host + i)));
                }
            }
        }
    }
    Some(pasta_fwd::AutoReverse {
        tcp,
        udp,
        excluded,
        ephemeral: eph,
    })
}

/// Logs what is accepted but not acted on.
fn log_accepted(o: &PastaOptions) {
    for i in &o.ignored {
        info!("{i}: accepted, no effect in rnet");
    }
    if o.no_dhcpv6 {
        info!("--no-dhcpv6: rnet has no DHCPv6 server (IPv6 guests configure by SLAAC)");
    }
    if o.ipv6_only {
        warn!("-6/--ipv6-only: rnet always serves IPv4 as well");
    }
    if let Some(a) = o.outbound6 {
        warn!(
            "-o {a}: IPv6 outbound addresses are not supported; IPv6 host sockets use the host's default source"
        );
    }
    if let Some(i) = &o.outbound_if6 {
        info!("--outbound-if6 {i}: accepted; IPv6 host sockets use the host's default source");
    }
    if o.mac.is_some() {
        info!("-M/--mac-addr: accepted; rnet's own MAC is fixed");
    }
}

/// `pasta [OPTIONS] [COMMAND...]`: new namespaces, in front.
fn run_command(o: &PastaOptions, argv: &[String]) -> Result<u8, String> {
    let config = build_config(o)?;
    if !reverse_ports(o)?.is_empty() || auto_reverse(o).is_some() {
        return Err("-T/-U need a PID or --netns target (not a command)".into());
    }
    log_accepted(o);
    let argv: Vec<OsString> = if argv.is_empty() {
        vec![std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into())]
    } else {
        argv.iter().map(OsString::from).collect()
    };
    let sigs = block_signals()?;
    let opts = rnet::ns::SpawnOptions {
        subids: false,
        resolv_conf: Some(config.resolv_conf()),
    };
    let (net, pid) = Network::spawn_with(&argv, config, &opts).map_err(|e| e.to_string())?;
    if let Some(f) = &o.pid_file {
        write_pid_file(f, std::process::id())?;
    }
    std::thread::spawn(move || {
        while let Ok(sig) = sigs.wait() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
    });
    let code = rnet::wait_for_exit(pid).map_err(|e| format!("waiting for the command: {e}"))?;
    let h = net.handle();
    h.stop();
    let _ = net.wait();
    Ok(code.clamp(0, 255) as u8)
}

fn block_signals() -> Result<SigSet, String> {
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(sigs)
}

fn write_pid_file(path: &Path, pid: u32) -> Result<(), String> {
    std::fs::write(path, format!("{pid}\n"))
        .map_err(|e| format!("cannot write the pid file {}: {e}", path.display()))
}

/// Forks; the parent waits for the child's word and exits 0 (ready) or 1.
fn daemonize(o: &PastaOptions) -> Result<u8, String> {
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: no thread has been started yet (logging starts none), so the
    // child may do anything the parent could.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(w);
            // Only the first byte decides: the serving process and what it
            // forks keep the pipe open for as long as they run.
            let mut r = File::from(r);
            let mut first = [0u8; 1];
            match r.read(&mut first) {
                Ok(1) if first[0] == b'1' => Ok(0),
                Ok(1) if first[0] == b'E' => {
                    let mut msg = Vec::new();
                    for b in std::io::BufReader::new(r).bytes() {
                        match b {
                            Ok(b'\n') | Err(_) => break,
                            Ok(b) => msg.push(b),
                        }
                    }
                    let _ = nix::sys::wait::waitpid(child, None);
                    Err(String::from_utf8_lossy(&msg).into_owned())
                }
                _ => {
                    let _ = nix::sys::wait::waitpid(child, None);
                    Err("the background process ended before the network was up".into())
                }
            }
        }
        ForkResult::Child => {
            drop(r);
            let mut w = File::from(w);
            let code = match serve(o, Some(&mut w)) {
                Ok(()) => 0,
                Err(msg) => {
                    // The parent prints it; our stderr may be /dev/null by now.
                    let _ = w.write_all(format!("E{msg}\n").as_bytes());
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

/// Serves a PID or `--netns` target; `ready` is the pipe to the waiting
/// parent (None in the foreground).
fn serve(o: &PastaOptions, ready: Option<&mut File>) -> Result<(), String> {
    let config = build_config(o)?;
    // Everything that needs the filesystem happens before attaching: the
    // sandbox hides it afterwards.
    let quiet_io = match ready {
        Some(_) => Some(open_background_stdio(o.log_file.as_deref())?),
        None => None,
    };
    if let Some((null, log)) = &quiet_io {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        // Before anything is forked, so that nothing holds the caller's
        // output pipes once the parent has exited.
        redirect_stdio(null, log)?;
    }
    if let Some(f) = &o.pid_file {
        write_pid_file(f, std::process::id())?;
    }
    // A `--netns` file is reached through the namespaces the anchor hands
    // back (kept open until rnet ends); the anchor's exit ends rnet.
    let (target, anchor) = match &o.shape {
        Shape::Pid(p) => (Target::Pid(*p), None),
        Shape::Netns { path, userns } => {
            let anchor = rnet::ns::anchor::spawn(path, userns.as_deref(), NETNS_POLL)?;
            (anchor.target(), Some(anchor))
        }
        Shape::Command(_) => unreachable!("commands run in front"),
    };
    let explicit = reverse_ports(o)?;
    let auto = auto_reverse(o);
    let mut reverse = Vec::new();
    let mut follow = None;
    if !explicit.is_empty() || auto.is_some() {
        // The opener stays alive (confined, in the namespace) only for
        // `auto`, where ports appear later.
        let opener = rnet::ns::opener::Opener::spawn(&target).map_err(|e| format!("-T/-U: {e}"))?;
        reverse = pasta_fwd::open_listeners(&opener, &explicit)?;
        if let Some(a) = auto {
            let tables = rnet::ports::auto::Tables::open(std::process::id() as i32)
                .map_err(|e| format!("-T/-U auto: the host's socket tables: {e}"))?;
            follow = Some((a, tables, opener));
        }
    }
    log_accepted(o);
    let sigs = block_signals()?;
    let attached = match &anchor {
        Some(a) => Network::attach_watching(target, a.pid(), config),
        None => Network::attach(target, config),
    };
    let net = match attached {
        Ok(n) => n,
        Err(e) => {
            if let Some(f) = &o.pid_file {
                let _ = std::fs::remove_file(f);
            }
            return Err(e.to_string());
        }
    };
    pasta_fwd::serve(reverse);
    if let Some((a, tables, opener)) = follow {
        pasta_fwd::watch_auto(a, tables, opener, net.handle());
    }
    if let Some(w) = ready {
        let _ = w.write_all(b"1");
    }
    let handle = net.handle();
    std::thread::spawn(move || {
        if let Ok(sig) = sigs.wait() {
            info!("{sig:?} received; stopping");
            handle.stop();
        }
    });
    let why = net.wait().map_err(|e| e.to_string())?;
    info!(reason = ?why, "network stopped");
    Ok(())
}

/// /dev/null for stdin, and /dev/null or the log file for stdout/stderr.
fn open_background_stdio(log: Option<&Path>) -> Result<(OwnedFd, Option<OwnedFd>), String> {
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("/dev/null: {e}"))?;
    let log = log
        .map(|p| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open the log file {}: {e}", p.display()))
        })
        .transpose()?;
    Ok((null.into(), log.map(OwnedFd::from)))
}

fn redirect_stdio(null: &OwnedFd, log: &Option<OwnedFd>) -> Result<(), String> {
    let out = log.as_ref().unwrap_or(null);
    for (src, dst) in [(null, 0), (out, 1), (out, 2)] {
        rnet::sys::dup_to_stdio(src.as_raw_fd(), dst)
            .map_err(|e| format!("redirecting descriptor {dst}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> PastaOptions {
        match pasta_args::parse(
            "pasta",
            &args.iter().map(OsString::from).collect::<Vec<_>>(),
        ) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn argv0_detection() {
        assert!(invoked_as_pasta(OsStr::new("pasta")));
        assert!(invoked_as_pasta(OsStr::new("/usr/libexec/podman/pasta")));
        assert!(!invoked_as_pasta(OsStr::new("pasta.avx2")));
        assert!(!invoked_as_pasta(OsStr::new("rnet")));
    }

    #[test]
    fn proc_net_route() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        // The text is what a little-endian kernel prints.
        if cfg!(target_endian = "little") {
            assert_eq!(
                default_route(t),
                Some(("eth0".into(), Ipv4Addr::new(192, 168, 1, 1)))
            );
        }
        assert_eq!(default_route("Iface\n"), None);
    }

    #[test]
    fn config_mapping() {
        let c = build_config(&opts(&[
            "--config-net",
            "-a",
            "10.0.2.100",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "--dns-forward",
            "169.254.1.1",
            "--map-guest-addr",
            "169.254.1.2",
            "--no-map-gw",
            "-I",
            "tap0",
            "-t",
            "127.0.0.1/8080-8081:80-81,~8081",
            "-u",
            "5353",
            "1",
        ]))
        .unwrap();
        assert_eq!(c.guest(), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(c.dns(), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(c.host_aliases(), &[Ipv4Addr::new(169, 254, 1, 2)]);
        assert!(!c.allow_host_loopback());
        assert!(c.configure());
        assert_eq!(c.mtu(), 65520);
        let p = c.published();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].to_string(), "127.0.0.1:8080:80/tcp");
        assert_eq!(p[1].to_string(), "0.0.0.0:5353:5353/udp");
        let c = build_config(&opts(&[
            "-a",
            "192.168.5.6",
            "-n",
            "255.255.255.252",
            "-g",
            "192.168.5.5",
            "--map-host-loopback",
            "192.0.2.9",
            "1",
        ]))
        .unwrap();
        assert_eq!(c.dns(), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(c.host_aliases(), &[Ipv4Addr::new(192, 0, 2, 9)]);
        assert!(!c.configure());
        let v4 = ["-a", "10.0.2.100", "-n", "24", "-g", "10.0.2.2"];
        let with = |extra: &[&str]| {
            let mut a = v4.to_vec();
            a.extend_from_slice(extra);
            a.push("1");
            build_config(&opts(&a))
        };
        let v6 = |s: &str| Some(s.parse::<std::net::Ipv6Addr>().unwrap());
        let c = with(&["-a", "fd12:3456::10", "-g", "fd12:3456::1"]).unwrap();
        assert_eq!(c.ipv6_prefix(), v6("fd12:3456::"));
        assert_eq!(c.ipv6_guest(), v6("fd12:3456::10"));
        assert_eq!(c.ipv6_gateway(), v6("fd12:3456::1"));
        assert_eq!(c.guest(), Ipv4Addr::new(10, 0, 2, 100));
        let c = with(&["-g", "fd12:3456::1"]).unwrap();
        assert_eq!(c.ipv6_guest(), v6("fd12:3456::100"));
        let c = with(&[]).unwrap();
        assert_eq!(c.ipv6_guest(), v6("fd00::100"));
        assert_eq!(
            c.dns_announced(),
            &[
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3)),
                "fd00::3".parse().unwrap()
            ]
        );
        for (bad, text) in [
            (vec!["-a", "fd12:3456::10", "-g", "fd12:3457::1"], "outside"),
            (vec!["-a", "fd12::10", "-4"], "ipv4-only"),
            (vec!["-a", "fe80::10"], "-a/-g"),
            (vec!["-a", "fd12::10", "-m", "1000"], "1280"),
            (vec!["-a", "fd12::3"], "DNS forwarder"),
        ] {
            let e = with(&bad).unwrap_err();
            assert!(e.contains(text), "{bad:?}: {e}");
        }
        let c = with(&["-D", "192.0.2.53", "-D", "fd00::53", "-S", "corp.test"]).unwrap();
        assert_eq!(
            c.dns_announced(),
            &[
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        assert_eq!(c.search_domains(), &["corp.test"]);
        assert!(with(&["-D", "none"]).unwrap().dns_announced().is_empty());
        let gw_out = opts(&["-a", "10.0.2.100", "-n", "24", "-g", "10.0.3.2", "1"]);
        assert!(build_config(&gw_out).unwrap_err().contains("outside"));
        let rev = opts(&[
            "-a",
            "10.0.2.100",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "-U",
            "80",
            "1",
        ]);
        assert!(build_config(&rev).is_ok());
        let rev = opts(&["-T", "5432,8080:80", "-T", "none", "-U", "53", "1"]);
        assert_eq!(
            reverse_ports(&rev).unwrap(),
            vec![
                Reverse {
                    proto: Proto::Tcp,
                    ns_port: 5432,
                    host_port: 5432
                },
                Reverse {
                    proto: Proto::Tcp,
                    ns_port: 8080,
                    host_port: 80
                },
                Reverse {
                    proto: Proto::Udp,
                    ns_port: 53,
                    host_port: 53
                }
            ]
        );
        assert_eq!(reverse_ports(&opts(&["-T", "auto", "1"])), Ok(vec![]));
        assert!(
            reverse_ports(&opts(&["-U", "auto", "-U", "53", "1"]))
                .unwrap_err()
                .contains("-U auto cannot be combined")
        );
        assert!(
            reverse_ports(&opts(&["-T", "%lo/80", "1"]))
                .unwrap_err()
                .contains("%lo")
        );
        let c = build_config(&opts(&[
            "-a",
            "10.0.2.100",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "-t",
            "127.0.0.1%lo/8080:80,9090",
            "1",
        ]))
        .unwrap();
        assert_eq!(c.published().len(), 2);
        for p in c.published() {
            assert_eq!(p.iface.map(|i| i.to_string()).as_deref(), Some("lo"));
            assert_eq!(p.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        assert_eq!(
            (c.published()[0].host_port, c.published()[0].guest_port),
            (8080, 80)
        );
        let e = build_config(&opts(&[
            "-a",
            "10.0.2.100",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "-u",
            "%nosuchif0/53",
            "1",
        ]))
        .unwrap_err();
        assert!(e.contains("-u") && e.contains("nosuchif0"), "{e}");
        let a = auto_reverse(&opts(&["-t", "8080", "-T", "auto", "1"])).unwrap();
        assert!(a.tcp && !a.udp);
        assert_eq!(a.excluded, vec![(Proto::Tcp, 8080)]);
        assert!(auto_reverse(&opts(&["-T", "80", "1"])).is_none());
        assert!(reverse_ports(&opts(&["-T", "192.0.2.1/80", "1"])).is_err());
    }
}
