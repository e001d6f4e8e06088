//! The smaller typed settings: the state caps ([`Limits`]), the services
//! served to the guest ([`Services`]) and the UDP filter ([`UdpFilter`]).

use std::str::FromStr;

use super::*;

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
