//! The socket opener: a confined process inside a target's user and
//! network namespaces that opens sockets on the namespace's 127.0.0.1 on
//! request and hands them back (pasta mode's `-T/-U`, `auto` included,
//! where new ports appear while rnet runs).
//!
//! The guest is root in the user namespace the opener joins and may signal
//! or try to trace it, so it is confined as the namespace agent is
//! (`super::agent::confine`): undumpable from the first instruction
//! after fork, stdin/stdout/stderr on `/dev/null` and no other descriptor
//! than its socket, an empty environment, an empty read-only root, only
//! `CAP_NET_BIND_SERVICE`, no_new_privs and a seccomp allow-list
//! (`opener_calls`: `socket` for AF_INET/AF_INET6 only, `bind`,
//! `listen`, `setsockopt`, `fcntl`, its socket's `sendmsg`/`recvmsg`,
//! exit). It dies with rnet (parent-death signal) and exits when rnet
//! closes its end.
//!
//! A request is 3 bytes: `t` or `u`, then the port (big-endian). The reply
//! carries the socket (bound with `IP_FREEBIND`, listening for TCP) or an
//! error text starting with `E`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    socketpair, sockopt,
};
use nix::unistd::Pid;

use super::Target;
use super::agent::confine;
use super::fdpass::{recv_with_fd, send_with_fd};
use super::nsfile::{JoinPlan, open_target};
use crate::ports::Proto;
use crate::sys::{self, ForkResult};

/// A running opener; dropping it ends the process.
pub struct Opener {
    sock: OwnedFd,
    child: Pid,
}

impl Drop for Opener {
    fn drop(&mut self) {
        // Closing our end makes it exit; reap it.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = nix::sys::wait::waitpid(self.child, None);
    }
}

impl Opener {
    /// Starts an opener in the target's user and network namespaces. Call while
    /// the process is single-threaded (it forks).
    pub fn spawn(target: &Target) -> Result<Opener, String> {
        let plan = open_target(target).map_err(|e| e.to_string())?;
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("/dev/null: {e}"))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let parent = nix::unistd::getpid();
        // SAFETY: the caller is single-threaded (see above), so the child
        // may do anything the parent could; it never returns.
        match unsafe { sys::fork() }.map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => {
                let _ = confine::undumpable();
                drop(ours);
                let code = match child(parent, &theirs, plan, null) {
                    Ok(()) => 0,
                    Err(msg) => {
                        let _ = send_with_fd(theirs.as_fd(), format!("E{msg}").as_bytes(), None);
                        1
                    }
                };
                sys::exit_now(code)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                let opener = Opener { sock: ours, child };
                let mut buf = [0u8; 512];
                let r = recv_with_fd(opener.sock.as_fd(), &mut buf)
                    .map_err(|e| format!("starting the socket opener: {e}"))?;
                match &buf[..r.len] {
                    b"1" => Ok(opener),
                    [b'E', msg @ ..] => Err(String::from_utf8_lossy(msg).into_owned()),
                    _ => Err("the socket opener ended early".into()),
                }
            }
        }
    }

    /// The opener's process id (for tests and logs).
    pub fn pid(&self) -> i32 {
        self.child.as_raw()
    }

    /// A socket on the namespace's 127.0.0.1:PORT: listening (TCP) or
    /// bound (UDP).
    pub fn open(&self, proto: Proto, port: u16) -> Result<OwnedFd, String> {
        let p = port.to_be_bytes();
        let req = [if proto == Proto::Tcp { b't' } else { b'u' }, p[0], p[1]];
        send_with_fd(self.sock.as_fd(), &req, None)
            .map_err(|e| format!("asking the socket opener: {e}"))?;
        let mut buf = [0u8; 512];
        let r = recv_with_fd(self.sock.as_fd(), &mut buf)
            .map_err(|e| format!("the socket opener's reply: {e}"))?;
        match (r.fd, &buf[..r.len]) {
            (Some(fd), _) => Ok(fd),
            (None, [b'E', msg @ ..]) => Err(String::from_utf8_lossy(msg).into_owned()),
            _ => Err("the socket opener ended".into()),
        }
    }
}

/// The child: joins, confines itself, then serves requests until EOF.
fn child(parent: Pid, sock: &OwnedFd, plan: JoinPlan, null: File) -> Result<(), String> {
    crate::sys::stdio_to_null(null.as_raw_fd());
    drop(null);
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(plan.user.iter().chain(&plan.net).map(AsRawFd::as_raw_fd));
    confine::close_all_but(&keep);
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("parent-death signal: {e}"))?;
    if nix::unistd::getppid() != parent {
        return Err("rnet exited".into());
    }
    if let Some(user) = &plan.user {
        setns(user, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("joining the user namespace: {e}"))?;
    }
    if let Some(net) = &plan.net {
        setns(net, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining the network namespace: {e}"))?;
    }
    drop(plan);
    let fail = |e: Errno, what: &str| format!("{what}: {e}");
    confine::undumpable().map_err(|e| fail(e, "PR_SET_DUMPABLE"))?;
    let _ = confine::clear_environment();
    crate::sandbox::empty_root().map_err(|e| format!("an empty root for the opener: {e}"))?;
    crate::sandbox::drop_capabilities(1 << confine::CAP_NET_BIND_SERVICE)
        .map_err(|e| format!("dropping the opener's capabilities: {e}"))?;
    confine::undumpable().map_err(|e| fail(e, "PR_SET_DUMPABLE"))?;
    let filter = confine::build_seccomp(&opener_calls()).map_err(|w| w.to_string())?;
    confine::install_seccomp(&filter).map_err(|e| fail(e, "installing the seccomp filter"))?;
    drop(filter);
    send_with_fd(sock.as_fd(), b"1", None).map_err(|e| fail(e, "ready"))?;
    let mut buf = [0u8; 16];
    loop {
        let r = match recv_with_fd(sock.as_fd(), &mut buf) {
            Ok(r) if r.len == 0 => return Ok(()),
            Ok(r) => r,
            Err(Errno::EINTR) => continue,
            Err(_) => return Ok(()),
        };
        let reply = match &buf[..r.len] {
            [k @ (b't' | b'u'), a, b] => {
                let proto = if *k == b't' { Proto::Tcp } else { Proto::Udp };
                open_one(proto, u16::from_be_bytes([*a, *b]))
            }
            _ => Err("bad request".into()),
        };
        let sent = match reply {
            Ok(fd) => send_with_fd(sock.as_fd(), b"L", Some(fd.as_fd())),
            Err(msg) => send_with_fd(sock.as_fd(), format!("E{msg}").as_bytes(), None),
        };
        if sent.is_err() {
            return Ok(());
        }
    }
}

fn open_one(proto: Proto, port: u16) -> Result<OwnedFd, String> {
    let kind = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let fd = socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
    let _ = setsockopt(&fd, sockopt::IpFreebind, &true);
    let addr = SockaddrIn::new(127, 0, 0, 1, port);
    bind(fd.as_raw_fd(), &addr).map_err(|e| {
        format!(
            "binding 127.0.0.1:{port}/{} in the namespace: {e}",
            proto.as_str()
        )
    })?;
    if proto == Proto::Tcp {
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| format!("listen on 127.0.0.1:{port} in the namespace: {e}"))?;
    }
    Ok(fd)
}

/// The system calls the opener makes once confined.
fn opener_calls() -> Vec<(libc::c_long, confine::Arg)> {
    use confine::Arg::{Any, OneOf};
    const FAMILIES: &[u64] = &[libc::AF_INET as u64, libc::AF_INET6 as u64];
    let mut v = confine::base_calls();
    v.extend([
        (libc::SYS_socket, OneOf(0, FAMILIES)),
        (libc::SYS_bind, Any),
        (libc::SYS_listen, Any),
        (libc::SYS_setsockopt, Any),
        (libc::SYS_fcntl, Any),
    ]);
    v
}
