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

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use socket2::SockRef;

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
