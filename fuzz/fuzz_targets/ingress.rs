//! Whole ingress: raw Ethernet frames from a hostile guest through rnet's
//! data plane (classification, ARP, NDP, DHCP, the DNS forwarder, TCP/UDP/
//! ICMP NAT and its policy), IPv4 and IPv6, with plain framing and with the
//! virtio-net offload framing every default run uses, and a simulated host
//! side.
//!
//! # Set-up (once per fuzz process)
//!
//! Two `Network`s each serve one end of a `socketpair(AF_UNIX,
//! SOCK_SEQPACKET)`: one through `Network::attach_tap` (plain frames), one
//! through `Network::attach_tap_offload` (every frame behind a 12-byte
//! virtio-net header, both ways, and the stack's offload settings: partial
//! checksums, segments of up to 64 KiB). This target plays the guest on the
//! other ends. Both have IPv6 (prefix fd00::/64) as well as IPv4. The
//! configuration keeps everything on this machine:
//!
//! - `outbound(OutboundPolicy::Only(vec![]))`: no NAT to any destination, so
//!   no host socket towards another machine is ever opened;
//! - `allow_host_loopback(false)`: the gateway does not reach the host's
//!   loopback either;
//! - `dns_upstreams([127.0.0.1:P])`: the DNS forwarder (the only route left
//!   besides rnet's own services) relays to a UDP socket and a TCP listener
//!   on 127.0.0.1:P that this target owns; they answer every query by
//!   echoing it back (the simulated host side).
//!
//! So whatever the input, nothing leaves the machine.
//!
//! # Input format
//!
//! `MODE`, then a sequence of records, each `FLAGS LEN_HI LEN_LO BYTES...`
//! (a truncated last record takes what is left). `MODE` bit 0 picks the
//! offload network (else the plain one); bit 1 makes the input's closing
//! barrier an ICMPv6 echo (so an IPv6 guest that sent nothing over IPv4
//! stays one). Each record is written to the socket pair as one frame; on
//! the offload network its first 12 bytes are the virtio-net header
//! (host byte order) and the rest the frame. `FLAGS` lets the fuzzer get
//! past the checks that random bytes never pass:
//!
//! - bit 0: set the IPv4 total length or IPv6 payload length (and a UDP
//!   length) to fit the frame;
//! - bit 1: recompute the IPv4 header checksum and the TCP/UDP/ICMP/ICMPv6
//!   one;
//! - bit 2: first wait until everything sent so far is processed, then set
//!   the TCP acknowledgement number to the next sequence number rnet has
//!   sent on that connection (so handshakes with rnet's random ISN can
//!   complete), then recompute checksums;
//! - bit 3 (offload network): make the header's `csum_start`,
//!   `csum_offset` and `hdr_len` point at the frame's TCP or UDP header, as
//!   the kernel writes them (its flags, GSO type and size stay the
//!   fuzzer's).
//!
//! Empty records are skipped: on a socket pair a zero-length read means
//! end of file, which a real TAP never delivers.
//!
//! # Checks
//!
//! After each input the target sends a ping to the gateway (10.0.2.2 or
//! fd00::2) and waits for its echo reply (so every frame of the input has been processed), then checks
//! that the data plane still runs (`Handle::is_running`), that its counters
//! saw every frame, and panics otherwise, so libFuzzer reports the input.

#![no_main]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rnet::phy::vnet::VNET_HDR_LEN;
use rnet::{Config, Network, OutboundPolicy};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const GW_MAC: [u8; 6] = rnet::stack::GATEWAY_MAC;
const GUEST_IP: [u8; 4] = [10, 0, 2, 100];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
const GUEST_IP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const GATEWAY_IP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const BARRIER_IDENT: u16 = 0xb0b0;
/// How long the data plane may take to process one input.
const DEADLINE: Duration = Duration::from_secs(5);
const MAX_RECORDS: usize = 256;

/// A TCP connection as the guest sees it: (guest port, remote address,
/// remote port).
type Conn = (u16, Vec<u8>, u16);

struct World {
    net: Network,
    /// The guest's end of the socket pair (non-blocking).
    guest: OwnedFd,
    /// Frames carry a virtio-net header both ways.
    offload: bool,
    dns_udp: UdpSocket,
    dns_tcp: TcpListener,
    dns_conns: Vec<TcpStream>,
    /// Next sequence number rnet will send on each connection.
    tcp_next: HashMap<Conn, u32>,
    barrier: u64,
    buf: Vec<u8>,
    msg: Vec<u8>,
}

fn world(offload: bool) -> &'static Mutex<World> {
    static PLAIN: OnceLock<Mutex<World>> = OnceLock::new();
    static OFFLOAD: OnceLock<Mutex<World>> = OnceLock::new();
    let cell = if offload { &OFFLOAD } else { &PLAIN };
    cell.get_or_init(|| Mutex::new(World::new(offload)))
}

/// A UDP socket and a TCP listener on the same loopback port.
fn upstream_sockets() -> (UdpSocket, TcpListener) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("binding the upstream UDP socket");
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

impl World {
    fn new(offload: bool) -> World {
        let (dns_udp, dns_tcp) = upstream_sockets();
        let upstream: SocketAddr = dns_udp.local_addr().unwrap();
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned here only.
        let (guest, tap) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(guest.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(guest.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let config = Config::builder()
            .outbound(OutboundPolicy::Only(vec![]))
            .allow_host_loopback(false)
            .ipv6(Some("fd00::".parse().unwrap()))
            .dns_upstreams(vec![upstream])
            .build()
            .expect("fuzz config");
        let net = if offload {
            Network::attach_tap_offload(tap, None, config)
        } else {
            Network::attach_tap(tap, None, config)
        }
        .expect("attach_tap");
        World {
            net,
            guest,
            offload,
            dns_udp,
            dns_tcp,
            dns_conns: Vec::new(),
            tcp_next: HashMap::new(),
            barrier: 0,
            buf: vec![0; 1 << 17],
            msg: Vec::with_capacity(1 << 17),
        }
    }

    /// The simulated host side: answers DNS queries by echoing them.
    fn serve_upstream(&mut self) {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = self.dns_udp.recv_from(&mut b) {
            let _ = self.dns_udp.send_to(&b[..n], from);
        }
        while let Ok((s, _)) = self.dns_tcp.accept() {
            let _ = s.set_nonblocking(true);
            if self.dns_conns.len() >= 64 {
                self.dns_conns.remove(0);
            }
            if verbose() {
                eprintln!("upstream: DNS over TCP connection accepted");
            }
            self.dns_conns.push(s);
        }
        self.dns_conns.retain_mut(|s| match s.read(&mut b) {
            Ok(0) => false,
            Ok(n) => s.write_all(&b[..n]).is_ok(),
            Err(e) => e.kind() == ErrorKind::WouldBlock,
        });
    }

    /// Reads every frame rnet has sent, noting TCP sequence numbers; true
    /// if the echo reply of barrier `want` was among them.
    fn drain(&mut self, want: Option<u64>) -> bool {
        let mut seen = false;
        loop {
            // SAFETY: reading into our own buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.guest.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return seen;
            }
            let n = n as usize;
            let skip = if self.offload { VNET_HDR_LEN } else { 0 };
            assert!(n >= skip, "rnet sent {n} bytes, less than a virtio-net header");
            let f = &self.buf[skip..n];
            if verbose() {
                eprintln!("rnet sent: {}", describe(f));
            }
            if let Some(w) = want
                && is_barrier_reply(f, w)
            {
                seen = true;
            }
            if let Some((key, next)) = tcp_next_seq(f) {
                if verbose() {
                    eprintln!("next for {key:?}: {next}");
                }
                if self.tcp_next.len() > 4096 {
                    self.tcp_next.clear();
                }
                self.tcp_next.insert(key, next);
            }
        }
    }

    /// Writes one message (on the offload network: header and frame).
    fn send(&mut self, msg: &[u8]) {
        let start = Instant::now();
        loop {
            // SAFETY: sending from a live slice.
            let r = unsafe {
                libc::send(
                    self.guest.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if r >= 0 {
                return;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::Interrupted => {}
                _ => panic!("writing a frame to the data plane failed: {e}"),
            }
            self.check_alive();
            if start.elapsed() > DEADLINE {
                panic!("the data plane stopped reading frames for {DEADLINE:?}");
            }
            self.drain(None);
            self.serve_upstream();
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits until rnet has processed everything sent so far.
    fn sync(&mut self, v6: bool) {
        self.barrier += 1;
        let id = self.barrier;
        let mut ping = Vec::new();
        if self.offload {
            // No offload asked for: a complete frame.
            ping.extend_from_slice(&[0; VNET_HDR_LEN]);
        }
        ping.extend_from_slice(&barrier_frame(id, v6));
        let start = Instant::now();
        let mut resend = Instant::now();
        self.drain(None);
        self.send(&ping);
        loop {
            if self.drain(Some(id)) {
                return;
            }
            self.serve_upstream();
            self.check_alive();
            if start.elapsed() > DEADLINE {
                panic!("the data plane did not answer a ping to the gateway within {DEADLINE:?}");
            }
            // The reply may have been lost to a full socket buffer: ask again.
            if resend.elapsed() > Duration::from_millis(200) {
                self.send(&ping);
                resend = Instant::now();
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn check_alive(&self) {
        let h = self.net.handle();
        if !h.is_running() {
            panic!("the data plane stopped; stats: {:?}", h.stats());
        }
    }

    fn run(&mut self, v6: bool, data: &[u8]) {
        let before = self.net.handle().stats().frames_in;
        let mut written = 0u64;
        let mut rest = data;
        let mut msg = std::mem::take(&mut self.msg);
        for _ in 0..MAX_RECORDS {
            if rest.len() < 3 {
                break;
            }
            let flags = rest[0];
            let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            let body = &rest[3..];
            let take = len.min(body.len());
            rest = &body[take..];
            if take == 0 {
                continue;
            }
            msg.clear();
            msg.extend_from_slice(&body[..take]);
            // The frame inside the message (on the offload network, a
            // message shorter than the header is sent as it is: the data
            // plane must drop it).
            let at = if self.offload { VNET_HDR_LEN.min(msg.len()) } else { 0 };
            let (hdr, frame) = msg.split_at_mut(at);
            if flags & 1 != 0 {
                fix_lengths(frame);
            }
            if flags & 4 != 0 {
                self.sync(v6);
                written += 1;
                self.patch_ack(frame);
                fix_checksums(frame);
            } else if flags & 2 != 0 {
                fix_checksums(frame);
            }
            if flags & 8 != 0 && hdr.len() == VNET_HDR_LEN {
                fix_vnet_hdr(hdr, frame);
            }
            self.send(&msg);
            written += 1;
        }
        self.msg = msg;
        self.sync(v6);
        written += 1;
        self.check_alive();
        let after = self.net.handle().stats();
        assert!(
            after.frames_in >= before + written,
            "the data plane saw {} frames of {written}: {after:?}",
            after.frames_in - before
        );
    }

    fn patch_ack(&self, f: &mut [u8]) {
        let Some(l) = l3(f) else { return };
        let t = l.l4;
        if l.proto != 6 || l.end < t + 20 {
            return;
        }
        let key = (
            u16::from_be_bytes([f[t], f[t + 1]]),
            dst(f, &l).to_vec(),
            u16::from_be_bytes([f[t + 2], f[t + 3]]),
        );
        let next = self.tcp_next.get(&key);
        if verbose() {
            eprintln!("ack for {key:?}: {next:?}");
        }
        if let Some(next) = next {
            f[t + 8..t + 12].copy_from_slice(&next.to_be_bytes());
        }
    }
}

/// `RNET_FUZZ_VERBOSE=1` prints every frame rnet sends back (to see how
/// far an input gets).
fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("RNET_FUZZ_VERBOSE").is_some())
}

fn describe(f: &[u8]) -> String {
    let Some(l) = l3(f) else {
        return format!("{} bytes, ethertype {:02x?}", f.len(), f.get(12..14));
    };
    let l4 = &f[l.l4..l.end];
    let ports = if l4.len() >= 4 && (l.proto == 6 || l.proto == 17) {
        format!(
            ":{} -> :{}",
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]])
        )
    } else {
        String::new()
    };
    let flags = if l.proto == 6 && l4.len() >= 14 {
        format!(" flags {:#04x}", l4[13])
    } else {
        String::new()
    };
    format!(
        "IPv{} proto {} {:02x?} -> {:02x?}{ports}{flags}, {} bytes",
        if l.v6 { 6 } else { 4 },
        l.proto,
        src(f, &l),
        dst(f, &l),
        l.end - 14
    )
}

/// Where the layers of an Ethernet/IPv4 or Ethernet/IPv6 frame are.
struct L3 {
    v6: bool,
    /// Offset of the transport header (IPv6: right after the fixed
    /// header; extension headers are the payload's first bytes).
    l4: usize,
    /// End of the IP packet, within the frame.
    end: usize,
    /// IPv4 protocol or IPv6 next header.
    proto: u8,
}

fn l3(f: &[u8]) -> Option<L3> {
    match f.get(12..14)? {
        [0x08, 0x00] => {
            if f.len() < 34 || f[14] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]])).min(f.len() - 14);
            if ihl < 20 || total < ihl {
                return None;
            }
            Some(L3 { v6: false, l4: 14 + ihl, end: 14 + total, proto: f[23] })
        }
        [0x86, 0xdd] => {
            if f.len() < 54 || f[14] >> 4 != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
            Some(L3 { v6: true, l4: 54, end: (54 + plen).min(f.len()), proto: f[20] })
        }
        _ => None,
    }
}

fn src<'a>(f: &'a [u8], l: &L3) -> &'a [u8] {
    if l.v6 { &f[22..38] } else { &f[26..30] }
}

fn dst<'a>(f: &'a [u8], l: &L3) -> &'a [u8] {
    if l.v6 { &f[38..54] } else { &f[30..34] }
}

fn fix_lengths(f: &mut [u8]) {
    let (v6, l4) = match f.get(12..14) {
        Some([0x08, 0x00]) if f.len() >= 34 => {
            let total = (f.len() - 14).min(65535) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            (false, 14 + usize::from(f[14] & 0x0f) * 4)
        }
        Some([0x86, 0xdd]) if f.len() >= 54 => {
            let plen = (f.len() - 54).min(65535) as u16;
            f[18..20].copy_from_slice(&plen.to_be_bytes());
            (true, 54)
        }
        _ => return,
    };
    let proto = if v6 { f[20] } else { f[23] };
    let end = f.len().min(14 + 65535);
    if proto == 17 && l4 >= 34 && end >= l4 + 8 {
        let ulen = (end - l4).min(65535) as u16;
        f[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
    }
}

fn sum(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn fix_checksums(f: &mut [u8]) {
    let Some(l) = l3(f) else { return };
    if !l.v6 {
        let ip = &mut f[14..l.l4];
        ip[10..12].fill(0);
        let c = fold(sum(ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let addrs = if l.v6 { 22..54 } else { 26..34 };
    let pseudo = |len: usize, f: &[u8]| sum(&f[addrs.clone()], u64::from(l.proto) + len as u64);
    let len = l.end - l.l4;
    match l.proto {
        6 if len >= 20 => {
            let p = pseudo(len, f);
            let l4 = &mut f[l.l4..l.end];
            l4[16..18].fill(0);
            let c = fold(sum(l4, p));
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        }
        17 if len >= 8 => {
            let ulen = usize::from(u16::from_be_bytes([f[l.l4 + 4], f[l.l4 + 5]]));
            let ulen = ulen.clamp(8, len);
            let p = pseudo(ulen, f);
            let l4 = &mut f[l.l4..l.l4 + ulen];
            l4[6..8].fill(0);
            let c = match fold(sum(l4, p)) {
                0 => 0xffff,
                c => c,
            };
            l4[6..8].copy_from_slice(&c.to_be_bytes());
        }
        1 if !l.v6 && len >= 4 => {
            let l4 = &mut f[l.l4..l.end];
            l4[2..4].fill(0);
            let c = fold(sum(l4, 0));
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        58 if l.v6 && len >= 4 => {
            let p = pseudo(len, f);
            let l4 = &mut f[l.l4..l.end];
            l4[2..4].fill(0);
            let c = fold(sum(l4, p));
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}

/// Points the virtio-net header's checksum and header-length fields at the
/// frame's TCP or UDP header, as the kernel fills them.
fn fix_vnet_hdr(hdr: &mut [u8], frame: &[u8]) {
    let Some(l) = l3(frame) else { return };
    let (offset, l4_len) = match l.proto {
        6 if l.end >= l.l4 + 20 => (16u16, usize::from(frame[l.l4 + 12] >> 4) * 4),
        17 => (6, 8),
        _ => return,
    };
    let hdr_len = (l.l4 + l4_len).min(usize::from(u16::MAX)) as u16;
    let start = l.l4 as u16;
    hdr[2..4].copy_from_slice(&hdr_len.to_ne_bytes());
    hdr[6..8].copy_from_slice(&start.to_ne_bytes());
    hdr[8..10].copy_from_slice(&offset.to_ne_bytes());
}

/// A ping from the guest to the gateway carrying `id`.
fn barrier_frame(id: u64, v6: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 40 + 16);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GUEST_MAC);
    if v6 {
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 58, 64]);
        f.extend_from_slice(&GUEST_IP6);
        f.extend_from_slice(&GATEWAY_IP6);
        f.extend_from_slice(&[128, 0, 0, 0]);
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0]);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&GATEWAY_IP);
        f.extend_from_slice(&[8, 0, 0, 0]);
    }
    f.extend_from_slice(&BARRIER_IDENT.to_be_bytes());
    f.extend_from_slice(&(id as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    fix_checksums(&mut f);
    f
}

fn is_barrier_reply(f: &[u8], id: u64) -> bool {
    let Some(l) = l3(f) else { return false };
    let reply = match (l.v6, l.proto) {
        (false, 1) => 0,
        (true, 58) => 129,
        _ => return false,
    };
    let icmp = &f[l.l4..l.end];
    icmp.len() >= 16
        && icmp[0] == reply
        && icmp[4..6] == BARRIER_IDENT.to_be_bytes()
        && icmp[8..16] == id.to_be_bytes()
}

/// From a TCP segment rnet sent: the connection as the guest sees it and
/// the sequence number that follows the segment.
fn tcp_next_seq(f: &[u8]) -> Option<(Conn, u32)> {
    let l = l3(f)?;
    if l.proto != 6 {
        return None;
    }
    let t = &f[l.l4..l.end];
    if t.len() < 20 {
        return None;
    }
    let data_off = usize::from(t[12] >> 4) * 4;
    let len = t.len().checked_sub(data_off)? as u32;
    let flags = t[13];
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let next = seq
        .wrapping_add(len)
        .wrapping_add(u32::from(flags & 0x02 != 0))
        .wrapping_add(u32::from(flags & 0x01 != 0));
    Some((
        (
            u16::from_be_bytes([t[2], t[3]]),
            src(f, &l).to_vec(),
            u16::from_be_bytes([t[0], t[1]]),
        ),
        next,
    ))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, records)) = data.split_first() else { return };
    let mut w = match world(mode & 1 != 0).lock() {
        Ok(w) => w,
        // A previous input panicked while holding the lock; the fuzzer has
        // already reported it.
        Err(p) => p.into_inner(),
    };
    w.run(mode & 2 != 0, records);
});
