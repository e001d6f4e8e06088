//! Typed values of rnet's own command line: clap value parsers over the
//! library's parsers (`rnet::config`), so a malformed CIDR, MAC address,
//! IPv6 prefix, allow-list or DNS upstream is refused while the command
//! line is read, with the same text the slirp4netns and pasta modes give.

use std::net::{Ipv6Addr, SocketAddr};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use rnet::config::{self, ConfigError, IpCidr, Ipv4Cidr, OutboundPolicy, UdpFilter};

/// The options whose values were checked only once the command line was
/// read, before they had parsers of their own: a bad value of one of them
/// still ends rnet with status 1 (a usage error of clap's ends with 2).
const LATE_CHECKED: &[&str] = &[
    "--cidr",
    "--mac-address",
    "--ipv6-prefix",
    "--outbound-allow",
    "--dns-upstream",
];

/// Ends rnet on a command-line error: clap's message, and status 1 for a
/// bad value of one of [`LATE_CHECKED`] (as before those had parsers), or
/// clap's own status otherwise.
pub fn exit_on(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let late = e.kind() == ErrorKind::ValueValidation
        && matches!(e.get(ContextKind::InvalidArg), Some(ContextValue::String(a))
            if LATE_CHECKED.iter().any(|o| a.starts_with(&format!("{o} "))));
    if late {
        let _ = e.print();
        std::process::exit(1);
    }
    e.exit()
}

/// `--cidr`: slirp4netns's rules (a network address, prefix length 1-25).
pub fn cidr(s: &str) -> Result<Ipv4Cidr, String> {
    let (net, prefix) = config::parse_cidr(s)?;
    Ipv4Cidr::new(net, prefix).map_err(|e| e.to_string())
}

/// `--mac-address`: six hex bytes separated by `:`.
pub fn mac(s: &str) -> Result<[u8; 6], String> {
    config::parse_mac(s).ok_or_else(|| {
        "expected six hex bytes separated by ':', e.g. 02:00:00:00:00:01".to_string()
    })
}

/// A MAC address as `--mac-address` takes it.
pub fn format_mac(m: [u8; 6]) -> String {
    let parts: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// `--ipv6-prefix`: a /64 prefix.
pub fn ipv6_prefix(s: &str) -> Result<Ipv6Addr, ConfigError> {
    config::parse_ipv6_prefix(s)
}

/// `--dns-upstream`: `IP`, `IP:PORT` or `[V6]:PORT`.
pub fn dns_upstream(s: &str) -> Result<SocketAddr, ConfigError> {
    config::parse_upstream(s)
}

/// One `--outbound-allow` value: `none` or comma-separated CIDRs.
#[derive(Clone, Debug)]
pub struct AllowList(Vec<IpCidr>);

/// Parses one `--outbound-allow` value ([`OutboundPolicy::parse_value`]).
pub fn allow_list(s: &str) -> Result<AllowList, ConfigError> {
    OutboundPolicy::parse_value(s).map(AllowList)
}

/// The policy of every `--outbound-allow` given: none at all allows any
/// destination; `none` alone allows nothing.
pub fn outbound_policy(values: &[AllowList]) -> OutboundPolicy {
    if values.is_empty() {
        OutboundPolicy::Any
    } else {
        OutboundPolicy::Only(values.iter().flat_map(|v| v.0.iter().copied()).collect())
    }
}

/// `--udp-filter`: its two modes, listed in the help.
pub fn udp_filter() -> impl TypedValueParser<Value = UdpFilter> {
    PossibleValuesParser::new(["address-dependent", "endpoint-independent"])
        .try_map(|s| s.parse::<UdpFilter>())
}

/// `--port-path`: how published TCP ports are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PortPath {
    /// The fast path when it can be set up, else the userspace stack.
    Auto,
    /// Always the userspace stack.
    Stack,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_with_the_library_rules() {
        assert!(cidr("10.0.2.0/24").is_ok());
        assert_eq!(
            cidr("10.0.2.0/26").unwrap_err(),
            "prefix length needs to be 1-25"
        );
        assert_eq!(mac("2:0:0:0:0:1"), Ok([2, 0, 0, 0, 0, 1]));
        assert!(mac("02:00").unwrap_err().contains("six hex bytes"));
        assert_eq!(format_mac([2, 0, 0, 0xaa, 0xbb, 0xcc]), "02:00:00:aa:bb:cc");
        let lists = [
            allow_list("none").unwrap(),
            allow_list("10.0.0.0/8, ::1").unwrap(),
        ];
        assert_eq!(outbound_policy(&lists).to_string(), "10.0.0.0/8,::1/128");
        assert_eq!(
            outbound_policy(&[allow_list("none").unwrap()]).to_string(),
            "none"
        );
        assert_eq!(outbound_policy(&[]), OutboundPolicy::Any);
        assert!(allow_list("10.0.0.0/33").is_err());
    }
}
