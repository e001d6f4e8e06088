//! Whole ingress: raw Ethernet frames from a hostile guest through rnet's
//! data plane (classification, ARP, DHCP, the DNS forwarder, TCP/UDP/ICMP
//! NAT and its policy), with a simulated host side.
//!
//! # Set-up (once per fuzz process)
//!
//! A `Network` serves one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`
//! through `Network::attach_tap`; this target plays the guest on the other
//! end. The configuration keeps everything on this machine:
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
//! A sequence of records, each `FLAGS LEN_HI LEN_LO BYTES...` (a truncated
//! last record takes what is left). Each record is written to the socket
//! pair as one frame. `FLAGS` lets the fuzzer get past the checks that
//! random bytes never pass:
//!
//! - bit 0: set the IPv4 total length (and a UDP length) to fit the frame;
//! - bit 1: recompute the IPv4 header checksum and the TCP/UDP/ICMP one;
//! - bit 2: first wait until everything sent so far is processed, then set
//!   the TCP acknowledgement number to the next sequence number rnet has
//!   sent on that connection (so handshakes with rnet's random ISN can
//!   complete), then recompute checksums.
//!
//! Empty records are skipped: on a socket pair a zero-length read means
//! end of file, which a real TAP never delivers.
//!
//! # Checks
//!
//! After each input the target sends a ping to the gateway and waits for its
//! echo reply (so every frame of the input has been processed), then checks
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
use rnet::{Config, Network, OutboundPolicy};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const GW_MAC: [u8; 6] = rnet::stack::GATEWAY_MAC;
const GUEST_IP: [u8; 4] = [10, 0, 2, 100];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
const BARRIER_IDENT: u16 = 0xb0b0;
/// How long the data plane may take to process one input.
const DEADLINE: Duration = Duration::from_secs(5);
const MAX_RECORDS: usize = 256;

struct World {
    net: Network,
    /// The guest's end of the socket pair (non-blocking).
    guest: OwnedFd,
    dns_udp: UdpSocket,
    dns_tcp: TcpListener,
    dns_conns: Vec<TcpStream>,
    /// (guest port, remote address, remote port) -> next sequence number
    /// rnet will send on that connection.
    tcp_next: HashMap<(u16, [u8; 4], u16), u32>,
    barrier: u64,
    buf: Vec<u8>,
}

fn world() -> &'static Mutex<World> {
    static WORLD: OnceLock<Mutex<World>> = OnceLock::new();
    WORLD.get_or_init(|| Mutex::new(World::new()))
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
    fn new() -> World {
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
            .dns_upstreams(vec![upstream])
            .build()
            .expect("fuzz config");
        let net = Network::attach_tap(tap, None, config).expect("attach_tap");
        World {
            net,
            guest,
            dns_udp,
            dns_tcp,
            dns_conns: Vec::new(),
            tcp_next: HashMap::new(),
            barrier: 0,
            buf: vec![0; 1 << 17],
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
            let f = &self.buf[..n as usize];
            if verbose() {
                eprintln!("rnet sent: {}", describe(f));
            }
            if let Some(w) = want
                && is_barrier_reply(f, w)
            {
                seen = true;
            }
            if let Some((key, next)) = tcp_next_seq(f) {
                if self.tcp_next.len() > 4096 {
                    self.tcp_next.clear();
                }
                self.tcp_next.insert(key, next);
            }
        }
    }

    fn send(&mut self, frame: &[u8]) {
        let start = Instant::now();
        loop {
            // SAFETY: sending from a live slice.
            let r = unsafe {
                libc::send(
                    self.guest.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
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
    fn sync(&mut self) {
        self.barrier += 1;
        let id = self.barrier;
        let ping = barrier_frame(id);
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

    fn run(&mut self, data: &[u8]) {
        let before = self.net.handle().stats().frames_in;
        let mut written = 0u64;
        let mut rest = data;
        let mut frame = Vec::new();
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
            frame.clear();
            frame.extend_from_slice(&body[..take]);
            if flags & 1 != 0 {
                fix_lengths(&mut frame);
            }
            if flags & 4 != 0 {
                self.sync();
                written += 1;
                self.patch_ack(&mut frame);
                fix_checksums(&mut frame);
            } else if flags & 2 != 0 {
                fix_checksums(&mut frame);
            }
            self.send(&frame);
            written += 1;
        }
        self.sync();
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
        let Some((ihl, _)) = ipv4(f, 6) else { return };
        let t = 14 + ihl;
        if f.len() < t + 20 {
            return;
        }
        let key = (
            u16::from_be_bytes([f[t], f[t + 1]]),
            [f[30], f[31], f[32], f[33]],
            u16::from_be_bytes([f[t + 2], f[t + 3]]),
        );
        if let Some(next) = self.tcp_next.get(&key) {
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
    let Some((ihl, total)) = ipv4(f, 0) else {
        return format!("{} bytes, ethertype {:02x?}", f.len(), f.get(12..14));
    };
    let ip = &f[14..14 + total];
    let l4 = &ip[ihl..];
    let ports = if l4.len() >= 4 && (ip[9] == 6 || ip[9] == 17) {
        format!(
            ":{} -> :{}",
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]])
        )
    } else {
        String::new()
    };
    let flags = if ip[9] == 6 && l4.len() >= 14 { format!(" flags {:#04x}", l4[13]) } else { String::new() };
    format!(
        "IPv4 proto {} {:?} -> {:?}{ports}{flags}, {} bytes",
        ip[9],
        &ip[12..16],
        &ip[16..20],
        total
    )
}

/// The IPv4 header length and total length of an Ethernet/IPv4 frame
/// carrying `proto` (any protocol if 0), both within the frame.
fn ipv4(f: &[u8], proto: u8) -> Option<(usize, usize)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]])).min(f.len() - 14);
    if ihl < 20 || total < ihl || (proto != 0 && f[23] != proto) {
        return None;
    }
    Some((ihl, total))
}

fn fix_lengths(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let total = (f.len() - 14).min(65535) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if f[23] == 17 && ihl >= 20 && usize::from(total) >= ihl + 8 {
        let u = 14 + ihl;
        f[u + 4..u + 6].copy_from_slice(&(total - ihl as u16).to_be_bytes());
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
    let Some((ihl, total)) = ipv4(f, 0) else { return };
    let ip = &mut f[14..14 + total];
    ip[10..12].fill(0);
    let c = fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let proto = ip[9];
    let pseudo = |len: usize, ip: &[u8]| sum(&ip[12..20], u64::from(proto) + len as u64);
    match proto {
        6 if total >= ihl + 20 => {
            let p = pseudo(total - ihl, ip);
            let l4 = &mut ip[ihl..];
            l4[16..18].fill(0);
            let c = fold(sum(l4, p));
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        }
        17 if total >= ihl + 8 => {
            let ulen = usize::from(u16::from_be_bytes([ip[ihl + 4], ip[ihl + 5]]));
            let ulen = ulen.clamp(8, total - ihl);
            let p = pseudo(ulen, ip);
            let l4 = &mut ip[ihl..ihl + ulen];
            l4[6..8].fill(0);
            let c = match fold(sum(l4, p)) {
                0 => 0xffff,
                c => c,
            };
            l4[6..8].copy_from_slice(&c.to_be_bytes());
        }
        1 if total >= ihl + 4 => {
            let l4 = &mut ip[ihl..];
            l4[2..4].fill(0);
            let c = fold(sum(l4, 0));
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}

/// A ping from the guest to the gateway carrying `id`.
fn barrier_frame(id: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 20 + 16);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&GATEWAY_IP);
    f.extend_from_slice(&[8, 0, 0, 0]);
    f.extend_from_slice(&BARRIER_IDENT.to_be_bytes());
    f.extend_from_slice(&(id as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    fix_checksums(&mut f);
    f
}

fn is_barrier_reply(f: &[u8], id: u64) -> bool {
    let Some((ihl, total)) = ipv4(f, 1) else { return false };
    let icmp = &f[14 + ihl..14 + total];
    icmp.len() >= 16
        && icmp[0] == 0
        && icmp[4..6] == BARRIER_IDENT.to_be_bytes()
        && icmp[8..16] == id.to_be_bytes()
}

/// From a TCP segment rnet sent: (guest port, remote address, remote
/// port) and the sequence number that follows the segment.
fn tcp_next_seq(f: &[u8]) -> Option<((u16, [u8; 4], u16), u32)> {
    let (ihl, total) = ipv4(f, 6)?;
    let t = &f[14 + ihl..14 + total];
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
    let src = [f[26], f[27], f[28], f[29]];
    Some((
        (u16::from_be_bytes([t[2], t[3]]), src, u16::from_be_bytes([t[0], t[1]])),
        next,
    ))
}

fuzz_target!(|data: &[u8]| {
    let mut w = match world().lock() {
        Ok(w) => w,
        // A previous input panicked while holding the lock; the fuzzer has
        // already reported it.
        Err(p) => p.into_inner(),
    };
    w.run(data);
});

