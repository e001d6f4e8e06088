//! A hostile guest: floods, malformed frames, ARP spoofing and packets aimed
//! at the host's loopback, written raw on the TAP by tests/guest/hostile.py.
//!
//! Network rule: floods go only to 10.0.2.2 (the host's loopback, with
//! --allow-host-loopback) or to a test host this file creates and allows;
//! every rnet runs with an outbound allow-list and a loopback DNS upstream
//! (see `common::Rnet`). Each flood is bounded in count and in time.
//!
//! Ceilings: rnet's resident memory must stay under [`RSS_CEILING_KIB`]
//! (128 MiB) through a flood. An idle rnet holds about 6 MiB, and the
//! floods here leave no data in flight, so the only memory they may cost is
//! per-flow bookkeeping up to the caps of `Limits` (1,024 half-open TCP
//! flows, 8,192 UDP flows); 128 MiB is about 20 times the idle figure and
//! far below what a node can spare.
//!
//! The API's "a silent client blocks nobody" case is
//! `api_silent_client_blocks_nobody` in tests/ports.rs; it is not repeated
//! here.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

/// Resident memory rnet may reach during a flood (see the module docs).
const RSS_CEILING_KIB: u64 = 128 * 1024;
/// Bound of each flood (the guest script stops by itself after this).
const FLOOD_SECS: u64 = 30;
/// rnet's default UDP flow cap (`Limits::udp_flows`).
const UDP_FLOW_CAP: u64 = 8192;

fn hostile() -> String {
    guest_script("hostile.py")
}

/// A guest namespace served by `rnet attach` with a control socket.
struct Guest {
    target: Target,
    rnet: Proc,
    api: TempPath,
}

impl Guest {
    fn start(rnet: Rnet) -> Guest {
        let target = Target::userns();
        let api = TempPath::new("api");
        let rnet = rnet.arg("--api-socket").arg(&api.0).attach(target.pid());
        Guest { target, rnet, api }
    }

    fn api(&self) -> &Path {
        &self.api.0
    }

    fn status(&self) -> Value {
        status_json(self.api())
    }

    fn drops(&self) -> BTreeMap<String, u64> {
        drop_counts(&self.status())
    }

    /// Runs a guest command to completion.
    fn run(&self, args: &[&str], timeout: Duration) -> Output {
        run(&mut self.target.exec(args), timeout)
    }

    /// Runs tests/guest/hostile.py with `args` and expects success.
    #[track_caller]
    fn script(&self, args: &[&str], timeout: Duration) -> Output {
        let script = hostile();
        let mut a = vec![PYTHON, script.as_str()];
        a.extend_from_slice(args);
        let out = self.run(&a, timeout);
        out.assert_success(&format!("hostile.py {}", args[0]));
        out
    }

    fn running(&mut self) -> bool {
        self.rnet.wait_timeout(Duration::ZERO).is_none()
    }

    /// Stops rnet and returns its output (stderr holds its log).
    fn stop(mut self) -> Output {
        self.rnet.signal(libc::SIGTERM);
        self.rnet.stop(secs(10)).1
    }
}

/// Samples rnet's VmRSS every 100 ms on a thread until dropped; keeps the
/// maximum (KiB).
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(k) = proc_kib(pid, "VmRSS") {
                    m.fetch_max(k, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            max,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.max.load(Ordering::SeqCst)
    }
}

/// The long-lived connection through the gateway to a host echo server,
/// opened before a flood (tests/guest/hostile.py hold).
struct Held {
    proc: LineProc,
}

/// One "tick N EXCHANGES MAX_GAP_MS UNIX_TIME" line of the hold client.
#[derive(Debug, Clone, Copy)]
struct Tick {
    exchanges: u64,
    gap_ms: f64,
    at: f64,
}

fn parse_tick(l: &str) -> Option<Tick> {
    let f: Vec<&str> = l.split_whitespace().collect();
    if f.len() != 5 || f[0] != "tick" {
        return None;
    }
    Some(Tick {
        exchanges: f[2].parse().ok()?,
        gap_ms: f[3].parse().ok()?,
        at: f[4].parse().ok()?,
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Held {
    fn open(g: &Guest, echo: SocketAddr) -> Held {
        let script = hostile();
        let port = echo.port().to_string();
        let mut proc = LineProc::spawn(
            &mut g
                .target
                .exec(&[PYTHON, &script, "hold", GATEWAY, &port, "300"]),
        );
        proc.wait_line("connected", secs(20), |l| l == "connected");
        proc.wait_line("first tick", secs(20), |l| parse_tick(l).is_some());
        Held { proc }
    }

    /// Every tick from now until one stamped at least `n` ticks after
    /// `after` (unix time) has been seen.
    fn ticks_until(&mut self, after: f64, n: usize) -> Vec<Tick> {
        let mut all = Vec::new();
        let mut later = 0;
        while later < n {
            let l = self
                .proc
                .wait_line("tick", secs(20), |l| parse_tick(l).is_some());
            let t = parse_tick(&l).unwrap();
            if t.at > after {
                later += 1;
            }
            all.push(t);
        }
        all
    }

    /// Stops the client (SIGTERM: it prints its summary) and returns it.
    fn close(mut self) -> Output {
        self.proc.stop(secs(10))
    }
}

/// What a flood script printed.
fn flood_figures(out: &Output) -> Value {
    let line = out.stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("flood output {line:?}: {e}: {out}"))
}

/// Checks the held connection across a flood from `t0` to `t1` (unix
/// times): it exchanged data during the flood and after it, and never
/// waited `max_gap` or more for an echo. Returns the failures.
fn check_held(
    mut held: Held,
    t0: f64,
    t1: f64,
    max_gap_ms: f64,
    fails: &mut Vec<String>,
) -> String {
    let ticks = held.ticks_until(t1, 3);
    let during: Vec<&Tick> = ticks.iter().filter(|t| t.at >= t0 && t.at <= t1).collect();
    let after: Vec<&Tick> = ticks.iter().filter(|t| t.at > t1).collect();
    let worst = ticks.iter().map(|t| t.gap_ms).fold(0.0, f64::max);
    let out = held.close();
    let summary = out.stdout.lines().last().unwrap_or("").to_string();
    if during.is_empty() && t1 - t0 > 2.0 {
        fails.push(format!(
            "held connection: no exchange completed during the {:.1} s flood",
            t1 - t0
        ));
    }
    if after.len() < 3 {
        fails.push("held connection: fewer than 3 ticks after the flood".into());
    }
    if worst >= max_gap_ms {
        fails.push(format!(
            "held connection: an echo took {worst:.0} ms (limit {max_gap_ms:.0} ms)"
        ));
    }
    if !summary.contains("\"errors\": 0") {
        fails.push(format!("held connection failed: {out}"));
    }
    let (first, last) = (
        ticks.first().map_or(0, |t| t.exchanges),
        ticks.last().map_or(0, |t| t.exchanges),
    );
    if last <= first {
        fails.push(format!("held connection: exchanges stuck at {first}"));
    }
    format!(
        "exchanges {first} -> {last}; {} ticks during the flood, {} after; longest wait \
         {worst:.0} ms; summary {summary}",
        during.len(),
        after.len()
    )
}

#[track_caller]
fn assert_no_fails(what: &str, fails: &[String], report: &str) {
    assert!(
        fails.is_empty(),
        "{what}: {} failure(s):\n  - {}\n{report}",
        fails.len(),
        fails.join("\n  - ")
    );
}

fn guest_ip(g: &Guest, args: &[&str]) {
    let mut a = vec!["ip"];
    a.extend_from_slice(args);
    g.run(&a, secs(10))
        .assert_success(&format!("guest ip {args:?}"));
}

// ---------------------------------------------------------------- 1. SYN flood

/// SYNs to every port of 10.0.2.2 (less the host's listening ports) and of
/// a test host that drops them (so the host connects stay half-open and the
/// half-open cap is reached): more than 100,000 destinations. rnet's RSS
/// stays under the ceiling, the half-open cap refuses the excess (`limit`
/// drops), and a connection opened before the flood keeps exchanging data.
#[test]
fn syn_flood_100k_ports() {
    require!(require_root);
    if !require_program(module_path_test!(), "iptables") {
        return;
    }
    let th = TestHost::create();
    // The test host drops every TCP segment: connects to it stay half-open.
    let out = run(
        Command::new("ip").args([
            "netns", "exec", &th.ns, "iptables", "-A", "INPUT", "-p", "tcp", "-j", "DROP",
        ]),
        secs(30),
    );
    out.assert_success("iptables DROP in the test host");

    let echo = TcpEcho::start();
    let mut g = Guest::start(Rnet::new().allow_host_loopback().outbound_allow(&th.cidr()));
    // A TAP queue deeper than the flood's window of unanswered SYNs, so the
    // guest kernel drops none of them on the way to rnet.
    guest_ip(&g, &["link", "set", "tap0", "txqueuelen", "4096"]);
    let held = Held::open(&g, echo.addr);

    let skip: Vec<String> = host_tcp_listen_ports().iter().map(u16::to_string).collect();
    let skip = if skip.is_empty() {
        "-".to_string()
    } else {
        skip.join(",")
    };
    let before = g.status();
    let rss0 = proc_kib(g.rnet.pid(), "VmRSS").unwrap();
    let sampler = RssSampler::start(g.rnet.pid());
    let t0 = unix_now();
    let flood = g.script(
        &[
            "synflood",
            "tap0",
            &FLOOD_SECS.to_string(),
            &skip,
            "10.0.2.2:1-65535",
            &format!("{}:1-65535", th.addr),
        ],
        secs(FLOOD_SECS + 60),
    );
    let t1 = unix_now();
    let fig = flood_figures(&flood);
    let mut fails = Vec::new();
    let held_report = check_held(held, t0, t1, 5000.0, &mut fails);
    let rss_max = sampler.finish();
    let hwm = proc_kib(g.rnet.pid(), "VmHWM").unwrap_or(0);
    let rss_end = proc_kib(g.rnet.pid(), "VmRSS").unwrap_or(0);
    let alive = g.running();
    let after = g.status();

    let sent = fig["sent"].as_u64().unwrap_or(0);
    let frames = after["tap"]["frames_in"].as_u64().unwrap_or(0)
        - before["tap"]["frames_in"].as_u64().unwrap_or(0);
    let drops = drops_diff(&drop_counts(&before), &drop_counts(&after));
    let limit = drops.get("limit").copied().unwrap_or(0);
    let report = format!(
        "SYN flood: {fig}\n  frames rnet read during it {frames}; drops added {drops:?}\n  \
         flows after {}\n  rnet RSS before {:.1} MiB, max sampled {:.1} MiB, VmHWM {:.1} MiB, \
         end {:.1} MiB (ceiling {:.0} MiB)\n  held connection: {held_report}",
        after["flows"],
        mib(rss0),
        mib(rss_max),
        mib(hwm),
        mib(rss_end),
        mib(RSS_CEILING_KIB)
    );
    eprintln!("{report}");

    if sent < 100_000 {
        fails.push(format!("only {sent} SYNs sent within {FLOOD_SECS} s"));
    }
    if frames < 100_000 {
        fails.push(format!("rnet read only {frames} frames during the flood"));
    }
    if limit == 0 {
        fails.push("no `limit` drop counted".into());
    }
    if !alive {
        fails.push("rnet exited".into());
    }
    if rss_max.max(hwm) > RSS_CEILING_KIB {
        fails.push(format!(
            "rnet RSS reached {:.1} MiB (ceiling {:.0} MiB)",
            mib(rss_max.max(hwm)),
            mib(RSS_CEILING_KIB)
        ));
    }
    let out = g.stop();
    if out.stderr.contains("panicked") {
        fails.push(format!("rnet panicked: {out}"));
    }
    assert_no_fails("SYN flood", &fails, &report);
}

// ---------------------------------------------------------------- 2. UDP flood

/// 20,000 guest UDP endpoints (three guest addresses) to one host UDP
/// echo server behind 10.0.2.2: UDP flows stay at or below the cap (the
/// least recently used are evicted, counted as `limit`), RSS stays under
/// the ceiling, and a TCP connection opened before keeps working.
#[test]
fn udp_flood_20k_endpoints() {
    require!(require_userns);
    let echo = TcpEcho::start();
    // An echo server rather than a silent sink: each reply tells the guest
    // script rnet has handled its datagram (the flood is self-clocked).
    let sink = UdpEcho::start();
    let mut g = Guest::start(Rnet::new().allow_host_loopback());
    guest_ip(&g, &["link", "set", "tap0", "txqueuelen", "4096"]);
    let held = Held::open(&g, echo.addr);

    let before = g.status();
    let rss0 = proc_kib(g.rnet.pid(), "VmRSS").unwrap();
    let sampler = RssSampler::start(g.rnet.pid());
    // Poll the UDP flow count while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let api = g.api().to_path_buf();
    let (s2, api2) = (stop.clone(), api.clone());
    let flows_poll = thread::spawn(move || {
        let (mut max, mut n) = (0u64, 0u32);
        while !s2.load(Ordering::SeqCst) {
            let s = status_json(&api2);
            max = max.max(s["flows"]["udp"].as_u64().unwrap_or(0));
            n += 1;
            thread::sleep(Duration::from_millis(200));
        }
        (max, n)
    });
    let t0 = unix_now();
    let flood = g.script(
        &[
            "udpflood",
            "tap0",
            &FLOOD_SECS.to_string(),
            GATEWAY,
            &sink.addr.port().to_string(),
            "10.0.2.100:8000",
            "10.0.2.101:6000",
            "10.0.2.102:6000",
        ],
        secs(FLOOD_SECS + 60),
    );
    let t1 = unix_now();
    stop.store(true, Ordering::SeqCst);
    let (udp_max, polls) = flows_poll.join().unwrap();
    let fig = flood_figures(&flood);
    let mut fails = Vec::new();
    let held_report = check_held(held, t0, t1, 5000.0, &mut fails);
    let rss_max = sampler.finish();
    let hwm = proc_kib(g.rnet.pid(), "VmHWM").unwrap_or(0);
    let rss_end = proc_kib(g.rnet.pid(), "VmRSS").unwrap_or(0);
    let alive = g.running();
    let after = g.status();
    let udp_end = after["flows"]["udp"].as_u64().unwrap_or(0);
    let drops = drops_diff(&drop_counts(&before), &drop_counts(&after));
    let limit = drops.get("limit").copied().unwrap_or(0);
    let report = format!(
        "UDP flood: {fig}\n  host echo server saw {} datagrams; drops added {drops:?}\n  \
         UDP flows: max {udp_max} over {polls} status polls, {udp_end} at the end (cap {UDP_FLOW_CAP})\n  \
         rnet RSS before {:.1} MiB, max sampled {:.1} MiB, VmHWM {:.1} MiB, end {:.1} MiB \
         (ceiling {:.0} MiB)\n  held connection: {held_report}",
        sink.datagrams.load(Ordering::SeqCst),
        mib(rss0),
        mib(rss_max),
        mib(hwm),
        mib(rss_end),
        mib(RSS_CEILING_KIB)
    );
    eprintln!("{report}");

    if fig["sent"].as_u64().unwrap_or(0) < 20_000 {
        fails.push("fewer than 20,000 datagrams sent".into());
    }
    if udp_max.max(udp_end) > UDP_FLOW_CAP {
        fails.push(format!(
            "UDP flows reached {} (cap {UDP_FLOW_CAP})",
            udp_max.max(udp_end)
        ));
    }
    if limit == 0 {
        fails.push("no `limit` drop (eviction) counted".into());
    }
    if !alive {
        fails.push("rnet exited".into());
    }
    if rss_max.max(hwm) > RSS_CEILING_KIB {
        fails.push(format!(
            "rnet RSS reached {:.1} MiB (ceiling {:.0} MiB)",
            mib(rss_max.max(hwm)),
            mib(RSS_CEILING_KIB)
        ));
    }
    let out = g.stop();
    if out.stderr.contains("panicked") {
        fails.push(format!("rnet panicked: {out}"));
    }
    assert_no_fails("UDP flood", &fails, &report);
}

// ---------------------------------------------------------------- 3. malformed frames

/// Each malformed frame and the drop reasons that may count it.
const CASES: &[(&str, &[&str])] = &[
    ("trunc_ip", &["malformed"]),
    ("trunc_tcp", &["malformed"]),
    ("trunc_udp", &["malformed"]),
    ("trunc_arp", &["malformed"]),
    // Any reason will do for a frame beyond the MTU, as long as it is
    // dropped and counted (not `unsupported`: the guest kernel's own IPv6
    // chatter lands there).
    (
        "oversized",
        &[
            "malformed",
            "bad_checksum",
            "fragment",
            "not_for_us",
            "policy",
            "limit",
        ],
    ),
    ("bad_ip_csum", &["bad_checksum"]),
    ("bad_tcp_csum", &["bad_checksum"]),
    ("bad_udp_csum", &["bad_checksum"]),
    ("bad_icmp_csum", &["bad_checksum"]),
    ("ip_version5", &["malformed"]),
    ("ip_ihl4", &["malformed"]),
    ("ip_totlen_gt_frame", &["malformed"]),
    ("frag_mf", &["fragment"]),
    ("frag_offset", &["fragment"]),
];

/// A UDP socket and a TCP listener on the same 127.0.0.1 port.
fn loopback_pair() -> (UdpSocket, TcpListener) {
    (0..50)
        .find_map(|_| {
            let u = UdpSocket::bind("127.0.0.1:0").ok()?;
            let t = TcpListener::bind(u.local_addr().ok()?).ok()?;
            Some((u, t))
        })
        .expect("no free port for UDP+TCP on 127.0.0.1")
}

/// Datagrams on `u` until `want` (or `limit` has passed); returns those
/// before it and whether it came.
fn datagrams_until(u: &UdpSocket, want: &[u8], limit: Duration) -> (Vec<Vec<u8>>, bool) {
    let deadline = Instant::now() + limit;
    let mut other = Vec::new();
    let mut b = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (other, false);
        }
        u.set_read_timeout(Some(left)).unwrap();
        match u.recv_from(&mut b) {
            Ok((n, _)) if &b[..n] == want => return (other, true),
            Ok((n, _)) => other.push(b[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (other, false);
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Connections waiting on a non-blocking listener.
fn pending_accepts(l: &TcpListener) -> usize {
    l.set_nonblocking(true).unwrap();
    let mut n = 0;
    while let Ok((mut s, _)) = l.accept() {
        n += 1;
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 16];
        let _ = s.read(&mut b);
    }
    n
}

/// Truncated, oversized, bad-checksum, bad-header and fragmented frames:
/// each is dropped, counted under its reason, reaches no host socket, and
/// rnet keeps serving.
#[test]
fn malformed_frames_dropped_and_counted() {
    require!(require_userns);
    let (sink, listener) = loopback_pair();
    let port = sink.local_addr().unwrap().port().to_string();
    // MTU 1500 for rnet; the guest's TAP is raised above it so it can
    // write a frame rnet's MTU does not allow.
    let mut g = Guest::start(Rnet::new().allow_host_loopback().arg("--mtu").arg("1500"));
    guest_ip(&g, &["link", "set", "tap0", "mtu", "9000"]);

    let mut fails = Vec::new();
    let mut table = String::new();
    for (case, reasons) in CASES {
        let before = g.drops();
        g.script(&["frames", "tap0", &port, &port, case], secs(30));
        let marker = format!("marker {case}");
        let (leaked, seen) = datagrams_until(&sink, marker.as_bytes(), secs(10));
        let conns = pending_accepts(&listener);
        let diff = drops_diff(&before, &g.drops());
        let counted: Vec<&str> = reasons
            .iter()
            .copied()
            .filter(|r| diff.contains_key(*r))
            .collect();
        table.push_str(&format!(
            "  {case:<20} drops added {diff:?}; datagrams before the marker {}; host connections {conns}\n",
            leaked.len()
        ));
        if !seen {
            fails.push(format!(
                "{case}: the marker datagram behind it never arrived"
            ));
        }
        if counted.is_empty() {
            fails.push(format!(
                "{case}: not counted under {reasons:?} (drops added: {diff:?})"
            ));
        }
        if !leaked.is_empty() {
            fails.push(format!(
                "{case}: reached the host UDP socket ({} bytes)",
                leaked[0].len()
            ));
        }
        if conns > 0 {
            fails.push(format!(
                "{case}: the host TCP listener got {conns} connection(s)"
            ));
        }
    }
    eprintln!("malformed frames:\n{table}");

    // Still serving: a guest curl through the gateway works.
    let srv = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = g.run(&strs(&curl(&url)), secs(30));
    if !out.status.success() || out.stdout != HTTP_BODY {
        fails.push(format!("curl after the frames failed: {out}"));
    }
    if !g.running() {
        fails.push("rnet exited".into());
    }
    let out = g.stop();
    if out.stderr.contains("panicked") {
        fails.push(format!("rnet panicked: {out}"));
    }
    assert_no_fails("malformed frames", &fails, &table);
}

// ---------------------------------------------------------------- 4. ARP spoofing

/// Gratuitous ARP and ARP replies claiming 10.0.2.2 / 10.0.2.3 with the
/// guest's MAC, and ARP requests with those as sender: all ignored and
/// counted; rnet still answers ARP for both with its own MAC. (NDP:
/// `ndp_spoofing_ignored` below.)
#[test]
fn arp_spoofing_ignored() {
    require!(require_userns);
    let g = Guest::start(Rnet::new().allow_host_loopback());
    let own = g.script(&["gwmac", "tap0"], secs(30));
    let rnet_mac = own.stdout.trim().strip_prefix("mac ").unwrap().to_string();
    let before = g.drops();
    let out = g.script(&["arpspoof", "tap0"], secs(30));
    let diff = drops_diff(&before, &g.drops());
    eprintln!(
        "ARP spoofing: rnet MAC {rnet_mac}; drops added {diff:?}\n{}",
        out.stdout
    );
    let count = |r: &str| diff.get(r).copied().unwrap_or(0);
    // 4 gratuitous (sender == target): not_for_us; 2 replies and 2
    // requests with a virtual host as sender: spoofed_source.
    assert!(count("not_for_us") >= 4, "{diff:?}\n{out}");
    assert!(count("spoofed_source") >= 4, "{diff:?}\n{out}");
    for ip in [GATEWAY, DNS_ADDR] {
        let want = format!("answer {ip} {rnet_mac}");
        assert!(
            out.stdout.lines().any(|l| l == want),
            "rnet must answer ARP for {ip} with {rnet_mac}: {out}"
        );
    }
    // The guest's own stack still reaches the gateway.
    let srv = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = g.run(&strs(&curl(&url)), secs(30));
    out.assert_success("curl through the gateway after ARP spoofing");
    assert_eq!(out.stdout, HTTP_BODY);
}

/// NDP spoofing: advertisements claiming fd00::2 and fd00::3, and a
/// solicitation sent as if from fd00::2, are dropped and counted; the guest
/// still pings the v6 gateway and resolves it to rnet's MAC.
#[test]
fn ndp_spoofing_ignored() {
    require!(require_userns);
    let g = Guest::start(Rnet::new());
    let own = g.script(&["gwmac", "tap0"], secs(30));
    let rnet_mac = own.stdout.trim().strip_prefix("mac ").unwrap().to_string();
    let before = g.drops();
    let out = g.script(
        &["ndpspoof", "tap0", "fd00::100", "fd00::2", "fd00::3"],
        secs(30),
    );
    let diff = drops_diff(&before, &g.drops());
    eprintln!("NDP spoofing: drops added {diff:?}\n{}", out.stdout);
    let count = |r: &str| diff.get(r).copied().unwrap_or(0);
    assert!(
        count("spoofed_source") + count("unsupported") >= 3,
        "{diff:?}\n{out}"
    );
    let ping = g.run(&["ping", "-6", "-c", "2", "-W", "2", "fd00::2"], secs(30));
    ping.assert_success("ping -6 fd00::2 after NDP spoofing");
    let neigh = g.run(&["ip", "-6", "neigh", "show", "fd00::2"], secs(10));
    assert!(neigh.stdout.contains(&rnet_mac), "{neigh}");
}

// ---------------------------------------------------------------- 5. host loopback

/// A guest frame to 127.0.0.1 (TCP SYN, UDP, ICMP echo) or to ::1 never
/// reaches the host's loopback, even with --allow-host-loopback (which
/// only maps 10.0.2.2): a host listener and UDP socket on 127.0.0.1:PORT
/// see only the controls sent afterwards through 10.0.2.2; the IPv4 ones
/// are counted as `policy`, the IPv6 one as `policy`, `spoofed_source` or
/// `unsupported` (IPv6 off).
#[test]
fn guest_packets_to_loopback_never_arrive() {
    require!(require_userns);
    let (sink, listener) = loopback_pair();
    let port = sink.local_addr().unwrap().port();
    let sink6 = UdpSocket::bind(("::1", port)).ok();
    let g = Guest::start(Rnet::new().allow_host_loopback());
    let before = g.drops();
    let out = g.script(&["loopback", "tap0", &port.to_string()], secs(30));

    // The UDP control comes after everything else: the first datagram must
    // be it, and nothing may follow.
    let (leaked, seen) = datagrams_until(&sink, b"marker", secs(10));
    assert!(
        seen,
        "control datagram through 10.0.2.2 never arrived: {out}"
    );
    assert!(
        leaked.is_empty(),
        "a guest datagram to 127.0.0.1 reached the host: {:?}",
        String::from_utf8_lossy(&leaked[0])
    );
    // The TCP control (a SYN through 10.0.2.2) is the only connection.
    let got = poll_until(secs(10), || {
        let n = pending_accepts(&listener);
        (n > 0).then_some(n)
    });
    let first = got.map_or(0, |(n, _)| n);
    let mut b = [0u8; 64];
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let late = sink.recv_from(&mut b).ok();
    let more = poll_until(Duration::from_millis(500), || {
        let n = pending_accepts(&listener);
        (n > 0).then_some(n)
    });
    let v6 = sink6.as_ref().and_then(|s| {
        s.set_nonblocking(true).unwrap();
        s.recv_from(&mut b).ok()
    });
    let diff = drops_diff(&before, &g.drops());
    eprintln!(
        "loopback: control connections {first}, later connections {more:?}, late datagram {late:?}, \
         ::1 datagram {v6:?}; drops added {diff:?}"
    );
    assert_eq!(first, 1, "exactly the control SYN must connect: {out}");
    assert!(more.is_none(), "another connection arrived: {more:?}");
    assert!(late.is_none(), "a late datagram arrived: {late:?}");
    assert!(v6.is_none(), "a datagram reached [::1]:{port}");
    assert!(
        diff.get("policy").copied().unwrap_or(0) >= 3,
        "TCP, UDP and ICMP to 127.0.0.1 must count as policy: {diff:?}"
    );
    // With IPv6 on, the ::1 frame is refused by policy or (its source is
    // not a guest address) as spoofed; with it off, as unsupported.
    let v6_dropped = ["unsupported", "spoofed_source", "policy"]
        .iter()
        .map(|k| diff.get(*k).copied().unwrap_or(0))
        .sum::<u64>();
    assert!(
        v6_dropped >= 4,
        "the IPv6 frame to ::1 must be dropped and counted: {diff:?}"
    );
}
