//! The fast path of a published TCP port: two kernel sockets, one accepted
//! on the host and one opened inside the namespace by the agent
//! ([`crate::ns::agent`]), joined with splice(2) through a pipe per
//! direction. Bytes never enter rnet's address space and never cross the
//! TAP.
//!
//! # Theory of operation
//!
//! Each direction is `src → pipe → dst`. A pass moves what the pipe holds
//! into `dst`, then refills the pipe from `src`, until one of them would
//! block; readiness flags (set by epoll events, cleared on EAGAIN) say when
//! to try again. A full pipe stops reading from `src`, so a slow reader
//! slows the writer through the kernel's own TCP windows. EOF on `src`,
//! once the pipe is empty, becomes `shutdown(SHUT_WR)` on `dst`; a reset or
//! error on either socket resets the other (SO_LINGER 0) and ends the flow.
//!
//! # Descriptors from the agent
//!
//! The agent lives in the guest's namespaces and is not trusted: before a
//! descriptor it sent becomes a flow, [`check_guest_socket`] makes sure it
//! is an IPv4 TCP socket (not listening) whose connect to the expected
//! guest endpoint has been started, bound to the expected client address
//! when the connection is transparent, and switches it to non-blocking.
//! Once connected, the peer is checked again.

use std::io;
use std::net::Shutdown;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use socket2::SockRef;

/// Why a descriptor from the agent was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSocket {
    /// Not a socket at all (fstat).
    NotASocket,
    /// Not AF_INET, SOCK_STREAM, IPPROTO_TCP.
    NotTcp4,
    /// A listening socket.
    Listening,
    /// Not connecting or connected to the expected guest endpoint.
    WrongPeer,
    /// Not bound to the expected client address.
    WrongLocal,
    /// The checks themselves failed.
    Unreadable,
}

fn int_opt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live c_int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// An IPv4 address read by `getsockname` or `SO_PEERNAME` (which, unlike
/// `getpeername`, also answers while the connect is in progress).
fn v4_addr(fd: BorrowedFd<'_>, peer: bool) -> Option<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let p = (&mut sa as *mut libc::sockaddr_in).cast();
    // SAFETY: both calls write at most `len` bytes into `sa`, which lives
    // across the call.
    let r = unsafe {
        if peer {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERNAME,
                p,
                &mut len,
            )
        } else {
            libc::getsockname(fd.as_raw_fd(), p.cast(), &mut len)
        }
    };
    if r != 0 || sa.sin_family != libc::AF_INET as libc::sa_family_t {
        return None;
    }
    Some(SocketAddrV4::new(
        std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Checks a descriptor the agent sent for the connection from `client`
/// (None: a plain connect from the namespace's own address) to `guest`,
/// and makes it non-blocking.
pub fn check_guest_socket(
    fd: &OwnedFd,
    client: Option<SocketAddrV4>,
    guest: SocketAddrV4,
) -> Result<(), BadSocket> {
    let st = nix::sys::stat::fstat(fd).map_err(|_| BadSocket::Unreadable)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(BadSocket::NotASocket);
    }
    let b = fd.as_fd();
    let opt = |name| int_opt(b, libc::SOL_SOCKET, name).ok_or(BadSocket::Unreadable);
    if opt(libc::SO_DOMAIN)? != libc::AF_INET
        || opt(libc::SO_TYPE)? != libc::SOCK_STREAM
        || opt(libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
    {
        return Err(BadSocket::NotTcp4);
    }
    if opt(libc::SO_ACCEPTCONN)? != 0 {
        return Err(BadSocket::Listening);
    }
    if v4_addr(b, true) != Some(guest) {
        return Err(BadSocket::WrongPeer);
    }
    if let Some(c) = client
        && v4_addr(b, false) != Some(c)
    {
        return Err(BadSocket::WrongLocal);
    }
    fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|_| BadSocket::Unreadable)?;
    Ok(())
}

/// Bytes moved per splice call at most.
const CHUNK: usize = 1 << 20;
/// Pipe capacity asked for (the kernel may cap it at fs.pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;

/// One direction of a spliced connection.
struct Half {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Bytes sitting in the pipe.
    queued: usize,
    /// The source reached EOF.
    eof: bool,
    /// EOF was passed on to the destination.
    shut: bool,
    /// Bytes moved in total.
    bytes: u64,
}

impl Half {
    fn new() -> io::Result<Self> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger pipes mean fewer wake-ups; failing to grow it is harmless.
        let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self {
            pipe_r,
            pipe_w,
            queued: 0,
            eof: false,
            shut: false,
            bytes: 0,
        })
    }
}

/// Readiness of one socket as last reported.
#[derive(Default, Clone, Copy)]
struct Ready {
    r: bool,
    w: bool,
}

/// What the engine should do after a pass.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceStep {
    /// Keep the flow.
    Keep,
    /// Both directions finished or one side failed; remove the flow.
    Done,
}

/// A published connection on the fast path.
pub struct SpliceFlow {
    /// The accepted host connection.
    pub host: TcpStream,
    /// The connection inside the namespace.
    pub guest: TcpStream,
    /// The client address the guest side was opened from, when the agent
    /// opened it transparently (its reply rule is released at the end).
    pub transparent_client: Option<std::net::SocketAddrV4>,
    /// The guest endpoint the connection must reach (checked once
    /// connected).
    pub expected_peer: Option<std::net::SocketAddr>,
    connected: bool,
    host_ready: Ready,
    guest_ready: Ready,
    up: Half,
    down: Half,
}

impl SpliceFlow {
    /// Joins an accepted host socket with the agent's in-progress guest
    /// socket.
    pub fn new(host: TcpStream, guest: OwnedFd) -> io::Result<Self> {
        let guest = TcpStream::from_std(std::net::TcpStream::from(guest));
        let _ = host.set_nodelay(true);
        let _ = guest.set_nodelay(true);
        Ok(Self {
            host,
            guest,
            transparent_client: None,
            expected_peer: None,
            connected: false,
            host_ready: Ready { r: true, w: true },
            guest_ready: Ready::default(),
            up: Half::new()?,
            down: Half::new()?,
        })
    }

    /// Records readiness of the host socket.
    pub fn host_event(&mut self, r: bool, w: bool) {
        self.host_ready.r |= r;
        self.host_ready.w |= w;
    }

    /// Records readiness of the guest socket.
    pub fn guest_event(&mut self, r: bool, w: bool) {
        self.guest_ready.r |= r;
        self.guest_ready.w |= w;
    }

    /// Bytes moved host → guest and guest → host.
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    /// Moves what can be moved now.
    pub fn service(&mut self) -> SpliceStep {
        if !self.connected {
            if !self.guest_ready.w && !self.guest_ready.r {
                return SpliceStep::Keep;
            }
            match self.guest.take_error() {
                Ok(None) => match self.guest.peer_addr() {
                    Ok(p) if self.expected_peer.is_some_and(|e| e != p) => return self.reset(),
                    Ok(_) => self.connected = true,
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        self.guest_ready = Ready::default();
                        return SpliceStep::Keep;
                    }
                    Err(_) => return self.reset(),
                },
                // Refused or unreachable in the namespace: the client sees
                // a reset, as it would from the server itself.
                _ => return self.reset(),
            }
        }
        let up = pump(
            &mut self.up,
            &self.host,
            &mut self.host_ready.r,
            &self.guest,
            &mut self.guest_ready.w,
        );
        let down = pump(
            &mut self.down,
            &self.guest,
            &mut self.guest_ready.r,
            &self.host,
            &mut self.host_ready.w,
        );
        if up.is_err() || down.is_err() {
            return self.reset();
        }
        if self.up.shut && self.down.shut {
            SpliceStep::Done
        } else {
            SpliceStep::Keep
        }
    }

    fn reset(&mut self) -> SpliceStep {
        for s in [&self.host, &self.guest] {
            let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        SpliceStep::Done
    }
}

/// One pass over one direction; Err means reset both sides.
fn pump(
    h: &mut Half,
    src: &TcpStream,
    src_r: &mut bool,
    dst: &TcpStream,
    dst_w: &mut bool,
) -> Result<(), Errno> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        let mut progress = false;
        if h.queued > 0 && *dst_w {
            match splice(&h.pipe_r, None, dst.as_fd(), None, h.queued, flags) {
                Ok(n) => {
                    h.queued -= n;
                    h.bytes += n as u64;
                    progress = n > 0;
                }
                Err(Errno::EAGAIN) => *dst_w = false,
                Err(Errno::EINTR) => progress = true,
                Err(e) => return Err(e),
            }
        }
        if !h.eof && *src_r && h.queued < CHUNK {
            match splice(src.as_fd(), None, &h.pipe_w, None, CHUNK, flags) {
                Ok(0) => {
                    h.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    h.queued += n;
                    progress = true;
                }
                // EAGAIN here means either the socket is drained or the
                // pipe is full; a full pipe is drained above first.
                Err(Errno::EAGAIN) => {
                    if h.queued == 0 {
                        *src_r = false;
                    }
                }
                Err(Errno::EINTR) => progress = true,
                Err(e) => return Err(e),
            }
        }
        if h.eof && h.queued == 0 && !h.shut {
            let _ = dst.shutdown(Shutdown::Write);
            h.shut = true;
        }
        if !progress {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
    use std::os::fd::OwnedFd;

    fn connecting_to(server: SocketAddrV4) -> OwnedFd {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        s.set_nonblocking(true).expect("nonblocking");
        match s.connect(&SocketAddr::V4(server).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => panic!("connect: {e}"),
        }
        s.into()
    }

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => panic!("IPv4 expected"),
        }
    }

    #[test]
    fn only_the_socket_asked_for_passes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = v4(listener.local_addr().expect("addr"));
        let other = TcpListener::bind("127.0.0.1:0").expect("listen");
        let elsewhere = v4(other.local_addr().expect("addr"));

        let good = connecting_to(server);
        let local = v4(socket2::SockRef::from(&good)
            .local_addr()
            .expect("local")
            .as_socket()
            .expect("inet"));
        assert_eq!(check_guest_socket(&good, None, server), Ok(()));
        assert_eq!(check_guest_socket(&good, Some(local), server), Ok(()));
        let fl = fcntl(&good, FcntlArg::F_GETFL).expect("F_GETFL");
        assert_ne!(fl & libc::O_NONBLOCK, 0);

        assert_eq!(
            check_guest_socket(&good, None, elsewhere),
            Err(BadSocket::WrongPeer)
        );
        let wrong_local = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), local.port());
        assert_eq!(
            check_guest_socket(&good, Some(wrong_local), server),
            Err(BadSocket::WrongLocal)
        );

        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert_eq!(
            check_guest_socket(&r, None, server),
            Err(BadSocket::NotASocket)
        );
        let udp: OwnedFd = UdpSocket::bind("127.0.0.1:0").expect("udp").into();
        assert_eq!(
            check_guest_socket(&udp, None, server),
            Err(BadSocket::NotTcp4)
        );
        let listening: OwnedFd = TcpListener::bind("127.0.0.1:0").expect("listen").into();
        assert_eq!(
            check_guest_socket(&listening, None, server),
            Err(BadSocket::Listening)
        );
        let v6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(v6) = v6 {
            let v6: OwnedFd = v6.into();
            assert_eq!(
                check_guest_socket(&v6, None, server),
                Err(BadSocket::NotTcp4)
            );
        }
        let unconnected: OwnedFd = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket")
        .into();
        assert_eq!(
            check_guest_socket(&unconnected, None, server),
            Err(BadSocket::WrongPeer)
        );
    }
}
