//! The address policy against a guest that aims at the host itself: the
//! host's own addresses, ports rnet publishes (hairpin), link-local
//! addresses (cloud metadata), and the tables and filters that face the
//! host side (published-UDP clients, inbound UDP filtering).
//!
//! Every test runs in a contained set-up: a test-made network namespace
//! "hostns" with `lo` and one veth to a test host "peer" (198.19.0.0/16 and
//! fd43::/64 on the veth, no other link and no default route), and rnet
//! itself runs *inside* hostns, so hostns's addresses are the host's own to
//! rnet and even a broken check cannot send anything off the machine. The
//! guest namespace is rnet's (`rnet run`), under hostns. Host loopback is
//! off throughout. Each rnet has an outbound allow-list of the contained
//! networks only and a DNS upstream on hostns's loopback.
//!
//! Shown:
//! - a TCP connect to hostns's veth address (v4 and v6) at a port with a
//!   host listener that rnet does not publish is refused, and so is an
//!   address added to hostns while rnet runs;
//! - the same at a port rnet publishes reaches the guest's own server,
//!   which sees the connection from the gateway (hairpin), TCP and UDP,
//!   IPv4 and IPv6, also through the gateway address itself;
//! - 169.254.169.254 (on the peer, with a listener) and fe80:: are refused
//!   by an allow-list that contains them without naming them, and
//!   169.254.169.254 is reached when an entry names it;
//! - 10,000 spoofed client addresses on a published UDP port (raw socket
//!   on the peer) leave the client table at its cap, with `limit` drops;
//! - a datagram from an address the guest's UDP flow never sent to (the
//!   peer's second address, and hostns's loopback) does not reach the flow
//!   by default (counted as `filtered`); with `--udp-filter
//!   endpoint-independent` the peer's does, hostns's loopback still not.
//!
//! Root only (it creates network namespaces).

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;

const HOST4: &str = "198.19.0.1";
const HOST6: &str = "fd43::1";
const PEER4: &str = "198.19.0.2";
const PEER4_OTHER: &str = "198.19.0.3";
const METADATA: &str = "169.254.169.254";
/// The published TCP and UDP port (on [::], both families).
const PUBLISHED: u16 = 18080;
const GUEST_PORT: u16 = 8080;
/// A port with a host listener in hostns that rnet does not publish.
const UNPUBLISHED: u16 = 19999;
const VXLAN: u16 = 8472;
/// `Limits::udp_clients` by default.
const CLIENT_CAP: u64 = 4096;

/// Runs a setup command, panicking with its stderr when it fails.
#[track_caller]
fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- set-up

/// hostns and peer, joined only to each other by a veth pair. Deleted on drop.
struct Contained {
    host: String,
    peer: String,
    /// hostns's end of the veth.
    host_if: String,
}

impl Contained {
    fn create() -> Contained {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let (hif, pif) = (format!("rpl{pid}{n}h"), format!("rpl{pid}{n}p"));
        let c = Contained {
            host: format!("rnet-pol-{pid}-{n}-h"),
            peer: format!("rnet-pol-{pid}-{n}-p"),
            host_if: hif.clone(),
        };
        for ns in [&c.host, &c.peer] {
            sh(&["ip", "netns", "add", ns]);
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.accept_ra=0",
                "net.ipv6.conf.default.router_solicitations=0",
            ]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", &hif, "netns", &c.host, "type", "veth", "peer", "name", &pif,
            "netns", &c.peer,
        ]);
        let addrs: [(&str, &str, &[&str]); 2] = [
            (&c.host, &hif, &["198.19.0.1/16", "fd43::1/64"]),
            (
                &c.peer,
                &pif,
                &[
                    "198.19.0.2/16",
                    "198.19.0.3/16",
                    "169.254.169.254/16",
                    "fd43::2/64",
                ],
            ),
        ];
        for (ns, dev, list) in addrs {
            for a in list {
                let mut args = vec!["ip", "-n", ns, "addr", "add", a, "dev", dev];
                if a.contains(':') {
                    args.push("nodad");
                }
                sh(&args);
            }
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        // hostns reaches the metadata address over the veth (it has no
        // other route anywhere).
        sh(&[
            "ip",
            "-n",
            &c.host,
            "route",
            "add",
            "169.254.0.0/16",
            "dev",
            &hif,
        ]);
        c
    }

    fn host_path(&self) -> String {
        format!("/run/netns/{}", self.host)
    }

    fn peer_path(&self) -> String {
        format!("/run/netns/{}", self.peer)
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        for ns in [&self.host, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The guest-side helper: servers that report the peer they saw, clients
/// that report what happened.
const GUEST_PY: &str = r#"
import errno, socket, sys, select, time
def name(a):
    a = a[0] if isinstance(a, tuple) else a
    return a[7:] if a.startswith("::ffff:") else a
mode = sys.argv[1]
if mode == "serve":
    port = int(sys.argv[2])
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    t.bind(("::", port)); t.listen(16)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    print("serving", flush=True)
    while True:
        r, _, _ = select.select([t, u], [], [])
        if t in r:
            c, a = t.accept()
            c.sendall(("peer " + name(a) + "\n").encode()); c.close()
        if u in r:
            d, a = u.recvfrom(2048)
            u.sendto(("peer " + name(a)).encode(), a)
elif mode in ("tcp", "udp"):
    host, port = sys.argv[2], int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(5)
    if len(sys.argv) > 4:
        s.bind((sys.argv[4], 0))
    try:
        if "%" in host:
            addr, dev = host.split("%")
            s.connect((addr, port, 0, socket.if_nametoindex(dev)))
        else:
            s.connect((host, port))
        if mode == "tcp":
            s.settimeout(2)
            try:
                data = s.recv(1024)
            except socket.timeout:
                data = b"connected"
        else:
            s.send(b"hi")
            data = s.recv(1024)
        print("ok " + data.decode().strip())
    except OSError as e:
        print("err " + (errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"))
elif mode == "filter":
    host, port, want = sys.argv[2], int(sys.argv[3]), set(sys.argv[4:])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.sendto(b"hello", (host, port))
    end = time.time() + 20
    while want and time.time() < end:
        s.settimeout(max(0.1, end - time.time()))
        try:
            d, a = s.recvfrom(2048)
        except socket.timeout:
            break
        d = d.decode()
        print("got %s %s" % (a[0], d), flush=True)
        want.discard(d)
    print("end", flush=True)
"#;

/// An rnet serving a guest (a `sleep`) from inside hostns, with the
/// published ports of this test and a control socket.
struct Node {
    _rnet: LineProc,
    pid: u32,
    api: TempPath,
    _dns: Arc<DnsServer>,
}

impl Node {
    fn start(c: &Contained, allow: &[&str], extra: &[&str]) -> Node {
        let dns = Arc::new(in_netns(&c.host_path(), DnsServer::start));
        let api = TempPath::new("pol-api");
        let mut rnet = Rnet::with_dns(&dns)
            .arg("-p")
            .arg(format!("[::]:{PUBLISHED}:{GUEST_PORT}"))
            .arg("-p")
            .arg(format!("[::]:{PUBLISHED}:{GUEST_PORT}/udp"))
            .arg("-p")
            .arg(format!("{VXLAN}:{VXLAN}/udp"))
            .arg("--api-socket")
            .arg(&api.0);
        for a in allow {
            rnet = rnet.outbound_allow(a);
        }
        for e in extra {
            rnet = rnet.arg(e);
        }
        let mut cmd = rnet.run_cmd(&["sh", "-c", "echo node-ready $$; exec sleep 600"]);
        let ns = join_netns(&mut cmd, &c.host_path());
        let mut lp = LineProc::spawn(&mut cmd);
        drop(ns);
        let ready = lp.wait_line("node-ready", secs(30), |l| l.starts_with("node-ready "));
        Node {
            _rnet: lp,
            pid: ready["node-ready ".len()..].parse().unwrap(),
            api,
            _dns: dns,
        }
    }

    /// A command run inside the guest's namespaces.
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--preserve-credentials", "-U", "-n", "-t"])
            .arg(self.pid.to_string())
            .args(args);
        clean_env(&mut c);
        c
    }

    /// Runs the guest helper in `mode` and returns its first output line.
    fn py(&self, args: &[&str]) -> String {
        let mut full = vec![PYTHON, "-c", GUEST_PY];
        full.extend_from_slice(args);
        let out = run(&mut self.exec(&full), secs(30));
        out.assert_success(&format!("guest {args:?}"));
        out.stdout.lines().next().unwrap_or("").to_string()
    }

    /// Starts the guest's reporting server on GUEST_PORT (TCP and UDP).
    fn serve(&self) -> LineProc {
        let port = GUEST_PORT.to_string();
        let mut p = LineProc::spawn(&mut self.exec(&[PYTHON, "-c", GUEST_PY, "serve", &port]));
        p.wait_line("serving", secs(30), |l| l == "serving");
        p
    }

    fn status(&self) -> Value {
        status_json(&self.api.0)
    }

    fn drops(&self, reason: &str) -> u64 {
        self.status()["drops"][reason].as_u64().unwrap_or(0)
    }
}

/// The allow-list of the contained networks, plus entries that contain
/// the link-local ranges without naming them.
const CONTAINED: &[&str] = &["198.19.0.0/16", "fd43::/64", "169.254.0.0/15", "fe80::/9"];

#[track_caller]
fn assert_refused(got: &str, what: &str) {
    assert!(
        got.starts_with("err ") && got != "err timeout",
        "{what}: expected a refusal, got {got:?}"
    );
}

// ---------------------------------------------------------------- tests

/// Host addresses are refused like host loopback; ports rnet publishes
/// come back to the guest (hairpin) over both families and protocols;
/// link-local destinations need an entry that names them.
#[test]
fn host_addresses_hairpin_and_link_local() {
    require!(require_root);
    let c = Contained::create();
    // Host services rnet does not publish, on every hostns address.
    let _unpublished = in_netns(&c.host_path(), || {
        TcpListener::bind(("::", UNPUBLISHED)).expect("listener in hostns")
    });
    // The metadata service on the peer.
    let _metadata = in_netns(&c.peer_path(), || {
        TcpListener::bind((METADATA, 80)).expect("listener on the peer")
    });
    let node = Node::start(&c, CONTAINED, &[]);
    let _server = node.serve();
    let unpub = UNPUBLISHED.to_string();
    let publ = PUBLISHED.to_string();

    for host in [HOST4, HOST6] {
        let got = node.py(&["tcp", host, &unpub]);
        assert_refused(&got, &format!("TCP to hostns's own {host}:{UNPUBLISHED}"));
    }
    // An address added while rnet runs is the host's too: rnet follows
    // the kernel's address notifications (inside its sandbox). The check
    // repeats until rnet has caught up, within a deadline.
    let hif = c.host_if.clone();
    sh(&[
        "ip",
        "-n",
        &c.host,
        "addr",
        "add",
        "198.19.0.9/16",
        "dev",
        &hif,
    ]);
    let refused = poll_until(secs(10), || {
        let got = node.py(&["tcp", "198.19.0.9", &unpub]);
        (got.starts_with("err ") && got != "err timeout").then_some(got)
    });
    let (got, after) = refused.unwrap_or_else(|| {
        panic!(
            "an address added at run time stayed reachable: {}",
            node.status()
        )
    });
    eprintln!("added address 198.19.0.9 refused after {after:?}: {got}");
    let policy_before = node.drops("policy");

    for (host, seen) in [
        (HOST4, GATEWAY),
        (HOST6, GATEWAY6),
        (GATEWAY, GATEWAY),
        (GATEWAY6, GATEWAY6),
    ] {
        for proto in ["tcp", "udp"] {
            let got = node.py(&[proto, host, &publ]);
            assert_eq!(
                got,
                format!("ok peer {seen}"),
                "{proto} hairpin to {host}:{PUBLISHED}"
            );
        }
    }
    eprintln!(
        "hairpin: TCP and UDP to {HOST4}, [{HOST6}], {GATEWAY}, [{GATEWAY6}] at {PUBLISHED} reached the guest's server"
    );

    let got = node.py(&["tcp", METADATA, "80"]);
    eprintln!("TCP to {METADATA}:80: {got}");
    assert_refused(&got, "TCP to the metadata address under 169.254.0.0/15");
    // Outside the guest's on-link fe80::/64; a route makes the guest hand
    // it to the gateway rather than look for it on the link.
    run(
        &mut node.exec(&[
            "ip",
            "-6",
            "route",
            "replace",
            "fe80:1::/32",
            "via",
            GATEWAY6,
            "dev",
            "tap0",
        ]),
        secs(10),
    )
    .assert_success("guest route to fe80:1::/32 via the gateway");
    let ll_before = node.drops("policy");
    // From the guest's global address: rnet takes nothing from the
    // guest's own link-local address, which the guest would pick for a
    // link-local destination.
    let got = node.py(&["tcp", "fe80:1::1%tap0", "80", "fd00::100"]);
    eprintln!("TCP to [fe80:1::1]:80: {got}");
    assert_refused(&got, "TCP to fe80:1::1 under fe80::/9");
    assert!(
        node.drops("policy") > ll_before,
        "fe80:1::1 not refused by rnet's policy: {}",
        node.status()
    );
    assert!(
        node.drops("policy") >= policy_before + 2,
        "link-local refusals not counted as policy drops: {}",
        node.status()
    );
    drop(node);

    // Named explicitly, the metadata address is reached (so the refusal
    // above was the policy, not the set-up).
    let named = Node::start(&c, &["169.254.169.254/32"], &[]);
    let got = named.py(&["tcp", METADATA, "80"]);
    assert!(
        got.starts_with("ok"),
        "named metadata address: {got:?}: {}",
        named.status()
    );
}

/// Raw IPv4/UDP datagrams with spoofed sources 198.19.1.0 upwards (all
/// on the veth's /16, so hostns's reverse-path check passes), paced so
/// hostns's socket buffer keeps up.
const SPOOF_PY: &str = r#"
import socket, struct, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
payload = b"spoof"
for i in range(n):
    src = "198.19.%d.%d" % (1 + i // 250, 1 + i % 250)
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xffff, 0, 64,
                     socket.IPPROTO_UDP, 0, socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + udp, (dst, 0))
    if i % 50 == 49:
        time.sleep(0.005)
print("sent", n, flush=True)
"#;

#[test]
fn spoofed_udp_clients_stay_at_the_cap() {
    require!(require_root);
    let c = Contained::create();
    let node = Node::start(&c, CONTAINED, &[]);
    // The guest speaks first, so rnet knows where to deliver.
    let _server = node.serve();
    let got = node.py(&["udp", GATEWAY, &PUBLISHED.to_string()]);
    assert_eq!(got, format!("ok peer {GATEWAY}"));
    let limit_before = node.drops("limit");
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", SPOOF_PY, HOST4, &VXLAN.to_string(), "10000"]);
    clean_env(&mut cmd);
    let ns = join_netns(&mut cmd, &c.peer_path());
    let out = run(&mut cmd, secs(120));
    drop(ns);
    out.assert_success("spoofing sender");
    let reached = poll_until(secs(30), || {
        let s = node.status();
        let clients = s["flows"]["udp_clients"].as_u64()?;
        (clients >= CLIENT_CAP).then_some(s)
    });
    let (s, _) =
        reached.unwrap_or_else(|| panic!("client table never reached the cap: {}", node.status()));
    let clients = s["flows"]["udp_clients"].as_u64().unwrap();
    let limit = s["drops"]["limit"].as_u64().unwrap_or(0) - limit_before;
    eprintln!("10000 spoofed clients: table {clients} (cap {CLIENT_CAP}), limit drops {limit}");
    assert_eq!(clients, CLIENT_CAP, "table past its cap: {s}");
    assert!(limit >= 1, "no eviction counted as limit: {s}");
}

/// The guest sends to the peer's 198.19.0.2:7000; then the peer's other
/// address and hostns's loopback send to the flow's host port, and the
/// peer's 7000 sends "done". Returns the guest's lines and the growth of
/// the `filtered` counter.
fn injection(node: &Node, c: &Contained, want: &[&str]) -> (Vec<String>, u64) {
    let host = c.host_path();
    let peer = c.peer_path();
    let echo = in_netns(&peer, || UdpSocket::bind((PEER4, 7000)).unwrap());
    let other = in_netns(&peer, || UdpSocket::bind((PEER4_OTHER, 7001)).unwrap());
    let local = in_netns(&host, || UdpSocket::bind(("127.0.0.1", 0)).unwrap());
    echo.set_read_timeout(Some(secs(20))).unwrap();
    let before = node.drops("filtered");
    let mut args = vec![PYTHON, "-c", GUEST_PY, "filter", PEER4, "7000"];
    args.extend_from_slice(want);
    let mut guest = LineProc::spawn(&mut node.exec(&args));
    let mut buf = [0u8; 64];
    let (n, nat) = echo
        .recv_from(&mut buf)
        .expect("the guest's datagram at the peer");
    assert_eq!(&buf[..n], b"hello");
    let SocketAddr::V4(nat4) = nat else {
        panic!("{nat}")
    };
    assert_eq!(nat4.ip().to_string(), HOST4, "the flow leaves from hostns");
    other.send_to(b"inject", nat).unwrap();
    local.send_to(b"local", ("127.0.0.1", nat.port())).unwrap();
    echo.send_to(b"done", nat).unwrap();
    guest.wait_line("end", secs(30), |l| l == "end");
    let lines: Vec<String> = guest.seen.clone();
    let grown = poll_until(Duration::from_secs(10), || {
        let d = node.drops("filtered") - before;
        (d >= 3 - want.len() as u64).then_some(d)
    })
    .map(|(d, _)| d)
    .unwrap_or_else(|| node.drops("filtered") - before);
    (lines, grown)
}

#[test]
fn inbound_udp_filtering() {
    require!(require_root);
    let c = Contained::create();

    // Default: address-dependent.
    let node = Node::start(&c, CONTAINED, &[]);
    let (lines, filtered) = injection(&node, &c, &["done"]);
    eprintln!("address-dependent: guest saw {lines:?}, filtered {filtered}");
    assert!(
        lines.iter().any(|l| l == &format!("got {PEER4} done")),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("inject") || l.contains("local")),
        "a source the flow never sent to reached it: {lines:?}"
    );
    assert_eq!(filtered, 2, "both injected datagrams dropped and counted");
    drop(node);

    // Endpoint-independent: the peer's other address (inside the
    // allow-list) reaches the flow; hostns's loopback (host loopback off)
    // still does not.
    let node = Node::start(&c, CONTAINED, &["--udp-filter", "endpoint-independent"]);
    let (lines, filtered) = injection(&node, &c, &["done", "inject"]);
    eprintln!("endpoint-independent: guest saw {lines:?}, filtered {filtered}");
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("got {PEER4_OTHER} inject")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("local")), "{lines:?}");
    assert_eq!(filtered, 1, "the loopback datagram dropped and counted");
}

/// With rnet's open-file limit low, 400 guest UDP endpoints (one datagram
/// each, to a loopback echo server behind the gateway) run it out of
/// sockets: the failure is logged once, not per datagram. No contained
/// set-up needed: only host loopback is reached.
#[test]
fn failing_udp_socket_opens_log_rarely() {
    require!(require_userns);
    let echo = UdpEcho::start();
    let code = r#"
import socket, sys
port = int(sys.argv[1])
for i in range(400):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("10.0.2.2", port))
    s.close()
print("sent 400")
"#;
    let port = echo.addr.port().to_string();
    let mut cmd = Rnet::new()
        .allow_host_loopback()
        .run_cmd(&[PYTHON, "-c", code, &port]);
    // SAFETY: setrlimit is async-signal-safe and only changes the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run(&mut cmd, secs(60));
    out.assert_success("guest sending from 400 UDP endpoints with rnet at 64 files");
    let warnings = out
        .stderr
        .lines()
        .filter(|l| l.contains("cannot open a UDP socket"))
        .count();
    eprintln!(
        "400 endpoints, rnet limited to 64 files: host saw {} datagrams, {warnings} warning line(s)",
        echo.datagrams.load(Ordering::SeqCst)
    );
    assert!(
        echo.datagrams.load(Ordering::SeqCst) < 400,
        "rnet never ran out of sockets: {out}"
    );
    assert_eq!(
        warnings, 1,
        "the failure must be logged exactly once: {out}"
    );
}
