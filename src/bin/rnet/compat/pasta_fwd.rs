//! pasta's `-T` and `-U`: TCP and UDP ports of the namespace's loopback
//! forwarded to the same (or the `:TARGET`) ports of the host's loopback.
//!
//! Before rnet attaches (while the process is still single-threaded and not
//! sandboxed), a confined socket opener ([`rnet::ns::opener`]) joins the
//! target's user and network namespaces and opens one socket per port on
//! the namespace's 127.0.0.1 (with `IP_FREEBIND`, as `lo` may still be
//! down; listening for TCP, bound for UDP), handing the descriptors back
//! over a socket pair (SCM_RIGHTS). With explicit ports it exits once they
//! are open; with `auto` it stays, and [`watch_auto`] reads the host's
//! socket tables every [`AUTO_SCAN`] and asks it for each new port (at most
//! [`MAX_AUTO_PORTS`] per protocol), shutting a socket down when the
//! host's port goes away. The sockets stay in the namespace; rnet serves
//! them from outside:
//!
//! - TCP: each accepted connection is connected to the host's 127.0.0.1
//!   from rnet's own network namespace, with one pair of copying threads;
//!   at most [`MAX_TCP_CONNECTIONS`] at once per port (more are closed at
//!   once), so the namespace cannot make rnet start threads without bound.
//! - UDP: one thread per port reads the namespace's datagrams; each client
//!   address gets a host socket connected to the host's port, whose replies
//!   a thread of its own sends back to that client. A client whose host
//!   side has sent nothing for [`UDP_IDLE`] is forgotten (its next datagram
//!   gets a fresh host socket); at most [`MAX_UDP_CLIENTS`] per port are
//!   kept (datagrams of further clients are dropped and logged at most
//!   every 10 s).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rnet::Proto;
use rnet::ns::opener::Opener;
use rnet::ports::auto::Tables;
use tracing::{debug, info, warn};

/// Concurrent `-T` connections per port.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// Clients remembered per `-U` port.
pub const MAX_UDP_CLIENTS: usize = 256;
/// How long a `-U` client's host side may stay silent before the client is
/// forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// One forwarded port: the namespace's loopback port and the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reverse {
    pub proto: Proto,
    pub ns_port: u16,
    pub host_port: u16,
}

/// A namespace-side socket, ready to serve.
pub enum Opened {
    Tcp(Reverse, TcpListener),
    Udp(Reverse, UdpSocket),
}

/// Opens the namespace-side sockets for `ports` through `opener`.
pub fn open_listeners(opener: &Opener, ports: &[Reverse]) -> Result<Vec<Opened>, String> {
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let fd = opener
            .open(p.proto, p.ns_port)
            .map_err(|e| format!("-T/-U: {e}"))?;
        out.push(open_as(*p, fd));
    }
    Ok(out)
}

fn open_as(r: Reverse, fd: OwnedFd) -> Opened {
    match r.proto {
        Proto::Tcp => Opened::Tcp(r, TcpListener::from(fd)),
        Proto::Udp => Opened::Udp(r, UdpSocket::from(fd)),
    }
}

/// Serves the sockets on threads of their own until the process exits.
pub fn serve(opened: Vec<Opened>) {
    for o in opened {
        start(o, Arc::new(AtomicBool::new(false)));
    }
}

/// Serves one socket on a thread of its own until `stop` is set and the
/// socket shut down.
fn start(o: Opened, stop: Arc<AtomicBool>) {
    {
        let (r, spawned) = match o {
            Opened::Tcp(r, l) => (
                r,
                std::thread::Builder::new()
                    .name(format!("rnet-tcp-ns-{}", r.ns_port))
                    .spawn(move || accept_loop(r, l, stop)),
            ),
            Opened::Udp(r, s) => (
                r,
                std::thread::Builder::new()
                    .name(format!("rnet-udp-ns-{}", r.ns_port))
                    .spawn(move || udp_loop(r, s, stop)),
            ),
        };
        if let Err(e) = spawned {
            warn!(
                port = r.ns_port,
                proto = r.proto.as_str(),
                "cannot start the -T/-U forwarder: {e}"
            );
        }
    }
}

/// Rate limit for the warnings a namespace can trigger repeatedly.
struct Every10s(Mutex<Option<Instant>>);

impl Every10s {
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Decrements the connection count when a connection's last pump ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(r: Reverse, l: TcpListener, stop: Arc<AtomicBool>) {
    info!(
        ns_port = r.ns_port,
        host_port = r.host_port,
        "forwarding the namespace's 127.0.0.1 to the host's (TCP)"
    );
    let open = Arc::new(AtomicUsize::new(0));
    let warn_full = Every10s(Mutex::new(None));
    loop {
        let accepted = l.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let conn = match accepted {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(port = r.ns_port, "-T accept: {e}");
                return;
            }
        };
        if open.load(Ordering::SeqCst) >= MAX_TCP_CONNECTIONS {
            if warn_full.due() {
                warn!(
                    port = r.ns_port,
                    "-T: {MAX_TCP_CONNECTIONS} connections already open; closing new ones"
                );
            }
            drop(conn);
            continue;
        }
        let host = SocketAddrV4::new(Ipv4Addr::LOCALHOST, r.host_port);
        let up = match TcpStream::connect(host) {
            Ok(s) => s,
            Err(e) => {
                debug!(%host, "-T connect: {e}");
                continue;
            }
        };
        let pair = (conn.try_clone(), up.try_clone());
        let (Ok(conn2), Ok(up2)) = pair else {
            continue;
        };
        open.fetch_add(1, Ordering::SeqCst);
        let slot = Arc::new(Slot(open.clone()));
        let slot2 = slot.clone();
        let _ = std::thread::Builder::new().spawn(move || {
            pump(conn, up2);
            drop(slot);
        });
        let _ = std::thread::Builder::new().spawn(move || {
            pump(up, conn2);
            drop(slot2);
        });
    }
}

/// The `-U` clients of one port: each client's host socket.
type Clients = Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>;

fn udp_loop(r: Reverse, ns: UdpSocket, stop: Arc<AtomicBool>) {
    info!(
        ns_port = r.ns_port,
        host_port = r.host_port,
        "forwarding the namespace's 127.0.0.1 to the host's (UDP)"
    );
    let ns = Arc::new(ns);
    let clients: Clients = Arc::new(Mutex::new(HashMap::new()));
    let warn_full = Every10s(Mutex::new(None));
    let host = SocketAddrV4::new(Ipv4Addr::LOCALHOST, r.host_port);
    let mut buf = vec![0u8; 65536];
    loop {
        let received = ns.recv_from(&mut buf);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (n, client) = match received {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(port = r.ns_port, "-U receive: {e}");
                return;
            }
        };
        let known = clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&client)
            .cloned();
        let up = match known {
            Some(s) => s,
            None => match new_udp_client(&ns, &clients, client, host) {
                Some(s) => s,
                None => {
                    if warn_full.due() {
                        warn!(
                            port = r.ns_port,
                            "-U: {MAX_UDP_CLIENTS} clients already, or no host socket; dropping datagrams of new ones"
                        );
                    }
                    continue;
                }
            },
        };
        if let Err(e) = up.send(&buf[..n]) {
            debug!(%host, "-U send: {e}");
        }
    }
}

/// A host socket for a new `-U` client, with the thread that carries its
/// replies back; None at the cap or when no socket can be had.
fn new_udp_client(
    ns: &Arc<UdpSocket>,
    clients: &Clients,
    client: SocketAddr,
    host: SocketAddrV4,
) -> Option<Arc<UdpSocket>> {
    let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_UDP_CLIENTS {
        return None;
    }
    let up = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).ok()?;
    up.connect(host).ok()?;
    up.set_read_timeout(Some(UDP_IDLE)).ok()?;
    let up = Arc::new(up);
    let replies = up.clone();
    let (ns, clients2) = (ns.clone(), clients.clone());
    std::thread::Builder::new()
        .name("rnet-udp-ns-client".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Ends when the host side has been silent for UDP_IDLE.
            while let Ok(n) = replies.recv(&mut buf) {
                let _ = ns.send_to(&buf[..n], client);
            }
            clients2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&client);
        })
        .ok()?;
    map.insert(client, up.clone());
    Some(up)
}

/// Copies `from` to `to` until EOF, then half-closes `to`. Plain reads and
/// writes (no splice or sendfile), which the sandbox's filter allows.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Ports forwarded at most per protocol by `-T auto` / `-U auto`.
pub const MAX_AUTO_PORTS: usize = 128;
/// How often `-T/-U auto` reads the host's socket tables.
pub const AUTO_SCAN: Duration = Duration::from_secs(1);

/// What `-T auto` / `-U auto` follow.
pub struct AutoReverse {
    /// `-T auto`: the host's listening TCP ports.
    pub tcp: bool,
    /// `-U auto`: the host's bound UDP ports (and, as pasta does, the
    /// listening TCP port numbers).
    pub udp: bool,
    /// Ports never forwarded: rnet's own published host ports, per
    /// protocol.
    pub excluded: Vec<(Proto, u16)>,
    /// The host's ephemeral port range (inclusive): UDP ports in it are
    /// rnet's own NAT sockets and other clients, not services.
    pub ephemeral: (u16, u16),
}

/// The ports `-T/-U auto` want now, given the host's listening sockets and
/// the host ports rnet publishes at this moment (`-t auto` adds some while
/// it runs; forwarding one back would loop into the namespace).
pub fn auto_wanted(
    a: &AutoReverse,
    listening: &[(Proto, SocketAddr)],
    published: &[(Proto, u16)],
) -> Vec<(Proto, u16)> {
    let mut want: std::collections::BTreeSet<(Proto, u16)> = Default::default();
    for (proto, addr) in listening {
        let port = addr.port();
        if *proto == Proto::Tcp && a.tcp {
            want.insert((Proto::Tcp, port));
        }
        if a.udp {
            let in_eph = (a.ephemeral.0..=a.ephemeral.1).contains(&port);
            if *proto == Proto::Tcp || !in_eph {
                want.insert((Proto::Udp, port));
            }
        }
    }
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        out.extend(
            want.iter()
                .filter(|(p, port)| {
                    *p == proto
                        && !a.excluded.contains(&(proto, *port))
                        && !published.contains(&(proto, *port))
                })
                .take(MAX_AUTO_PORTS)
                .copied(),
        );
    }
    out
}

/// Every host port rnet publishes now (each port of each rule's range).
fn published_now(handle: &rnet::Handle) -> Vec<(Proto, u16)> {
    let rules = handle.ports().unwrap_or_default();
    rules
        .iter()
        .flat_map(|r| {
            let s = r.spec;
            (0..s.count.max(1)).filter_map(move |i| Some((s.proto, s.host_port.checked_add(i)?)))
        })
        .collect()
}

/// One port `-T/-U auto` serves: its stop flag and a descriptor of its
/// socket, to shut it down when the host's port goes away.
struct Live {
    stop: Arc<AtomicBool>,
    sock: OwnedFd,
}

/// Follows the host's listening sockets (read through `tables`, rnet's own
/// network namespace's, every [`AUTO_SCAN`]) and keeps a namespace socket
/// open for each through `opener`, on a thread of its own; runs until the
/// process exits.
pub fn watch_auto(a: AutoReverse, tables: Tables, opener: Opener, handle: rnet::Handle) {
    let spawned = std::thread::Builder::new()
        .name("rnet-ns-auto".into())
        .spawn(move || {
            info!(
                tcp = a.tcp,
                udp = a.udp,
                "forwarding the host's listening ports from the namespace's 127.0.0.1 (auto)"
            );
            let mut live: BTreeMap<(Proto, u16), Live> = BTreeMap::new();
            let mut failed: std::collections::BTreeSet<(Proto, u16)> = Default::default();
            loop {
                let want = auto_wanted(&a, &tables.listening(), &published_now(&handle));
                for key in &want {
                    if live.contains_key(key) {
                        continue;
                    }
                    let (proto, port) = *key;
                    match opener.open(proto, port) {
                        Ok(fd) => {
                            let Ok(dup) = fd.try_clone() else { continue };
                            let stop = Arc::new(AtomicBool::new(false));
                            let r = Reverse {
                                proto,
                                ns_port: port,
                                host_port: port,
                            };
                            start(open_as(r, fd), stop.clone());
                            failed.remove(key);
                            live.insert(*key, Live { stop, sock: dup });
                        }
                        Err(e) => {
                            if failed.insert(*key) {
                                warn!(port, proto = proto.as_str(), "-T/-U auto: {e}; will retry");
                            }
                        }
                    }
                }
                let gone: Vec<(Proto, u16)> =
                    live.keys().filter(|k| !want.contains(k)).copied().collect();
                for key in gone {
                    if let Some(l) = live.remove(&key) {
                        l.stop.store(true, Ordering::SeqCst);
                        // Wakes the thread blocked in accept/recv.
                        let _ = nix::sys::socket::shutdown(
                            l.sock.as_raw_fd(),
                            nix::sys::socket::Shutdown::Both,
                        );
                        debug!(
                            port = key.1,
                            proto = key.0.as_str(),
                            "-T/-U auto: the host's port closed"
                        );
                    }
                }
                failed.retain(|k| want.contains(k));
                std::thread::sleep(AUTO_SCAN);
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the -T/-U auto watcher: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn auto_wanted_leaves_out_own_and_published_ports_ephemeral_udp_and_caps() {
        let a = AutoReverse {
            tcp: true,
            udp: true,
            excluded: vec![(Proto::Tcp, 8080)],
            ephemeral: (32768, 60999),
        };
        let l = [
            (Proto::Tcp, at(22)),
            (Proto::Tcp, at(8080)),
            (Proto::Udp, at(53)),
            (Proto::Udp, at(40000)),
        ];
        assert_eq!(
            auto_wanted(&a, &l, &[]),
            vec![
                (Proto::Tcp, 22),
                (Proto::Udp, 22),
                (Proto::Udp, 53),
                (Proto::Udp, 8080),
            ]
        );
        // A port rnet publishes itself (`-t auto` found it in the guest)
        // is not forwarded back, in that protocol only.
        assert_eq!(
            auto_wanted(&a, &l, &[(Proto::Udp, 53), (Proto::Tcp, 22)]),
            vec![(Proto::Udp, 22), (Proto::Udp, 8080)]
        );
        let only_t = AutoReverse { udp: false, ..a };
        assert_eq!(auto_wanted(&only_t, &l, &[]), vec![(Proto::Tcp, 22)]);
        let many: Vec<_> = (1000..1300).map(|p| (Proto::Tcp, at(p))).collect();
        let got = auto_wanted(&only_t, &many, &[]);
        assert_eq!(got.len(), MAX_AUTO_PORTS);
        assert_eq!(got[0], (Proto::Tcp, 1000));
    }
}
