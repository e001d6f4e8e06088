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
//!
//! # Ring memory
//!
//! smoltcp fixes a socket's buffer capacity (and with it the window scale it
//! announces) when the socket is made, and cannot swap buffers later. So
//! each ring is a [`RING_CAP`] anonymous mapping of rnet's own ([`RingMem`])
//! that smoltcp borrows, and what grows and shrinks is its *resident*
//! memory, tracked in [`CHUNK`]-sized chunks:
//!
//! - A fresh ring holds no pages. A chunk becomes resident when bytes are
//!   written into it: by rnet (host → guest, `send`), or by smoltcp when a
//!   guest segment lands (guest → host); the flow marks it when it sees the
//!   bytes. A flow that keeps moving data grows to the chunks its queue
//!   spans as the ring wraps, at most the whole ring.
//! - A chunk that holds no live bytes is given back with
//!   `madvise(MADV_DONTNEED)` once the flow has been drained for
//!   [`IDLE_RELEASE`] (both rings empty: an idle flow holds no ring memory
//!   at all), or at once while the engine's memory budget is under pressure.
//!   Live bytes are the transmit ring's unacknowledged data and the receive
//!   ring's contiguous data plus whatever out-of-order data the guest may
//!   have parked beyond it: the flow follows the guest's sequence numbers
//!   ([`TcpFlow::note_guest_segment`]) and keeps every chunk up to the
//!   furthest byte the guest has sent, so no byte smoltcp holds is lost.
//! - The engine sums the resident chunks of all flows against one global
//!   budget (`Limits::memory_budget`). At the budget, a flow may still fill
//!   chunks it already holds but takes no host data that needs a new one
//!   ([`TcpFlow::wants_memory`]): the host's TCP window closes instead. The
//!   engine keeps such flows on a list and services them again when the
//!   total falls below the low-water mark, since an edge-triggered host
//!   socket that was left unread would never report readiness again.
//! - Guest data is not asked: smoltcp has announced a window of the whole
//!   ring. Before each guest segment reaches smoltcp the flow takes the
//!   chunks its payload lands in from the budget
//!   ([`TcpFlow::take_rx_memory`]); past a hard ceiling a quarter above the
//!   budget the payload is cut off and only the segment's ACK and window
//!   reach smoltcp ([`strip_payload`]), so the guest sends those bytes again
//!   later. That costs the guest a retransmission timeout, which is why
//!   pausing host reads at the budget comes first: it frees memory as the
//!   guest reads.
//!
//! Design limits: the ring capacity (and so the window smoltcp announces)
//! stays 1 MiB; accounting is per 64 KiB chunk, so a flow with a few bytes
//! in flight counts one chunk per ring. Receive rings have no share of
//! their own: were they alone to fill the budget with bytes whose host
//! application will read only after it could send (an echo), host reads
//! would stay paused until the guest's flows time out. Cutting guest data
//! off earlier instead (tried: receive rings capped at half the budget)
//! made the guest's retransmission timers back off until flows stalled.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::ptr::NonNull;
use std::time::Duration as StdDuration;

use mio::net::TcpStream;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Icmpv4DstUnreachable, IpListenEndpoint};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::phy::tap::TapTx;
use crate::stack::Stack;

/// Capacity of each guest-side ring (receive and transmit) per flow; what
/// it costs in memory is only its resident chunks (see the module docs).
pub const RING_CAP: usize = 1 << 20;
/// Granularity of ring memory accounting and release.
pub const CHUNK: usize = 64 << 10;
/// Chunks per ring.
const CHUNKS: usize = RING_CAP / CHUNK;
/// How long a drained flow keeps its ring memory before giving it back
/// (a request/response flow reuses its pages instead of faulting them in
/// again for every message).
pub const IDLE_RELEASE: Duration = Duration::from_millis(1000);

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
    sockets: SocketSet<'static>,
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
    /// Ring memory of this flow in the engine's total when last accounted.
    accounted: usize,
    /// On the engine's list of flows paused by the memory budget.
    paused: bool,
    /// Counted among the half-open flows (engine's limit).
    half_open: bool,
    /// The guest's real MSS when its SYN was rewritten for large segments
    /// ([`crate::stack::rewrite_syn_mss`]).
    guest_mss: Option<u16>,
    /// The last service stopped taking host data for want of ring memory.
    wants_memory: bool,
    /// Ring offset just past the last byte written into the transmit ring.
    tx_end: usize,
    /// Ring offset of the next byte to read from the receive ring.
    rx_read: usize,
    /// Bytes taken from the receive ring so far (wrapping, as TCP sequence
    /// numbers do).
    rx_taken: u32,
    /// The guest's initial sequence number, from its SYN (or SYN-ACK).
    guest_isn: Option<u32>,
    /// Sequence number just past the furthest payload byte the guest sent.
    guest_hi: u32,
    /// A guest segment could not be parsed for its sequence numbers: the
    /// receive ring is never trimmed (out-of-order bytes may be anywhere).
    guest_seq_unknown: bool,
    /// When a drained flow gives its ring memory back.
    release_at: Option<Instant>,
    // The rings go last: fields drop in declaration order, and the socket
    // set above borrows them (see `RingMem::storage`).
    rx_mem: RingMem,
    tx_mem: RingMem,
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
        let (rx_mem, tx_mem) = (RingMem::new()?, RingMem::new()?);
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(rx_mem.storage()),
            tcp::SocketBuffer::new(tx_mem.storage()),
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
            accounted: 0,
            paused: false,
            half_open: false,
            guest_mss: None,
            wants_memory: false,
            tx_end: 0,
            rx_read: 0,
            rx_taken: 0,
            guest_isn: None,
            guest_hi: 0,
            guest_seq_unknown: false,
            release_at: None,
            rx_mem,
            tx_mem,
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
        let (rx_mem, tx_mem) = (RingMem::new()?, RingMem::new()?);
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(rx_mem.storage()),
            tcp::SocketBuffer::new(tx_mem.storage()),
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
            accounted: 0,
            paused: false,
            half_open: false,
            guest_mss: None,
            wants_memory: false,
            tx_end: 0,
            rx_read: 0,
            rx_taken: 0,
            guest_isn: None,
            guest_hi: 0,
            guest_seq_unknown: false,
            release_at: None,
            rx_mem,
            tx_mem,
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

    /// Ring memory resident for this flow (as far as rnet knows).
    pub fn resident(&self) -> usize {
        (self.rx_mem.chunks() + self.tx_mem.chunks()) * CHUNK
    }

    /// Whether the last service left host data unread for want of ring
    /// memory (the engine must service the flow again when memory frees).
    pub fn wants_memory(&self) -> bool {
        self.wants_memory
    }

    /// Follows the sequence numbers of a guest segment (`ip` is its IP
    /// packet) before smoltcp sees it, so that [`Self::trim`] knows how far
    /// out-of-order bytes may reach into the receive ring. A few header
    /// reads; no allocation.
    pub fn note_guest_segment(&mut self, ip: &[u8]) {
        let Some((seq, flags, payload)) = tcp_seq(ip) else {
            self.guest_seq_unknown = true;
            return;
        };
        let syn = flags & 0x02 != 0;
        if syn && self.guest_isn.is_none() {
            self.guest_isn = Some(seq);
            self.guest_hi = seq.wrapping_add(1);
        }
        if payload == 0 || self.guest_isn.is_none() {
            return;
        }
        let end = seq
            .wrapping_add(u32::from(syn))
            .wrapping_add(payload as u32);
        let ahead = end.wrapping_sub(self.rcv_nxt()) as i32;
        // smoltcp keeps nothing beyond its window, which the ring bounds.
        if ahead > 0 && ahead as usize <= RING_CAP && end.wrapping_sub(self.guest_hi) as i32 > 0 {
            self.guest_hi = end;
        }
    }

    /// Before smoltcp sees the guest segment `ip`: the receive ring chunks
    /// its payload lands in that are not resident yet are taken from `room`
    /// (and counted in [`Self::resident`] and [`Self::accounted`] from now
    /// on). Returns the bytes taken, or None when `room` is too small (the
    /// engine then cuts the payload off, see [`strip_payload`]).
    pub fn take_rx_memory(&mut self, ip: &[u8], room: usize) -> Option<usize> {
        let new = self.rx_chunks_needed(ip);
        let bytes = new.count_ones() as usize * CHUNK;
        if bytes > room {
            return None;
        }
        self.rx_mem.touched |= new;
        self.accounted += bytes;
        Some(bytes)
    }

    /// Ring memory of this flow in the engine's total.
    pub fn accounted(&self) -> usize {
        self.accounted
    }

    /// Brings this flow's share of the engine's total up to date with
    /// [`Self::resident`]; returns (the share before, the share now).
    pub fn reaccount(&mut self) -> (usize, usize) {
        let before = self.accounted;
        self.accounted = self.resident();
        (before, self.accounted)
    }

    /// True once when the flow must go on the engine's paused list: host
    /// data was left unread for want of memory and it is not there yet.
    pub fn pause_for_memory(&mut self) -> bool {
        if self.wants_memory && !self.paused {
            self.paused = true;
            return true;
        }
        false
    }

    /// Taken off the engine's paused list.
    pub fn resume(&mut self) {
        self.paused = false;
    }

    /// Counts the flow among the engine's half-open flows (its host
    /// connect is in progress).
    pub fn count_half_open(&mut self) {
        self.half_open = true;
    }

    /// Whether the flow is counted among the half-open flows.
    pub fn is_half_open(&self) -> bool {
        self.half_open
    }

    /// True once when the host connect has finished while the flow was
    /// counted half-open: the engine lowers its count.
    pub fn settle_half_open(&mut self) -> bool {
        if self.half_open && !self.connecting() {
            self.half_open = false;
            return true;
        }
        false
    }

    /// Keeps the guest's real MSS when rnet rewrote its SYN (or SYN-ACK)
    /// for large segments; None leaves what is known.
    pub fn set_guest_mss(&mut self, mss: Option<u16>) {
        if mss.is_some() {
            self.guest_mss = mss;
        }
    }

    /// Feeds a guest frame of this flow to smoltcp with the flow's socket.
    pub fn ingress(&mut self, stack: &mut Stack, now: Instant, frame: &[u8], tx: TapTx<'_>) {
        stack.ingress(now, frame, tx, &mut self.sockets);
    }

    /// The chunks not yet resident that the payload of `ip` would land in.
    fn rx_chunks_needed(&self, ip: &[u8]) -> u64 {
        let (Some((seq, flags, payload)), Some(_)) = (tcp_seq(ip), self.guest_isn) else {
            return 0;
        };
        if payload == 0 || self.rx_mem.touched == u64::MAX >> (64 - CHUNKS) {
            return 0;
        }
        let start = seq.wrapping_add(u32::from(flags & 0x02 != 0));
        let from = start.wrapping_sub(self.rcv_nxt()) as i32;
        let to = from.saturating_add(payload as i32);
        if to <= 0 {
            return 0; // old bytes again: smoltcp writes nothing
        }
        let q = self.sockets.get::<tcp::Socket>(self.handle).recv_queue();
        let write_at = (self.rx_read + q) % RING_CAP;
        let from = from.max(0) as usize;
        let len = (to as usize - from).min(RING_CAP);
        span((write_at + from.min(RING_CAP)) % RING_CAP, len) & !self.rx_mem.touched
    }

    /// The next sequence number smoltcp expects from the guest.
    fn rcv_nxt(&self) -> u32 {
        let q = self.sockets.get::<tcp::Socket>(self.handle).recv_queue();
        self.guest_isn
            .unwrap_or(0)
            .wrapping_add(1)
            .wrapping_add(self.rx_taken)
            .wrapping_add(q as u32)
    }

    /// How far past the contiguous received bytes smoltcp may hold
    /// out-of-order guest data.
    fn rx_pending(&self) -> usize {
        if self.guest_seq_unknown {
            return RING_CAP;
        }
        if self.guest_isn.is_none() {
            return 0;
        }
        let ahead = self.guest_hi.wrapping_sub(self.rcv_nxt()) as i32;
        (ahead.max(0) as usize).min(RING_CAP)
    }

    /// Chunks that hold live bytes: (receive ring, transmit ring).
    fn live(&self) -> (u64, u64) {
        let s = self.sockets.get::<tcp::Socket>(self.handle);
        let (qr, qt) = (s.recv_queue(), s.send_queue());
        let rx = span(self.rx_read, qr + self.rx_pending());
        let tx = span((self.tx_end + RING_CAP - qt % RING_CAP) % RING_CAP, qt);
        (rx, tx)
    }

    /// Gives back ring memory that holds no live bytes: at once under
    /// `pressure` (the engine's budget is near), else once the flow has
    /// been drained for [`IDLE_RELEASE`]. Returns when to look again.
    pub fn trim(&mut self, now: Instant, pressure: bool) -> Option<Instant> {
        let (rx_live, tx_live) = self.live();
        let spare_rx = self.rx_mem.touched & !rx_live;
        let spare_tx = self.tx_mem.touched & !tx_live;
        if spare_rx | spare_tx == 0 {
            self.release_at = None;
            return None;
        }
        let drained = rx_live | tx_live == 0;
        let due = match self.release_at {
            _ if pressure => true,
            _ if !drained => {
                self.release_at = None;
                return None;
            }
            Some(at) => now >= at,
            None => {
                let at = now + IDLE_RELEASE;
                self.release_at = Some(at);
                return Some(at);
            }
        };
        if !due {
            return self.release_at;
        }
        self.release_at = None;
        self.rx_mem.release(spare_rx);
        self.tx_mem.release(spare_tx);
        None
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
    /// `room` is the ring memory the engine's budget still allows; host
    /// data that would need more (a chunk not yet resident) is left unread
    /// and [`Self::wants_memory`] says so. New chunks taken are subtracted.
    pub fn service(&mut self, room: &mut usize) -> Step {
        self.wants_memory = false;
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
        // Guest bytes smoltcp put in the receive ring since the last visit.
        let (rx_live, _) = self.live();
        let grown = (rx_live & !self.rx_mem.touched).count_ones() as usize;
        self.rx_mem.touched |= rx_live;
        *room = room.saturating_sub(grown * CHUNK);

        let sock = self.sockets.get_mut::<tcp::Socket>(self.handle);
        let host = &self.host;

        // Host → guest: read straight into the socket's transmit ring, as
        // far as resident chunks and the budget's room allow.
        while self.host_readable && !self.host_eof && sock.may_send() && sock.can_send() {
            let tx_mem = &mut self.tx_mem;
            let tx_end = &mut self.tx_end;
            let room = &mut *room;
            let r = sock.send(|buf| {
                let off = tx_mem.offset_of(buf.as_ptr());
                let n = writable(tx_mem.touched, off, buf.len(), *room);
                if n == 0 {
                    return (0, Ok(None));
                }
                match (&*host).read(&mut buf[..n]) {
                    Ok(0) => (0, Ok(Some(false))),
                    Ok(k) => {
                        let new = span(off, k) & !tx_mem.touched;
                        tx_mem.touched |= new;
                        *room = room.saturating_sub(new.count_ones() as usize * CHUNK);
                        *tx_end = (off + k) % RING_CAP;
                        (k, Ok(Some(true)))
                    }
                    Err(e) => (0, Err(e)),
                }
            });
            match r {
                Ok(Ok(None)) => {
                    self.wants_memory = true;
                    break;
                }
                Ok(Ok(Some(true))) => {}
                Ok(Ok(Some(false))) => {
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
            let rx_mem = &self.rx_mem;
            let (rx_read, rx_taken) = (&mut self.rx_read, &mut self.rx_taken);
            let r = sock.recv(|buf| match (&*host).write(buf) {
                Ok(n) => {
                    *rx_read = (rx_mem.offset_of(buf.as_ptr()) + n) % RING_CAP;
                    *rx_taken = rx_taken.wrapping_add(n as u32);
                    (n, Ok(n))
                }
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
pub fn connect_error_reply6(e: &io::Error) -> Option<crate::wire::emit::Unreach6> {
    use crate::wire::emit::Unreach6;
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

/// One ring's storage: a private anonymous mapping of [`RING_CAP`] bytes
/// that smoltcp's `SocketBuffer` borrows, with the chunks that may be
/// resident (written since they were last given back).
struct RingMem {
    base: NonNull<u8>,
    /// Bit `i`: chunk `i` may hold resident pages.
    touched: u64,
}

const _: () = assert!(CHUNKS <= 64 && RING_CAP % CHUNK == 0);

// SAFETY: a RingMem owns its mapping exclusively (like a Box<[u8]>); the
// flow that holds it moves between threads only as a whole, with the socket
// borrowing the mapping.
unsafe impl Send for RingMem {}

impl RingMem {
    /// Maps a ring; no page is resident until written.
    fn new() -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. NORESERVE: the budget, not overcommit accounting, bounds
        // what becomes resident.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_CAP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Self { base, touched: 0 })
    }

    /// The whole ring as the slice smoltcp works on.
    ///
    /// The slice claims `'static`; it lives as long as this mapping, which
    /// [`TcpFlow`] drops only after the socket set holding the slice
    /// (fields drop in declaration order, and the set never leaves the flow).
    fn storage(&self) -> &'static mut [u8] {
        // SAFETY: the mapping is RING_CAP bytes, readable and writable, and
        // handed out once (each RingMem backs exactly one SocketBuffer); see
        // above for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), RING_CAP) }
    }

    /// Ring offset of a slice smoltcp handed to a `send`/`recv` closure.
    fn offset_of(&self, p: *const u8) -> usize {
        (p as usize).wrapping_sub(self.base.as_ptr() as usize) % RING_CAP
    }

    /// Chunks resident (as far as rnet knows).
    fn chunks(&self) -> usize {
        self.touched.count_ones() as usize
    }

    /// Gives back the pages of the chunks in `mask` (which must hold no live
    /// bytes); returns how many chunks were released.
    fn release(&mut self, mask: u64) -> usize {
        let mut m = mask & self.touched;
        let n = m.count_ones() as usize;
        while m != 0 {
            let first = m.trailing_zeros() as usize;
            let run = (m >> first).trailing_ones() as usize;
            // SAFETY: the range lies inside the mapping; the chunks hold no
            // byte smoltcp will read before writing it again (the caller's
            // live-byte rule), and nothing borrows the ring during the call
            // (one thread; no smoltcp call is in progress). DONTNEED on a
            // private anonymous mapping makes the pages read as zero again.
            unsafe {
                libc::madvise(
                    self.base.as_ptr().add(first * CHUNK).cast(),
                    run * CHUNK,
                    libc::MADV_DONTNEED,
                );
            }
            m &= !(u64::MAX >> (64 - run) << first);
        }
        self.touched &= !mask;
        n
    }
}

impl Drop for RingMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the socket that
        // borrowed it is gone (see `storage`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), RING_CAP);
        }
    }
}

/// How many of the `len` bytes from ring offset `off` may be written: all
/// that fall in chunks already resident (`touched`), plus as many new
/// chunks as `room` allows.
fn writable(touched: u64, off: usize, len: usize, room: usize) -> usize {
    let mut n = 0;
    let mut left = room;
    let mut pos = off;
    while n < len {
        let c = pos / CHUNK;
        let in_chunk = ((c + 1) * CHUNK - pos).min(len - n);
        if touched & (1 << (c % CHUNKS)) == 0 {
            if left < CHUNK {
                break;
            }
            left -= CHUNK;
        }
        n += in_chunk;
        pos += in_chunk;
    }
    n
}

/// Cuts the payload off the guest TCP segment in the IP packet `ip`, so
/// that smoltcp takes its acknowledgement and window but no data (the
/// guest sends the bytes again, as after a loss); a FIN goes with the
/// payload it followed. Returns the new length of the IP packet, or None
/// (unchanged) if `ip` is not such a segment.
pub fn strip_payload(ip: &mut [u8]) -> Option<usize> {
    use smoltcp::wire::{IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket};
    let (hlen, total) = match ip.first()? >> 4 {
        4 => (
            usize::from(ip[0] & 0x0f) * 4,
            usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
        ),
        6 if *ip.get(6)? == 6 => (40, 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))),
        _ => return None,
    };
    let doff = usize::from(ip.get(hlen + 12)? >> 4) * 4;
    let new = hlen + doff;
    if doff < 20 || new > total.min(ip.len()) {
        return None;
    }
    ip[hlen + 13] &= !0x09; // FIN, PSH
    let (src, dst): (IpAddress, IpAddress) = if hlen == 40 {
        let mut p = Ipv6Packet::new_unchecked(&mut ip[..new]);
        p.set_payload_len(doff as u16);
        (p.src_addr().into(), p.dst_addr().into())
    } else {
        let mut p = Ipv4Packet::new_unchecked(&mut ip[..new]);
        p.set_total_len(new as u16);
        p.fill_checksum();
        (p.src_addr().into(), p.dst_addr().into())
    };
    TcpPacket::new_unchecked(&mut ip[hlen..new]).fill_checksum(&src, &dst);
    Some(new)
}

/// Sequence number, flags and payload length of the TCP segment in the IP
/// packet `ip` (no IPv6 extension headers).
fn tcp_seq(ip: &[u8]) -> Option<(u32, u8, usize)> {
    let (hlen, total) = match ip.first()? >> 4 {
        4 => {
            let declared = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]);
            (usize::from(ip[0] & 0x0f) * 4, usize::from(declared))
        }
        6 if *ip.get(6)? == 6 => {
            let declared = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (
                40,
                if declared == 0 {
                    ip.len()
                } else {
                    40 + declared
                },
            )
        }
        _ => return None,
    };
    let tcp = ip.get(hlen..total.min(ip.len()))?;
    if tcp.len() < 20 {
        return None;
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some((seq, tcp[13], tcp.len().checked_sub(doff)?))
}

/// The chunks covering ring offsets `[start, start + len)`, wrapping.
fn span(start: usize, len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    if len >= RING_CAP {
        return u64::MAX >> (64 - CHUNKS);
    }
    let first = start / CHUNK;
    let last = (start + len - 1) / CHUNK;
    let mut m = 0u64;
    for c in first..=last {
        m |= 1 << (c % CHUNKS);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_covers_and_wraps() {
        assert_eq!(span(0, 0), 0);
        assert_eq!(span(0, 1), 1);
        assert_eq!(span(CHUNK - 1, 2), 0b11);
        assert_eq!(span(RING_CAP - 1, 2), 1 | 1 << (CHUNKS - 1));
        assert_eq!(span(5, RING_CAP), (1u64 << CHUNKS) - 1);
        assert_eq!(span(3 * CHUNK, CHUNK), 1 << 3);
    }

    #[test]
    fn strip_payload_keeps_a_valid_ack() {
        use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};
        let mut ip = vec![0u8; 20 + 20 + 100];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&140u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 2, 100]);
        ip[16..20].copy_from_slice(&[10, 0, 2, 2]);
        ip[20 + 4..20 + 8].copy_from_slice(&1000u32.to_be_bytes());
        ip[20 + 12] = 5 << 4;
        ip[20 + 13] = 0x19; // ACK PSH FIN
        assert_eq!(tcp_seq(&ip), Some((1000, 0x19, 100)));
        let n = strip_payload(&mut ip).unwrap();
        assert_eq!(n, 40);
        let p = Ipv4Packet::new_checked(&ip[..n]).unwrap();
        assert!(p.verify_checksum());
        let (s, d): (IpAddress, IpAddress) = (p.src_addr().into(), p.dst_addr().into());
        let t = TcpPacket::new_checked(&ip[20..n]).unwrap();
        assert!(t.verify_checksum(&s, &d));
        assert!(t.ack() && !t.fin() && !t.psh());
        assert_eq!(tcp_seq(&ip[..n]), Some((1000, 0x10, 0)));
    }

    #[test]
    fn release_returns_pages() {
        let mut r = RingMem::new().unwrap();
        let s = r.storage();
        s[CHUNK * 2] = 7;
        s[CHUNK * 5 + 9] = 9;
        r.touched |= span(CHUNK * 2, 1) | span(CHUNK * 5 + 9, 1);
        assert_eq!(r.chunks(), 2);
        assert_eq!(r.release(1 << 2), 1);
        assert_eq!(s[CHUNK * 2], 0, "a released chunk reads as zero");
        assert_eq!(s[CHUNK * 5 + 9], 9, "other chunks keep their bytes");
        assert_eq!(r.chunks(), 1);
    }
}
