//! End-to-end scenarios: real namespaces, TAP, sockets and clients.
//!
//! Every rnet here runs with an outbound allow-list and a loopback DNS upstream
//! (see `common::Rnet`); guests only talk to 10.0.2.2, 10.0.2.3 or a test host.

mod common;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------- 1. host loopback

fn host_loopback_http(rnet: Rnet) {
    let srv = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = rnet
        .clone()
        .allow_host_loopback()
        .run(&strs(&curl(&url)), secs(30));
    out.assert_success("guest curl to 10.0.2.2 with --allow-host-loopback");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    assert_eq!(srv.hits(), 1, "host server connections");

    let srv = HttpServer::start();
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = rnet.run(&strs(&curl(&url)), secs(30));
    assert_eq!(out.code(), Some(7), "curl must fail to connect: {out}");
    assert_stderr_has(&out, "unreachable");
    assert_eq!(srv.hits(), 0, "host server must see no connection");
}

#[test]
fn host_loopback_http_in_userns() {
    require!(require_userns);
    host_loopback_http(Rnet::new());
}

#[test]
fn host_loopback_http_as_nobody() {
    require!(require_root);
    host_loopback_http(Rnet::new().nobody());
}

// ---------------------------------------------------------------- 2. UDP

#[test]
fn udp_echo_1000_datagrams() {
    require!(require_userns);
    let echo = UdpEcho::start();
    let port = echo.addr.port().to_string();
    let out = Rnet::new().allow_host_loopback().run(
        &[PYTHON, &guest_script("udp_echo.py"), GATEWAY, &port, "1000"],
        secs(120),
    );
    out.assert_success("guest udp_echo.py");
    let stats = out.stdout.trim();
    eprintln!("udp: {stats}; host echo saw {:?} datagrams", echo.datagrams);
    assert_eq!(json_num(stats, "corrupted"), 0, "{out}");
    assert_eq!(json_num(stats, "lost"), 0, "{out}");
    assert_eq!(json_num(stats, "answered"), 1000, "{out}");
}

// ---------------------------------------------------------------- 3. ICMP

fn ping(dst: &str) -> [&str; 6] {
    ["ping", "-c", "3", "-W", "2", dst]
}

/// Everything touching net.ipv4.ping_group_range stays in this one test.
#[test]
fn ping_gateway_and_relay() {
    require!(require_userns);
    let out = Rnet::new().run(&ping(GATEWAY), secs(30));
    out.assert_success("guest ping 10.0.2.2");
    assert!(out.stdout.contains(" 3 received"), "{out}");

    require!(require_root);
    let th = TestHost::create();
    let addr = th.addr.to_string();
    let rnet = Rnet::new().outbound_allow(&th.cidr());
    let range = SysctlGuard::new("/proc/sys/net/ipv4/ping_group_range");

    range.set("0 2147483647");
    let out = rnet.run(&ping(&addr), secs(30));
    out.assert_success("guest ping of the test host, ping sockets allowed");
    assert!(out.stdout.contains(" 3 received"), "{out}");

    range.set("1 0");
    let out = rnet.run(&ping(&addr), secs(30));
    out.assert_failure("guest ping of the test host, ping sockets denied");
    assert_one_ping_range_warning(&out);
}

// ---------------------------------------------------------------- 4. DNS

fn dig(tcp: bool, server: &str, port: Option<u16>) -> Vec<String> {
    let mut a: Vec<String> = ["dig", "+short", "+time=2", "+tries=1"]
        .map(String::from)
        .to_vec();
    a.push(format!("@{server}"));
    if let Some(p) = port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if tcp {
        a.push("+tcp".into());
    }
    a.extend(["example.test".into(), "A".into()]);
    a
}

#[test]
fn dns_forwarding_udp_and_tcp() {
    require!(require_userns);
    let dns = Arc::new(DnsServer::start());
    let rnet = Rnet::with_dns(&dns);
    for tcp in [false, true] {
        let out = rnet.run(&strs(&dig(tcp, DNS_ADDR, None)), secs(30));
        out.assert_success("guest dig @10.0.2.3");
        assert_eq!(
            out.stdout.trim(),
            DNS_ANSWER.to_string(),
            "tcp={tcp}: {out}"
        );
    }
    let (udp, tcp) = dns.queries();
    assert!(udp >= 1 && tcp >= 1, "upstream saw udp={udp} tcp={tcp}");
}

#[test]
fn dns_disabled() {
    require!(require_userns);
    let dns = Arc::new(DnsServer::start());
    let out = Rnet::with_dns(&dns)
        .arg("--disable-dns")
        .run(&strs(&dig(false, DNS_ADDR, None)), secs(30));
    assert_eq!(out.code(), Some(9), "dig must get no answer: {out}");
    assert_eq!(dns.queries(), (0, 0), "nothing may reach the upstream");
}

/// A slow upstream (its answer comes after 300 ms) and, before it, a
/// forged answer from another loopback port (right ID and question, wrong
/// address) plus three datagrams from the upstream's own address that do
/// not answer the query (another ID, another question, QR bit clear). The
/// guest gets the real answer; the three are counted as `dns_mismatch`.
#[test]
fn dns_spoofed_and_mismatched_replies_never_reach_the_guest() {
    require!(require_userns);
    const FORGED: [u8; 4] = [192, 0, 2, 66];
    let up = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let spoofer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked2 = asked.clone();
    thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok((n, peer)) = up.recv_from(&mut b) {
            let Some(real) = dns_answer(&b[..n]) else {
                continue;
            };
            asked2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut forged = real.clone();
            let len = forged.len();
            forged[len - 4..].copy_from_slice(&FORGED);
            let _ = spoofer.send_to(&forged, peer);
            let mut other_id = forged.clone();
            other_id[0] ^= 0xff;
            let mut other_q = forged.clone();
            other_q[13] ^= 0x01; // a letter of the first label
            let mut not_reply = forged.clone();
            not_reply[2] &= 0x7f;
            for bad in [other_id, other_q, not_reply] {
                let _ = up.send_to(&bad, peer);
            }
            thread::sleep(Duration::from_millis(300));
            let _ = up.send_to(&real, peer);
        }
    });
    let t = Target::userns();
    let api = TempPath::new("api");
    let _rnet = Rnet::new()
        .arg("--dns-upstream")
        .arg(up_addr.to_string())
        .arg("--api-socket")
        .arg(&api.0)
        .attach(t.pid());
    let before = drop_counts(&status_json(&api.0));
    let mut dig_cmd = t.exec(&[
        "dig",
        "+short",
        "+time=3",
        "+tries=1",
        "@10.0.2.3",
        "example.test",
        "A",
    ]);
    let out = run(&mut dig_cmd, secs(30));
    out.assert_success("guest dig @10.0.2.3");
    assert_eq!(out.stdout.trim(), DNS_ANSWER.to_string(), "{out}");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    let diff = drops_diff(&before, &drop_counts(&status_json(&api.0)));
    assert_eq!(diff.get("dns_mismatch"), Some(&3), "drops: {diff:?}");
}

/// A silent first upstream: the query moves on to the next one (on a new
/// socket connected to it) after the timeout.
#[test]
fn dns_udp_fails_over_to_the_next_upstream() {
    require!(require_userns);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = Arc::new(DnsServer::start());
    let out = Rnet::with_dns(&dns)
        .arg("--dns-upstream")
        .arg(silent.local_addr().unwrap().to_string())
        .run(
            &[
                "dig",
                "+short",
                "+time=10",
                "+tries=1",
                "@10.0.2.3",
                "example.test",
                "A",
            ],
            secs(30),
        );
    out.assert_success("guest dig @10.0.2.3");
    assert_eq!(out.stdout.trim(), DNS_ANSWER.to_string(), "{out}");
    let mut b = [0u8; 512];
    silent.set_nonblocking(true).unwrap();
    assert!(
        silent.recv(&mut b).is_ok(),
        "the first upstream was asked first"
    );
    assert_eq!(dns.queries(), (1, 0));
}

/// A UDP DNS responder on `ip`:53 answering every A query with `answer`;
/// None if the port is taken.
fn dns_responder_on(ip: Ipv4Addr, answer: Ipv4Addr) -> Option<()> {
    let s = std::net::UdpSocket::bind((ip, 53)).ok()?;
    thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok((n, peer)) = s.recv_from(&mut b) {
            if let Some(mut r) = dns_answer(&b[..n]) {
                let len = r.len();
                r[len - 4..].copy_from_slice(&answer.octets());
                let _ = s.send_to(&r, peer);
            }
        }
    });
    Some(())
}

/// DNS follows the host: rnet (sandboxed, the default) is pointed at a
/// resolv.conf of the test's (a symbolic link into another directory, as
/// systemd-resolved's is) naming one loopback responder; the file is
/// replaced (rename) to name a second one, then rewritten in place to name
/// the first again, and each time guest queries reach the new upstream.
#[test]
fn dns_follows_resolv_conf_changes() {
    require!(require_root);
    // Two responders on port 53 (resolv.conf has no ports) of loopback
    // addresses no other test uses.
    let base = 100 + (std::process::id() % 50) as u8 * 2;
    let (a, b) = (0..20u8)
        .map(|k| {
            (
                Ipv4Addr::new(127, 0, 53, base.wrapping_add(k * 2)),
                Ipv4Addr::new(127, 0, 53, base.wrapping_add(k * 2 + 1)),
            )
        })
        .find(|&(a, b)| {
            dns_responder_on(a, Ipv4Addr::new(192, 0, 2, 1)).is_some()
                && dns_responder_on(b, Ipv4Addr::new(192, 0, 2, 2)).is_some()
        })
        .expect("no free loopback address pair for port 53");
    let dir = TempDir::new("resolv");
    std::fs::create_dir(dir.join("run")).unwrap();
    let target = dir.join("run").join("resolv.conf");
    std::fs::write(&target, format!("# test\nnameserver {a}\n")).unwrap();
    let link = dir.join("resolv.conf");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let t = Target::userns();
    let (r, w) = pipe();
    let mut cmd = Command::new(RNET);
    cmd.args(["attach", "--outbound-allow", "none", "--ready-fd"]);
    cmd.arg(w.as_raw_fd().to_string()).arg(t.pid().to_string());
    clean_env(&mut cmd);
    cmd.env("RNET_RESOLV_CONF", &link);
    inherit_fd(&mut cmd, &w);
    let rnet = Proc::spawn(&mut cmd);
    drop(w);
    if let Err(e) = wait_ready(r, secs(20)) {
        panic!("rnet not ready: {e}\n{}", rnet.stop(Duration::ZERO).1);
    }
    let ask = || {
        let out = run(
            &mut t.exec(&[
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                "@10.0.2.3",
                "example.test",
                "A",
            ]),
            secs(30),
        );
        out.stdout.trim().to_string()
    };
    assert_eq!(ask(), "192.0.2.1", "the first upstream answers");
    // Replaced by rename, as resolvers write it.
    let tmp = dir.join("run").join(".resolv.conf.new");
    std::fs::write(&tmp, format!("nameserver {b}\n")).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
    let switched = poll_until(secs(10), || (ask() == "192.0.2.2").then_some(()));
    let (_, after) = switched.expect("guest queries never reached the new upstream");
    eprintln!("new upstream answering {after:?} after the rename");
    // Rewritten in place.
    std::fs::write(&target, format!("nameserver {a}\n")).unwrap();
    let back = poll_until(secs(10), || (ask() == "192.0.2.1").then_some(()));
    assert!(back.is_some(), "an in-place rewrite was not followed");
    let (_, out) = rnet.stop(Duration::ZERO);
    assert!(out.stderr.contains("resolv.conf changed"), "{out}");
}

/// Harness self-check: the responder answers dig on loopback directly, and
/// counts exactly the queries it got.
#[test]
fn harness_dns_responder() {
    let dns = DnsServer::start();
    for tcp in [false, true] {
        let out = run(
            // -b 127.0.0.1: a query to anything but loopback fails locally.
            Command::new("dig")
                .args(["-b", "127.0.0.1"])
                .args(&dig(tcp, "127.0.0.1", Some(dns.port()))[1..]),
            secs(10),
        );
        out.assert_success("dig on loopback");
        assert_eq!(out.stdout.trim(), DNS_ANSWER.to_string(), "{out}");
    }
    assert_eq!(dns.queries(), (1, 1));
}

// ---------------------------------------------------------------- 5. bulk TCP

/// A host listener on the loopback address of `dst`'s family (the gateway
/// maps to it).
fn host_listener(dst: &str) -> std::net::TcpListener {
    let at = if dst.contains(':') {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    std::net::TcpListener::bind(at).unwrap()
}

fn bulk_guest_to_host(rnet: &Rnet, dst: &str, total: u64) -> TapTotals {
    let (addr, result) = tcp_sink_on(host_listener(dst));
    let expected = thread::spawn(move || Pattern::digest(total));
    let script = guest_script("stream.py");
    let (port, total_s) = (addr.port().to_string(), total.to_string());
    let t0 = Instant::now();
    let out = rnet.run(&[PYTHON, &script, "send", dst, &port, &total_s], secs(600));
    out.assert_success("guest stream.py send");
    let host = result.recv_timeout(secs(60)).unwrap().expect("host sink");
    eprintln!(
        "guest->host {total} bytes in {:?} ({:.0} MB/s)",
        t0.elapsed(),
        total as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
    let expected = expected.join().unwrap();
    assert_eq!(Digested::parse(&out.stdout), expected, "guest side");
    assert_eq!(host, expected, "host side");
    TapTotals::parse(&out.stderr)
}

fn bulk_host_to_guest(rnet: &Rnet, dst: &str, total: u64) -> TapTotals {
    let (addr, result) = tcp_source_on(host_listener(dst), total);
    let expected = thread::spawn(move || Pattern::digest(total));
    let script = guest_script("stream.py");
    let port = addr.port().to_string();
    let t0 = Instant::now();
    let out = rnet.run(&[PYTHON, &script, "recv", dst, &port], secs(600));
    out.assert_success("guest stream.py recv");
    let sent = result.recv_timeout(secs(60)).unwrap().expect("host source");
    eprintln!(
        "host->guest {sent} bytes in {:?} ({:.0} MB/s)",
        t0.elapsed(),
        total as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
    assert_eq!(Digested::parse(&out.stdout), expected.join().unwrap());
    TapTotals::parse(&out.stderr)
}

/// What crossed the TAP, from rnet's last log line ("network stopped").
#[derive(Debug)]
struct TapTotals {
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
}

impl TapTotals {
    fn parse(stderr: &str) -> TapTotals {
        let line = stderr
            .lines()
            .rfind(|l| l.contains("network stopped"))
            .unwrap_or_else(|| panic!("no 'network stopped' line in:\n{stderr}"));
        let field = |k: &str| -> u64 {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {line}"));
            v.parse().unwrap_or_else(|e| panic!("{k}={v}: {e}"))
        };
        TapTotals {
            frames_in: field("frames_in"),
            bytes_in: field("bytes_in"),
            frames_out: field("frames_out"),
        }
    }
}

#[test]
fn bulk_tcp_1gib_guest_to_host() {
    require!(require_userns);
    bulk_guest_to_host(&Rnet::new().allow_host_loopback(), GATEWAY, GIB);
}

#[test]
fn bulk_tcp_1gib_host_to_guest() {
    require!(require_userns);
    bulk_host_to_guest(&Rnet::new().allow_host_loopback(), GATEWAY, GIB);
}

/// The same transfers at a 1500-byte MTU. With offloads (the default) the
/// guest hands over TCP segments larger than the MTU (TSO) and rnet sends
/// GSO frames back, so both directions need far fewer frames than
/// 1,460-byte segments would; with `--no-offload` every frame fits the MTU.
#[test]
fn bulk_tcp_64mib_mtu_1500() {
    require!(require_userns);
    const TOTAL: u64 = 64 << 20;
    let mss_frames = TOTAL / 1460;
    let rnet = Rnet::new().allow_host_loopback().arg("--mtu").arg("1500");
    let up = bulk_guest_to_host(&rnet, GATEWAY, TOTAL);
    let down = bulk_host_to_guest(&rnet, GATEWAY, TOTAL);
    eprintln!("offloads: guest->host {up:?}, host->guest {down:?}");
    assert!(
        up.bytes_in / up.frames_in > 3000,
        "no TSO segments from the guest: {up:?}"
    );
    assert!(
        down.frames_out < mss_frames / 2,
        "no GSO frames to the guest: {down:?} (MSS-sized would be {mss_frames})"
    );
    // IPv6 too (rnet enlarges the MSS smoltcp sees and cuts to the guest's).
    let up6 = bulk_guest_to_host(&rnet, GATEWAY6, TOTAL);
    let down6 = bulk_host_to_guest(&rnet, GATEWAY6, TOTAL);
    eprintln!("offloads, IPv6: guest->host {up6:?}, host->guest {down6:?}");
    assert!(up6.bytes_in / up6.frames_in > 3000, "{up6:?}");
    assert!(down6.frames_out < mss_frames / 2, "{down6:?}");

    let plain = rnet.clone().arg("--no-offload");
    let up = bulk_guest_to_host(&plain, GATEWAY, TOTAL);
    let down = bulk_host_to_guest(&plain, GATEWAY, TOTAL);
    eprintln!("--no-offload: guest->host {up:?}, host->guest {down:?}");
    assert!(up.bytes_in <= up.frames_in * 1514, "{up:?}");
    assert!(down.frames_out >= mss_frames, "{down:?}");
}

// ---------------------------------------------------------------- 6. concurrency

fn many_connections(guest: impl FnOnce(&[&str]) -> Output, host: &str, n: usize) {
    let echo = TcpEcho::start();
    let (port, n_s) = (echo.addr.port().to_string(), n.to_string());
    let script = guest_script("tcp_many.py");
    let out = guest(&[PYTHON, &script, host, &port, &n_s, "65536"]);
    out.assert_success("guest tcp_many.py");
    let stats = out.stdout.trim();
    eprintln!(
        "tcp_many: {stats}; host accepted {:?}, peak open {:?}",
        echo.accepted, echo.peak
    );
    assert_eq!(json_num(stats, "ok"), n as i64, "{out}");
    assert_eq!(json_num(stats, "mismatched"), 0, "{out}");
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), n);
}

#[test]
fn concurrent_tcp_200_connections() {
    require!(require_userns);
    let rnet = Rnet::new().allow_host_loopback();
    many_connections(|g| rnet.run(g, secs(180)), GATEWAY, 200);
}

// ---------------------------------------------------------------- 7. outbound policy

#[test]
fn outbound_allow_list_enforced() {
    require!(require_root);
    let th = TestHost::create();
    let srv = HttpServer::on(th.listen_tcp());
    let url = format!("http://{}:{}/", th.addr, srv.port());
    let other = format!("{}/32", Ipv4Addr::from(u32::from(th.addr) - 2));

    for rnet in [Rnet::new(), Rnet::new().outbound_allow(&other)] {
        let tx = th.tx_packets();
        let out = rnet.run(&strs(&curl(&url)), secs(30));
        assert_eq!(
            out.code(),
            Some(7),
            "connect must be refused/unreachable: {out}"
        );
        assert!(out.elapsed < secs(4), "must fail fast, not time out: {out}");
        assert_eq!(srv.hits(), 0, "the test host must see no connection");
        assert_eq!(
            th.tx_packets(),
            tx,
            "no packet may leave towards the test host"
        );
    }

    let out = Rnet::new()
        .outbound_allow(&th.cidr())
        .run(&strs(&curl(&url)), secs(30));
    out.assert_success("curl to an allowed test host");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    assert_eq!(srv.hits(), 1);
    assert!(
        th.tx_packets() > 0,
        "the packet counter must see allowed traffic"
    );
}

/// Host servers on `ip` (TCP and UDP, the same port number not needed)
/// that answer each client with the address it came from.
fn peer_reporters(ip: std::net::IpAddr) -> (u16, u16) {
    let tcp = std::net::TcpListener::bind((ip, 0)).unwrap();
    let udp = std::net::UdpSocket::bind((ip, 0)).unwrap();
    let ports = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    thread::spawn(move || {
        for mut c in tcp.incoming().flatten() {
            let peer = c.peer_addr().unwrap().ip().to_string();
            let _ = std::io::Write::write_all(&mut c, peer.as_bytes());
        }
    });
    thread::spawn(move || {
        let mut b = [0u8; 512];
        while let Ok((_, peer)) = udp.recv_from(&mut b) {
            let _ = udp.send_to(peer.ip().to_string().as_bytes(), peer);
        }
    });
    ports
}

/// A guest that asks both reporters at `gw` who it is; prints
/// `tcp ADDR` and `udp ADDR`.
fn ask_peer(gw: &str, (tcp, udp): (u16, u16)) -> [String; 3] {
    let fam = if gw.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket\n\
         t=socket.create_connection(('{gw}', {tcp}), timeout=5)\n\
         print('tcp', t.recv(100).decode(), flush=True)\n\
         u=socket.socket(socket.{fam}, socket.SOCK_DGRAM); u.settimeout(2)\n\
         for _ in range(5):\n\
         \x20   u.sendto(b'who', ('{gw}', {udp}))\n\
         \x20   try:\n\
         \x20       print('udp', u.recv(100).decode()); break\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n"
    );
    [PYTHON.into(), "-c".into(), script]
}

/// `--outbound-addr` binds every outgoing host socket, also those to the
/// host's loopback through 10.0.2.2 (as slirp4netns): with the secondary
/// loopback address 127.0.0.2 as the outbound address, a server on
/// 127.0.0.1 sees its TCP and UDP clients come from 127.0.0.2. The same
/// for `--outbound-addr6` with the root-namespace end of an IPv6 test host
/// (an address of this machine that the test made) and a server on ::1.
#[test]
fn outbound_addr_binds_loopback_destinations() {
    require!(require_userns);
    let ports = peer_reporters(Ipv4Addr::LOCALHOST.into());
    let rnet = Rnet::new().allow_host_loopback();
    let out = rnet.run(&strs(&ask_peer(GATEWAY, ports)), secs(30));
    out.assert_success("guest asking the reporters without --outbound-addr");
    assert_eq!(out.stdout, "tcp 127.0.0.1\nudp 127.0.0.1\n", "{out}");
    let out = rnet
        .clone()
        .arg("--outbound-addr")
        .arg("127.0.0.2")
        .run(&strs(&ask_peer(GATEWAY, ports)), secs(30));
    out.assert_success("guest asking the reporters with --outbound-addr 127.0.0.2");
    assert_eq!(out.stdout, "tcp 127.0.0.2\nudp 127.0.0.2\n", "{out}");

    require!(require_root);
    let th = TestHost::create_v6();
    let (near, _) = th.v6.unwrap();
    let ports = peer_reporters(std::net::Ipv6Addr::LOCALHOST.into());
    let out = rnet
        .arg("--outbound-addr6")
        .arg(near.to_string())
        .run(&strs(&ask_peer(GATEWAY6, ports)), secs(30));
    out.assert_success("guest asking the ::1 reporters with --outbound-addr6");
    assert_eq!(out.stdout, format!("tcp {near}\nudp {near}\n"), "{out}");
}

/// Harness self-check: a test host answers from the root namespace, and is gone after drop.
#[test]
fn harness_test_host() {
    require!(require_root);
    let th = TestHost::create();
    let srv = HttpServer::on(th.listen_tcp());
    let url = format!("http://{}:{}/", th.addr, srv.port());
    let out = run(
        Command::new("curl").args(["-sS", "--noproxy", "*", &url]),
        secs(10),
    );
    out.assert_success("curl to the test host from the root netns");
    assert_eq!((out.stdout.as_str(), srv.hits()), (HTTP_BODY, 1));
    let ns = th.ns.clone();
    drop(th);
    let list = run(Command::new("ip").args(["netns", "list"]), secs(10));
    assert!(!list.stdout.contains(&ns), "{ns} not removed: {list}");
}

/// Harness self-check: the guest scripts against the host servers on loopback.
#[test]
fn harness_guest_scripts_on_loopback() {
    let host = |g: &[&str]| run(Command::new(g[0]).args(&g[1..]), secs(60));
    let echo = UdpEcho::start();
    let port = echo.addr.port().to_string();
    let out = host(&[
        PYTHON,
        &guest_script("udp_echo.py"),
        "127.0.0.1",
        &port,
        "300",
    ]);
    out.assert_success("udp_echo.py");
    assert_eq!(json_num(&out.stdout, "answered"), 300, "{out}");

    many_connections(host, "127.0.0.1", 200);

    let (addr, result) = tcp_sink();
    let port = addr.port().to_string();
    let out = host(&[
        PYTHON,
        &guest_script("stream.py"),
        "send",
        "127.0.0.1",
        &port,
        "8388608",
    ]);
    out.assert_success("stream.py send");
    let expected = Pattern::digest(8 << 20);
    assert_eq!(Digested::parse(&out.stdout), expected);
    assert_eq!(result.recv_timeout(secs(10)).unwrap().unwrap(), expected);

    let (addr, _) = tcp_source(8 << 20);
    let port = addr.port().to_string();
    let out = host(&[
        PYTHON,
        &guest_script("stream.py"),
        "recv",
        "127.0.0.1",
        &port,
    ]);
    out.assert_success("stream.py recv");
    assert_eq!(Digested::parse(&out.stdout), expected);
}

// ---------------------------------------------------------------- interface set-up

#[test]
fn guest_interface_configuration() {
    require!(require_userns);
    let show = [
        "sh",
        "-c",
        "ip -o -4 addr show; ip -o link show tap0; ip route",
    ];
    let out = Rnet::new().arg("--mtu").arg("1500").run(&show, secs(30));
    out.assert_success("ip in the guest");
    for want in [
        "inet 10.0.2.100/24",
        "mtu 1500",
        "default via 10.0.2.2 dev tap0",
    ] {
        assert!(out.stdout.contains(want), "missing {want:?}: {out}");
    }
    assert!(out.stdout.contains("LOWER_UP"), "tap0 must be up: {out}");

    let out = Rnet::new().arg("--no-configure").run(&show, secs(30));
    out.assert_success("ip in the guest");
    assert!(out.stdout.contains("tap0"), "tap0 must exist: {out}");
    assert!(
        !out.stdout.contains("10.0.2.100"),
        "tap0 must be unconfigured: {out}"
    );
    assert!(
        !out.stdout.contains("default via"),
        "no route may be set: {out}"
    );
}

// ---------------------------------------------------------------- 8. lifecycle

fn assert_exits_zero_within(rnet: &mut Proc, since: Instant, limit: Duration) {
    let st = rnet.wait_timeout(secs(5));
    let took = since.elapsed();
    let st = st.unwrap_or_else(|| panic!("rnet still running after {took:?}"));
    assert!(st.success(), "rnet exited with {st}");
    assert!(took < limit, "rnet took {took:?} to exit");
    eprintln!("rnet exited in {took:?}");
}

/// Attaches to a fresh `unshare -Urn` target and checks curl through it.
/// Configuration must not race the kernel: 200 sequential `rnet attach`
/// starts, each on a fresh `unshare -Urn` namespace (IPv4 and IPv6
/// addresses and default routes set by rnet), while two busy loops load
/// the CPUs; every one reaches ready. Prints the run time.
#[test]
fn attach_starts_200_times_under_load() {
    require!(require_userns);
    let mut load: Vec<Proc> = (0..2)
        .map(|_| Proc::spawn(Command::new("sh").args(["-c", "while :; do :; done"])))
        .collect();
    let rnet = Rnet::new();
    let start = Instant::now();
    for i in 0..200 {
        let t = Target::userns();
        // Panics with rnet's output unless it reaches ready.
        let mut p = rnet.attach(t.pid());
        p.signal(libc::SIGTERM);
        let out = p.finish(secs(10));
        assert_eq!(out.code(), Some(0), "start {i}: {out}");
    }
    let took = start.elapsed();
    for l in &mut load {
        l.signal(libc::SIGKILL);
    }
    eprintln!("200 attach starts under load: {took:?}");
    assert!(took < secs(120), "200 starts took {took:?}");
}

fn attached() -> (Target, Proc, HttpServer) {
    let target = Target::userns();
    let srv = HttpServer::start();
    let rnet = Rnet::new().allow_host_loopback().attach(target.pid());
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = run(&mut target.exec(&strs(&curl(&url))), secs(30));
    out.assert_success("curl in the attached namespace");
    assert_eq!((out.stdout.as_str(), srv.hits()), (HTTP_BODY, 1), "{out}");
    (target, rnet, srv)
}

#[test]
fn attach_exits_when_target_dies() {
    require!(require_userns);
    let (mut target, mut rnet, _srv) = attached();
    let t0 = Instant::now();
    target.proc.signal(libc::SIGKILL);
    target.proc.wait_timeout(secs(5)).expect("target reaped");
    assert_exits_zero_within(&mut rnet, t0, secs(1));
}

#[test]
fn attach_exits_on_sigterm() {
    require!(require_userns);
    let (_target, mut rnet, _srv) = attached();
    let t0 = Instant::now();
    rnet.signal(libc::SIGTERM);
    assert_exits_zero_within(&mut rnet, t0, secs(1));
}

#[test]
fn attach_by_namespace_paths() {
    require!(require_userns);
    let target = Target::userns();
    let srv = HttpServer::start();
    let pid = target.pid();
    let mut rnet = Rnet::new()
        .allow_host_loopback()
        .arg("--netns")
        .arg(format!("/proc/{pid}/ns/net"))
        .arg("--userns")
        .arg(format!("/proc/{pid}/ns/user"))
        .start_attach(&[]);
    let url = format!("http://{GATEWAY}:{}/", srv.port());
    let out = run(&mut target.exec(&strs(&curl(&url))), secs(30));
    out.assert_success("curl in the namespace attached by path");
    assert_eq!((out.stdout.as_str(), srv.hits()), (HTTP_BODY, 1), "{out}");
    let t0 = Instant::now();
    rnet.signal(libc::SIGTERM);
    assert_exits_zero_within(&mut rnet, t0, secs(1));
}

#[test]
fn run_propagates_exit_status() {
    require!(require_userns);
    let out = Rnet::new().run(&["sh", "-c", "exit 7"], secs(30));
    assert_eq!(out.code(), Some(7), "{out}");
}

#[test]
fn exit_fd_hangup_stops_rnet() {
    require!(require_userns);
    let target = Target::userns();
    let (r, w) = pipe();
    let mut rnet = Rnet::new().exit_fd(&r).attach(target.pid());
    drop(r);
    assert!(
        rnet.wait_timeout(Duration::from_millis(200)).is_none(),
        "rnet exited early"
    );
    let t0 = Instant::now();
    drop(w);
    assert_exits_zero_within(&mut rnet, t0, secs(1));
}

// ---------------------------------------------------------------- 9. errors

#[test]
fn error_tun_not_accessible() {
    require!(require_root);
    let fake = TempPath::new("tun");
    std::fs::write(&fake.0, b"").unwrap();
    std::fs::set_permissions(&fake.0, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let inner = Rnet::new().nobody().run_cmd(&["true"]);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        r#"mount --bind "$0" /dev/net/tun && exec "$@""#,
    ])
    .arg(&fake.0)
    .arg(inner.get_program())
    .args(inner.get_args());
    clean_env(&mut cmd);
    let out = run(&mut cmd, secs(30));
    out.assert_failure("rnet without /dev/net/tun access");
    assert_stderr_has(&out, "/dev/net/tun");
    assert_stderr_has(&out, "chmod");
}

#[test]
fn error_no_such_pid() {
    assert!(!std::path::Path::new("/proc/4000000").exists());
    let out = run(&mut Rnet::new().command("attach", &["4000000"]), secs(30));
    out.assert_failure("rnet attach 4000000");
    assert_stderr_has(&out, "no such process");
}

#[test]
fn error_cannot_join_root_netns_as_nobody() {
    require!(require_root);
    let target = Target::start(&["-n"]);
    let pid = target.pid().to_string();
    let out = run(
        &mut Rnet::new().nobody().command("attach", &[&pid]),
        secs(30),
    );
    out.assert_failure("rnet attach to a root-owned netns as nobody");
    assert_stderr_has(&out, "cannot join");
}

#[test]
fn error_tap_name_taken_by_non_tap() {
    require!(require_userns);
    let out = Rnet::new().arg("--tap").arg("lo").run(&["true"], secs(30));
    out.assert_failure("rnet run --tap lo");
    assert_stderr_has(&out, "not a TAP device");
}
