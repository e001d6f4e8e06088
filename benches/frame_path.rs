//! Criterion benchmarks of the frame path.
//!
//! - `classify`: the first look at every guest frame
//!   (`rnet::wire::classify::classify`) on a TCP data segment, a UDP
//!   datagram and an ARP request.
//! - `tcp_guest_to_host`: the whole data plane without namespaces. The
//!   engine serves one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)` through
//!   `rnet::Network::attach_tap`; this benchmark plays the guest on the other
//!   end with hand-built frames: ARP for the gateway, a TCP handshake to
//!   10.0.2.2:PORT (a listener on the host's 127.0.0.1:PORT accepts and a
//!   thread drains the active connection), then 1400-byte data segments on
//!   one active flow while 1, 100 and 10,000 other flows are open and idle.
//!   One iteration is one data segment pushed through classification, flow
//!   lookup, smoltcp ingress, the host socket write and the ACK that comes
//!   back; the guest respects the advertised window. Per-segment cost
//!   should not grow with the number of idle flows.
//! - `udp_guest_to_host`: the same data plane; the guest sends 1400-byte
//!   datagrams to 10.0.2.2:PORT (one socket on the host's 127.0.0.1:PORT,
//!   drained and counted by a thread) round-robin over 1, 100 and 8,192
//!   UDP flows (guest source ports), each flow with its own NAT entry and
//!   host socket in the engine. One iteration is one datagram through
//!   classification, flow lookup, the host `sendto` and the sink's
//!   receive; at most 64 are in flight, so the queues never overflow.
//!   Per-datagram cost should stay flat from 1 to 8,192 flows.
//!
//! Run with `cargo bench --bench frame_path`. The 10,000-flow step needs
//! about 10,300 file descriptors (the engine's host sockets; the idle
//! flows' host sides wait in the accept queues of listeners that never
//! accept); the benchmark raises RLIMIT_NOFILE as far as it may and
//! otherwise says how many idle flows it could open.

use std::collections::HashMap;
use std::hint::black_box;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
use rnet::stack::NetAddrs;
use rnet::wire::classify::{Verdict, classify};
use rnet::{Config, Limits, Network, OutboundPolicy};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x64]);
const GW_MAC: EthernetAddress = EthernetAddress(rnet::stack::GATEWAY_MAC);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
/// Payload of one data segment: what fits a 1500-byte MTU.
const SEGMENT: usize = 1400;
/// The idle-flow counts of the sweep.
const SWEEP: [usize; 3] = [1, 100, 10_000];
/// Our receive window as advertised to the engine (scaled by 2^7).
const OUR_WINDOW: u16 = 0xffff;
const OUR_WSCALE: u8 = 7;

// ---------------------------------------------------------------------------
// frame building
// ---------------------------------------------------------------------------

/// Ethernet + IPv4 around a transport payload written by `body`.
fn ip_frame(
    dst: Ipv4Addr,
    proto: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let mut frame = vec![0u8; ETH_LEN + IP_LEN + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: GW_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let ip = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    let mut pkt = Ipv4Packet::new_unchecked(&mut frame[ETH_LEN..]);
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    body(&mut frame[ETH_LEN + IP_LEN..]);
    frame
}

/// A guest TCP segment to `dst` with checksums filled in.
fn tcp_frame(dst: SocketAddrV4, repr: &TcpRepr<'_>) -> Vec<u8> {
    ip_frame(*dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
        let mut pkt = TcpPacket::new_unchecked(buf);
        repr.emit(
            &mut pkt,
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(*dst.ip()),
            &ChecksumCapabilities::default(),
        );
    })
}

fn tcp_repr<'a>(
    sport: u16,
    dport: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &'a [u8],
) -> TcpRepr<'a> {
    let syn = control == TcpControl::Syn;
    TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: OUR_WINDOW,
        window_scale: syn.then_some(OUR_WSCALE),
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

fn udp_frame(sport: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dst.port(),
    };
    ip_frame(
        *dst.ip(),
        IpProtocol::Udp,
        repr.header_len() + payload.len(),
        |buf| {
            let mut pkt = UdpPacket::new_unchecked(buf);
            repr.emit(
                &mut pkt,
                &IpAddress::Ipv4(GUEST_IP),
                &IpAddress::Ipv4(*dst.ip()),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

fn arp_frame(op: ArpOperation, target_mac: EthernetAddress, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: target_mac,
        target_protocol_addr: target,
    };
    let mut frame = vec![0u8; ETH_LEN + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: if op == ArpOperation::Request {
            EthernetAddress::BROADCAST
        } else {
            target_mac
        },
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(&mut frame[ETH_LEN..]));
    frame
}

/// RFC 1624 incremental update of a one's-complement checksum when a 32-bit
/// field changes from `old` to `new`.
fn csum_update32(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!csum);
    sum += u32::from(!((old >> 16) as u16)) + u32::from(!(old as u16));
    sum += (new >> 16) + (new & 0xffff);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offsets inside a TCP frame built by [`tcp_frame`].
const TCP_OFF: usize = ETH_LEN + IP_LEN;
const SEQ_OFF: usize = TCP_OFF + 4;
const CSUM_OFF: usize = TCP_OFF + 16;

/// Rewrites the sequence number of a built segment, checksum included.
fn set_seq(frame: &mut [u8], seq: u32) {
    let old = u32::from_be_bytes(frame[SEQ_OFF..SEQ_OFF + 4].try_into().unwrap());
    let csum = u16::from_be_bytes([frame[CSUM_OFF], frame[CSUM_OFF + 1]]);
    frame[SEQ_OFF..SEQ_OFF + 4].copy_from_slice(&seq.to_be_bytes());
    frame[CSUM_OFF..CSUM_OFF + 2].copy_from_slice(&csum_update32(csum, old, seq).to_be_bytes());
}

// ---------------------------------------------------------------------------
// classify
// ---------------------------------------------------------------------------

fn bench_classify(c: &mut Criterion) {
    let config = Config::builder().build().expect("default config");
    let addrs = NetAddrs::from_config(&config);
    let gw = SocketAddrV4::new(GATEWAY_IP, 8080);
    let data = vec![0x5au8; SEGMENT];
    let tcp = tcp_frame(
        gw,
        &tcp_repr(40000, 8080, TcpControl::Psh, 1000, Some(2000), &data),
    );
    let udp = udp_frame(40000, SocketAddrV4::new(GATEWAY_IP, 5353), &data[..512]);
    let arp = arp_frame(ArpOperation::Request, EthernetAddress([0; 6]), GATEWAY_IP);

    let cases: [(&str, &[u8]); 3] = [
        ("tcp_data_1400B", &tcp),
        ("udp_512B", &udp),
        ("arp_request", &arp),
    ];
    // The frames must classify as what they are, or the numbers mean nothing.
    for (name, frame) in cases {
        let v = classify(frame, GW_MAC, &addrs, false).verdict;
        let ok = match name {
            "tcp_data_1400B" => matches!(
                v,
                Verdict::Tcp {
                    syn_only: false,
                    ..
                }
            ),
            "udp_512B" => matches!(v, Verdict::Udp { .. }),
            _ => matches!(v, Verdict::Arp),
        };
        assert!(ok, "{name} classified as {v:?}");
    }
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, frame) in cases {
        g.bench_function(name, |b| {
            b.iter(|| black_box(classify(black_box(frame), GW_MAC, &addrs, false)))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// the guest end of the data plane
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    SynSent,
    Established,
}

struct Flow {
    state: State,
    /// Our next sequence number.
    snd_nxt: u32,
    /// Highest cumulative ACK from the engine.
    snd_una: u32,
    /// The engine's last advertised window (unscaled value).
    wnd: u32,
    /// The engine's window scale (from its SYN-ACK).
    wscale: u8,
    /// The engine's sequence number after its SYN.
    rcv_nxt: u32,
    /// Where the flow goes.
    dst: SocketAddrV4,
}

/// Idle flows per never-accepting listener: their host sides wait, fully
/// established, in its accept queue (below net.core.somaxconn, 4096 by
/// default), so they cost this process no descriptor.
const PER_IDLE_LISTENER: usize = 2000;

/// The guest: the socket-pair end, the flows it opened, the host listeners.
struct Guest {
    fd: OwnedFd,
    rx: Vec<u8>,
    flows: HashMap<u16, Flow>,
    /// The active flow's destination (its listener accepts and drains).
    dst: SocketAddrV4,
    next_port: u16,
    /// Listeners for idle flows that never accept, with their use count.
    idle_listeners: Vec<(socket2::Socket, u16, usize)>,
    /// The engine, kept alive for as long as the guest.
    _net: Network,
}

impl Guest {
    fn new() -> Guest {
        Guest::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Guest {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a host listener");
        let port = listener.local_addr().expect("listener address").port();
        // The active flow's host side: accept it and drain it.
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut buf = vec![0u8; 1 << 18];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });

        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        for fd in [&ours, &theirs] {
            // Larger queues absorb bursts both ways; capped by wmem_max.
            let _ = setsockopt(fd, sockopt::SndBuf, &(4 << 20));
            let _ = setsockopt(fd, sockopt::RcvBuf, &(4 << 20));
        }
        let flags = OFlag::from_bits_truncate(fcntl(&ours, FcntlArg::F_GETFL).expect("F_GETFL"));
        fcntl(&ours, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).expect("F_SETFL");
        let config = Config::builder()
            .allow_host_loopback(true)
            .outbound(OutboundPolicy::Only(vec![]))
            .dns_upstreams(vec![SocketAddr::from(([127, 0, 0, 1], 53))])
            .disable_dns(true)
            .limits(limits)
            .build()
            .expect("config");
        let net = Network::attach_tap(theirs, None, config).expect("start the data plane");
        let mut g = Guest {
            fd: ours,
            rx: vec![0u8; 65536 + 64],
            flows: HashMap::new(),
            dst: SocketAddrV4::new(GATEWAY_IP, port),
            next_port: 10000,
            idle_listeners: Vec::new(),
            _net: net,
        };
        g.arp_gateway();
        g
    }

    fn send(&self, frame: &[u8]) -> bool {
        loop {
            match nix::unistd::write(&self.fd, frame) {
                Ok(_) => return true,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return false,
                Err(e) => panic!("writing a frame to the data plane: {e}"),
            }
        }
    }

    fn send_blocking(&self, frame: &[u8]) {
        while !self.send(frame) {
            self.wait(PollFlags::POLLOUT, 100);
        }
    }

    fn wait(&self, what: PollFlags, ms: u16) {
        let mut fds = [PollFd::new(self.fd.as_fd(), what)];
        let _ = poll(&mut fds, ms);
    }

    /// Reads one frame; None when nothing is queued.
    fn recv(&mut self) -> Option<usize> {
        loop {
            match nix::unistd::read(&self.fd, &mut self.rx) {
                Ok(0) => panic!("the data plane closed its end"),
                Ok(n) => return Some(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return None,
                Err(e) => panic!("reading from the data plane: {e}"),
            }
        }
    }

    fn arp_gateway(&mut self) {
        let req = arp_frame(ArpOperation::Request, EthernetAddress([0; 6]), GATEWAY_IP);
        self.send_blocking(&req);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let Some(n) = self.recv() else {
                self.wait(PollFlags::POLLIN, 50);
                continue;
            };
            if let Ok(eth) = EthernetFrame::new_checked(&self.rx[..n])
                && eth.ethertype() == EthernetProtocol::Arp
                && let Ok(arp) = ArpPacket::new_checked(eth.payload())
                && arp.operation() == ArpOperation::Reply
            {
                assert_eq!(arp.source_hardware_addr(), GW_MAC.as_bytes());
                return;
            }
        }
        panic!("no ARP reply from the gateway");
    }

    /// Handles one frame from the engine: answers ARP, follows handshakes
    /// and ACKs. Returns the source port of a flow that became established.
    fn handle(&mut self, n: usize) -> Option<u16> {
        let frame = &self.rx[..n];
        let eth = EthernetFrame::new_checked(frame).ok()?;
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let arp = ArpPacket::new_checked(eth.payload()).ok()?;
                if arp.operation() == ArpOperation::Request
                    && arp.target_protocol_addr() == GUEST_IP.octets()
                {
                    let reply = arp_frame(ArpOperation::Reply, GW_MAC, GATEWAY_IP);
                    self.send_blocking(&reply);
                }
                None
            }
            EthernetProtocol::Ipv4 => {
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                if ip.next_header() != IpProtocol::Tcp {
                    return None;
                }
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                let port = tcp.dst_port();
                let flow = self.flows.get_mut(&port)?;
                assert!(!tcp.rst(), "the engine reset flow {port}");
                let ack = tcp.ack_number().0 as u32;
                match flow.state {
                    State::SynSent if tcp.syn() && tcp.ack() => {
                        let src = IpAddress::Ipv4(ip.src_addr());
                        let dst = IpAddress::Ipv4(ip.dst_addr());
                        let repr =
                            TcpRepr::parse(&tcp, &src, &dst, &ChecksumCapabilities::ignored())
                                .ok()?;
                        flow.wscale = repr.window_scale.unwrap_or(0);
                        flow.wnd = u32::from(tcp.window_len());
                        flow.rcv_nxt = (tcp.seq_number().0 as u32).wrapping_add(1);
                        flow.snd_una = ack;
                        flow.state = State::Established;
                        let (seq, rcv, dst) = (flow.snd_nxt, flow.rcv_nxt, flow.dst);
                        let f = tcp_frame(
                            dst,
                            &tcp_repr(port, dst.port(), TcpControl::None, seq, Some(rcv), &[]),
                        );
                        self.send_blocking(&f);
                        Some(port)
                    }
                    State::Established if tcp.ack() => {
                        if (ack.wrapping_sub(flow.snd_una) as i32) >= 0 {
                            flow.snd_una = ack;
                            flow.wnd = u32::from(tcp.window_len());
                        }
                        None
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A host port for one more idle flow.
    fn idle_port(&mut self) -> u16 {
        if self
            .idle_listeners
            .last()
            .is_none_or(|l| l.2 >= PER_IDLE_LISTENER)
        {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
                .expect("bind an idle listener");
            s.listen(4096).expect("listen");
            let port = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .expect("listener address")
                .port();
            self.idle_listeners.push((s, port, 0));
        }
        let l = self.idle_listeners.last_mut().unwrap();
        l.2 += 1;
        l.1
    }

    /// Opens `count` more flows, 128 handshakes at a time: to the active
    /// destination if `active`, else to the idle listeners.
    fn open(&mut self, count: usize, active: bool) -> Vec<u16> {
        let mut opened = Vec::with_capacity(count);
        let mut left = count;
        while left > 0 {
            let batch = left.min(128);
            let mut pending = 0;
            for _ in 0..batch {
                let dst = if active {
                    self.dst
                } else {
                    SocketAddrV4::new(GATEWAY_IP, self.idle_port())
                };
                let port = self.next_port;
                self.next_port = self.next_port.checked_add(1).expect("out of guest ports");
                let isn = 0x1000_0000u32.wrapping_add(u32::from(port) << 12);
                let syn = tcp_frame(
                    dst,
                    &tcp_repr(port, dst.port(), TcpControl::Syn, isn, None, &[]),
                );
                self.flows.insert(
                    port,
                    Flow {
                        state: State::SynSent,
                        snd_nxt: isn.wrapping_add(1),
                        snd_una: isn,
                        wnd: 0,
                        wscale: 0,
                        rcv_nxt: 0,
                        dst,
                    },
                );
                self.send_blocking(&syn);
                pending += 1;
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while pending > 0 {
                assert!(
                    Instant::now() < deadline,
                    "{pending} handshakes did not complete"
                );
                match self.recv() {
                    Some(n) => {
                        if let Some(p) = self.handle(n) {
                            opened.push(p);
                            pending -= 1;
                        }
                    }
                    None => self.wait(PollFlags::POLLIN, 50),
                }
            }
            left -= batch;
        }
        opened
    }

    /// Pushes `count` data segments on flow `port` and waits for them to be
    /// acknowledged; returns the elapsed time.
    fn push(&mut self, port: u16, count: u64, template: &mut [u8]) -> Duration {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut last_progress = Instant::now();
        let mut last_una = self.flows[&port].snd_una;
        loop {
            let f = &self.flows[&port];
            let (nxt, una) = (f.snd_nxt, f.snd_una);
            if sent == count && una == nxt {
                break;
            }
            let window = f.wnd << f.wscale;
            let in_flight = nxt.wrapping_sub(una);
            let mut progressed = false;
            if sent < count && in_flight as usize + SEGMENT <= window as usize {
                set_seq(template, nxt);
                if self.send(template) {
                    self.flows.get_mut(&port).unwrap().snd_nxt = nxt.wrapping_add(SEGMENT as u32);
                    sent += 1;
                    progressed = true;
                }
            }
            while let Some(n) = self.recv() {
                self.handle(n);
                progressed = true;
            }
            let una = self.flows[&port].snd_una;
            if una != last_una {
                last_una = una;
                last_progress = Instant::now();
            } else if !progressed {
                self.wait(PollFlags::POLLIN | PollFlags::POLLOUT, 5);
                if last_progress.elapsed() > Duration::from_millis(50) {
                    // A lost ACK or a closed window: a retransmission of the
                    // last segment makes the engine answer with its state.
                    let f = &self.flows[&port];
                    if f.snd_nxt != f.snd_una {
                        set_seq(template, f.snd_nxt.wrapping_sub(SEGMENT as u32));
                        self.send(template);
                    }
                    last_progress = Instant::now();
                }
            }
        }
        start.elapsed()
    }
}

/// Raises RLIMIT_NOFILE towards `want`; returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let try_set = |cur: u64, max: u64| {
        let l = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
    };
    // Raising the hard limit works with CAP_SYS_RESOURCE; else stay under it.
    if try_set(want, want.max(lim.rlim_max)) {
        return want;
    }
    let cur = want.min(lim.rlim_max);
    if try_set(cur, lim.rlim_max) {
        cur
    } else {
        lim.rlim_cur
    }
}

fn bench_tcp(c: &mut Criterion) {
    let max_idle = *SWEEP.iter().max().unwrap();
    // One descriptor per flow (the engine's host socket) plus slack.
    let limit = raise_nofile((max_idle + 256) as u64);
    let cap = (limit as usize).saturating_sub(256);
    if cap < max_idle {
        eprintln!(
            "frame_path: RLIMIT_NOFILE is {limit}; the sweep stops at {cap} idle flows instead of {max_idle}"
        );
    }

    let mut guest = Guest::new();
    let active = guest.open(1, true)[0];
    let f = &guest.flows[&active];
    let payload = vec![0xa5u8; SEGMENT];
    let mut template = tcp_frame(
        guest.dst,
        &tcp_repr(
            active,
            guest.dst.port(),
            TcpControl::Psh,
            f.snd_nxt,
            Some(f.rcv_nxt),
            &payload,
        ),
    );
    // The incremental checksum must agree with a full computation.
    {
        set_seq(&mut template, 0xdead_beef);
        let ip = Ipv4Packet::new_checked(&template[ETH_LEN..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
    }

    let mut g = c.benchmark_group("tcp_guest_to_host");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let mut idle = 0;
    for want in SWEEP {
        let want = want.min(cap);
        if want <= idle {
            continue;
        }
        let t = Instant::now();
        guest.open(want - idle, false);
        idle = want;
        eprintln!(
            "frame_path: {idle} idle flows open ({:.1?} to open them)",
            t.elapsed()
        );
        g.bench_with_input(
            BenchmarkId::new("segment_1400B_idle_flows", idle),
            &idle,
            |b, _| b.iter_custom(|iters| guest.push(active, iters, &mut template)),
        );
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// UDP guest -> host
// ---------------------------------------------------------------------------

/// The UDP flow counts of the sweep (8,192 is the engine's default UDP
/// flow table size; the benchmark raises the per-guest bound to match).
const UDP_SWEEP: [usize; 3] = [1, 100, 8_192];
/// Datagrams in flight (sent by the guest, not yet counted by the host
/// sink): small enough that neither the socket pair nor the sink's receive
/// buffer overflows, so a datagram is lost only if the engine drops it.
const UDP_WINDOW: u64 = 64;

/// The host end of the UDP case: one socket on 127.0.0.1 that every flow's
/// datagrams reach (from the engine's per-flow host sockets), drained by a
/// thread that counts them.
struct UdpSink {
    port: u16,
    received: Arc<AtomicU64>,
}

impl UdpSink {
    fn start() -> UdpSink {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the UDP sink");
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(8 << 20);
        let port = sock.local_addr().expect("sink address").port();
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while sock.recv(&mut buf).is_ok() {
                count.fetch_add(1, Ordering::Release);
            }
        });
        UdpSink { port, received }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }
}

impl Guest {
    /// Sends `count` datagrams round-robin over `frames` (one prebuilt
    /// datagram per flow, starting at flow `*next`), at most UDP_WINDOW
    /// ahead of the sink, and waits until the sink has counted them all.
    /// Returns the elapsed time and the datagrams that never arrived (a
    /// stall of 200 ms ends the wait).
    fn push_udp(
        &mut self,
        frames: &[Vec<u8>],
        next: &mut usize,
        count: u64,
        sink: &UdpSink,
    ) -> (Duration, u64) {
        let start = Instant::now();
        let base = sink.received();
        let mut sent = 0u64;
        // Datagrams given up for lost after a stall (they hold no window).
        let mut skipped = 0u64;
        let mut last = (0u64, Instant::now());
        loop {
            let got = sink.received().saturating_sub(base);
            if got + skipped >= count {
                return (start.elapsed(), count.saturating_sub(got));
            }
            if got != last.0 {
                last = (got, Instant::now());
            } else if last.1.elapsed() > Duration::from_millis(200) {
                skipped = sent.saturating_sub(got);
                last.1 = Instant::now();
                continue;
            }
            let mut progressed = false;
            while sent < count && sent < got + skipped + UDP_WINDOW {
                if !self.send(&frames[*next]) {
                    break;
                }
                *next = (*next + 1) % frames.len();
                sent += 1;
                progressed = true;
            }
            // Anything the engine says (ARP) is answered.
            while let Some(n) = self.recv() {
                self.handle(n);
                progressed = true;
            }
            if !progressed {
                // The engine and the sink thread need the CPU more than a
                // spinning guest does (two cores).
                std::thread::yield_now();
            }
        }
    }
}

fn bench_udp(c: &mut Criterion) {
    let max_flows = *UDP_SWEEP.iter().max().unwrap();
    // One host socket per flow in the engine, plus slack.
    let limit = raise_nofile((max_flows + 256) as u64);
    let cap = (limit as usize).saturating_sub(256);
    if cap < max_flows {
        eprintln!(
            "frame_path: RLIMIT_NOFILE is {limit}; the UDP sweep stops at {cap} flows instead of {max_flows}"
        );
    }
    let sink = UdpSink::start();
    let mut guest = Guest::with_limits(Limits {
        udp_flows: max_flows * 2,
        udp_flows_per_guest: max_flows * 2,
        ..Limits::default()
    });
    let dst = SocketAddrV4::new(GATEWAY_IP, sink.port);
    let payload = vec![0x5au8; SEGMENT];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut g = c.benchmark_group("udp_guest_to_host");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let mut lost = 0u64;
    for want in UDP_SWEEP {
        let want = want.min(cap);
        if want <= frames.len() {
            continue;
        }
        // New flows: a first datagram from each new guest port makes its
        // NAT entry and host socket.
        let t = Instant::now();
        let first = frames.len();
        for i in first..want {
            frames.push(udp_frame(20000 + i as u16, dst, &payload));
        }
        let mut from = 0;
        let (_, l) = guest.push_udp(&frames[first..], &mut from, (want - first) as u64, &sink);
        lost += l;
        eprintln!(
            "frame_path: {want} UDP flows open ({:.1?} to open them)",
            t.elapsed()
        );
        let mut next = 0;
        g.bench_with_input(
            BenchmarkId::new("datagram_1400B_flows", want),
            &want,
            |b, _| {
                b.iter_custom(|iters| {
                    let (d, l) = guest.push_udp(&frames, &mut next, iters, &sink);
                    lost += l;
                    d
                })
            },
        );
    }
    g.finish();
    if lost > 0 {
        eprintln!("frame_path: {lost} UDP datagrams did not reach the host sink");
    }
}

criterion_group!(benches, bench_classify, bench_tcp, bench_udp);
criterion_main!(benches);
