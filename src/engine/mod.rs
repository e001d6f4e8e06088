//! The event loop: one thread owns the TAP, the smoltcp interface, every
//! flow and every host socket.
//!
//! # Theory of operation
//!
//! `mio` (epoll, edge-triggered) reports readiness for the TAP, each host
//! socket, the waker used by [`crate::Handle::stop`], the target's pidfd and
//! the `--exit-fd`. Each flow lives in a slab; its index is its epoll token,
//! so an event reaches its flow without a search, and guest frames find
//! theirs through hash maps keyed by addresses. A loop iteration:
//!
//! 1. waits for events or the earliest timer;
//! 2. reads a bounded batch of frames from the TAP and dispatches each
//!    ([`crate::stack::classify`]), marking the flows it touched dirty;
//! 3. fires due timers (TCP retransmissions, idle UDP flows, DNS failover);
//! 4. services each dirty flow once: moves bytes between its smoltcp socket
//!    and its host socket, lets it transmit, and re-arms its timer.
//!
//! Work per frame is a classification, one or two hash lookups and smoltcp
//! processing against a one-socket set, independent of the number of flows.
//! Timers live in a binary heap with lazy invalidation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration as StdDuration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::SocketSet;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::Icmpv4DstUnreachable;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::nat::icmp::{self, IcmpFlow};
use crate::nat::local::LocalAddrs;
use crate::nat::tcp::{self, Step, TcpFlow};
use crate::nat::udp::UdpFlow;
use crate::nat::udpio::{self, GsoBatch, Push, RecvBatch};
use crate::nat::{Deny, Route, route, route_any};
use crate::services::dhcp::{DhcpConfig, DhcpServer};
use crate::services::dns::{self, DnsQuery, Reply, ResolvWatch};
use crate::stack::classify::{Verdict, classify};
use crate::stack::emit::{self, Header};
use crate::stack::ndp::Ndp;
use crate::stack::{self, Stack};
use crate::stats::{DropReason, Stats};
use crate::tap::{ReadOutcome, Tap};
pub(crate) use ports::Command;

mod flows;
mod ports;

use flows::{FIRST_FLOW, Flow, FlowTable, Slot};

const TAP: Token = Token(0);
const WAKER: Token = Token(1);
const PIDFD: Token = Token(2);
const EXIT_FD: Token = Token(3);
const LOCAL_ADDRS: Token = Token(6);
const TEST_HOOK: Token = Token(7);

/// Frames read from the TAP per loop iteration before other work runs.
const TAP_BATCH: usize = 256;
/// DNS queries in flight at once; more are dropped (the guest retries).
const MAX_DNS_QUERIES: usize = 1024;

/// Why the event loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The target process exited.
    TargetExited,
    /// The exit fd hung up.
    ExitFd,
    /// [`crate::Handle::stop`] was called (or a signal asked for it).
    Stopped,
    /// The TAP went away (its namespace was destroyed).
    TapClosed,
}

/// Shared between the loop and its handles.
pub struct Control {
    pub(crate) stop: AtomicBool,
    pub(crate) waker: Waker,
    commands: mpsc::Sender<Command>,
}

impl Control {
    /// Asks the loop to end and wakes it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Hands a request to the loop and wakes it; false if the loop is gone.
    pub(crate) fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok() && self.waker.wake().is_ok()
    }
}

/// A classified frame, with offsets into the TAP receive buffer instead of
/// borrowed slices so handlers may use the whole engine.
#[derive(Debug)]
enum Action {
    Drop(DropReason),
    Arp,
    Tcp {
        src: SocketAddr,
        dst: SocketAddr,
        syn_only: bool,
        ip_off: usize,
    },
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: Range<usize>,
        ip_off: usize,
    },
    Echo6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ident: u16,
        seq: u16,
        icmp: Range<usize>,
    },
    NeighborSolicit {
        src: Ipv6Addr,
        target: Ipv6Addr,
    },
    NeighborAdvert,
    RouterSolicit,
    Echo {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ident: u16,
        seq: u16,
        icmp: Range<usize>,
        ip_off: usize,
    },
    Dhcp {
        payload: Range<usize>,
    },
}

impl Action {
    fn from_verdict(v: Verdict<'_>, frame: &[u8]) -> Self {
        let off = |s: &[u8]| s.as_ptr() as usize - frame.as_ptr() as usize;
        let range = |s: &[u8]| off(s)..off(s) + s.len();
        match v {
            Verdict::Drop(r) => Action::Drop(r),
            Verdict::Arp => Action::Arp,
            Verdict::Tcp {
                src,
                dst,
                syn_only,
                ip,
            } => Action::Tcp {
                src,
                dst,
                syn_only,
                ip_off: off(ip),
            },
            Verdict::Udp {
                src,
                dst,
                payload,
                ip,
            } => Action::Udp {
                src,
                dst,
                payload: range(payload),
                ip_off: off(ip),
            },
            Verdict::Echo6 {
                src,
                dst,
                ident,
                seq,
                icmp,
            } => Action::Echo6 {
                src,
                dst,
                ident,
                seq,
                icmp: range(icmp),
            },
            Verdict::NeighborSolicit { src, target } => Action::NeighborSolicit { src, target },
            Verdict::NeighborAdvert => Action::NeighborAdvert,
            Verdict::RouterSolicit => Action::RouterSolicit,
            Verdict::Dhcp { payload } => Action::Dhcp {
                payload: range(payload),
            },
            Verdict::Echo {
                src,
                dst,
                ident,
                seq,
                icmp,
            } => Action::Echo {
                src,
                dst,
                ident,
                seq,
                icmp: range(icmp),
                ip_off: 14,
            },
        }
    }
}

/// The data plane of one network.
pub struct Engine {
    cfg: Arc<Config>,
    upstreams: Vec<SocketAddr>,
    /// The resolv.conf the upstreams came from, followed for changes.
    resolv: Option<ResolvWatch>,
    poll: Poll,
    tap: Tap,
    /// When the last event arrived; the loop keeps polling without sleeping
    /// for `busy_poll_us` after it.
    last_active: Instant,
    busy_poll_us: u64,
    tap_readable: bool,
    stack: Stack,
    services: SocketSet<'static>,
    flows: FlowTable,
    /// The guest's consecutive datagrams of one flow and destination,
    /// waiting to leave in one `UDP_SEGMENT` send (flushed when another
    /// kind arrives and after each TAP batch).
    udp_batch: GsoBatch<(usize, SocketAddr)>,
    /// Buffers of one `recvmmsg` towards the guest.
    udp_rx: Box<RecvBatch>,
    /// What the batched UDP paths did.
    udp_io: udpio::Counters,
    /// The frame being handled is a USO super-frame of datagrams of this
    /// size.
    rx_udp_gso: Option<u16>,
    stats: Arc<Stats>,
    control: Arc<Control>,
    /// Kept open for as long as the loop watches the target.
    _pidfd: Option<OwnedFd>,
    exit_fd: Option<RawFd>,
    ping_warned: bool,
    rules: BTreeMap<u64, ports::Rule>,
    next_rule: u64,
    /// Published-UDP conversations: (guest endpoint, client as the guest
    /// sees it) → the listener and the real client.
    udp_return: HashMap<(SocketAddr, SocketAddr), ports::UdpReturn>,
    /// The same by recency, for eviction at `Limits::udp_clients` and the
    /// idle sweep.
    udp_return_lru: BTreeSet<(Instant, SocketAddr, SocketAddr)>,
    commands: mpsc::Receiver<Command>,
    next_sweep: Instant,
    dhcp: DhcpServer,
    /// The in-namespace agent for fast published ports.
    fast: ports::FastPath,
    /// Spliced flow slot → its alias slot.
    splice_alias: HashMap<usize, usize>,
    started: std::time::Instant,
    /// Bytes moved by spliced connections that have closed (to, from guest).
    spliced_closed: (u64, u64),
    limits: crate::config::Limits,
    last_limit_warn: Option<std::time::Instant>,
    /// Neighbour discovery and router advertisements.
    ndp: Ndp,
    /// The host's own addresses (refused like host loopback).
    local: LocalAddrs,
    last_udp_open_warn: Option<std::time::Instant>,
    /// Under a supervisor: the rules to adopt (see [`crate::supervise`]).
    worker: Option<crate::supervise::Worker>,
    /// The test hook's eventfd (SIGUSR2 → panic), when armed.
    _test_hook: Option<OwnedFd>,
}

impl Engine {
    /// Sets up the loop over `tap`; `pid` is watched when given.
    pub fn new(
        cfg: Arc<Config>,
        tap: Tap,
        pid: Option<i32>,
        upstreams: Vec<SocketAddr>,
    ) -> io::Result<(Self, Arc<Control>, Arc<Stats>)> {
        let poll = Poll::new()?;
        let busy_poll_us = busy_poll_us(&cfg);
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (commands_tx, commands) = mpsc::channel();
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            waker,
            commands: commands_tx,
        });
        let mut tap = tap;
        poll.registry()
            .register(&mut SourceFd(&tap.as_raw_fd()), TAP, Interest::READABLE)?;
        let stack = Stack::new(&cfg, tap.tx(), stack::now());
        let pidfd = match pid {
            Some(p) => {
                let fd = pidfd_open(p)?;
                poll.registry().register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    PIDFD,
                    Interest::READABLE,
                )?;
                Some(fd)
            }
            None => None,
        };
        if let Some(fd) = cfg.exit_fd {
            set_nonblocking(fd)?;
            poll.registry()
                .register(&mut SourceFd(&fd), EXIT_FD, Interest::READABLE)?;
        }
        let stats = Arc::new(Stats::default());
        // Opened now: the sandbox entered later allows no new netlink socket.
        let local = match LocalAddrs::open() {
            Ok(l) => {
                if let Some(fd) = l.event_fd() {
                    poll.registry().register(
                        &mut SourceFd(&fd),
                        LOCAL_ADDRS,
                        Interest::READABLE,
                    )?;
                }
                debug!(entries = l.len(), "host-local addresses read");
                l
            }
            Err(e) => {
                warn!(error = %e, "cannot read the host's own addresses over netlink; only the gateway is treated as the host");
                LocalAddrs::default()
            }
        };
        let test_hook = crate::supervise::panic_hook_fd();
        if let Some(fd) = &test_hook {
            poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                TEST_HOOK,
                Interest::READABLE,
            )?;
        }
        let (cfg_net, cfg_mtu, cfg_limits) = (cfg.cidr(), cfg.mtu(), cfg.limits());
        let dhcp = DhcpServer::new(dhcp_config(&cfg, cfg_net, cfg_mtu));
        let ndp = Ndp::new(&cfg);
        let engine = Self {
            exit_fd: cfg.exit_fd,
            cfg,
            upstreams,
            resolv: None,
            poll,
            tap,
            last_active: Instant::ZERO,
            busy_poll_us,
            tap_readable: true,
            stack,
            services: SocketSet::new(Vec::new()),
            flows: FlowTable::new(cfg_limits, stats.clone()),
            udp_batch: GsoBatch::new(),
            udp_rx: Box::new(RecvBatch::new()),
            udp_io: udpio::Counters::default(),
            rx_udp_gso: None,
            stats: stats.clone(),
            control: control.clone(),
            _pidfd: pidfd,
            ping_warned: false,
            rules: BTreeMap::new(),
            next_rule: 1,
            udp_return: HashMap::new(),
            udp_return_lru: BTreeSet::new(),
            commands,
            next_sweep: stack::now(),
            dhcp,
            fast: ports::FastPath::default(),
            splice_alias: HashMap::new(),
            started: std::time::Instant::now(),
            spliced_closed: (0, 0),
            limits: cfg_limits,
            last_limit_warn: None,
            ndp,
            local,
            last_udp_open_warn: None,
            worker: None,
            _test_hook: test_hook,
        };
        Ok((engine, control, stats))
    }

    /// Runs until the target exits, the exit fd hangs up, the TAP goes away
    /// or a stop is requested. Every host socket is closed on return.
    pub fn run(mut self) -> io::Result<ExitReason> {
        self.start_agent();
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout(stack::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = stack::now();
            if !events.is_empty() {
                self.last_active = now;
            }
            for ev in events.iter() {
                match ev.token() {
                    TAP => self.tap_readable = true,
                    WAKER => self.handle_commands(),
                    t @ (ports::AGENT | ports::LAUNCHER) => self.agent_event(t, now),
                    PIDFD => return Ok(ExitReason::TargetExited),
                    TEST_HOOK => panic!("test hook: SIGUSR2 asked the data plane to panic"),
                    LOCAL_ADDRS => match self.local.on_event() {
                        Ok(true) => {
                            debug!(entries = self.local.len(), "host-local addresses changed")
                        }
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "cannot re-read the host's own addresses"),
                    },
                    EXIT_FD => {
                        if self.exit_fd_hung_up() {
                            return Ok(ExitReason::ExitFd);
                        }
                    }
                    Token(t) => {
                        let r = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        let w = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                        self.flow_event(t - FIRST_FLOW, r, w);
                    }
                }
            }
            if self.control.stop.load(Ordering::SeqCst) {
                return Ok(ExitReason::Stopped);
            }
            if self.tap_readable && self.read_tap(now)? {
                return Ok(ExitReason::TapClosed);
            }
            self.fire_timers(now);
            self.agent_tick(now);
            self.service_dirty(now);
            if now >= self.next_sweep {
                self.sweep_udp_returns(now);
                self.next_sweep = now + Duration::from_secs(5);
            }
            let ra = self.cfg.services.ra;
            self.ndp.tick(&self.stack, now, ra, self.tap.tx());
        }
    }

    fn next_timeout(&mut self, now: Instant) -> Option<StdDuration> {
        if self.tap_readable || self.flows.has_dirty() {
            return Some(StdDuration::ZERO);
        }
        if (now - self.last_active).total_micros() < self.busy_poll_us {
            // Traffic just passed: the reply is likely microseconds away, and
            // catching it without sleeping saves two wake-ups per round trip
            // (about half the latency of a 1-byte ping-pong on a 2-vCPU VM).
            return Some(StdDuration::ZERO);
        }
        // About to sleep: make the capture file current.
        self.tap.flush_pcap();
        let next = self.flows.next_deadline();
        let next = [next, self.ndp.next_deadline(), self.fast.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        next.map(|at| {
            if at <= now {
                StdDuration::ZERO
            } else {
                StdDuration::from_micros((at - now).total_micros())
            }
        })
    }

    fn exit_fd_hung_up(&self) -> bool {
        let Some(fd) = self.exit_fd else { return false };
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reading into a stack buffer of the given length from an
            // fd the caller handed to us for this purpose.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return true,
                n if n > 0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    return !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    );
                }
            }
        }
    }

    /// Reads a batch of frames; true when the TAP is gone.
    fn read_tap(&mut self, now: Instant) -> io::Result<bool> {
        for _ in 0..TAP_BATCH {
            match self.tap.read_frame()? {
                ReadOutcome::Frame(n) => {
                    self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    self.on_frame(n, now);
                }
                ReadOutcome::WouldBlock => {
                    self.tap_readable = false;
                    break;
                }
                ReadOutcome::Closed => return Ok(true),
            }
        }
        self.flush_udp_batch();
        self.stats
            .frames_out
            .store(self.tap.out_counters().frames, Ordering::Relaxed);
        Ok(false)
    }

    fn on_frame(&mut self, len: usize, now: Instant) {
        let meta = self.tap.rx_meta();
        if meta.unsupported {
            // A GSO type rnet never enabled (UDP fragmentation offload).
            self.stats.count_drop(DropReason::Unsupported);
            return;
        }
        if len > self.stack.mtu + 14 && !meta.gso {
            // Larger than the link allows: the guest's TAP MTU was raised
            // behind rnet's back, or the frame is forged. (A TSO burst from
            // the guest kernel is one TCP segment of up to 64 KiB.)
            self.stats.count_drop(DropReason::Malformed);
            return;
        }
        // Classify while borrowing the frame, then act on offsets into the
        // TAP's receive buffer, which stays untouched until the next read.
        let (action, src_mac) = {
            let (rx, _) = self.tap.split();
            let frame = &rx[..len];
            let c = classify(
                frame,
                self.stack.mac,
                &self.stack.addrs,
                meta.l4_csum_vouched,
            );
            (Action::from_verdict(c.verdict, frame), c.src_mac)
        };
        if !matches!(action, Action::Drop(_)) {
            if self.stack.guest_mac.is_none() {
                self.ndp.guest_appeared(&self.stack, now);
            }
            self.stack.guest_mac = Some(src_mac);
        }
        if !self.serves(&action) {
            self.stats.count_drop(DropReason::Policy);
            return;
        }
        self.rx_udp_gso = meta.udp_gso;
        if let Some(seg) = meta.udp_gso {
            // A USO super-frame must be UDP and hold more than one
            // datagram of its segment size: anything else is forged.
            let ok = match &action {
                Action::Udp { payload, .. } => seg > 0 && payload.len() >= usize::from(seg),
                _ => false,
            };
            if !ok {
                self.udp_io.uso_in_bad += 1;
                self.stats.count_drop(DropReason::Malformed);
                return;
            }
        }
        match action {
            Action::Drop(r) => self.stats.count_drop(r),
            Action::Dhcp { payload } => self.dhcp_request(payload),
            Action::Arp => {
                let (rx, tx) = self.tap.split();
                self.stack.ingress(now, &rx[..len], tx, &mut self.services);
            }
            Action::Echo {
                src,
                dst,
                ident,
                seq,
                icmp,
                ip_off,
            } => {
                if self.stack.addrs.is_virtual(dst) {
                    let h = header(&mut self.stack);
                    let (rx, mut tx) = self.tap.split();
                    let data = &rx[icmp.start + 8..icmp.end];
                    tx.build(|buf| emit::echo_reply(buf, &h, dst, src, ident, seq, data));
                    return;
                }
                match route(&self.cfg, &self.local, SocketAddrV4::new(dst, 0)) {
                    Route::Host(_) => self.relay_echo(src.into(), dst.into(), ident, icmp, now),
                    Route::Dns | Route::Deny(_) => {
                        self.deny(Deny::NotAllowed, src, dst, ip_off, len)
                    }
                }
            }
            Action::Udp {
                src: SocketAddr::V4(src),
                dst: SocketAddr::V4(dst),
                payload,
                ip_off,
            } => match route(&self.cfg, &self.local, dst) {
                _ if self.udp_return_to_client(src.into(), dst.into(), payload.clone(), now) => {}
                _ if self.udp_hairpin(src.into(), dst.into(), payload.clone(), now) => {}
                Route::Host(target) => self.udp_out(src.into(), target, None, payload, now),
                Route::Dns => self.dns_query(src.into(), payload, now),
                Route::Deny(d) => self.deny(d, *src.ip(), *dst.ip(), ip_off, len),
            },
            Action::Udp {
                src: SocketAddr::V6(src),
                dst: SocketAddr::V6(dst),
                payload,
                ip_off,
            } => match crate::nat::route6(&self.cfg, &self.local, dst) {
                _ if self.udp_return_to_client(src.into(), dst.into(), payload.clone(), now) => {}
                _ if self.udp_hairpin(src.into(), dst.into(), payload.clone(), now) => {}
                Route::Host(target) => self.udp_out(src.into(), target, None, payload, now),
                Route::Dns => self.dns_query(src.into(), payload, now),
                Route::Deny(d) => self.deny6(d, *src.ip(), ip_off, len),
            },
            Action::Udp { .. } => self.stats.count_drop(DropReason::Malformed),
            Action::Echo6 {
                src,
                dst,
                ident,
                seq,
                icmp,
            } => {
                // Answered for rnet's own addresses, relayed through a ping
                // socket where the address policy allows, refused elsewhere.
                if self.stack.addrs.v6.is_some_and(|v6| v6.is_virtual(dst)) {
                    self.echo6_reply(src, dst, ident, seq, icmp);
                    return;
                }
                match crate::nat::route6(&self.cfg, &self.local, SocketAddrV6::new(dst, 0, 0, 0)) {
                    Route::Host(_) => {
                        self.relay_echo(src.into(), dst.into(), ident, icmp, now);
                    }
                    Route::Dns | Route::Deny(_) => self.deny6(Deny::NotAllowed, src, 14, len),
                }
            }
            Action::NeighborSolicit { src, target } => {
                let tx = self.tap.tx();
                self.ndp
                    .neighbor_advert(&self.stack, src, target, src_mac, tx);
            }
            Action::NeighborAdvert => {
                let (rx, tx) = self.tap.split();
                self.stack.ingress(now, &rx[..len], tx, &mut self.services);
            }
            Action::RouterSolicit => self.ndp.router_advert(&self.stack, self.tap.tx()),
            Action::Tcp {
                src,
                dst,
                syn_only,
                ip_off,
            } => {
                let mut guest_mss = None;
                if let SocketAddr::V6(s6) = src {
                    let tx = self.tap.tx();
                    let ip = *s6.ip();
                    self.ndp
                        .learn(&mut self.stack, now, ip, src_mac, tx, &mut self.services);
                    if self.tap.offloads() {
                        guest_mss =
                            crate::stack::rewrite_syn_mss(&mut self.tap.rx_mut()[ip_off..len]);
                    }
                }
                if let Some(idx) = self.flows.tcp_slot(&(src, dst)) {
                    let mut len = len;
                    if !self
                        .flows
                        .charge_guest_data(idx, &self.tap.rx_mut()[ip_off..len])
                    {
                        // At the budget: take the ACK, not the data.
                        if let Some(n) = tcp::strip_payload(&mut self.tap.rx_mut()[ip_off..len]) {
                            len = ip_off + n;
                            self.flows.note_stripped();
                        }
                    }
                    let id = self.flows[idx].id;
                    if let Some(f) = self.flows.tcp_mut(idx) {
                        // On a published port: the guest's SYN-ACK.
                        f.set_guest_mss(guest_mss);
                        let (rx, tx) = self.tap.split();
                        f.note_guest_segment(&rx[ip_off..len]);
                        f.ingress(&mut self.stack, now, &rx[..len], tx);
                    }
                    self.flows.mark_dirty(idx, id);
                } else if syn_only {
                    self.tcp_open(src, dst, len, ip_off, guest_mss, now);
                } else {
                    // A stray segment: with no listener smoltcp answers RST.
                    self.stats.count_drop(DropReason::NoFlow);
                    let (rx, tx) = self.tap.split();
                    self.stack.ingress(now, &rx[..len], tx, &mut self.services);
                }
            }
        }
    }

    /// Answers a DHCP client message from the current TAP frame.
    /// Whether what the guest sent is for a service left on ([`Services`]).
    fn serves(&self, action: &Action) -> bool {
        let s = &self.cfg.services;
        match action {
            // New connections only: a published port's stack-path flow
            // (the guest answering a SYN) is not the guest opening one.
            Action::Tcp { syn_only, .. } => s.tcp || !*syn_only,
            Action::Udp { .. } => s.udp,
            Action::Echo { .. } | Action::Echo6 { .. } => s.icmp,
            Action::Dhcp { .. } => s.dhcp,
            Action::NeighborSolicit { .. } => s.ndp,
            Action::RouterSolicit => s.ra,
            Action::Drop(_) | Action::Arp | Action::NeighborAdvert => true,
        }
    }

    fn dhcp_request(&mut self, payload: Range<usize>) {
        let h = Header {
            eth_src: self.stack.mac,
            eth_dst: smoltcp::wire::EthernetAddress::BROADCAST,
            ident: self.stack.next_ident(),
        };
        let (rx, mut tx) = self.tap.split();
        let msg = &rx[payload];
        let dhcp = &mut self.dhcp;
        let mut res = Ok(None);
        tx.build(|buf| {
            let Some(out) = buf.get_mut(emit::UDP_PAYLOAD_OFFSET..) else {
                return 0;
            };
            res = dhcp.handle(msg, std::time::Instant::now(), out);
            match &res {
                Ok(Some(r)) => {
                    let h = Header {
                        eth_dst: smoltcp::wire::EthernetAddress(r.dst_mac),
                        ..h
                    };
                    emit::udp_frame(buf, &h, r.src, r.dst, r.len)
                }
                _ => 0,
            }
        });
        match res {
            Ok(Some(r)) => debug!(kind = ?r.kind, addr = %r.yiaddr, "dhcp"),
            Ok(None) => {}
            Err(e) => {
                self.stats.count_drop(DropReason::Dhcp);
                debug!(error = %e, "dhcp message dropped");
            }
        }
    }

    /// Starts a TCP flow for the SYN in the current TAP frame.
    fn tcp_open(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        len: usize,
        ip_off: usize,
        guest_mss: Option<u16>,
        now: Instant,
    ) {
        let hairpin = self.hairpin(crate::ports::Proto::Tcp, dst);
        let route = match hairpin {
            Some(t) => Route::Host(t),
            None => route_any(&self.cfg, &self.local, dst),
        };
        if matches!(route, Route::Dns) {
            self.refresh_upstreams();
        }
        let (target, bind) = match route {
            // A hairpin goes to rnet's own listener on the host's loopback;
            // it needs no outbound source address.
            Route::Host(t) if hairpin.is_some() => (t, None),
            Route::Host(t) => (t, self.cfg.outbound_bind(t.ip())),
            Route::Dns => match self.upstreams.first() {
                Some(t) => (*t, None),
                None => {
                    self.stats.count_drop(DropReason::Policy);
                    return;
                }
            },
            Route::Deny(d) => {
                self.deny_any(d, src.ip(), dst.ip(), ip_off, len);
                return;
            }
        };
        if let Some(what) = self.flows.tcp_refusal(src.ip()) {
            self.limit_reached(what);
            // No listener exists for this SYN, so smoltcp answers RST.
            let (rx, tx) = self.tap.split();
            self.stack.ingress(now, &rx[..len], tx, &mut self.services);
            return;
        }
        let (rx, tx) = self.tap.split();
        let frame = &rx[..len];
        let ip = &frame[ip_off..];
        match TcpFlow::open((src, dst), target, bind, ip) {
            Ok(mut f) => {
                f.set_guest_mss(guest_mss);
                f.note_guest_segment(ip);
                f.ingress(&mut self.stack, now, frame, tx);
                debug!(guest = %src, dst = %dst, %target, "tcp flow");
                if let Some((idx, id)) = self.add_tcp(Box::new(f), 0) {
                    self.flows.mark_dirty(idx, id);
                }
            }
            Err(e) => {
                debug!(guest = %src, dst = %dst, error = %e, "host connect failed at once");
                match (src, dst) {
                    (SocketAddr::V4(s4), SocketAddr::V4(d4)) => {
                        match tcp::connect_error_reply(&e) {
                            Some(code) => self.icmp_error(code, *d4.ip(), *s4.ip(), ip_off, len),
                            None => {
                                // No listener exists, so smoltcp resets the SYN.
                                self.stack.ingress(now, frame, tx, &mut self.services);
                            }
                        }
                    }
                    (SocketAddr::V6(s6), SocketAddr::V6(d6)) => {
                        match tcp::connect_error_reply6(&e) {
                            Some(code) => self.icmp6_error(code, *d6.ip(), *s6.ip(), ip_off, len),
                            None => self.stack.ingress(now, frame, tx, &mut self.services),
                        }
                    }
                    _ => {}
                }
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    self.stats.count_drop(DropReason::HostSocket);
                }
            }
        }
    }

    /// ICMP unreachable for the packet at `ip_off` in the current TAP frame.
    fn icmp_error(
        &mut self,
        code: Icmpv4DstUnreachable,
        from: Ipv4Addr,
        to: Ipv4Addr,
        ip_off: usize,
        len: usize,
    ) {
        let h = header(&mut self.stack);
        let (rx, mut tx) = self.tap.split();
        let orig = &rx[ip_off..len];
        tx.build(|buf| emit::dst_unreachable(buf, &h, from, to, code, orig));
    }

    /// Refuses the guest packet at `ip_off..len` of the current TAP frame:
    /// counts it and answers per the policy.
    fn deny(&mut self, d: Deny, guest: Ipv4Addr, dst: Ipv4Addr, ip_off: usize, len: usize) {
        self.stats.count_drop(DropReason::Policy);
        debug!(%guest, %dst, reason = ?d, "refused");
        let Some(code) = d.icmp_code() else { return };
        // The gateway reports, as the router on the path would.
        let from = self.stack.addrs.gateway;
        self.icmp_error(code, from, guest, ip_off, len);
    }

    /// ICMPv6 unreachable for the packet at `ip_off` in the current TAP frame.
    fn icmp6_error(
        &mut self,
        code: emit::Unreach6,
        from: Ipv6Addr,
        to: Ipv6Addr,
        ip_off: usize,
        len: usize,
    ) {
        let h = header(&mut self.stack);
        let (rx, mut tx) = self.tap.split();
        let Some(orig) = rx.get(ip_off..len) else {
            return;
        };
        tx.build(|buf| emit::dst_unreachable6(buf, &h, from, to, code, orig));
    }

    /// [`Self::deny`] for an IPv6 guest packet; the gateway (::2) reports.
    fn deny6(&mut self, d: Deny, guest: Ipv6Addr, ip_off: usize, len: usize) {
        self.stats.count_drop(DropReason::Policy);
        debug!(%guest, reason = ?d, "refused (ipv6)");
        let (Some(code), Some(v6)) = (d.icmp6_code(), self.stack.addrs.v6) else {
            return;
        };
        self.icmp6_error(code, v6.gateway, guest, ip_off, len);
    }

    /// [`Self::deny`] or [`Self::deny6`] by family.
    fn deny_any(&mut self, d: Deny, guest: IpAddr, dst: IpAddr, ip_off: usize, len: usize) {
        match (guest, dst) {
            (IpAddr::V4(g), IpAddr::V4(t)) => self.deny(d, g, t, ip_off, len),
            (IpAddr::V6(g), _) => self.deny6(d, g, ip_off, len),
            _ => self.stats.count_drop(DropReason::Policy),
        }
    }

    /// Answers an ICMPv6 echo request to one of rnet's own addresses.
    fn echo6_reply(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ident: u16,
        seq: u16,
        icmp: Range<usize>,
    ) {
        let h = header(&mut self.stack);
        let (rx, mut tx) = self.tap.split();
        let Some(data) = rx.get(icmp.start + 8..icmp.end) else {
            return;
        };
        tx.build(|buf| emit::echo6_reply(buf, &h, dst, src, ident, seq, data));
    }

    /// Sends a guest datagram from `src` to `target` through the flow of
    /// `src`; `shown` is the destination the guest used when the answers
    /// come from elsewhere (a hairpin).
    fn udp_out(
        &mut self,
        src: SocketAddr,
        target: SocketAddr,
        shown: Option<SocketAddr>,
        payload: Range<usize>,
        now: Instant,
    ) {
        if self.flows.udp_slot(&src).is_none() {
            // Eviction may close the flow a batch is waiting for.
            self.flush_udp_batch();
            self.make_room_for_udp(src.ip());
        }
        let idx = match self.flows.udp_slot(&src) {
            Some(i) => i,
            None => match UdpFlow::open(src, self.cfg.outbound_bind(src.ip()), now) {
                Ok(f) => {
                    let r = self.flows.insert_udp(f, self.poll.registry());
                    let Some(idx) = self.registered(r) else {
                        return;
                    };
                    let at =
                        now + Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
                    self.flows.schedule(idx, at);
                    idx
                }
                Err(e) => {
                    self.stats.count_drop(DropReason::HostSocket);
                    let wall = std::time::Instant::now();
                    if self
                        .last_udp_open_warn
                        .is_none_or(|t| wall.duration_since(t) >= StdDuration::from_secs(10))
                    {
                        self.last_udp_open_warn = Some(wall);
                        warn!(guest = %src, error = %e, "cannot open a UDP socket; the datagram is dropped (counted as `host_socket`; this message repeats at most every 10 s)");
                    }
                    return;
                }
            },
        };
        if let Flow::Udp(f) = &mut self.flows[idx].flow {
            f.note_send(target, shown, now);
        }
        match self.rx_udp_gso {
            Some(seg) => {
                // A super-frame from the guest: on in one segmented send.
                self.flush_udp_batch();
                let seg = usize::from(seg);
                let data = &self.tap.split().0[payload];
                if let Flow::Udp(f) = &self.flows[idx].flow {
                    let (sent, r) = udpio::send_segments(f.socket.as_fd(), target, data, seg);
                    self.udp_io.note_send(sent, data.len().div_ceil(seg));
                    self.udp_io.uso_in += 1;
                    if let Err(e) = r {
                        debug!(guest = %src, %target, error = %e, "udp send failed");
                        self.stats.count_drop(DropReason::HostSocket);
                    }
                }
            }
            None => {
                let data = &self.tap.split().0[payload.clone()];
                if self.udp_batch.push((idx, target), data) == Push::Flush {
                    self.flush_udp_batch();
                    let data = &self.tap.split().0[payload];
                    self.udp_batch.push((idx, target), data);
                }
            }
        }
        self.flows.udp_touch(idx);
    }

    /// Sends the gathered datagrams of one flow (one `UDP_SEGMENT` send
    /// where the kernel takes it).
    fn flush_udp_batch(&mut self) {
        let Some(((idx, target), data, seg, n)) = self.udp_batch.take() else {
            return;
        };
        let Some(Slot {
            flow: Flow::Udp(f), ..
        }) = self.flows.get(idx)
        else {
            return;
        };
        let (sent, r) = udpio::send_segments(f.socket.as_fd(), target, data, seg);
        self.udp_io.note_send(sent, n);
        if let Err(e) = r {
            debug!(guest = %f.guest, %target, error = %e, "udp send failed");
            self.stats.count_drop(DropReason::HostSocket);
        }
    }

    /// Sends a guest datagram to a port rnet publishes back through that
    /// port (hairpin); false if `dst` is not one.
    fn udp_hairpin(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Range<usize>,
        now: Instant,
    ) -> bool {
        match self.hairpin(crate::ports::Proto::Udp, dst) {
            Some(mut target) => {
                // IPv4 flow sockets bound to --outbound-addr cannot send to
                // loopback; that address is the host's too, so the
                // published socket takes the datagram there.
                if let (Some(out), SocketAddr::V4(t)) = (self.cfg.outbound_addr(), target)
                    && t.ip().is_loopback()
                {
                    target = SocketAddr::from((out, t.port()));
                }
                self.udp_out(src, target, Some(dst), payload, now);
                true
            }
            None => false,
        }
    }

    /// Follows `watch` (the resolv.conf the upstreams were read from):
    /// DNS queries pick up its changes.
    pub fn set_resolv_watch(&mut self, watch: ResolvWatch) {
        self.resolv = Some(watch);
    }

    /// Re-reads the upstreams if their resolv.conf changed (looked at most
    /// once a second). A file without nameservers keeps the old ones.
    fn refresh_upstreams(&mut self) {
        let Some(w) = self.resolv.as_mut() else {
            return;
        };
        match w.poll(std::time::Instant::now()) {
            None => {}
            Some(Ok(ups)) if ups.is_empty() => {
                warn!(path = %w.path().display(), "resolv.conf now lists no nameserver; keeping the previous DNS upstreams");
            }
            Some(Ok(ups)) if ups != self.upstreams => {
                let list: Vec<String> = ups.iter().map(ToString::to_string).collect();
                info!(path = %w.path().display(), upstreams = %list.join(","), "resolv.conf changed; new DNS upstreams");
                self.upstreams = ups;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(path = %w.path().display(), error = %e, "resolv.conf changed but cannot be read; keeping the previous DNS upstreams");
            }
        }
    }

    fn dns_query(&mut self, src: SocketAddr, payload: Range<usize>, now: Instant) {
        self.refresh_upstreams();
        if self.stats.dns_queries.load(Ordering::Relaxed) as usize >= MAX_DNS_QUERIES {
            self.stats.count_drop(DropReason::HostSocket);
            return;
        }
        let query = &self.tap.split().0[payload];
        match DnsQuery::start(src, query, &self.upstreams) {
            Ok(q) => {
                let r = self.flows.insert_dns(q, self.poll.registry());
                let Some(idx) = self.registered(r) else {
                    return;
                };
                let at = now + Duration::from_micros(self.cfg.dns_timeout.as_micros() as u64);
                self.flows.schedule(idx, at);
            }
            Err(e) => {
                debug!(guest = %src, error = %e, "dns query not forwarded");
                self.stats.count_drop(DropReason::HostSocket);
            }
        }
    }

    /// Relays a guest echo request (the ICMP or ICMPv6 message at `icmp`
    /// in the current TAP frame) through the ping socket of its identifier.
    fn relay_echo(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        icmp: Range<usize>,
        now: Instant,
    ) {
        if self.flows.icmp_full(&(src, ident)) {
            self.limit_reached("ICMP echo identifiers");
            return;
        }
        let idx = match self.flows.icmp_slot(&(src, ident)) {
            Some(i) => i,
            None => match IcmpFlow::open(src, ident, self.cfg.outbound_bind(src), now) {
                Ok(f) => {
                    let r = self.flows.insert_icmp(f, self.poll.registry());
                    let Some(idx) = self.registered(r) else {
                        return;
                    };
                    let at =
                        now + Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
                    self.flows.schedule(idx, at);
                    idx
                }
                Err(e) => {
                    self.stats.count_drop(DropReason::HostSocket);
                    if !self.ping_warned {
                        self.ping_warned = true;
                        // SAFETY: getegid has no preconditions.
                        let gid = unsafe { libc::getegid() };
                        warn!(
                            error = %e,
                            "ICMP echo to {dst} cannot be relayed: the host's net.ipv4.ping_group_range ({}) does not admit rnet's group {gid}; allow it with `sysctl -w net.ipv4.ping_group_range=\"{gid} {gid}\"` (echo to the gateway is still answered; this is logged once)",
                            icmp::ping_group_range()
                        );
                    }
                    return;
                }
            },
        };
        let msg = &self.tap.split().0[icmp];
        if let Flow::Icmp(f) = &mut self.flows[idx].flow
            && let Err(e) = f.send(dst, msg, now)
        {
            debug!(%dst, error = %e, "echo not relayed");
            self.stats.count_drop(DropReason::HostSocket);
        }
    }

    /// Puts a new flow in the table and registers its host socket under
    /// the flow's token. Returns its index and id, or None (counted) if
    /// epoll refuses the socket.
    fn add_flow(&mut self, flow: Flow, rule: u64) -> Option<(usize, u64)> {
        let r = self.flows.insert(flow, rule, self.poll.registry());
        self.registered(r)
    }

    /// [`Self::add_flow`] for a TCP flow (indexed, and counted as opened).
    fn add_tcp(&mut self, f: Box<TcpFlow>, rule: u64) -> Option<(usize, u64)> {
        let r = self.flows.insert_tcp(f, rule, self.poll.registry());
        self.registered(r)
    }

    /// The result of an insertion, with a refused registration counted.
    fn registered<T>(&self, r: io::Result<T>) -> Option<T> {
        r.map_err(|e| {
            warn!(error = %e, "cannot watch a host socket");
            self.stats.count_drop(DropReason::HostSocket);
        })
        .ok()
    }

    fn mark_dirty(&mut self, idx: usize, id: u64) {
        self.flows.mark_dirty(idx, id);
    }

    fn flow_event(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(slot) = self.flows.get_mut(idx) else {
            return;
        };
        let id = slot.id;
        match &mut slot.flow {
            Flow::Tcp(f) => f.host_ready(readable, writable),
            Flow::Splice(f) => f.host_event(readable, writable),
            Flow::Alias(parent, pid) => {
                let (parent, pid) = (*parent, *pid);
                if let Some(Slot {
                    flow: Flow::Splice(f),
                    id,
                    ..
                }) = self.flows.get_mut(parent)
                    && *id == pid
                {
                    f.guest_event(readable, writable);
                    self.mark_dirty(parent, pid);
                }
                return;
            }
            Flow::Udp(_)
            | Flow::Icmp(_)
            | Flow::Dns(_)
            | Flow::TcpListen(_)
            | Flow::UdpListen(_)
                if !readable =>
            {
                return;
            }
            _ => {}
        }
        self.mark_dirty(idx, id);
    }

    fn fire_timers(&mut self, now: Instant) {
        let idle = Duration::from_micros(self.cfg.udp_idle_timeout.as_micros() as u64);
        while let Some((idx, id)) = self.flows.pop_due(now) {
            let last_active = match &self.flows[idx].flow {
                Flow::Tcp(_) => {
                    self.flows.mark_dirty(idx, id);
                    continue;
                }
                Flow::Udp(f) => f.last_active,
                Flow::Icmp(f) => f.last_active,
                Flow::Dns(_) => {
                    self.dns_timeout(idx, now);
                    continue;
                }
                Flow::TcpListen(_) | Flow::UdpListen(_) | Flow::Splice(_) | Flow::Alias(..) => {
                    continue;
                }
            };
            let due = last_active + idle;
            if due <= now {
                self.remove(idx);
            } else {
                self.flows.schedule(idx, due);
            }
        }
    }

    /// A DNS query's upstream did not answer in time: asks the next one,
    /// or gives up.
    fn dns_timeout(&mut self, idx: usize, now: Instant) {
        let Some(Slot {
            flow: Flow::Dns(q), ..
        }) = self.flows.get_mut(idx)
        else {
            return;
        };
        let Some(mut old) = q.retry(&self.upstreams) else {
            self.remove(idx);
            return;
        };
        debug!(upstream = %self.upstreams[q.upstream], "dns upstream timed out; trying the next");
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut old);
        if let Err(e) = reg.register(&mut q.socket, flows::token(idx), Interest::READABLE) {
            warn!(error = %e, "cannot watch a host socket");
            self.stats.count_drop(DropReason::HostSocket);
            self.remove(idx);
            return;
        }
        let at = now + Duration::from_micros(self.cfg.dns_timeout.as_micros() as u64);
        self.flows.schedule(idx, at);
    }

    fn service_dirty(&mut self, now: Instant) {
        for (idx, id) in self.flows.take_dirty() {
            if !self.flows.begin_service(idx, id) {
                continue;
            }
            match &mut self.flows[idx].flow {
                Flow::Tcp(_) => self.service_tcp(idx, now),
                Flow::Udp(f) => {
                    let r = f.to_guest(
                        &self.cfg,
                        &self.local,
                        &mut self.stack,
                        &mut self.udp_rx,
                        self.tap.tx(),
                        &mut self.udp_io,
                        now,
                    );
                    for _ in 0..r.filtered {
                        self.stats.count_drop(DropReason::Filtered);
                    }
                    self.flows.udp_touch(idx);
                    if r.more {
                        self.mark_dirty(idx, id);
                    }
                }
                Flow::Icmp(f) => f.to_guest(&self.cfg, &mut self.stack, self.tap.tx(), now),
                Flow::TcpListen(_) => self.accept_tcp(idx, now),
                Flow::Splice(f) => {
                    if f.service() == crate::nat::splice::SpliceStep::Done {
                        self.remove(idx);
                    }
                }
                Flow::Alias(..) => {}
                Flow::UdpListen(_) => self.udp_from_clients(idx, now),
                Flow::Dns(q) => {
                    let dns = match (q.guest, self.stack.addrs.v6) {
                        (SocketAddr::V6(_), Some(v6)) => SocketAddr::from((v6.dns, 53)),
                        _ => SocketAddr::from((self.stack.addrs.dns, 53)),
                    };
                    // Read until the answer or nothing is left (edge-
                    // triggered); other datagrams are counted.
                    loop {
                        match q.to_guest(dns, &mut self.stack, self.tap.tx()) {
                            Reply::Answer => {
                                self.remove(idx);
                                break;
                            }
                            Reply::Mismatch => self.stats.count_drop(DropReason::DnsMismatch),
                            Reply::Empty => break,
                        }
                    }
                }
            }
        }
        self.flows.resume_paused();
        self.stats
            .frames_out
            .store(self.tap.out_counters().frames, Ordering::Relaxed);
    }

    fn service_tcp(&mut self, idx: usize, now: Instant) {
        let Some((step, mut room)) = self.flows.service_tcp_host(idx) else {
            return;
        };
        let remove = match step {
            Step::Keep => false,
            Step::Remove => true,
            Step::ConnectFailed(e) => {
                let Some(f) = self.flows.tcp_mut(idx) else {
                    return;
                };
                match dns::tcp_failover(f.key.1, f.target, &self.stack.addrs, &self.upstreams) {
                    Some(next) => {
                        debug!(failed = %f.target, %next, error = %e, "dns over tcp: trying the next upstream");
                        !self.retarget_tcp(idx, next)
                    }
                    None if self.refuse_tcp(idx, &e) => {
                        // Drop the flow silently: the guest got its answer.
                        self.remove(idx);
                        return;
                    }
                    None => true,
                }
            }
        };
        let Some(f) = self.flows.tcp_mut(idx) else {
            return;
        };
        f.egress(&mut self.stack, now, self.tap.tx());
        if remove {
            self.remove(idx);
            return;
        }
        // Sending may have freed room for more host data, and a close may
        // have completed; one more pass settles both without waiting.
        if matches!(f.service(&mut room), Step::Remove) {
            f.egress(&mut self.stack, now, self.tap.tx());
            self.remove(idx);
            return;
        }
        let release_at = self.flows.settle_tcp_memory(idx, now);
        let Some(f) = self.flows.tcp_mut(idx) else {
            return;
        };
        let at = match (f.poll_at(&mut self.stack, now), release_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            self.flows.schedule(idx, at.max(now));
        }
    }

    /// Moves the host side of the TCP flow at `idx` to the DNS upstream
    /// `next`; false (the guest side aborted) if that cannot start.
    fn retarget_tcp(&mut self, idx: usize, next: SocketAddr) -> bool {
        let Some(f) = self.flows.tcp_mut(idx) else {
            return false;
        };
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut f.host);
        let ok = f.retarget(next).is_ok()
            && reg
                .register(
                    &mut f.host,
                    flows::token(idx),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok();
        if !ok {
            f.abort_guest();
        }
        ok
    }

    /// The host connect of the TCP flow at `idx` failed with `e`: answers
    /// the guest's SYN with the ICMP error that matches, if any (true), or
    /// aborts the guest side (false).
    fn refuse_tcp(&mut self, idx: usize, e: &io::Error) -> bool {
        let Some(f) = self.flows.tcp_mut(idx) else {
            return false;
        };
        debug!(guest = %f.key.0, dst = %f.key.1, target = %f.target, error = %e, "host connect failed");
        let reply = match (f.key.0.ip(), f.key.1.ip()) {
            (IpAddr::V4(guest), IpAddr::V4(dst)) => tcp::connect_error_reply(e).map(|code| {
                let h = header(&mut self.stack);
                let quote = f.syn_quote();
                self.tap
                    .tx()
                    .build(|buf| emit::dst_unreachable(buf, &h, dst, guest, code, quote))
            }),
            (IpAddr::V6(guest), IpAddr::V6(_)) => tcp::connect_error_reply6(e)
                .zip(self.stack.addrs.v6)
                .map(|(code, v6)| {
                    let h = header(&mut self.stack);
                    let quote = f.syn_quote();
                    self.tap.tx().build(|buf| {
                        emit::dst_unreachable6(buf, &h, v6.gateway, guest, code, quote)
                    })
                }),
            _ => None,
        };
        if reply.is_none() {
            f.abort_guest();
        }
        reply.is_some()
    }

    /// Removes the flow at `idx`, with what the flow table does not own:
    /// a splice's alias slot and byte counts, a listener's UDP clients.
    fn remove(&mut self, idx: usize) {
        match self.flows.remove(idx, self.poll.registry()) {
            Some(Flow::Splice(f)) => {
                let (up, down) = f.bytes();
                self.spliced_closed.0 += up;
                self.spliced_closed.1 += down;
                debug!(up, down, "spliced connection closed");
                if let Some(client) = f.transparent_client {
                    self.fast.release(client);
                }
                if let Some(alias) = self.splice_alias.remove(&idx) {
                    self.flows.remove(alias, self.poll.registry());
                }
            }
            Some(Flow::UdpListen(_)) => self.forget_udp_clients_of(idx),
            _ => {}
        }
    }

    /// Enables the fast path for published TCP ports: the loop starts an
    /// agent inside `target`'s namespaces when it starts running.
    pub fn enable_fast_ports(&mut self, target: crate::ns::Target) {
        self.fast.enable(target);
    }

    /// Counts a refusal caused by a state bound and says so, at most every
    /// ten seconds.
    fn limit_reached(&mut self, what: &str) {
        self.stats.count_drop(DropReason::Limit);
        let now = std::time::Instant::now();
        if self
            .last_limit_warn
            .is_none_or(|t| now.duration_since(t) >= StdDuration::from_secs(10))
        {
            self.last_limit_warn = Some(now);
            warn!(
                limit = what,
                "state limit reached: new flows are refused or the oldest evicted (drops counted as `limit`; this message repeats at most every 10 s)"
            );
        }
    }

    /// Before a new UDP flow for `guest`: if a bound is reached, evicts the
    /// least recently active flow (see [`FlowTable::udp_victim`]).
    fn make_room_for_udp(&mut self, guest: IpAddr) {
        if let Some((idx, what)) = self.flows.udp_victim(guest) {
            self.limit_reached(what);
            self.remove(idx);
        }
    }

    /// Everything `rnet status` shows, as JSON (see [`crate::status`]).
    pub(crate) fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let mut tcp: BTreeMap<String, u64> = BTreeMap::new();
        let (mut spliced, mut udp, mut icmp, mut dns) = (0u64, 0u64, 0u64, 0u64);
        let (mut up, mut down) = self.spliced_closed;
        let mut conns: HashMap<u64, u64> = HashMap::new();
        for (_, slot) in self.flows.iter() {
            match &slot.flow {
                Flow::Tcp(f) => *tcp.entry(format!("{}", f.state())).or_default() += 1,
                Flow::Splice(f) => {
                    spliced += 1;
                    let (u, d) = f.bytes();
                    up += u;
                    down += d;
                }
                Flow::Udp(_) => udp += 1,
                Flow::Icmp(_) => icmp += 1,
                Flow::Dns(_) => dns += 1,
                _ => continue,
            }
            if slot.rule != 0 {
                *conns.entry(slot.rule).or_default() += 1;
            }
        }
        let s = self.stats.snapshot();
        let mem = self.flows.mem();
        let out = self.tap.out_counters();
        let drops: serde_json::Map<String, serde_json::Value> = s
            .drops
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let ports: Vec<serde_json::Value> = self
            .rules
            .values()
            .map(|r| {
                let p = &r.info;
                json!({
                    "id": p.id,
                    "proto": p.spec.proto.as_str(),
                    "host_addr": p.spec.host_ip.to_string(),
                    "host_port": p.spec.host_port,
                    "guest_addr": p.guest_ip.to_string(),
                    "guest_port": p.spec.guest_port,
                    "count": p.spec.count,
                    "path": p.path,
                    "connections": conns.get(&p.id).copied().unwrap_or(0),
                })
            })
            .collect();
        json!({
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "tap": {
                "frames_in": s.frames_in,
                "bytes_in": s.bytes_in,
                "frames_out": out.frames,
                "bytes_out": out.bytes,
                "offloads": self.tap.offloads(),
                "uso": self.tap.uso(),
            },
            "udp_io": self.udp_io.json(),
            "flows": {
                "tcp": tcp,
                "tcp_spliced": spliced,
                "udp": udp,
                "icmp": icmp,
                "dns": dns,
                "udp_clients": self.udp_return.len(),
            },
            "tcp_opened": s.tcp_opened,
            "tcp_memory": {
                "budget": mem.budget,
                "resident": mem.used,
                "peak": mem.peak,
                "paused_flows": mem.paused.len(),
                "pauses": mem.pauses,
                "resumes": mem.resumes,
                "guest_data_deferred": mem.stripped,
            },
            "spliced_bytes": { "to_guest": up, "from_guest": down },
            "drops": drops,
            "ports": ports,
            "agent": self.fast.status(),
            "restarts": crate::supervise::restarts(),
        })
    }

    /// Starts the fast-path agent now rather than when the loop starts:
    /// it must be forked before the sandbox, which forbids fork and setns.
    /// The loop's own attempt is then a no-op.
    pub fn start_agent_now(&mut self) {
        self.start_agent();
    }

    /// Runs under a supervisor: [`Engine::publish_initial`] adopts what
    /// it kept.
    pub(crate) fn set_worker(&mut self, w: crate::supervise::Worker) {
        self.worker = Some(w);
    }

    /// Tells the loop the guest's MAC before it has seen a frame.
    pub fn set_guest_mac(&mut self, mac: [u8; 6]) {
        self.stack.guest_mac = Some(smoltcp::wire::EthernetAddress(mac));
        if crate::supervise::restarts() > 0 {
            // A restarted data plane: the guest's caches still point at
            // the gateway and will not ARP again for a while, so smoltcp
            // learns the guest from a synthetic ARP reply, or the first
            // SYN-ACK would wait for its own ARP exchange (a lost SYN).
            let (gw, guest) = (self.cfg.gateway().octets(), self.cfg.guest().octets());
            let mut f = [0u8; 42];
            f[0..6].copy_from_slice(&self.stack.mac.0);
            f[6..12].copy_from_slice(&mac);
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
            f[22..28].copy_from_slice(&mac);
            f[28..32].copy_from_slice(&guest);
            f[32..38].copy_from_slice(&self.stack.mac.0);
            f[38..42].copy_from_slice(&gw);
            let (_, tx) = self.tap.split();
            self.stack.ingress(stack::now(), &f, tx, &mut self.services);
        }
    }

    /// Logs one summary line; called once before the loop starts.
    pub fn log_summary(&self, tap_name: &str) {
        let c = &self.cfg;
        let ups: Vec<String> = self.upstreams.iter().map(|u| u.to_string()).collect();
        info!(
            tap = tap_name,
            mtu = c.mtu(),
            network = %c.cidr(),
            guest = %c.guest(),
            gateway = %c.gateway(),
            dns = %c.dns(),
            host_loopback = if c.allow_host_loopback() { "allowed" } else { "blocked" },
            outbound = %c.outbound(),
            dns_upstreams = %if c.disable_dns() { "disabled".to_string() } else { ups.join(",") },
            offloads = if self.tap.offloads() { "tso,csum" } else { "off" },
            busy_poll_us = self.busy_poll_us,
            "network ready"
        );
        if !c.host_aliases().is_empty() {
            let a: Vec<String> = c.host_aliases().iter().map(|a| a.to_string()).collect();
            info!(aliases = %a.join(","), "these addresses reach the host's loopback");
        }
        if let (Some(p), Some(g), Some(d), Some(guest)) = (
            c.ipv6_prefix(),
            c.ipv6_gateway(),
            c.ipv6_dns(),
            c.ipv6_guest(),
        ) {
            info!(prefix = %format!("{p}/64"), %guest, gateway = %g, dns = %d, "ipv6 ready");
        }
    }
}

fn header(stack: &mut Stack) -> Header {
    Header {
        eth_src: stack.mac,
        eth_dst: stack
            .guest_mac
            .unwrap_or(smoltcp::wire::EthernetAddress::BROADCAST),
        ident: stack.next_ident(),
    }
}

/// The DHCP server's settings: the network's defaults, with the gateway,
/// DNS forwarder and (when set explicitly) the guest's one address.
fn dhcp_config(cfg: &Config, net: crate::config::Ipv4Cidr, mtu: u32) -> DhcpConfig {
    let mut d = DhcpConfig::new(
        net.network(),
        net.prefix(),
        u16::try_from(mtu).unwrap_or(u16::MAX),
    );
    d.server = cfg.gateway();
    d.router = cfg.gateway();
    d.dns = cfg.dns();
    d.dns_servers = cfg.dns_announced_v4().collect();
    d.search = cfg.search_domains().to_vec();
    if cfg.guest_is_explicit() {
        d.first = cfg.guest();
        d.pool_size = 1;
    }
    d
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a caller-provided fd; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long the loop keeps polling after traffic, in microseconds: the
/// configured time, or none with a single CPU, where spinning would only
/// delay the guest or the host peer rnet is waiting for.
fn busy_poll_us(cfg: &Config) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return 0;
    }
    cfg.busy_poll().as_micros() as u64
}
