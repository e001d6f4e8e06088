//! IPv6 on the virtual link: namespace configuration, router advertisements,
//! NDP, ICMPv6 echo to the gateway and (through ping sockets) to a test
//! host, TCP/UDP to the host's ::1 through the gateway fd00::2, DNS over
//! IPv6 to fd00::3, published TCP and UDP ports on IPv6 host addresses (by
//! `-p` and through the API), and `--no-ipv6`.
//!
//! Every rnet here runs with an outbound allow-list (`none`, or the test
//! host it pings) and a loopback DNS responder (see `common::Rnet`); guests
//! only talk to fd00::2, fd00::3 and a test host this file creates.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const GW6: &str = GATEWAY6;
const DNS6: &str = "fd00::3";

fn v6_listener() -> TcpListener {
    TcpListener::bind("[::1]:0").expect("bind [::1]:0 (is IPv6 loopback available?)")
}

fn url6(port: u16) -> String {
    format!("http://[{GW6}]:{port}/")
}

fn curl6(url: &str) -> Vec<String> {
    let mut c = curl(url);
    c.insert(1, "-6".into());
    c.insert(2, "-g".into());
    c
}

#[test]
fn configured_guest_has_address_route_and_ping() {
    require!(require_userns);
    let out = Rnet::new().run(
        &[
            "sh",
            "-c",
            "ip -6 addr show dev tap0; ip -6 route show default; ping -6 -c 3 -W 2 fd00::2",
        ],
        secs(30),
    );
    out.assert_success("guest ip -6 / ping -6 fd00::2");
    assert!(out.stdout.contains("inet6 fd00::100/64"), "{out}");
    assert!(out.stdout.contains("default via fd00::2"), "{out}");
    assert!(out.stdout.contains("3 received"), "{out}");
}

#[test]
fn host_loopback_http_over_v6() {
    require!(require_userns);
    let srv = HttpServer::on(v6_listener());
    let out = Rnet::new()
        .allow_host_loopback()
        .run(&strs(&curl6(&url6(srv.port()))), secs(30));
    out.assert_success("guest curl to [fd00::2] with --allow-host-loopback");
    assert_eq!(out.stdout, HTTP_BODY, "{out}");
    assert_eq!(srv.hits(), 1, "host server connections");

    let srv = HttpServer::on(v6_listener());
    let t0 = Instant::now();
    let out = Rnet::new().run(&strs(&curl6(&url6(srv.port()))), secs(30));
    assert_eq!(out.code(), Some(7), "curl must fail to connect: {out}");
    assert_stderr_has(&out, "unreachable");
    // curl's --max-time is 5 s: failing fast means no timeout.
    assert!(t0.elapsed() < secs(4), "took {:?}: {out}", t0.elapsed());
    assert_eq!(srv.hits(), 0, "host server must see no connection");
}

#[test]
fn udp_echo_over_v6() {
    require!(require_userns);
    let s = UdpSocket::bind("[::1]:0").unwrap();
    let port = s.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    thread::spawn(move || {
        let mut b = vec![0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut b) {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = s.send_to(&b[..n], peer);
        }
    });
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         for i in range(3):\n\
         \x20   msg = b'rnet-v6-%d' % i\n\
         \x20   s.sendto(msg, ('{GW6}', {port}))\n\
         \x20   data, peer = s.recvfrom(2048)\n\
         \x20   assert data == msg, data\n\
         \x20   assert peer[0] == '{GW6}' and peer[1] == {port}, peer\n\
         print('ok')\n"
    );
    let out = Rnet::new()
        .allow_host_loopback()
        .run(&[PYTHON, "-c", &script], secs(30));
    out.assert_success("guest UDP echo over v6");
    assert_eq!(out.stdout.trim(), "ok", "{out}");
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[test]
fn dns_over_v6_udp_and_tcp() {
    require!(require_userns);
    let dns = Arc::new(DnsServer::start());
    let rnet = Rnet::with_dns(&dns);
    for tcp in [false, true] {
        let mut cmd = vec![
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "-6",
            "@fd00::3",
            "example.test",
            "A",
        ];
        if tcp {
            cmd.push("+tcp");
        }
        let out = rnet.run(&cmd, secs(30));
        out.assert_success("guest dig -6 @fd00::3");
        assert_eq!(out.stdout.trim(), DNS_ANSWER.to_string(), "{out}");
    }
    assert_eq!(dns.queries(), (1, 1));
    let _ = DNS6;
}

#[test]
fn unconfigured_guest_takes_address_from_router_advertisements() {
    require!(require_userns);
    let script = "\
        sysctl -qw net.ipv6.conf.tap0.accept_ra=2 || true
        ip link set tap0 up
        for i in $(seq 1 100); do
            a=$(ip -6 addr show dev tap0 scope global -tentative | grep -o 'fd00::[0-9a-f:]*/64')
            r=$(ip -6 route show default | grep 'via fe80::2')
            if [ -n \"$a\" ] && [ -n \"$r\" ]; then break; fi
            sleep 0.1
        done
        echo \"addr=$a\"
        echo \"route=$r\"
        ping -6 -c 1 -W 2 fd00::2 >/dev/null && echo ping-ok";
    let out = Rnet::new()
        .arg("--no-configure")
        .run(&["sh", "-c", script], secs(60));
    out.assert_success("guest SLAAC by router advertisements");
    assert!(out.stdout.contains("addr=fd00::"), "{out}");
    assert!(out.stdout.contains("route=default via fe80::2"), "{out}");
    assert!(out.stdout.contains("ping-ok"), "{out}");
}

#[test]
fn no_ipv6_gives_no_address() {
    require!(require_userns);
    let out = Rnet::new().arg("--no-ipv6").run(
        &["sh", "-c", "sleep 1; ip -6 addr show dev tap0; ip -6 route"],
        secs(30),
    );
    out.assert_success("guest ip -6 with --no-ipv6");
    assert!(!out.stdout.contains("fd00"), "{out}");
}

#[test]
fn bulk_tcp_over_v6_both_ways() {
    require!(require_userns);
    let total: u64 = 64 << 20;
    let rnet = Rnet::new().allow_host_loopback();
    let script = guest_script("stream.py");
    let expected = Pattern::digest(total);

    let (addr, result) = tcp_sink_on(v6_listener());
    let (port, total_s) = (addr.port().to_string(), total.to_string());
    let out = rnet.run(&[PYTHON, &script, "send", GW6, &port, &total_s], secs(300));
    out.assert_success("guest stream.py send over v6");
    let host = result.recv_timeout(secs(60)).unwrap().expect("host sink");
    assert_eq!(Digested::parse(&out.stdout), expected, "guest side");
    assert_eq!(host, expected, "host side");

    let (addr, result) = tcp_source_on(v6_listener(), total);
    let port = addr.port().to_string();
    let out = rnet.run(&[PYTHON, &script, "recv", GW6, &port], secs(300));
    out.assert_success("guest stream.py recv over v6");
    assert_eq!(
        result.recv_timeout(secs(60)).unwrap().expect("source"),
        total
    );
    assert_eq!(Digested::parse(&out.stdout), expected, "guest side");
}

/// A guest HTTP server on [::]:PORT that names the client it sees.
const V6_HTTP_GUEST: &str = r#"
import http.server, socket, sys
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("client=%s\n" % self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b)))
        self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
srv = S(("::", int(sys.argv[1])), H)
print("listening", flush=True)
srv.serve_forever()
"#;

#[test]
fn published_port_from_host_v6_loopback() {
    if !require_userns("published_port_from_host_v6_loopback") {
        return;
    }
    let hp = free_service_block(1);
    let rnet = Rnet::new()
        .arg("-p")
        .arg(format!("[::1]:{hp}:8000"))
        .arg("-p")
        .arg(format!("[::]:{}:8000", hp + 1));
    let mut guest = LineProc::spawn(&mut rnet.run_cmd(&[PYTHON, "-c", V6_HTTP_GUEST, "8000"]));
    guest.wait_line("listening", Duration::from_secs(30), |l| l == "listening");
    // A v6 loopback client appears as the v6 gateway; on the dual-stack
    // [::] listener a v4 client appears as the v4 gateway.
    let (body, _) = http_get(format!("[::1]:{hp}").parse().unwrap()).expect("GET over v6");
    assert!(body.contains("client=fd00::2"), "{body}");
    let (body, _) =
        http_get(format!("127.0.0.1:{}", hp + 1).parse().unwrap()).expect("GET over v4");
    assert!(body.contains("10.0.2.2"), "{body}");
    let (body, _) =
        http_get(format!("[::1]:{}", hp + 1).parse().unwrap()).expect("GET over v6, dual-stack");
    assert!(body.contains("client=fd00::2"), "{body}");
}

/// One control-socket request through the library's client.
#[track_caller]
fn api_call(path: &std::path::Path, req: Value) -> Value {
    rnet::ports::api::call(path, &req).unwrap_or_else(|e| panic!("API request {req}: {e}"))
}

/// add_hostfwd over the JSON API exactly as a slirp4netns client sends it;
/// returns the rule's id.
#[track_caller]
fn add_hostfwd(path: &std::path::Path, args: Value) -> u64 {
    let mut a = args;
    a["proto"] = json!("tcp");
    let r = api_call(path, json!({"execute": "add_hostfwd", "arguments": a}));
    r["return"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("add_hostfwd {a}: {r}"))
}

#[test]
fn api_hostfwd_with_v6_host_and_guest_addresses() {
    require!(require_userns);
    let api = TempPath::new("api");
    let rnet = Rnet::new().arg("--api-socket").arg(&api.0);
    let mut guest = LineProc::spawn(&mut rnet.run_cmd(&[PYTHON, "-c", V6_HTTP_GUEST, "8000"]));
    guest.wait_line("listening", secs(30), |l| l == "listening");
    let hp = free_service_block(3);
    let get = |port: u16| {
        let (body, _) = http_get(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
            .unwrap_or_else(|e| panic!("GET [::1]:{port}: {e}"));
        body.trim().to_string()
    };

    // No guest address: the IPv6 client reaches the guest over IPv6, as
    // the IPv6 gateway (the host's ::1).
    let plain = add_hostfwd(
        &api.0,
        json!({"host_addr": "::1", "host_port": hp, "guest_port": 8000}),
    );
    assert_eq!(get(hp), "client=fd00::2");
    // An IPv4 guest address: the same client arrives over IPv4, as the
    // IPv4 gateway (seen v4-mapped by the guest's dual-stack socket).
    let to_v4 = add_hostfwd(
        &api.0,
        json!({"host_addr": "::1", "host_port": hp + 1, "guest_addr": "10.0.2.100", "guest_port": 8000}),
    );
    assert_eq!(get(hp + 1), "client=::ffff:10.0.2.2");
    // `rnet port add` with bracketed IPv6 host and guest addresses.
    let out = port_cli(
        &api.0,
        "add",
        &[&format!("[::1]:{}:[fd00::100]:8000", hp + 2)],
    );
    out.assert_success("rnet port add [::1]:HP:[fd00::100]:8000");
    assert_eq!(get(hp + 2), "client=fd00::2");

    // list_hostfwd echoes the IPv6 addresses.
    let list = api_call(&api.0, json!({"execute": "list_hostfwd"}));
    let entries = list["entries"].as_array().expect("entries");
    let entry = |port: u16| {
        entries
            .iter()
            .find(|e| e["host_port"] == json!(port))
            .unwrap_or_else(|| panic!("no entry for host port {port}: {list}"))
    };
    for (port, id, guest_addr) in [
        (hp, Some(plain), "fd00::100"),
        (hp + 1, Some(to_v4), "10.0.2.100"),
        (hp + 2, None, "fd00::100"),
    ] {
        let e = entry(port);
        assert_eq!(e["host_addr"], json!("::1"), "{e}");
        assert_eq!(e["guest_addr"], json!(guest_addr), "{e}");
        assert_eq!(e["guest_port"], json!(8000), "{e}");
        if let Some(id) = id {
            assert_eq!(e["id"], json!(id), "{e}");
        }
    }
    // The fast path's agent speaks IPv4: IPv6 guests take the stack.
    assert_eq!(entry(hp)["path"], json!("stack"));
    let rows = port_rows(&api.0);
    assert!(
        rows.iter()
            .any(|r| r[2] == format!("[::1]:{}", hp + 2) && r[3] == "[fd00::100]:8000"),
        "{rows:?}"
    );
    guest.stop(secs(10));
}

/// A guest UDP echo server on [::]:PORT (dual-stack) that appends the
/// client address it saw to each reply.
const V6_UDP_GUEST: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("listening", flush=True)
while True:
    d, peer = s.recvfrom(65535)
    s.sendto(d + b" seen=" + peer[0].encode(), peer)
"#;

/// Sends `n` tagged datagrams from each client to `dst`, interleaved, then
/// checks that each client got back exactly its own, from `dst`, with the
/// client address the guest reported.
#[track_caller]
fn udp_clients_get_own_replies(clients: &[(&UdpSocket, &str)], dst: SocketAddr, seen: &str) {
    let n = 5;
    for i in 0..n {
        for (s, tag) in clients {
            s.send_to(format!("{tag}{i}").as_bytes(), dst)
                .unwrap_or_else(|e| panic!("client {tag}: send to {dst}: {e}"));
        }
    }
    for (s, tag) in clients {
        let mut got: Vec<String> = (0..n)
            .map(|i| {
                let mut b = [0u8; 2048];
                let (k, from) = s
                    .recv_from(&mut b)
                    .unwrap_or_else(|e| panic!("client {tag}: reply {i} from {dst}: {e}"));
                assert_eq!(from, dst, "client {tag}: reply source");
                String::from_utf8_lossy(&b[..k]).into_owned()
            })
            .collect();
        got.sort();
        let want: Vec<String> = (0..n).map(|i| format!("{tag}{i} seen={seen}")).collect();
        assert_eq!(got, want, "client {tag} must get exactly its own replies");
    }
}

#[test]
fn published_udp_over_v6_two_clients() {
    require!(require_userns);
    let hp = free_service_block(2);
    let rnet = Rnet::new()
        .arg("-p")
        .arg(format!("[::1]:{hp}:9000/udp"))
        .arg("-p")
        .arg(format!("[::]:{}:9000/udp", hp + 1));
    let mut guest = LineProc::spawn(&mut rnet.run_cmd(&[PYTHON, "-c", V6_UDP_GUEST, "9000"]));
    guest.wait_line("listening", secs(30), |l| l == "listening");
    let client = |bind: &str| {
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(secs(5))).unwrap();
        s
    };
    let (a, b) = (client("[::1]:0"), client("[::1]:0"));
    // Two IPv6 clients on [::1]: each appears as fd00::2 with its own port.
    let dst: SocketAddr = format!("[::1]:{hp}").parse().unwrap();
    udp_clients_get_own_replies(&[(&a, "a"), (&b, "b")], dst, GW6);
    // The dual-stack [::] port: IPv6 clients over IPv6, an IPv4 client over
    // IPv4 as the IPv4 gateway.
    let dst: SocketAddr = format!("[::1]:{}", hp + 1).parse().unwrap();
    udp_clients_get_own_replies(&[(&a, "a"), (&b, "b")], dst, GW6);
    let c = client("127.0.0.1:0");
    let dst: SocketAddr = format!("127.0.0.1:{}", hp + 1).parse().unwrap();
    udp_clients_get_own_replies(&[(&c, "c")], dst, "::ffff:10.0.2.2");
}

/// Everything in this file touching net.ipv4.ping_group_range (which also
/// governs IPv6 ping sockets) stays in this one test.
#[test]
fn ping6_test_host_through_ping_sockets() {
    require!(require_root);
    let th = TestHost::create_v6();
    let (_, addr) = th.v6.unwrap();
    let addr = addr.to_string();
    let ping = |count: &'static str| {
        ["ping", "-6", "-c", count, "-W", "2", addr.as_str()].map(String::from)
    };
    let range = SysctlGuard::new("/proc/sys/net/ipv4/ping_group_range");

    range.set("0 2147483647");
    let allowed = Rnet::new().outbound_allow(&th.cidr6());
    let out = allowed.run(&strs(&ping("3")), secs(30));
    out.assert_success("guest ping -6 of the test host, ping sockets allowed");
    assert!(out.stdout.contains(" 3 received"), "{out}");

    // Outside the allow-list (only the test host's IPv4 address is on it):
    // refused by rnet, which says so.
    let out = Rnet::new()
        .outbound_allow(&th.cidr())
        .run(&strs(&ping("1")), secs(30));
    out.assert_failure("guest ping -6 of a test host outside the allow-list");
    assert!(
        out.stdout
            .to_lowercase()
            .contains("administratively prohibited"),
        "{out}"
    );

    range.set("1 0");
    let out = allowed.run(&strs(&ping("3")), secs(30));
    out.assert_failure("guest ping -6 of the test host, ping sockets denied");
    assert_one_ping_range_warning(&out);
}
