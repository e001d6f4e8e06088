//! `--publish-auto`: a port the guest starts listening on after rnet is up
//! is published on the same host port within about a second, shows in
//! `rnet port ls`, and is withdrawn about a second after the guest closes
//! it; for TCP (with a range, through `rnet attach`) and UDP (every port,
//! through `rnet run`). A host port already taken is logged and retried,
//! never fatal.
//!
//! Guest servers are `tests/guest/port_server.py`, started only once rnet
//! is ready; they print "listening" once bound, which starts the clock.
//! Host ports are picked free below both the host's and the namespace's
//! ephemeral ranges (`free_service_block`).

mod common;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const GUEST: &str = "10.0.2.100";

/// What "within 1 s" is held to: rnet scans every 250 ms, so a port shows
/// up (or goes away) within about 0.25 s; 1 s plus a margin for a loaded
/// machine.
const WITHIN: Duration = Duration::from_millis(1500);

/// `port_server.py SPECS...` inside the target's namespaces, waited for
/// until it printed "listening"; returns it and when that line came.
fn start_server(target: &Target, specs: &[&str]) -> (LineProc, Instant) {
    let script = guest_script("port_server.py");
    let mut argv = vec![PYTHON, script.as_str()];
    argv.extend_from_slice(specs);
    let mut lp = LineProc::spawn(&mut target.exec(&argv));
    lp.wait_line("listening", secs(30), |l| l == "listening");
    (lp, Instant::now())
}

/// Polls GET on 127.0.0.1:`port` until the guest's HTTP server on `port`
/// answers; panics with the last error after [`WITHIN`] from `since`.
#[track_caller]
fn assert_published_tcp(port: u16, since: Instant) -> Duration {
    let dst = SocketAddr::from((LOCALHOST, port));
    let mut last = None;
    let got = poll_until(WITHIN.saturating_sub(since.elapsed()), || {
        match http_get(dst) {
            Ok((body, local)) => Some((body, local)),
            Err(e) => {
                last = Some(e);
                None
            }
        }
    });
    let took = since.elapsed();
    let Some(((body, local), _)) = got else {
        panic!(
            "127.0.0.1:{port} not reachable within {WITHIN:?} of the guest listening: last error {last:?}"
        );
    };
    let seen = parse_seen(&body);
    assert_eq!(seen.guest_port, port, "{body}");
    assert_eq!(
        seen.client,
        SocketAddr::from(([10, 0, 2, 2], local.port())),
        "a loopback client appears as the gateway, port kept: {body}"
    );
    assert!(took <= WITHIN, "published after {took:?}");
    took
}

fn connect_refused(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(&SocketAddr::from((LOCALHOST, port)), secs(1)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

/// Polls until a TCP connect to 127.0.0.1:`port` is refused; panics after
/// [`WITHIN`] from `since`.
#[track_caller]
fn assert_withdrawn_tcp(port: u16, since: Instant) -> Duration {
    let got = poll_until(WITHIN.saturating_sub(since.elapsed()), || {
        connect_refused(port).then_some(())
    });
    let took = since.elapsed();
    assert!(
        got.is_some() && took <= WITHIN,
        "127.0.0.1:{port} still accepts connections {took:?} after the guest server exited"
    );
    took
}

/// One datagram to 127.0.0.1:`port` from a fresh socket; the reply, or the
/// error (ECONNREFUSED when nothing is bound there, a timeout when nothing
/// answers).
fn udp_probe(port: u16) -> io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind((LOCALHOST, 0))?;
    s.connect((LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.send(b"probe")?;
    let mut b = [0u8; 2048];
    let n = s.recv(&mut b)?;
    Ok((
        String::from_utf8_lossy(&b[..n]).into_owned(),
        s.local_addr()?,
    ))
}

/// The `rnet port ls` row for host port `port`, if any.
fn row_for(api: &std::path::Path, port: u16) -> Option<Vec<String>> {
    let host = format!("0.0.0.0:{port}");
    port_rows(api).into_iter().find(|r| r.get(2) == Some(&host))
}

#[track_caller]
fn assert_listed(api: &std::path::Path, proto: &str, port: u16) {
    let row = row_for(api, port)
        .unwrap_or_else(|| panic!("rnet port ls lacks host port {port}: {:?}", port_rows(api)));
    assert_eq!(row[1], proto, "{row:?}");
    assert_eq!(row[3], format!("{GUEST}:{port}"), "{row:?}");
}

/// A TCP port the guest opens after rnet is up is published within a
/// second, only if it is in the range; closing it withdraws it within a
/// second; opening it again publishes it again.
#[test]
fn tcp_port_published_and_withdrawn_within_a_second() {
    require!(require_userns);
    let api = TempPath::new("api");
    let base = free_service_block(3);
    let (port, outside) = (base, base + 2);
    let target = Target::userns();
    let rnet = Rnet::new()
        .arg(format!("--publish-auto={base}-{}", base + 1))
        .arg("--api-socket")
        .arg(&api.0);
    let mut net = rnet.attach(target.pid());
    assert!(port_rows(&api.0).is_empty(), "nothing published yet");

    for round in 1..=2 {
        // The port outside the range is bound first, so the scan that
        // publishes `port` has seen it as well.
        let (mut server, listening) = start_server(
            &target,
            &[&format!("http:{outside}"), &format!("http:{port}")],
        );
        let took = assert_published_tcp(port, listening);
        eprintln!(
            "round {round}: guest port {port} reachable on the host {took:?} after it listened"
        );
        assert_listed(&api.0, "tcp", port);
        assert!(
            row_for(&api.0, outside).is_none(),
            "port {outside} is outside --publish-auto's range: {:?}",
            port_rows(&api.0)
        );
        assert!(
            connect_refused(outside),
            "port {outside} must not be published"
        );

        let out = server.stop(secs(10));
        let closed = Instant::now();
        let took = assert_withdrawn_tcp(port, closed);
        eprintln!(
            "round {round}: withdrawn {took:?} after the guest server exited ({})",
            out.status
        );
        assert!(
            port_rows(&api.0).is_empty(),
            "nothing listed after the withdrawal: {:?}",
            port_rows(&api.0)
        );
    }

    net.signal(libc::SIGTERM);
    let (exited, out) = net.stop(secs(10));
    assert!(exited, "rnet attach did not stop on SIGTERM: {out}");
    assert_stderr_has(&out, "auto-published");
    assert_stderr_has(&out, "withdrawn");
}

/// `--publish-auto=/udp` through `rnet run`: a UDP server the command
/// starts is published within a second and withdrawn within a second of
/// exiting (the host client then gets ECONNREFUSED).
#[test]
fn udp_port_published_and_withdrawn_within_a_second() {
    require!(require_userns);
    let api = TempPath::new("api");
    let port = free_service_block(1);
    let rnet = Rnet::new()
        .arg("--publish-auto=/udp")
        .arg("--api-socket")
        .arg(&api.0);
    // The shell outlives the server, so rnet keeps running after it exits.
    let guest = format!(
        "{PYTHON} {} udp:{port} & echo \"server $!\"; wait; echo 'server exited'; exec sleep 600",
        guest_script("port_server.py")
    );
    let mut lp = LineProc::spawn(&mut rnet.run_cmd(&["sh", "-c", &guest]));
    let mut server_pid = None;
    let mut listening = None;
    while server_pid.is_none() || listening.is_none() {
        let l = lp.wait_line("server pid and listening", secs(30), |l| {
            l == "listening" || l.starts_with("server ")
        });
        if l == "listening" {
            listening = Some(Instant::now());
        } else {
            server_pid = l["server ".len()..].parse::<i32>().ok();
            assert!(server_pid.is_some(), "bad line {l:?}");
        }
    }
    let (server_pid, listening) = (server_pid.unwrap(), listening.unwrap());

    let mut last = None;
    let got = poll_until(
        WITHIN.saturating_sub(listening.elapsed()),
        || match udp_probe(port) {
            Ok(r) => Some(r),
            Err(e) => {
                last = Some(e);
                None
            }
        },
    );
    let took = listening.elapsed();
    let Some(((reply, local), _)) = got else {
        panic!("no UDP reply on 127.0.0.1:{port} within {WITHIN:?}: last error {last:?}");
    };
    assert!(took <= WITHIN, "published after {took:?}");
    eprintln!("guest UDP port {port} answered on the host {took:?} after it listened");
    assert_eq!(reply, format!("client={GATEWAY}:{}|probe", local.port()));
    assert_listed(&api.0, "udp", port);

    // SAFETY: kill has no memory effects; the pid is the server this test
    // started (through rnet run's shell), which has not been waited for.
    assert_eq!(unsafe { libc::kill(server_pid, libc::SIGTERM) }, 0);
    lp.wait_line("server exited", secs(10), |l| l == "server exited");
    let closed = Instant::now();
    let got = poll_until(WITHIN, || {
        matches!(udp_probe(port), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
            .then_some(())
    });
    let took = closed.elapsed();
    assert!(
        got.is_some() && took <= WITHIN,
        "127.0.0.1:{port}/udp still published {took:?} after the guest server exited"
    );
    eprintln!("UDP port withdrawn {took:?} after the guest server exited");
    assert!(row_for(&api.0, port).is_none(), "{:?}", port_rows(&api.0));
    assert!(lp.running(), "rnet must keep running");
}

/// A host port that is taken is logged ("cannot auto-publish") and not
/// fatal: rnet keeps running, the guest's other port is published, and the
/// taken one follows once the host frees it.
#[test]
fn host_port_in_use_is_logged_and_retried() {
    require!(require_userns);
    let api = TempPath::new("api");
    let base = free_service_block(2);
    let (taken, other) = (base, base + 1);
    let blocker = TcpListener::bind((Ipv4Addr::UNSPECIFIED, taken)).unwrap();
    let target = Target::userns();
    let rnet = Rnet::new()
        .arg(format!("--publish-auto={taken}-{other}"))
        .arg("--api-socket")
        .arg(&api.0);
    let mut net = rnet.attach(target.pid());
    // `taken` is bound first: by the time `other` is published, rnet has
    // tried `taken` as well.
    let (_server, listening) = start_server(
        &target,
        &[&format!("http:{taken}"), &format!("http:{other}")],
    );
    assert_published_tcp(other, listening);
    assert!(
        net.wait_timeout(Duration::ZERO).is_none(),
        "rnet must keep running after a host port in use"
    );
    assert_listed(&api.0, "tcp", other);
    assert!(
        row_for(&api.0, taken).is_none(),
        "host port {taken} is ours, not rnet's: {:?}",
        port_rows(&api.0)
    );

    drop(blocker);
    let freed = Instant::now();
    let took = assert_published_tcp(taken, freed);
    eprintln!("host port {taken} published {took:?} after the host freed it");
    assert_listed(&api.0, "tcp", taken);

    net.signal(libc::SIGTERM);
    let (exited, out) = net.stop(secs(10));
    assert!(exited, "rnet attach did not stop on SIGTERM: {out}");
    assert_stderr_has(&out, "cannot auto-publish");
    let warn = out
        .stderr
        .lines()
        .find(|l| l.contains("cannot auto-publish"))
        .unwrap();
    assert!(
        warn.contains(&taken.to_string()),
        "the warning names the port: {warn}"
    );
    assert_eq!(
        out.stderr.matches("cannot auto-publish").count(),
        1,
        "logged once, retried quietly: {out}"
    );
}

/// A bad `--publish-auto` value stops rnet before it starts, naming it.
#[test]
fn bad_value_is_refused() {
    require!(require_userns);
    for spec in [
        "--publish-auto=9000-8000",
        "--publish-auto=x",
        "--publish-auto=/sctp",
    ] {
        let mut c: Command = Rnet::new().arg(spec).run_cmd(&["true"]);
        let out = run(&mut c, secs(30));
        assert_eq!(out.code(), Some(1), "{spec}: {out}");
        let named = out.stderr.contains("--publish-auto") || out.stderr.contains("protocol");
        assert!(named, "{spec}: the error names the problem: {out}");
    }
}
