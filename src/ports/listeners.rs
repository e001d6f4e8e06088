//! The rules and their host listeners ([`Publisher`]): which rules are
//! published and by which listener slots, binding (or adopting) their
//! sockets, the table of published-UDP clients (bounded by
//! `Limits::udp_clients` with least-recently-used eviction), the hairpin
//! lookup for guest traffic to rnet's own published ports, and the
//! requests other threads send to change the rules ([`Command`]).
//!
//! The listeners themselves live in the event loop's flow slab (their slab
//! index is their epoll token); a rule keeps the `(slot, id)` pairs of its
//! listeners. The loop turns accepted connections and datagrams into flows
//! (the engine's `ports` glue); everything here works on what it is given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;

use mio::net::{TcpListener, UdpSocket};
use smoltcp::time::{Duration, Instant};
use socket2::{Domain, Protocol, Socket, Type};

use super::{IfName, PortError, PortInfo, PortSpec, Proto};
use crate::config::Config;
use crate::nat::local::LocalAddrs;
use crate::nat::udpio;
use crate::nat::{guest_view, guest_view6};

/// A request from another thread (control socket, library handle).
pub enum Command {
    /// Publish a rule.
    AddPort(PortSpec, mpsc::SyncSender<Result<PortInfo, PortError>>),
    /// Withdraw a rule; live connections are left to finish.
    RemovePort(u64, mpsc::SyncSender<Result<(), PortError>>),
    /// List the rules.
    ListPorts(mpsc::SyncSender<Vec<PortInfo>>),
    /// Report flows, counters and ports (see [`crate::status`]).
    Status(mpsc::SyncSender<crate::status::StatusReport>),
}

/// A published rule and the listener slots `(slab index, id)` that carry
/// it.
pub struct Rule {
    pub(crate) info: PortInfo,
    pub(crate) slots: Vec<(usize, u64)>,
}

/// A TCP listener for one host port.
pub struct TcpListen {
    pub(crate) listener: TcpListener,
    /// The rule's guest address (None: the guest, in the client's family;
    /// see [`published_target`]).
    pub(crate) guest_ip: Option<IpAddr>,
    pub(crate) guest_port: u16,
    /// IPv4 connections go through the agent and splice(2) (the fast path).
    pub(crate) fast: bool,
}

impl TcpListen {
    /// The guest endpoint of IPv4 connections, which the fast path can
    /// carry; None for an IPv6 guest address.
    pub(crate) fn guest_v4(&self, cfg: &Config) -> Option<SocketAddrV4> {
        match rule_guest(cfg, self.guest_ip, true) {
            IpAddr::V4(g) => Some(SocketAddrV4::new(g, self.guest_port)),
            IpAddr::V6(_) => None,
        }
    }
}

/// A UDP socket for one host port.
pub struct UdpListen {
    pub(crate) socket: UdpSocket,
    pub(crate) guest_ip: Option<IpAddr>,
    pub(crate) guest_port: u16,
}

/// One host port's listener, bound or adopted, not yet in the slab.
pub(crate) enum Listener {
    Tcp(TcpListen),
    Udp(UdpListen),
}

impl Listener {
    /// Binds (or, from `given`, adopts) port `i` of `spec`; returns the
    /// listener and the host port it got.
    pub(crate) fn open(
        spec: PortSpec,
        i: u16,
        given: Option<&mut std::vec::IntoIter<OwnedFd>>,
    ) -> Result<(Listener, u16), PortError> {
        let addr = SocketAddr::new(spec.host_ip, spec.host_port.wrapping_add(i));
        let guest_port = spec.guest_port + i;
        let bound = match given {
            Some(fds) => match fds.next() {
                Some(fd) => Ok(adopt_listener(spec.proto, fd)),
                None => Err(PortError::Bind {
                    spec,
                    addr,
                    source: io::Error::other("no listener kept for this port"),
                }),
            },
            None => bind(spec.proto, addr, spec.iface).map_err(|e| bind_error(spec, addr, e)),
        }?;
        Ok(match bound {
            Bound::Tcp(listener) => {
                let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                let l = TcpListen {
                    listener,
                    guest_ip: spec.guest_ip,
                    guest_port,
                    fast: false,
                };
                (Listener::Tcp(l), port)
            }
            Bound::Udp(socket) => {
                let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
                let l = UdpListen {
                    socket,
                    guest_ip: spec.guest_ip,
                    guest_port,
                };
                (Listener::Udp(l), port)
            }
        })
    }
}

/// Where the guest's answers to a published-UDP client go.
struct UdpReturn {
    slot: usize,
    id: u64,
    client: SocketAddr,
    last: Instant,
    /// Its key in the recency index (updated at most once a second).
    indexed: Instant,
}

/// A published-UDP conversation: (guest endpoint, client as the guest
/// sees it).
pub(crate) type UdpKey = (SocketAddr, SocketAddr);

/// The published-UDP conversations: their listener and real client, and
/// the same by recency, for eviction at `Limits::udp_clients` and the idle
/// sweep.
#[derive(Default)]
struct UdpClients {
    map: HashMap<UdpKey, UdpReturn>,
    lru: BTreeSet<(Instant, SocketAddr, SocketAddr)>,
}

impl UdpClients {
    /// Re-files a conversation in the recency index after use, at most once
    /// a second.
    fn touch(&mut self, key: UdpKey) {
        let Some(r) = self.map.get_mut(&key) else {
            return;
        };
        if r.last < r.indexed + Duration::from_secs(1) {
            return;
        }
        self.lru.remove(&(r.indexed, key.0, key.1));
        r.indexed = r.last;
        self.lru.insert((r.last, key.0, key.1));
    }
}

/// The published rules, the published-UDP clients and the spliced flows'
/// bookkeeping of one event loop.
pub struct Publisher {
    rules: BTreeMap<u64, Rule>,
    next_rule: u64,
    udp: UdpClients,
    /// Spliced flow slot → its alias slot.
    pub(crate) splice_alias: HashMap<usize, usize>,
    /// Bytes moved by spliced connections that have closed (to, from guest).
    pub(crate) spliced_closed: (u64, u64),
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher {
            rules: BTreeMap::new(),
            next_rule: 1,
            udp: UdpClients::default(),
            splice_alias: HashMap::new(),
            spliced_closed: (0, 0),
        }
    }
}

impl Publisher {
    /// The id the next new rule gets.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_rule
    }

    /// Ids below `next` were given by a previous data plane.
    pub(crate) fn continue_from(&mut self, next: u64) {
        self.next_rule = self.next_rule.max(next);
    }

    /// Checks `spec` against the network and returns the guest address
    /// the rule shows: the one given, else the guest's own (IPv6 for a
    /// rule bound to one IPv6 host address, which only ever takes IPv6
    /// clients; IPv4 otherwise).
    pub(crate) fn check(spec: &PortSpec, cfg: &Config) -> Result<IpAddr, PortError> {
        if spec.host_port == 0 && spec.count != 1 {
            return Err(PortError::Unsupported(format!(
                "{spec}: host port 0 (any free port) only works for a single port"
            )));
        }
        if matches!(spec.guest_ip, Some(IpAddr::V6(_))) && cfg.ipv6_prefix().is_none() {
            return Err(PortError::Unsupported(format!(
                "{spec}: the guest address is IPv6, but IPv6 is off"
            )));
        }
        let v6_only = matches!(spec.host_ip, IpAddr::V6(h)
            if !h.is_unspecified() && h.to_ipv4_mapped().is_none());
        let shown_guest = rule_guest(cfg, spec.guest_ip, !v6_only);
        if spec.guest_port as u32 + spec.count as u32 > 65536
            || spec.host_port as u32 + spec.count as u32 > 65536
        {
            return Err(PortError::Unsupported(format!(
                "{spec}: range runs past port 65535"
            )));
        }
        Ok(shown_guest)
    }

    /// Records a published rule (`adopted`: its id came from a previous
    /// data plane, so no new id is used up).
    pub(crate) fn insert(&mut self, rule: Rule, adopted: bool) {
        if !adopted {
            self.next_rule += 1;
        }
        self.rules.insert(rule.info.id, rule);
    }

    /// Takes rule `id` out.
    pub(crate) fn remove(&mut self, id: u64) -> Result<Rule, PortError> {
        self.rules.remove(&id).ok_or(PortError::NoSuchId(id))
    }

    /// The rules, by id.
    pub(crate) fn list(&self) -> Vec<PortInfo> {
        self.rules.values().map(|r| r.info.clone()).collect()
    }

    /// The rules' infos, by id.
    pub(crate) fn infos(&self) -> impl Iterator<Item = &PortInfo> {
        self.rules.values().map(|r| &r.info)
    }

    /// The TCP rules to an IPv4 guest address (those the fast path can
    /// carry): id and listener slots.
    pub(crate) fn tcp_v4_rules(&self) -> Vec<(u64, Vec<(usize, u64)>)> {
        self.rules
            .values()
            .filter(|r| r.info.spec.proto == Proto::Tcp && r.info.guest_ip.is_ipv4())
            .map(|r| (r.info.id, r.slots.clone()))
            .collect()
    }

    /// Notes that rule `id` now takes the fast path; its info, if it
    /// exists.
    pub(crate) fn set_fast(&mut self, id: u64) -> Option<&PortInfo> {
        let rule = self.rules.get_mut(&id)?;
        rule.info.path = "fast";
        Some(&rule.info)
    }

    /// Where a guest connection or datagram to `dst` goes when `dst` is the
    /// host (the gateway or one of the host's own addresses, `local`) at a
    /// port rnet publishes for `proto`: that port's socket, reached over
    /// the host's loopback, whatever the loopback switch (hairpin, as a home
    /// router's NAT loopback). The published port then delivers it to the
    /// guest from the gateway address. A rule bound to one host address is
    /// reached at that address (its clients then appear as that address).
    /// None when `dst` is no such port.
    pub(crate) fn hairpin(
        &self,
        cfg: &Config,
        local: &LocalAddrs,
        proto: Proto,
        dst: SocketAddr,
    ) -> Option<SocketAddr> {
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let gateway = ip == IpAddr::V4(cfg.gateway())
            || cfg.ipv6_gateway().is_some_and(|g| ip == IpAddr::V6(g));
        if !gateway && (ip.is_loopback() || !local.contains(ip)) {
            return None;
        }
        let port = dst.port();
        let loopback = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        self.rules.values().find_map(|r| {
            let spec = &r.info.spec;
            let first = u32::from(spec.host_port);
            if spec.proto != proto
                || u32::from(port) < first
                || u32::from(port) >= first + u32::from(spec.count)
            {
                return None;
            }
            let target = match spec.host_ip {
                // [::] takes IPv4 clients too; 0.0.0.0 only IPv4.
                IpAddr::V6(h) if h.is_unspecified() => loopback,
                IpAddr::V4(h) if h.is_unspecified() && ip.is_ipv4() => loopback,
                h if h == ip => h,
                h if gateway && h.is_loopback() && h.is_ipv4() == ip.is_ipv4() => h,
                _ => return None,
            };
            Some(SocketAddr::new(target, port))
        })
    }

    /// Records a datagram from a published-UDP client (`key`: guest
    /// endpoint, client as the guest sees it) that came in on listener
    /// `(slot, id)` from `client`. A new client at `cap` evicts the least
    /// recently used one; true if it did (the loop counts it as `limit`).
    pub(crate) fn udp_client_seen(
        &mut self,
        key: UdpKey,
        (slot, id): (usize, u64),
        client: SocketAddr,
        now: Instant,
        cap: usize,
    ) -> bool {
        let t = &mut self.udp;
        if let Some(r) = t.map.get_mut(&key) {
            (r.slot, r.id, r.client, r.last) = (slot, id, client, now);
            t.touch(key);
            return false;
        }
        let mut evicted = false;
        if t.map.len() >= cap.max(1) {
            if let Some((_, g, c)) = t.lru.pop_first() {
                t.map.remove(&(g, c));
            }
            evicted = true;
        }
        t.map.insert(
            key,
            UdpReturn {
                slot,
                id,
                client,
                last: now,
                indexed: now,
            },
        );
        t.lru.insert((now, key.0, key.1));
        evicted
    }

    /// The listener `(slot, id)` and the real client of conversation
    /// `key`, noted as used now; None if it is no such conversation.
    pub(crate) fn udp_client(
        &mut self,
        key: UdpKey,
        now: Instant,
    ) -> Option<(usize, u64, SocketAddr)> {
        let ret = self.udp.map.get_mut(&key)?;
        ret.last = now;
        let found = (ret.slot, ret.id, ret.client);
        self.udp.touch(key);
        Some(found)
    }

    /// Forgets one conversation (its listener is gone).
    pub(crate) fn forget_udp_client(&mut self, key: UdpKey) {
        if let Some(r) = self.udp.map.remove(&key) {
            self.udp.lru.remove(&(r.indexed, key.0, key.1));
        }
    }

    /// Forgets the conversations of published-UDP socket `slot`.
    pub(crate) fn forget_udp_clients_of(&mut self, slot: usize) {
        let t = &mut self.udp;
        t.map.retain(|_, r| r.slot != slot);
        let map = &t.map;
        t.lru.retain(|(_, g, c)| map.contains_key(&(*g, *c)));
    }

    /// Forgets conversations idle for `idle`, oldest first from the
    /// recency index.
    pub(crate) fn sweep_udp_clients(&mut self, now: Instant, idle: Duration) {
        let t = &mut self.udp;
        while let Some(&(at, g, c)) = t.lru.first() {
            if at + idle > now {
                break;
            }
            t.lru.pop_first();
            match t.map.get_mut(&(g, c)) {
                // Active since it was indexed: file it under its last use.
                Some(r) if r.last + idle > now => {
                    r.indexed = r.last;
                    t.lru.insert((r.last, g, c));
                }
                _ => {
                    t.map.remove(&(g, c));
                }
            }
        }
    }

    /// How many published-UDP clients are known.
    pub(crate) fn udp_clients(&self) -> usize {
        self.udp.map.len()
    }
}

/// The guest address a client of a rule reaches: `guest_ip` when the rule
/// names one; otherwise the guest itself in the client's family (its IPv6
/// address for an IPv6 client while IPv6 is on, its IPv4 address
/// otherwise). The one place that decides it: the listeners
/// ([`published_target`]), the fast path ([`TcpListen::guest_v4`]) and the
/// rule's shown address ([`Publisher::check`]) all ask here.
pub(crate) fn rule_guest(cfg: &Config, guest_ip: Option<IpAddr>, v4_client: bool) -> IpAddr {
    match (guest_ip, v4_client, cfg.ipv6_guest()) {
        (Some(ip), _, _) => ip,
        (None, false, Some(g6)) => IpAddr::V6(g6),
        _ => IpAddr::V4(cfg.guest()),
    }
}

/// Where a client of a published port reaches the guest, and as whom it
/// appears there: `(guest endpoint, client as the guest sees it)`, both of
/// one family.
///
/// The guest address is [`rule_guest`]'s. The client keeps its own address
/// when the families match ([`guest_view`], [`guest_view6`]); a client of
/// the other family appears as the gateway of the guest's family, the only
/// such address the guest can answer. None when the guest is IPv6 and IPv6
/// is off.
pub(crate) fn published_target(
    cfg: &Config,
    guest_ip: Option<IpAddr>,
    guest_port: u16,
    peer: SocketAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let v4_client = guest_view(cfg, peer);
    match rule_guest(cfg, guest_ip, v4_client.is_some()) {
        IpAddr::V4(g) => {
            let client = v4_client.unwrap_or_else(|| SocketAddrV4::new(cfg.gateway(), peer.port()));
            Some((SocketAddrV4::new(g, guest_port).into(), client.into()))
        }
        IpAddr::V6(g) => {
            let client = match guest_view6(cfg, peer) {
                Some(c) => c,
                None => SocketAddrV6::new(cfg.ipv6_gateway()?, peer.port(), 0, 0),
            };
            Some((SocketAddrV6::new(g, guest_port, 0, 0).into(), client.into()))
        }
    }
}

/// A listener a previous data plane bound, as this one's.
fn adopt_listener(proto: Proto, fd: OwnedFd) -> Bound {
    match proto {
        Proto::Tcp => Bound::Tcp(TcpListener::from_std(std::net::TcpListener::from(fd))),
        Proto::Udp => Bound::Udp(UdpSocket::from_std(std::net::UdpSocket::from(fd))),
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind(proto: Proto, addr: SocketAddr, iface: Option<IfName>) -> io::Result<Bound> {
    let domain = Domain::for_address(addr);
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let s = Socket::new(domain, ty.nonblocking().cloexec(), Some(p))?;
    if let IpAddr::V6(ip) = addr.ip()
        && ip.is_unspecified()
    {
        // [::] also takes IPv4 clients, as users expect of a wildcard.
        s.set_only_v6(false)?;
    }
    if let Some(i) = iface {
        s.bind_device(Some(i.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("binding to interface {i}: {e}")))?;
    }
    match proto {
        Proto::Tcp => {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(Bound::Tcp(TcpListener::from_std(s.into())))
        }
        Proto::Udp => {
            s.bind(&addr.into())?;
            udpio::enable_gro(s.as_fd());
            Ok(Bound::Udp(UdpSocket::from_std(s.into())))
        }
    }
}

fn bind_error(spec: PortSpec, addr: SocketAddr, e: io::Error) -> PortError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => PortError::InUse {
            spec,
            port: addr.port(),
        },
        Some(libc::EMFILE) | Some(libc::ENFILE) => PortError::Unsupported(format!(
            "{spec}: cannot bind {addr}: too many open files; raise the open-file limit (ulimit -n, LimitNOFILE=) above the number of published ports"
        )),
        Some(libc::EACCES) if addr.port() < 1024 => PortError::Privileged {
            spec,
            port: addr.port(),
        },
        _ => PortError::Bind {
            spec,
            addr,
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_targets_by_family() {
        let v6 = Config::builder()
            .ipv6(Some("fd00::".parse().unwrap()))
            .build()
            .unwrap();
        let v4only = Config::builder().build().unwrap();
        let s = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let t = |cfg: &Config, g: Option<&str>, peer: &str| {
            published_target(cfg, g.map(|g| g.parse().unwrap()), 80, s(peer))
        };
        // No guest address: the guest in the client's family.
        assert_eq!(
            t(&v6, None, "127.0.0.1:5000"),
            Some((s("10.0.2.100:80"), s("10.0.2.2:5000")))
        );
        assert_eq!(
            t(&v6, None, "[::ffff:198.18.0.9]:5000"),
            Some((s("10.0.2.100:80"), s("198.18.0.9:5000")))
        );
        assert_eq!(
            t(&v6, None, "[::1]:5000"),
            Some((s("[fd00::100]:80"), s("[fd00::2]:5000")))
        );
        assert_eq!(
            t(&v6, None, "[fd42::9]:5000"),
            Some((s("[fd00::100]:80"), s("[fd42::9]:5000")))
        );
        // IPv6 off: an IPv6 client reaches the IPv4 guest as the gateway.
        assert_eq!(
            t(&v4only, None, "[fd42::9]:5000"),
            Some((s("10.0.2.100:80"), s("10.0.2.2:5000")))
        );
        // A named guest address decides the family.
        assert_eq!(
            t(&v6, Some("10.0.2.100"), "[::1]:5000"),
            Some((s("10.0.2.100:80"), s("10.0.2.2:5000")))
        );
        assert_eq!(
            t(&v6, Some("fd00::100"), "127.0.0.1:5000"),
            Some((s("[fd00::100]:80"), s("[fd00::2]:5000")))
        );
        assert_eq!(
            t(&v6, Some("fd00::100"), "[fd42::9]:5000"),
            Some((s("[fd00::100]:80"), s("[fd42::9]:5000")))
        );
        assert_eq!(t(&v4only, Some("fd00::100"), "[::1]:5000"), None);
    }

    #[test]
    fn shown_guest_follows_the_host_family() {
        let v6 = Config::builder()
            .ipv6(Some("fd00::".parse().unwrap()))
            .build()
            .unwrap();
        let shown = |h: &str| {
            let spec: PortSpec = h.parse().unwrap();
            Publisher::check(&spec, &v6).unwrap().to_string()
        };
        assert_eq!(shown("8080:80"), "10.0.2.100");
        assert_eq!(shown("[::]:8080:80"), "10.0.2.100");
        assert_eq!(shown("[::1]:8080:80"), "fd00::100");
        assert_eq!(shown("[::ffff:127.0.0.1]:8080:80"), "10.0.2.100");
        assert_eq!(shown("[::1]:8080:10.0.2.50:80"), "10.0.2.50");
    }
}
