//! The engine over a socket pair instead of a TAP: each test plays the
//! guest on one end with hand-built frames and reads what the engine
//! writes back. Everything stays on this machine: the outbound policy
//! admits no network at all, so the only host destinations are the
//! gateway's mapping to the host's loopback (127.0.0.1) and the DNS
//! upstream, a loopback socket that never answers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
use nix::sys::time::TimeVal;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::{Control, Engine, ExitReason};
use crate::config::{Config, Limits, OutboundPolicy};
use crate::phy::tap::Tap;
use crate::stats::Stats;

const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x64]);
const GW_MAC: EthernetAddress = EthernetAddress(crate::stack::GATEWAY_MAC);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// How long a test waits for one expected frame.
const WAIT: StdDuration = StdDuration::from_secs(5);

/// A running engine and the guest's end of its socket pair.
struct Guest {
    fd: std::fs::File,
    control: Arc<Control>,
    stats: Arc<Stats>,
    thread: Option<JoinHandle<std::io::Result<ExitReason>>>,
    /// Keeps the DNS upstream's port taken while the engine runs.
    _dns: UdpSocket,
}

impl Guest {
    /// An engine whose outbound policy admits nothing beyond rnet's own
    /// addresses, with the gateway standing for the host's loopback.
    fn start(limits: Limits) -> Guest {
        let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = dns.local_addr().unwrap();
        let cfg = Config::builder()
            .outbound(OutboundPolicy::Only(vec![]))
            .allow_host_loopback(true)
            .dns_upstreams(vec![upstream])
            .limits(limits)
            .build()
            .expect("test config");
        let (guest, tap) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        setsockopt(&guest, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000)).unwrap();
        let tap = Tap::new(tap).unwrap();
        let (engine, control, stats) =
            Engine::new(Arc::new(cfg), tap, None, vec![upstream]).unwrap();
        let thread = std::thread::spawn(move || engine.run());
        Guest {
            fd: std::fs::File::from(guest),
            control,
            stats,
            thread: Some(thread),
            _dns: dns,
        }
    }

    /// Introduces the guest to smoltcp (which learns its MAC from the ARP
    /// request, as it would before answering a SYN) and waits for the
    /// reply.
    fn arp(&mut self) -> EthernetAddress {
        self.send(&arp_request(GATEWAY));
        self.expect("ARP reply", |f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            if eth.ethertype() != EthernetProtocol::Arp {
                return None;
            }
            match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()? {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                } if source_protocol_addr == GATEWAY && target_protocol_addr == GUEST => {
                    Some(source_hardware_addr)
                }
                _ => None,
            }
        })
    }

    fn send(&mut self, frame: &[u8]) {
        assert_eq!(self.fd.write(frame).unwrap(), frame.len());
    }

    /// The first frame from the engine that `want` accepts (others are
    /// skipped), within [`WAIT`].
    fn expect<T>(&mut self, what: &str, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
        let deadline = StdInstant::now() + WAIT;
        let mut buf = vec![0u8; 65536];
        while StdInstant::now() < deadline {
            match self.fd.read(&mut buf) {
                Ok(n) => {
                    if let Some(t) = want(&buf[..n]) {
                        return t;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading from the engine: {e}"),
            }
        }
        panic!("no {what} from the engine within {WAIT:?}");
    }

    fn drops(&self, reason: &str) -> u64 {
        let s = self.stats.snapshot();
        s.drops
            .iter()
            .find(|(k, _)| *k == reason)
            .map_or(0, |(_, v)| *v)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("the engine thread panicked");
            if !std::thread::panicking() {
                assert_eq!(r.unwrap(), ExitReason::Stopped);
            }
        }
    }
}

fn ip_frame(dst: Ipv4Addr, proto: IpProtocol, len: usize, body: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 20 + len];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: GW_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    Ipv4Repr {
        src_addr: GUEST,
        dst_addr: dst,
        next_header: proto,
        payload_len: len,
        hop_limit: 64,
    }
    .emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
        &ChecksumCapabilities::default(),
    );
    body(&mut frame[34..]);
    frame
}

fn udp_frame(sport: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dst.port(),
    };
    ip_frame(*dst.ip(), IpProtocol::Udp, 8 + payload.len(), |buf| {
        repr.emit(
            &mut UdpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(*dst.ip()),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

fn tcp_frame(
    sport: u16,
    dst: SocketAddrV4,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let syn = control == TcpControl::Syn;
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: None,
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    ip_frame(*dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
        repr.emit(
            &mut TcpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(*dst.ip()),
            &ChecksumCapabilities::default(),
        )
    })
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut frame = vec![0u8; 14 + repr.buffer_len()];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    repr.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
    frame
}

/// The IPv4 packet of an Ethernet frame with protocol `proto`.
fn ipv4(frame: &[u8], proto: IpProtocol) -> Option<Ipv4Packet<&[u8]>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 || eth.dst_addr() != GUEST_MAC {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
    (ip.next_header() == proto && ip.dst_addr() == GUEST).then_some(ip)
}

/// A TCP segment to the guest's `port`: (flags SYN, ACK, RST; seq, ack).
fn tcp_to(frame: &[u8], port: u16) -> Option<(bool, bool, bool, u32, u32)> {
    let ip = ipv4(frame, IpProtocol::Tcp)?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    (t.dst_port() == port).then(|| {
        (
            t.syn(),
            t.ack(),
            t.rst(),
            t.seq_number().0 as u32,
            t.ack_number().0 as u32,
        )
    })
}

fn loopback_tcp() -> (TcpListener, SocketAddrV4) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, SocketAddrV4::new(GATEWAY, port))
}

#[test]
fn arp_request_for_the_gateway_is_answered() {
    let mut g = Guest::start(Limits::default());
    let mac = g.arp();
    assert_eq!(mac, GW_MAC);
}

#[test]
fn tcp_handshake_reaches_a_loopback_listener() {
    let mut g = Guest::start(Limits::default());
    g.arp();
    let (listener, dst) = loopback_tcp();
    g.send(&tcp_frame(40000, dst, TcpControl::Syn, 1000, None));
    // The engine answers only once the host connect has succeeded.
    let (syn, ack, _, seq, acked) = g.expect("SYN-ACK", |f| tcp_to(f, 40000));
    assert!(syn && ack, "not a SYN-ACK");
    assert_eq!(acked, 1001);
    g.send(&tcp_frame(
        40000,
        dst,
        TcpControl::None,
        1001,
        Some(seq.wrapping_add(1)),
    ));
    let (mut conn, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());
    conn.write_all(b"hello").unwrap();
    let data = g.expect("data from the host", |f| {
        let ip = ipv4(f, IpProtocol::Tcp)?;
        let t = TcpPacket::new_checked(ip.payload()).ok()?;
        (t.dst_port() == 40000 && !t.payload().is_empty()).then(|| t.payload().to_vec())
    });
    assert_eq!(data, b"hello");
    assert_eq!(g.stats.snapshot().tcp_flows, 1);
}

#[test]
fn udp_round_trip_to_a_loopback_echo() {
    let mut g = Guest::start(Limits::default());
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    echo.set_read_timeout(Some(WAIT)).unwrap();
    let dst = SocketAddrV4::new(GATEWAY, echo.local_addr().unwrap().port());
    g.send(&udp_frame(41000, dst, b"ping"));
    let mut buf = [0u8; 64];
    let (n, from) = echo.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    echo.send_to(b"pong", from).unwrap();
    let (src, payload) = g.expect("UDP reply", |f| {
        let ip = ipv4(f, IpProtocol::Udp)?;
        let u = UdpPacket::new_checked(ip.payload()).ok()?;
        (u.dst_port() == 41000).then(|| (ip.src_addr(), u.payload().to_vec()))
    });
    // The reply comes from the gateway, as the guest addressed it.
    assert_eq!((src, payload.as_slice()), (GATEWAY, &b"pong"[..]));
    assert_eq!(g.stats.snapshot().udp_flows, 1);
}

#[test]
fn outbound_policy_refuses_with_icmp_and_counts() {
    let mut g = Guest::start(Limits::default());
    // TEST-NET-1: outside the (empty) allow-list, so nothing is sent.
    let dst = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 9);
    g.send(&udp_frame(42000, dst, b"nope"));
    let (src, code) = g.expect("ICMP unreachable", |f| {
        let ip = ipv4(f, IpProtocol::Icmp)?;
        let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
        (icmp.msg_type() == smoltcp::wire::Icmpv4Message::DstUnreachable)
            .then(|| (ip.src_addr(), icmp.msg_code()))
    });
    assert_eq!(src, GATEWAY);
    assert_eq!(code, 13, "communication administratively prohibited");
    assert_eq!(g.drops("policy"), 1);
    assert_eq!(g.stats.snapshot().udp_flows, 0);
}

#[test]
fn tcp_flow_bound_refuses_and_counts() {
    let limits = Limits {
        tcp_flows: 1,
        ..Limits::default()
    };
    let mut g = Guest::start(limits);
    g.arp();
    let (_listener, dst) = loopback_tcp();
    g.send(&tcp_frame(43000, dst, TcpControl::Syn, 1, None));
    let (syn, ack, ..) = g.expect("SYN-ACK", |f| tcp_to(f, 43000));
    assert!(syn && ack);
    // A second connection passes the bound: reset and counted.
    g.send(&tcp_frame(43001, dst, TcpControl::Syn, 1, None));
    let (_, _, rst, ..) = g.expect("reset", |f| tcp_to(f, 43001));
    assert!(rst, "the SYN over the bound is reset");
    assert_eq!(g.drops("limit"), 1);
    assert_eq!(g.stats.snapshot().tcp_flows, 1);
}
