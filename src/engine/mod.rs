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
//!    ([`crate::wire::classify`]), marking the flows it touched dirty;
//! 3. fires due timers (TCP retransmissions, idle UDP flows, DNS failover);
//! 4. services each dirty flow once: moves bytes between its smoltcp socket
//!    and its host socket, lets it transmit, and re-arms its timer.
//!
//! Work per frame is a classification, one or two hash lookups and smoltcp
//! processing against a one-socket set, independent of the number of flows.
//! Timers live in a binary heap with lazy invalidation.
//!
//! # Layout
//!
//! - this file: the loop, its set-up and the status it reports;
//! - [`flows`]: the [`flows::FlowTable`] (slab, indices, timers, dirty
//!   list, state bounds, TCP ring budget) and its invariants;
//! - [`dispatch`]: step 2, what each guest frame's verdict leads to;
//! - [`service`]: steps 3 and 4, timers and dirty flows;
//! - `ports`: the publishing side (rules, listeners, the fast path).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration as StdDuration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::SocketSet;
use smoltcp::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::nat::local::LocalAddrs;
use crate::nat::tcp::TcpFlow;
use crate::nat::udpio::{self, GsoBatch, RecvBatch};
use crate::phy::tap::{ReadOutcome, Tap};
use crate::ports::fastpath::{self, FastPath};
pub(crate) use crate::ports::listeners::Command;
use crate::ports::listeners::Publisher;
use crate::services::dhcp::{DhcpConfig, DhcpServer};
use crate::services::dns::ResolvWatch;
use crate::stack::ndp::Ndp;
use crate::stack::{self, Stack};
use crate::stats::{DropReason, Stats};
use crate::wire::emit::Header;

mod dispatch;
mod flows;
mod ports;
mod service;

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
pub(super) const MAX_DNS_QUERIES: usize = 1024;

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
    commands: mpsc::SyncSender<Command>,
}

impl Control {
    /// Asks the loop to end and wakes it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Hands a request to the loop and wakes it, without ever waiting:
    /// a full queue is `PortError::Busy`, a loop that is gone
    /// `PortError::Stopped`.
    pub(crate) fn send(&self, cmd: Command) -> Result<(), crate::ports::PortError> {
        use crate::ports::PortError;
        self.commands.try_send(cmd).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => PortError::Busy,
            mpsc::TrySendError::Disconnected(_) => PortError::Stopped,
        })?;
        self.waker.wake().map_err(|_| PortError::Stopped)
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
    /// The published rules and published-UDP clients.
    ports: Publisher,
    commands: mpsc::Receiver<Command>,
    next_sweep: Instant,
    dhcp: DhcpServer,
    /// The in-namespace agent for fast published ports.
    fast: FastPath,
    started: std::time::Instant,
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
        let (commands_tx, commands) = mpsc::sync_channel(crate::handle::COMMAND_QUEUE);
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
                let fd = crate::sys::pidfd_open(p)?;
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
            crate::sys::set_nonblocking(fd)?;
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
            ports: Publisher::default(),
            commands,
            next_sweep: stack::now(),
            dhcp,
            fast: FastPath::default(),
            started: std::time::Instant::now(),
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
                    t @ (fastpath::AGENT | fastpath::LAUNCHER) => self.agent_event(t, now),
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

    /// Follows `watch` (the resolv.conf the upstreams were read from):
    /// DNS queries pick up its changes.
    pub fn set_resolv_watch(&mut self, watch: ResolvWatch) {
        self.resolv = Some(watch);
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

    /// Removes the flow at `idx`, with what the flow table does not own:
    /// a splice's alias slot and byte counts, a listener's UDP clients.
    fn remove(&mut self, idx: usize) {
        match self.flows.remove(idx, self.poll.registry()) {
            Some(Flow::Splice(f)) => {
                let (up, down) = f.bytes();
                self.ports.spliced_closed.0 += up;
                self.ports.spliced_closed.1 += down;
                debug!(up, down, "spliced connection closed");
                if let Some(client) = f.transparent_client {
                    self.fast.release(client);
                }
                if let Some(alias) = self.ports.splice_alias.remove(&idx) {
                    self.flows.remove(alias, self.poll.registry());
                }
            }
            Some(Flow::UdpListen(_)) => self.ports.forget_udp_clients_of(idx),
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

    /// Everything `rnet status` shows (see [`crate::status`]).
    pub(crate) fn status(&self) -> crate::status::StatusReport {
        use crate::status::{
            FlowCounts, PortStatus, SplicedBytes, StatusReport, TapStatus, TcpMemory,
        };
        let mut tcp: BTreeMap<String, u64> = BTreeMap::new();
        let (mut spliced, mut udp, mut icmp, mut dns) = (0u64, 0u64, 0u64, 0u64);
        let (mut up, mut down) = self.ports.spliced_closed;
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
        let ports = self
            .ports
            .infos()
            .map(|p| PortStatus {
                id: p.id,
                proto: p.spec.proto,
                host_addr: p.spec.host_ip,
                host_port: p.spec.host_port,
                guest_addr: p.guest_ip,
                guest_port: p.spec.guest_port,
                count: p.spec.count,
                path: p.path.to_string(),
                connections: conns.get(&p.id).copied().unwrap_or(0),
            })
            .collect();
        StatusReport {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            tap: TapStatus {
                frames_in: s.frames_in,
                bytes_in: s.bytes_in,
                frames_out: out.frames,
                bytes_out: out.bytes,
                offloads: self.tap.offloads(),
                uso: self.tap.uso(),
                udp_tunnel_gso: self.tap.tunnel_gso(),
                tunnel_frames_in: self.tap.tunnel_frames(),
            },
            udp_io: self.udp_io,
            flows: FlowCounts {
                tcp,
                tcp_spliced: spliced,
                udp,
                icmp,
                dns,
                udp_clients: self.ports.udp_clients() as u64,
            },
            tcp_opened: s.tcp_opened,
            tcp_memory: TcpMemory {
                budget: mem.budget as u64,
                resident: mem.used as u64,
                peak: mem.peak as u64,
                paused_flows: mem.paused.len() as u64,
                pauses: mem.pauses,
                resumes: mem.resumes,
                guest_data_deferred: mem.stripped,
            },
            spliced_bytes: SplicedBytes {
                to_guest: up,
                from_guest: down,
            },
            drops: s.drops.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ports,
            agent: self.fast.status(),
            restarts: crate::supervise::restarts(),
        }
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

#[cfg(test)]
mod tests;
