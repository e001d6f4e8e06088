//! pasta's `-T`: TCP ports of the namespace's loopback forwarded to the
//! same (or the `:TARGET`) ports of the host's loopback.
//!
//! Before rnet attaches (while the process is still single-threaded and not
//! sandboxed), a forked child joins the target's user and network
//! namespaces, opens one listening socket per port on the namespace's
//! 127.0.0.1 (with `IP_FREEBIND`, as `lo` may still be down) and hands the
//! descriptors back over a socket pair (SCM_RIGHTS). The listeners stay in
//! the namespace; rnet accepts on them from outside and connects each
//! connection to the host's 127.0.0.1 from its own network namespace, one
//! pair of copying threads per connection. `-U` (UDP) is not carried.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    socketpair, sockopt,
};
use nix::unistd::ForkResult;
use rnet::ns::fdpass;
use tracing::{debug, info, warn};

/// One forwarded port: the namespace's loopback port and the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reverse {
    pub ns_port: u16,
    pub host_port: u16,
}

/// Opens the namespace-side listeners for `ports` in PID's namespaces.
pub fn open_listeners(pid: i32, ports: &[Reverse]) -> Result<Vec<(Reverse, TcpListener)>, String> {
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
                        Some(fd) => out.push((*p, TcpListener::from(fd))),
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
                Some(f) => Err(format!("-T: {f}")),
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
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
        let _ = setsockopt(&fd, sockopt::IpFreebind, &true);
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.ns_port));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
            .map_err(|e| format!("binding 127.0.0.1:{} in the namespace: {e}", p.ns_port))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| format!("listen on 127.0.0.1:{}: {e}", p.ns_port))?;
        fdpass::send_with_fd(sock.as_fd(), b"L", Some(fd.as_fd()))
            .map_err(|e| format!("passing the listener back: {e}"))?;
    }
    Ok(())
}

/// Serves the listeners on threads of their own until the process exits.
pub fn serve(listeners: Vec<(Reverse, TcpListener)>) {
    for (r, l) in listeners {
        let spawned = std::thread::Builder::new()
            .name(format!("rnet-tcp-ns-{}", r.ns_port))
            .spawn(move || accept_loop(r, l));
        if let Err(e) = spawned {
            warn!(port = r.ns_port, "cannot start the -T forwarder: {e}");
        }
    }
}

fn accept_loop(r: Reverse, l: TcpListener) {
    info!(
        ns_port = r.ns_port,
        host_port = r.host_port,
        "forwarding the namespace's 127.0.0.1 to the host's"
    );
    loop {
        let conn = match l.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(port = r.ns_port, "-T accept: {e}");
                return;
            }
        };
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
        let _ = std::thread::Builder::new().spawn(move || pump(conn, up2));
        let _ = std::thread::Builder::new().spawn(move || pump(up, conn2));
    }
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
