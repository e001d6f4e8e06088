//! Batched UDP I/O on host sockets: one system call for many datagrams.
//!
//! Three kernel features, each detected on first use and left alone
//! (logged once at debug level) where the kernel refuses it:
//!
//! - `recvmmsg`: [`RecvBatch`] drains up to [`BATCH`] datagrams from a
//!   socket in one call;
//! - `UDP_GRO` ([`enable_gro`]): one received message may be a train of
//!   same-flow datagrams of one size (the control message gives it), up to
//!   64 KiB in all;
//! - `UDP_SEGMENT` ([`send_segments`]): consecutive same-size datagrams to
//!   one destination leave in one `sendmsg`, the kernel cutting them apart.
//!
//! [`GsoBatch`] collects the guest's consecutive datagrams of one flow so
//! they can leave that way (a guest's UDP-tunnel super-frames are cut into
//! such trains by [`crate::phy::tunnel`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::SockAddr;
use tracing::debug;

/// `UDP_SEGMENT` (linux/udp.h): the segment size of a GSO send.
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced trains.
pub const UDP_GRO: libc::c_int = 104;
/// Datagrams one `recvmmsg` takes at most.
pub const BATCH: usize = 32;
/// Largest UDP payload of one message (an IPv4 datagram's limit).
pub const MAX_PAYLOAD: usize = 65507;
/// Segments one `UDP_SEGMENT` send may carry (the kernel's older limit).
pub const MAX_SEGMENTS: usize = 64;

/// `UDP_SEGMENT` refused once: never tried again.
static NO_GSO: AtomicBool = AtomicBool::new(false);
/// `UDP_GRO` refused once: never tried again.
static NO_GRO: AtomicBool = AtomicBool::new(false);

/// Asks for coalesced receives on `fd`; false (logged once) where the kernel
/// has no `UDP_GRO`.
pub fn enable_gro(fd: BorrowedFd<'_>) -> bool {
    if NO_GRO.load(Ordering::Relaxed) {
        return false;
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one C int from `one`, alive for the call, on
    // a descriptor the caller owns.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        if !NO_GRO.swap(true, Ordering::Relaxed) {
            debug!(error = %io::Error::last_os_error(), "UDP_GRO unavailable; receiving datagram by datagram");
        }
        return false;
    }
    true
}

/// Whether `UDP_SEGMENT` sends are still tried.
pub fn gso_available() -> bool {
    !NO_GSO.load(Ordering::Relaxed)
}

/// What the batched paths did, for `rnet status --json` (`udp_io`) and
/// for tests that check batching happened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Send system calls for guest datagrams.
    pub sends: u64,
    /// Of which `UDP_SEGMENT` sends carrying several datagrams.
    pub gso_sends: u64,
    /// Guest datagrams sent.
    pub datagrams_out: u64,
    /// USO super-frames from the guest forwarded.
    pub uso_in: u64,
    /// USO super-frames from the guest dropped as malformed.
    pub uso_in_bad: u64,
    /// `recvmmsg` calls that returned datagrams.
    pub recv_calls: u64,
    /// Datagrams received for the guest.
    pub datagrams_in: u64,
    /// USO super-frames written to the guest.
    pub uso_out: u64,
    /// Datagrams those carried.
    pub uso_out_datagrams: u64,
}

impl Counters {
    /// Accounts one [`send_segments`] of `datagrams`.
    pub fn note_send(&mut self, s: Sent, datagrams: usize) {
        self.sends += s.calls;
        self.gso_sends += s.gso;
        self.datagrams_out += datagrams as u64;
    }

    /// The counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sends": self.sends,
            "gso_sends": self.gso_sends,
            "datagrams_out": self.datagrams_out,
            "uso_in": self.uso_in,
            "uso_in_bad": self.uso_in_bad,
            "recv_calls": self.recv_calls,
            "datagrams_in": self.datagrams_in,
            "uso_out": self.uso_out,
            "uso_out_datagrams": self.uso_out_datagrams,
        })
    }
}

/// How many system calls a [`send_segments`] made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// `sendmsg`/`sendto` calls.
    pub calls: u64,
    /// Of which carried several datagrams (`UDP_SEGMENT`).
    pub gso: u64,
}

/// Sends `data` to `to` as datagrams of `seg` bytes (the last may be
/// shorter): with `UDP_SEGMENT`, up to [`MAX_SEGMENTS`] per `sendmsg`;
/// datagram by datagram where the kernel refuses. A full socket buffer
/// drops what did not fit, as a congested link would; other errors are
/// returned after the rest was tried.
pub fn send_segments(
    fd: BorrowedFd<'_>,
    to: SocketAddr,
    data: &[u8],
    seg: usize,
) -> (Sent, io::Result<()>) {
    let mut sent = Sent::default();
    let mut err = Ok(());
    let addr = SockAddr::from(to);
    if data.is_empty() {
        // One empty datagram.
        sent.calls = 1;
        let r = match sendto(fd, &addr, data) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        };
        return (sent, r);
    }
    if seg == 0 {
        return (sent, Ok(()));
    }
    let chunk = (MAX_SEGMENTS.min(MAX_PAYLOAD / seg).max(1)) * seg;
    for piece in data.chunks(chunk) {
        if piece.len() > seg && gso_available() {
            sent.calls += 1;
            match sendmsg_gso(fd, &addr, piece, seg) {
                Ok(()) => {
                    sent.gso += 1;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    let code = e.raw_os_error();
                    if matches!(code, Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP))
                        && !NO_GSO.swap(true, Ordering::Relaxed)
                    {
                        debug!(error = %e, "UDP_SEGMENT unavailable; sending datagram by datagram");
                    }
                    // EINVAL/EIO: this route cannot take it (segment above
                    // its MTU, no checksum offload); one by one below.
                }
            }
        }
        for d in piece.chunks(seg) {
            sent.calls += 1;
            if let Err(e) = sendto(fd, &addr, d)
                && e.kind() != io::ErrorKind::WouldBlock
            {
                err = Err(e);
            }
        }
    }
    (sent, err)
}

fn sendto(fd: BorrowedFd<'_>, addr: &SockAddr, data: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `data` and `addr` are valid for their lengths during the
        // call; `fd` is an open socket.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT,
                addr.as_ptr().cast(),
                addr.len(),
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Room for one control message carrying a u16 or an int.
const CMSG_ROOM: usize = 32;

fn sendmsg_gso(fd: BorrowedFd<'_>, addr: &SockAddr, data: &[u8], seg: usize) -> io::Result<()> {
    let mut control = [0u64; CMSG_ROOM / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
    // SAFETY: `msg` points at `control`, which has room for one cmsg with a
    // u16 (CMSG_SPACE(2) <= CMSG_ROOM), so CMSG_FIRSTHDR is non-null and
    // its data area is writable.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
    loop {
        // SAFETY: every pointer in `msg` refers to live locals or to `data`
        // and `addr`, borrowed for the call.
        let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One received message: a datagram, or with `UDP_GRO` a train of
/// datagrams of `seg` bytes (the last may be shorter).
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    /// Sender.
    pub from: SocketAddr,
    /// Payload bytes.
    pub len: usize,
    /// Bytes per datagram (`len` for a lone one).
    pub seg: usize,
}

/// Buffers for one `recvmmsg` of up to [`BATCH`] messages of up to 64 KiB
/// each (allocated once; pages are touched only as data lands).
pub struct RecvBatch {
    data: Vec<u8>,
    msgs: Vec<Msg>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

const SLOT: usize = 65536;

impl RecvBatch {
    /// Empty buffers.
    pub fn new() -> Self {
        Self {
            data: vec![0u8; BATCH * SLOT],
            msgs: Vec::with_capacity(BATCH),
        }
    }

    /// Drains up to [`BATCH`] messages from `fd` (non-blocking). Returns how
    /// many arrived (0: nothing waiting).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.msgs.clear();
        // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr are valid.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut control = [[0u64; CMSG_ROOM / 8]; BATCH];
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, chunk) in self.data.chunks_mut(SLOT).enumerate().take(BATCH) {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = control[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_ROOM as _;
        }
        let n = loop {
            // SAFETY: `hdrs` holds BATCH headers whose buffers (names,
            // control, iovecs into `self.data`) live across the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for (i, h) in hdrs.iter().enumerate().take(n) {
            let len = (h.msg_len as usize).min(SLOT);
            let Some(from) = socket_addr(&names[i]) else {
                continue;
            };
            // SAFETY: the control buffer of message `i`, as the kernel
            // filled it (msg_controllen says how far).
            let seg = unsafe { gro_segment(&h.msg_hdr) }
                .filter(|&s| s > 0)
                .unwrap_or(len);
            self.msgs.push(Msg {
                from,
                len,
                seg: seg.min(len.max(1)),
            });
        }
        Ok(self.msgs.len())
    }

    /// The messages of the last [`RecvBatch::recv`].
    pub fn msgs(&self) -> &[Msg] {
        &self.msgs
    }

    /// Payload of message `i`.
    pub fn payload(&self, i: usize) -> &[u8] {
        let m = &self.msgs[i];
        &self.data[i * SLOT..i * SLOT + m.len]
    }
}

/// The IPv4 or IPv6 address in a `sockaddr_storage` the kernel filled.
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in,
            // which it is large and aligned enough for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The `UDP_GRO` segment size in a received message's control data.
///
/// # Safety
/// `h` must be a msghdr the kernel filled (its control pointer and length
/// describing a live buffer).
unsafe fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: per the function's contract.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Where [`GsoBatch::push`] put a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Appended to the batch.
    Added,
    /// Does not fit the batch: flush it, then push again.
    Flush,
}

/// Consecutive datagrams of one flow to one destination, gathered to
/// leave in one `UDP_SEGMENT` send: all of the first one's size, except
/// that a shorter one may end the batch.
pub struct GsoBatch<K> {
    key: Option<K>,
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    closed: bool,
}

impl<K: PartialEq + Copy> Default for GsoBatch<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: PartialEq + Copy> GsoBatch<K> {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            key: None,
            buf: Vec::new(),
            seg: 0,
            count: 0,
            closed: false,
        }
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.key.is_none()
    }

    /// Adds one datagram of flow `key` (which includes its destination).
    pub fn push(&mut self, key: K, payload: &[u8]) -> Push {
        match self.key {
            None => {
                self.key = Some(key);
                self.buf.clear();
                self.buf.extend_from_slice(payload);
                self.seg = payload.len();
                self.count = 1;
                self.closed = payload.is_empty();
                Push::Added
            }
            Some(k)
                if k == key
                    && !self.closed
                    && payload.len() <= self.seg
                    && !payload.is_empty()
                    && self.count < MAX_SEGMENTS
                    && self.buf.len() + payload.len() <= MAX_PAYLOAD =>
            {
                self.buf.extend_from_slice(payload);
                self.count += 1;
                self.closed = payload.len() < self.seg;
                Push::Added
            }
            Some(_) => Push::Flush,
        }
    }

    /// Takes the batch: its key, bytes, segment size and datagram count.
    pub fn take(&mut self) -> Option<(K, &[u8], usize, usize)> {
        let key = self.key.take()?;
        Some((key, &self.buf, self.seg, self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn batch_gathers_same_size_and_ends_with_a_shorter_one() {
        let mut b = GsoBatch::<u32>::new();
        assert_eq!(b.push(1, &[1; 100]), Push::Added);
        assert_eq!(b.push(1, &[2; 100]), Push::Added);
        assert_eq!(b.push(2, &[3; 100]), Push::Flush);
        assert_eq!(b.push(1, &[4; 150]), Push::Flush);
        assert_eq!(b.push(1, &[5; 40]), Push::Added);
        assert_eq!(b.push(1, &[6; 40]), Push::Flush);
        let (k, data, seg, n) = b.take().unwrap();
        assert_eq!((k, data.len(), seg, n), (1, 240, 100, 3));
        assert!(b.is_empty());
        assert_eq!(b.push(2, &[]), Push::Added);
        assert_eq!(b.push(2, &[1]), Push::Flush);
    }

    #[test]
    fn batch_stops_at_the_segment_limit() {
        let mut b = GsoBatch::<u8>::new();
        for _ in 0..MAX_SEGMENTS {
            assert_eq!(b.push(0, &[0; 10]), Push::Added);
        }
        assert_eq!(b.push(0, &[0; 10]), Push::Flush);
        let mut b = GsoBatch::<u8>::new();
        assert_eq!(b.push(0, &[0; 40000]), Push::Added);
        assert_eq!(b.push(0, &[0; 30000]), Push::Flush);
    }

    #[test]
    fn segmented_send_arrives_as_separate_datagrams_and_gro_rejoins_them() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let data: Vec<u8> = (0..1000u32 * 5 + 300).map(|i| i as u8).collect();
        let (sent, r) = send_segments(tx.as_fd(), to, &data, 1000);
        r.unwrap();
        if gso_available() {
            assert_eq!(sent, Sent { calls: 1, gso: 1 });
        }
        // Without UDP_GRO: six datagrams in one recvmmsg.
        let mut batch = RecvBatch::new();
        rx.set_nonblocking(true).unwrap();
        let n = batch.recv(rx.as_fd()).unwrap();
        assert_eq!(n, 6);
        let mut got = Vec::new();
        for i in 0..n {
            let m = batch.msgs()[i];
            assert_eq!(m.from, tx.local_addr().unwrap());
            assert_eq!(m.seg, m.len);
            got.extend_from_slice(batch.payload(i));
        }
        assert_eq!(got, data);
        assert_eq!(batch.recv(rx.as_fd()).unwrap(), 0);
        // With UDP_GRO: one train, its segment size in the control message.
        if enable_gro(rx.as_fd()) && gso_available() {
            send_segments(tx.as_fd(), to, &data, 1000).1.unwrap();
            assert_eq!(batch.recv(rx.as_fd()).unwrap(), 1);
            let m = batch.msgs()[0];
            assert_eq!((m.len, m.seg), (data.len(), 1000));
            assert_eq!(batch.payload(0), &data[..]);
        }
    }

    #[test]
    fn zero_segment_size_sends_nothing() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (sent, r) = send_segments(tx.as_fd(), "127.0.0.1:9".parse().unwrap(), &[1, 2, 3], 0);
        assert!(r.is_ok());
        assert_eq!(sent.calls, 0);
    }
}
