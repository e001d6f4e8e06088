//! The port spec: the rule types shared by `-p`, `rnet port add` and the
//! control socket ([`PortSpec`], [`Proto`], [`IfName`]), their grammar, and
//! what publishing reports back ([`PortInfo`], [`PortError`]).
//!
//! # Grammar
//!
//! ```text
//! [HOST_IP:]HOST_PORT[-END]:[GUEST_IP:]GUEST_PORT[-END][/tcp|/udp]
//! ```
//!
//! - `HOST_IP` defaults to `0.0.0.0`; an IPv6 address goes in brackets
//!   (`[::1]:8080:80`, `[::]:8080:80`).
//! - `GUEST_IP` defaults to the guest itself in the client's family: IPv4
//!   clients reach net + 100, IPv6 clients prefix::100 (or net + 100 when
//!   IPv6 is off). Given, it may be IPv4 or, in brackets, IPv6
//!   (`[::1]:8080:[fd00::100]:80`); a client of the other family then
//!   appears to the guest as the gateway of the guest address's family.
//! - A range maps port by port and both sides must have the same length:
//!   `30000-32767:30000-32767` publishes the Kubernetes NodePort range.
//! - The protocol defaults to `tcp`.
//! - A rule may carry a host interface ([`PortSpec::iface`], from pasta
//!   mode's `ADDR%IF/PORT`; this grammar has no syntax for it): its
//!   listeners are bound to that device (`SO_BINDTODEVICE`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl FromStr for Proto {
    type Err = PortSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(PortSpecError(format!(
                "unknown protocol {s:?} (tcp or udp)"
            ))),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A malformed port spec; the message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PortSpecError(pub String);

/// One publishing rule: `count` consecutive host ports to as many guest ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Protocol.
    pub proto: Proto,
    /// Host address to bind.
    pub host_ip: IpAddr,
    /// First host port (0: let the kernel choose; only with `count == 1`).
    pub host_port: u16,
    /// Guest address (None: the guest's own address in the client's family).
    pub guest_ip: Option<IpAddr>,
    /// First guest port.
    pub guest_port: u16,
    /// Number of ports.
    pub count: u16,
    /// The host interface the listener is bound to (`SO_BINDTODEVICE`;
    /// pasta's `ADDR%IF/PORT`), or any.
    pub iface: Option<IfName>,
}

/// A network interface name (at most 15 bytes, as the kernel's IFNAMSIZ
/// allows), kept inline so that [`PortSpec`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IfName {
    len: u8,
    bytes: [u8; 15],
}

impl IfName {
    /// Checks `name`: 1-15 bytes, no `/`, whitespace, `%` or NUL.
    pub fn new(name: &str) -> Result<IfName, PortSpecError> {
        let ok = !name.is_empty()
            && name.len() <= 15
            && !name
                .bytes()
                .any(|b| b == b'/' || b == b'%' || b == 0 || b.is_ascii_whitespace());
        if !ok {
            return Err(PortSpecError(format!(
                "bad interface name {name:?}: 1-15 characters, no '/', '%' or spaces"
            )));
        }
        let mut bytes = [0u8; 15];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(IfName {
            len: name.len() as u8,
            bytes,
        })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("?")
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PortSpec {
    /// A single-port TCP or UDP rule.
    pub fn single(
        proto: Proto,
        host: SocketAddr,
        guest_ip: Option<IpAddr>,
        guest_port: u16,
    ) -> Self {
        Self {
            proto,
            host_ip: host.ip(),
            host_port: host.port(),
            guest_ip,
            guest_port,
            count: 1,
            iface: None,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |p: u16| {
            if self.count > 1 {
                format!("{p}-{}", p as u32 + self.count as u32 - 1)
            } else {
                p.to_string()
            }
        };
        let dev = self.iface.map_or_else(String::new, |i| format!("%{i}"));
        match self.host_ip {
            IpAddr::V6(ip) => write!(f, "[{ip}{dev}]:{}:", range(self.host_port))?,
            IpAddr::V4(ip) => write!(f, "{ip}{dev}:{}:", range(self.host_port))?,
        }
        match self.guest_ip {
            Some(IpAddr::V6(g)) => write!(f, "[{g}]:")?,
            Some(IpAddr::V4(g)) => write!(f, "{g}:")?,
            None => {}
        }
        write!(f, "{}/{}", range(self.guest_port), self.proto)
    }
}

fn parse_range(s: &str, what: &str, allow_zero: bool) -> Result<(u16, u16), PortSpecError> {
    let bad = || {
        PortSpecError(format!(
            "bad {what} {s:?}: expected PORT or FIRST-LAST (1-65535)"
        ))
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let first: u16 = a.parse().map_err(|_| bad())?;
    let last: u16 = match b {
        Some(b) => b.parse().map_err(|_| bad())?,
        None => first,
    };
    if (first == 0 && !(allow_zero && b.is_none())) || last < first {
        return Err(bad());
    }
    Ok((first, last - first + 1))
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    /// Parses the grammar in the module documentation.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (body, proto) = match spec.rsplit_once('/') {
            Some((b, p)) => (b, p.parse()?),
            None => (spec, Proto::Tcp),
        };
        let fields = split_fields(body, spec)?;
        let host_ip = |f: &Field<'_>| parse_ip(f.text, spec);
        let guest_ip = |f: &Field<'_>| {
            if f.bracketed {
                // A v4-mapped address means the IPv4 one.
                f.text
                    .parse::<IpAddr>()
                    .map(|ip| ip.to_canonical())
                    .map_err(|_| PortSpecError(format!("{spec}: bad guest address {:?}", f.text)))
            } else {
                parse_v4(f.text, spec).map(IpAddr::V4)
            }
        };
        let (host_ip, host, guest_ip, guest) = match fields.as_slice() {
            [hp, gp] if !hp.bracketed && !gp.bracketed => (None, hp.text, None, gp.text),
            // HOST_IP:HOST_PORT:GUEST_PORT when the first field is an
            // address (bracketed, or dotted IPv4), else
            // HOST_PORT:GUEST_IP:GUEST_PORT.
            [hi, hp, gp] if (hi.bracketed || hi.text.contains('.')) && !hp.bracketed => {
                (Some(host_ip(hi)?), hp.text, None, gp.text)
            }
            [hp, gi, gp] if !hp.bracketed => (None, hp.text, Some(guest_ip(gi)?), gp.text),
            [hi, hp, gi, gp] if !hp.bracketed && !gp.bracketed => {
                (Some(host_ip(hi)?), hp.text, Some(guest_ip(gi)?), gp.text)
            }
            _ => {
                return Err(PortSpecError(format!(
                    "{spec}: expected [HOST_IP:]HOST_PORT:[GUEST_IP:]GUEST_PORT[/tcp|/udp]"
                )));
            }
        };
        let (host_port, hn) = parse_range(host, "host port", true)?;
        let (guest_port, gn) = parse_range(guest, "guest port", false)?;
        if hn != gn {
            return Err(PortSpecError(format!(
                "{spec}: host and guest ranges differ in length ({hn} and {gn} ports)"
            )));
        }
        Ok(PortSpec {
            proto,
            host_ip: host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            host_port,
            guest_ip,
            guest_port,
            count: hn,
            iface: None,
        })
    }
}

/// One `:`-separated field of a spec; a bracketed field (an IPv6 address)
/// may contain colons.
struct Field<'a> {
    text: &'a str,
    bracketed: bool,
}

fn split_fields<'a>(body: &'a str, spec: &str) -> Result<Vec<Field<'a>>, PortSpecError> {
    let mut fields = Vec::new();
    let mut rest = body;
    loop {
        let (field, after) = if let Some(r) = rest.strip_prefix('[') {
            let (inside, after) = r
                .split_once(']')
                .ok_or_else(|| PortSpecError(format!("{spec}: unterminated [IPv6] address")))?;
            let after = match after.strip_prefix(':') {
                Some(a) => Some(a),
                None if after.is_empty() => None,
                None => {
                    return Err(PortSpecError(format!(
                        "{spec}: expected ':' after [{inside}]"
                    )));
                }
            };
            (
                Field {
                    text: inside,
                    bracketed: true,
                },
                after,
            )
        } else {
            let (text, after) = match rest.split_once(':') {
                Some((t, a)) => (t, Some(a)),
                None => (rest, None),
            };
            (
                Field {
                    text,
                    bracketed: false,
                },
                after,
            )
        };
        fields.push(field);
        match after {
            Some(a) => rest = a,
            None => return Ok(fields),
        }
    }
}

fn parse_ip(s: &str, spec: &str) -> Result<IpAddr, PortSpecError> {
    s.parse()
        .map_err(|_| PortSpecError(format!("{spec}: bad host address {s:?}")))
}

fn parse_v4(s: &str, spec: &str) -> Result<Ipv4Addr, PortSpecError> {
    s.parse().map_err(|_| {
        PortSpecError(format!(
            "{spec}: bad guest address {s:?} (an IPv4 address, or an IPv6 one in brackets)"
        ))
    })
}

/// A published port as listed by the control socket and `rnet port ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Rule id (from 1, never reused).
    pub id: u64,
    /// The rule, with the host port the kernel chose if 0 was asked.
    pub spec: PortSpec,
    /// The guest address shown for the rule: the one given, else the
    /// guest's own (IPv6 for a rule bound to one IPv6 host address, IPv4
    /// otherwise).
    pub guest_ip: IpAddr,
    /// Which forwarding path carries it.
    pub path: &'static str,
}

/// Why a port could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The host port is taken.
    #[error("{spec}: host port {port} is already in use")]
    InUse {
        /// The rule.
        spec: PortSpec,
        /// The port that failed.
        port: u16,
    },
    /// A port below 1024 without the capability.
    #[error(
        "{spec}: binding host port {port} needs CAP_NET_BIND_SERVICE (or lower net.ipv4.ip_unprivileged_port_start)"
    )]
    Privileged {
        /// The rule.
        spec: PortSpec,
        /// The port that failed.
        port: u16,
    },
    /// Any other bind/listen failure.
    #[error("{spec}: cannot bind {addr}: {source}")]
    Bind {
        /// The rule.
        spec: PortSpec,
        /// The address that failed.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The rule overlaps one that exists.
    #[error("{spec}: overlaps published port rule {id}")]
    Overlap {
        /// The rule.
        spec: PortSpec,
        /// The existing rule.
        id: u64,
    },
    /// Unsupported combination (e.g. an IPv6 guest address while IPv6 is
    /// off).
    #[error("{0}")]
    Unsupported(String),
    /// No rule with that id.
    #[error("no published port with id {0}")]
    NoSuchId(u64),
    /// The network is not running.
    #[error("the network has stopped")]
    Stopped,
    /// Too many requests are waiting for the event loop; try again.
    #[error("the network is busy: too many requests are waiting")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PortSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn grammar_table() {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let g = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 50));
        let cases: &[(&str, PortSpec)] = &[
            (
                "8080:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 8080,
                    guest_ip: None,
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "8080:80/udp",
                PortSpec {
                    proto: Proto::Udp,
                    host_ip: any,
                    host_port: 8080,
                    guest_ip: None,
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "127.0.0.1:8080:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: "127.0.0.1".parse().unwrap(),
                    host_port: 8080,
                    guest_ip: None,
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "8080:10.0.2.50:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 8080,
                    guest_ip: Some(g),
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "0.0.0.0:8080:10.0.2.50:80/tcp",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 8080,
                    guest_ip: Some(g),
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "30000-32767:30000-32767",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 30000,
                    guest_ip: None,
                    guest_port: 30000,
                    count: 2768,
                    iface: None,
                },
            ),
            (
                "[::1]:8080:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: "::1".parse().unwrap(),
                    host_port: 8080,
                    guest_ip: None,
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "[::1]:8080:[fd00::100]:80/udp",
                PortSpec {
                    proto: Proto::Udp,
                    host_ip: "::1".parse().unwrap(),
                    host_port: 8080,
                    guest_ip: Some("fd00::100".parse().unwrap()),
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "8080:[fd00::100]:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 8080,
                    guest_ip: Some("fd00::100".parse().unwrap()),
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "[::]:8080:10.0.2.50:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: "::".parse().unwrap(),
                    host_port: 8080,
                    guest_ip: Some(g),
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
            (
                "0:80",
                PortSpec {
                    proto: Proto::Tcp,
                    host_ip: any,
                    host_port: 0,
                    guest_ip: None,
                    guest_port: 80,
                    count: 1,
                    iface: None,
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(&p(s), want, "{s}");
            // Display gives something that parses back to the same rule.
            assert_eq!(&p(&want.to_string()), want, "{s} via {want}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (s, needle) in [
            ("80", "expected"),
            ("a:80", "host port"),
            ("80:0", "guest port"),
            ("80:70000", "guest port"),
            ("100-90:100-90", "host port"),
            ("1000-1001:80", "differ"),
            ("8080:80/sctp", "protocol"),
            ("[::1:8080:80", "unterminated"),
            ("8080:fd00::5:80", "expected"),
            ("1.2.3:8080:80", "host address"),
            ("0-3:0-3", "host port"),
            ("8080:[fd00::5:80", "unterminated"),
            ("8080:[fd00::x]:80", "guest address"),
            ("[::1]8080:80", "expected ':'"),
            ("8080:[::1]", "expected"),
        ] {
            let e = s.parse::<PortSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn interface_names() {
        let lo = IfName::new("lo").unwrap();
        assert_eq!(lo.as_str(), "lo");
        assert_eq!(
            IfName::new("eth0.100-long").unwrap().as_bytes(),
            b"eth0.100-long"
        );
        for bad in ["", "a/b", "a b", "a%b", "sixteen-chars-xx"] {
            assert!(IfName::new(bad).is_err(), "{bad:?}");
        }
        let mut spec = PortSpec::single(Proto::Tcp, "127.0.0.1:8080".parse().unwrap(), None, 80);
        spec.iface = Some(lo);
        assert_eq!(spec.to_string(), "127.0.0.1%lo:8080:80/tcp");
    }
}
