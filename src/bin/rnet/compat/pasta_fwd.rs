//! pasta's `-T` and `-U`: TCP and UDP ports of the namespace's loopback
//! forwarded to the same (or the `:TARGET`) ports of the host's loopback.
//!
//! Before rnet attaches (while the process is still single-threaded and not
//! sandboxed), a forked child joins the target's user and network
//! namespaces, opens one socket per port on the namespace's 127.0.0.1 (with
//! `IP_FREEBIND`, as `lo` may still be down; listening for TCP, bound for
//! UDP) and hands the descriptors back over a socket pair (SCM_RIGHTS). The
//! sockets stay in the namespace; rnet serves them from outside:
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

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    socketpair, sockopt,
};
use nix::unistd::ForkResult;
use rnet::Proto;
use rnet::ns::fdpass;
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

/// Opens the namespace-side sockets for `ports` in PID's namespaces.
pub fn open_listeners(pid: i32, ports: &[Reverse]) -> Result<Vec<Opened>, String> {
    if ports.is_empty() {
        return Ok(Vec::new());
    }
    let user_path = format!("/proc/{pid}/ns/user");
    let join_user =
        !rnet::ns::same_userns(Path::new(&user_path)).map_err(|e| format!("{user_path}: {e}"))?;
    let user = std::fs::File::open(&user_path).map_err(|e| format!("{user_path}: {e}"))?;
    let net_path = format!("/proc/{pid}/ns/net");
    let net = std::fs::File::open(&net_path).map_err(|e| format!("{net_path}: {e}"))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: called before any thread is started (see the module header),
    // so the child may do anything the parent could.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(ours);
            let code = match child(&theirs, join_user, &user, &net, ports) {
                Ok(()) => 0,
                Err(msg) => {
                    let _ =
                        fdpass::send_with_fd(theirs.as_fd(), format!("E{msg}").as_bytes(), None);
                    1
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            let mut out = Vec::with_capacity(ports.len());
            let mut failure = None;
            for p in ports {
                let mut buf = [0u8; 512];
                match fdpass::recv_with_fd(ours.as_fd(), &mut buf) {
                    Ok(r) if r.len > 0 && buf[0] == b'E' => {
                        failure = Some(String::from_utf8_lossy(&buf[1..r.len]).into_owned());
                        break;
                    }
                    Ok(r) => match r.fd {
                        Some(fd) => out.push(match p.proto {
                            Proto::Tcp => Opened::Tcp(*p, TcpListener::from(fd)),
                            Proto::Udp => Opened::Udp(*p, UdpSocket::from(fd)),
                        }),
                        None => {
                            failure = Some("the child in the namespace ended early".into());
                            break;
                        }
                    },
                    Err(e) => {
                        failure = Some(format!("receiving a listener: {e}"));
                        break;
                    }
                }
            }
            let _ = nix::sys::wait::waitpid(child, None);
            match failure {
                Some(f) => Err(format!("-T/-U: {f}")),
                None => Ok(out),
            }
        }
    }
}

fn child(
    sock: &OwnedFd,
    join_user: bool,
    user: &std::fs::File,
    net: &std::fs::File,
    ports: &[Reverse],
) -> Result<(), String> {
    use nix::sched::{CloneFlags, setns};
    if join_user {
        setns(user, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("joining the user namespace: {e}"))?;
    }
    setns(net, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the network namespace: {e}"))?;
    for p in ports {
        let kind = match p.proto {
            Proto::Tcp => SockType::Stream,
            Proto::Udp => SockType::Datagram,
        };
        let fd = socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| format!("socket: {e}"))?;
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
        let _ = setsockopt(&fd, sockopt::IpFreebind, &true);
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.ns_port));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| {
            format!(
                "binding 127.0.0.1:{}/{} in the namespace: {e}",
                p.ns_port,
                p.proto.as_str()
            )
        })?;
        if p.proto == Proto::Tcp {
            listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
                .map_err(|e| format!("listen on 127.0.0.1:{}: {e}", p.ns_port))?;
        }
        fdpass::send_with_fd(sock.as_fd(), b"L", Some(fd.as_fd()))
            .map_err(|e| format!("passing the listener back: {e}"))?;
    }
    Ok(())
}

/// Serves the sockets on threads of their own until the process exits.
pub fn serve(opened: Vec<Opened>) {
    for o in opened {
        let (r, spawned) = match o {
            Opened::Tcp(r, l) => (
                r,
                std::thread::Builder::new()
                    .name(format!("rnet-tcp-ns-{}", r.ns_port))
                    .spawn(move || accept_loop(r, l)),
            ),
            Opened::Udp(r, s) => (
                r,
                std::thread::Builder::new()
                    .name(format!("rnet-udp-ns-{}", r.ns_port))
                    .spawn(move || udp_loop(r, s)),
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

fn accept_loop(r: Reverse, l: TcpListener) {
    info!(
        ns_port = r.ns_port,
        host_port = r.host_port,
        "forwarding the namespace's 127.0.0.1 to the host's (TCP)"
    );
    let open = Arc::new(AtomicUsize::new(0));
    let warn_full = Every10s(Mutex::new(None));
    loop {
        let conn = match l.accept() {
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

fn udp_loop(r: Reverse, ns: UdpSocket) {
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
        let (n, client) = match ns.recv_from(&mut buf) {
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
