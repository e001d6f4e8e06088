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
//! each ring is a [`RING_CAP`] anonymous mapping of rnet's own (`RingMem`)
//! that smoltcp borrows, and what grows and shrinks is its *resident*
//! memory, tracked in [`CHUNK`]-sized chunks (a closed flow's rings go to a
//! small pool of mappings with their pages given back, [`pool`], so a short
//! connection neither maps nor unmaps):
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

mod host;
mod pool;
mod ring;
mod segment;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration as StdDuration;

use mio::net::TcpStream;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpListenEndpoint;
use socket2::SockRef;

use crate::phy::tap::TapTx;
use crate::stack::Stack;

use host::connect;
pub use host::{connect_error_reply, connect_error_reply6};
use ring::{RingMem, span, writable};
pub use segment::strip_payload;
use segment::tcp_seq;

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
    /// The connect was looked at before any host event (see
    /// `check_connect`).
    probed: bool,
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
            probed: false,
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
            probed: false,
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
        self.probed = false;
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
        if self.phase == Phase::Connecting
            && let Some(step) = self.finish_connect()
        {
            return step;
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
            // Both sides closed (TIME-WAIT after the host's EOF): the flow
            // is removed in this pass and its close sends the FIN, as the
            // host's receive queue is empty; one syscall less per short
            // connection.
            if !(state == State::TimeWait && self.host_eof) {
                let _ = host.shutdown(Shutdown::Write);
            }
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

    /// While connecting: once the host connect is done, opens the flow and
    /// releases the guest's SYN-ACK (None: service goes on); otherwise the
    /// step to return now.
    fn finish_connect(&mut self) -> Option<Step> {
        match self.check_connect() {
            Ok(true) => {
                self.phase = Phase::Open;
                self.sockets
                    .get_mut::<tcp::Socket>(self.handle)
                    .pause_synack(false);
                None
            }
            Ok(false) => {
                // The guest may have given up (RST) while we wait.
                let s = self.sockets.get::<tcp::Socket>(self.handle);
                Some(if matches!(s.state(), State::Closed) {
                    Step::Remove
                } else {
                    Step::Keep
                })
            }
            Err(e) => Some(Step::ConnectFailed(e)),
        }
    }

    /// Whether a non-blocking connect finished: Ok(true) connected,
    /// Ok(false) still pending, Err the failure.
    fn check_connect(&mut self) -> io::Result<bool> {
        if !self.host_writable && !self.host_readable {
            // Once, before any event: a loopback connect is often done by
            // the time connect() returns, and then the SYN-ACK leaves in
            // the pass that saw the guest's SYN, not a loop pass later.
            if self.probed {
                return Ok(false);
            }
            self.probed = true;
            let done = self.host.peer_addr().is_ok();
            // Connected with an empty send queue: writable (a write that
            // finds it otherwise clears this and waits for the event).
            self.host_writable = done;
            return Ok(done);
        }
        if let Some(e) = self.host.take_error()? {
            return Err(e);
        }
        if self.host_writable {
            // A connecting TCP socket reports writable only once the
            // handshake is done (or failed, which `take_error` saw): no
            // getpeername needed.
            return Ok(true);
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
