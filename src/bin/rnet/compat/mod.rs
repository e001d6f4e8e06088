//! slirp4netns compatibility mode: rnet as a drop-in `slirp4netns` for
//! RootlessKit, Podman and rootless Docker.
//!
//! Selected when the program is invoked under the name `slirp4netns` (for
//! example through a symlink) or as `rnet slirp4netns ARGS...`. The command
//! line ([`args`]), defaults (MTU 1500, nothing configured without `-c`,
//! host loopback reachable unless `--disable-host-loopback`), messages and
//! exit codes follow slirp4netns; the work is done by the library.
//!
//! Two rnet-only settings come from the environment, since slirp4netns's
//! command line has no place for them: `RNET_OUTBOUND_ALLOW=CIDR[,CIDR]|none`
//! limits where NATed traffic may go (default: anywhere, as slirp4netns),
//! and `RNET_DNS_UPSTREAM=ADDR[:PORT][,...]` replaces the resolvers of
//! /etc/resolv.conf.

pub mod args;
pub mod pasta;
pub mod pasta_args;
pub mod pasta_fwd;

use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use rnet::{Config, Ipv4Cidr, Network, OutboundPolicy, Target, config};
use tracing::{info, warn};

use args::{ArgError, NetnsType, Options, Parsed};

/// The slirp4netns release whose interface this mode implements.
pub const SLIRP4NETNS_VERSION: &str = "1.3.1";
/// The `SLIRP_CONFIG_VERSION_MAX` advertised: 4 (--disable-dns,
/// --outbound-addr and --macaddress are understood).
pub const SLIRP_CONFIG_VERSION_MAX: u32 = 4;
/// Environment variable with rnet's outbound allow-list in this mode.
pub const ENV_OUTBOUND_ALLOW: &str = "RNET_OUTBOUND_ALLOW";
/// Environment variable with the DNS upstreams in this mode.
pub const ENV_DNS_UPSTREAM: &str = "RNET_DNS_UPSTREAM";

/// If the process was started as `slirp4netns` (argv\[0\]'s base name) or
/// as `rnet slirp4netns ...`, runs compatibility mode and returns its exit
/// code; otherwise returns `None` and leaves the command line to `rnet`'s
/// own parser.
pub fn dispatch() -> Option<ExitCode> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let argv0 = argv.first().cloned().unwrap_or_default();
    if invoked_as_slirp4netns(&argv0) {
        let rest = argv.split_off(1);
        return Some(main(&argv0.to_string_lossy(), &rest));
    }
    if pasta::invoked_as_pasta(&argv0) {
        let rest = argv.split_off(1);
        return Some(pasta::main("pasta", &rest));
    }
    if argv.get(1).is_some_and(|a| a == "slirp4netns") {
        let rest = argv.split_off(2);
        return Some(main("slirp4netns", &rest));
    }
    if argv.get(1).is_some_and(|a| a == "pasta") {
        let rest = argv.split_off(2);
        return Some(pasta::main("pasta", &rest));
    }
    None
}

/// Whether argv\[0\] names slirp4netns (its base name is exactly `slirp4netns`).
pub fn invoked_as_slirp4netns(argv0: &OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "slirp4netns")
}

/// Runs compatibility mode with the arguments after the program name;
/// `prog` is how the program names itself in messages.
pub fn main(prog: &str, argv: &[OsString]) -> ExitCode {
    let opts = match args::parse(prog, argv) {
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
                // slirp4netns prints its usage on stdout after a parse error.
                print!("{}", usage(prog));
            }
            return ExitCode::FAILURE;
        }
    };
    crate::init_logging(0, false);
    match serve(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// The `--help` text. Consumers grep it for option names, so every option
/// string appears literally.
pub fn usage(prog: &str) -> String {
    format!(
        "\
Usage: {prog} [OPTION]... PID|PATH|FD [TAPNAME]
User-mode networking for unprivileged network namespaces (rnet's slirp4netns mode).

-c, --configure          bring up lo and the TAP: MTU, address (network+100), default route (network+2)
-e, --exit-fd=FD         exit with status 0 when FD hangs up
-r, --ready-fd=FD        write \"1\" to FD and close it once the network is up
-m, --mtu=MTU            specify MTU (default=1500, max=65521)
-6, --enable-ipv6        enable IPv6 on fd00::/64 (gateway fd00::2, DNS fd00::3, router advertisements)
-a, --api-socket=PATH    serve the JSON control API (add_hostfwd, ...) on this Unix socket
--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([pid|path|tapfd], default=pid)
--userns-path=PATH       specify user namespace path (with --netns-type=path)
--enable-sandbox         move into an empty read-only root in a new mount namespace and drop capabilities
--enable-seccomp         install a syscall allow-list (exec, ptrace, mount, setns, unshare, ... are fatal)
--outbound-addr=IPv4|IFNAME  bind outgoing IPv4 host sockets to this address (or interface's address)
--outbound-addr6=IPv6|IFNAME bind outgoing IPv6 host sockets to this address (or interface's address)
--disable-dns            drop traffic to network+3 (the DNS forwarder)
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
-h, --help               show this help and exit
-v, --version            show version and exit
"
    )
}

/// The `--version` text: slirp4netns's machine-readable lines plus rnet's.
pub fn version() -> String {
    format!(
        "slirp4netns version {SLIRP4NETNS_VERSION}+rnet\n\
         commit: {}\n\
         libslirp: none (rnet's own stack on smoltcp)\n\
         SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n\
         libseccomp: none\n\
         rnet: {}\n",
        env!("RNET_GIT_COMMIT"),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Parses `RNET_OUTBOUND_ALLOW`'s value: `none`, or IPv4 and IPv6 CIDRs
/// separated by commas (the parser of rnet's `--outbound-allow`).
pub fn parse_outbound_allow(v: &str) -> Result<OutboundPolicy, String> {
    OutboundPolicy::parse([v]).map_err(|e| format!("{ENV_OUTBOUND_ALLOW}: {e}"))
}

/// Parses `RNET_DNS_UPSTREAM`'s value: `ADDR[:PORT]` separated by commas.
pub fn parse_dns_upstreams(v: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| config::parse_upstream(p).map_err(|e| format!("{ENV_DNS_UPSTREAM}: {e}")))
        .collect()
}

/// `--outbound-addr`: an IPv4 literal, or an interface whose IPv4 address is used.
fn resolve_outbound_addr(v: &str) -> Result<Ipv4Addr, String> {
    if let Ok(ip) = v.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    let bad = || "outbound-addr has to be valid ipv4 address or interface name.".to_string();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|_| bad())?;
    for ifa in addrs {
        if ifa.interface_name != v {
            continue;
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            return Ok(sin.ip());
        }
    }
    Err(bad())
}

/// `--outbound-addr6`: an IPv6 literal, or an interface whose IPv6 address
/// is used (a global one before a link-local one, which could not be bound
/// without its interface).
fn resolve_outbound_addr6(v: &str) -> Result<Ipv6Addr, String> {
    if let Ok(ip) = v.parse::<Ipv6Addr>() {
        return Ok(ip);
    }
    let bad = || "outbound-addr6 has to be valid ipv6 address or interface name.".to_string();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|_| bad())?;
    let mut found: Vec<Ipv6Addr> = addrs
        .filter(|ifa| ifa.interface_name == v)
        .filter_map(|ifa| ifa.address.as_ref()?.as_sockaddr_in6().map(|s| s.ip()))
        .collect();
    found.sort_by_key(Ipv6Addr::is_unicast_link_local);
    found.first().copied().ok_or_else(bad)
}

/// The library settings for these options (and the environment).
fn build_config(o: &Options) -> Result<Config, String> {
    let (net, prefix) = args::parse_cidr(o.cidr.as_deref().unwrap_or("10.0.2.0/24"))?;
    let cidr = Ipv4Cidr::new(net, prefix).map_err(|e| e.to_string())?;
    let outbound = match std::env::var(ENV_OUTBOUND_ALLOW) {
        Ok(v) => parse_outbound_allow(&v)?,
        Err(_) => OutboundPolicy::Any,
    };
    let upstreams = match std::env::var(ENV_DNS_UPSTREAM) {
        Ok(v) => parse_dns_upstreams(&v)?,
        Err(_) => Vec::new(),
    };
    let outbound_addr = o
        .outbound_addr
        .as_deref()
        .map(resolve_outbound_addr)
        .transpose()?;
    let outbound_addr6 = o
        .outbound_addr6
        .as_deref()
        .map(resolve_outbound_addr6)
        .transpose()?;
    let tap = o.tapname.as_deref().unwrap_or(config::DEFAULT_TAP);
    Config::builder()
        .tap_name(tap)
        .mtu(o.mtu)
        .configure(o.configure)
        .cidr(cidr)
        .allow_host_loopback(!o.disable_host_loopback)
        .outbound(outbound)
        .outbound_addr(outbound_addr)
        .outbound_addr6(outbound_addr6)
        .dns_upstreams(upstreams)
        .disable_dns(o.disable_dns)
        .ready_fd(o.ready_fd)
        .exit_fd(o.exit_fd)
        .api_socket(o.api_socket.clone())
        .mac(o.macaddress)
        // slirp4netns's -6: fd00::/64, gateway ::2, DNS ::3, router
        // advertisements (with -c rnet also sets fd00::100 itself). IPv6
        // needs an MTU of at least 1280.
        .ipv6((o.enable_ipv6 && o.mtu >= 1280).then_some(rnet::config::DEFAULT_IPV6_PREFIX))
        .sandbox(o.enable_sandbox)
        .seccomp(o.enable_seccomp)
        .supervise(std::env::var_os("RNET_NO_SUPERVISE").is_none())
        .build()
        .map_err(|e| e.to_string())
}

/// Logs what is accepted but not (fully) done yet.
fn warn_partial(o: &Options) {
    for d in &o.deprecated {
        warn!("{d}");
    }
    if o.netns_type == NetnsType::TapFd && o.configure {
        warn!("-c has no effect with --netns-type=tapfd: the TAP's owner configures it");
    }
}

/// Attaches, serves until the target exits, the exit fd hangs up or
/// SIGINT/SIGTERM arrives.
fn serve(o: &Options) -> Result<(), String> {
    let config = build_config(o)?;
    warn_partial(o);

    // SIGINT and SIGTERM are taken by a dedicated thread; block them before
    // any thread exists so that every thread inherits the mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let net = match o.netns_type {
        NetnsType::Pid => {
            let pid: i32 = o
                .target
                .trim()
                .parse()
                .map_err(|_| "PID must be a positive integer")?;
            Network::attach(Target::Pid(pid), config)
        }
        NetnsType::Path => Network::attach(
            Target::Path {
                netns: o.target.clone().into(),
                userns: o.userns_path.clone(),
            },
            config,
        ),
        NetnsType::TapFd => {
            let fd: i32 = o
                .target
                .trim()
                .parse()
                .map_err(|_| "FD must be a non-negative integer")?;
            Network::attach_tap(take_fd(fd)?, None, config)
        }
    }
    .map_err(|e| e.to_string())?;

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

/// Takes ownership of an inherited TAP descriptor after checking it is open.
fn take_fd(fd: i32) -> Result<OwnedFd, String> {
    if let Err(e) = rnet::sys::fd_flags(fd) {
        return Err(format!("tap fd {fd}: {e}"));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this
    // process by its parent for exactly this use; nothing else in the
    // process owns it, so rnet may take ownership and close it when done.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_detection() {
        assert!(invoked_as_slirp4netns(OsStr::new("slirp4netns")));
        assert!(invoked_as_slirp4netns(OsStr::new(
            "/usr/local/bin/slirp4netns"
        )));
        assert!(!invoked_as_slirp4netns(OsStr::new("/usr/bin/rnet")));
        assert!(!invoked_as_slirp4netns(OsStr::new("slirp4netns-real")));
    }

    #[test]
    fn help_has_probed_options() {
        let u = usage("slirp4netns");
        for probe in [
            "--netns-type",
            "--enable-ipv6",
            "--cidr",
            "--disable-host-loopback",
            "--api-socket",
            "--enable-sandbox",
            "--enable-seccomp",
            "--mtu",
            "--outbound-addr",
            "--userns-path",
            "--disable-dns",
            "--macaddress",
        ] {
            assert!(u.contains(probe), "{probe}");
        }
    }

    #[test]
    fn version_lines() {
        let v = version();
        let lines: Vec<&str> = v.lines().collect();
        assert_eq!(lines[0], "slirp4netns version 1.3.1+rnet");
        assert!(lines[1].starts_with("commit: "));
        assert!(lines[2].starts_with("libslirp: "));
        assert_eq!(lines[3], "SLIRP_CONFIG_VERSION_MAX: 4");
        assert!(lines[4].starts_with("libseccomp: "));
        assert!(lines[5].starts_with("rnet: "));
    }

    #[test]
    fn env_settings() {
        assert_eq!(
            parse_outbound_allow("none").unwrap(),
            OutboundPolicy::Only(vec![])
        );
        assert_eq!(
            parse_outbound_allow("198.18.0.0/15, 192.0.2.1/32").unwrap(),
            OutboundPolicy::Only(vec![
                "198.18.0.0/15".parse().unwrap(),
                "192.0.2.1/32".parse().unwrap()
            ])
        );
        // IPv6 too, with the parser of --outbound-allow.
        assert_eq!(
            parse_outbound_allow("fd42::/64,::1").unwrap(),
            OutboundPolicy::Only(vec![
                "fd42::/64".parse().unwrap(),
                "::1/128".parse().unwrap()
            ])
        );
        assert!(parse_outbound_allow("x").is_err());
        assert!(parse_outbound_allow("fd42::/200").is_err());
        assert_eq!(
            parse_dns_upstreams("127.0.0.1:5353,127.0.0.2").unwrap(),
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "127.0.0.2:53".parse().unwrap()
            ]
        );
        assert!(parse_dns_upstreams("nope").is_err());
    }

    #[test]
    fn outbound_addr_forms() {
        assert_eq!(
            resolve_outbound_addr("192.0.2.7").unwrap(),
            Ipv4Addr::new(192, 0, 2, 7)
        );
        assert_eq!(resolve_outbound_addr("lo").unwrap(), Ipv4Addr::LOCALHOST);
        assert!(resolve_outbound_addr("no-such-if0").is_err());
        assert_eq!(
            resolve_outbound_addr6("fd42::7").unwrap(),
            "fd42::7".parse::<Ipv6Addr>().unwrap()
        );
        assert!(resolve_outbound_addr6("192.0.2.7").is_err());
        assert!(resolve_outbound_addr6("no-such-if0").is_err());
        // lo's IPv6 address, where the kernel gives it one.
        let lo6 = std::fs::read_to_string("/proc/net/if_inet6")
            .is_ok_and(|t| t.lines().any(|l| l.ends_with(" lo")));
        if lo6 {
            assert_eq!(resolve_outbound_addr6("lo").unwrap(), Ipv6Addr::LOCALHOST);
        }
    }

    #[test]
    fn config_mapping() {
        let o = match args::parse(
            "slirp4netns",
            &["--cidr=10.0.135.128/25", "-m", "9000", "1", "tap3"].map(OsString::from),
        ) {
            Ok(Parsed::Run(o)) => o,
            other => panic!("{other:?}"),
        };
        let c = build_config(&o).unwrap();
        assert_eq!(c.guest(), Ipv4Addr::new(10, 0, 135, 228));
        assert_eq!(c.mtu(), 9000);
        assert_eq!(c.tap_name(), "tap3");
        assert!(!c.configure());
        assert!(c.allow_host_loopback());
    }
}
