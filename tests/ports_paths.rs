//! The two ways a published TCP port is carried: the userspace stack
//! (`--port-path stack`) and the fast path (the default, `auto`: an agent
//! inside the namespace and splice(2)). On each: `rnet port ls` names the
//! path, HTTP through the port works, and the guest sees the client's own
//! address and port (a test-host client as itself, a loopback client as
//! the gateway). On the stack path, 256 MiB each way arrive intact.
//!
//! Guest servers are `tests/guest/port_server.py` under `rnet run`, waited
//! for until they print "listening". Every rnet runs with
//! `--outbound-allow none` and a loopback DNS upstream (the builder's
//! defaults).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Instant;

use common::*;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const MIB: u64 = 1 << 20;
const BULK: u64 = 256 * MIB;

/// Which path a test asks for.
#[derive(Clone, Copy, Debug)]
enum PortPath {
    /// `--port-path stack`.
    Stack,
    /// No option: the default (`auto`), which must end up on the fast path.
    Default,
}

impl PortPath {
    fn shown(self) -> &'static str {
        match self {
            PortPath::Stack => "stack",
            PortPath::Default => "fast",
        }
    }

    /// The builder with this path (and -v, so connections are logged with
    /// their path).
    fn rnet(self) -> Rnet {
        let r = Rnet::new().arg("-v");
        match self {
            PortPath::Stack => r.arg("--port-path").arg("stack"),
            PortPath::Default => r,
        }
    }
}

/// `rnet run [rnet's options] -- python3 port_server.py SPECS...`, waited
/// for until the guest prints "listening".
fn start_guest(rnet: &Rnet, specs: &[&str]) -> LineProc {
    let script = guest_script("port_server.py");
    let mut argv = vec![PYTHON, script.as_str()];
    argv.extend_from_slice(specs);
    let mut lp = LineProc::spawn(&mut rnet.run_cmd(&argv));
    lp.wait_line("listening", secs(30), |l| l == "listening");
    lp
}

/// Waits (up to 5 s: the fast path is set up once the namespace's agent
/// runs) until `rnet port ls` shows every rule on `want`; returns the rows.
#[track_caller]
fn assert_path_listed(api: &Path, rules: usize, want: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let ok = poll_until(secs(5), || {
        rows = port_rows(api);
        (rows.len() == rules
            && rows
                .iter()
                .all(|r| r.get(4).map(String::as_str) == Some(want)))
        .then_some(())
    });
    assert!(
        ok.is_some(),
        "rnet port ls must show {rules} rule(s) on path {want:?}: {rows:?}"
    );
    rows
}

/// The connection log lines of a -v rnet must name the fast path exactly
/// when it was asked for.
#[track_caller]
fn assert_connections_logged(out: &Output, path: PortPath) {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("published connection"))
        .collect();
    assert!(!lines.is_empty(), "no published connection logged: {out}");
    let fast = lines.iter().filter(|l| l.contains("path=\"fast\"")).count();
    match path {
        PortPath::Stack => assert_eq!(fast, 0, "stack path, yet: {lines:#?}"),
        PortPath::Default => assert_eq!(fast, lines.len(), "fast path, yet: {lines:#?}"),
    }
}

/// HTTP through a loopback-published port; the guest sees the gateway with
/// the client's port; `rnet port ls` shows the path.
fn http_and_path(path: PortPath) {
    let api = TempPath::new("api");
    let hp = free_service_block(1);
    let rnet = path
        .rnet()
        .arg("-p")
        .arg(format!("127.0.0.1:{hp}:8080"))
        .arg("--api-socket")
        .arg(&api.0);
    let mut guest = start_guest(&rnet, &["http:8080"]);
    let rows = assert_path_listed(&api.0, 1, path.shown());
    assert_eq!(
        rows[0][..4],
        ["1", "tcp", &format!("127.0.0.1:{hp}"), "10.0.2.100:8080"],
        "{rows:?}"
    );
    for i in 0..20 {
        let (body, local) = http_get(SocketAddr::from((LOCALHOST, hp)))
            .unwrap_or_else(|e| panic!("GET {i} on the {} path: {e}", path.shown()));
        let seen = parse_seen(&body);
        assert_eq!(seen.guest_port, 8080, "{body}");
        assert_eq!(
            seen.client,
            SocketAddr::from(([10, 0, 2, 2], local.port())),
            "a loopback client is the gateway, its port kept ({} path)",
            path.shown()
        );
    }
    let out = guest.stop(secs(10));
    assert_connections_logged(&out, path);
}

#[test]
fn stack_path_http_and_port_ls() {
    require!(require_userns);
    http_and_path(PortPath::Stack);
}

#[test]
fn fast_path_http_and_port_ls() {
    require!(require_userns);
    http_and_path(PortPath::Default);
}

/// A client in a test-host namespace is seen by the guest with its own
/// address and port.
fn source_address_kept(path: PortPath) {
    let th = TestHost::create();
    let near = th.near;
    let api = TempPath::new("api");
    let hp = free_service_block(1);
    let rnet = path
        .rnet()
        .arg("-p")
        .arg(format!("{near}:{hp}:8080"))
        .arg("--api-socket")
        .arg(&api.0);
    let mut guest = start_guest(&rnet, &["http:8080"]);
    assert_path_listed(&api.0, 1, path.shown());
    for i in 0..5 {
        let (body, local) = th
            .in_ns(move || http_get(SocketAddr::from((near, hp))))
            .unwrap_or_else(|e| panic!("GET {i} from the test host ({} path): {e}", path.shown()));
        let seen = parse_seen(&body);
        assert_eq!(
            seen.client,
            local,
            "the guest must see the test host's own address and port ({} path)",
            path.shown()
        );
        assert_eq!(seen.client.ip(), th.addr);
        assert_eq!(seen.guest_port, 8080);
    }
    let out = guest.stop(secs(10));
    assert_connections_logged(&out, path);
}

#[test]
fn stack_path_keeps_test_host_source_address() {
    require!(require_root);
    source_address_kept(PortPath::Stack);
}

#[test]
fn fast_path_keeps_test_host_source_address() {
    require!(require_root);
    source_address_kept(PortPath::Default);
}

fn rate(t0: Instant) -> String {
    let t = t0.elapsed();
    format!("{t:?} ({:.0} MB/s)", BULK as f64 / t.as_secs_f64() / 1e6)
}

#[test]
fn stack_path_256mib_host_to_guest() {
    require!(require_userns);
    let api = TempPath::new("api");
    let hp = free_service_block(1);
    let rnet = PortPath::Stack
        .rnet()
        .arg("-p")
        .arg(format!("127.0.0.1:{hp}:7001"))
        .arg("--api-socket")
        .arg(&api.0);
    let mut guest = start_guest(&rnet, &["sink:7001"]);
    assert_path_listed(&api.0, 1, "stack");
    let expected = thread::spawn(|| Pattern::digest(BULK));
    let t0 = Instant::now();
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_write_timeout(Some(secs(60))).unwrap();
    s.set_read_timeout(Some(secs(60))).unwrap();
    let mut p = Pattern::new();
    for i in 0..BULK / BLOCK as u64 {
        s.write_all(p.block(i))
            .unwrap_or_else(|e| panic!("sending block {i}: {e}"));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the guest closes after EOF");
    let line = guest.wait_line("sink digest", secs(120), |l| l.starts_with("sink "));
    eprintln!("host->guest 256 MiB on the stack path in {}", rate(t0));
    assert_eq!(
        Digested::parse(&line["sink ".len()..]),
        expected.join().unwrap()
    );
}

#[test]
fn stack_path_256mib_guest_to_host() {
    require!(require_userns);
    let api = TempPath::new("api");
    let hp = free_service_block(1);
    let rnet = PortPath::Stack
        .rnet()
        .arg("-p")
        .arg(format!("127.0.0.1:{hp}:7002"))
        .arg("--api-socket")
        .arg(&api.0);
    let spec = format!("source:7002:{BULK}");
    let _guest = start_guest(&rnet, &[&spec]);
    assert_path_listed(&api.0, 1, "stack");
    let expected = thread::spawn(|| Pattern::digest(BULK));
    let t0 = Instant::now();
    let mut s = TcpStream::connect((LOCALHOST, hp)).unwrap();
    s.set_read_timeout(Some(secs(60))).unwrap();
    let got = digest_reader(&mut s).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("guest->host 256 MiB on the stack path in {}", rate(t0));
    assert_eq!(got, expected.join().unwrap());
}
