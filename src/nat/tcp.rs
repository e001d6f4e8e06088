//! TCP flows: a smoltcp socket facing the guest, a kernel socket facing the
//! host, and the bytes between them.
//!
//! # Theory of operation
//!
//! When the guest sends a SYN to `dst`, the engine opens a non-blocking host
//! socket towards the routed destination and creates a smoltcp socket that
//! listens on exactly `dst` with its SYN-ACK paused, *before* the SYN reaches
//! the interface (otherwise smoltcp would answer RST). The guest's handshake
//! completes only when the host connect does: refused becomes RST, an
//! unreachable host becomes ICMP unreachable.
//!
//! Once open, bytes move inside smoltcp's `send`/`recv` closures straight
//! between the socket rings and the host socket; when the host cannot take
//! more, the bytes stay in smoltcp and the advertised window closes, so the
//! guest is slowed down instead of data being dropped. Half-closes travel
//! both ways (guest FIN → `shutdown(SHUT_WR)` on the host, host EOF →
//! `close()` on the smoltcp socket), and a reset on either side aborts the
//! other.
//!
//! | phase      | guest side (smoltcp)        | host side              |
//! |------------|-----------------------------|------------------------|
//! | Connecting | SYN-RECEIVED, SYN-ACK held  | connect in progress    |
//! | Open       | any synchronized state      | connected              |

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration as StdDuration;

use mio::net::TcpStream;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Icmpv4DstUnreachable, IpListenEndpoint};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::stack::Stack;
use crate::tap::TapTx;

/// Guest-side receive buffer per flow. Pages are touched only as data
/// flows, so an idle flow costs little resident memory.
const RX_BUF: usize = 1 << 20;
/// Guest-side transmit buffer per flow.
const TX_BUF: usize = 1 << 20;

/// Key of a TCP flow: (guest endpoint, destination the guest dialled).
pub type TcpKey = (SocketAddr, SocketAddr);

/// How far the host side has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Non-blocking connect in progress; the guest's SYN-ACK is held.
    Connecting,
    /// Connected; bytes flow.
    Open,
}

/// What the engine should do with a flow after servicing it.
#[derive(Debug)]
pub enum Step {
    /// Keep the flow.
    Keep,
    /// The flow is finished; remove it.
    Remove,
    /// The host connect failed with this error; the guest has not been told.
    ConnectFailed(io::Error),
}

/// One guest TCP connection and its host socket.
pub struct TcpFlow {
    /// Guest endpoint and dialled destination.
    pub key: TcpKey,
    /// Where the host socket connects.
    pub target: SocketAddr,
    /// The one-socket set this flow's segments are processed with.
    pub sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// The host socket.
    pub host: TcpStream,
    phase: Phase,
    host_readable: bool,
    host_writable: bool,
    /// The host sent EOF (or failed); the guest side was closed.
    host_eof: bool,
    /// The guest's FIN was passed on with shutdown(SHUT_WR).
    host_shut_wr: bool,
    /// The first bytes of the guest's SYN, quoted in an ICMP error.
    syn_quote: [u8; 60],
    syn_len: usize,
    /// Bytes queued in the smoltcp buffers when last accounted (engine's
    /// buffer ceiling).
    pub queued: usize,
    /// Counted among the half-open flows (engine's limit).
    pub half_open: bool,
    /// The guest's real MSS when its SYN was rewritten for large segments
    /// ([`crate::stack::rewrite_syn_mss`]).
    pub guest_mss: Option<u16>,
}

impl TcpFlow {
    /// Starts a flow for a guest SYN (`syn_ip` is its IP packet): opens the
    /// host connect to `target` and a paused smoltcp listener on `key.1`.
    pub fn open(
        key: TcpKey,
        target: SocketAddr,
        bind: Option<std::net::IpAddr>,
        syn_ip: &[u8],
    ) -> io::Result<Self> {
        let host = connect(target, bind)?;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; RX_BUF]),
            tcp::SocketBuffer::new(vec![0u8; TX_BUF]),
        );
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        sock.set_timeout(Some(Duration::from_secs(120)));
        sock.pause_synack(true);
        let ep = IpListenEndpoint {
            addr: Some(key.1.ip().into()),
            port: key.1.port(),
        };
        sock.listen(ep).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("listen {ep}: {e}"))
        })?;
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(sock);
        let mut syn_quote = [0u8; 60];
        let syn_len = syn_ip.len().min(syn_quote.len());
        syn_quote[..syn_len].copy_from_slice(&syn_ip[..syn_len]);
        Ok(Self {
            key,
            target,
            sockets,
            handle,
            host,
            phase: Phase::Connecting,
            host_readable: false,
            host_writable: false,
            host_eof: false,
            host_shut_wr: false,
            syn_quote,
            syn_len,
            queued: 0,
            half_open: false,
            guest_mss: None,
        })
    }

    /// A flow for a connection accepted on a published port: the smoltcp
    /// socket connects to `key.0` (the guest server) from `key.1` (the
    /// client as the guest should see it), and the host side is `host`.
    pub fn inbound(
        key: TcpKey,
        host: TcpStream,
        peer: SocketAddr,
        iface: &mut smoltcp::iface::Interface,
    ) -> io::Result<Self> {
        let _ = host.set_nodelay(true);
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; RX_BUF]),
            tcp::SocketBuffer::new(vec![0u8; TX_BUF]),
        );
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        sock.set_timeout(Some(Duration::from_secs(120)));
        let remote = smoltcp::wire::IpEndpoint::new(key.0.ip().into(), key.0.port());
        let local = IpListenEndpoint {
            addr: Some(key.1.ip().into()),
            port: key.1.port(),
        };
        sock.connect(iface.context(), remote, local).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("connect {remote} from {local}: {e}"),
            )
        })?;
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(sock);
        Ok(Self {
            key,
            target: peer,
            sockets,
            handle,
            host,
            phase: Phase::Open,
            host_readable: true,
            host_writable: true,
            host_eof: false,
            host_shut_wr: false,
            syn_quote: [0; 60],
            syn_len: 0,
            queued: 0,
            half_open: false,
            guest_mss: None,
        })
    }

    /// Replaces the host socket with a connect to another target (DNS
    /// failover); the guest keeps waiting for its SYN-ACK.
    pub fn retarget(&mut self, target: SocketAddr) -> io::Result<()> {
        self.host = connect(target, None)?;
        self.target = target;
        self.phase = Phase::Connecting;
        self.host_readable = false;
        self.host_writable = false;
        Ok(())
    }

    /// Whether the host connect is still in progress.
    pub fn connecting(&self) -> bool {
        self.phase == Phase::Connecting
    }

    /// Bytes held in the guest-side buffers right now.
    pub fn queue_len(&self) -> usize {
        let s = self.sockets.get::<tcp::Socket>(self.handle);
        s.send_queue() + s.recv_queue()
    }

    /// The guest side's TCP state.
    pub fn state(&self) -> State {
        self.sockets.get::<tcp::Socket>(self.handle).state()
    }

    /// The guest's SYN as far as an ICMP error quotes it.
    pub fn syn_quote(&self) -> &[u8] {
        &self.syn_quote[..self.syn_len]
    }

    /// Records readiness reported for the host socket.
    pub fn host_ready(&mut self, readable: bool, writable: bool) {
        self.host_readable |= readable;
        self.host_writable |= writable;
    }

    /// Lets the guest side transmit (SYN-ACK, data, ACKs, FIN, RST).
    pub fn egress(&mut self, stack: &mut Stack, now: Instant, tx: TapTx<'_>) {
        stack.egress(now, tx, &mut self.sockets, self.guest_mss);
    }

    /// When smoltcp next needs this flow serviced.
    pub fn poll_at(&self, stack: &mut Stack, now: Instant) -> Option<Instant> {
        stack.iface.poll_at(now, &self.sockets)
    }

    /// Resets the guest side (RST on the next egress).
    pub fn abort_guest(&mut self) {
        self.sockets.get_mut::<tcp::Socket>(self.handle).abort();
    }

    /// Advances the flow: finishes the connect, moves bytes both ways,
    /// passes on closes, and says whether the flow is done.
    ///
    /// With `may_read` false (the engine's buffer ceiling is reached), no
    /// more host data is taken in; the host's TCP window closes instead.
    pub fn service(&mut self, may_read: bool) -> Step {
        if self.phase == Phase::Connecting {
            match self.check_connect() {
                Ok(true) => {
                    self.phase = Phase::Open;
                    self.sockets
                        .get_mut::<tcp::Socket>(self.handle)
                        .pause_synack(false);
                }
                Ok(false) => {
                    // The guest may have given up (RST) while we wait.
                    let s = self.sockets.get::<tcp::Socket>(self.handle);
                    return if matches!(s.state(), State::Closed) {
                        Step::Remove
                    } else {
                        Step::Keep
                    };
                }
                Err(e) => return Step::ConnectFailed(e),
            }
        }
        let sock = self.sockets.get_mut::<tcp::Socket>(self.handle);
        let host = &self.host;

        // Host → guest: read straight into the socket's transmit ring.
        while may_read && self.host_readable && !self.host_eof && sock.may_send() && sock.can_send()
        {
            let r = sock.send(|buf| match (&*host).read(buf) {
                Ok(0) => (0, Ok(false)),
                Ok(n) => (n, Ok(true)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    self.host_eof = true;
                    sock.close();
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) | Err(_) => {
                    // Host reset or error: reset the guest too.
                    self.host_eof = true;
                    sock.abort();
                    break;
                }
            }
        }

        // Guest → host: write straight from the socket's receive ring.
        while self.host_writable && sock.can_recv() {
            let r = sock.recv(|buf| match (&*host).write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) | Err(_) => {
                    self.host_eof = true;
                    sock.abort();
                    break;
                }
            }
        }

        let state = sock.state();
        let guest_fin = matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        );
        if guest_fin && !sock.can_recv() && !self.host_shut_wr {
            let _ = host.shutdown(Shutdown::Write);
            self.host_shut_wr = true;
        }
        match state {
            State::Closed | State::TimeWait => {
                if !(self.host_eof && self.host_shut_wr) {
                    // The guest reset (or we gave up): reset the host side
                    // too instead of leaving it half-open.
                    let _ = SockRef::from(host).set_linger(Some(StdDuration::ZERO));
                }
                Step::Remove
            }
            _ => Step::Keep,
        }
    }

    /// Whether a non-blocking connect finished: Ok(true) connected,
    /// Ok(false) still pending, Err the failure.
    fn check_connect(&mut self) -> io::Result<bool> {
        if !self.host_writable && !self.host_readable {
            return Ok(false);
        }
        if let Some(e) = self.host.take_error()? {
            return Err(e);
        }
        match self.host.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.host_writable = false;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// How a failed host connect is reported to an IPv6 guest.
pub fn connect_error_reply6(e: &io::Error) -> Option<crate::stack::emit::Unreach6> {
    use crate::stack::emit::Unreach6;
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(Unreach6::NoRoute),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) => Some(Unreach6::Address),
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Unreach6::AdminProhibited),
        _ => None,
    }
}

/// How a failed host connect is reported to the guest.
pub fn connect_error_reply(e: &io::Error) -> Option<Icmpv4DstUnreachable> {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(Icmpv4DstUnreachable::NetUnreachable),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) => {
            Some(Icmpv4DstUnreachable::HostUnreachable)
        }
        Some(libc::EACCES) | Some(libc::EPERM) => Some(Icmpv4DstUnreachable::CommProhibited),
        // Refused and everything else: a reset.
        _ => None,
    }
}

/// A non-blocking connect to `target`, optionally from `bind` (an address
/// of `target`'s family; loopback targets included).
fn connect(target: SocketAddr, bind: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let domain = Domain::for_address(target);
    let s = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}
